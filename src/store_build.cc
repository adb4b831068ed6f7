#include "store_build.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <vector>

#include "embstore/error.h"
#include "embstore/store.h"
#include "format/format.h"
#include "platform/os.h"
#include "storage/store_files.h"

namespace embstore::detail {
namespace {

// Why no entry can be made in the directory `parent` (errno `err` of mkdir there).
std::string why_no_entry(const std::string& parent, int err) {
  const std::string dir =
      parent == "." ? std::string("the current directory") : "its directory " + parent;
  switch (err) {
    case ENOTDIR:
      return parent + " is not a directory";
    case EROFS:
      return dir + " is on a read-only file system";
    case EACCES:
    case EPERM:
      return dir + " does not let this user create files in it (" + std::strerror(err) + ")";
    default:
      return "cannot create an entry in " + parent + ": " + std::strerror(err);
  }
}

}  // namespace

StoreBuild::StoreBuild(const std::string& out) : out_(strip_trailing_slashes(out)) {
  if (out_.empty()) throw Error(ErrorCode::kInvalidArgument, "the output path is empty");
  // A symbolic link counts, dangling or not: the rename that publishes would fail on it only
  // after every row was copied.
  if (os::entry_exists(out_)) {
    throw Error(ErrorCode::kAlreadyExists, out_ + ": already exists");
  }
  const auto slash = out_.rfind('/');
  parent_ = slash == std::string::npos ? "." : slash == 0 ? "/" : out_.substr(0, slash);
  if (!os::exists(parent_)) {
    throw Error(ErrorCode::kNotFound, out_ + ": parent directory " + parent_ + " does not exist",
                ENOENT);
  }
  const std::string name = slash == std::string::npos ? out_ : out_.substr(slash + 1);
  std::uint8_t suffix[16];
  os::random_bytes(suffix, sizeof(suffix), out_);
  path_ = (parent_ == "/" ? "/" : parent_ + "/") + "." + name + ".partial-" +
          store_id_hex(suffix).substr(0, 12);
  // make_dir, not mkdtemp: the published store gets the mode a created store has (0755 less
  // the umask), not mkdtemp's 0700.
  try {
    os::make_dir(path_);
  } catch (const Error& e) {
    if (e.code() == ErrorCode::kAlreadyExists) throw;
    // Named as the output the user asked for, with why its directory takes no new entry (in
    // the words of the tool's export and compact, tools/lib/export.cc): the user has never
    // heard of the working directory, which a read-only or full file system never let exist.
    throw Error(e.code(), out_ + ": cannot write it: " + why_no_entry(parent_, e.sys_errno()),
                e.sys_errno());
  }
}

StoreBuild::~StoreBuild() {
  if (!published_) os::remove_tree(path_);
}

void StoreBuild::rethrow_naming_out() const {
  try {
    throw;
  } catch (const Error& e) {
    const std::string message = e.what();
    const std::size_t at = message.find(path_);
    if (at == std::string::npos) throw;
    const std::size_t after = at + path_.size();
    // A message that starts with the working directory's path (create_store's "PATH: cannot
    // create the store: ...", made absolute or not) names `out` in its place. Any other names a
    // file in it or beside it (create_store's `<path>.creating.<hex>`) that `out` never holds
    // under that name: `out` and the cause first, that file only in parentheses.
    if (message.compare(after, 2, ": ") == 0 && message.find(' ') > at) {
      throw Error(e.code(), out_ + message.substr(after), e.sys_errno());
    }
    const int err = e.sys_errno();
    if (err == 0) throw Error(e.code(), out_ + ": cannot write it: " + message, err);
    const std::string reason = std::strerror(err);
    std::string detail = message;
    if (detail.ends_with(": " + reason)) detail.resize(detail.size() - reason.size() - 2);
    throw Error(e.code(), out_ + ": cannot write it: " + reason + " (" + detail + ")", err);
  }
}

std::string StoreBuild::close_writer(Writer& writer, std::uint64_t rows) const {
  // Judged by the state of the store, not by which error close() threw (the tool's
  // close_new_store, tools/lib/export.h, judges the same way): every row committed and on the
  // device before close() (no other writer knows the working directory), which nothing close()
  // does can take back. Read before, not after with a Reader: what close() ran out of (address
  // space, open files) a Reader needs too.
  const bool whole = writer.committed_rows() == rows && writer.durable_rows() == rows;
  try {
    writer.close();
    return {};
  } catch (const Error& e) {
    if (!whole) throw;
    std::string message = e.what();
    for (std::size_t at = message.find(path_); at != std::string::npos;
         at = message.find(path_, at + out_.size())) {
      message.replace(at, path_.size(), out_);
    }
    return message;
  }
}

void StoreBuild::publish() {
  if (os::rename_no_replace(path_, out_) != 0) {
    throw Error(ErrorCode::kAlreadyExists, out_ + ": already exists (the new store was removed)");
  }
  published_ = true;
  try {
    os::sync_dir(parent_);
  } catch (const Error& error) {
    // As create_store: the store exists and works, only its directory entry may not survive a
    // power loss. Say so, so a caller does not retry into "already exists".
    throw Error(error.code(),
                out_ + ": the store was created, but flushing its directory entry failed (" +
                    error.what() + "); it may vanish after a power loss",
                error.sys_errno());
  }
}

}  // namespace embstore::detail

