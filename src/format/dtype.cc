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

namespace {
constexpr DTypeAlias kAliases[] = {
    {"float32", DType::kFloat32}, {"f4", DType::kFloat32},   {"float16", DType::kFloat16},
    {"f2", DType::kFloat16},      {"half", DType::kFloat16}, {"bfloat16", DType::kBFloat16},
    {"bf16", DType::kBFloat16},   {"int8", DType::kInt8},    {"i1", DType::kInt8},
    {"uint8", DType::kUInt8},     {"u1", DType::kUInt8},     {"float64", DType::kFloat64},
    {"f8", DType::kFloat64},
};

bool equal_ignoring_case(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
    if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
    if (x != y) return false;
  }
  return true;
}
}  // namespace

std::span<const DTypeAlias> dtype_aliases() noexcept { return kAliases; }

std::optional<DType> parse_dtype(std::string_view name) noexcept {
  for (const auto& alias : kAliases) {
    if (equal_ignoring_case(alias.name, name)) return alias.dtype;
  }
  return std::nullopt;
}

bool dtype_accepts(DType store, DType input) noexcept {
  return input == store ||
         (input == DType::kFloat32 && (store == DType::kFloat16 || store == DType::kBFloat16));
}

bool is_valid_dtype(std::uint8_t raw) noexcept { return raw >= 1 && raw <= 6; }

}  // namespace embstore
