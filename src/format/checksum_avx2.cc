// checksum_avx2.cc — payload_hash built for AVX2 (CMakeLists.txt gives this file alone -mavx2).
//
// checksum.cc calls it only on CPUs that have AVX2. XXH3's value does not depend on the
// instruction set it was computed with, so rows hashed either way verify either way; the test
// "The AVX2 row hash equals the portable one" holds the two to that.
#include "format/checksum.h"

#ifdef __AVX2__
#define XXH_INLINE_ALL
#include <xxhash.h>

namespace embstore::detail {

std::uint64_t payload_hash_avx2(const void* row, std::size_t row_bytes,
                                const RowHashKey& key) noexcept {
  return XXH3_64bits_withSecretandSeed(row, row_bytes, key.secret, sizeof(key.secret), key.seed);
}

}  // namespace embstore::detail
#endif
