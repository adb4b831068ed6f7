// embstore/reader.h — zero-copy reading of committed rows.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "embstore/dtype.h"
#include "embstore/options.h"
#include "embstore/store.h"

namespace embstore {

// Rows [first_row, first_row + rows) as one contiguous, row-major block of
// rows * row_bytes bytes. Points straight into the store's mapping (zero-copy).
// Lifetime: valid while the mappings the Reader held when it returned the view are held, by
// that Reader's open state or by an owner() copy taken from it. The open state moves along
// when the Reader is moved (to the Reader it was moved to) and is dropped when the Reader is
// closed, destroyed or move-assigned to (`r = Reader::open(other)`: r's earlier views dangle
// unless an owner() copy holds them). Neither refresh() nor writers growing the store end it.
// So a Reader that refreshes across a truncate keeps the older generation's files (unlinked by
// the truncate: their disk space is not given back) mapped until it is closed, destroyed or
// move-assigned to; a long-lived follower opens the store again after a truncate (generation()
// changes) once it no longer needs its earlier views. The Python binding does so by itself.
struct RowsView {
  const std::byte* data = nullptr;
  std::uint64_t first_row = 0;
  std::uint64_t rows = 0;
  std::uint32_t dim = 0;
  DType dtype = DType::kFloat32;
  std::uint64_t row_bytes = 0;

  std::uint64_t size_bytes() const { return rows * row_bytes; }
  const std::byte* row(std::uint64_t i) const { return data + i * row_bytes; }
};

// Rows of a snapshot in memory the caller may write (Reader::private_rows): a private,
// copy-on-write mapping of the store's data file, so no row is copied until the caller writes a
// page, which then becomes this process's own; nothing written reaches the store, its other
// readers or the page cache. Where the data file could not be mapped again as the file the
// snapshot's rows are in (a truncate removed it since, the store left its path, no descriptor
// to spare), the rows are copied into anonymous memory instead (copied() says so). Valid until
// destroyed or moved from, independently of the Reader (which may be closed first).
class PrivateRows {
 public:
  PrivateRows() = default;
  PrivateRows(PrivateRows&& other) noexcept;
  PrivateRows& operator=(PrivateRows&& other) noexcept;
  ~PrivateRows();

  std::byte* data() const { return data_; }
  std::uint64_t rows() const { return rows_; }
  std::uint64_t size_bytes() const { return bytes_; }
  bool copied() const { return copied_; }

 private:
  friend class Reader;
  void* map_ = nullptr;
  std::uint64_t map_bytes_ = 0;
  std::byte* data_ = nullptr;
  std::uint64_t rows_ = 0;
  std::uint64_t bytes_ = 0;
  bool copied_ = false;
};

// A read-only strided sequence of T (how keys and epochs sit inside index entries).
// Same lifetime as RowsView.
template <typename T>
struct StridedView {
  const std::byte* data = nullptr;
  std::uint64_t size = 0;
  std::uint64_t stride_bytes = sizeof(T);

