// embstore/shard_set.h — several stores (one per node) read as one, their manifest, and merging
// them into one store.
//
// Under torch.distributed each node writes its own store on its own local disk (a Writer
// refuses network file systems: embstore.h, "Caveats"). A manifest (JSON) lists those shards;
// a ShardSet reads them as one logical store; merge_stores() consolidates them into one.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "embstore/dtype.h"
#include "embstore/options.h"
#include "embstore/reader.h"

namespace embstore {

// What a manifest says about one shard, as of the last time it was written.
struct ManifestShard {
  // Relative to the manifest's directory; never absolute and never through "..".
  std::string path;
  std::string store_id;               // StoreInfo::store_id of the shard.
  std::uint64_t rows = 0;             // Committed rows then.
  std::vector<std::uint64_t> epochs;  // Epochs present then, ascending, each once.
  // The shard's generation then (StoreInfo::generation; 0: not recorded, as by manifests
  // before this field). A shard of another generation now was truncated since (a resume from a
  // checkpoint): it may hold fewer rows than `rows`, and ShardSet::open takes it as it is.
  std::uint64_t generation = 0;
};

// A manifest: a JSON file (format below) describing a set of shards with one dim and dtype.
//   {"embstore_manifest": 1, "dim": 768, "dtype": "float16", "metadata": "<text>",
//    "shards": [{"path": "node-0", "store_id": "<32 hex>", "rows": 1024, "epochs": [0, 1],
//                "generation": 1}]}
// ("generation" optional: manifests written before it have none; "metadata" optional.)
// Each object gives each field once.
struct Manifest {
  std::uint32_t dim = 0;
  DType dtype = DType::kFloat32;
  // The set's metadata text, and a merged store's: the recorder writes the one its shards were
  // created with; for shards of different metadata, the one a merge should keep. Empty (or no
  // field): none given, the set's is its shards' (ShardSet::metadata()).
  std::string metadata;
  std::vector<ManifestShard> shards;
};

inline constexpr int kManifestVersion = 1;
// The largest manifest file read_manifest() reads and write_manifest() writes: 256 MiB. As
// written, a manifest takes about 110 bytes per shard and 8 per epoch listed: a million shards,
// or 30 million epochs, fit. read_manifest() holds the file's text and the Manifest it builds (8
// bytes per epoch, about 100 per shard, no JSON tree): about twice the size of a file
// write_manifest() wrote, at most about 6 times that of any file (one-digit epochs, "[0,1,...]").
inline constexpr std::uint64_t kMaxManifestBytes = 256ull << 20;
// The name a manifest gets inside a directory of shards (the recorder's directory mode).
inline constexpr const char* kManifestFileName = "manifest.json";

// The file holding a manifest if `path` names one, the rule every tool that takes "a store or a
// manifest" follows (ShardSet::open, merge, serve, dask): a path ending in .json that is not a
// directory (a store or a directory of shards may be named so), or a directory with
// kManifestFileName in it (its path then). Anything else named *.json counts, so that its error
// (missing, not a regular file) names it as a manifest. Otherwise (an empty path too) nothing.
std::optional<std::string> manifest_file(const std::string& path);

// Reads and checks a manifest: kNotFound if there is none, kCorruption for text that is not a
// manifest (naming the field: a version below 1, a dim outside 1..kMaxDim, a field given twice in
// one object, epochs not ascending, ...), a file larger than
// kMaxManifestBytes (naming its size) or one that is not a regular file (a FIFO, a directory:
// refused without waiting for a writer), kUnsupportedVersion for a newer one, kInvalidArgument for
// a shard path that is empty, absolute or goes through ".." (naming it).
Manifest read_manifest(const std::string& path);
// Writes `manifest` to `path` atomically: a temporary file beside it, flushed, renamed over
// `path`, and the directory flushed. Readers see the old manifest or the new one, never a mix.
// Checks the shard paths as read_manifest does, and refuses (kInvalidArgument) what it would
// not read back: a dim outside 1..kMaxDim, a dtype outside the enum, epochs not ascending, text
// beyond kMaxManifestBytes; and what ShardSet::open refuses: no shards, a store id or a shard
// path listed twice (paths compared without "." and empty parts). Metadata, a shard path or a store
// id that is not UTF-8 is kInvalidArgument naming the field: JSON text is Unicode, and its bytes
// would not read back as written.
void write_manifest(const std::string& path, const Manifest& manifest);

// Several stores read as one. Rows are numbered globally in shard order: shard 0's rows first,
// then shard 1's, ...; each shard contributes the rows of its Reader's snapshot. A refresh that
// grows a shard moves the global numbers of the shards after it: keep (shard, row) pairs, not
// global numbers, across refresh().
//
// Lookups follow the single-store rules: if a (key, epoch) is stored more than once, the row
// with the highest global number wins (within a shard the later row; across shards the later
// shard — shards have no common clock); history() shows every copy.
//
// Thread-safety: const calls may run concurrently; refresh() must not run concurrently with any
// other call. Views have the lifetime of the shard's Reader views (reader.h).
// Moved from (by the move constructor or move assignment), a ShardSet holds nothing: every call
// but the destructor (which does nothing) throws kClosed saying so; assigning another ShardSet
// to it makes it usable again.
class ShardSet {
 public:
  // Global row number of a (key, epoch) that is not there, in find_many's result.
  static constexpr std::uint64_t kNoRow = ~std::uint64_t{0};

