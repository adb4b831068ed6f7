#include "embstore/reader.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "embstore/error.h"
#include "format/format.h"
#include "index/store_keys.h"
#include "log/recovery.h"
#include "platform/os.h"
#include "storage/store_files.h"

namespace embstore {

using detail::StoreFiles;

class Reader::Impl {
 public:
  explicit Impl(std::unique_ptr<StoreFiles> files)
      : files_(std::move(files)),
        path_(files_->dir()),
        metadata_(files_->layout().metadata),
        dim_(files_->layout().dim),
        dtype_(files_->layout().dtype),
        keys_(detail::make_key_index_handle(*files_, detail::os::Access::kReadOnly)) {}

  std::shared_ptr<StoreFiles> files_;  // Shared with owner() copies; null after close().
  std::string path_;
  std::string metadata_;
  // Fixed for the store's life: kept, as the path and metadata are, so that they answer after
  // close() too.
  std::uint32_t dim_;
  DType dtype_;
  std::uint64_t snapshot_ = 0;
  std::uint64_t snapshot_generation_ = 0;  // The file generation snapshot_ counts rows of.
  // When refresh() last found the store at its path (kPathCheckInterval).
  std::chrono::steady_clock::time_point path_checked_{};
  // Rows [0, populated_) have page-table entries in this Reader's mapping (populate()); reset
  // when refresh() maps the files again at a new Generation, whose range has none.
  mutable std::atomic<std::uint64_t> populated_{0};

  // A fresh mapping has no page-table entries: the first scan of it pays a fault per few pages,
  // less with the entries filled in one call first (read_bench, BM_ScanViewCold; the figures:
  // bench/RESULTS.md, "Scan from a fresh Reader"). Done here, per requested range and once, so
  // open() stays O(1) and small reads (followers) pay no system call.
  void populate(const StoreFiles& f, std::uint64_t begin, std::uint64_t end) const {
    constexpr std::uint64_t kPopulateMinBytes = 1 << 20;
    const std::uint64_t done = populated_.load(std::memory_order_relaxed);
    const std::uint64_t from = begin <= done ? std::max(begin, done) : begin;
    if (from >= end || (end - from) * f.layout().record_bytes < kPopulateMinBytes) return;
    // Only what is in the page cache: a view of a whole store taken to read a few rows of it
    // must not read the store from the disk first (it did, synchronously, all of it).
    detail::os::populate_resident(f.row_ptr(from), (end - from) * f.layout().record_bytes);
    if (begin > done) return;  // A range past the populated prefix: not remembered.
    std::uint64_t seen = done;
    while (seen < end && !populated_.compare_exchange_weak(seen, end, std::memory_order_relaxed)) {
    }
  }
  // After a reboot, before any writer recovered the store: rows below this were verified.
  std::uint64_t verified_upto_ = 0;
  // After a reboot, before any writer recovered the store: the rows the loader keeps at the last
  // refresh(), which the next writer's open keeps too (the same loader). Empty in the same boot.
  std::optional<std::uint64_t> kept_rows_;
  // While a truncate's switch is decided and not finished (its writer died): the counters of
  // generation snapshot_generation_ as the loader derived them from its files at the last
  // refresh(); the state page's are half-stored and not read (FORMAT.md "Truncate").
  std::optional<detail::Counters> switching_;
  std::unique_ptr<detail::KeyIndexHandle> keys_;
  // The key index is opened at the first call that needs it, not at open: a Reader that never
  // looks a key up holds no mapping of it (thousands of Readers fit under vm.max_map_count).
  // Set once under keys_mutex_; refresh() keeps it current from then on.
  mutable std::atomic<bool> keys_opened_{false};
  mutable std::mutex keys_mutex_;
  // keys_->current() as of the last refresh: lookups use it without taking the handle's mutex.
  mutable std::shared_ptr<const detail::KeyIndexFile> key_index_;