  T operator[](std::uint64_t i) const {
    T value;
    std::memcpy(&value, data + i * stride_bytes, sizeof(T));
    return value;
  }
};

// One row with its index entry, checksum already verified.
struct Record {
  std::uint64_t row = 0;
  std::uint64_t key = 0;
  std::uint64_t epoch = 0;
  const std::byte* data = nullptr;  // row_bytes bytes; same lifetime as RowsView.
};

struct VerifyReport {
  std::uint64_t begin_row = 0;
  std::uint64_t end_row = 0;
  std::uint64_t rows_checked = 0;
  std::uint64_t bad_row_count = 0;
  std::vector<std::uint64_t> bad_rows;  // The first kMaxListed bad rows, ascending.
  static constexpr std::size_t kMaxListed = 1000;
  // The key index, checked against the offset index when the whole snapshot is verified and a
  // key index is in use: every row reachable through its tables, every chain link and count
  // right. A damaged key index loses nothing (a writer rebuilds it) but makes lookups scan.
  bool key_index_checked = false;
  std::uint64_t key_index_problems = 0;
  std::string key_index_problem;  // The first problem, naming the file.
  // The header's two copies, when the whole snapshot is verified: "" when both hold, else
  // what is wrong (Reader::verify_header()).
  std::string header_problem;
  // StoreInfo::rows_to_cut, when the whole snapshot is verified: after a reboot no writer has
  // recovered the store from yet, rows the header counts as committed past the snapshot that
  // failed the loader's check; the next writer's open cuts them (StoreInfo::rows_to_cut says
  // which rows those can be).
  std::uint64_t rows_to_cut = 0;
  bool ok() const {
    return bad_row_count == 0 && key_index_problems == 0 && header_problem.empty() &&
           rows_to_cut == 0;
  }
};

// One version of a key: a row and the epoch it was appended with.
struct KeyVersion {
  std::uint64_t row = 0;
  std::uint64_t epoch = 0;
};

// What Reader::read() checks of the rows it copies.
enum class ReadCheck {
  kNone,       // The bytes as stored.
  kChecksums,  // Each row against its checksum.
};

// Reads a store without any lock and without writing a byte; needs only read permission, so it
// works on a read-only mount. Sees the snapshot [0, size()) taken at open() or at the last
// refresh()/wait(); rows inside a snapshot never change.
//
// Thread-safety: const calls may run concurrently; refresh(), wait() and close() must not run
// concurrently with any other call on the same Reader. Views may be used from any thread.
// Moved from (by the move constructor or move assignment), a Reader holds nothing: every call
// throws kClosed saying so, except close() and the destructor, which do nothing; assigning
// another Reader to it makes it usable again.
class Reader {
 public:
  static Reader open(const std::string& path, const ReaderOptions& options = {});

  Reader(Reader&&) noexcept;
  Reader& operator=(Reader&&) noexcept;
  ~Reader();

  std::uint64_t size() const;  // Rows in the snapshot.
  // The generation (StoreInfo::generation) whose files hold the snapshot's rows, as of open() or
  // the last refresh()/wait(). info().generation is the store's now: newer after a truncate this
  // Reader has not refreshed past.
  std::uint64_t generation() const;
  // Takes a new snapshot of the committed rows and returns its size: never smaller than before,
  // except after a Writer::truncate(), when it is the truncated store's (possibly smaller)
  // size. Views taken before stay valid and unchanged either way. Throws kNotFound once the
  // store is no longer at its path (deleted, moved away, or another store created or moved
  // there: open the path again), looked up at most every 50 ms; the snapshot and views stay.
  // A refresh() that throws after it mapped a truncated store's new files leaves an empty
  // snapshot of it (size() 0, generation() its new one) until a refresh() succeeds, never the
  // old rows read at their places in the new files (one that throws before keeps the snapshot
  // it had); views taken before stay valid and unchanged.
  std::uint64_t refresh();
  // Refreshes until size() >= min_rows or `timeout` passes; true when reached. Wakes on commits
  // from any process (a shared futex on the commit counter), without polling; throws as
  // refresh() does, within a fraction of a second of the store leaving its path.
  bool wait(std::uint64_t min_rows, std::chrono::nanoseconds timeout);

