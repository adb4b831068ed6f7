// store_build.h — a new store filled from others (merge_stores, salvage) that appears at its
// path whole or not at all.
//
// The store is built in a hidden working directory beside its path, `.<name>.partial-<12 hex>`
// (the naming of the tool's compact, import and export), and renamed into place, never replacing
// anything, only once complete. A process killed while building leaves only that directory: it
// may hold a store that opens (whole, when killed just before the rename), and its name says
// it is unfinished; nothing removes it
// but the user (another process may still be building in it). Not thread-safe. A builder that
// reads stores calls embstore::refuse_output_inside() (store.h) before making its StoreBuild.
#pragma once

#include <cstdint>
#include <string>

#include "embstore/writer.h"

namespace embstore::detail {

class StoreBuild {
 public:
  // Creates the working directory next to `out`. Throws kAlreadyExists if something exists at
  // `out`, kNotFound if its parent directory does not exist, and otherwise the error of mkdir
  // (kReadOnly for a read-only file system or a directory this user may not write, say) naming
  // `out` and why its directory takes no new entry, never the working directory.
  explicit StoreBuild(const std::string& out);
  // Removes the working directory and everything in it, unless published.
  ~StoreBuild();
  StoreBuild(const StoreBuild&) = delete;
  StoreBuild& operator=(const StoreBuild&) = delete;

  // The working directory: create the new store here (create_store replaces an empty directory).
  const std::string& path() const { return path_; }
  // Where publish() puts it: `out` without trailing slashes.
  const std::string& out() const { return out_; }
  // Inside a catch handler, for an error met while building that names the working directory
  // or a file in or beside it: rethrows it naming `out` first (the user asked for `out` and has
  // never heard of the working directory), same code and errno, as the tool's export does
  // (tools/lib/export.h, rethrow_naming_output): "OUT: cannot write it: CAUSE (INNER)", CAUSE
  // the errno's text, INNER the message without it; a message that starts with the working
  // directory's path gets `out` in its place. Anything else unchanged.
  [[noreturn]] void rethrow_naming_out() const;
  // Closes `writer`, the store built here, holding `rows` rows, every one synced. When close()
  // throws with all `rows` rows committed and durable before it, the store is whole:
  // what failed is what a later writer redoes (Writer::close()'s "the key index could not be
  // maintained": derived data, FORMAT.md "keys.K"; close() gives it the code of its cause and
  // no way to tell it apart but its text), so the store is kept, and the error's message is
  // returned, naming `out` where it names the working directory, to be given as a warning once
  // published. Otherwise the error is thrown. "" when close() succeeded.
  std::string close_writer(Writer& writer, std::uint64_t rows) const;
  // Renames the working directory to `out` and flushes the parent directory; the store in it
  // must be closed. Throws kAlreadyExists, leaving `out` as it is, if something appeared there
  // meanwhile.
  void publish();

 private:
  std::string out_;
  std::string parent_;
  std::string path_;
  bool published_ = false;
};

}  // namespace embstore::detail
