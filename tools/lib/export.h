// export.h — writing a store's rows out as .npy files, an HDF5 file or CSV.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "embstore/embstore.h"
#include "rows.h"

namespace embstore::tools {

enum class ExportFormat { kNpy, kHdf5, kCsv };

// File names inside an npy export directory.
inline constexpr const char* kNpyVectorsFile = "vectors.npy";
inline constexpr const char* kNpyKeysFile = "keys.npy";
inline constexpr const char* kNpyEpochsFile = "epochs.npy";
// JSON sidecar naming the dtype (bfloat16 travels as uint16), dim, rows, store id, metadata.
inline constexpr const char* kNpySidecarFile = "embstore.json";
// Value of the sidecar's (and the HDF5 file's) "embstore_format" field.
inline constexpr const char* kExportFormatName = "embstore-export-1";

struct ExportOptions {
  ExportFormat format = ExportFormat::kNpy;
  RowSelection selection;
  ProgressFn progress;  // Rows written out of the rows selected.
};

struct ExportResult {
  std::uint64_t rows = 0;
  std::uint64_t bytes = 0;  // Row payload written.
};

// Writes the selected rows of `reader`'s snapshot to `out`: a directory of vectors.npy,
// keys.npy, epochs.npy and embstore.json (kNpy), one HDF5 file (kHdf5) or one CSV file with
// columns row,key,epoch,v0..v{dim-1} (kCsv). Streams: memory does not grow with the store
// (except a map of keys for latest_per_key). Every row's checksum is verified on the way
// (kCorruption naming the row, key and epoch). The output appears whole or not at all: it is
// written under a hidden sibling name and renamed into place. Throws kAlreadyExists if `out`
// exists.
ExportResult export_store(const Reader& reader, const std::string& out,
                          const ExportOptions& options);

// Creates a hidden working directory `.NAME.partial-XXXXXX` next to `out` (same file system, so
// a rename publishes), or with `inside`, `.store.partial-XXXXXX` inside `out` (an existing empty
// directory that the output is moved into). When it cannot, the error names `out` and what
// keeps it from being written there ("nodir/x.npy: cannot write it: its directory nodir does
// not exist"), with the code of the errno (kNotFound, kReadOnly, ...).
std::string make_partial_dir(const std::string& out, bool inside = false);
// Inside a catch handler of `e`, met while writing `working` (the hidden path renamed to `out`
// when complete): rethrows it naming `out` first (the user asked for `out` and has never heard
// of `working`), with the same code and errno: "OUT: cannot write it: CAUSE (INNER)", CAUSE the
// errno's text, INNER the message without it, so the file in the working directory shows only
// in parentheses ("out.emb: cannot write it: No space left on device (fallocate
// ./.out.emb.partial-Xy12Zw/rows.1)"); a message that starts with `working` ("PATH: cannot
// create the store: ...") gets `out` in its place. Unchanged if it does not name `working`.
[[noreturn]] void rethrow_naming_output(const Error& e, const std::string& working,
                                        const std::string& out);
// Inside any catch handler: rethrow_naming_output() for an Error, the exception as it is else.
[[noreturn]] void rethrow_naming_output_if_error(const std::string& working,
                                                 const std::string& out);
// Writes one file at `out`, whole or not at all: `write` fills a file in a hidden working
// directory beside `out`, which is renamed to `out` once `write` returns, and removed (with the
// directory) when anything throws; errors name `out` (rethrow_naming_output()). kAlreadyExists
// if `out` exists.
void write_file_aside(const std::string& out, const std::function<void(const std::string&)>& write);
// Closes `writer`, a new store built in `working` for `out` with `rows` rows, all of them synced.
// When close() throws with all `rows` rows committed and durable before it, the store is
// whole: what failed is only what a later writer redoes (the key index, derived data:
// FORMAT.md "keys.K", rebuilt by the next writer; Writer::close() reports it with the code of
// its cause and no way to tell it apart but the message), so the output is kept, and the
// error's message is returned, naming `out` where it names `working`, for the caller to
// publish the store and then warn with it. Otherwise the error is thrown (the caller discards
// the output). "" when close() succeeded.
std::string close_new_store(Writer& writer, const std::string& working, const std::string& out,
                            std::uint64_t rows);
// Renames `from` to `to`, failing with kAlreadyExists instead of replacing anything at `to`.
void rename_no_replace(const std::string& from, const std::string& to);
// Throws kAlreadyExists when something exists at `out`.
void require_absent(const std::string& out);

}  // namespace embstore::tools
