#include "embstore/reader.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>

#include "embstore/error.h"
#include "format/format.h"
#include "log/recovery.h"
#include "platform/os.h"
#include "storage/store_files.h"

namespace embstore {

using detail::StoreFiles;

class Reader::Impl {
 public:
  explicit Impl(std::unique_ptr<StoreFiles> files)
      : files_(std::move(files)), path_(files_->dir()), metadata_(files_->layout().metadata) {}

  std::shared_ptr<StoreFiles> files_;  // Shared with owner() copies; null after close().
  std::string path_;
  std::string metadata_;
  std::uint64_t snapshot_ = 0;
  // Rows [0, populated_) have page-table entries in this Reader's mapping (populate()).
  mutable std::atomic<std::uint64_t> populated_{0};

  // A fresh mapping has no page-table entries: the first scan of it paid ~0.8x of a scan of
  // private memory in CPU time, and ~1.0x with the entries filled in one call first (read_bench,
  // BM_ScanViewCold; bench/RESULTS.md, "Scan from a fresh Reader"). Done here, per requested
  // range and once, so open() stays O(1) and small reads (followers) pay no system call.
  void populate(const StoreFiles& f, std::uint64_t begin, std::uint64_t end) const {
    constexpr std::uint64_t kPopulateMinBytes = 1 << 20;
    const std::uint64_t done = populated_.load(std::memory_order_relaxed);
    const std::uint64_t from = begin <= done ? std::max(begin, done) : begin;
    if (from >= end || (end - from) * f.layout().record_bytes < kPopulateMinBytes) return;
    detail::os::populate_read(f.row_ptr(from), (end - from) * f.layout().record_bytes);
    if (begin > done) return;  // A range past the populated prefix: not remembered.
    std::uint64_t seen = done;
    while (seen < end && !populated_.compare_exchange_weak(seen, end, std::memory_order_relaxed)) {
    }
  }
  // After a reboot, before any writer recovered the store: rows below this were verified.
  std::uint64_t verified_upto_ = 0;

  StoreFiles& files() const {
    if (!files_) throw Error(ErrorCode::kClosed, path_ + ": the Reader is closed");
    return *files_;
  }

  std::uint64_t refresh() {
    StoreFiles& f = files();
    // The one recovery loader (log/recovery.h), read-only: after a reboot, before any writer
    // recovered the store, it verifies the rows past `durable` and keeps whole valid batches.
    const detail::LoadedLog log = detail::load_log(f, verified_upto_);
    // A writer may have recovered the store meanwhile and appended over the scanned range (even
    // a batch it never published): then the scan proves nothing and the counter is the truth.
    // Recovery stores the boot id before any append, so an unchanged one means no row changed.
    if (!log.same_boot && f.same_boot()) return refresh();
    if (!log.same_boot) verified_upto_ = std::max(verified_upto_, log.verified_upto);
    snapshot_ = std::max(snapshot_, log.recovered.committed);
    return snapshot_;
  }

  void check_range(std::uint64_t begin, std::uint64_t end, const char* what) const {
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

Reader Reader::open(const std::string& path, const ReaderOptions& options) {
  auto impl = std::make_unique<Impl>(
      StoreFiles::open(path, detail::os::Access::kReadOnly, options.map_bytes));
  impl->refresh();
  return Reader(std::move(impl));
}

std::uint64_t Reader::size() const { return impl_->snapshot_; }
std::uint64_t Reader::refresh() { return impl_->refresh(); }

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
    const std::uint64_t before = impl_->files().state().committed();
    if (impl_->refresh() >= min_rows) return true;
    const auto now = Clock::now();
    if (now >= deadline) return false;
    const std::int64_t left =
        deadline == Clock::time_point::max()
            ? kMaxSliceNs
            : std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
    detail::os::futex_wait(impl_->files().state().committed_word(),
                           static_cast<std::uint32_t>(before), std::min(left, kMaxSliceNs));
  }
}

RowsView Reader::rows(std::uint64_t begin, std::uint64_t end) const {
  impl_->check_range(begin, end, "rows");
  const StoreFiles& f = impl_->files();
  const auto& layout = f.layout();
  impl_->populate(f, begin, end);
  return RowsView{f.row_ptr(begin), begin,        end - begin,
                  layout.dim,       layout.dtype, layout.record_bytes};
}

StridedView<std::uint64_t> Reader::keys(std::uint64_t begin, std::uint64_t end) const {
  impl_->check_range(begin, end, "keys");
  const auto* entry = reinterpret_cast<const std::byte*>(impl_->files().entry_ptr(begin));
  return {entry + offsetof(detail::IndexEntry, key), end - begin, detail::kIndexEntryBytes};
}

StridedView<std::uint64_t> Reader::epochs(std::uint64_t begin, std::uint64_t end) const {
  impl_->check_range(begin, end, "epochs");
  const auto* entry = reinterpret_cast<const std::byte*>(impl_->files().entry_ptr(begin));
  return {entry + offsetof(detail::IndexEntry, epoch), end - begin, detail::kIndexEntryBytes};
}

Record Reader::record(std::uint64_t row) const {
  if (row >= impl_->snapshot_) {
    throw Error(ErrorCode::kInvalidArgument, impl_->path_ + ": row " + std::to_string(row) +
                                                 " is outside the snapshot of " +
                                                 std::to_string(impl_->snapshot_) + " rows");
  }
  const StoreFiles& f = impl_->files();
  detail::IndexEntry entry;
  std::memcpy(&entry, f.entry_ptr(row), sizeof(entry));
  if (!f.row_valid(row)) {
    throw Error(ErrorCode::kCorruption, f.data_path() + ": row " + std::to_string(row) + " (key " +
                                            std::to_string(entry.key) + ", epoch " +
                                            std::to_string(entry.epoch) +
                                            ") fails its checksum in " + f.index_path());
  }
  return Record{row, entry.key, entry.epoch, f.row_ptr(row)};
}

VerifyReport Reader::verify(std::uint64_t begin, std::uint64_t end) const {
  impl_->check_range(begin, end, "verify");
  const StoreFiles& f = impl_->files();
  VerifyReport report;
  report.begin_row = begin;
  report.end_row = end;
  for (std::uint64_t row = begin; row < end; ++row) {
    ++report.rows_checked;
    if (f.row_valid(row)) continue;
    ++report.bad_row_count;
    if (report.bad_rows.size() < VerifyReport::kMaxListed) report.bad_rows.push_back(row);
  }
  return report;
}

std::uint32_t Reader::dim() const { return impl_->files().layout().dim; }
DType Reader::dtype() const { return impl_->files().layout().dtype; }
const std::string& Reader::path() const { return impl_->path_; }
const std::string& Reader::metadata() const { return impl_->metadata_; }
StoreInfo Reader::info() const { return impl_->files().info(); }

std::shared_ptr<const void> Reader::owner() const {
  impl_->files();
  return impl_->files_;
}

void Reader::close() { impl_->files_.reset(); }

}  // namespace embstore
