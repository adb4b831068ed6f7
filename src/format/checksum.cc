#include "format/checksum.h"

#include <cstring>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace embstore::detail {

static_assert(sizeof(RowHashKey::secret) == XXH3_SECRET_DEFAULT_SIZE);

RowHashKey::RowHashKey(std::uint64_t seed_value) noexcept : seed(seed_value) {
  XXH3_generateSecret_fromSeed(secret, seed);
}

std::uint64_t payload_hash_reference(const void* row, std::size_t row_bytes,
                                     std::uint64_t seed) noexcept {
  return XXH3_64bits_withSeed(row, row_bytes, seed);
}

std::uint64_t payload_hash_portable(const void* row, std::size_t row_bytes,
                                    const RowHashKey& key) noexcept {
  return XXH3_64bits_withSecretandSeed(row, row_bytes, key.secret, sizeof(key.secret), key.seed);
}

namespace {
using HashFn = std::uint64_t (*)(const void*, std::size_t, const RowHashKey&) noexcept;

HashFn pick_payload_hash() noexcept {
#ifdef EMBSTORE_CHECKSUM_SIMD
  if (__builtin_cpu_supports("avx512f")) return payload_hash_avx512;
  if (__builtin_cpu_supports("avx2")) return payload_hash_avx2;
#endif
  return payload_hash_portable;
}
}  // namespace

std::uint64_t payload_hash(const void* row, std::size_t row_bytes, const RowHashKey& key) noexcept {
  static const HashFn hash = pick_payload_hash();
  return hash(row, row_bytes, key);
}

std::uint64_t entry_checksum(std::uint64_t payload_hash, std::uint64_t key, std::uint64_t epoch,
                             std::uint64_t row, std::uint64_t seed) noexcept {
  const std::uint64_t words[4] = {payload_hash, key, epoch, row};
  return XXH3_64bits_withSeed(words, sizeof(words), seed);
}

bool entry_valid(const IndexEntry& entry, std::uint64_t row, const void* row_bytes,
                 std::size_t record_bytes, const RowHashKey& key) noexcept {
  if ((entry.row & kEntryRowMask) != row) return false;
  const std::uint64_t expected = entry_checksum(payload_hash(row_bytes, record_bytes, key),
                                                entry.key, entry.epoch, entry.row, key.seed);
  return expected == entry.checksum;
}

std::uint64_t header_hash(const void* a, std::size_t a_bytes, const void* b,
                          std::size_t b_bytes) noexcept {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, a, a_bytes);
  if (b_bytes != 0) XXH3_64bits_update(&state, b, b_bytes);
  return XXH3_64bits_digest(&state);
}

}  // namespace embstore::detail
