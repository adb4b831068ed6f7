// embstore/dtype.h — element types a store can hold.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
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

// One accepted spelling of a dtype (the table every front end reads: C++, Python, CLI).
struct DTypeAlias {
  std::string_view name;
  DType dtype;
};

// Every accepted name: the canonical ones of dtype_name, the numpy spellings "f4", "f2", "f8",
// "i1", "u1", and "half" and "bf16". Not "float" or "double": C means 32 and 64 bits by them,
// numpy 64 bits by "float", so they are refused rather than guessed.
std::span<const DTypeAlias> dtype_aliases() noexcept;

// The dtype `name` spells (ASCII case ignored), or nullopt if it is not in dtype_aliases().
std::optional<DType> parse_dtype(std::string_view name) noexcept;

// True when rows of dtype `input` may be appended to a `store` store: the same dtype, or float32
// into a float16/bfloat16 store (converted on append, round to nearest even; a finite value
// beyond the store's range is refused, Writer::append()).
bool dtype_accepts(DType store, DType input) noexcept;

// True when `raw` is one of the enum's values (for data read from disk).
bool is_valid_dtype(std::uint8_t raw) noexcept;

}  // namespace embstore
