// staged_output.h — a new output (a store, a directory of files, one file) that appears at its
// path whole or not at all.
//
// The one place this rule lives: every command and function that makes a new output builds it
// through a StagedOutput (the CLI's import, compact, export, get --npy, salvage and merge; the
// library's salvage_store() and merge_stores(); Python's embstore.io functions). What it
// promises, to the user who named `out` and to every process that looks there:
//
//   - Nothing is at `out` until publish(): the output is built in a hidden working directory
//     `.NAME.partial-<12 hex>` beside `out` (the same file system, so one rename publishes it),
//     or, for a new store in an existing empty directory (kStoreInside: a mounted volume, which
//     a rename cannot replace), `.store.partial-<12 hex>` inside it.
//   - publish() puts it there in one rename that never replaces anything (kStoreInside: the
//     store's files moved up, the header last: move_store_into() in store.h), then flushes the
//     directory entry. Something that appeared at `out` meanwhile is left as it is.
//   - Destroyed unpublished (an error, an exception of the caller's), the working directory and
//     everything in it are removed. A process killed while building leaves only the working
//     directory, which may hold a store that opens and whose name says it is unfinished;
//     nothing removes it but the user (another process may still be building in it).
//   - Errors name `out`, the path the user asked for, never the working directory alone: the
//     constructor's say why `out`'s directory takes no new entry; errors met while building are
//     renamed by naming_out() / rethrow_naming_out().
//   - A new store whose Writer::close() failed after every row was committed and on the device
//     is kept (close_store()): what failed is derived data the next writer rebuilds.
//
// Not thread-safe. A caller that reads stores calls refuse_output_inside() (store.h) before
// making its StagedOutput: the working directory would otherwise be made inside the store.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace embstore {

class Writer;
struct CreateOptions;
struct WriterOptions;

enum class OutputShape {
  kDirectory,    // path() is an empty directory to fill (a new store: create_store takes it).
  kFile,         // path() is the name of one file to create in the working directory.
  kStoreInside,  // `out` is an existing empty directory; path() is an empty directory inside it
                 // for a new store, whose files publish() moves up into `out`.
};

class StagedOutput {
 public:
  // Makes the working directory (mode 0777 less the umask, as mkdir(1) gives, which a
  // published directory of files keeps; a store made in it by create_store gets that call's
  // 0755 less the umask). Throws what require_absent() throws (kDirectory, kFile), and
  // otherwise "OUT: cannot write it: WHY", WHY being what keeps `out`'s directory from taking
  // an entry (it does not exist, is not a directory, is on a read-only file system, does not
  // let this user create files in it), with the code of the errno
  // (error_code_for_write_errno(): kNotFound, kReadOnly, ...). Trailing slashes of `out` are
  // dropped. The working directory's name holds at most the first 200 bytes of `out`'s name,
  // so that any name a file may have can be staged.
  explicit StagedOutput(const std::string& out, OutputShape shape = OutputShape::kDirectory);
  // kInvalidArgument for an empty `out`; kAlreadyExists ("OUT: already exists") when something,
  // a dangling symbolic link too, is at `out`. The constructor's first check, for a caller to
  // make before slower work (opening a store, scanning its rows), so that the user hears of an
  // existing output first and a kill during that work leaves nothing behind.
  static void require_absent(const std::string& out);
  // Removes the working directory and everything in it, unless published.
  ~StagedOutput();
  StagedOutput(const StagedOutput&) = delete;
  StagedOutput& operator=(const StagedOutput&) = delete;

  // Where to build: an empty directory, or (kFile) a file name in the working directory.
  const std::string& path() const { return path_; }
  // Where publish() puts it: `out` without trailing slashes.
  const std::string& out() const { return out_; }
  // The hidden working directory (path() itself unless kFile).
  const std::string& working_dir() const { return dir_; }
  bool published() const { return published_; }

  // `message`, of an error met while building, with errno `err` (0 if none), as the user
  // should read it, or "" when it names neither path() nor the working directory. A message
  // that starts with one of them followed by ": " ("PATH: cannot create the store: ...") gets
  // `out` in its place; any other names a file in or beside the working directory that `out`
  // never holds under that name, so `out` and the cause come first and the message only in
  // parentheses: "OUT: cannot write it: CAUSE (MESSAGE without its ': CAUSE')", CAUSE the
  // errno's text ("OUT: cannot write it: MESSAGE" without an errno).
  std::string naming_out(const std::string& message, int err) const;
  // Inside a catch handler: an Error rethrown as naming_out() names it (same code and errno);
  // anything else, and an Error it leaves as it is, rethrown unchanged.
  [[noreturn]] void rethrow_naming_out() const;

  // Closes the new store built here, holding `rows` rows, all of them synced: `close` is its
  // Writer's close() (or a binding's), `committed` and `durable` that Writer's counts read
  // just before. When close() throws with every row committed and on the device before it (no
  // other writer knows the working directory), the store is whole: what failed is what a later
  // writer redoes (Writer::close()'s "the key index could not be maintained": derived data,
  // FORMAT.md "keys.K"; close() gives it the code of its cause and no way to tell it apart but
  // its text). The store is then kept, and the error's message is returned as naming_out()
  // renames it (the working directory's path replaced by `out`), to be given as a warning once
  // published. Otherwise the error is thrown, for the caller to discard the output. "" when
  // close() succeeded. Judged by the state read before, not after with a Reader: what close()
  // ran out of (address space, open files) a Reader needs too.
  std::string close_store(std::uint64_t rows, std::uint64_t committed, std::uint64_t durable,
                          const std::function<void()>& close) const;
  // close_store() of `writer`.
  std::string close_writer(Writer& writer, std::uint64_t rows) const;
  // The new store's Writer (OutputShape kDirectory or kStoreInside): the store made at path() by
  // create_store() and opened by Writer::open(), not by Writer::create(), whose advice on a
  // store it made but could not open would name the working directory, which is removed.
  Writer create_writer(const CreateOptions& create, const WriterOptions& options) const;

  // Puts the output at `out` (what is built must be closed) and flushes `out`'s directory.
  // Throws kAlreadyExists ("OUT: already exists"), removing the output, when something appeared
  // at `out` meanwhile (kStoreInside: a store made in it meanwhile, `out` left as it was); any
  // other failure of the rename or the moves, named as naming_out() names it, also leaves `out`
  // as it was and removes the output. An error flushing the directory entry once the output is
  // there (kStoreInside: once its header is) keeps it, and says it was made but may vanish
  // after a power loss: published() is then true.
  void publish();
  // Removes the working directory now (as the destructor does); idempotent.
  void discard() noexcept;

 private:
  std::string out_;
  std::string parent_;  // The directory the published output's entry is in.
  std::string dir_;
  std::string path_;
  OutputShape shape_;
  bool published_ = false;
  bool removed_ = false;
};

}  // namespace embstore
