#include "storage/store_files.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "embstore/error.h"
#include "format/checksum.h"
#include "platform/testing.h"

namespace embstore::detail {
namespace {

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::kCorruption, path + ": " + what);
}

}  // namespace

std::string strip_trailing_slashes(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

std::uint64_t resolve_map_bytes(std::uint64_t requested) {
  if (requested > kMaxMapBytes) {
    throw Error(ErrorCode::kInvalidArgument,
                "map_bytes " + std::to_string(requested) + " is beyond 2^47 (128 TiB)");
  }
  if (requested != 0) return requested;
  if (const char* text = std::getenv("EMBSTORE_MAP_BYTES")) {
    char* end = nullptr;
    const unsigned long long value = std::strtoull(text, &end, 10);
    if (end != text && *end == '\0' && value > 0 && value <= kMaxMapBytes) return value;
    throw Error(ErrorCode::kInvalidArgument, std::string("EMBSTORE_MAP_BYTES=\"") + text +
                                                 "\" is not a byte count between 1 and 2^47");
  }
  return kDefaultMapBytes;
}

std::unique_ptr<StoreFiles> StoreFiles::open(const std::string& dir_in, os::Access access,
                                             std::uint64_t map_bytes) {
  std::unique_ptr<StoreFiles> files(new StoreFiles());
  files->dir_ = strip_trailing_slashes(dir_in);
  files->access_ = access;
  const std::string& dir = files->dir_;
  if (!os::exists(dir)) {
    throw Error(ErrorCode::kNotFound, dir + ": no store here (no such file or directory)", ENOENT);
  }
  files->header_path_ = dir + "/" + kHeaderFileName;
  if (!os::exists(files->header_path_)) {
    throw Error(ErrorCode::kNotFound, dir + ": not an embstore store (no header file)", ENOENT);
  }
  files->header_fd_ = os::open_file(files->header_path_, access);
  const std::uint64_t header_bytes = os::file_size(files->header_fd_, files->header_path_);
  const std::uint64_t to_read = std::min<std::uint64_t>(header_bytes, kMaxHeaderReadBytes);
  std::string bytes(to_read, '\0');
  os::read_exact(files->header_fd_, bytes.data(), to_read, 0, files->header_path_);
  files->layout_ = decode_header(bytes, header_bytes, files->header_path_);
  files->hash_key_ = RowHashKey(files->layout_.seed);

  files->state_map_ =
      os::map_shared(files->header_fd_, kStateOffset, kPageBytes, access, files->header_path_);
  files->state_ = SharedState(static_cast<StatePage*>(files->state_map_));
  const std::uint64_t generation = files->state_.generation();
  if (generation == 0 || generation > 1'000'000'000) {
    corrupt(files->header_path_,
            "field generation " + std::to_string(generation) + " is outside 1..10^9");
  }
  files->data_path_ = dir + "/" + data_file_name(generation);
  files->index_path_ = dir + "/" + index_file_name(generation);
  files->data_fd_ = os::open_file(files->data_path_, access);
  files->index_fd_ = os::open_file(files->index_path_, access);

  // One budget for both files, split in proportion to what a row costs in each.
  const Layout& layout = files->layout_;
  const std::uint64_t budget = resolve_map_bytes(map_bytes);
  const std::uint64_t max_rows = std::max<std::uint64_t>(
      1, std::min(budget / (layout.record_bytes + kIndexEntryBytes), kMaxRows));
  const std::uint64_t data_reserve = layout.data_bytes_for(max_rows);
  files->data_ = std::make_unique<ReservedMapping>(data_reserve, files->data_path_, access);
  files->index_ = std::make_unique<ReservedMapping>(
      Layout::index_bytes_for(data_reserve / layout.record_bytes), files->index_path_, access);
  return files;
}

StoreFiles::~StoreFiles() {
  data_.reset();
  index_.reset();
  os::unmap(state_map_, kPageBytes);
  os::close_fd(data_fd_);
  os::close_fd(index_fd_);
  os::close_fd(header_fd_);
}

std::uint64_t StoreFiles::rows_files_hold() const {
  const std::uint64_t data_rows = os::file_size(data_fd_, data_path_) / layout_.record_bytes;
  const std::uint64_t index_rows = os::file_size(index_fd_, index_path_) / kIndexEntryBytes;
  return std::min({data_rows, index_rows, kMaxRows});
}

void StoreFiles::map_rows(std::uint64_t rows) {
  if (rows <= mapped_rows_) return;
  if (rows > kMaxRows) {
    corrupt(header_path_, "a counter claims " + std::to_string(rows) + " rows, beyond 2^40");
  }
  const std::uint64_t data_bytes = os::file_size(data_fd_, data_path_);
  if (data_bytes / layout_.record_bytes < rows) {
    corrupt(data_path_, "file is " + std::to_string(data_bytes) + " bytes, too short for " +
                            std::to_string(rows) + " rows of " +
                            std::to_string(layout_.record_bytes) + " bytes");
  }
  const std::uint64_t index_bytes = os::file_size(index_fd_, index_path_);
  if (index_bytes / kIndexEntryBytes < rows) {
    corrupt(index_path_, "file is " + std::to_string(index_bytes) + " bytes, too short for " +
                             std::to_string(rows) + " index entries");
  }
  // Map all the files hold (within the reservation), so that following a growing store costs
  // readers no system call until the files grow again.
  const std::uint64_t file_rows =
      std::min(data_bytes / layout_.record_bytes, index_bytes / kIndexEntryBytes);
  const std::uint64_t reserved_rows = std::min(data_->reserved_bytes() / layout_.record_bytes,
                                               index_->reserved_bytes() / kIndexEntryBytes);
  const std::uint64_t target = std::max(rows, std::min(file_rows, reserved_rows));
  data_->map_to(data_fd_, target * layout_.record_bytes);  // kFull if rows exceed the reservation
  index_->map_to(index_fd_, target * kIndexEntryBytes);
  mapped_rows_ = target;
}

void StoreFiles::grow_to(std::uint64_t rows) {
  const std::uint64_t capacity = state_.capacity();
  if (rows <= capacity) {
    map_rows(capacity);
    return;
  }
  // Compare in rows first: rows * record_bytes could overflow for a hostile row count.
  const std::uint64_t new_data_bytes =
      rows > kMaxRows || rows > data_->reserved_bytes() / layout_.record_bytes
          ? ~0ull
          : layout_.data_bytes_for(rows);
  if (new_data_bytes > data_->reserved_bytes()) {
    throw Error(ErrorCode::kFull,
                data_path_ + ": growing to " + std::to_string(rows) + " rows needs " +
                    std::to_string(new_data_bytes) + " bytes, beyond map_bytes " +
                    std::to_string(data_->reserved_bytes()) + "; reopen with a larger map_bytes");
  }
  const std::uint64_t new_capacity = std::min(new_data_bytes / layout_.record_bytes, kMaxRows);
  // Allocate from the end of the last published capacity's rows, not from the whole segment
  // after them: a growth killed half-way may have extended the files already (re-allocating an
  // allocated range is a cheap no-op), and a recovery after a reboot may have clamped the
  // capacity to files that end inside a segment (cut short outside the store's control).
  const std::uint64_t old_data_bytes = capacity * layout_.record_bytes;
  os::allocate(data_fd_, old_data_bytes, new_data_bytes - old_data_bytes, data_path_);
  EMBSTORE_CRASH_POINT("after-grow-data");
  const std::uint64_t old_index_bytes = capacity * kIndexEntryBytes;
  const std::uint64_t new_index_bytes = Layout::index_bytes_for(new_capacity);
  os::allocate(index_fd_, old_index_bytes, new_index_bytes - old_index_bytes, index_path_);
  EMBSTORE_CRASH_POINT("after-grow-index");
  map_rows(new_capacity);
  state_.set_capacity(new_capacity);
}

bool StoreFiles::row_valid(std::uint64_t row) const {
  IndexEntry entry;
  std::memcpy(&entry, entry_ptr(row), sizeof(entry));
  return entry_valid(entry, row, row_ptr(row), layout_.record_bytes, hash_key_);
}

std::uint64_t StoreFiles::valid_batch_prefix(std::uint64_t begin, std::uint64_t end) const {
  auto era_at = [this](std::uint64_t row) {
    IndexEntry entry;
    std::memcpy(&entry, entry_ptr(row), sizeof(entry));
    return entry_era(entry.row);
  };
  // A run of valid entries whose eras never go back: an older era after a newer one is a stale
  // entry from before a cut or a dead writer (FORMAT.md, "era"), however well it validates.
  bool have_previous = begin > 0 && row_valid(begin - 1);
  std::uint64_t previous = have_previous ? era_at(begin - 1) : 0;
  std::uint64_t row = begin;
  for (; row < end && row_valid(row); ++row) {
    const std::uint64_t era = era_at(row);
    if (have_previous && !era_not_older(era, previous)) break;
    previous = era;
    have_previous = true;
  }
  // Keep whole batches only: back up to the last entry that ends one.
  for (; row > begin; --row) {
    IndexEntry entry;
    std::memcpy(&entry, entry_ptr(row - 1), sizeof(entry));
    if (entry.row & kEntryBatchEnd) return row;
  }
  return begin;
}

void StoreFiles::upgrade_header() {
  if (layout_.format_minor >= kFormatMinorHeaderCopy && !layout_.from_copy) return;
  const std::uint64_t header_bytes = os::file_size(header_fd_, header_path_);
  std::string bytes(std::min<std::uint64_t>(header_bytes, kMaxHeaderReadBytes), '\0');
  os::read_exact(header_fd_, bytes.data(), bytes.size(), 0, header_path_);
  const Layout now = decode_header(bytes, header_bytes, header_path_);
  const std::string fixed = current_fixed_header(bytes, now);
  const std::string& metadata = now.metadata;
  const std::uint64_t copy_at = metadata_copy_offset(metadata.size());
  // Allocated first: the header's state page is written through a mapping.
  os::allocate(header_fd_, 0, copy_at + round_up(metadata.size(), kPageBytes), header_path_);
  if (!metadata.empty()) {
    os::write_all(header_fd_, metadata.data(), metadata.size(), copy_at, header_path_);
  }
  os::write_all(header_fd_, fixed.data(), fixed.size(), kHeaderCopyOffset, header_path_);
  os::datasync(header_fd_, header_path_);
  EMBSTORE_CRASH_POINT("header-copy-written");
  os::write_all(header_fd_, fixed.data(), fixed.size(), 0, header_path_);
  os::datasync(header_fd_, header_path_);
  layout_.format_minor = kFormatMinor;
  layout_.from_copy = false;
}

bool StoreFiles::same_boot() const {
  std::uint64_t stored[2], current[2];
  state_.boot_id(stored);
  if (!os::boot_id(current)) return false;  // Unknown: re-check, as after a reboot.
  return stored[0] == current[0] && stored[1] == current[1];
}

StoreInfo StoreFiles::info() const {
  StoreInfo info;
  info.path = dir_;
  info.format_major = layout_.format_major;
  info.format_minor = layout_.format_minor;
  info.dtype = layout_.dtype;
  info.dim = layout_.dim;
  info.record_bytes = layout_.record_bytes;
  info.segment_bytes = layout_.segment_bytes;
  info.store_id = store_id_hex(layout_.store_id);
  info.created_unix_ns = layout_.created_unix_ns;
  info.metadata = layout_.metadata;
  info.generation = state_.generation();
  info.last_commit_unix_ns = state_.last_commit_unix_ns();
  info.durable_rows = state_.durable();
  info.committed_rows = state_.committed();
  info.capacity_rows = state_.capacity();
  info.data_file_bytes = os::file_size(data_fd_, data_path_);
  info.index_file_bytes = os::file_size(index_fd_, index_path_);
  return info;
}

}  // namespace embstore::detail
