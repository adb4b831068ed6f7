// convert.h — element conversion for appends of float32 into float16/bfloat16 stores.
// Pure functions, thread-safe. Rounding is to nearest, ties to even; NaN stays NaN (quiet),
// overflow becomes infinity, as numpy and PyTorch do. An append never stores such an infinity:
// src/log/batch.cc refuses a batch in which first_overflow() finds one (writer.h, append()).
#pragma once

#include <cstddef>
#include <cstdint>

namespace embstore::detail {

std::uint16_t float_to_half(float value) noexcept;
std::uint16_t float_to_bfloat16(float value) noexcept;
float half_to_float(std::uint16_t bits) noexcept;
float bfloat16_to_float(std::uint16_t bits) noexcept;

void convert_to_half(const float* in, std::uint16_t* out, std::size_t count) noexcept;
void convert_to_bfloat16(const float* in, std::uint16_t* out, std::size_t count) noexcept;

// The bits of +infinity in float16 and bfloat16.
inline constexpr std::uint16_t kHalfInfinity = 0x7c00;
inline constexpr std::uint16_t kBFloat16Infinity = 0x7f80;
// The first i < count at which a finite in[i] became +-infinity in out[i] (`infinity` is the
// target's kHalfInfinity or kBFloat16Infinity), or count when there is none.
std::size_t first_overflow(const float* in, const std::uint16_t* out, std::size_t count,
                           std::uint16_t infinity) noexcept;

}  // namespace embstore::detail
