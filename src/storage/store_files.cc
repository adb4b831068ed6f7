#include "storage/store_files.h"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string_view>

#include "embstore/error.h"
#include "format/checksum.h"
#include "platform/testing.h"

namespace embstore::detail {
namespace {

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::kCorruption, path + ": " + what);
}

// A descriptor of one of the store's files for the length of a call: the StoreFiles' own (a
// Writer's) or, for a Reader, which keeps none, one opened by path and closed at scope exit.
class FileHandle {
 public:
  FileHandle(int own_fd, const std::string& path, os::Access access)
      : fd_(own_fd >= 0 ? own_fd : os::open_file(path, access)), owned_(own_fd < 0) {}
  FileHandle(int own_fd, const StoreFiles& files, const std::string& path)
      : fd_(own_fd >= 0 ? own_fd : files.open_by_path(path)), owned_(own_fd < 0) {}
  ~FileHandle() {
    if (owned_) os::close_fd(fd_);
  }
  FileHandle(const FileHandle&) = delete;
  FileHandle& operator=(const FileHandle&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
  bool owned_;
};

constexpr std::uint64_t kMaxGeneration = 1'000'000'000;

// The generation X of the one rows.X/index.X pair in `dir`, or 0 when there is none or more
// than one.
std::uint64_t only_generation_in(const std::string& dir) {
  std::uint64_t only = 0;
  for (const std::string& name : os::list_dir(dir)) {
    if (!name.starts_with("rows.")) continue;
    const std::string number = name.substr(5);
    if (number.empty() || number.size() > 10 ||
        number.find_first_not_of("0123456789") != std::string::npos) {
      continue;
    }
    const std::uint64_t x = std::strtoull(number.c_str(), nullptr, 10);
    // The name as the store would spell it (no leading zeros), with its index file beside it.
    if (x == 0 || x > kMaxGeneration || data_file_name(x) != name ||
        !os::exists(dir + "/" + index_file_name(x))) {
      continue;
    }
    if (only != 0) return 0;
    only = x;
  }
  return only;
}

}  // namespace

std::uint64_t capacity_for(std::uint64_t rows, std::uint64_t record_bytes,
                           std::uint64_t segment_bytes, std::uint64_t header_bytes) {
  const std::uint64_t row_bytes = record_bytes + kIndexEntryBytes;
  // Compared in rows first: rows * row_bytes could overflow for a huge count.
  if (std::max<std::uint64_t>(rows, 1) <= segment_bytes / row_bytes) {
    // Doubling: under 2 x (payload + 32 B/row), or the first allocation, and O(log n) growths.
    const std::uint64_t need = std::max<std::uint64_t>(rows, 1) * row_bytes;
    return std::min(segment_bytes, std::max(kFirstAllocationBytes, std::bit_ceil(need))) /
           row_bytes;
  }
  // Past one segment, the slack after a growth plus the header, the files' last pages and the
  // file system's extent blocks (counted in st_blocks) stays within one segment, when a segment
  // has room for them at all (at least twice their size).
  const std::uint64_t overhead = header_bytes + 4 * kPageBytes;
  const std::uint64_t step_bytes =
      segment_bytes > 2 * overhead ? segment_bytes - overhead : segment_bytes;
  return rows + std::max<std::uint64_t>(1, step_bytes / row_bytes);
}

