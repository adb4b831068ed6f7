#include "format/convert_fast.h"

#include "format/convert.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define EMBSTORE_CONVERT_X86 1
#endif

namespace embstore::detail {
namespace {

#ifdef EMBSTORE_CONVERT_X86

bool has_avx2_f16c() noexcept {
  // F16C through cpuid: clang (14) rejects __builtin_cpu_supports("f16c"), and the fuzz build
  // (tests/fuzz/run.sh) compiles this file with clang. "avx2" also means the OS saves ymm state.
  static const bool supported = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0 || (ecx & bit_F16C) == 0) return false;
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return supported;
}

// 8 floats at a time. vcvtps2ph rounds to nearest even (imm 0), turns overflow into infinity and
// subnormal results are exact-rounded, as float_to_half does; only NaN differs (the hardware keeps
// payload bits), so NaN lanes are replaced with float_to_half's sign | 0x7e00.
// Sets `infinite` when some element written is +-infinity.
__attribute__((target("avx2,f16c"))) std::size_t half_avx2(const float* in, std::uint16_t* out,
                                                           std::size_t count,
                                                           bool& infinite) noexcept {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf = _mm256_set1_epi32(0x7f800000);
  const __m128i quiet_nan = _mm_set1_epi16(0x7e00);
  const __m128i sign_mask = _mm_set1_epi16(static_cast<short>(0x8000));
  const __m128i abs16 = _mm_set1_epi16(0x7fff);
  const __m128i inf16 = _mm_set1_epi16(static_cast<short>(kHalfInfinity));
  __m128i seen = _mm_setzero_si128();
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 v = _mm256_loadu_ps(in + i);
    const __m256i bits = _mm256_castps_si256(v);
    __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i nan32 = _mm256_cmpgt_epi32(_mm256_and_si256(bits, abs_mask), inf);
    const __m128i nan16 =
        _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
    const __m128i canonical = _mm_or_si128(_mm_and_si128(h, sign_mask), quiet_nan);
    h = _mm_blendv_epi8(h, canonical, nan16);
    seen = _mm_or_si128(seen, _mm_cmpeq_epi16(_mm_and_si128(h, abs16), inf16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  infinite = _mm_testz_si128(seen, seen) == 0;
  return i;
}

// 8 floats at a time, the same integer arithmetic as float_to_bfloat16. Sets `infinite` as
// half_avx2 does.
__attribute__((target("avx2"))) std::size_t bfloat16_avx2(const float* in, std::uint16_t* out,
                                                          std::size_t count,
                                                          bool& infinite) noexcept {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf = _mm256_set1_epi32(0x7f800000);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(0x7fff);
  const __m256i quiet = _mm256_set1_epi32(0x0040);
  const __m256i abs16 = _mm256_set1_epi32(0x7fff);
  const __m256i inf16 = _mm256_set1_epi32(kBFloat16Infinity);
  __m256i seen = _mm256_setzero_si256();
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, odd)), 16);
    const __m256i nan_value = _mm256_or_si256(_mm256_srli_epi32(bits, 16), quiet);
    const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, abs_mask), inf);
    const __m256i result = _mm256_blendv_epi8(rounded, nan_value, is_nan);
    seen = _mm256_or_si256(seen, _mm256_cmpeq_epi32(_mm256_and_si256(result, abs16), inf16));
    // Every lane is 0..0xffff, so the unsigned-saturating pack is exact; it interleaves the two
    // 128-bit halves, which the permute puts back in order.
    const __m256i packed = _mm256_packus_epi32(result, result);
    const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);  // Qwords 0, 2.
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(ordered));
  }
  infinite = _mm256_testz_si256(seen, seen) == 0;
  return i;
}

#endif  // EMBSTORE_CONVERT_X86

// Whether some of out[0, count) is +-infinity.
bool any_infinite(const std::uint16_t* out, std::size_t count, std::uint16_t infinity) noexcept {
  bool seen = false;
  for (std::size_t i = 0; i < count; ++i) seen |= (out[i] & 0x7fffu) == infinity;
  return seen;
}

}  // namespace

bool convert_to_half_fast(const float* in, std::uint16_t* out, std::size_t count) noexcept {
  std::size_t done = 0;
  bool infinite = false;
#ifdef EMBSTORE_CONVERT_X86
  if (has_avx2_f16c()) done = half_avx2(in, out, count, infinite);
#endif
  convert_to_half(in + done, out + done, count - done);
  return any_infinite(out + done, count - done, kHalfInfinity) || infinite;
}

bool convert_to_bfloat16_fast(const float* in, std::uint16_t* out, std::size_t count) noexcept {
  std::size_t done = 0;
  bool infinite = false;
#ifdef EMBSTORE_CONVERT_X86
  if (has_avx2_f16c()) done = bfloat16_avx2(in, out, count, infinite);
#endif
  convert_to_bfloat16(in + done, out + done, count - done);
  return any_infinite(out + done, count - done, kBFloat16Infinity) || infinite;
}

}  // namespace embstore::detail
