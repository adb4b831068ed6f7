// rows.h — choosing rows of a store (by row range, epoch, latest per key) and reading their
// elements as numbers. Public API only (include/embstore/).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "embstore/embstore.h"

namespace embstore::tools {

// Reports work done so far out of a total (rows); may be empty. Called from the working thread.
using ProgressFn = std::function<void(std::uint64_t done, std::uint64_t total)>;

// Which rows of a snapshot an operation takes. Rows are always visited in ascending row order.
struct RowSelection {
  std::uint64_t begin_row = 0;
  std::optional<std::uint64_t> end_row;  // Default: the snapshot's size.
  std::set<std::uint64_t> epochs;        // Empty: every epoch.
  bool latest_per_key = false;           // Only the last selected row of each key.
};

// The rows a RowSelection picks out of one Reader's snapshot. Construction validates the
// selection (kInvalidArgument for a bad range, kNotFound naming an epoch the range does not
// hold) and counts the rows with one pass over the index; latest_per_key keeps one map entry
// per distinct key, everything else uses constant memory. Selecting by epoch or latest per key
// first checks every row of the range against its checksum (kCorruption naming the first that
// fails: any row's key and epoch decide what is taken), a read of the whole range, reported
// through `progress` (which may throw to stop it).
// Thread-safety: const calls may run concurrently.
class RowSelector {
 public:
  RowSelector(const Reader& reader, const RowSelection& selection, const ProgressFn& progress);

  std::uint64_t count() const { return count_; }
  std::uint64_t begin_row() const { return begin_; }
  std::uint64_t end_row() const { return end_; }

  // Calls fn(first, n) for runs of consecutive selected rows [first, first + n), in order, with
  // at most `max_run` rows per call.
  void for_each_run(std::uint64_t max_run,
                    const std::function<void(std::uint64_t first, std::uint64_t n)>& fn) const;

 private:
  bool selected(std::uint64_t row, std::uint64_t key, std::uint64_t epoch) const;

  const Reader& reader_;
  RowSelection selection_;
  std::uint64_t begin_ = 0;
  std::uint64_t end_ = 0;
  std::uint64_t count_ = 0;
  std::unordered_map<std::uint64_t, std::uint64_t> latest_row_;  // key -> row (latest only).
};

// The end of rows [begin, end_row or the snapshot's size) of `reader`, after checking the range
// (--from, --to): kInvalidArgument naming the option and value when it is not one of its rows.
std::uint64_t checked_end_row(const Reader& reader, std::uint64_t begin,
                              std::optional<std::uint64_t> end_row);

// Element `i` of a row of `dtype` as a double (float16 and bfloat16 decoded exactly).
double element_value(DType dtype, const std::byte* row, std::uint32_t i);

// `value` as tables and CSV print it: a NaN without its sign bit, which fmt would print as
// "-nan" where the README promises "nan" (what numpy, pandas and float() read).
inline double printable(double value) { return std::isnan(value) ? std::fabs(value) : value; }

// "1 row", "0 rows", "2 rows": `count` and `noun`, plural (`plural`, else noun + "s") unless
// count is 1. Every count a report or message of the tools prints ("imported 1 row") goes
// through it.
std::string counted(std::uint64_t count, const std::string& noun, const std::string& plural = "");

// Float32 value of an IEEE binary16 / bfloat16 bit pattern (exact).
float half_to_float(std::uint16_t bits);
float bfloat16_to_float(std::uint16_t bits);

// Turns rows of one dtype into a ConstMatrix that Writer::append accepts for a store of
// another: the same dtype passes through untouched; float types are re-encoded through
// float32 (the Writer rounds float32 to a float16/bfloat16 store) or float64. Throws
// kFormatMismatch for conversions that would change integer data (int8/uint8 to or from
// anything else: callers check converts() first, to name their option), and kInvalidArgument,
// from convert(), for a finite value that would become infinite (beyond the target's range),
// naming `source`, the row (first_row + its place) and the element, then `refused`, what the
// caller's refusal leaves ("no store was made at OUT"). Reuses one buffer; a returned matrix
// lives until the next convert().
class RowConverter {
 public:
  RowConverter(DType from, DType to, std::uint32_t dim, std::string source, std::string refused);
  // Whether rows of `from` can be converted to `to` (else the constructor throws).
  static bool converts(DType from, DType to);

  ConstMatrix convert(const void* rows, std::uint64_t n, std::uint64_t first_row);
  // Whether convert() may refuse a value: a conversion to a narrower type.
  bool may_refuse() const;

 private:
  // kInvalidArgument for the first of n rows of float32 `values` that is, or would become when
  // rounded to to_, infinite where the source value (`source`, rows of from_; nullptr: the
  // values are the source) is finite.
  void refuse_overflow(const float* values, std::uint64_t n, std::uint64_t first_row,
                       const std::byte* source) const;

  DType from_;
  DType to_;
  std::uint32_t dim_;
  std::string source_;
  std::string refused_;
  std::vector<float> floats_;
  std::vector<double> doubles_;
};

}  // namespace embstore::tools