  // One manifest (a file, or a directory holding kManifestFileName) or one or more store
  // directories. A path ending in ".json" is a manifest file unless it is a directory. An empty
  // path, or a manifest given with other paths, is kInvalidArgument naming it. A shard that
  // is missing (kNotFound), has fewer rows than its manifest entry recorded (kCorruption), or has
  // another store id than its entry or disagrees with the manifest or the other shards on dim or
  // dtype (kFormatMismatch) is an error naming the shard.
  static ShardSet open(const std::vector<std::string>& manifest_or_stores,
                       const ReaderOptions& options = {});
  static ShardSet open(const std::string& manifest_or_store, const ReaderOptions& options = {}) {
    return open(std::vector<std::string>{manifest_or_store}, options);
  }

  ShardSet(ShardSet&&) noexcept;
  ShardSet& operator=(ShardSet&&) noexcept;
  ~ShardSet();

  std::uint64_t size() const;  // Rows in all shards' snapshots together.
  // Refreshes every shard's snapshot, in shard order; then, for a set opened from a manifest
  // whose file has changed since it was last read (replaced, as write_manifest does, or
  // rewritten), reads it again and adds the shards it now lists that the set does not hold
  // (by store id: a node's first end_epoch lists its shard), each checked as open() checks
  // one, after the shards held, in the manifest's order. Shard numbers and (shard, row) pairs
  // thus stay valid; a shard the manifest no longer lists stays, and a manifest removed since
  // is not read (the shards held stay as they are). The manifest is read by the path the set
  // was opened with, made absolute then. Another store id listed at the path of a shard held
  // (deleted and made again: a run started over) is kFormatMismatch: open a new ShardSet. Returns
  // the new size(). If a shard's refresh, the manifest or a new shard throws (files moved or
  // removed, a shard listed before it was copied next to the manifest, a manifest of another dim or
  // dtype: kFormatMismatch), the error propagates and the set is renumbered for what it then holds:
  // the shards refreshed and added before the error with their new snapshots, the rest as they
  // were. size(), locate(), record() and the lookups agree with each other; calling refresh()
  // again retries every shard and, until it has been read whole, the manifest.
  std::uint64_t refresh();

  std::size_t shard_count() const;
  const Reader& shard(std::size_t index) const;  // The shard's Reader: views, record, verify.
  const std::string& shard_path(std::size_t index) const;
  std::uint64_t shard_first_row(std::size_t index) const;  // Global number of its row 0.

  struct Location {
    std::size_t shard = 0;
    std::uint64_t row = 0;  // Row number inside the shard.
  };
  // Which shard holds global row `row`; kInvalidArgument if row >= size().
  Location locate(std::uint64_t row) const;
  std::uint64_t global_row(std::size_t shard, std::uint64_t row) const;
  // Global row `row` with its key and epoch, checksum verified (Reader::record); the Record's
  // row is the global number.
  Record record(std::uint64_t row) const;