  // Opens the key index on first use (concurrent const callers: one opens, all see it).
  // kClosed after close(), which drops the handle.
  detail::KeyIndexHandle& keys() const {
    files();
    if (!keys_opened_.load(std::memory_order_acquire)) {
      std::lock_guard guard(keys_mutex_);
      if (!keys_opened_.load(std::memory_order_relaxed)) {
        keys_->refresh();
        key_index_ = keys_->current();
        keys_opened_.store(true, std::memory_order_release);
      }
    }
    return *keys_;
  }

  // Runs f(const KeyQuery&) over this snapshot (store_keys.h).
  template <typename F>
  auto query(F&& f) const {
    const StoreFiles& f_files = files();
    detail::KeyIndexHandle& handle = keys();
    // After a lookup found the index damaged, the handle no longer offers it: scan.
    const detail::KeyIndexFile* index =
        key_index_ && handle.has_current() ? key_index_.get() : nullptr;
    return detail::with_key_query(handle, index, f_files, snapshot_, std::forward<F>(f));
  }

  void refresh_keys() {
    if (!keys_opened_.load(std::memory_order_acquire)) return;  // Opened when first needed.
    keys_->refresh();
    key_index_ = keys_->current();
  }

  StoreFiles& files() const {
    if (!files_) throw Error(ErrorCode::kClosed, path_ + ": the Reader is closed");
    return *files_;
  }

  // A store deleted, moved away or replaced at its path never commits another row that a
  // process opening the path would see: refresh() says so (kNotFound) instead of returning the
  // old snapshot for good (and wait() sleeping on a counter nobody raises). The path is looked
  // up at most this often (a stat, ~1 us, where a refresh with nothing new takes ~40 ns).
  static constexpr std::chrono::milliseconds kPathCheckInterval{50};

  std::uint64_t refresh() {
    StoreFiles& f = files();
    const auto now = std::chrono::steady_clock::now();
    if (now - path_checked_ >= kPathCheckInterval) {
      f.check_at_path();
      path_checked_ = now;
    }
    const detail::Generation* mapped = f.generation();
    // The one recovery loader (log/recovery.h), read-only: after a reboot, before any writer
    // recovered the store, it verifies the rows past `durable` and keeps whole valid batches.
    detail::LoadedLog log;
    try {
      log = detail::load_log(f, verified_upto_);
    } catch (...) {
      // The loader may have followed a truncate, and mapped the new files, before it failed:
      // the snapshot's rows are not at their places in them. The snapshot starts over, empty,
      // in the new generation (the next refresh() that succeeds fills it); views taken before
      // pin the old mapping and stay as they were. A failure before the new files were mapped
      // (one missing, say) leaves the snapshot over the mapping it was taken from.
      if (const detail::Generation* now = f.generation();
          now != nullptr && now->number() != snapshot_generation_) {
        start_generation(f.file_generation(), 0);
        verified_upto_ = 0;
        kept_rows_.reset();
        switching_.reset();
      }
      if (f.generation() != mapped) populated_.store(0, std::memory_order_relaxed);
      throw;
    }
    // A writer may have recovered the store meanwhile and appended over the scanned range (even
    // a batch it never published): then the scan proves nothing and the counter is the truth.
    // Recovery stores the boot id before any append, so an unchanged one means no row changed.
    if (f.generation() != mapped) populated_.store(0, std::memory_order_relaxed);
    if (!log.same_boot && f.same_boot()) return refresh();
    kept_rows_ = log.same_boot ? std::nullopt : std::optional(log.recovered.committed);
    switching_ = log.switching ? std::optional(log.stored) : std::nullopt;
    if (f.file_generation() != snapshot_generation_) {
      // A truncate switched the store to new files: the snapshot starts over in them.
      start_generation(f.file_generation(), log.recovered.committed);
      verified_upto_ = log.same_boot ? 0 : log.verified_upto;
    } else {
      if (!log.same_boot) verified_upto_ = std::max(verified_upto_, log.verified_upto);
      snapshot_ = std::max(snapshot_, log.recovered.committed);
    }
    // A key index from an earlier boot is refused (lookups scan) until a writer rebuilds it.
    refresh_keys();
    return snapshot_;
  }

