#include "async_writer.h"

#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <string>
#include <utility>

#include "log/batch.h"
#include "platform/thread.h"
#include "writer_internals.h"

namespace embstore::python {
namespace {

// Ring ranges start on cache lines, so copying and hashing a batch never splits one with another.
constexpr std::uint64_t kRingAlign = 64;

// Pushes further apart than this are not a pace worth napping for: the thread sleeps until woken.
constexpr std::chrono::milliseconds kLongestNapInterval{200};
// A late batch is looked for again after this long at the least.
constexpr std::chrono::microseconds kShortestNap{50};

std::uint64_t align_up(std::uint64_t offset) {
  return (offset + kRingAlign - 1) / kRingAlign * kRingAlign;
}

// Copies `rows` (any row stride) into `dest`, packed.
void copy_packed(const ConstMatrix& rows, std::byte* dest) {
  const std::uint64_t row_bytes = std::uint64_t{rows.dim} * dtype_size(rows.dtype);
  const auto* source = static_cast<const std::byte*>(rows.data);
  const std::uint64_t stride = rows.row_stride_bytes == 0 ? row_bytes : rows.row_stride_bytes;
  if (stride == row_bytes) {
    std::memcpy(dest, source, rows.rows * row_bytes);
    return;
  }
  for (std::uint64_t i = 0; i < rows.rows; ++i) {
    std::memcpy(dest + i * row_bytes, source + i * stride, row_bytes);
  }
}

// Counts a waiter in `counter` for as long as it lives, however its wait ends (a throw
// included). Made and destroyed with mutex_ held, as the counter is read under it.
template <typename Counter>
class CountedWhile {
 public:
  explicit CountedWhile(Counter& counter) : counter_(counter) { ++counter_; }
  ~CountedWhile() { --counter_; }
  CountedWhile(const CountedWhile&) = delete;
  CountedWhile& operator=(const CountedWhile&) = delete;

