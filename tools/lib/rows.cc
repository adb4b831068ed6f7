#include "rows.h"

#include <fmt/format.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

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

std::string counted(std::uint64_t count, const std::string& noun, const std::string& plural) {
  if (count == 1) return "1 " + noun;
  return std::to_string(count) + " " + (plural.empty() ? noun + "s" : plural);
}

std::uint64_t checked_end_row(const Reader& reader, std::uint64_t begin,
                              std::optional<std::uint64_t> end_row) {
  const std::uint64_t size = reader.size();
  const std::uint64_t end = end_row.value_or(size);
  const std::string rows =
      " is past the end of " + reader.path() + " (" + counted(size, "row") + ")";
  if (begin > end) {
    // Without --to, the end is the store's: say so rather than name a --to never given.
    throw Error(ErrorCode::kInvalidArgument,
                "--from " + std::to_string(begin) +
                    (end_row ? " is after --to " + std::to_string(end) : rows));
  }
  if (end > size) {
    throw Error(ErrorCode::kInvalidArgument, "--to " + std::to_string(end) + rows);
  }
  return end;
}

RowSelector::RowSelector(const Reader& reader, const RowSelection& selection,
                         const ProgressFn& progress)
    : reader_(reader), selection_(selection) {
  begin_ = selection.begin_row;
  end_ = checked_end_row(reader, begin_, selection.end_row);
  const bool filtered = !selection.epochs.empty() || selection.latest_per_key;
  if (!filtered) {
    count_ = end_ - begin_;
    return;
  }
  std::set<std::uint64_t> missing = selection.epochs;
  for (std::uint64_t block = begin_; block < end_; block += kScanBlockRows) {
    const std::uint64_t block_end = std::min(end_, block + kScanBlockRows);
    // Every row's key and epoch decide what is taken, not only those of the rows taken (whose
    // checksums the copy checks): one flipped bit in a key or an epoch would otherwise pick a
    // stale version as a key's latest, or leave a row out, and the output would verify clean.
    const VerifyReport report = reader.verify(block, block_end);
    if (report.bad_row_count != 0) {
      const std::uint64_t bad = report.bad_rows.front();
      throw Error(ErrorCode::kCorruption,
                  reader.path() + ": row " + std::to_string(bad) +
                      " fails its checksum, so its key and epoch cannot be trusted to choose "
                      "rows by " +
                      (selection.latest_per_key ? "latest per key" : "epoch") +
                      " (embstore verify and salvage name the damage)");
    }
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

bool RowConverter::converts(DType from, DType to) {
  return from == to || (is_float(from) && is_float(to));
}

RowConverter::RowConverter(DType from, DType to, std::uint32_t dim, std::string source,
                           std::string refused)
    : from_(from), to_(to), dim_(dim), source_(std::move(source)), refused_(std::move(refused)) {
  if (!converts(from, to)) {
    throw Error(ErrorCode::kFormatMismatch,
                source_ + ": cannot convert " + std::string(dtype_name(from)) + " rows to " +
                    std::string(dtype_name(to)) + " (only between float types)");
  }
}

namespace {

// The largest magnitude a float32 may have and still round (to nearest even) to a finite value
// of a 16-bit store dtype: halfway between its largest finite value and the next power of two,
// exclusive (the halfway value rounds to the even neighbour, infinity).
float overflow_limit(DType to) {
  if (to == DType::kFloat16) return 65520.0f;  // 65504 is the largest binary16
  if (to == DType::kBFloat16) return std::bit_cast<float>(0x7f7f8000u);
  return std::numeric_limits<float>::infinity();
}

// `value` rounded to float32 toward zero, then made odd if that was inexact ("round to odd"):
// a later rounding to a narrower type gives what rounding `value` itself would.
float to_float_rounding_to_odd(double value) {
  float rounded = static_cast<float>(value);  // to nearest
  if (!std::isfinite(rounded) || static_cast<double>(rounded) == value) return rounded;
  if (std::fabs(static_cast<double>(rounded)) > std::fabs(value)) {
    rounded = std::nextafter(rounded, 0.0f);  // toward zero
  }
  return std::bit_cast<float>(std::bit_cast<std::uint32_t>(rounded) | 1u);
}

}  // namespace

void RowConverter::refuse_overflow(const float* values, std::uint64_t n, std::uint64_t first_row,
                                   const std::byte* source) const {
  const float limit = overflow_limit(to_);
  const std::uint64_t row_bytes = std::uint64_t{dim_} * dtype_size(from_);
  const auto source_value = [&](std::uint64_t e) {
    return source == nullptr ? static_cast<double>(values[e])
                             : element_value(from_, source + e / dim_ * row_bytes,
                                             static_cast<std::uint32_t>(e % dim_));
  };
  for (std::uint64_t e = 0; e < n * dim_; ++e) {
    const float value = values[e];
    // Infinite already: overflowed on the way to float32 if the source value was finite (a
    // float64 beyond float32's range). Else beyond what rounds to a finite 16-bit value. NaN is
    // neither, and stays NaN.
    const bool becomes_infinite =
        std::isinf(value) ? std::isfinite(source_value(e)) : std::fabs(value) >= limit;
    if (!becomes_infinite) continue;
    // Shortest text that reads back as the value, in the source's own precision.
    const double was = source_value(e);
    const std::string shown =
        from_ == DType::kFloat64 ? fmt::format("{}", was) : fmt::format("{}", float(was));
    throw Error(ErrorCode::kInvalidArgument,
                source_ + ": row " + std::to_string(first_row + e / dim_) + ", element " +
                    std::to_string(e % dim_) + ": the " + std::string(dtype_name(from_)) +
                    " value " + shown + " does not fit in " + std::string(dtype_name(to_)) +
                    " (it would become infinite); " + refused_);
  }
}

bool RowConverter::may_refuse() const {
  return from_ != to_ && to_ != DType::kFloat64 &&
         !(to_ == DType::kFloat32 && (from_ == DType::kFloat16 || from_ == DType::kBFloat16));
}

ConstMatrix RowConverter::convert(const void* rows, std::uint64_t n, std::uint64_t first_row) {
  ConstMatrix matrix;
  matrix.rows = n;
  matrix.dim = dim_;
  const auto* bytes = static_cast<const std::byte*>(rows);
  if (from_ == to_ || (from_ == DType::kFloat32 && to_ != DType::kFloat64)) {
    // Same dtype, or float32 into a 16-bit store: the Writer takes it as is (and rounds it).
    if (from_ != to_) refuse_overflow(static_cast<const float*>(rows), n, first_row, nullptr);
    matrix.data = rows;
    matrix.dtype = from_;
    return matrix;
  }
  const std::uint64_t row_bytes = std::uint64_t{dim_} * dtype_size(from_);
  const std::uint64_t elements = n * dim_;
  if (to_ == DType::kFloat64) {
    // Every other float type widens to float64 exactly.
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
  // float64 into a 16-bit store goes through float32, which the Writer then rounds: rounded to
  // float32 to odd, not to nearest, so that the second rounding gives the value nearest the
  // float64 (float32 keeps more than two bits beyond a 16-bit type's).
  const bool twice = from_ == DType::kFloat64 && to_ != DType::kFloat32;
  for (std::uint64_t r = 0; r < n; ++r) {
    for (std::uint32_t i = 0; i < dim_; ++i) {
      const double value = element_value(from_, bytes + r * row_bytes, i);
      floats_[r * dim_ + i] = twice ? to_float_rounding_to_odd(value) : static_cast<float>(value);
    }
  }
  refuse_overflow(floats_.data(), n, first_row, bytes);
  matrix.data = floats_.data();
  matrix.dtype = DType::kFloat32;
  return matrix;
}

}  // namespace embstore::tools
