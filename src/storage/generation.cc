#include "storage/generation.h"

#include <optional>

#include "embstore/error.h"

namespace embstore::detail {

Generation::Generation(std::uint64_t number, const Layout& layout, const std::string& data_path,
                       const std::string& index_path, os::Access access, std::uint64_t reserve_rows,
                       std::shared_ptr<const Generation> previous)
    : number_(number),
      record_bytes_(layout.record_bytes),
      reserved_rows_(reserve_rows),
      access_(access),
      data_(reserve_rows * layout.record_bytes, data_path, access),
      index_(Layout::index_bytes_for(reserve_rows), index_path, access),
      previous_(std::move(previous)) {}

void Generation::map_rows(int data_fd, int index_fd, std::uint64_t rows) {
  if (rows <= mapped_rows()) return;
  if (access_ == os::Access::kReadOnly) {
    // A Reader keeps no descriptor: it opens the files again at every growth, and mapped tail
    // by tail each piece stayed a mapping of its own (two more a growth of the store, without
    // bound: a follower of a 1 TiB store would hold ~32k). So the reservation is mapped whole,
    // once, and a growth only records how far the files now hold it; which needs them to be the
    // files mapped (pages past a shorter file's end would raise SIGBUS).
    if (data_id_known_.load(std::memory_order_acquire) && !maps_data_file(data_fd)) {
      throw Error(ErrorCode::kCorruption,
                  data_.path() +
                      ": the file was replaced since it was mapped (another file at "
                      "this path, within one generation of the store)");
    }
    data_.map_ahead(data_fd, rows * record_bytes_);
    index_.map_ahead(index_fd, rows * kIndexEntryBytes);
    if (!data_id_known_.load(std::memory_order_relaxed)) remember_data_file(data_fd);
    mapped_rows_.store(rows, std::memory_order_release);
    return;
  }
  data_.map_to(data_fd, rows * record_bytes_);
  data_id_known_.store(false, std::memory_order_relaxed);
  remember_data_file(data_fd);
  index_.map_to(index_fd, rows * kIndexEntryBytes);
  mapped_rows_.store(rows, std::memory_order_release);
}

void Generation::remember_data_file(int fd) {
  if (const std::optional<os::FileId> id = os::file_id(fd)) {
    data_dev_.store(id->device, std::memory_order_relaxed);
    data_ino_.store(id->inode, std::memory_order_relaxed);
    data_id_known_.store(true, std::memory_order_release);
  }
}

bool Generation::maps_data_file(int fd) const noexcept {
  if (!data_id_known_.load(std::memory_order_acquire)) return false;
  const std::optional<os::FileId> id = os::file_id(fd);
  return id && id->device == data_dev_.load(std::memory_order_relaxed) &&
         id->inode == data_ino_.load(std::memory_order_relaxed);
}

}  // namespace embstore::detail