  // The snapshot is of `rows` rows of generation `generation`'s files, and the key index of the
  // one before is never used again.
  void start_generation(std::uint64_t generation, std::uint64_t rows) {
    snapshot_generation_ = generation;
    snapshot_ = rows;
    keys_->reset_store_generation(generation);
    key_index_.reset();
  }

  // Of `committed`, read from the state page before this call: the rows the next writer's open
  // cuts (StoreInfo::rows_to_cut). Until a writer recovers the store after a reboot the page
  // still counts the rows the loader cut (refresh()). Recovery stores the boot id before any
  // append, so with the old one still there the counter can only have shrunk to the cut (a
  // recovery under way), not grown.
  std::uint64_t rows_to_cut(std::uint64_t committed) const {
    if (!kept_rows_ || files().same_boot()) return 0;
    return committed - std::min(committed, *kept_rows_);
  }

  // `info`, read from the state page, with the counters a truncate's unfinished switch leaves
  // half-stored replaced by those the loader derived (switching_), until a writer finishes the
  // switch: committed = durable = the new files' rows.
  void counters_while_switching(StoreInfo& info) const {
    if (!switching_ || !files().state().switching() || info.generation != snapshot_generation_) {
      return;
    }
    info.committed_rows = switching_->committed;
    info.durable_rows = switching_->durable;
    info.capacity_rows = switching_->capacity;
  }

  // kClosed first: a closed Reader says so, whatever the range.
  void check_range(std::uint64_t begin, std::uint64_t end, const char* what) const {
    files();
    if (begin > end || end > snapshot_) {
      throw Error(ErrorCode::kInvalidArgument,
                  path_ + ": " + what + "(" + std::to_string(begin) + ", " + std::to_string(end) +
                      ") is outside the snapshot of " + std::to_string(snapshot_) + " rows");
    }
  }
};

Reader::Reader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Reader::Reader(Reader&&) noexcept = default;
Reader& Reader::operator=(Reader&&) noexcept = default;
Reader::~Reader() = default;

Reader::Impl& Reader::impl() const {
  // A moved-from Reader has no Impl: its calls are refused rather than dereference null.
  if (!impl_) {
    throw Error(ErrorCode::kClosed, "this Reader was moved from; use the Reader it was moved to");
  }
  return *impl_;
}

Reader Reader::open(const std::string& path, const ReaderOptions& options) {
  auto impl = std::make_unique<Impl>(
      StoreFiles::open(path, detail::os::Access::kReadOnly, options.map_bytes));
  impl->refresh();
  impl->snapshot_ = std::min(impl->snapshot_, options.max_rows);
  return Reader(std::move(impl));
}

PrivateRows::PrivateRows(PrivateRows&& other) noexcept
    : map_(std::exchange(other.map_, nullptr)),
      map_bytes_(std::exchange(other.map_bytes_, 0)),
      data_(std::exchange(other.data_, nullptr)),
      rows_(std::exchange(other.rows_, 0)),
      bytes_(std::exchange(other.bytes_, 0)),
      copied_(std::exchange(other.copied_, false)) {}

PrivateRows& PrivateRows::operator=(PrivateRows&& other) noexcept {
  if (this != &other) {
    PrivateRows old(std::move(*this));
    new (this) PrivateRows(std::move(other));
  }
  return *this;
}

PrivateRows::~PrivateRows() {
  if (map_ != nullptr) detail::os::unmap(map_, map_bytes_);
}

PrivateRows Reader::private_rows(std::uint64_t begin, std::uint64_t end) const {
  impl().check_range(begin, end, "private_rows");
  const StoreFiles& f = impl().files();
  PrivateRows out;
  out.rows_ = end - begin;
  out.bytes_ = out.rows_ * f.layout().record_bytes;
  if (out.bytes_ == 0) return out;
  // The rows sit at begin * record_bytes in the data file, which the mapping maps from 0.
  const std::uint64_t offset = begin * f.layout().record_bytes;
  const std::uint64_t lead = offset % detail::kPageBytes;
  detail::RowCopier copier(f);
  if (const int fd = copier.descriptor(); fd >= 0) {
    // Its failure is said as it is: a copy would need as much memory (ENOMEM) or more.
    out.map_bytes_ = lead + out.bytes_;
    out.map_ = detail::os::map_private(fd, offset - lead, out.map_bytes_, f.data_path());
    out.data_ = static_cast<std::byte*>(out.map_) + lead;
    return out;
  }
  out.map_bytes_ = out.bytes_;
  out.map_ = detail::os::map_private(-1, 0, out.map_bytes_, f.data_path() + " (a copy)");
  out.data_ = static_cast<std::byte*>(out.map_);
  out.copied_ = true;
  copier.copy(begin, out.rows_, out.data_);
  return out;
}

std::uint64_t Reader::size() const { return impl().snapshot_; }
std::uint64_t Reader::generation() const { return impl().snapshot_generation_; }
std::uint64_t Reader::refresh() { return impl().refresh(); }

bool Reader::wait(std::uint64_t min_rows, std::chrono::nanoseconds timeout) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  // Saturate: nanoseconds::max() means "no deadline", not an overflowed one in the past.
  const auto deadline =
      timeout >= Clock::time_point::max() - start ? Clock::time_point::max() : start + timeout;
  // Sleep in bounded slices: the futex compares only the low 32 bits of the counter.
  constexpr std::int64_t kMaxSliceNs = 100'000'000;
  for (;;) {
    // Read the counter before refreshing: if it moves after this, the futex below returns at
    // once (no lost wake-up); if it does not, we sleep even when the snapshot cannot reach it
    // (after a reboot, unverifiable rows), instead of spinning.
    const std::uint64_t before = impl().files().state().committed();
    if (impl().refresh() >= min_rows) return true;
    const auto now = Clock::now();
    if (now >= deadline) return false;
    const std::int64_t left =
        deadline == Clock::time_point::max()
            ? kMaxSliceNs
            : std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
    detail::os::futex_wait(impl().files().state().committed_word(),
                           static_cast<std::uint32_t>(before), std::min(left, kMaxSliceNs));
  }
}

