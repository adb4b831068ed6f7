// key_index.h — the persistent key index: lookups by key, by (key, epoch) and by epoch.
//
// Derived data over the offset index (index.G), in its own file keys.K (FORMAT.md, "keys.K"):
// three open-addressing tables of atomic slots (latest row per (key, epoch), per key, per
// epoch) and an append-only chain of 16 bytes per row (previous row of the same key, previous
// row of the same epoch, the row's ordinal within its epoch). A pair slot holds its key and
// epoch, so find(key, epoch) is answered from the slot alone; key and epoch slots hold a hash
// tag, and the row they name is checked against its offset index entry. The file is trusted
// only in the boot that built it and only up to its watermark; verify() checks every slot
// against the offset index.
//
// Writers index under the key index lock after publishing `committed` (and releasing the writer
// lock), redo-only: rows
// [indexed_rows, committed) are (re)indexed idempotently, so a writer killed half-way leaves a
// gap that the next writer fills. Readers take no lock: KeyQuery answers rows below
// min(snapshot, indexed_rows) from the tables and scans the rest of the snapshot.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "format/format.h"
#include "index/key_index_format.h"
#include "platform/mapping.h"
#include "platform/os.h"

namespace embstore::detail {

// The store a key index file belongs to; a file of another store or generation is refused.
struct KeyIndexIdentity {
  std::uint8_t store_id[16] = {};
  std::uint64_t store_generation = 1;
  std::uint64_t seed = 0;             // Layout::seed.
  std::uint64_t max_rows = kMaxRows;  // Bounds the address space reserved for the chain.
};

// Slot counts of the three tables (powers of two).
struct KeyIndexSizes {
  std::uint64_t pair_slots = kMinSlots;
  std::uint64_t key_slots = kMinSlots;
  std::uint64_t epoch_slots = kMinSlots;
  bool operator==(const KeyIndexSizes&) const = default;
};

struct EpochCount {
  std::uint64_t epoch = 0;
  std::uint64_t rows = 0;
};

// One generation of the key index, mapped. Lookups (through KeyQuery) are thread-safe and
// lock-free; index_rows() is for one writer at a time (the key index lock). Lives as long as any
// shared_ptr to it; its file may be unlinked meanwhile (a newer generation replaced it).
class KeyIndexFile {
 public:
  // Opens dir/keys.<generation> and checks its header against `identity` and its size: kNotFound
  // if missing, kCorruption naming the file and field otherwise.
  static std::shared_ptr<KeyIndexFile> open(const std::string& dir, std::uint64_t generation,
                                            const KeyIndexIdentity& identity, os::Access access);
  // Creates the file of `generation`, with tables of `sizes` and chain space for `rows` rows,
  // private to its builder until publish_as_current(): it has no name (an O_TMPFILE file in
  // `dir`), or, on a file system that cannot make one, the name
  // key_index_build_file_name(pid, n), used by no other builder. Either way no other process
  // can open, replace or remove it while it is built (FORMAT.md, "Growth"). Dropping it
  // unpublished removes it (an unnamed file vanishes by itself, with a killed process too).
  static std::shared_ptr<KeyIndexFile> create(const std::string& dir, std::uint64_t generation,
                                              const KeyIndexIdentity& identity,
                                              const KeyIndexSizes& sizes, std::uint64_t rows);
  ~KeyIndexFile();
  KeyIndexFile(const KeyIndexFile&) = delete;
  KeyIndexFile& operator=(const KeyIndexFile&) = delete;

  const std::string& path() const { return path_; }
  std::uint64_t generation() const { return generation_; }
  KeyIndexSizes sizes() const { return sizes_; }
  // Rows [0, indexed_rows()) are indexed (acquire load).
  std::uint64_t indexed_rows() const;
  // True when the file was built in the machine's current boot (else it may hold torn pages).
  bool built_in_current_boot() const;

  // Writer, key index lock held (or a private file not yet published): indexes rows
  // [indexed_rows(), end) of `entries`, every one below the commit point, and publishes the
  // watermark. Returns false when it stopped early because a table is too full to take more
  // (grow first); the watermark then marks how far it got.
  bool index_rows(const IndexEntry* entries, std::uint64_t end);
  // True when a table is past its load factor (build a larger generation: next_sizes()), or
  // when the epoch count is wrong (epochs_overcounted(); the sizes then may stay the same).
  bool wants_growth() const;
  // Writer, key index lock held: true when the epoch table holds fewer slots than epochs_used
  // counts (a writer was killed between raising the count and storing the slot, and the row was
  // indexed again). Lookups stay exact, but readers can never be sure they know every epoch, so
  // history would never answer from the pair slots alone: index_rows() then makes
  // wants_growth() true, and the next generation, built from the offset index, counts exactly.
  bool epochs_overcounted() const;
  // The sizes of the next generation when it is built for rows [0, rows) (`rows` at or below
  // indexed_rows(), the default 0 among them: for the rows indexed): each table past its load
  // factor doubles at least, and every table gets the fewest slots that keep under the load
  // factor the entries it would hold at `rows` if they came on as they came so far (used slots
  // per indexed row, at most one a row). A growth claimed at one row count and built at a
  // larger one (appends went on) is thus built large enough at once instead of filling up and
  // being rebuilt.
  KeyIndexSizes next_sizes(std::uint64_t rows = 0) const;
  // Writer lock and key index lock held: names this file (from create()) keys.<generation()> in
  // `dir`, replacing a leftover of that name (a publisher killed before it raised key_generation;
  // not the current generation, so no reader opens it).
  void publish_as_current(const std::string& dir);