 private:
  Counter& counter_;
};

// CPU time the calling thread has used (CLOCK_THREAD_CPUTIME_ID), in seconds.
double thread_cpu_seconds() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

}  // namespace

WorkClock::WorkClock()
    : start_(std::chrono::steady_clock::now()), cpu_start_(thread_cpu_seconds()) {}

WorkClock::Elapsed WorkClock::elapsed() const {
  const double cpu_seconds = thread_cpu_seconds() - cpu_start_;
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  return {seconds, std::clamp(cpu_seconds, 0.0, seconds)};
}

AsyncAppender::Ring::Ring(std::uint64_t bytes, const std::string& store) {
  constexpr std::uint64_t kHugePage = 2 << 20;
  mapping_bytes = bytes + kHugePage;  // Room to start the ring on a 2 MiB boundary.
  mapping =
      mmap(nullptr, mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) {
    const int err = errno;
    mapping = nullptr;
    throw Error(ErrorCode::kIO,
                store + ": async writer: cannot map its queue of " + std::to_string(bytes) +
                    " bytes (async_queue_mb): " + std::strerror(err),
                err);
  }
  const auto address = reinterpret_cast<std::uintptr_t>(mapping);
  data = static_cast<std::byte*>(mapping) + (kHugePage - address % kHugePage) % kHugePage;
  (void)madvise(data, bytes, MADV_HUGEPAGE);  // Advice: 4 KiB pages where refused.
}

AsyncAppender::Ring::~Ring() {
  if (mapping != nullptr) munmap(mapping, mapping_bytes);
}

AsyncAppender::AsyncAppender(Writer& writer, std::uint64_t capacity_bytes,
                             detail::os::InterruptCheck interrupt_check)
    : writer_(writer),
      interrupt_check_(interrupt_check),
      dtype_(writer.dtype()),
      capacity_bytes_(capacity_bytes),
      record_bytes_(std::uint64_t{writer.dim()} * dtype_size(writer.dtype())),
      ring_(capacity_bytes, writer.path()) {
  thread_ = detail::start_thread(writer.path() + ": the async Writer's thread", [this] { run(); });
}

AsyncAppender::~AsyncAppender() { stop(); }

void AsyncAppender::raise_failure() {
  // The failure itself once (a full disk says so, with the rows it cost); after that, what the
  // Writer is: it takes no more rows, whatever changed since (space freed: the disk is not
  // full, and saying so again sent users to free more).
  if (!failure_reported_) {
    failure_reported_ = true;
    throw Error(*error_);
  }
  throw Error(ErrorCode::kPoisoned,
              writer_.path() +
                  ": this async Writer takes no more rows since a background "
                  "append failed (" +
                  error_->what() + "); open the store again to append",
              error_->sys_errno());
}

void AsyncAppender::throw_if_failed() {
  if (error_) raise_failure();
  if (stopping_) {
    throw Error(ErrorCode::kClosed, writer_.path() + ": the async writer is closed");
  }
}

std::optional<std::uint64_t> AsyncAppender::ring_place(std::uint64_t bytes) const {
  if (ring_live_.empty()) return 0;
  const std::uint64_t tail = ring_live_.front().first;
  const std::uint64_t head = align_up(ring_live_.back().first + ring_live_.back().second);
  if (ring_live_.back().first >= tail) {  // Taken: [tail, head). Free: [head, end), [0, tail).
    if (head + bytes <= capacity_bytes_) return head;
    if (bytes <= tail) return 0;
    return std::nullopt;
  }
  // Wrapped. Taken: [tail, end) and [0, head). Free: [head, tail).
  if (head + bytes <= tail) return head;
  return std::nullopt;
}

void AsyncAppender::fill_ring(const Batch& batch) const {
  if (batch.rows.dtype == dtype_) {
    copy_packed(batch.rows, batch.ring_rows);
  } else {
    detail::convert_rows(batch.rows, dtype_, batch.ring_rows, writer_.path());
  }
}

void AsyncAppender::push(Batch&& batch) {
  std::lock_guard one_producer(push_mutex_);
  const std::uint64_t bytes = queue_bytes(batch.rows);
  batch.queued_bytes = bytes;
  std::unique_lock lock(mutex_);
  throw_if_failed();
  const auto now = std::chrono::steady_clock::now();
  if (last_push_ != std::chrono::steady_clock::time_point{}) {
    const auto gap = now - last_push_;
    push_interval_ = push_interval_ == std::chrono::steady_clock::duration{}
                         ? gap
                         : (push_interval_ * 7 + gap) / 8;
  }
  last_push_ = now;
  if (bytes > 0) {
    std::optional<std::uint64_t> offset = ring_place(bytes);
    if (!offset) {
      // Back-pressure: the caller (with the GIL released) waits for the writer thread.
      work_cv_.notify_one();  // It may be napping with the queue full.
      {
        const CountedWhile blocked(stats_.blocked_appends);
        wait_interruptibly(
            lock, space_cv_,
            [&] {
              if (error_ || stopping_) return true;
              offset = ring_place(bytes);
              return offset.has_value();
            },
            "for room in its queue; this batch was not queued");
      }
      throw_if_failed();
    }
    ring_live_.emplace_back(*offset, bytes);
    batch.ring_offset = *offset;
    batch.ring_rows = ring_.get() + *offset;
    if (!batch.borrowed) {
      // The copy runs without mutex_, so the writer thread keeps writing earlier batches.
      lock.unlock();
      try {
        fill_ring(batch);
      } catch (...) {
        lock.lock();
        // Give the range back. Pushes are serialized, so the newest range is this one, unless
        // a failure meanwhile dropped them all.
        if (!ring_live_.empty() && ring_live_.back().first == *offset) ring_live_.pop_back();
        throw;
      }
      lock.lock();
      throw_if_failed();  // A failure meanwhile dropped the queue, this range included.
    }
  }
  stats_.queued_bytes += bytes;
  queue_.push_back(std::move(batch));
  // A napping thread takes this batch when its nap ends, unless another one already waits.
  const bool wake = writer_asleep_ || (writer_napping_ && queue_.size() > 1);
  if (wake) ++stats_.appends_woke_writer;
  // Woken after the unlock, the writer thread finds mutex_ free instead of blocking on it at
  // once (a second wake-up, a system call each on these VMs). The queue outlives this call:
  // the binding never stops or destroys it while a push() runs (its lifetime lock).
  lock.unlock();
  if (wake) work_cv_.notify_one();
}

template <typename Ready>
void AsyncAppender::wait_interruptibly(std::unique_lock<std::mutex>& lock,
                                       std::condition_variable& cv, Ready ready,
                                       const char* waiting_for) {
  const detail::os::InterruptCheck check = interrupt_check_;
  while (!ready()) {
    if (check == nullptr) {
      cv.wait(lock, ready);
      return;
    }
    if (cv.wait_for(lock, kInterruptCheckInterval, ready)) return;
    // Asked without mutex_: the check may take the GIL, which a thread waiting for mutex_
    // (stats() from Python) can hold.
    lock.unlock();
    const bool interrupted = check();
    lock.lock();
    if (interrupted) {
      throw Error(ErrorCode::kInterrupted,
                  writer_.path() + ": async writer: interrupted while waiting " + waiting_for);
    }
  }
}

void AsyncAppender::flush() {
  std::unique_lock lock(mutex_);
  if (!queue_.empty()) {
    // Every batch pushed so far is written or dropped once finished_ counts those queued now.
    const std::uint64_t target = finished_ + queue_.size();
    work_cv_.notify_one();  // Do not wait for the end of a nap.
    const CountedWhile waiting(flush_waiters_);
    wait_interruptibly(
        lock, idle_cv_, [&] { return finished_ >= target; },
        "for its queue to be written; the batches queued are written on");
  }
  if (error_) raise_failure();
}

std::optional<Error> AsyncAppender::stop() {
  {
    std::lock_guard lock(mutex_);
    if (stopped_) return error_;
    stopping_ = true;
    stopped_ = true;
  }
  work_cv_.notify_all();
  space_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  std::lock_guard lock(mutex_);
  return error_;
}

void AsyncAppender::take_done(std::vector<void*>& holds,
                              std::vector<std::vector<std::uint64_t>>& spare_keys) {
  std::lock_guard lock(mutex_);
  holds.insert(holds.end(), done_.begin(), done_.end());
  done_.clear();
  for (std::vector<std::uint64_t>& keys : spare_keys_) {
    if (spare_keys.size() < kSpareKeyBuffers) spare_keys.push_back(std::move(keys));
  }
  spare_keys_.clear();
}

WriteStats AsyncAppender::stats() {
  std::lock_guard lock(mutex_);
  return stats_;
}

void AsyncAppender::wait_for_work(std::unique_lock<std::mutex>& lock) {
  using Clock = std::chrono::steady_clock;
  const auto ready = [&] { return stopping_ || !queue_.empty(); };
  if (ready()) return;
  const auto drained = Clock::now();
  for (;;) {
    const auto interval = push_interval_;
    const auto now = Clock::now();
    // Nap only while the pushes keep a pace, and for at most two of their intervals past the
    // moment the queue emptied: then the next push wakes the thread itself.
    if (interval == Clock::duration{} || interval > kLongestNapInterval ||
        now - drained > 2 * interval) {
      writer_asleep_ = true;
      work_cv_.wait(lock, ready);
      writer_asleep_ = false;
      return;
    }
    // Until the next push is due, or an eighth of an interval if it is late already.
    auto until = last_push_ + interval;
    if (until <= now) until = now + std::max<Clock::duration>(interval / 8, kShortestNap);
    ++stats_.writer_naps;
    writer_napping_ = true;
    const bool woke = work_cv_.wait_until(lock, until, ready);
    writer_napping_ = false;
    if (woke) return;
  }
}

void AsyncAppender::run() {
  // SCHED_BATCH: the same CPU share as the caller, but waking this thread for a new batch never
  // preempts the thread that queued it. Without it, on busy cores (training) the append call
  // that wakes the writer often lost its CPU to it for a whole time slice (2-5 ms stalls seen in
  // the demo). Best effort: scheduling stays as it was if the call fails.
  sched_param param{};
  param.sched_priority = 0;
  (void)pthread_setschedparam(pthread_self(), SCHED_BATCH, &param);
  std::unique_lock lock(mutex_);
  for (;;) {
    wait_for_work(lock);
    if (queue_.empty()) break;  // Stopping, and everything queued is written.
    // The batch stays at the front (counted as queued) until written; push_back on a deque
    // keeps references to existing elements valid.
    Batch& batch = queue_.front();
    lock.unlock();
    const WorkClock clock;  // The borrowed copy is write work too.
    const ConstMatrix rows{batch.ring_rows, dtype_, batch.rows.rows, batch.rows.dim,
                           batch.rows.rows == 0 ? 0 : batch.queued_bytes / batch.rows.rows};
    std::optional<Error> failure;
    try {
      if (batch.borrowed && batch.queued_bytes > 0) {
        // Copied now, so the caller's array can be released before the append (which may wait
        // for the writer lock). A caller that breaks its promise changes which values are
        // stored, never whether their checksums match (the rows are hashed in the ring).
        fill_ring(batch);
        lock.lock();
        done_.push_back(batch.hold);  // The caller's array may go now.
        batch.hold = nullptr;
        lock.unlock();
      }
      // The ring is written by this queue alone, and not again before the append returns: the
      // core hashes and writes the rows there, without copying them again (writer_internals.h).
      detail::WriterInternals::append_private(writer_, batch.keys, batch.epochs, batch.epoch, rows);
    } catch (const Error& error) {
      failure = error;
    } catch (const std::exception& error) {
      failure = Error(ErrorCode::kIO, writer_.path() + ": async append: " + error.what());
    }
    const WorkClock::Elapsed spent = clock.elapsed();
    lock.lock();
    stats_.queued_bytes -= batch.queued_bytes;
    if (batch.queued_bytes > 0) ring_live_.pop_front();
    if (batch.hold != nullptr) done_.push_back(batch.hold);
    if (!failure) {
      ++stats_.batches;
      stats_.rows += batch.rows.rows;
      stats_.bytes += batch.rows.rows * record_bytes_;
      stats_.append_seconds += spent.seconds;
      stats_.append_cpu_seconds += spent.cpu_seconds;
    }
    const std::uint64_t failed_rows = batch.rows.rows;
    if (spare_keys_.size() < kSpareKeyBuffers && batch.keys.capacity() <= kSpareKeyBufferMaxKeys) {
      spare_keys_.push_back(std::move(batch.keys));
    }
    queue_.pop_front();
    ++finished_;
    if (failure) {
      std::uint64_t dropped_rows = failed_rows;
      const std::uint64_t dropped = queue_.size() + 1;
      finished_ += queue_.size();
      for (Batch& later : queue_) {
        dropped_rows += later.rows.rows;
        if (later.hold != nullptr) done_.push_back(later.hold);
      }
      queue_.clear();
      ring_live_.clear();
      stats_.queued_bytes = 0;
      stats_.dropped_batches += dropped;
      stats_.dropped_rows += dropped_rows;
      // A refused batch (its values, converted here) is reported by later calls, whose own
      // input was fine: not as a ValueError (that call's bad input, to be skipped), but as the
      // state the Writer is in, refusing writes until reopened.
      const ErrorCode code =
          failure->code() == ErrorCode::kInvalidArgument ? ErrorCode::kPoisoned : failure->code();
      error_ = Error(code,
                     std::string(failure->what()) + " [async writer: this batch and the " +
                         std::to_string(dropped - 1) + " queued behind it (" +
                         std::to_string(dropped_rows) + " rows) were not written]",
                     failure->sys_errno());
    }
    space_cv_.notify_all();
    if (flush_waiters_ > 0) idle_cv_.notify_all();
  }
  idle_cv_.notify_all();
}

}  // namespace embstore::python
