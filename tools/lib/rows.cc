#include "rows.h"

#include <cmath>
#include <cstring>
#include <string>

namespace embstore::tools {
namespace {

// Index entries are read in blocks so that progress is reported without a call per row.
constexpr std::uint64_t kScanBlockRows = 1 << 16;

std::string epoch_list(const std::set<std::uint64_t>& epochs) {
  std::string text;
  for (std::uint64_t e : epochs) text += (text.empty() ? "" : ", ") + std::to_string(e);
  return text;
}

}  // namespace

RowSelector::RowSelector(const Reader& reader, const RowSelection& selection,
                         const ProgressFn& progress)
    : reader_(reader), selection_(selection) {
  const std::uint64_t size = reader.size();
  begin_ = selection.begin_row;
  end_ = selection.end_row.value_or(size);
  if (begin_ > end_) {
    throw Error(ErrorCode::kInvalidArgument,
                "--from " + std::to_string(begin_) + " is after --to " + std::to_string(end_));
  }
  if (end_ > size) {
    throw Error(ErrorCode::kInvalidArgument, "--to " + std::to_string(end_) +
                                                 " is past the end of " + reader.path() + " (" +
                                                 std::to_string(size) + " rows)");
  }
  const bool filtered = !selection.epochs.empty() || selection.latest_per_key;
  if (!filtered) {
    count_ = end_ - begin_;
    return;
  }
  std::set<std::uint64_t> missing = selection.epochs;
  for (std::uint64_t block = begin_; block < end_; block += kScanBlockRows) {
    const std::uint64_t block_end = std::min(end_, block + kScanBlockRows);
    const auto keys = reader.keys(block, block_end);
    const auto epochs = reader.epochs(block, block_end);
    for (std::uint64_t i = 0; i < block_end - block; ++i) {
      const std::uint64_t epoch = epochs[i];
      if (!selection.epochs.empty()) {
        if (!selection.epochs.count(epoch)) continue;
        missing.erase(epoch);
      }
      if (selection.latest_per_key) {
        latest_row_[keys[i]] = block + i;
      } else {
        ++count_;
      }
    }
    if (progress) progress(block_end - begin_, end_ - begin_);
  }
  if (!missing.empty()) {
    throw Error(ErrorCode::kNotFound, "epoch " + epoch_list(missing) + " is not in rows [" +
                                          std::to_string(begin_) + ", " + std::to_string(end_) +
                                          ") of " + reader.path());
  }
  if (selection.latest_per_key) count_ = latest_row_.size();
}

bool RowSelector::selected(std::uint64_t row, std::uint64_t key, std::uint64_t epoch) const {
  if (!selection_.epochs.empty() && !selection_.epochs.count(epoch)) return false;
  if (selection_.latest_per_key) {
    const auto it = latest_row_.find(key);
    return it != latest_row_.end() && it->second == row;
  }
  return true;
}

void RowSelector::for_each_run(
    std::uint64_t max_run,
    const std::function<void(std::uint64_t first, std::uint64_t n)>& fn) const {
  if (max_run == 0) max_run = 1;
  const bool filtered = !selection_.epochs.empty() || selection_.latest_per_key;
  if (!filtered) {
    for (std::uint64_t row = begin_; row < end_; row += max_run) {
      fn(row, std::min(max_run, end_ - row));
    }
    return;
  }
  std::uint64_t run_first = 0;
  std::uint64_t run_rows = 0;
  for (std::uint64_t block = begin_; block < end_; block += kScanBlockRows) {
    const std::uint64_t block_end = std::min(end_, block + kScanBlockRows);
    const auto keys = reader_.keys(block, block_end);
    const auto epochs = reader_.epochs(block, block_end);
    for (std::uint64_t i = 0; i < block_end - block; ++i) {
      const std::uint64_t row = block + i;
      if (!selected(row, keys[i], epochs[i])) continue;
      if (run_rows > 0 && (run_first + run_rows != row || run_rows == max_run)) {
        fn(run_first, run_rows);
        run_rows = 0;
      }
      if (run_rows == 0) run_first = row;
      ++run_rows;
    }
  }
  if (run_rows > 0) fn(run_first, run_rows);
}

float half_to_float(std::uint16_t bits) {
  const std::uint32_t sign = (bits >> 15) & 1;
  const std::uint32_t exponent = (bits >> 10) & 0x1f;
  const std::uint32_t mantissa = bits & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // Zero or subnormal.
  } else if (exponent == 0x1f) {
    magnitude = mantissa ? std::nanf("") : INFINITY;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
  }
  return sign ? -magnitude : magnitude;
}

float bfloat16_to_float(std::uint16_t bits) {
  const std::uint32_t wide = std::uint32_t{bits} << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

double element_value(DType dtype, const std::byte* row, std::uint32_t i) {
  switch (dtype) {
    case DType::kFloat32: {
      float v;
      std::memcpy(&v, row + 4 * std::size_t{i}, 4);
      return v;
    }
    case DType::kFloat64: {
      double v;
      std::memcpy(&v, row + 8 * std::size_t{i}, 8);
      return v;
    }
    case DType::kFloat16:
    case DType::kBFloat16: {
      std::uint16_t bits;
      std::memcpy(&bits, row + 2 * std::size_t{i}, 2);
      return dtype == DType::kFloat16 ? half_to_float(bits) : bfloat16_to_float(bits);
    }
    case DType::kInt8:
      return static_cast<double>(static_cast<std::int8_t>(row[i]));
    case DType::kUInt8:
      return static_cast<double>(static_cast<std::uint8_t>(row[i]));
  }
  return 0;
}

namespace {

bool is_float(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16 ||
         dtype == DType::kFloat64;
}

}  // namespace

RowConverter::RowConverter(DType from, DType to, std::uint32_t dim)
    : from_(from), to_(to), dim_(dim) {
  if (from != to && !(is_float(from) && is_float(to))) {
    throw Error(ErrorCode::kInvalidArgument, "cannot convert " + std::string(dtype_name(from)) +
                                                 " rows to " + std::string(dtype_name(to)) +
                                                 " (only between float types)");
  }
}

ConstMatrix RowConverter::convert(const void* rows, std::uint64_t n) {
  ConstMatrix matrix;
  matrix.rows = n;
  matrix.dim = dim_;
  if (from_ == to_ || (from_ == DType::kFloat32 && to_ != DType::kFloat64)) {
    // Same dtype, or float32 into a 16-bit store: the Writer takes it as is.
    matrix.data = rows;
    matrix.dtype = from_;
    return matrix;
  }
  const auto* bytes = static_cast<const std::byte*>(rows);
  const std::uint64_t row_bytes = std::uint64_t{dim_} * dtype_size(from_);
  const std::uint64_t elements = n * dim_;
  if (to_ == DType::kFloat64) {
    doubles_.resize(elements);
    for (std::uint64_t r = 0; r < n; ++r) {
      for (std::uint32_t i = 0; i < dim_; ++i) {
        doubles_[r * dim_ + i] = element_value(from_, bytes + r * row_bytes, i);
      }
    }
    matrix.data = doubles_.data();
    matrix.dtype = DType::kFloat64;
    return matrix;
  }
  floats_.resize(elements);
  for (std::uint64_t r = 0; r < n; ++r) {
    for (std::uint32_t i = 0; i < dim_; ++i) {
      floats_[r * dim_ + i] = static_cast<float>(element_value(from_, bytes + r * row_bytes, i));
    }
  }
  matrix.data = floats_.data();
  matrix.dtype = DType::kFloat32;
  return matrix;
}

}  // namespace embstore::tools