RowsView Reader::rows(std::uint64_t begin, std::uint64_t end) const {
  impl().check_range(begin, end, "rows");
  const StoreFiles& f = impl().files();
  const auto& layout = f.layout();
  impl().populate(f, begin, end);
  return RowsView{f.row_ptr(begin), begin,        end - begin,
                  layout.dim,       layout.dtype, layout.record_bytes};
}

StridedView<std::uint64_t> Reader::keys(std::uint64_t begin, std::uint64_t end) const {
  impl().check_range(begin, end, "keys");
  const auto* entry = reinterpret_cast<const std::byte*>(impl().files().entry_ptr(begin));
  return {entry + offsetof(detail::IndexEntry, key), end - begin, detail::kIndexEntryBytes};
}

StridedView<std::uint64_t> Reader::epochs(std::uint64_t begin, std::uint64_t end) const {
  impl().check_range(begin, end, "epochs");
  const auto* entry = reinterpret_cast<const std::byte*>(impl().files().entry_ptr(begin));
  return {entry + offsetof(detail::IndexEntry, epoch), end - begin, detail::kIndexEntryBytes};
}

namespace {

// verify() reads and checks rows this many bytes at a time (at least one row), into a buffer
// that stays in the second-level cache while it is hashed.
constexpr std::uint64_t kVerifyPieceBytes = 1024 * 1024;

// kCorruption for row `row` of `f`, which fails its checksum (record(), read()).
[[noreturn]] void row_fails_checksum(const StoreFiles& f, std::uint64_t row) {
  detail::IndexEntry entry;
  std::memcpy(&entry, f.entry_ptr(row), sizeof(entry));
  throw Error(ErrorCode::kCorruption, f.data_path() + ": row " + std::to_string(row) + " (key " +
                                          std::to_string(entry.key) + ", epoch " +
                                          std::to_string(entry.epoch) + ") fails its checksum in " +
                                          f.index_path());
}

}  // namespace