namespace embstore {

void move_store_into(const std::string& built, const std::string& dir) {
  namespace os = detail::os;
  std::vector<std::string> names = os::list_dir(built);
  // The files every new store has first, the header last (format/format.h's names).
  auto rank = [](const std::string& name) {
    if (name == detail::kHeaderFileName) return 2;
    const bool always = name == detail::kLockFileName || name == detail::data_file_name(1) ||
                        name == detail::index_file_name(1);
    return always ? 0 : 1;
  };
  std::stable_sort(names.begin(), names.end(),
                   [&](const std::string& a, const std::string& b) { return rank(a) < rank(b); });
  std::vector<std::string> moved;
  try {
    for (const std::string& name : names) {
      if (os::rename_no_replace(built + "/" + name, dir + "/" + name) != 0) {
        throw Error(ErrorCode::kAlreadyExists,
                    dir + ": another store was made in this directory meanwhile (" + name +
                        " is there); the new store's files were not moved into it");
      }
      moved.push_back(name);
      os::sync_dir(dir);
    }
  } catch (...) {
    for (const std::string& name : moved) os::remove_tree(dir + "/" + name);
    throw;
  }
  os::remove_tree(built);
}

void refuse_output_inside(const std::string& out, const std::string& store_dir) {
  using detail::strip_trailing_slashes;
  namespace os = detail::os;
  // An `out` that exists is refused as such by the caller (the plainer message).
  if (os::entry_exists(strip_trailing_slashes(out))) return;
  // Both resolved as far as they exist (symbolic links, "..", a relative path). `out` made
  // absolute first: weakly_canonical leaves a relative path whose first part does not exist
  // relative ("out" with the working directory inside the store), and it would match nothing.
  std::error_code ec;
  const auto inside = std::filesystem::weakly_canonical(
      std::filesystem::absolute(strip_trailing_slashes(out), ec), ec);
  const auto store = std::filesystem::weakly_canonical(store_dir, ec);
  if (ec) return;  // A source that cannot be resolved fails on its own when it is opened.
  auto s = store.begin();
  auto i = inside.begin();
  for (; s != store.end() && i != inside.end() && *s == *i; ++s, ++i) {
  }
  bool within = s == store.end() || (std::next(s) == store.end() && s->empty());
  // The store under another name (a bind mount): an ancestor of `out` that is its directory.
  for (auto p = inside; !within; p = p.parent_path()) {
    within = os::same_entry(p.string(), store.string());
    if (p == p.parent_path()) break;
  }
  if (within) {
    throw Error(ErrorCode::kInvalidArgument, strip_trailing_slashes(out) + ": inside the store " +
                                                 store_dir +
                                                 ", which is only read: give an output outside it");
  }
}

}  // namespace embstore
