// create_store, read_info, open_with_info and read_generation: store-level operations (read_info
// reads through a Reader).
#include "embstore/store.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string_view>
#include <vector>

#include "embstore/error.h"
#include "embstore/reader.h"
#include "format/format.h"
#include "platform/lock.h"
#include "platform/os.h"
#include "platform/testing.h"
#include "storage/store_files.h"

namespace embstore {
namespace {

std::string parent_of(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Writes one new file of the store, fully, and flushes it.
void write_new_file(const std::string& path, const std::string& bytes, std::uint64_t allocate) {
  int fd = detail::os::create_file(path);
  try {
    if (!bytes.empty()) detail::os::write_all(fd, bytes.data(), bytes.size(), 0, path);
    if (allocate != 0) detail::os::allocate(fd, 0, allocate, path);
    detail::os::datasync(fd, path);
  } catch (...) {
    detail::os::close_fd(fd);
    throw;
  }
  detail::os::close_fd(fd);
}

bool is_hex(std::string_view text) {
  return text.find_first_not_of("0123456789abcdef") == std::string_view::npos;
}

constexpr std::size_t kStagingSuffixChars = 12;

// The create lock of one store path: an OFD lock on `<path>.create-lock`, held by whoever builds
// a staging directory for that path, for the whole create. So a staging directory whose
// creator does not hold the lock is dead (its creator was killed), and racing creators wait for
// the first instead of each allocating a whole store. The holder unlinks the file before
// releasing it; a waiter that then wins the lock on the unlinked file sees it is no longer the
// file at that path and starts over, so at most one process holds the lock of the path.
class CreateLock {
 public:
  explicit CreateLock(const std::string& store_path) : path_(store_path + ".create-lock") {
    for (;;) {
      fd_ = detail::os::open_or_create_file(path_);
      // A child forked meanwhile (by another thread) would hold the lock as long as it lives.
      detail::close_in_forked_child(fd_);
      try {
        detail::os::lock_exclusive(fd_, path_);
      } catch (...) {
        close_fd();
        throw;
      }
      if (detail::os::same_file(fd_, path_)) return;
      close_fd();  // Unlinked by the holder we waited for: take the new one.
    }
  }
  ~CreateLock() {
    // In a forked child no thread runs a create: this is the owner's.
    detail::os::remove_file(path_);
    close_fd();  // Drops the lock.
  }
  CreateLock(const CreateLock&) = delete;
  CreateLock& operator=(const CreateLock&) = delete;

 private:
  void close_fd() {
    detail::forget_in_forked_child(fd_);
    detail::os::close_fd(fd_);
  }
  std::string path_;
  int fd_ = -1;
};

bool is_staging_name(const std::string& name, const std::string& prefix) {
  return name.size() == prefix.size() + kStagingSuffixChars && name.starts_with(prefix) &&
         is_hex(std::string_view(name).substr(prefix.size()));
}

// A file system's root may hold lost+found (ext4): a mount point with nothing else is empty.
bool ignorable_in_empty_dir(const std::string& dir, const std::string& name) {
  return name == "lost+found" && detail::os::is_directory(dir + "/" + name);
}

// The files a new store is made of (build_in below), before any append.
bool is_new_store_file(const std::string& name) {
  return name == detail::kHeaderFileName || name == detail::kLockFileName ||
         name == detail::data_file_name(1) || name == detail::index_file_name(1);
}

// Under the create lock: every `<path>.creating.<hex>` directory beside `path` was left by a
// killed creator; so was a `.creating.<hex>` directory inside an empty directory at `path`
// (a mount point) when that directory holds nothing else and it holds only a new store's files:
// a directory of the user's is never touched.
void remove_stale_staging(const std::string& parent, const std::string& path) {
  const std::string beside = path.substr(path.rfind('/') + 1) + ".creating.";
  for (const std::string& name : detail::os::list_dir(parent)) {
    if (is_staging_name(name, beside)) detail::os::remove_tree(parent + "/" + name);
  }
  if (!detail::os::is_directory(path)) return;
  std::vector<std::string> stale;
  for (const std::string& name : detail::os::list_dir(path)) {
    if (ignorable_in_empty_dir(path, name)) continue;
    if (!is_staging_name(name, ".creating.")) return;
    for (const std::string& file : detail::os::list_dir(path + "/" + name)) {
      if (!is_new_store_file(file)) return;
    }
    stale.push_back(name);
  }
  for (const std::string& name : stale) detail::os::remove_tree(path + "/" + name);
}

// What is at `path` when rename(2) of the new store's directory onto it fails with ENOTDIR:
// a file, or a symbolic link (dangling or not), which the rename does not follow.
std::string not_a_directory(const std::string& path) {
  std::error_code error;
  if (!std::filesystem::is_symlink(std::filesystem::symlink_status(path, error))) {
    return "a file, not a directory";
  }
  const std::string target = std::filesystem::read_symlink(path, error).string();
  return (detail::os::exists(path) ? "a symbolic link to " + target + ", not a directory"
                                   : "a symbolic link to a missing target (" + target + ")") +
         " (a store is not made through a link: give the target's path, or remove the link)";
}

// Inside a catch handler, for an error met making a new store's files in a staging directory
// (`<path>.creating.<hex>`, or `.creating.<hex>` inside `path`) that the caller never heard of:
// rethrown naming the store `path` first, with the cause, the staging file only in parentheses
// ("n: cannot create the store: No space left on device (write n.creating.37ba438e01cc/header)"),
// same code and errno. kAlreadyExists (which names `path` already) unchanged.
[[noreturn]] void rethrow_naming_store(const std::string& path) {
  try {
    throw;
  } catch (const Error& e) {
    if (e.code() == ErrorCode::kAlreadyExists) throw;
    throw Error(e.code(),
                detail::cause_first(path, "cannot create the store", e.what(), e.sys_errno()),
                e.sys_errno());
  }
}

}  // namespace

void create_store(const std::string& path_in, const CreateOptions& options) {
  const std::string path = detail::strip_trailing_slashes(path_in);
  if (path.empty()) throw Error(ErrorCode::kInvalidArgument, "create: the store path is empty");
  try {
    detail::validate_create_params(options.dtype, options.dim, options.segment_bytes,
                                   options.metadata.size());
  } catch (const Error& error) {  // Named: which store's options.
    throw Error(error.code(), path + ": " + error.what());
  }
  const std::string header_path = path + "/" + detail::kHeaderFileName;
  if (detail::os::exists(header_path)) {
    throw Error(ErrorCode::kAlreadyExists, path + ": a store already exists here");
  }
  const std::string parent = parent_of(path);
  if (!detail::os::exists(parent)) {
    throw Error(ErrorCode::kNotFound, path + ": parent directory " + parent + " does not exist",
                ENOENT);
  }
  // A path under a regular file cannot exist, as Writer::open and Reader::open say (kNotFound),
  // rather than an I/O error from the first file made in it.
  if (!detail::os::is_directory(parent)) {
    throw Error(ErrorCode::kNotFound, path + ": " + parent + " is not a directory", ENOTDIR);
  }
  // The lock file is the first thing made beside the store: an error there (a read-only or
  // full file system, a directory the process may not write) is the create's.
  std::optional<CreateLock> create_lock;
  try {
    create_lock.emplace(path);
  } catch (const Error& error) {
    throw Error(error.code(), path + ": cannot create the store: " + error.what(),
                error.sys_errno());
  }
  remove_stale_staging(parent, path);
  // A racing creator may have finished while this one waited for the lock.
  if (detail::os::exists(header_path)) {
    throw Error(ErrorCode::kAlreadyExists, path + ": a store already exists here");
  }

  std::uint8_t store_id[16];
  detail::os::random_bytes(store_id, sizeof(store_id), path);
  std::string header = detail::encode_header(options.dtype, options.dim, options.segment_bytes,
                                             store_id, detail::os::unix_time_ns(), options.metadata,
                                             options.key_index ? 0 : detail::kFlagNoKeyIndex);
  // The store's files, made and flushed in the directory `dir`.
  const auto build_in = [&](const std::string& dir) {
    EMBSTORE_CRASH_POINT("create-staged");
    const detail::Layout layout = detail::decode_header(header, header.size(), dir);
    const std::uint64_t capacity =
        detail::capacity_for(0, layout.record_bytes, layout.segment_bytes, header.size());
    // The first allocation is made now, so the new store's state page says so from the start.
    detail::StatePage state;
    std::memcpy(&state, header.data() + detail::kStateOffset, sizeof(state));
    state.capacity_rows = capacity;
    detail::os::boot_id(state.boot_id);
    std::memcpy(header.data() + detail::kStateOffset, &state, sizeof(state));

    write_new_file(dir + "/" + detail::kHeaderFileName, header, 0);
    write_new_file(dir + "/" + detail::kLockFileName, "", 0);
    write_new_file(dir + "/" + detail::data_file_name(1), "", layout.data_bytes_for(capacity));
    EMBSTORE_CRASH_POINT("create-allocated");
    write_new_file(dir + "/" + detail::index_file_name(1), "",
                   detail::Layout::index_bytes_for(capacity));
    detail::os::sync_dir(dir);
    EMBSTORE_CRASH_POINT("create-before-rename");
  };
  std::uint8_t suffix[16];
  detail::os::random_bytes(suffix, sizeof(suffix), path);
  const std::string suffix_hex = detail::store_id_hex(suffix).substr(0, kStagingSuffixChars);
  // An empty directory at `path` that rename(2) cannot replace (a mount point: EBUSY): the store
  // is built in a hidden directory inside it, on its file system, and moved up, the header last
  // (move_store_into), so that the path holds a store only once every file is there.
  const auto create_inside = [&] {
    std::vector<std::string> names;
    for (const std::string& name : detail::os::list_dir(path)) {
      if (!ignorable_in_empty_dir(path, name)) names.push_back(name);
    }
    if (!names.empty()) {
      const bool leftovers = std::all_of(names.begin(), names.end(), is_new_store_file);
      std::string listed;
      for (const std::string& name : names) listed += (listed.empty() ? "" : ", ") + name;
      throw Error(ErrorCode::kAlreadyExists,
                  path + ": already exists and is not empty" +
                      (leftovers ? " (it holds " + listed +
                                       " but no header: what a create or import killed while "
                                       "moving a store in left; delete them to create one here)"
                                 : ""),
                  EEXIST);
    }
    const std::string inside = path + "/.creating." + suffix_hex;
    try {
      detail::os::make_dir(inside);
    } catch (...) {
      rethrow_naming_store(path);
    }
    try {
      build_in(inside);
      move_store_into(inside, path);  // Flushes `path` after each move; removes `inside`.
    } catch (...) {
      detail::os::remove_tree(inside);  // move_store_into removed what it had moved.
      rethrow_naming_store(path);
    }
  };
  // A mount point seen as such (another device than its parent's) is filled at once; one that
  // is not (a bind mount of the same file system) makes the rename below fail with EBUSY.
  if (detail::os::is_directory(path)) {
    const auto at = detail::os::file_id_at(path);
    const auto above = detail::os::file_id_at(parent);
    if (at && above && at->device != above->device) {
      create_inside();
      return;
    }
  }
  const std::string staging = path + ".creating." + suffix_hex;
  try {
    detail::os::make_dir(staging);
  } catch (...) {
    rethrow_naming_store(path);
  }
  int rename_error = 0;
  try {
    build_in(staging);
    // rename(2) replaces an empty directory but fails on a non-empty one: the store appears
    // whole or not at all, and two racing creators cannot both win.
    rename_error = detail::os::rename_path(staging, path);
    if (rename_error != 0 && rename_error != EBUSY) {
      throw Error(ErrorCode::kAlreadyExists,
                  path + ": already exists and is " +
                      (rename_error == ENOTDIR ? not_a_directory(path) : std::string("not empty")),
                  rename_error);
    }
  } catch (...) {
    detail::os::remove_tree(staging);
    rethrow_naming_store(path);
  }
  if (rename_error == EBUSY) {
    detail::os::remove_tree(staging);
    create_inside();
    return;
  }
  try {
    detail::os::sync_dir(parent);
  } catch (const Error& error) {
    // The rename has happened: the store exists and works, only its directory entry may not
    // survive a power loss. Say so, so a caller does not retry into "already exists".
    throw Error(error.code(),
                path + ": the store was created, but flushing its directory entry failed (" +
                    error.what() + "); it may vanish after a power loss",
                error.sys_errno());
  }
}

Reader open_with_info(const std::string& path, StoreInfo& info) {
  // The key statistics need the offset index mapped: a Reader's snapshot. The counters are read
  // after it is taken, and count the rows committed meanwhile too; then a Reader of exactly the
  // rows they count (ReaderOptions::max_rows) has the snapshot they describe, unless a truncate
  // came between (a new generation: its counters are read again).
  Reader reader = Reader::open(path);
  EMBSTORE_CRASH_POINT("info-opened");
  info = reader.info(InfoDetail::kState);
  constexpr int kAttempts = 100;
  for (int attempt = 1;
       reader.size() != info.committed_rows || reader.generation() != info.generation; ++attempt) {
    if (attempt == kAttempts) {
      throw Error(ErrorCode::kIO, path + ": the store was truncated " + std::to_string(kAttempts) +
                                      " times while its counters were read; try again");
    }
    ReaderOptions options;
    options.max_rows = info.committed_rows;
    reader = Reader::open(path, options);
    if (reader.size() != info.committed_rows || reader.generation() != info.generation) {
      info = reader.info(InfoDetail::kState);
    }
  }
  StoreInfo keys = reader.info(InfoDetail::kFull);
  info.distinct_keys = keys.distinct_keys;
  info.epochs = std::move(keys.epochs);
  info.key_index = std::move(keys.key_index);
  info.key_index_used = keys.key_index_used;
  return reader;
}

StoreInfo read_info(const std::string& path) {
  StoreInfo info;
  open_with_info(path, info);
  return info;
}

std::uint64_t read_generation(const std::string& path) {
  return detail::StoreFiles::read_generation(path);
}

}  // namespace embstore