  // The growth claim word in the header (a writer's pid while it builds the next generation).
  std::uint64_t* grow_claim_word() const;

  // Checks every row of [0, indexed_rows()) against `entries`: each row is reachable from its
  // tables' slots through the chain, with correct chain links and ordinals. Returns the number
  // of problems found (0: consistent) and describes the first in `first_problem`.
  std::uint64_t check(const IndexEntry* entries, std::uint64_t rows,
                      std::string* first_problem) const;

 private:
  friend class KeyQuery;
  KeyIndexFile() = default;
  // Maps the file in a reservation proportional to its size (at most enough for `max_rows`).
  void map_header_and_tables(int fd, std::uint64_t max_rows);
  void ensure_chain_allocated(std::uint64_t rows);  // Writer: chain space for `rows` rows.
  // Writer, after ensure_chain_allocated(end): page-table entries for the chain records of rows
  // [begin, end) and some way past, made in one call (os::populate_write).
  void populate_chain(std::uint64_t begin, std::uint64_t end);
  // Maps the chain as far as the file holds it, at least through `row` (kCorruption if the file
  // does not hold it); a Reader reopens the file by path (kNotFound: it was replaced, so
  // lookups scan the offset index instead).
  void map_chain(std::uint64_t row) const;
  int reopen() const;

  // Pair slot i is words [2 i, 2 i + 2) of pair_slots().
  std::uint64_t* pair_slots() const { return slots_ + 0; }
  std::uint64_t* key_slots() const { return slots_ + kPairSlotWords * sizes_.pair_slots; }
  std::uint64_t* epoch_slots() const { return key_slots() + sizes_.key_slots; }
  std::uint64_t* chain_words(std::uint64_t row) const;  // Maps more of the file if needed.
  KeyIndexHeader* header() const;

  std::string path_;  // For an unnamed file being built, what error messages call it.
  int fd_ = -1;       // A Writer's; a Reader keeps none (-1).
  // The file open() opened: reopen() refuses any other file at path_ (after a truncate the
  // key index numbering starts over, so the same name may hold another generation's file).
  std::optional<os::FileId> file_id_;
  // Built by create() and not published yet: unnamed (no path to remove), or named (removed
  // when dropped unpublished).
  enum class Build { kNone, kUnnamed, kNamed } build_ = Build::kNone;
  os::Access access_ = os::Access::kReadOnly;
  std::uint64_t generation_ = 0;
  KeyIndexSizes sizes_;
  std::uint64_t hash_seed_ = 0;
  std::uint64_t chain_offset_ = 0;
  std::uint64_t max_reserve_bytes_ = 0;  // The most address space one mapping may reserve.
  // Writer only (index_rows runs on one thread at a time): bytes of the file known to be
  // allocated, and the chain rows [0, populated_rows_) this process has populated.
  std::uint64_t allocated_bytes_ = 0;
  std::uint64_t populated_rows_ = 0;
  // index_rows() met a row an earlier indexer had reached (its key slot names it or a later
  // row): a redo after a writer was killed indexing, which may have counted a new epoch whose
  // slot it never stored. Cleared when index_rows() next counts the epoch slots.
  bool redo_seen_ = false;
  std::atomic<bool> rebuild_wanted_{false};
  // Every mapping made, each reserving more than the last; all are kept until this object dies,
  // so a pointer into any of them stays valid. The first holds the header and tables (base_).
  mutable std::vector<std::unique_ptr<ReservedMapping>> mappings_;  // Under map_mutex_.
  std::byte* base_ = nullptr;
  std::uint64_t* slots_ = nullptr;
  // The newest mapping's base and the chain rows it covers (stored in that order).
  mutable std::atomic<std::byte*> chain_base_{nullptr};
  mutable std::atomic<std::uint64_t> chain_rows_mapped_{0};
  mutable std::mutex map_mutex_;  // Serializes mapping more (lookups may trigger it).
  // Lookups: the epochs the epoch table named when last looked at, a hint that lets history()
  // fetch a key's rows in parallel (KeyQuery::history_by_epochs, which proves its answer and
  // never trusts the hint). Made again when epochs_used has changed since, or when it skipped
  // epochs whose rows all lay past the limit it was made for and a query's limit is higher.
  struct EpochHint {
    std::vector<std::uint64_t> epochs;  // Ascending, distinct.
    std::uint64_t epochs_used = 0;      // The header's count when it was made.
    std::uint64_t limit = 0;            // The query limit it was made for.
    bool skipped = false;               // An epoch slot named no row below that limit.
    // As many epoch slots were seen as epochs_used counted: every epoch whose slot existed
    // then is here (a writer counts an epoch before it stores its slot).
    bool complete = false;
  };
  mutable std::mutex hint_mutex_;
  mutable std::shared_ptr<const EpochHint> epoch_hint_;  // Under hint_mutex_.
};

// Answers lookups for one snapshot: rows below min(snapshot, index watermark) from the index
// (which may be null: no usable index), the rest of the snapshot by a linear scan of the offset
// index. Never returns a row >= snapshot. Cheap to construct; thread-safe (read-only). Throws
// kCorruption naming the key index file when its structure is inconsistent (callers fall back
// to a query without index).
class KeyQuery {
 public:
  KeyQuery(const KeyIndexFile* index, const IndexEntry* entries, std::uint64_t snapshot);

