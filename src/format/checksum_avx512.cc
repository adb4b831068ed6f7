// checksum_avx512.cc — payload_hash built for AVX-512 (checksum_simd.inc; CMakeLists.txt gives
// this file alone -mavx512f). checksum.cc calls it only on CPUs that have AVX-512F.
#ifdef __AVX512F__
#define EMBSTORE_PAYLOAD_HASH_SIMD payload_hash_avx512
#include "format/checksum_simd.inc"
#endif
