#include "storage/pages_ahead.h"

#include <algorithm>
#include <cstdint>

#include "platform/os.h"
#include "platform/thread.h"

namespace embstore::detail {

PagesAhead::PagesAhead() : thread_(start_thread([this] { run(); })) {}

PagesAhead::~PagesAhead() { stop(); }

void PagesAhead::make(std::shared_ptr<const Generation> pinned, std::uint64_t first,
                      std::uint64_t end) {
  if (pinned == nullptr) return;
  end = std::min(end, pinned->mapped_rows());
  if (end <= first) return;
  // The mapping starts on a 2 MiB boundary (ReservedMapping): aligned addresses are aligned
  // file offsets.
  const auto from = reinterpret_cast<std::uintptr_t>(pinned->row_ptr(first));
  const auto to = reinterpret_cast<std::uintptr_t>(pinned->row_ptr(end));
  const std::uintptr_t first_page =
      (from + os::kHugePageBytes - 1) / os::kHugePageBytes * os::kHugePageBytes;
  const std::uintptr_t end_page = to / os::kHugePageBytes * os::kHugePageBytes;
  if (end_page <= first_page) return;
  {
    std::lock_guard guard(mutex_);
    if (stopping_) return;
    jobs_.push_back(Job{std::move(pinned), reinterpret_cast<std::byte*>(first_page),
                        reinterpret_cast<std::byte*>(end_page)});
  }
  wake_.notify_one();
}

void PagesAhead::stop() {
  {
    std::lock_guard guard(mutex_);
    stopping_ = true;
    jobs_.clear();
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void PagesAhead::wait_idle() {
  std::unique_lock guard(mutex_);
  idle_.wait(guard, [this] { return (jobs_.empty() && !busy_) || stopping_; });
}

void PagesAhead::run() {
  std::unique_lock guard(mutex_);
  for (;;) {
    wake_.wait(guard, [this] { return stopping_ || !jobs_.empty(); });
    if (stopping_) break;
    Job job = std::move(jobs_.front());
    jobs_.pop_front();
    busy_ = true;
    guard.unlock();
    for (std::byte* at = job.from; at < job.to; at += os::kHugePageBytes) {
      os::populate_write(at, os::kHugePageBytes);
      std::lock_guard check(mutex_);
      if (stopping_) break;
    }
    job.pinned.reset();  // Unmaps a Generation the writer replaced meanwhile: without the lock.
    guard.lock();
    busy_ = false;
    if (jobs_.empty()) idle_.notify_all();
  }
  busy_ = false;
  idle_.notify_all();
}

}  // namespace embstore::detail
