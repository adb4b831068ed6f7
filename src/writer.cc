#include "embstore/writer.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <thread>
#include <vector>

#include "checksum.h"
#include "convert.h"
#include "convert_fast.h"
#include "embstore/error.h"
#include "format.h"
#include "index/store_keys.h"
#include "lock.h"
#include "os.h"
#include "store_files.h"
#include "testing.h"

namespace embstore {

using detail::IndexEntry;
using detail::StoreFiles;

class Writer::Impl {
 public:
  Impl(std::unique_ptr<StoreFiles> files, const WriterOptions& options)
      : files_(std::move(files)),
        path_(files_->dir()),
        lock_(std::make_unique<detail::WriterLock>(path_ + "/" + detail::kLockFileName)),
        options_(options),
        owner_pid_(detail::os::current_pid()) {
    {
      detail::LockGuard guard(*lock_);
      recover();
      files_->map_rows(files_->state().capacity());
      open_key_index();
    }
    if (options_.sync == SyncPolicy::kInterval) {
      sync_thread_ = std::make_unique<std::thread>([this] { sync_loop(); });
    }
  }

  // Never runs in a forked child: Writer leaks its Impl there (release_impl below).
  ~Impl() {
    try {
      close();
    } catch (...) {
      // Destructors never throw; call close() to see a final sync's error.
    }
  }

  std::uint64_t append(std::span<const std::uint64_t> keys, const std::uint64_t* epochs,
                       std::uint64_t single_epoch, const ConstMatrix& rows);
  void sync();
  void close();
  void rebuild_key_index() {
    join_growth(/*abandon=*/true);
    std::shared_lock life(lifetime_);
    check_usable();
    std::lock_guard in_process(mutex_);
    detail::LockGuard across_processes(*lock_);
    const std::uint64_t committed = files_->state().committed();
    files_->map_rows(committed);
    keys_->open_for_writer(files_->entry_ptr(0), committed, /*rebuild=*/true);
    keys_usable_ = true;
  }
  // Runs f(files) with the store kept open for the call: a concurrent close() waits. For
  // accessors: a poisoned writer still reports its counters.
  template <typename F>
  auto with_files(F&& f) const {
    std::shared_lock life(lifetime_);
    check_open();
    return f(static_cast<const StoreFiles&>(*files_));
  }
  const std::string& path() const { return path_; }
  StoreInfo info() const {
    return with_files([this](const StoreFiles& f) {
      StoreInfo info = f.info();
      if (keys_) detail::fill_key_info(*keys_, f, info.committed_rows, info);
      return info;
    });
  }
  bool in_owner_process() const { return detail::os::current_pid() == owner_pid_; }

 private:
  void check_open() const;    // Same process, not closed.
  void check_usable() const;  // check_open() and not poisoned.
  void flush();               // The sync itself; callers hold lifetime_ and have checked usability.
  // The era this handle may write entries with, made durable first (see FORMAT.md, "era").
  // Caller holds the writer lock.
  std::uint64_t writable_era(std::uint64_t first);
  void recover();
  // Writer lock held: opens, rebuilds or catches up the key index (index/key_index_handle.h).
  // A failure leaves the store usable: this handle stops indexing, lookups scan.
  void open_key_index();
  // Records the first key index failure; this handle stops indexing (close() reports it).
  void key_index_failed(const Error& error);
  // Writer lock held, after a publish: indexes the new rows; true when a growth was claimed.
  bool index_keys(std::uint64_t committed);
  // Runs on growth_thread_: builds the larger key index without the lock, then switches to it.
  void grow_key_index();
  // Waits for the growth thread; `abandon` makes it stop early (drops the claim, builds nothing).
  void join_growth(bool abandon);
  void sync_loop();
  // How an append of n rows writes them and their entries (above the definition: why).
  struct WritePlan;
  WritePlan plan_writes(std::uint64_t n) const;
  // Copies n rows, `stride` bytes apart at `source`, into the data file from row `first`.
  void write_rows(std::uint64_t first, const std::byte* source, std::uint64_t stride,
                  std::uint64_t n, bool by_syscall);
  [[noreturn]] void poison(const Error& error);

