// prefault.h — faults in the pages just past a writer's write frontier on a background thread.
//
// Why: the first write-touch of a fresh file page through a shared mapping costs ~1 us (page-cache
// allocation, zeroing, ext4 page_mkwrite); in an mmap append that fault, not the memcpy, is the
// bottleneck. MADV_POPULATE_WRITE (os::populate_write) takes the same fault without touching the
// bytes, so a thread running ahead of the writer on another core moves the cost off the append's
// critical path. When the writer catches up, both take faults in parallel.
//
// Contract:
//   - It only ever touches pages inside [base, base + limit_rows * row_bytes) of each region, where
//     limit_rows is the latest value passed to advance(): the caller promises those rows are mapped
//     and backed by allocated (posix_fallocate'd) file space, so prefaulting never extends a file,
//     never faults past EOF (no SIGBUS) and never writes a byte (pages read as they were: zeros).
//   - It populates at most `ahead_bytes` of the data region past the frontier (and the matching
//     rows of the other regions). Populated pages become dirty page-cache pages; a later sync
//     writes them too (zeros inside already-allocated space), which is why the distance is small.
//   - stop() (and the destructor) wake and join the thread; after it returns nothing is touched,
//     so the caller may unmap the regions. Call it before unmapping.
//   - Fork: the thread does not exist in a forked child and its mutex may be held there. A child
//     must never call stop() or destroy the object: the Writer that owns it leaks it instead.
// Thread-safety: advance() may be called from any thread (concurrent calls are fine, the largest
// frontier wins); stop() must not race with the destructor.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace embstore::detail {

class Prefaulter {
 public:
  struct Region {
    std::byte* base = nullptr;
    std::uint64_t row_bytes = 0;
  };

  // Starts the thread. `regions[0]` is the one `ahead_bytes` is measured in.
  Prefaulter(std::vector<Region> regions, std::uint64_t ahead_bytes);
  ~Prefaulter();
  Prefaulter(const Prefaulter&) = delete;
  Prefaulter& operator=(const Prefaulter&) = delete;

  // The writer has written (or is about to write) rows below `frontier_row`; rows below
  // `limit_rows` are mapped and allocated. Cheap (a few atomics) unless the thread sleeps and has
  // work: then one wake.
  void advance(std::uint64_t frontier_row, std::uint64_t limit_rows) noexcept;

  void stop() noexcept;

  // Rows below this have been populated (or the writer already passed them). For tests/benchmarks.
  std::uint64_t populated_rows() const noexcept { return done_.load(std::memory_order_acquire); }

 private:
  void run();
  std::uint64_t target() const noexcept;
  bool populate_rows(std::uint64_t begin, std::uint64_t end) const noexcept;

  std::vector<Region> regions_;
  std::uint64_t ahead_rows_;
  std::atomic<std::uint64_t> frontier_{0};
  std::atomic<std::uint64_t> limit_{0};
  std::atomic<std::uint64_t> done_{0};
  std::atomic<bool> sleeping_{false};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable cv_;
  std::unique_ptr<std::thread> thread_;
};

}  // namespace embstore::detail