  // Rows [begin, end) of the snapshot; throws kInvalidArgument unless begin <= end <= size().
  RowsView rows(std::uint64_t begin, std::uint64_t end) const;
  RowsView rows() const { return rows(0, size()); }
  // Rows [begin, end) of the snapshot in writable memory of the caller's own, without a copy
  // (PrivateRows); for tensors a program may change in place. Throws as rows() does, and kFull
  // when the address space for the mapping cannot be had.
  PrivateRows private_rows(std::uint64_t begin, std::uint64_t end) const;
  StridedView<std::uint64_t> keys(std::uint64_t begin, std::uint64_t end) const;
  StridedView<std::uint64_t> epochs(std::uint64_t begin, std::uint64_t end) const;
  // Row `row` with its key and epoch after checking its checksum: kCorruption (naming the row and
  // the file) if it fails, kInvalidArgument if row >= size().
  Record record(std::uint64_t row) const;
  // Recomputes the checksums of rows [begin, end) of the snapshot, and for the whole snapshot
  // also checks the key index and the header and reports the rows a reboot left to cut
  // (VerifyReport); never throws for bad rows.
  VerifyReport verify(std::uint64_t begin, std::uint64_t end) const;
  VerifyReport verify() const { return verify(0, size()); }
  // The key index part of verify() alone: checks the key index against the offset index of the
  // snapshot (key_index_checked false when there is none to check: none built yet, or built
  // before the last reboot). A key index file that is missing or unreadable although the store
  // names it counts as one problem, except in a store created without a key index, whose lookups
  // scan whatever the file's state. No row checksum is computed (rows_checked stays 0).
  VerifyReport verify_key_index() const;
  // The header file read again and its two copies checked (format 1.2 on: the fixed header and
  // the metadata, each kept twice): "" when both hold and agree, else what is wrong, naming the
  // file (the primary failing its checks, the store then read from the copy; the copy failing
  // its checks or differing from the primary). One damaged copy loses nothing, but leaves the
  // store one more damaged byte from unreadable; a writer opening the store repairs it. "" when
  // the store was deleted since it was opened, or another made at its path (nothing of this
  // store's to check).
  std::string verify_header() const;

  // ---- Lookups by key (sample id) and epoch, through the key index (FORMAT.md, "keys.K") ----
  // Every lookup answers for the snapshot [0, size()) and never returns a row at or past it,
  // whatever writers do meanwhile. If the same (key, epoch) was appended more than once, find()
  // returns the later row and history() lists both. Rows past the key index's watermark (a
  // writer died before indexing them) and stores without a usable key index (format 1.0 before
  // any writer opened it, a damaged index file, or after a reboot before a writer recovered the
  // store) are answered by a scan of the offset index: same answers, slower; info().key_index
  // says which. Rows are the index of rows()/record(); check them with record().
  // find(key, epoch) answers from the index's slot alone (one load from memory): a slot damaged
  // in this boot (verify() finds it, and this Reader then scans) can name another key's row or
  // none. lookup() confirms the key and epoch of every row it returns, and a miss at an epoch
  // against the key's history, and on a mismatch stops using the index and scans. What no
  // lookup can see is a slot or chain link damaged into naming another row of the same key (an
  // older version: find(key) then answers it, history() skips versions); only verify() walks
  // every row against the index and finds it.
  std::optional<std::uint64_t> find(std::uint64_t key, std::uint64_t epoch) const;
  // The latest row of `key` (the highest row number).
  std::optional<std::uint64_t> find(std::uint64_t key) const;
  // Every row of `key` in commit order, with its epoch.
  std::vector<KeyVersion> history(std::uint64_t key) const;
  // The rows of `epoch` in commit order.
  std::vector<std::uint64_t> epoch_rows(std::uint64_t epoch) const;
  // The epochs present, ascending, with their row counts.
  std::vector<EpochRows> epochs() const;
  // out[i] = the row of keys[i], or -1 when there is none: at epochs[i] (epochs.size() ==
  // keys.size()), at epochs[0] for every key (epochs.size() == 1), or the latest (epochs
  // empty). kInvalidArgument for other sizes. Lock-free, vectorised (hashes and prefetches a
  // block of keys before resolving it).
  void find_many(std::span<const std::uint64_t> keys, std::span<const std::uint64_t> epochs,
                 std::span<std::int64_t> out) const;
  // Copies rows [begin, end) of the snapshot to `out` (out_bytes == (end - begin) * row_bytes,
  // else kInvalidArgument; a range outside the snapshot too): the same bytes rows() shows, as a
  // copy. For one pass over many rows in a process that has not touched them yet (an export, an
  // index build, a notebook's first scan), in pieces of a few MiB into one reused buffer: the
  // kernel copies from the page cache, where a first pass through a new mapping pays for every
  // 4 KiB page's page-table entry, on some VMs ~7x the copy (bench/RESULTS.md, "A fresh
  // process's scan: read() into a buffer"). Opens the rows file for the call (a Reader keeps no
  // descriptor); copies from the mapping instead for ranges under 256 KiB and wherever that file
  // cannot be used (removed by a truncate, not the file mapped, not openable). kIO naming the
  // file if a read fails. With ReadCheck::kChecksums every row copied is checked against its
  // checksum (verify()'s check, over the copy): the first that fails raises kCorruption naming
  // the row, its key and epoch, as record() does.
  void read(std::uint64_t begin, std::uint64_t end, void* out, std::size_t out_bytes,
            ReadCheck check = ReadCheck::kNone) const;
  // Copies rows[i] of the snapshot to out + i * row_bytes (one dense row-major matrix in the
  // store's dtype); a row of -1 (missing, as from find_many) becomes a row of zeros.
  // kInvalidArgument if out_bytes != rows.size() * row_bytes or a row is outside the snapshot.
  // With ReadCheck::kChecksums each row copied is checked over the copy, as read() does
  // (kCorruption naming the first that fails): what a get() of each row's key would check.
  void gather(std::span<const std::int64_t> rows, void* out, std::size_t out_bytes,
              ReadCheck check = ReadCheck::kNone) const;
  // The rows a `get` of `key` shows, checksum-checked and confirmed to be of `key` (and
  // `epoch`): the one at `epoch`, or the latest (no epoch), or every version (all_versions).
  // Empty when there is none. kCorruption if one fails its checksum. A key index that named
  // another key's row, or found no row at `epoch` where the key's history lists one, is marked
  // damaged (info().key_index says so) and the answer comes from a scan.
  std::vector<Record> lookup(std::uint64_t key, std::optional<std::uint64_t> epoch,
                             bool all_versions) const;

