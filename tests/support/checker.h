// checker.h — checks what a reader sees against the (writer, seq) payload scheme of payload.h.
//
// Writer w appends batches of batch_rows(w) rows with consecutive seqs, so from keys alone a
// checker can tell whether every batch is whole, contiguous, in order, and never duplicated.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "embstore/reader.h"

namespace embstore::test {

inline std::uint64_t batch_rows(std::uint64_t writer) { return 3 + writer % 11; }

class StreamChecker {
 public:
  explicit StreamChecker(std::uint32_t dim) : dim_(dim) {}
  // Checks rows [checked_rows(), end) of `reader`'s snapshot; returns "" or the first problem.
  // `end` must be the reader's snapshot size: a snapshot must end on a batch boundary.
  std::string check(const Reader& reader, std::uint64_t end);
  std::uint64_t checked_rows() const { return next_row_; }
  // Rows seen per writer (the next seq expected from each).
  const std::map<std::uint64_t, std::uint64_t>& next_seq() const { return next_seq_; }

 private:
  std::uint32_t dim_;
  std::uint64_t next_row_ = 0;
  std::map<std::uint64_t, std::uint64_t> next_seq_;
};

}  // namespace embstore::test
