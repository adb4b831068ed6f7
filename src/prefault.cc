#include "prefault.h"

#include <algorithm>

#include "format.h"
#include "os.h"

namespace embstore::detail {
namespace {

// Populate in steps of this many data bytes, so stop() and a writer that overtook the thread are
// noticed within ~0.25 ms, and a wake is worth its cost.
constexpr std::uint64_t kStepBytes = 1ull << 20;

void atomic_max(std::atomic<std::uint64_t>& word, std::uint64_t value) noexcept {
  std::uint64_t current = word.load(std::memory_order_relaxed);
  while (current < value && !word.compare_exchange_weak(current, value)) {
  }
}

}  // namespace

Prefaulter::Prefaulter(std::vector<Region> regions, std::uint64_t ahead_bytes)
    : regions_(std::move(regions)),
      ahead_rows_(std::max<std::uint64_t>(1, ahead_bytes / regions_.at(0).row_bytes)) {
  thread_ = std::make_unique<std::thread>([this] { run(); });
}

Prefaulter::~Prefaulter() { stop(); }

void Prefaulter::stop() noexcept {
  if (!thread_) return;
  {
    std::lock_guard guard(mutex_);
    stop_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
  thread_->join();
  thread_.reset();
}

std::uint64_t Prefaulter::target() const noexcept {
  return std::min(frontier_.load() + ahead_rows_, limit_.load());
}

void Prefaulter::advance(std::uint64_t frontier_row, std::uint64_t limit_rows) noexcept {
  atomic_max(limit_, limit_rows);
  atomic_max(frontier_, frontier_row);
  atomic_max(done_, frontier_row);  // Pages the writer already touched need no prefault.
  // seq_cst with the thread's store of sleeping_ before it re-reads target(): no lost wake.
  if (!sleeping_.load()) return;
  const std::uint64_t step_rows = std::max<std::uint64_t>(1, kStepBytes / regions_[0].row_bytes);
  if (target() < done_.load(std::memory_order_acquire) + step_rows) return;
  std::lock_guard guard(mutex_);
  cv_.notify_one();
}

bool Prefaulter::populate_rows(std::uint64_t begin, std::uint64_t end) const noexcept {
  const std::uint64_t limit_rows = limit_.load(std::memory_order_acquire);
  for (const Region& region : regions_) {
    // Whole pages only, and never past the last whole page below limit_rows: that much of the
    // mapping is backed by allocated file space (mappings cover whole pages of allocated space).
    const std::uint64_t from = begin * region.row_bytes / kPageBytes * kPageBytes;
    const std::uint64_t to = (end * region.row_bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
    const std::uint64_t to_clamped =
        std::min(to, limit_rows * region.row_bytes / kPageBytes * kPageBytes);
    if (to_clamped > from && !os::populate_write(region.base + from, to_clamped - from)) {
      return false;
    }
  }
  return true;
}

void Prefaulter::run() {
  const std::uint64_t step_rows = std::max<std::uint64_t>(1, kStepBytes / regions_[0].row_bytes);
  while (true) {
    std::uint64_t begin = done_.load(std::memory_order_acquire);
    std::uint64_t end = target();
    if (end <= begin) {
      std::unique_lock guard(mutex_);
      sleeping_.store(true);
      cv_.wait(guard, [&] {
        return stop_.load(std::memory_order_acquire) ||
               target() >= done_.load(std::memory_order_acquire) + step_rows;
      });
      sleeping_.store(false);
      if (stop_.load(std::memory_order_acquire)) return;
      continue;
    }
    if (stop_.load(std::memory_order_acquire)) return;
    end = std::min(end, begin + step_rows);
    if (!populate_rows(begin, end)) {
      return;  // Unsupported (kernel < 5.14) or failed: appends fault pages in themselves.
    }
    atomic_max(done_, end);
  }
}

}  // namespace embstore::detail
