// embstore/store.h — store-level operations and the description of a store.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "embstore/dtype.h"
#include "embstore/options.h"

namespace embstore {

// An epoch present in a store and how many rows carry it.
struct EpochRows {
  std::uint64_t epoch = 0;
  std::uint64_t rows = 0;
};

// A snapshot of a store's header and counters, as read at one moment.
struct StoreInfo {
  std::string path;
  int format_major = 0;
  int format_minor = 0;
  DType dtype = DType::kFloat32;
  std::uint32_t dim = 0;
  std::uint64_t record_bytes = 0;   // dim * dtype_size(dtype): bytes of one row.
  std::uint64_t segment_bytes = 0;  // Growth step of the data file.
  // CreateOptions::key_index, fixed at creation (format 1.4): whether writers keep a key index.
  bool keeps_key_index = true;
  std::string store_id;  // 32 lower-case hex digits, random at creation.
  std::int64_t created_unix_ns = 0;
  std::string metadata;
  std::uint64_t generation = 0;      // Which data/index files are current (see FORMAT.md).
  std::uint64_t committed_rows = 0;  // Visible to readers.
  std::uint64_t durable_rows = 0;    // Known to be on disk (a sync completed over them).
  // From a Reader, after a reboot no Writer has recovered the store from yet: the rows the
  // header still counts as committed that did not survive the reboot whole (from the first that
  // fails its checksum, with the rest of its batch, or past what the files hold). Rows a sync
  // did not cover, unless the files were damaged since (then synced rows may be among them). No
  // Reader shows them and the next Writer's open cuts them; committed_rows (and durable_rows)
  // leave them out, so they count what that Writer keeps. 0 otherwise.
  std::uint64_t rows_to_cut = 0;
  std::uint64_t capacity_rows = 0;  // Preallocated; appends beyond this grow the files.
  // Wall-clock (CLOCK_REALTIME) time of the latest commit in ns since the Unix epoch, as its
  // writer recorded it (format 1.3). 0: unknown (no commit yet, or only commits by libraries
  // older than 1.3, which leave it unchanged: after such a writer it is older than the truth).
  std::int64_t last_commit_unix_ns = 0;
  std::uint64_t data_file_bytes = 0;
  std::uint64_t index_file_bytes = 0;
  // From the key index (format 1.1), for the committed rows (a Reader's: its snapshot).
  std::uint64_t distinct_keys = 0;
  std::vector<EpochRows> epochs;  // Ascending epoch.
  // "keys.K, N rows indexed", or why lookups are answered by a scan of the offset index.
  std::string key_index;
  // True when the key statistics above (and lookups) come from the key index, false when from
  // a scan of the offset index.
  bool key_index_used = false;
};

// How much Reader::info() computes. kFull: everything, the key statistics included (a pass over
// the key table: milliseconds per million keys). kState: the header, counters and file sizes
// only, in constant time; distinct_keys, epochs, key_index and key_index_used stay empty (for
// callers that poll, such as a live dashboard).
enum class InfoDetail { kFull, kState };

// Creates an empty store at `path`, which must not exist (or be an empty directory). The store
// appears whole or not at all: it is built beside `path` and renamed into place, or, in an empty
// directory that cannot be replaced (a mount point; a lost+found in it counts as empty), built in
// a hidden `.creating.<hex>` directory inside it and moved up, the header last (move_store_into).
// A create killed while building there leaves that directory, which the next create at `path`
// removes; one killed while moving leaves some files and no header, which the next create
// names for the user to delete. Throws
// kAlreadyExists if a store (or any non-empty directory) is there, kInvalidArgument for bad
// options, kNotFound when its parent directory does not exist or is not a directory. It makes
// a store on a network or FUSE file system too, where writers refuse it: Writer::create() (and
// embstore create) first call Writer::check_filesystem().
void create_store(const std::string& path, const CreateOptions& options);

// Whether two stores' metadata say the same: equal text, or both JSON of equal value (the same
// object written with other spacing or key order, as ranks serialising one config may). The
// rule of every tool that requires the same metadata (merge_stores, the CLI's import).
bool same_metadata(const std::string& a, const std::string& b);

// kInvalidArgument, naming both, when `out` (a new store or file about to be made) lies inside
// the store directory `store`, or is it: a tool that only reads the store must not write into it
// (its next Writer removes files it does not know: FORMAT.md, "The store directory"). Both
// resolved as far as they exist (symbolic links, "..", a relative path), and the store's
// directory also recognised under another name (a bind mount). An `out` that already exists
// is left to the caller, which refuses it as such. The rule of every tool that reads a store
// and writes elsewhere (compact, export, merge_stores, salvage, the CLI's get --npy).
void refuse_output_inside(const std::string& out, const std::string& store);

// Moves the closed new store built in `built` (a directory inside the empty directory `dir`, on
// its file system: a mounted volume, which cannot be replaced) up into `dir`, never replacing
// anything: the lock, data and index files first (a store made in `dir` meanwhile stops the
// move before anything is moved: kAlreadyExists naming `dir`), then the rest, the header last,
// so that `dir` holds a store only once every file is there; each move is flushed, and `built`
// is removed after. On failure what was moved is removed again. A kill during the moves leaves
// some files, never the header, beside `built` (FORMAT.md, "The store directory"). The rule of
// every import into an empty directory (the CLI's, embstore.io's).
void move_store_into(const std::string& built, const std::string& dir);

// Reads the header, counters and key statistics without taking any lock or writing anything,
// all of one moment: the epochs and distinct keys are those of exactly the committed_rows rows
// (open_with_info() in reader.h).
StoreInfo read_info(const std::string& path);

// The store's generation now, as StoreInfo::generation (FORMAT.md "Truncate"), read without any
// lock and without opening the store: a cheap poll for a truncate. Checks only that the header
// is long enough (kCorruption); kNotFound when `path` has no header file.
std::uint64_t read_generation(const std::string& path);

}  // namespace embstore
