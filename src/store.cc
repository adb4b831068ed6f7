// create_store and read_info: store-level operations (read_info reads through a Reader).
#include "embstore/store.h"

#include <cstring>

#include "embstore/error.h"
#include "embstore/reader.h"
#include "format/format.h"
#include "platform/os.h"
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

}  // namespace

void create_store(const std::string& path_in, const CreateOptions& options) {
  const std::string path = detail::strip_trailing_slashes(path_in);
  if (path.empty()) throw Error(ErrorCode::kInvalidArgument, "create: the store path is empty");
  detail::validate_create_params(options.dtype, options.dim, options.segment_bytes,
                                 options.metadata.size());
  if (detail::os::exists(path + "/" + detail::kHeaderFileName)) {
    throw Error(ErrorCode::kAlreadyExists, path + ": a store already exists here");
  }
  const std::string parent = parent_of(path);
  if (!detail::os::exists(parent)) {
    throw Error(ErrorCode::kNotFound, path + ": parent directory " + parent + " does not exist",
                ENOENT);
  }

  std::uint8_t store_id[16];
  detail::os::random_bytes(store_id, sizeof(store_id), path);
  std::uint8_t suffix[16];
  detail::os::random_bytes(suffix, sizeof(suffix), path);
  const std::string staging = path + ".creating." + detail::store_id_hex(suffix).substr(0, 12);
  detail::os::make_dir(staging);
  try {
    const std::uint64_t record_bytes = std::uint64_t{options.dim} * dtype_size(options.dtype);
    const std::uint64_t capacity = options.segment_bytes / record_bytes;
    std::string header =
        detail::encode_header(options.dtype, options.dim, options.segment_bytes, store_id,
                              detail::os::unix_time_ns(), options.metadata);
    // The first segment is allocated now, so the new store's state page says so from the start.
    detail::StatePage state;
    std::memcpy(&state, header.data() + detail::kStateOffset, sizeof(state));
    state.capacity_rows = capacity;
    detail::os::boot_id(state.boot_id);
    std::memcpy(header.data() + detail::kStateOffset, &state, sizeof(state));

    write_new_file(staging + "/" + detail::kHeaderFileName, header, 0);
    write_new_file(staging + "/" + detail::kLockFileName, "", 0);
    write_new_file(staging + "/" + detail::data_file_name(1), "", options.segment_bytes);
    write_new_file(staging + "/" + detail::index_file_name(1), "",
                   detail::Layout::index_bytes_for(capacity));
    detail::os::sync_dir(staging);
    // rename(2) replaces an empty directory but fails on a non-empty one: the store appears
    // whole or not at all, and two racing creators cannot both win.
    if (detail::os::rename_path(staging, path) != 0) {
      throw Error(ErrorCode::kAlreadyExists, path + ": already exists and is not empty");
    }
  } catch (...) {
    detail::os::remove_tree(staging);
    throw;
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

StoreInfo read_info(const std::string& path) {
  // The key statistics need the offset index mapped: a Reader's snapshot of the committed rows.
  return Reader::open(path).info();
}

}  // namespace embstore
