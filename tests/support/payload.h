// payload.h — rows derived from (writer, seq) so any process can recompute and check them.
//
// A row's key encodes its writer and sequence number: key = writer << 40 | seq. Its values are a
// seeded function of the key, so a reader that sees a key can rebuild the exact row it must
// hold. Batches carry consecutive seqs, so contiguity is checkable from keys alone.
#pragma once

#include <cstdint>
#include <vector>

namespace embstore::test {

inline std::uint64_t make_key(std::uint64_t writer, std::uint64_t seq) {
  return (writer << 40) | seq;
}
inline std::uint64_t key_writer(std::uint64_t key) { return key >> 40; }
inline std::uint64_t key_seq(std::uint64_t key) { return key & ((1ull << 40) - 1); }

// Fills `out[0..dim)` with the float32 payload of `key`.
void payload_for(std::uint64_t key, std::uint32_t dim, float* out);
std::vector<float> batch_payload(std::uint64_t writer, std::uint64_t first_seq, std::uint64_t rows,
                                 std::uint32_t dim);
// True when `row` (float32, dim values) is exactly payload_for(key).
bool payload_matches(std::uint64_t key, std::uint32_t dim, const void* row);

}  // namespace embstore::test
