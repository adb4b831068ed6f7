// generation.h — the mappings of one generation's files (rows.G and index.G): a mapping set that
// views point into and that snapshots pin.
//
// Each Generation reserves address space in proportion to the store (StoreFiles picks the size)
// and grows its mappings in place inside that reservation. When a store outgrows it, StoreFiles
// maps the files again at a new, larger Generation; the new one may pin the one it replaces
// (`previous`), so every pointer handed out from the old range stays valid for as long as
// anything holds the newest. map_rows() is for one thread at a time; the rest is read-only and
// safe from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "format/format.h"
#include "platform/mapping.h"
#include "platform/os.h"

namespace embstore::detail {

class Generation {
 public:
  // Reserves room for `reserve_rows` rows in each file (mapping nothing yet) and pins `previous`
  // (may be null). kFull when the address space is exhausted.
  Generation(std::uint64_t number, const Layout& layout, const std::string& data_path,
             const std::string& index_path, os::Access access, std::uint64_t reserve_rows,
             std::shared_ptr<const Generation> previous);
  Generation(const Generation&) = delete;
  Generation& operator=(const Generation&) = delete;

  std::uint64_t number() const { return number_; }
  std::uint64_t reserved_rows() const { return reserved_rows_; }
  // Any thread (a Writer's key index growth reads it while the appending thread maps more).
  std::uint64_t mapped_rows() const { return mapped_rows_.load(std::memory_order_acquire); }
  // Maps both files up to `rows` rows; rows <= reserved_rows(), files at least that long. One
  // thread at a time; mapped_rows() says so only once the rows are mapped.
  void map_rows(int data_fd, int index_fd, std::uint64_t rows);

  // Whether `fd` is the data file map_rows() last mapped (the same device and inode): a file
  // opened by path again may be another one (the directory replaced under a Reader, a relative
  // path after a chdir). False while unknown.
  bool maps_data_file(int fd) const noexcept;

  std::byte* row_ptr(std::uint64_t row) const { return data_.base() + row * record_bytes_; }
  IndexEntry* entry_ptr(std::uint64_t row) const {
    return reinterpret_cast<IndexEntry*>(index_.base()) + row;
  }

 private:
  // The data file's device and inode, for maps_data_file().
  void remember_data_file(int fd);

  std::uint64_t number_;
  std::uint64_t record_bytes_;
  std::uint64_t reserved_rows_;
  std::atomic<std::uint64_t> mapped_rows_{0};
  // The data file's device and inode at the last map_rows(); data_id_known_ once they are set.
  std::atomic<std::uint64_t> data_dev_{0}, data_ino_{0};
  std::atomic<bool> data_id_known_{false};
  os::Access access_;
  ReservedMapping data_, index_;
  std::shared_ptr<const Generation> previous_;  // Older mappings views may still point into.
};

}  // namespace embstore::detail