Record Reader::record(std::uint64_t row) const {
  const StoreFiles& f = impl().files();  // kClosed first, whatever the row.
  if (row >= impl().snapshot_) {
    throw Error(ErrorCode::kInvalidArgument, impl().path_ + ": row " + std::to_string(row) +
                                                 " is outside the snapshot of " +
                                                 std::to_string(impl().snapshot_) + " rows");
  }
  if (!f.row_valid(row)) row_fails_checksum(f, row);
  detail::IndexEntry entry;
  std::memcpy(&entry, f.entry_ptr(row), sizeof(entry));
  return Record{row, entry.key, entry.epoch, f.row_ptr(row)};
}

void Reader::read(std::uint64_t begin, std::uint64_t end, void* out, std::size_t out_bytes,
                  ReadCheck check) const {
  impl().check_range(begin, end, "read");
  const StoreFiles& f = impl().files();
  const std::uint64_t row_bytes = f.layout().record_bytes;
  if (out_bytes != (end - begin) * row_bytes) {
    throw Error(ErrorCode::kInvalidArgument, impl().path_ + ": read: " + std::to_string(out_bytes) +
                                                 " bytes for " + std::to_string(end - begin) +
                                                 " rows of " + std::to_string(row_bytes));
  }
  if (end == begin) return;
  if (out == nullptr) {
    throw Error(ErrorCode::kInvalidArgument, impl().path_ + ": read: out is null");
  }
  auto* rows = static_cast<std::byte*>(out);
  detail::RowCopier(f).copy(begin, end - begin, rows);
  if (check == ReadCheck::kNone) return;
  for (std::uint64_t row = begin; row < end; ++row) {
    if (!f.row_valid(row, rows + (row - begin) * row_bytes)) row_fails_checksum(f, row);
  }
}

VerifyReport Reader::verify(std::uint64_t begin, std::uint64_t end) const {
  impl().check_range(begin, end, "verify");
  const StoreFiles& f = impl().files();
  VerifyReport report;
  report.begin_row = begin;
  report.end_row = end;
  // Read, not hashed through the mapping: `embstore verify` runs in a fresh process (read()).
  const std::uint64_t row_bytes = f.layout().record_bytes;
  const std::uint64_t per_piece = std::max<std::uint64_t>(1, kVerifyPieceBytes / row_bytes);
  std::vector<std::byte> piece(std::min(end - begin, per_piece) * row_bytes);
  detail::RowCopier copier(f);
  for (std::uint64_t first = begin; first < end; first += per_piece) {
    const std::uint64_t count = std::min(per_piece, end - first);
    copier.copy(first, count, piece.data());
    for (std::uint64_t i = 0; i < count; ++i) {
      const std::uint64_t row = first + i;
      ++report.rows_checked;
      if (f.row_valid(row, piece.data() + i * row_bytes)) continue;
      ++report.bad_row_count;
      if (report.bad_rows.size() < VerifyReport::kMaxListed) report.bad_rows.push_back(row);
    }
  }
  if (begin == 0 && end == impl().snapshot_) {
    const VerifyReport keys = verify_key_index();
    report.key_index_checked = keys.key_index_checked;
    report.key_index_problems = keys.key_index_problems;
    report.key_index_problem = keys.key_index_problem;
    report.header_problem = verify_header();
    report.rows_to_cut = impl().rows_to_cut(f.state().committed());
  }
  return report;
}

std::string Reader::verify_header() const { return impl().files().header_copy_problem(); }

