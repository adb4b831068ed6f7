// key_index_handle.h — a Writer's or Reader's hold on the store's current key index: which
// generation is current, opening it, rebuilding it, growing it (FORMAT.md, "keys.K",
// "Protocols").
//
// Works from plain inputs (the store directory and identity, the shared key_generation word, the
// mapped offset index) so that the storage layer only has to call it at three points: at open,
// after each publish, and at refresh. Thread-safety: current()/status() may be called from any
// thread; the writer calls must be serialized (the key index lock and the Writer's mutex) except
// build_next(), which runs without the lock on one thread at a time.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "index/key_index.h"
#include "platform/os.h"

namespace embstore::detail {

class KeyIndexHandle {
 public:
  // `key_generation` points at StatePage::key_generation in the shared state mapping. A
  // Reader's handle also gets `store_generation` (StatePage::generation): once a truncate has
  // moved the store past the snapshot's generation (identity.store_generation), the key index
  // the word names is the new generation's, and refresh() leaves current() null, not damaged.
  // A Writer's handle gets `check_at_path`, called before the handle opens, creates, publishes
  // or removes a file by name in `dir`; it throws (kNotFound) when the store is no longer at
  // that path (StoreFiles::check_at_path()), so that a writer of a store deleted or replaced
  // under it never changes another store's key index. The error reaches the writer's caller as
  // any key index failure does (Writer::close() reports it).
  KeyIndexHandle(std::string dir, const KeyIndexIdentity& identity, std::uint64_t* key_generation,
                 os::Access access, const std::uint64_t* store_generation = nullptr,
                 std::function<void()> check_at_path = {});

  // The index to answer from, or null when there is none this handle may use (none built yet,
  // missing, damaged, or built in another boot): lookups then scan. The pointer stays valid as
  // long as the caller holds it, whatever writers do to the files.
  std::shared_ptr<const KeyIndexFile> current() const;
  // current() != null, without the mutex (a lookup's fast check that no damage was found).
  bool has_current() const { return has_current_.load(std::memory_order_relaxed); }
  // Re-reads key_generation and opens a newer generation if there is one. A missing, damaged,
  // pre-reboot or other-version file makes current() null and status() say why (lookups scan);
  // an I/O error opening it (EIO, EMFILE) is thrown, not papered over by a scan.
  void refresh();
  // One line for info(): "current (N rows indexed)", or why lookups scan.
  std::string status() const;
  // Marks the current file unusable after a lookup found it inconsistent.
  void mark_damaged(const std::string& why);
  // True when the current generation's file is missing or was found damaged (not merely absent
  // because none was built yet, or built before the last reboot): status() says why.
  bool damaged() const;

  // After a truncate switched the store to generation `store_generation`: forgets the current
  // file and any growth claim (files of another generation never match again). Not concurrent
  // with any other call of a writer's handle (no growth running) or with a Reader's lookups.
  void reset_store_generation(std::uint64_t store_generation);

  // Writer, before open_for_writer(): the rows the caller expects the store to hold
  // (WriterOptions::expected_rows, at most identity.max_rows; 0 for no guess). A generation
  // this handle builds from the offset index or grows to gets tables for at least that many
  // rows, every one a new key and pair.
  void set_expected_rows(std::uint64_t rows) { expected_rows_ = rows; }

  // Writer, writer lock and key index lock held, rows [0, committed) mapped, `committed` the
  // store's commit counter (no writer indexes past it, so a file indexed further was cut by a
  // recovery): makes the index usable — opens it, or rebuilds it from the offset index when it
  // is missing, damaged (its header, or tables found inconsistent while indexing up to
  // `committed`), from another boot or ahead of `committed` (or always, with `rebuild`) — then
  // indexes up to `committed` (as far as its tables take: a full one waits for the growth
  // after_publish() claims). Removes stale build files (remove_stale_builds()). I/O errors
  // throw.
  void open_for_writer(const IndexEntry* entries, std::uint64_t committed, bool rebuild = false);
  // Writer, writer lock and key index lock held, `committed` the store's commit counter read
  // under them, rows [0, committed) mapped: indexes the rows not indexed yet (of any writer),
  // opening or rebuilding the current generation first if needed. Returns true
  // when the tables need a larger generation and this handle claimed the job (build_next()).
  bool after_publish(const IndexEntry* entries, std::uint64_t committed);
  // The part of after_publish() that changes no file but the current one, for a writer holding
  // the key index lock alone: indexes into the current file if it is still the store's current
  // generation and not found damaged, and returns what after_publish() would. Returns nothing
  // otherwise (another writer switched generations, or the file is damaged): the caller then
  // calls after_publish() holding the writer lock too, because opening and rebuilding replace
  // files that writers of libraries before the key index lock replace under the writer lock
  // alone.
  // With `claim` false it claims nothing, and returns true where it would have tried to claim a
  // growth (the tables want one and this handle holds no claim): the caller then calls it again
  // where it can start the growth (a Writer's indexer thread, writer.cc).
  std::optional<bool> index_current(const IndexEntry* entries, std::uint64_t committed,
                                    bool claim = true);