  std::unique_ptr<StoreFiles> files_;  // Released by close().
  std::string path_;
  std::unique_ptr<detail::WriterLock> lock_;  // Released by close().
  WriterOptions options_;
  int owner_pid_;
  // Held shared by every call that uses files_, exclusively by close() to release them.
  mutable std::shared_mutex lifetime_;
  std::mutex close_mutex_;  // Serializes close() calls.
  std::mutex mutex_;        // Serializes appends of this handle's threads; the OFD lock serializes
                            // this handle against every other handle and process.
  std::atomic<bool> closed_{false};
  std::atomic<bool> poisoned_{false};
  std::mutex poison_mutex_;
  std::string poison_message_;    // Written once, under poison_mutex_, before poisoned_ is set.
  std::uint64_t synced_era_ = 0;  // Highest era this handle has seen durable. Under mutex_.
  std::unique_ptr<detail::KeyIndexHandle> keys_;
  std::atomic<bool> keys_usable_{false};
  std::optional<Error> key_index_error_;        // Under poison_mutex_.
  std::unique_ptr<std::thread> growth_thread_;  // Under mutex_.
  std::atomic<bool> stop_growth_{false};
  std::unique_ptr<std::thread> sync_thread_;
  std::mutex sync_mutex_;
  std::condition_variable sync_cv_;
  bool stop_sync_ = false;
};

// Two ways to put rows and index entries into the page cache, each the faster one for its size
// (measured with bench/append_bench on ext4; bench/RESULTS.md, "write path"):
//   - memcpy through the writer's mapping: no system call, but the first write-touch of each
//     fresh page faults (~1 us: page allocation, zeroing, page_mkwrite). 1 row of 768 x f32:
//     3.0 us per append, against 5.0 us with pwritev; 8 rows (24 KiB): 10.7 against 11.7 us.
//   - pwritev on the file: one system call, and the kernel allocates each page-cache page and
//     copies into it without zeroing or mapping it, into file space already allocated (no block
//     allocation either). 16 rows of 768 x f32 (48 KiB): 14.7 us against 19.5 us through the
//     mapping; 64 rows: 38 against 74 us; 512 rows (1.5 MiB): ~235 us against 400-620 us.
//     The entries of 512 rows of 64 x f32 (16 KiB): 41 us per append against 50 us through the
//     mapping; of 128 rows (4 KiB): 15.0 against 15.7 us; of 64 rows: no gain.
// Readers cannot tell them apart: both write the one page cache their mappings show, before the
// release store of `committed` that publishes the rows.
constexpr std::uint64_t kRowsSyscallMinBytes = 32 * 1024;
constexpr std::uint64_t kEntriesSyscallMinBytes = 4 * 1024;
// Pieces per system call: strided rows (one iovec each) and index entries (32 KiB), so the
// buffers they are gathered in stay small whatever the batch size.
constexpr std::uint64_t kRowsPerWritev = 1024;
constexpr std::uint64_t kEntriesPerWrite = 1024;

struct Writer::Impl::WritePlan {
  bool rows_by_syscall;
  bool entries_by_syscall;
};

Writer::Impl::WritePlan Writer::Impl::plan_writes(std::uint64_t n) const {
  // Test builds may impose a combination (testing.h, EMBSTORE_WRITE_PATH).
  if (const detail::testing::WritePath forced = EMBSTORE_WRITE_PATH(); forced.forced) {
    return {forced.rows_by_syscall, forced.entries_by_syscall};
  }
  return {n * files_->layout().record_bytes >= kRowsSyscallMinBytes,
          n * sizeof(IndexEntry) >= kEntriesSyscallMinBytes};
}

void Writer::Impl::write_rows(std::uint64_t first, const std::byte* source, std::uint64_t stride,
                              std::uint64_t n, bool by_syscall) {
  const std::uint64_t record_bytes = files_->layout().record_bytes;
  const bool packed = stride == record_bytes;
  if (!by_syscall) {
    std::byte* dest = files_->row_ptr(first);
    if (packed) {
      std::memcpy(dest, source, n * record_bytes);
    } else {
      for (std::uint64_t i = 0; i < n; ++i) {
        std::memcpy(dest + i * record_bytes, source + i * stride, record_bytes);
      }
    }
    return;
  }
  if (packed) {
    const detail::os::Chunk all{source, n * record_bytes};
    detail::os::write_chunks(files_->data_fd(), &all, 1, first * record_bytes, files_->data_path());
    return;
  }
  detail::os::Chunk window[kRowsPerWritev];
  for (std::uint64_t begin = 0; begin < n; begin += kRowsPerWritev) {
    const std::uint64_t count = std::min(kRowsPerWritev, n - begin);
    for (std::uint64_t i = 0; i < count; ++i) {
      window[i] = {source + (begin + i) * stride, record_bytes};
    }
    detail::os::write_chunks(files_->data_fd(), window, count, (first + begin) * record_bytes,
                             files_->data_path());
  }
}

void Writer::Impl::check_usable() const {
  check_open();
  if (poisoned_.load(std::memory_order_acquire)) {
    throw Error(ErrorCode::kPoisoned, poison_message_);
  }
}

void Writer::Impl::check_open() const {
  if (detail::os::current_pid() != owner_pid_) {
    throw Error(ErrorCode::kForkedChild, path_ + ": this Writer was opened by process " +
                                             std::to_string(owner_pid_) +
                                             "; a forked child must open its own Writer");
  }
  if (closed_.load()) throw Error(ErrorCode::kClosed, path_ + ": the Writer is closed");
}

// Runs under the writer lock at open. After a process crash (same boot) the page cache holds
// every committed row, so only the counters are checked: O(1). After a reboot any unsynced page
// may be stale or torn, so rows past `durable` are re-checked and the commit counter is cut back
// to the longest valid prefix. Interrupted at any point, it reaches the same result when re-run:
// the boot id is stored last.
void Writer::Impl::recover() {
  auto& state = files_->state();
  const std::string& header = files_->header_path();
  std::uint64_t durable = state.durable();
  std::uint64_t committed = state.committed();
  std::uint64_t capacity = state.capacity();
  const std::uint64_t files_hold = files_->rows_files_hold();

  if (files_->same_boot()) {
    auto corrupt = [&](const std::string& what) {
      throw Error(ErrorCode::kCorruption, header + ": " + what);
    };
    if (capacity > files_hold) {
      corrupt("field capacity_rows " + std::to_string(capacity) + " exceeds the " +
              std::to_string(files_hold) + " rows that " + files_->data_path() + " and " +
              files_->index_path() + " hold");
    }
    if (committed > capacity) {
      corrupt("field committed_rows " + std::to_string(committed) + " exceeds capacity_rows " +
              std::to_string(capacity));
    }
    if (durable > committed) {
      corrupt("field durable_rows " + std::to_string(durable) + " exceeds committed_rows " +
              std::to_string(committed));
    }
    return;
  }

  // After a power loss the files may be shorter than counters flushed before them.
  capacity = std::min(capacity, files_hold);
  committed = std::min(committed, capacity);
  durable = std::min(durable, committed);
  files_->map_rows(committed);
  EMBSTORE_CRASH_POINT("during-recovery");
  // Cutting at the first bad row could leave the front of a torn batch visible: cut at the end
  // of the last whole batch before it (every batch's last entry carries kEntryBatchEnd).
  const std::uint64_t valid = files_->valid_batch_prefix(durable, committed);
  std::uint64_t boot[2];
  const bool boot_known = detail::os::boot_id(boot);
  state.set_capacity(capacity);
  state.publish_committed(valid);
  // The verified rows were read back from the device (the page cache began empty in this boot),
  // so they are durable: the next reboot need not check them again. Without a boot id that is
  // not known, and durable stays.
  state.set_durable(boot_known ? valid : durable);
  // Entries past the cut may still validate; everything written from now on carries a newer
  // era, so a later power loss can never splice them back in (FORMAT.md, "era").
  state.set_era(state.era() + 1);
  state.set_boot_id(boot);
  detail::os::datasync(files_->header_fd(), header);
  synced_era_ = state.era();
}

void Writer::Impl::open_key_index() {
  keys_ = detail::make_key_index_handle(*files_, detail::os::Access::kReadWrite);
  try {
    keys_->open_for_writer(files_->entry_ptr(0), files_->state().committed());
    keys_usable_ = true;
  } catch (const Error& error) {
    // No room to rebuild the key index: the store itself is fine, so the writer opens; lookups
    // scan, close() reports it, and the next writer rebuilds. Any other failure fails the open.
    if (error.code() != ErrorCode::kFull) throw;
    key_index_failed(error);
  }
}

void Writer::Impl::key_index_failed(const Error& error) {
  keys_usable_ = false;
  std::lock_guard guard(poison_mutex_);
  if (!key_index_error_) key_index_error_.emplace(error);
}

bool Writer::Impl::index_keys(std::uint64_t committed) {
  if (!keys_usable_) return false;
  try {
    return keys_->after_publish(files_->entry_ptr(0), committed);
  } catch (const Error& error) {
    // The rows are published: the append succeeded and must not throw (a retry would store them
    // twice). This handle stops indexing; close() reports it; the next writer indexes the rows.
    key_index_failed(error);
    return false;
  }
}

void Writer::Impl::grow_key_index() {
  const detail::IndexEntry* entries = files_->entry_ptr(0);
  // Rows this handle may read without the lock: committed, and inside its own mapping.
  auto bound = [this] {
    std::lock_guard guard(mutex_);
    return std::min(files_->state().committed(), files_->mapped_rows());
  };
  for (bool again = true; again;) {
    std::shared_ptr<detail::KeyIndexFile> next;
    try {
      next = keys_->build_next(entries, bound, stop_growth_);
    } catch (const Error& error) {
      key_index_failed(error);  // finish_growth(null) drops the claim.
      next.reset();
    }
    std::lock_guard in_process(mutex_);
    try {
      detail::LockGuard across_processes(*lock_);
      const std::uint64_t committed = files_->state().committed();
      files_->map_rows(committed);
      again = keys_->finish_growth(std::move(next), entries, committed) && !stop_growth_;
    } catch (const Error& error) {
      key_index_failed(error);
      again = false;
    }
  }
}

void Writer::Impl::join_growth(bool abandon) {
  std::unique_ptr<std::thread> thread;
  {
    std::lock_guard guard(mutex_);
    thread = std::move(growth_thread_);
  }
  if (thread) {
    stop_growth_ = abandon;
    thread->join();
  }
}

std::uint64_t Writer::Impl::writable_era(std::uint64_t first) {
  auto& state = files_->state();
  std::uint64_t era = state.era();
  // Entries at `first` that carry the current era were left by a writer killed before it
  // published: a newer era makes them lose to this append's entries on any later recovery.
  IndexEntry at_first;
  std::memcpy(&at_first, files_->entry_ptr(first), sizeof(at_first));
  const bool stale = (at_first.row != 0 || at_first.checksum != 0) &&
                     detail::entry_era(at_first.row) == (era & detail::kEntryEraMask);
  if (stale) {
    ++era;
    state.set_era(era);
  }
  // No entry may carry an era the header on disk does not cover yet (another writer may have
  // raised it and died before flushing): otherwise recovery could pick an era already used.
  if (era != synced_era_) {
    try {
      detail::os::datasync(files_->header_fd(), files_->header_path());
    } catch (const Error& error) {
      poison(error);
    }
    synced_era_ = era;
  }
  return era;
}

std::uint64_t Writer::Impl::append(std::span<const std::uint64_t> keys, const std::uint64_t* epochs,
                                   std::uint64_t single_epoch, const ConstMatrix& rows) {
  std::shared_lock life(lifetime_);
  check_usable();
  const detail::Layout& layout = files_->layout();
  const std::string& where = files_->dir();
  auto invalid = [&](const std::string& what) {
    throw Error(ErrorCode::kInvalidArgument, where + ": append: " + what);
  };
  const std::uint64_t n = rows.rows;
  if (keys.size() != n) {
    invalid(std::to_string(keys.size()) + " keys for " + std::to_string(n) + " rows");
  }
  if (n == 0) return files_->state().committed();
  if (rows.data == nullptr) invalid("rows.data is null");
  if (rows.dim != layout.dim) {
    invalid("rows have dim " + std::to_string(rows.dim) + " but the store's dim is " +
            std::to_string(layout.dim));
  }
  const bool same_dtype = rows.dtype == layout.dtype;
  const bool convert = rows.dtype == DType::kFloat32 &&
                       (layout.dtype == DType::kFloat16 || layout.dtype == DType::kBFloat16);
  if (!same_dtype && !convert) {
    invalid(
        "cannot append " + std::string(dtype_name(rows.dtype)) + " rows to a " +
        std::string(dtype_name(layout.dtype)) + " store (only " +
        std::string(dtype_name(layout.dtype)) +
        (layout.dtype == DType::kFloat16 || layout.dtype == DType::kBFloat16 ? " or float32" : "") +
        " is accepted)");
  }
  const std::uint64_t input_row_bytes = std::uint64_t{rows.dim} * dtype_size(rows.dtype);
  const std::uint64_t stride = rows.row_stride_bytes == 0 ? input_row_bytes : rows.row_stride_bytes;
  if (stride < input_row_bytes) {
    invalid("row_stride_bytes " + std::to_string(stride) + " is less than a row's " +
            std::to_string(input_row_bytes) + " bytes");
  }
  if (n > detail::kMaxRows) invalid(std::to_string(n) + " rows in one batch is beyond 2^40");

  // Everything that does not need the row number happens before the lock: conversion and the
  // payload hashes. The lock then covers only the copy, the index entries and the publish.
  const std::uint64_t record_bytes = layout.record_bytes;
  thread_local std::vector<std::byte> staging;
  thread_local std::vector<std::uint64_t> hashes;
  const std::byte* source = static_cast<const std::byte*>(rows.data);
  std::uint64_t source_stride = stride;
  if (convert) {
    staging.resize(n * record_bytes);
    for (std::uint64_t i = 0; i < n; ++i) {
      const auto* in = reinterpret_cast<const float*>(source + i * stride);
      auto* out = reinterpret_cast<std::uint16_t*>(staging.data() + i * record_bytes);
      if (layout.dtype == DType::kFloat16) {
        detail::convert_to_half_fast(in, out, rows.dim);
      } else {
        detail::convert_to_bfloat16_fast(in, out, rows.dim);
      }
    }
    source = staging.data();
    source_stride = record_bytes;
  }
  hashes.resize(n);
  const detail::RowHashKey& hash_key = files_->hash_key();
  for (std::uint64_t i = 0; i < n; ++i) {
    hashes[i] = detail::payload_hash(source + i * source_stride, record_bytes, hash_key);
  }

  std::uint64_t first;
  {
    std::lock_guard in_process(mutex_);
    check_usable();
    detail::LockGuard across_processes(*lock_);
    auto& state = files_->state();
    first = state.committed();
    if (first + n > detail::kMaxRows) {
      throw Error(ErrorCode::kFull, where + ": the store holds " + std::to_string(first) +
                                        " rows; " + std::to_string(n) + " more exceed 2^40");
    }
    // Another process may have grown the files since this handle last looked.
    files_->grow_to(first + n);
    const std::uint64_t era_bits = (writable_era(first) & detail::kEntryEraMask)
                                   << detail::kEntryEraShift;

    // A failed write leaves committed where it was: the rows stay unpublished and the next
    // append writes over them. The handle stays usable (nothing published was touched).
    const WritePlan plan = plan_writes(n);
    write_rows(first, source, source_stride, n, plan.rows_by_syscall);
    EMBSTORE_CRASH_POINT("after-copy");
    auto entry = [&](std::uint64_t i) {
      const std::uint64_t row = first + i;
      const std::uint64_t epoch = epochs != nullptr ? epochs[i] : single_epoch;
      const std::uint64_t row_field = row | era_bits | (i + 1 == n ? detail::kEntryBatchEnd : 0);
      return IndexEntry{keys[i], epoch, row_field,
                        detail::entry_checksum(hashes[i], keys[i], epoch, row_field, layout.seed)};
    };
    if (!plan.entries_by_syscall) {  // In place through the mapping.
      IndexEntry* entries = files_->entry_ptr(first);
      for (std::uint64_t i = 0; i < n; ++i) {
        const IndexEntry e = entry(i);
        std::memcpy(entries + i, &e, sizeof(e));
        if (i == n / 2) EMBSTORE_CRASH_POINT("mid-index-write");
      }
    } else {  // In pieces built in a buffer, one pwrite each.
      // Test builds end the first piece after entry n/2, so a crash at mid-index-write leaves
      // the same half written as through the mapping.
      const std::uint64_t per_write =
          detail::testing::kEnabled ? std::min(kEntriesPerWrite, n / 2 + 1) : kEntriesPerWrite;
      thread_local std::vector<IndexEntry> buffer;
      buffer.resize(std::min(n, per_write));
      for (std::uint64_t begin = 0; begin < n; begin += per_write) {
        const std::uint64_t count = std::min(per_write, n - begin);
        for (std::uint64_t i = 0; i < count; ++i) buffer[i] = entry(begin + i);
        detail::os::write_all(files_->index_fd(), buffer.data(), count * sizeof(IndexEntry),
                              (first + begin) * sizeof(IndexEntry), files_->index_path());
        if (begin <= n / 2 && n / 2 < begin + count) EMBSTORE_CRASH_POINT("mid-index-write");
      }
    }
    EMBSTORE_CRASH_POINT("before-publish");
    state.publish_committed(first + n);
    EMBSTORE_CRASH_POINT("after-publish");
    if (index_keys(first + n)) {
      // A new claim means the last growth passed finish_growth() (under mutex_, held here):
      // its thread is exiting, so the join is immediate.
      if (growth_thread_) growth_thread_->join();
      stop_growth_ = false;
      growth_thread_ = std::make_unique<std::thread>([this] { grow_key_index(); });
    }
  }
  // Outside the lock: waking readers and this writer's flush need not hold other writers up.
  detail::os::futex_wake_all(files_->state().committed_word());
  if (options_.sync == SyncPolicy::kEveryAppend) flush();
  return first;
}

void Writer::Impl::poison(const Error& error) {
  std::lock_guard guard(poison_mutex_);
  if (!poisoned_.load()) {
    poison_message_ =
        path_ + ": writer refuses further writes until reopened: " + std::string(error.what());
    poisoned_.store(true, std::memory_order_release);
  }
  throw Error(ErrorCode::kPoisoned, poison_message_, error.sys_errno());
}

void Writer::Impl::sync() {
  std::shared_lock life(lifetime_);
  check_usable();
  flush();
}

void Writer::Impl::flush() {
  auto& state = files_->state();
  const std::uint64_t committed = state.committed();
  try {
    detail::os::datasync(files_->data_fd(), files_->data_path());
    detail::os::datasync(files_->index_fd(), files_->index_path());
    EMBSTORE_CRASH_POINT("mid-sync");
    state.raise_durable(committed);
    detail::os::datasync(files_->header_fd(), files_->header_path());
  } catch (const Error& error) {
    // Never retried: after a failed flush the kernel may have dropped the dirty pages, so a
    // later success would not mean the rows are on disk.
    poison(error);
  }
}

void Writer::Impl::sync_loop() {
  std::unique_lock guard(sync_mutex_);
  while (!stop_sync_) {
    sync_cv_.wait_for(guard, options_.sync_interval, [this] { return stop_sync_; });
    if (stop_sync_) break;
    try {
      sync();
    } catch (const Error&) {
      return;  // Poisoned: the next append or close reports it.
    }
  }
}

void Writer::Impl::close() {
  if (!in_owner_process()) return;
  std::lock_guard closing(close_mutex_);
  if (closed_.load()) return;
  if (sync_thread_) {
    {
      std::lock_guard guard(sync_mutex_);
      stop_sync_ = true;
    }
    sync_cv_.notify_all();
    sync_thread_->join();  // Before lifetime_ is taken: its sync() holds lifetime_ shared.
    sync_thread_.reset();
  }
  // A growth in progress is finished, so the next writer does not redo it under the lock.
  join_growth(/*abandon=*/false);
  std::unique_lock life(lifetime_);  // Waits for appends and syncs in flight.
  std::exception_ptr final_error;
  if (options_.sync != SyncPolicy::kNone) {
    try {
      if (poisoned_.load()) throw Error(ErrorCode::kPoisoned, poison_message_);
      flush();
    } catch (...) {
      final_error = std::current_exception();
    }
  }
  {
    std::lock_guard guard(poison_mutex_);
    if (!final_error && key_index_error_) {
      final_error = std::make_exception_ptr(
          Error(key_index_error_->code(),
                path_ + ": the key index could not be maintained (" + key_index_error_->what() +
                    "); every row is stored, lookups scan the unindexed ones until the next "
                    "writer indexes them",
                key_index_error_->sys_errno()));
    }
  }
  closed_ = true;
  keys_.reset();
  lock_.reset();
  files_.reset();
  if (final_error) std::rethrow_exception(final_error);
}

// ---- Writer -------------------------------------------------------------------------------

Writer::Writer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Writer::Writer(Writer&&) noexcept = default;

namespace {
// In a forked child the Impl is leaked, never destroyed: its mutexes, condition variable and
// threads are the parent's copies (a copied waiter makes pthread_cond_destroy hang), and the
// parent's lock must not be touched. The child's copy of the lock descriptor is already closed.
void release_impl(std::unique_ptr<Writer::Impl>& impl) noexcept;
}  // namespace

Writer& Writer::operator=(Writer&& other) noexcept {
  if (this != &other) {
    release_impl(impl_);
    impl_ = std::move(other.impl_);
  }
  return *this;
}

Writer::~Writer() { release_impl(impl_); }

namespace {
void release_impl(std::unique_ptr<Writer::Impl>& impl) noexcept {
  if (impl && !impl->in_owner_process()) {
    (void)impl.release();
    return;
  }
  impl.reset();
}
}  // namespace

Writer Writer::create(const std::string& path, const CreateOptions& create_options,
                      const WriterOptions& options) {
  create_store(path, create_options);
  return open(path, options);
}

Writer Writer::open(const std::string& path, const WriterOptions& options) {
  if (options.sync == SyncPolicy::kInterval && options.sync_interval.count() <= 0) {
    throw Error(ErrorCode::kInvalidArgument,
                path + ": sync_interval must be positive with SyncPolicy::kInterval");
  }
  auto files = StoreFiles::open(path, detail::os::Access::kReadWrite, options.map_bytes);
  const auto& layout = files->layout();
  if (options.expect_dim && *options.expect_dim != layout.dim) {
    throw Error(ErrorCode::kFormatMismatch, files->dir() + ": the store's dim is " +
                                                std::to_string(layout.dim) + ", not the expected " +
                                                std::to_string(*options.expect_dim));
  }
  if (options.expect_dtype && *options.expect_dtype != layout.dtype) {
    throw Error(ErrorCode::kFormatMismatch,
                files->dir() + ": the store's dtype is " + std::string(dtype_name(layout.dtype)) +
                    ", not the expected " + std::string(dtype_name(*options.expect_dtype)));
  }
  return Writer(std::make_unique<Impl>(std::move(files), options));
}

Writer Writer::open_or_create(const std::string& path, const CreateOptions& create_options,
                              const WriterOptions& options) {
  WriterOptions checked = options;
  checked.expect_dim = create_options.dim;
  checked.expect_dtype = create_options.dtype;
  // Racing processes: whoever's rename lands first creates; everyone else opens.
  for (int attempt = 0;; ++attempt) {
    try {
      return open(path, checked);
    } catch (const Error& error) {
      if (error.code() != ErrorCode::kNotFound || attempt >= 2) throw;
    }
    try {
      create_store(path, create_options);
    } catch (const Error& error) {
      if (error.code() != ErrorCode::kAlreadyExists) throw;
    }
  }
}

std::uint64_t Writer::append(std::span<const std::uint64_t> keys, std::uint64_t epoch,
                             const ConstMatrix& rows) {
  return impl_->append(keys, nullptr, epoch, rows);
}

std::uint64_t Writer::append(std::span<const std::uint64_t> keys,
                             std::span<const std::uint64_t> epochs, const ConstMatrix& rows) {
  if (epochs.size() != rows.rows) {
    throw Error(ErrorCode::kInvalidArgument,
                impl_->path() + ": append: " + std::to_string(epochs.size()) + " epochs for " +
                    std::to_string(rows.rows) + " rows");
  }
  return impl_->append(keys, epochs.data(), 0, rows);
}

std::uint64_t Writer::append(std::span<const std::uint64_t> keys, std::uint64_t epoch,
                             std::span<const float> values) {
  const std::uint32_t d = impl_->with_files([](const StoreFiles& f) { return f.layout().dim; });
  if (values.size() != keys.size() * d) {
    throw Error(ErrorCode::kInvalidArgument,
                impl_->path() + ": append: " + std::to_string(values.size()) + " floats is not " +
                    std::to_string(keys.size()) + " keys x dim " + std::to_string(d));
  }
  return impl_->append(keys, nullptr, epoch,
                       ConstMatrix{values.data(), DType::kFloat32, keys.size(), d, 0});
}

void Writer::sync() { impl_->sync(); }
void Writer::rebuild_key_index() { impl_->rebuild_key_index(); }
void Writer::close() { impl_->close(); }
std::uint64_t Writer::committed_rows() const {
  return impl_->with_files([](const StoreFiles& f) { return f.state().committed(); });
}
std::uint64_t Writer::durable_rows() const {
  return impl_->with_files([](const StoreFiles& f) { return f.state().durable(); });
}
std::uint32_t Writer::dim() const {
  return impl_->with_files([](const StoreFiles& f) { return f.layout().dim; });
}
DType Writer::dtype() const {
  return impl_->with_files([](const StoreFiles& f) { return f.layout().dtype; });
}
const std::string& Writer::path() const { return impl_->path(); }
StoreInfo Writer::info() const { return impl_->info(); }

}  // namespace embstore