VerifyReport Reader::verify_key_index() const {
  const StoreFiles& f = impl().files();
  VerifyReport report;
  report.begin_row = 0;
  report.end_row = impl().snapshot_;
  if (const auto index = impl().keys().current()) {
    report.key_index_checked = true;
    try {
      report.key_index_problems =
          index->check(f.entry_ptr(0), std::min(impl().snapshot_, index->indexed_rows()),
                       &report.key_index_problem);
      // Damage inside the tables (a header that opens well): lookups through them could miss
      // rows or name others, so this Reader scans from now on. Nothing at open can see it
      // (checking every slot is O(n)); Writer::rebuild_key_index() repairs it.
      if (report.key_index_problems > 0) {
        impl().keys().mark_damaged("verify found " + std::to_string(report.key_index_problems) +
                                   " problems: " + report.key_index_problem);
      }
    } catch (const Error& error) {
      if (error.code() == ErrorCode::kNotFound) {
        // Replaced by a newer generation while being checked: refresh() and verify again.
        report.key_index_checked = false;
      } else {
        if (error.code() != ErrorCode::kCorruption) throw;
        report.key_index_problems = 1;
        report.key_index_problem = error.what();
        // The check stopped at damage it could not walk past: as above, lookups scan.
        impl().keys().mark_damaged("verify: " + report.key_index_problem);
      }
    }
  } else if (impl().keys().damaged() && f.layout().key_index) {
    // Damage only where writers keep a key index. In a store created without one, a file that
    // `key_generation` names (built by a library before 1.4, or the word itself damaged) is used
    // while it is sound, and when it is missing or unsound nothing is lost and no writer is
    // expected to rebuild it: lookups scan, as they always do there.
    report.key_index_checked = true;
    report.key_index_problems = 1;
    report.key_index_problem = impl().keys().status();
  }
  return report;
}

std::uint32_t Reader::dim() const { return impl().dim_; }
DType Reader::dtype() const { return impl().dtype_; }
const std::string& Reader::path() const { return impl().path_; }
const std::string& Reader::metadata() const { return impl().metadata_; }
StoreInfo Reader::info(InfoDetail detail) const {
  StoreInfo info = impl().files().info();
  impl().counters_while_switching(info);
  info.rows_to_cut = impl().rows_to_cut(info.committed_rows);
  info.committed_rows -= info.rows_to_cut;
  info.durable_rows = std::min(info.durable_rows, info.committed_rows);
  if (detail == InfoDetail::kFull) {
    detail::fill_key_info(impl().keys(), impl().files(), impl().snapshot_, info);
  }
  return info;
}

std::optional<std::uint64_t> Reader::find(std::uint64_t key, std::uint64_t epoch) const {
  return impl().query([&](const detail::KeyQuery& q) { return q.find(key, epoch); });
}

std::optional<std::uint64_t> Reader::find(std::uint64_t key) const {
  return impl().query([&](const detail::KeyQuery& q) { return q.find_latest(key); });
}

std::vector<KeyVersion> Reader::history(std::uint64_t key) const {
  std::vector<std::uint64_t> epochs;
  const std::vector<std::uint64_t> rows =
      impl().query([&](const detail::KeyQuery& q) { return q.history(key, &epochs); });
  std::vector<KeyVersion> out;
  out.reserve(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) out.push_back({rows[i], epochs[i]});
  return out;
}

std::vector<std::uint64_t> Reader::epoch_rows(std::uint64_t epoch) const {
  return impl().query([&](const detail::KeyQuery& q) { return q.epoch_rows(epoch); });
}

std::vector<EpochRows> Reader::epochs() const {
  const auto counts = impl().query([](const detail::KeyQuery& q) { return q.epochs(); });
  std::vector<EpochRows> out;
  out.reserve(counts.size());
  for (const auto& c : counts) out.push_back({c.epoch, c.rows});
  return out;
}

void Reader::find_many(std::span<const std::uint64_t> keys, std::span<const std::uint64_t> epochs,
                       std::span<std::int64_t> out) const {
  if (out.size() != keys.size() || (epochs.size() > 1 && epochs.size() != keys.size())) {
    throw Error(ErrorCode::kInvalidArgument,
                impl().path_ + ": find_many: " + std::to_string(keys.size()) + " keys, " +
                    std::to_string(epochs.size()) + " epochs (want as many as keys, 1 or 0) and " +
                    std::to_string(out.size()) + " outputs");
  }
  impl().query([&](const detail::KeyQuery& q) {
    q.find_many(keys, epochs, out.data());
    return 0;
  });
}

