// checksum_avx2.cc — payload_hash built for AVX2 (checksum_simd.inc; CMakeLists.txt gives this
// file alone -mavx2). checksum.cc calls it only on CPUs that have AVX2.
#ifdef __AVX2__
#define EMBSTORE_PAYLOAD_HASH_SIMD payload_hash_avx2
#include "format/checksum_simd.inc"
#endif
