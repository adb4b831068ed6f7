// npy.h — streaming reader and writer of NumPy .npy files (format version 1.0), C order,
// little-endian. The writer needs the row count up front and then takes rows in order, so its
// memory does not depend on the array's size; files it writes open with np.load(mmap_mode='r').
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "embstore/dtype.h"

namespace embstore::tools {

// The .npy type string of a dtype ("<f4", "<f2", "|i1", ...). bfloat16 has none in numpy and is
// written as its raw bit patterns, "<u2".
std::string npy_descr(DType dtype);

// The dtype whose .npy type string is `descr`, also accepting "<u2" as bfloat16 when
// `u2_is_bfloat16`. Throws kInvalidArgument naming `what` for any other type.
DType dtype_of_npy_descr(const std::string& descr, bool u2_is_bfloat16, const std::string& what);

// Writes one array of `shape` (1-D or 2-D) element type `descr`. Thread-compatible.
class NpyWriter {
 public:
  NpyWriter(const std::string& path, const std::string& descr, std::vector<std::uint64_t> shape);
  NpyWriter(const NpyWriter&) = delete;
  NpyWriter& operator=(const NpyWriter&) = delete;
  ~NpyWriter();  // Closes without checking; call finish() to learn of write errors.

  void write(const void* data, std::size_t bytes);
  // Flushes and closes; throws kIO if a write failed or fewer bytes arrived than the shape needs.
  void finish();

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
  std::uint64_t expected_bytes_ = 0;
  std::uint64_t written_bytes_ = 0;
};

// Reads one array from a .npy file: its type, its shape, and rows on demand (pread).
class NpyReader {
 public:
  explicit NpyReader(const std::string& path);
  NpyReader(const NpyReader&) = delete;
  NpyReader& operator=(const NpyReader&) = delete;
  ~NpyReader();

  const std::string& descr() const { return descr_; }
  const std::vector<std::uint64_t>& shape() const { return shape_; }
  std::uint64_t rows() const { return shape_.empty() ? 1 : shape_[0]; }
  std::uint64_t row_bytes() const { return row_bytes_; }
  // Copies rows [first, first + n) into `out` (n * row_bytes() bytes).
  void read_rows(std::uint64_t first, std::uint64_t n, void* out) const;

 private:
  std::string path_;
  int fd_ = -1;
  std::string descr_;
  std::vector<std::uint64_t> shape_;
  std::uint64_t data_offset_ = 0;
  std::uint64_t row_bytes_ = 0;
};

}  // namespace embstore::tools
