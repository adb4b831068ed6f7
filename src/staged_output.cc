#include "embstore/staged_output.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <vector>

#include "embstore/error.h"
#include "embstore/store.h"
#include "embstore/writer.h"
#include "format/format.h"
#include "platform/os.h"
#include "storage/store_files.h"

namespace embstore {
namespace {

namespace os = detail::os;

// Why `out` cannot be made: its directory `parent` takes no new entry (errno `err` of mkdir
// there), in the user's terms. `inside`: `out` itself is that directory (kStoreInside).
std::string why_no_entry(const std::string& out, const std::string& parent, bool inside, int err) {
  const std::string dir = inside          ? std::string("it")
                          : parent == "." ? std::string("the current directory")
                                          : "its directory " + parent;
  switch (err) {
    case ENOENT:
      return dir + " does not exist";
    case ENOTDIR:
      return (inside ? out : parent) + " is not a directory";
    case EROFS:
      return dir + " is on a read-only file system";
    case EACCES:
    case EPERM:
      return dir + " does not let this user create files in it (" + std::strerror(err) + ")";
    default:
      return "cannot create a working directory in " + parent + ": " + std::strerror(err);
  }
}

}  // namespace

void StagedOutput::require_absent(const std::string& out_in) {
  const std::string out = detail::strip_trailing_slashes(out_in);
  if (out.empty()) throw Error(ErrorCode::kInvalidArgument, "the output path is empty");
  // A symbolic link counts, dangling or not: the rename that publishes would fail on it only
  // after every row was written.
  if (os::entry_exists(out)) throw Error(ErrorCode::kAlreadyExists, out + ": already exists");
}

StagedOutput::StagedOutput(const std::string& out, OutputShape shape)
    : out_(detail::strip_trailing_slashes(out)), shape_(shape) {
  const bool inside = shape == OutputShape::kStoreInside;
  if (out_.empty()) throw Error(ErrorCode::kInvalidArgument, "the output path is empty");
  if (!inside) require_absent(out_);
  const auto slash = out_.rfind('/');
  parent_ = slash == std::string::npos ? "." : slash == 0 ? "/" : out_.substr(0, slash);
  const std::string name = slash == std::string::npos ? out_ : out_.substr(slash + 1);
  const std::string where = inside ? out_ : parent_;
  // At most 200 bytes of the name (cut before a UTF-8 continuation byte), so that the hidden
  // name, 22 bytes longer, fits in NAME_MAX (255) for any name `out` may have.
  std::size_t kept = std::min<std::size_t>(name.size(), 200);
  while (kept > 0 && kept < name.size() && (name[kept] & 0xC0) == 0x80) --kept;
  std::uint8_t suffix[16];
  os::random_bytes(suffix, sizeof(suffix), out_);
  dir_ = (where == "/" ? "/" : where + "/") + "." +
         (inside ? std::string("store") : name.substr(0, kept)) + ".partial-" +
         detail::store_id_hex(suffix).substr(0, 12);
  // mkdir, not mkdtemp: the published output gets the mode of any new directory (0777 less the
  // umask, as mkdir(1) gives), not mkdtemp's 0700, so that other users and services can read it
  // as they read its sources.
  if (::mkdir(dir_.c_str(), 0777) != 0) {
    const int err = errno;
    if (err == EEXIST) {  // 48 random bits taken: another builder's, never touched.
      throw Error(ErrorCode::kAlreadyExists, dir_ + ": already exists", err);
    }
    throw Error(error_code_for_write_errno(err),
                out_ + ": cannot write it: " + why_no_entry(out_, where, inside, err), err);
  }
  path_ = shape == OutputShape::kFile ? dir_ + "/" + name : dir_;
}

StagedOutput::~StagedOutput() { discard(); }

void StagedOutput::discard() noexcept {
  if (published_ || removed_) return;
  os::remove_tree(dir_);
  removed_ = true;
}

std::string StagedOutput::naming_out(const std::string& message, int err) const {
  // path() first: a kFile's "DIR/NAME: ..." names the output itself.
  for (const std::string* named : {&path_, &dir_}) {
    const std::size_t at = message.find(*named);
    if (at == std::string::npos) continue;
    const std::size_t after = at + named->size();
    // A message that starts with the path ("PATH: cannot create the store: ...", made absolute
    // or not) names `out` in its place. Any other names a file in the working directory or
    // beside it that `out` never holds under that name: `out` and the cause first.
    if (*named == path_ && message.compare(after, 2, ": ") == 0 && message.find(' ') > at) {
      return out_ + message.substr(after);
    }
    return detail::cause_first(out_, "cannot write it", message, err);
  }
  return {};
}

void StagedOutput::rethrow_naming_out() const {
  try {
    throw;
  } catch (const Error& e) {
    const std::string named = naming_out(e.what(), e.sys_errno());
    if (named.empty()) throw;
    throw Error(e.code(), named, e.sys_errno());
  }
}

std::string StagedOutput::close_store(std::uint64_t rows, std::uint64_t committed,
                                      std::uint64_t durable,
                                      const std::function<void()>& close) const {
  // Every row committed and on the device before close() (no other writer knows the working
  // directory): nothing close() does can take that back.
  const bool whole = committed == rows && durable == rows;
  try {
    close();
    return {};
  } catch (const Error& e) {
    if (!whole) throw;
    // Published next, the store is at `out`: every mention of the working directory names it.
    std::string message = e.what();
    for (std::size_t at = message.find(dir_); at != std::string::npos;
         at = message.find(dir_, at + out_.size())) {
      message.replace(at, dir_.size(), out_);
    }
    return message;
  }
}

Writer StagedOutput::create_writer(const CreateOptions& create,
                                   const WriterOptions& options) const {
  create_store(path(), create);
  return Writer::open(path(), options);
}

std::string StagedOutput::close_writer(Writer& writer, std::uint64_t rows) const {
  return close_store(rows, writer.committed_rows(), writer.durable_rows(),
                     [&writer] { writer.close(); });
}

void StagedOutput::publish() {
  if (published_ || removed_) {
    throw Error(ErrorCode::kInvalidArgument, out_ +
                                                 ": the output was already published or "
                                                 "discarded");
  }
  if (shape_ == OutputShape::kStoreInside) {
    try {
      move_store_into(dir_, out_);  // Flushes `out` after each move; removes the directory.
    } catch (const Error& e) {
      // A store whose header was moved in stays (only flushing its entries failed: the error
      // says so); any other failure left `out` as it was, and the working directory goes.
      published_ = !os::exists(dir_ + "/" + detail::kHeaderFileName);
      discard();
      if (published_ || e.code() == ErrorCode::kAlreadyExists) throw;  // Both name `out`.
      // A move or a flush of `out` ("fsync OUT: ..."): `out` and the cause first.
      throw Error(e.code(), detail::cause_first(out_, "cannot write it", e.what(), e.sys_errno()),
                  e.sys_errno());
    } catch (...) {
      discard();
      throw;
    }
    published_ = true;
    return;
  }
  int renamed;
  try {
    renamed = os::rename_no_replace(path_, out_);
  } catch (...) {
    discard();
    rethrow_naming_out();  // "OUT: cannot write it: CAUSE (rename WORKING -> OUT)".
  }
  if (renamed != 0) {
    discard();
    throw Error(ErrorCode::kAlreadyExists, out_ + ": already exists (the new output was removed)",
                EEXIST);
  }
  published_ = true;
  if (shape_ == OutputShape::kFile) os::remove_tree(dir_);  // Empty now.
  try {
    os::sync_dir(parent_);
  } catch (const Error& error) {
    // As create_store: the output exists, only its directory entry may not survive a power
    // loss. Said, so that a caller does not retry into "already exists".
    throw Error(error.code(),
                out_ + ": it was made, but flushing its directory entry failed (" + error.what() +
                    "); it may vanish after a power loss",
                error.sys_errno());
  }
}

}  // namespace embstore

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
      try {
        os::sync_dir(dir);
      } catch (const Error& error) {
        if (name != detail::kHeaderFileName) throw;
        // The header is in: the store is whole and opens, only its entries may not survive a
        // power loss. Kept, and said, so that a caller does not take it for a failure and
        // append every row again.
        os::remove_tree(built);
        throw Error(error.code(),
                    dir + ": the store was made, but flushing its directory entries failed (" +
                        error.what() + "); it may vanish after a power loss",
                    error.sys_errno());
      }
    }
  } catch (const Error& error) {
    if (!moved.empty() && moved.back() == detail::kHeaderFileName) throw;  // Whole: kept.
    // Files, never the header: the directory holds no store again, as it did.
    for (const std::string& name : moved) os::remove_file(dir + "/" + name);
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
