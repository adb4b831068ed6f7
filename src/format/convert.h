// convert.h — element conversion for appends of float32 into float16/bfloat16 stores.
// Pure functions, thread-safe. Rounding is to nearest, ties to even; NaN stays NaN (quiet),
// overflow becomes infinity, as numpy and PyTorch do.
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

}  // namespace embstore::detail