std::string strip_trailing_slashes(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

std::string cause_first(const std::string& subject, const std::string& doing,
                        const std::string& message, int err) {
  if (err == 0) return subject + ": " + doing + ": " + message;
  const std::string reason = std::strerror(err);
  std::string detail = message;
  if (detail.ends_with(": " + reason)) detail.resize(detail.size() - reason.size() - 2);
  return subject + ": " + doing + ": " + reason + " (" + detail + ")";
}

std::uint64_t resolve_map_bytes(std::uint64_t requested, const std::string& where) {
  if (requested > kMaxMapBytes) {
    throw Error(ErrorCode::kInvalidArgument,
                where + ": map_bytes " + std::to_string(requested) + " is beyond 2^47 (128 TiB)");
  }
  if (requested != 0) return requested;
  if (const char* text = std::getenv("EMBSTORE_MAP_BYTES")) {
    char* end = nullptr;
    const unsigned long long value = std::strtoull(text, &end, 10);
    if (end != text && *end == '\0' && value > 0 && value <= kMaxMapBytes) return value;
    throw Error(ErrorCode::kInvalidArgument, where + ": EMBSTORE_MAP_BYTES=\"" + text +
                                                 "\" is not a byte count between 1 and 2^47");
  }
  return kDefaultMapBytes;
}

std::string map_bytes_advice(std::uint64_t requested) {
  if (requested != 0) return "reopen with a larger map_bytes";
  if (const char* text = std::getenv("EMBSTORE_MAP_BYTES")) {
    return std::string("raise EMBSTORE_MAP_BYTES (now ") + text + ")";
  }
  return "reopen with a larger map_bytes, or raise EMBSTORE_MAP_BYTES";
}

std::unique_ptr<StoreFiles> StoreFiles::open(const std::string& dir_in, os::Access access,
                                             std::uint64_t map_bytes,
                                             DamagedGeneration damaged_generation) {
  std::unique_ptr<StoreFiles> files(new StoreFiles());
  files->dir_ = strip_trailing_slashes(dir_in);
  // Made absolute: every later use of the store's files by name (a Reader's opens, a Writer's
  // truncate and key index files, check_at_path()) must reach this directory after the process
  // changes its working directory. Not resolved further (symbolic links, ".."), as the kernel
  // resolves them at each use.
  if (!files->dir_.empty() && files->dir_.front() != '/') {
    std::error_code ec;
    const std::string cwd = std::filesystem::current_path(ec).string();
    if (!ec) files->dir_ = (cwd == "/" ? "" : cwd) + "/" + files->dir_;
  }
  files->access_ = access;
  const std::string& dir = files->dir_;
  // Not stat() == 0 alone: a directory the process may not search is kPermissionDenied, not
  // "no store here", which callers take as a path to create a store at (os::look_up).
  if (!os::look_up(dir)) {
    throw Error(ErrorCode::kNotFound, dir + ": no store here (no such file or directory)", ENOENT);
  }
  files->header_path_ = dir + "/" + kHeaderFileName;
  if (!os::is_directory(dir)) {
    throw Error(ErrorCode::kNotFound,
                dir + ": is a file, not an embstore store (a store is a directory)", ENOTDIR);
  }
  if (!os::look_up(files->header_path_)) {
    throw Error(ErrorCode::kNotFound, dir + ": not an embstore store (no header file)", ENOENT);
  }
  files->header_fd_ = os::open_file(files->header_path_, access);
  files->header_id_ = os::file_id(files->header_fd_);
  const std::uint64_t header_bytes = os::file_size(files->header_fd_, files->header_path_);
  const std::uint64_t to_read = std::min<std::uint64_t>(header_bytes, kMaxHeaderReadBytes);
  files->header_bytes_ = header_bytes;
  std::string bytes(to_read, '\0');
  os::read_exact(files->header_fd_, bytes.data(), to_read, 0, files->header_path_);
  files->layout_ = decode_header(bytes, header_bytes, files->header_path_);
  files->hash_key_ = RowHashKey(files->layout_.seed);

  files->state_map_ =
      os::map_shared(files->header_fd_, kStateOffset, kPageBytes, access, files->header_path_);
  files->state_ = SharedState(static_cast<StatePage*>(files->state_map_));
  const std::uint64_t word = files->state_.generation_word();
  std::uint64_t generation = store_generation_of(word);
  // Whether a file of the generation is there: a Writer opens it (keeping the descriptor, so
  // what it found is what it uses, with no stat before the open for the file to change in
  // between); a Reader, which keeps no descriptor, looks.
  const auto present = [&](const std::string& path, int& fd) {
    if (access == os::Access::kReadOnly) return os::exists(path);
    try {
      fd = os::open_file(path, access);
      return true;
    } catch (const Error& error) {
      if (error.code() != ErrorCode::kNotFound) throw;
      return false;
    }
  };
  const bool in_range = generation != 0 && generation <= kMaxGeneration;
  const bool has_data =
      in_range && present(dir + "/" + data_file_name(generation), files->data_fd_);
  const bool has_index =
      in_range && present(dir + "/" + index_file_name(generation), files->index_fd_);
  std::string damage;
  if (!in_range) {
    damage = "field generation " + std::to_string(generation) + " is outside 1..10^9";
  } else if (!has_data && !has_index && files->state_.generation_word() == word) {
    // The word unchanged after the look: no truncate switched the store and removed the files
    // meanwhile, so the field names files that were never there.
    damage = "field generation " + std::to_string(generation) + " names " +
             data_file_name(generation) + " and " + index_file_name(generation) +
             ", which do not exist";
  }
  if (!damage.empty()) {
    const std::uint64_t only = only_generation_in(dir);
    if (only == 0) corrupt(files->header_path_, damage);
    const std::string found = data_file_name(only) + " and " + index_file_name(only);
    if (damaged_generation == DamagedGeneration::kRefuse) {
      corrupt(files->header_path_, damage + " (the only generation files here are " + found + ")");
    }
    files->generation_damage_ = files->header_path_ + ": " + damage + "; read " + found +
                                ", the only generation files here";
    generation = only;
  }
  files->file_generation_ = generation;
  files->data_path_ = dir + "/" + data_file_name(generation);
  files->index_path_ = dir + "/" + index_file_name(generation);
  // One of the pair without the other is damage as well (a truncate removes both, after
  // switching the word): not "no store here", which callers take as a path to create a store at.
  if (has_data != has_index && files->state_.generation_word() == word) {
    const std::string& missing = has_data ? files->index_path_ : files->data_path_;
    const std::string& there = has_data ? files->data_path_ : files->index_path_;
    corrupt(missing, "missing, although " + there +
                         " is there and the store's generation (field generation of " +
                         files->header_path_ + ") is " + std::to_string(generation));
  }
  if (access == os::Access::kReadWrite) {
    // Not opened above: the only pair read instead of a damaged generation, or a file a truncate
    // removed meanwhile (then this names it, kNotFound, as before).
    if (files->data_fd_ < 0) files->data_fd_ = os::open_file(files->data_path_, access);
    if (files->index_fd_ < 0) files->index_fd_ = os::open_file(files->index_path_, access);
  } else {
    // The state page stays mapped; the descriptor is not needed again (see the file comment).
    os::close_fd(files->header_fd_);
    files->header_fd_ = -1;
  }

  // One budget for both files, split in proportion to what a row costs in each; rounded up to
  // whole segments, so the capacity of a store whose files were sized in whole segments (format
  // 1.0, FORMAT.md "File sizes") fits one Generation whenever its rows fit the budget.
  const Layout& layout = files->layout_;
  const std::uint64_t budget = resolve_map_bytes(map_bytes, files->dir_);
  files->map_bytes_advice_ = map_bytes_advice(map_bytes);
  const std::uint64_t max_rows = std::max<std::uint64_t>(
      1, std::min(budget / (layout.record_bytes + kIndexEntryBytes), kMaxRows));
  files->budget_rows_ =
      round_up(max_rows * layout.record_bytes, layout.segment_bytes) / layout.record_bytes;
  return files;
}

std::uint64_t StoreFiles::read_generation(const std::string& dir) {
  const std::string path = strip_trailing_slashes(dir) + "/" + kHeaderFileName;
  const FileHandle header(-1, path, os::Access::kReadOnly);
  const std::uint64_t bytes = os::file_size(header.get(), path);
  if (bytes < kStateOffset + kPageBytes) {
    corrupt(path, "file is " + std::to_string(bytes) + " bytes, too short for the state page at " +
                      std::to_string(kStateOffset));
  }
  // Mapped, not read: writers store the word through the mapping, and only an atomic load of it
  // is sure not to see half of a store.
  void* page = os::map_shared(header.get(), kStateOffset, kPageBytes, os::Access::kReadOnly, path);
  const std::uint64_t generation = SharedState(static_cast<StatePage*>(page)).generation();
  os::unmap(page, kPageBytes);
  return generation;
}

StoreFiles::~StoreFiles() {
  set_generation(nullptr);
  os::unmap(state_map_, kPageBytes);
  os::close_fd(data_fd_);
  os::close_fd(index_fd_);
  os::close_fd(header_fd_);
  for (const int fd : retired_fds_) os::close_fd(fd);
}

void StoreFiles::close_retired_fds() {
  for (const int fd : retired_fds_) os::close_fd(fd);
  retired_fds_.clear();
}

bool StoreFiles::at_path() const {
  return header_id_ && os::file_id_at(header_path_) == header_id_;
}

void StoreFiles::check_at_path() const {
  if (at_path()) return;
  throw Error(ErrorCode::kNotFound,
              dir_ +
                  ": the store opened is no longer at this path (deleted, moved away, or "
                  "replaced by another created or moved there), so the files there are not its "
                  "files; open the store again");
}

int StoreFiles::open_by_path(const std::string& path) const {
  const int fd = os::open_file(path, access_);
  try {
    check_at_path();
  } catch (...) {
    os::close_fd(fd);
    throw;
  }
  return fd;
}

bool StoreFiles::follow_generation() {
  const std::uint64_t generation = state_.generation();
  if (generation == file_generation_) return false;
  if (generation == 0 || generation > kMaxGeneration) {
    corrupt(header_path_, "field generation " + std::to_string(generation) + " is outside 1..10^9");
  }
  std::string data_path = dir_ + "/" + data_file_name(generation);
  std::string index_path = dir_ + "/" + index_file_name(generation);
  if (access_ == os::Access::kReadWrite) {
    const int data_fd = open_by_path(data_path);
    int index_fd = -1;
    try {
      index_fd = open_by_path(index_path);
    } catch (...) {
      os::close_fd(data_fd);
      throw;
    }
    retired_fds_.push_back(data_fd_);
    retired_fds_.push_back(index_fd_);
    data_fd_ = data_fd;
    index_fd_ = index_fd;
    set_generation(nullptr);  // A Writer hands out no pointers; its growth pins what it reads.
  }
  data_path_ = std::move(data_path);
  index_path_ = std::move(index_path);
  file_generation_ = generation;
  return true;
}

void StoreFiles::write_next_generation(std::uint64_t rows) {
  const std::uint64_t next = file_generation_ + 1;
  const std::string data_path = dir_ + "/" + data_file_name(next);
  const std::string index_path = dir_ + "/" + index_file_name(next);
  check_at_path();
  // Leftovers of an interrupted truncate: no one ever mapped them (the counter never named them).
  os::remove_file(data_path);
  os::remove_file(index_path);
  int data_fd = -1, index_fd = -1;
  try {
    data_fd = os::create_file(data_path);
    index_fd = os::create_file(index_path);
    const std::uint64_t capacity =
        std::min({capacity_for(rows, layout_.record_bytes, layout_.segment_bytes, header_bytes_),
                  std::max(budget_rows_, rows), kMaxRows});
    os::allocate(data_fd, 0, layout_.data_bytes_for(capacity), data_path);
    os::allocate(index_fd, 0, Layout::index_bytes_for(capacity), index_path);
    if (rows > 0) {
      os::write_all(data_fd, row_ptr(0), rows * layout_.record_bytes, 0, data_path);
      os::write_all(index_fd, entry_ptr(0), rows * kIndexEntryBytes, 0, index_path);
      // The last row kept ends a batch, so recovery may keep it whole (FORMAT.md, "index.G").
      IndexEntry last;
      std::memcpy(&last, entry_ptr(rows - 1), sizeof(last));
      if ((last.row & kEntryBatchEnd) == 0) {
        last.row |= kEntryBatchEnd;
        const std::uint64_t payload =
            payload_hash(row_ptr(rows - 1), layout_.record_bytes, hash_key_);
        last.checksum = entry_checksum(payload, last.key, last.epoch, last.row, layout_.seed);
        os::write_all(index_fd, &last, sizeof(last), (rows - 1) * kIndexEntryBytes, index_path);
      }
    }
    EMBSTORE_CRASH_POINT("truncate-copied");
    os::datasync(data_fd, data_path);
    os::datasync(index_fd, index_path);
    os::sync_dir(dir_);
  } catch (...) {
    os::close_fd(data_fd);
    os::close_fd(index_fd);
    os::remove_file(data_path);
    os::remove_file(index_path);
    throw;
  }
  os::close_fd(data_fd);
  os::close_fd(index_fd);
}

void StoreFiles::remove_stale_files(std::uint64_t key_generation) const {
  check_at_path();
  for (const std::string& name : os::list_dir(dir_)) {
    const std::size_t dot = name.find('.');
    if (dot == std::string::npos || dot + 1 == name.size()) continue;
    const std::string_view stem(name.data(), dot);
    const std::string_view number(name.data() + dot + 1, name.size() - dot - 1);
    if (number.find_first_not_of("0123456789") != std::string_view::npos) continue;
    const std::uint64_t value = std::strtoull(std::string(number).c_str(), nullptr, 10);
    const bool stale = ((stem == "rows" || stem == "index") && value != file_generation_) ||
                       (stem == "keys" && value != key_generation);
    if (stale) os::remove_file(dir_ + "/" + name);
  }
}

std::pair<std::uint64_t, std::uint64_t> StoreFiles::rows_each_file_holds() const {
  const FileHandle data(data_fd_, *this, data_path_);
  const FileHandle index(index_fd_, *this, index_path_);
  return {os::file_size(data.get(), data_path_) / layout_.record_bytes,
          os::file_size(index.get(), index_path_) / kIndexEntryBytes};
}

std::uint64_t StoreFiles::rows_files_hold() const {
  const auto [data_rows, index_rows] = rows_each_file_holds();
  return std::min({data_rows, index_rows, kMaxRows});
}

void StoreFiles::map_rows(std::uint64_t rows) {
  // An empty snapshot still needs a Generation: views of zero rows point into it.
  const bool current = generation_ && generation_->number() == file_generation_;
  if (current && rows <= generation_->mapped_rows()) return;
  if (rows > kMaxRows) {
    corrupt(header_path_, "a counter claims " + std::to_string(rows) + " rows, beyond 2^40");
  }
  const FileHandle data(data_fd_, *this, data_path_);
  const FileHandle index(index_fd_, *this, index_path_);
  const std::uint64_t data_bytes = os::file_size(data.get(), data_path_);
  if (data_bytes / layout_.record_bytes < rows) {
    corrupt(data_path_, "file is " + std::to_string(data_bytes) + " bytes, too short for " +
                            std::to_string(rows) + " rows of " +
                            std::to_string(layout_.record_bytes) + " bytes");
  }
  const std::uint64_t index_bytes = os::file_size(index.get(), index_path_);
  if (index_bytes / kIndexEntryBytes < rows) {
    corrupt(index_path_, "file is " + std::to_string(index_bytes) + " bytes, too short for " +
                             std::to_string(rows) + " index entries");
  }
  if (rows > budget_rows_) {
    throw Error(ErrorCode::kFull, data_path_ + ": the store holds " + std::to_string(rows) +
                                      " rows but map_bytes leaves room for " +
                                      std::to_string(budget_rows_) + "; " + map_bytes_advice_);
  }
  // Map all the files hold (within budget), so that following a growing store costs readers no
  // system call until the files grow again.
  const std::uint64_t file_rows =
      std::min({data_bytes / layout_.record_bytes, index_bytes / kIndexEntryBytes, budget_rows_});
  const std::uint64_t target = std::max(rows, file_rows);
  if (!current || target > generation_->reserved_rows()) {
    // Twice the next power of two: O(log n) remaps while a store grows, and the reservations a
    // Reader keeps pinned add up to at most twice the newest.
    const std::uint64_t reserve = std::min(budget_rows_, std::bit_ceil(target) * 2);
    std::shared_ptr<const Generation> keep;
    if (access_ == os::Access::kReadOnly) keep = generation_;
    auto next = std::make_shared<Generation>(file_generation_, layout_, data_path_, index_path_,
                                             access_, reserve, std::move(keep));
    next->map_rows(data.get(), index.get(), target);
    set_generation(std::move(next));
    return;
  }
  generation_->map_rows(data.get(), index.get(), target);
}

std::shared_ptr<const Generation> StoreFiles::pin_generation() const {
  std::lock_guard guard(pin_mutex_);
  return generation_;
}

void StoreFiles::set_generation(std::shared_ptr<Generation> generation) {
  std::shared_ptr<Generation> replaced;  // Unmapped after the mutex is released.
  std::lock_guard guard(pin_mutex_);
  replaced = std::move(generation_);
  generation_ = std::move(generation);
}

void StoreFiles::grow_to(std::uint64_t rows) {
  const std::uint64_t capacity = state_.capacity();
  if (rows <= capacity) {
    map_rows(capacity);
    return;
  }
  const std::uint64_t new_capacity = allocate_rows(capacity, rows);
  map_rows(new_capacity);
  state_.set_capacity(new_capacity);
}

std::uint64_t StoreFiles::allocate_rows(std::uint64_t capacity, std::uint64_t rows) {
  // Compare in rows first: rows * record_bytes could overflow for a hostile row count.
  if (rows > budget_rows_) {
    throw Error(ErrorCode::kFull, data_path_ + ": growing to " + std::to_string(rows) +
                                      " rows is beyond map_bytes, which leaves room for " +
                                      std::to_string(budget_rows_) + " rows; " + map_bytes_advice_);
  }
  std::uint64_t new_capacity =
      std::min({capacity_for(rows, layout_.record_bytes, layout_.segment_bytes, header_bytes_),
                budget_rows_, kMaxRows});
  // Allocate from the page holding the end of the published capacity, the most either file
  // rule guarantees is allocated (FORMAT.md "File sizes"): a growth killed half-way may have
  // extended the files already, and re-allocating an allocated range is a cheap no-op.
  const auto allocate = [&](std::uint64_t target) {
    const std::uint64_t data_from = capacity * layout_.record_bytes / kPageBytes * kPageBytes;
    os::allocate(data_fd_, data_from, layout_.data_bytes_for(target) - data_from, data_path_);
    EMBSTORE_CRASH_POINT("after-grow-data");
    const std::uint64_t index_from = capacity * kIndexEntryBytes / kPageBytes * kPageBytes;
    os::allocate(index_fd_, index_from, Layout::index_bytes_for(target) - index_from, index_path_);
    EMBSTORE_CRASH_POINT("after-grow-index");
  };
  try {
    allocate(new_capacity);
  } catch (const Error& error) {
    // A nearly full disk (or RLIMIT_FSIZE): the step the rule asks for does not fit, the rows
    // this append needs may. Only when that fails too is the disk full for this append.
    if (error.code() != ErrorCode::kFull || new_capacity <= rows) throw;
    new_capacity = rows;
    allocate(new_capacity);
  }
  return new_capacity;
}

bool StoreFiles::row_valid(std::uint64_t row) const {
  IndexEntry entry;
  std::memcpy(&entry, entry_ptr(row), sizeof(entry));
  return entry_valid(entry, row, row_ptr(row), layout_.record_bytes, hash_key_);
}

bool StoreFiles::row_valid(std::uint64_t row, const std::byte* bytes) const {
  IndexEntry entry;
  std::memcpy(&entry, entry_ptr(row), sizeof(entry));
  return entry_valid(entry, row, bytes, layout_.record_bytes, hash_key_);
}

RowCopier::~RowCopier() {
  if (own_fd_) os::close_fd(fd_);
}

int RowCopier::descriptor() {
  if (looked_) return fd_;
  looked_ = true;
  const Generation* generation = files_.generation();
  // Only the Generation the handle's paths name (a refresh that failed half-way may have moved
  // the paths on and not the mapping).
  if (generation == nullptr || generation->number() != files_.file_generation()) return -1;
  if (files_.data_fd() >= 0) return fd_ = files_.data_fd();
  // The path names the mapped file unless a truncate retired it (then it is gone: generation
  // numbers are never used again once the counter named them, FORMAT.md "Truncate") or the
  // directory changed under this process; the identity check covers both.
  int fd = -1;
  try {
    fd = os::open_file(files_.data_path(), os::Access::kReadOnly);
  } catch (const Error&) {
    return -1;  // Gone, out of descriptors, not permitted: the mapping has the same bytes.
  }
  if (!generation->maps_data_file(fd)) {
    os::close_fd(fd);
    return -1;
  }
  own_fd_ = true;
  return fd_ = fd;
}

void RowCopier::copy(std::uint64_t begin, std::uint64_t count, std::byte* out) {
  const std::uint64_t record_bytes = files_.layout().record_bytes;
  const std::uint64_t bytes = count * record_bytes;
  const int fd = bytes >= kMinBytes ? descriptor() : -1;
  if (fd < 0) {
    std::memcpy(out, files_.row_ptr(begin), bytes);
    return;
  }
  os::read_exact(fd, out, bytes, begin * record_bytes, files_.data_path());
}

std::optional<std::uint64_t> StoreFiles::last_valid_row_before(std::uint64_t row) const {
  // A few damaged rows are looked past, not a damaged store's whole length.
  constexpr std::uint64_t kLookBack = 1024;
  for (std::uint64_t r = row; r > 0 && row - r < kLookBack; --r) {
    if (row_valid(r - 1)) return r - 1;
  }
  return std::nullopt;
}

std::uint64_t StoreFiles::valid_batch_prefix(std::uint64_t begin, std::uint64_t end) const {
  auto entry_at = [this](std::uint64_t row) {
    IndexEntry entry;
    std::memcpy(&entry, entry_ptr(row), sizeof(entry));
    return entry;
  };
  // A run of valid entries whose eras never go back: an older era after a newer one is a stale
  // entry from before a cut or a dead writer (FORMAT.md, "era"), however well it validates.
  // And a batch is written in one era: an era that changes where no batch ended joins the
  // front of one batch to the rest of another (stale entries a power loss kept before newer
  // ones).
  // The run continues the last row before `begin` that verifies (its era is then the one it
  // was written in): a damaged row right before `begin` must not let stale entries of an older
  // era after it pass for the log's continuation.
  const std::optional<std::uint64_t> before = last_valid_row_before(begin);
  bool have_previous = before.has_value();
  IndexEntry previous = have_previous ? entry_at(*before) : IndexEntry{};
  std::uint64_t row = begin;
  for (; row < end && row_valid(row); ++row) {
    const IndexEntry entry = entry_at(row);
    const std::uint64_t era = entry_era(entry.row);
    if (have_previous) {
      const std::uint64_t previous_era = entry_era(previous.row);
      if (!era_not_older(era, previous_era)) break;
      if (row > begin && (previous.row & kEntryBatchEnd) == 0 && era != previous_era) break;
    }
    previous = entry;
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
  if (layout_.format_minor >= kFormatMinorHeaderCopy && layout_.copy_problem.empty()) return;
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
  // The primary's metadata too: its checksum covers it, so a damaged byte there failed the
  // primary, which the fixed header alone rewritten would go on failing (from a review).
  if (!metadata.empty()) {
    os::write_all(header_fd_, metadata.data(), metadata.size(), kMetadataOffset, header_path_);
  }
  os::write_all(header_fd_, fixed.data(), fixed.size(), 0, header_path_);
  os::datasync(header_fd_, header_path_);
  layout_.format_minor = kFormatMinor;
  layout_.from_copy = false;
  layout_.copy_problem.clear();
}

std::string StoreFiles::header_copy_problem() const {
  // Only the header file this handle opened: a store deleted since (or another one made at the
  // path) has no header of this store's to check.
  int fd = -1;
  try {
    fd = os::open_file(header_path_, os::Access::kReadOnly);
  } catch (const Error& error) {
    if (error.code() == ErrorCode::kNotFound) return "";
    throw;
  }
  struct Closer {
    int fd;
    ~Closer() { os::close_fd(fd); }
  } closer{fd};
  if (os::file_id(fd) != header_id_) return "";
  const std::uint64_t header_bytes = os::file_size(fd, header_path_);
  std::string bytes(std::min<std::uint64_t>(header_bytes, kMaxHeaderReadBytes), '\0');
  os::read_exact(fd, bytes.data(), bytes.size(), 0, header_path_);
  try {
    return decode_header(bytes, header_bytes, header_path_).copy_problem;
  } catch (const Error& error) {
    // Damaged since this handle opened the store: neither copy holds now.
    return std::string("neither copy of the fixed header holds: ") + error.what();
  }
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
  info.keeps_key_index = layout_.key_index;
  info.store_id = store_id_hex(layout_.store_id);
  info.created_unix_ns = layout_.created_unix_ns;
  info.metadata = layout_.metadata;
  // The store as it is now, counters and files alike: for a Reader whose snapshot predates a
  // truncate, the files of the generation the store has moved to (its own may be gone). Another
  // truncate may remove those in turn while they are opened: then the counters are read again.
  for (int attempt = 0;; ++attempt) {
    info.generation = state_.generation();
    info.last_commit_unix_ns = state_.last_commit_unix_ns();
    info.durable_rows = state_.durable();
    info.committed_rows = state_.committed();
    info.capacity_rows = state_.capacity();
    const bool own = info.generation == file_generation_;
    const std::string data_path = own ? data_path_ : dir_ + "/" + data_file_name(info.generation);
    const std::string index_path =
        own ? index_path_ : dir_ + "/" + index_file_name(info.generation);
    try {
      const FileHandle data(own ? data_fd_ : -1, *this, data_path);
      const FileHandle index(own ? index_fd_ : -1, *this, index_path);
      info.data_file_bytes = os::file_size(data.get(), data_path);
      info.index_file_bytes = os::file_size(index.get(), index_path);
      return info;
    } catch (const Error& error) {
      if (error.code() != ErrorCode::kNotFound) throw;
      // Files of this store gone: it was deleted or replaced at its path (said so, not as a
      // missing file of whatever store is there now), or truncated again meanwhile.
      check_at_path();
      if (attempt == 2 || state_.generation() == info.generation) throw;
    }
  }
}

}  // namespace embstore::detail
