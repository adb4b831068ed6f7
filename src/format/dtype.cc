#include "embstore/dtype.h"

namespace embstore {

std::size_t dtype_size(DType dtype) noexcept {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat16:
      return 2;
    case DType::kBFloat16:
      return 2;
    case DType::kInt8:
      return 1;
    case DType::kUInt8:
      return 1;
    case DType::kFloat64:
      return 8;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) noexcept {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kInt8:
      return "int8";
    case DType::kUInt8:
      return "uint8";
    case DType::kFloat64:
      return "float64";
  }
  return "invalid";
}

std::optional<DType> parse_dtype(std::string_view name) noexcept {
  struct Alias {
    std::string_view name;
    DType dtype;
  };
  static constexpr Alias kAliases[] = {
      {"float32", DType::kFloat32}, {"f4", DType::kFloat32},   {"float16", DType::kFloat16},
      {"f2", DType::kFloat16},      {"half", DType::kFloat16}, {"bfloat16", DType::kBFloat16},
      {"bf16", DType::kBFloat16},   {"int8", DType::kInt8},    {"i1", DType::kInt8},
      {"uint8", DType::kUInt8},     {"u1", DType::kUInt8},     {"float64", DType::kFloat64},
      {"f8", DType::kFloat64},
  };
  for (const auto& alias : kAliases) {
    if (alias.name == name) return alias.dtype;
  }
  return std::nullopt;
}

bool is_valid_dtype(std::uint8_t raw) noexcept { return raw >= 1 && raw <= 6; }

}  // namespace embstore