  // The row of (key, epoch); if it was appended more than once, the latest.
  std::optional<std::uint64_t> find(std::uint64_t key, std::uint64_t epoch) const;
  // The latest row of `key`.
  std::optional<std::uint64_t> find_latest(std::uint64_t key) const;
  // Every row of `key`, ascending (commit order), and with `epochs` each row's epoch. Through
  // history_by_epochs() when it can prove its answer, else along the key's chain (one dependent
  // load per row).
  std::vector<std::uint64_t> history(std::uint64_t key,
                                     std::vector<std::uint64_t>* epochs = nullptr) const;
  // The rows of `key` below the index limit, found by looking the key up in every epoch the
  // index knows (at most kHistoryEpochProbes of them) at once, so the loads overlap instead of
  // following one another. Proven complete before it is returned, by the slots alone when the
  // hint holds every epoch of the index and no slot found is marked repeated (one round of
  // loads; `from_slots` is then set true), else against the chain: the latest row is the key
  // table's, and each row's chain record links to the row before it (the first to none). Empty
  // optional when that proof fails (a (key, epoch) appended more than once, an epoch the hint
  // lacks, too many epochs): history() then follows the chain.
  // With `epochs`, each row's epoch too (the epoch it was looked up in: no entry is read).
  std::optional<std::vector<std::uint64_t>> history_by_epochs(
      std::uint64_t key, std::vector<std::uint64_t>* epochs = nullptr,
      bool* from_slots = nullptr) const;
  static constexpr std::size_t kHistoryEpochProbes = 64;
  // Every row of `epoch`, ascending.
  std::vector<std::uint64_t> epoch_rows(std::uint64_t epoch) const;
  // The epochs present with their row counts, by ascending epoch. kCorruption when the epochs'
  // chains do not count every indexed row.
  std::vector<EpochCount> epochs() const;
  // Number of distinct keys in the snapshot (one pass over the key table). kCorruption when
  // the table holds no key of rows it indexes.
  std::uint64_t distinct_keys() const;
  // out[i] = find(keys[i], epochs[i]) (epochs.size() == keys.size()), find(keys[i], epochs[0])
  // (epochs.size() == 1) or find_latest(keys[i]) (epochs empty); -1 where there is none.
  // Hashes and prefetches a block of keys before resolving them.
  void find_many(std::span<const std::uint64_t> keys, std::span<const std::uint64_t> epochs,
                 std::int64_t* out) const;

  // Rows answered by the index; the rest of the snapshot is scanned.
  std::uint64_t indexed_limit() const { return limit_; }
  std::uint64_t snapshot() const { return snapshot_; }

 private:
  static constexpr std::uint64_t kNone = ~0ull;
  std::uint64_t table_find(std::uint64_t key, std::uint64_t epoch) const;
  std::uint64_t table_find_latest(std::uint64_t key) const;
  std::uint64_t table_epoch_latest(std::uint64_t epoch) const;
  // From `row`, the first row below limit_ along the key (or epoch) chain, or kNone.
  std::uint64_t below_limit(std::uint64_t row, bool by_epoch) const;
  std::uint64_t prev(std::uint64_t row, bool by_epoch) const;
  std::uint64_t ordinal(std::uint64_t row) const;
  // The index file's epoch hint for this query's limit, made now if missing or stale.
  std::shared_ptr<const KeyIndexFile::EpochHint> epoch_hint() const;

  const KeyIndexFile* index_;
  const IndexEntry* entries_;
  std::uint64_t snapshot_;
  std::uint64_t limit_;
};

// The mixing function of FORMAT.md ("slots and chain records").
std::uint64_t key_index_mix(std::uint64_t x) noexcept;
// The table size a build gives `entries` entries: the smallest power of two (>= kMinSlots) that
// keeps them under kMaxLoadSixteenths / 16, so at most 2 * 16/11 slots an entry.
std::uint64_t key_index_slots_for(std::uint64_t entries);

}  // namespace embstore::detail