  // Lookups ask each shard's Reader (its key index, or its scan: Reader's "Lookups by key"),
  // for the shards' snapshots as of the last refresh().
  // The global row of (key, epoch) (the higher one if stored twice), or of the latest row of
  // `key`: of each shard's latest row of it (Reader::find), the one of the highest epoch, and
  // of several of that epoch the higher global row. Shards are written side by side, so their
  // order says nothing of time: the last shard's row of a key may be of an earlier epoch.
  std::optional<std::uint64_t> find(std::uint64_t key, std::uint64_t epoch) const;
  std::optional<std::uint64_t> find(std::uint64_t key) const;
  struct Version {
    std::uint64_t row = 0;  // Global.
    std::uint64_t epoch = 0;
  };
  // Every row of `key`, in global row order.
  std::vector<Version> history(std::uint64_t key) const;
  // The global rows of one epoch, ascending.
  std::vector<std::uint64_t> epoch_rows(std::uint64_t epoch) const;
  // find(keys[i], epochs[i]) / find(keys[i], epoch) / find(keys[i]) for every i; kNoRow where
  // absent. kInvalidArgument if epochs.size() != keys.size().
  std::vector<std::uint64_t> find_many(std::span<const std::uint64_t> keys,
                                       std::span<const std::uint64_t> epochs) const;
  std::vector<std::uint64_t> find_many(std::span<const std::uint64_t> keys,
                                       std::uint64_t epoch) const;
  std::vector<std::uint64_t> find_many(std::span<const std::uint64_t> keys) const;

  std::uint32_t dim() const;
  DType dtype() const;
  // The manifest's metadata when it gives one (not empty), else shard 0's.
  const std::string& metadata() const;
  bool from_manifest() const;           // Opened from a manifest.
  bool metadata_from_manifest() const;  // metadata() is the manifest's.

  class Impl;

 private:
  explicit ShardSet(std::unique_ptr<Impl> impl);
  Impl& impl() const;  // *impl_; kClosed when moved from.
  std::unique_ptr<Impl> impl_;
};

// Progress of merge_stores, reported after each chunk of rows is appended.
struct MergeProgress {
  std::uint64_t rows_done = 0;
  std::uint64_t rows_total = 0;
  std::size_t shard = 0;
  const std::string* shard_path = nullptr;
};

// Consolidates the shards' rows into a new store at `out` (which must not exist), in epoch
// order: the shards merged as sorted sequences by (epoch, shard index), each shard's own row
// order kept (shards whose epochs never go down give rows sorted by epoch, then shard, then
// row). So the merged store's latest row of a key (its last) is the one ShardSet::find(key)
// answers when each shard's epochs never go down. Global row numbers of the ShardSet are not
// the merged store's. With the shards' dim, dtype and metadata: the manifest's when it gives one
// (ShardSet::metadata_from_manifest(); metadata_overrides() names the shards of other metadata);
// else shards whose metadata differ (same_metadata(), store.h) are kFormatMismatch naming two of
// them: which one the merged store should keep is the caller's to say, in a manifest's
// "metadata". Each row keeps its key and epoch. It keeps a key index unless no shard does
// (CreateOptions::key_index). Every row's
// checksum is verified before it is copied: a bad row is kCorruption naming the shard and the row,
// and nothing is left at `out`. An `out` inside a shard is kInvalidArgument (shards are only read);
// an `out` whose directory takes no new entry (a read-only file system, or no write permission)
// is kReadOnly naming `out` and the cause.
// The new store is built in a hidden directory
// `.<name of out>.partial-<hex>` beside `out` and renamed to `out` (never replacing anything) only
// when complete: on any error (a full disk, say) nothing is left at `out`. A process killed
// meanwhile leaves that directory, never `out`; it is not the merged store and may be deleted.
// The result is synced before returning. Returns its info. A merged store made with every row
// although its key index could not be kept (Writer::close() failed for it: open files or memory
// ran out at its last growth, say) is kept, whole: lookups scan the rows it did not index until
// the next writer indexes them; close()'s message, naming `out`, is put in `*warning` (when
// given) for the caller to show; "" otherwise.
StoreInfo merge_stores(const std::string& out, const ShardSet& shards,
                       const std::function<void(const MergeProgress&)>& progress = {},
                       std::string* warning = nullptr);

// Where a shard's epochs go down: at `row` (of the shard), `epoch` follows `previous`.
struct EpochDrop {
  std::size_t shard = 0;
  std::uint64_t row = 0;
  std::uint64_t epoch = 0;
  std::uint64_t previous = 0;
};
// The first drop of each shard whose epochs go down somewhere in its snapshot (a run resumed
// without a truncate, or epochs that are not steps), in shard order: for a key stored in such
// a shard on both sides of the drop, merge_stores() (by epoch) may keep another row as the
// key's latest than ShardSet::find() (the shard's later row) answers. The merge tools name them.
std::vector<EpochDrop> epoch_drops(const ShardSet& shards);

// The shards whose metadata is not the one the manifest gives (metadata_from_manifest(); by
// same_metadata(), store.h), in shard order: merge_stores() gives the merged store the
// manifest's, theirs is not kept. The merge tools name them. Empty for any other set.
std::vector<std::size_t> metadata_overrides(const ShardSet& shards);

}  // namespace embstore