  std::uint32_t dim() const;
  DType dtype() const;
  const std::string& path() const;
  const std::string& metadata() const;
  // Header plus the counters as they are now; with kFull, key statistics for this snapshot (a
  // pass over the key table: milliseconds per million keys). After a reboot no Writer has
  // recovered the store from yet, the counters leave out the rows the next Writer's open cuts
  // (as found by the last open()/refresh()) and rows_to_cut counts them.
  StoreInfo info(InfoDetail detail = InfoDetail::kFull) const;

  // Keeps the mappings (and so every view taken so far) alive after this Reader is closed,
  // destroyed or move-assigned to.
  std::shared_ptr<const void> owner() const;
  // Drops this Reader's hold on the mappings (its key index's too); views stay valid only
  // through owner() copies. Calls that read the store throw kClosed afterwards; what the Reader
  // holds itself keeps answering: path(), metadata(), dim(), dtype(), and size() and
  // generation() of its last snapshot.
  void close();

  class Impl;

 private:
  explicit Reader(std::unique_ptr<Impl> impl);
  Impl& impl() const;  // *impl_; kClosed when moved from.
  std::unique_ptr<Impl> impl_;
};

// A Reader whose snapshot holds exactly the rows the store's counters, read here into `info`,
// count as committed, and with `info`'s key statistics those of that snapshot: every figure of
// one moment, whatever writers do meanwhile (a Reader's own info() reads the counters now, so
// with rows committed since its snapshot they count more rows than its key statistics do).
// read_info() is this info; `embstore info` scans this Reader. Throws as Reader::open().
Reader open_with_info(const std::string& path, StoreInfo& info);

}  // namespace embstore
