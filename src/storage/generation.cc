#include "storage/generation.h"

#include <optional>

namespace embstore::detail {

Generation::Generation(std::uint64_t number, const Layout& layout, const std::string& data_path,
                       const std::string& index_path, os::Access access, std::uint64_t reserve_rows,
                       std::shared_ptr<const Generation> previous)
    : number_(number),
      record_bytes_(layout.record_bytes),
      reserved_rows_(reserve_rows),
      data_(reserve_rows * layout.record_bytes, data_path, access),
      index_(Layout::index_bytes_for(reserve_rows), index_path, access),
      previous_(std::move(previous)) {}

void Generation::map_rows(int data_fd, int index_fd, std::uint64_t rows) {
  if (rows <= mapped_rows()) return;
  data_.map_to(data_fd, rows * record_bytes_);
  data_id_known_.store(false, std::memory_order_relaxed);
  if (const std::optional<os::FileId> id = os::file_id(data_fd)) {
    data_dev_.store(id->device, std::memory_order_relaxed);
    data_ino_.store(id->inode, std::memory_order_relaxed);
    data_id_known_.store(true, std::memory_order_release);
  }
  index_.map_to(index_fd, rows * kIndexEntryBytes);
  mapped_rows_.store(rows, std::memory_order_release);
}

bool Generation::maps_data_file(int fd) const noexcept {
  if (!data_id_known_.load(std::memory_order_acquire)) return false;
  const std::optional<os::FileId> id = os::file_id(fd);
  return id && id->device == data_dev_.load(std::memory_order_relaxed) &&
         id->inode == data_ino_.load(std::memory_order_relaxed);
}

}  // namespace embstore::detail
