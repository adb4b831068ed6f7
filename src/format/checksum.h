// checksum.h — the row and index-entry checksums of FORMAT.md ("index.G").
//
// The only file that includes xxHash. Pure functions, thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

#include "format/format.h"

namespace embstore::detail {

// A store's row-hash key: its checksum seed and the XXH3 secret derived from it, once per store
// (XXH3_generateSecret_fromSeed). XXH3_64bits_withSeed derives that secret again for every input
// longer than 240 bytes, a large share of a short row's hash (bench/RESULTS.md, the row-hash
// change); with the secret at hand (XXH3_64bits_withSecretandSeed) the value is the same and the
// derivation is skipped.
struct RowHashKey {
  explicit RowHashKey(std::uint64_t seed) noexcept;
  std::uint64_t seed;
  alignas(64) unsigned char secret[192];  // XXH3_SECRET_DEFAULT_SIZE
};

// The row hash of FORMAT.md, XXH3-64 of a row's bytes with the store's seed: computed before the
// writer lock is taken. Uses the AVX-512 build of XXH3 where the CPU has it (1.3x AVX2 for rows of
// 3 KB), else the AVX2 build (several times the SSE2 speed), else the portable one; same value
// every way, and the same as payload_hash_reference.
std::uint64_t payload_hash(const void* row, std::size_t row_bytes, const RowHashKey& key) noexcept;
// The definition, XXH3_64bits_withSeed, computed the slow, obvious way: for tests.
std::uint64_t payload_hash_reference(const void* row, std::size_t row_bytes,
                                     std::uint64_t seed) noexcept;
std::uint64_t payload_hash_portable(const void* row, std::size_t row_bytes,
                                    const RowHashKey& key) noexcept;
#if defined(__x86_64__)  // Built on x86-64 (CMakeLists.txt); run only where the CPU has them.
std::uint64_t payload_hash_avx2(const void* row, std::size_t row_bytes,
                                const RowHashKey& key) noexcept;
std::uint64_t payload_hash_avx512(const void* row, std::size_t row_bytes,
                                  const RowHashKey& key) noexcept;
#endif

// Folds the row number (known only under the lock), key and epoch into the payload hash.
std::uint64_t entry_checksum(std::uint64_t payload_hash, std::uint64_t key, std::uint64_t epoch,
                             std::uint64_t row, std::uint64_t seed) noexcept;

// True when `entry` sits at position `row` and its checksum matches `row_bytes`.
bool entry_valid(const IndexEntry& entry, std::uint64_t row, const void* row_bytes,
                 std::size_t record_bytes, const RowHashKey& key) noexcept;

// XXH3-64 (seed 0) of two byte ranges concatenated: the header checksum.
std::uint64_t header_hash(const void* a, std::size_t a_bytes, const void* b,
                          std::size_t b_bytes) noexcept;

}  // namespace embstore::detail
