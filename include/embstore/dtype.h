// embstore/dtype.h — element types a store can hold.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace embstore {

// Stored on disk as one byte: these values are frozen. Zero is never a valid dtype, so a
// zero-filled header can never parse as a store.
enum class DType : std::uint8_t {
  kFloat32 = 1,
  kFloat16 = 2,   // IEEE 754 binary16.
  kBFloat16 = 3,  // The upper 16 bits of a float32.
  kInt8 = 4,
  kUInt8 = 5,
  kFloat64 = 6,
};

// Bytes per element; 0 for a value outside the enum.
std::size_t dtype_size(DType dtype) noexcept;

// "float32", "float16", "bfloat16", "int8", "uint8", "float64"; "invalid" otherwise.
std::string_view dtype_name(DType dtype) noexcept;

// Inverse of dtype_name; also accepts the numpy spellings "f4", "f2", "f8", "i1", "u1".
std::optional<DType> parse_dtype(std::string_view name) noexcept;

// True when `raw` is one of the enum's values (for data read from disk).
bool is_valid_dtype(std::uint8_t raw) noexcept;

}  // namespace embstore