void Reader::gather(std::span<const std::int64_t> rows, void* out, std::size_t out_bytes,
                    ReadCheck check) const {
  const Impl& self = impl();
  const StoreFiles& f = self.files();
  const std::uint64_t row_bytes = f.layout().record_bytes;
  if (out_bytes != rows.size() * row_bytes) {
    throw Error(ErrorCode::kInvalidArgument, self.path_ + ": gather: " + std::to_string(out_bytes) +
                                                 " bytes for " + std::to_string(rows.size()) +
                                                 " rows of " + std::to_string(row_bytes));
  }
  if (out == nullptr && !rows.empty()) {
    throw Error(ErrorCode::kInvalidArgument, self.path_ + ": gather: out is null");
  }
  const std::uint64_t snapshot = self.snapshot_;
  auto* dest = static_cast<std::byte*>(out);
  for (std::size_t i = 0; i < rows.size(); ++i, dest += row_bytes) {
    const std::int64_t row = rows[i];
    if (row == -1) {
      std::memset(dest, 0, row_bytes);
      continue;
    }
    if (row < 0 || static_cast<std::uint64_t>(row) >= snapshot) {
      throw Error(ErrorCode::kInvalidArgument, self.path_ + ": gather: row " + std::to_string(row) +
                                                   " is outside the snapshot of " +
                                                   std::to_string(snapshot) + " rows");
    }
    std::memcpy(dest, f.row_ptr(static_cast<std::uint64_t>(row)), row_bytes);
    if (check == ReadCheck::kChecksums && !f.row_valid(static_cast<std::uint64_t>(row), dest)) {
      row_fails_checksum(f, static_cast<std::uint64_t>(row));
    }
  }
}

std::vector<Record> Reader::lookup(std::uint64_t key, std::optional<std::uint64_t> epoch,
                                   bool all_versions) const {
  // find() answers from a key index slot alone (one load from memory), so a damaged slot can
  // name another key's row. The records read here carry each row's own key and epoch, which
  // catches that at no cost: the index is then left unused, as when a lookup finds it damaged
  // (a writer rebuilds it), and the scan of the offset index answers instead.
  auto answer = [&] {
    std::vector<Record> out;
    if (all_versions) {
      for (const KeyVersion& v : history(key)) {
        if (!epoch || v.epoch == *epoch) out.push_back(record(v.row));
      }
    } else if (const auto row = epoch ? find(key, *epoch) : find(key)) {
      out.push_back(record(*row));
    }
    return out;
  };
  std::vector<Record> out = answer();
  if (out.empty() && epoch && !all_versions) {
    // A miss the key's own history contradicts (its pair slot lost, the chain intact): the
    // tables are damaged, as above. One more walk, only for a key present at other epochs.
    for (const KeyVersion& v : history(key)) {
      if (v.epoch != *epoch) continue;
      impl().keys().mark_damaged("a lookup of key " + std::to_string(key) + " epoch " +
                                 std::to_string(*epoch) +
                                 " found no row, but its history has row " + std::to_string(v.row));
      return answer();
    }
  }
  for (const Record& r : out) {
    if (r.key == key && (!epoch || r.epoch == *epoch)) continue;
    impl().keys().mark_damaged("a lookup of key " + std::to_string(key) +
                               (epoch ? " epoch " + std::to_string(*epoch) : std::string()) +
                               " was answered with row " + std::to_string(r.row) + " (key " +
                               std::to_string(r.key) + ", epoch " + std::to_string(r.epoch) + ")");
    return answer();
  }
  return out;
}

std::shared_ptr<const void> Reader::owner() const {
  impl().files();
  return impl().files_;
}

void Reader::close() {
  if (!impl_) return;  // Moved from: holds nothing.
  impl_->files_.reset();
  // The key index's mapping too: no view points into it, and a closed Reader holds nothing of
  // its store (the files can be removed and their file system unmounted).
  impl_->key_index_.reset();
  impl_->keys_.reset();
}

}  // namespace embstore
