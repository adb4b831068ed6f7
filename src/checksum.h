// checksum.h — the row and index-entry checksums of FORMAT.md ("index.G").
//
// The only file that includes xxHash. Pure functions, thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

#include "format.h"

namespace embstore::detail {

// XXH3-64 of a row's bytes: computed before the writer lock is taken. Uses the AVX2 build of
// XXH3 where the CPU has it (4x the SSE2 speed here), else the portable one; same value either way.
std::uint64_t payload_hash(const void* row, std::size_t row_bytes, std::uint64_t seed) noexcept;
std::uint64_t payload_hash_portable(const void* row, std::size_t row_bytes,
                                    std::uint64_t seed) noexcept;
#ifdef EMBSTORE_CHECKSUM_AVX2
std::uint64_t payload_hash_avx2(const void* row, std::size_t row_bytes,
                                std::uint64_t seed) noexcept;
#endif

// Folds the row number (known only under the lock), key and epoch into the payload hash.
std::uint64_t entry_checksum(std::uint64_t payload_hash, std::uint64_t key, std::uint64_t epoch,
                             std::uint64_t row, std::uint64_t seed) noexcept;

// True when `entry` sits at position `row` and its checksum matches `row_bytes`.
bool entry_valid(const IndexEntry& entry, std::uint64_t row, const void* row_bytes,
                 std::size_t record_bytes, std::uint64_t seed) noexcept;

// XXH3-64 (seed 0) of two byte ranges concatenated: the header checksum.
std::uint64_t header_hash(const void* a, std::size_t a_bytes, const void* b,
                          std::size_t b_bytes) noexcept;

}  // namespace embstore::detail
