#include "index/background_indexer.h"

#include <sched.h>

#include <chrono>
#include <utility>

#include "platform/thread.h"

namespace embstore::detail {

namespace {
// Polls done() for up to `micros`, yielding between looks; true once it held.
template <typename Done>
bool poll_for(std::int64_t micros, Done done) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(micros);
  while (!done()) {
    if (std::chrono::steady_clock::now() >= until) return false;
    ::sched_yield();
  }
  return true;
}
}  // namespace

BackgroundIndexer::BackgroundIndexer(const std::string& what, std::function<void()> job)
    : job_(std::move(job)), thread_(start_thread(what, [this] { loop(); })) {}

BackgroundIndexer::~BackgroundIndexer() { stop(); }

void BackgroundIndexer::post() {
  bool sleeping;
  {
    std::lock_guard guard(mutex_);
    asked_.fetch_add(1);
    sleeping = sleepers_ > 0;
  }
  if (sleeping) wake_.notify_all();
}

void BackgroundIndexer::wait_idle() {
  const std::uint64_t target = asked_.load();
  if (poll_for(kPollMicros, [&] { return finished_.load() >= target; })) return;
  std::unique_lock guard(mutex_);
  ++sleepers_;
  done_.wait(guard, [&] { return finished_.load() >= target; });
  --sleepers_;
}

std::uint64_t BackgroundIndexer::runs() const {
  std::lock_guard guard(mutex_);
  return runs_;
}

void BackgroundIndexer::stop() {
  {
    std::lock_guard guard(mutex_);
    if (!thread_.joinable()) return;
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();  // The loop finishes every run asked for before it ends.
}

void BackgroundIndexer::loop() {
  std::unique_lock guard(mutex_);
  for (;;) {
    auto work = [this] { return stopping_ || asked_.load() > finished_.load(); };
    if (!work()) {
      guard.unlock();
      poll_for(kPollMicros, [this] { return asked_.load() > finished_.load(); });
      guard.lock();
      ++sleepers_;
      wake_.wait(guard, work);
      --sleepers_;
    }
    if (asked_.load() == finished_.load()) return;  // Stopping, nothing left to do.
    const std::uint64_t target = asked_.load();
    guard.unlock();
    job_();
    guard.lock();
    finished_.store(target);
    ++runs_;
    if (sleepers_ > 0) done_.notify_all();
  }
}

}  // namespace embstore::detail