  // What a growth may index now: rows [0, rows), committed, their entries mapped at `entries`,
  // which stay valid until the next call of the source that gave them.
  struct Rows {
    const IndexEntry* entries = nullptr;
    std::uint64_t rows = 0;
  };
  // The growth job, run without the key index lock. `source()` gives the rows it may read now;
  // it is called again before each step of the catch-up, so the build follows the appends even
  // when the writer maps its files again at a larger range. Builds the larger generation, its
  // tables sized for the rows source() gives first (next_sizes(rows): appends go on between
  // the claim and the build), catching up until the tail left is short, and returns it (null
  // if `stop` was set). The caller then calls finish_growth() under the key index lock.
  // `final_rows` is 0 while the writer appends; it sets it to the rows committed when it
  // closes. From then on a build whose tables those rows would overfill is given up between two
  // steps and begun again at the sizes they want: finished, it would be published only to be
  // grown again at once, and close() waits for both.
  std::shared_ptr<KeyIndexFile> build_next(const std::function<Rows()>& source,
                                           const std::atomic<bool>& stop,
                                           const std::atomic<std::uint64_t>& final_rows);
  // Key index lock held, `committed` as for after_publish(): indexes the tail into `next`,
  // publishes it as current, removes the old file, and drops this handle's claim. `next` may be
  // null (an abandoned build): only the claim is dropped. Returns true when the new tables are
  // already too full again and this handle claimed the next growth (call build_next() again).
  // `retired` receives the replaced file: the caller releases it after its locks, because
  // unmapping it and dropping the pages of the unlinked file took 1-2 ms (bench/RESULTS.md).
  bool finish_growth(std::shared_ptr<KeyIndexFile> next, const IndexEntry* entries,
                     std::uint64_t committed, std::shared_ptr<const KeyIndexFile>& retired);

 private:
  // Builds generation `generation` of rows [0, rows) at `sizes` (larger where a table fills
  // up). Null when `stop` is set, or when outgrown() (growth only: `final_rows` not null).
  // Before a file of `dir_` is opened, created, published or removed by name: check_at_path_.
  void check_dir() const {
    if (check_at_path_) check_at_path_();
  }
  std::shared_ptr<KeyIndexFile> build(const IndexEntry* entries, std::uint64_t rows,
                                      KeyIndexSizes sizes, std::uint64_t generation,
                                      const std::atomic<bool>* stop,
                                      const std::atomic<std::uint64_t>* final_rows);
  // A growth's tables at `sizes` are too small for `*final_rows` rows (when set: see
  // build_next()), by the proportions of the claimed file (next_sizes(rows)).
  bool outgrown(const KeyIndexSizes& sizes, const std::atomic<std::uint64_t>* final_rows) const;
  bool try_claim_growth();
  // True when growth claim word `claim` is held: by this process, or by a running one within
  // the claim's lifetime.
  static bool claim_alive(std::uint64_t claim);
  // Writer lock and key index lock held, `current` the current generation's file if it opened:
  // removes the named build files (key_index_format.h) of processes no longer running, and a
  // legacy keys.next that no live growth claim on `current` could still be writing.
  void remove_stale_builds(const KeyIndexFile* current);
  void set_current(std::shared_ptr<KeyIndexFile> file, std::string status);
  // A Reader's handle: a truncate has moved the store past identity_.store_generation.
  bool store_moved() const;
  // refresh() for such a handle: keeps a file it holds (its snapshot's), else uses none.
  void replaced();

  std::string dir_;
  std::function<void()> check_at_path_;  // Writer only (see the constructor).
  KeyIndexIdentity identity_;
  std::uint64_t* key_generation_;
  const std::uint64_t* store_generation_;  // A Reader's: the constructor.
  os::Access access_;
  mutable std::mutex mutex_;  // Guards current_ and status_.
  std::shared_ptr<KeyIndexFile> current_;
  std::atomic<bool> has_current_{false};
  std::string status_;
  std::uint64_t damaged_generation_ = 0;  // A generation found unusable; not reopened.
  bool damaged_ = false;                  // status_ tells of damage (see damaged()).
  // Writer only: the growth this handle claimed (in claim_file_'s header) and what it builds.
  std::shared_ptr<KeyIndexFile> claim_file_;
  KeyIndexSizes growth_sizes_;
  bool claimed_ = false;
  std::uint64_t expected_rows_ = 0;  // set_expected_rows().
  // The sizes expected_rows_ asks for (kMinSlots each without a guess).
  KeyIndexSizes expected_sizes() const;
};

}  // namespace embstore::detail
