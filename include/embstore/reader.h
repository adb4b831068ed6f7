// embstore/reader.h — zero-copy reading of committed rows.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "embstore/dtype.h"
#include "embstore/options.h"
#include "embstore/store.h"

namespace embstore {

// Rows [first_row, first_row + rows) as one contiguous, row-major block of
// rows * row_bytes bytes. Points straight into the store's mapping (zero-copy).
// Lifetime: valid while the Reader that returned it, or any owner() copy taken from that
// Reader, is alive — across refresh() and while writers grow the store.
struct RowsView {
  const std::byte* data = nullptr;
  std::uint64_t first_row = 0;
  std::uint64_t rows = 0;
  std::uint32_t dim = 0;
  DType dtype = DType::kFloat32;
  std::uint64_t row_bytes = 0;

  std::uint64_t size_bytes() const { return rows * row_bytes; }
  const std::byte* row(std::uint64_t i) const { return data + i * row_bytes; }
};

// A read-only strided sequence of T (how keys and epochs sit inside index entries).
// Same lifetime as RowsView.
template <typename T>
struct StridedView {
  const std::byte* data = nullptr;
  std::uint64_t size = 0;
  std::uint64_t stride_bytes = sizeof(T);

  T operator[](std::uint64_t i) const {
    T value;
    std::memcpy(&value, data + i * stride_bytes, sizeof(T));
    return value;
  }
};

// One row with its index entry, checksum already verified.
struct Record {
  std::uint64_t row = 0;
  std::uint64_t key = 0;
  std::uint64_t epoch = 0;
  const std::byte* data = nullptr;  // row_bytes bytes; same lifetime as RowsView.
};

struct VerifyReport {
  std::uint64_t begin_row = 0;
  std::uint64_t end_row = 0;
  std::uint64_t rows_checked = 0;
  std::uint64_t bad_row_count = 0;
  std::vector<std::uint64_t> bad_rows;  // The first kMaxListed bad rows, ascending.
  static constexpr std::size_t kMaxListed = 1000;
  bool ok() const { return bad_row_count == 0; }
};

// Reads a store without any lock and without writing a byte; needs only read permission, so it
// works on a read-only mount. Sees the snapshot [0, size()) taken at open() or at the last
// refresh()/wait(); rows inside a snapshot never change.
//
// Thread-safety: const calls may run concurrently; refresh(), wait() and close() must not run
// concurrently with any other call on the same Reader. Views may be used from any thread.
class Reader {
 public:
  static Reader open(const std::string& path, const ReaderOptions& options = {});

  Reader(Reader&&) noexcept;
  Reader& operator=(Reader&&) noexcept;
  ~Reader();

  std::uint64_t size() const;  // Rows in the snapshot.
  // Takes a new snapshot of the committed rows and returns its size (never smaller than before).
  std::uint64_t refresh();
  // Refreshes until size() >= min_rows or `timeout` passes; true when reached. Wakes on commits
  // from any process (a shared futex on the commit counter), without polling.
  bool wait(std::uint64_t min_rows, std::chrono::nanoseconds timeout);

  // Rows [begin, end) of the snapshot; throws kInvalidArgument unless begin <= end <= size().
  RowsView rows(std::uint64_t begin, std::uint64_t end) const;
  RowsView rows() const { return rows(0, size()); }
  StridedView<std::uint64_t> keys(std::uint64_t begin, std::uint64_t end) const;
  StridedView<std::uint64_t> epochs(std::uint64_t begin, std::uint64_t end) const;
  // Row `row` with its key and epoch after checking its checksum: kCorruption (naming the row and
  // the file) if it fails, kInvalidArgument if row >= size().
  Record record(std::uint64_t row) const;
  // Recomputes the checksums of rows [begin, end) of the snapshot; never throws for bad rows.
  VerifyReport verify(std::uint64_t begin, std::uint64_t end) const;
  VerifyReport verify() const { return verify(0, size()); }

  std::uint32_t dim() const;
  DType dtype() const;
  const std::string& path() const;
  const std::string& metadata() const;
  StoreInfo info() const;  // Header plus the counters as they are now.

  // Keeps the mappings (and so every view) alive after this Reader is closed or destroyed.
  std::shared_ptr<const void> owner() const;
  // Drops this Reader's hold on the mappings; views stay valid only through owner() copies.
  void close();

  class Impl;

 private:
  explicit Reader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace embstore
