// convert_fast.h — vectorized float32 -> float16 / bfloat16 conversion for appends.
//
// Contract: bit-for-bit the same results as convert.h's convert_to_half / convert_to_bfloat16
// (round to nearest even, overflow to infinity, NaN -> quiet NaN exactly as those functions make
// it) for every input bit pattern, only faster: AVX2 + F16C when the CPU has them (checked once
// at run time), else the scalar loops of convert.h. bench/convert_check.cc compares the two over
// all 2^32 float32 bit patterns. Each also says whether any element it wrote is an infinity
// (then convert.h's first_overflow() tells a finite input's overflow from an infinite input).
// Pure functions, thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

namespace embstore::detail {

// True when some out[i] is +-infinity.
bool convert_to_half_fast(const float* in, std::uint16_t* out, std::size_t count) noexcept;
bool convert_to_bfloat16_fast(const float* in, std::uint16_t* out, std::size_t count) noexcept;

}  // namespace embstore::detail
