#include "async_writer.h"

#include <pthread.h>
#include <sched.h>

#include <chrono>
#include <exception>
#include <string>
#include <utility>

namespace embstore::python {

AsyncAppender::AsyncAppender(Writer& writer, std::uint64_t capacity_bytes)
    : writer_(writer),
      capacity_bytes_(capacity_bytes),
      record_bytes_(std::uint64_t{writer.dim()} * dtype_size(writer.dtype())) {
  thread_ = std::thread([this] { run(); });
}

AsyncAppender::~AsyncAppender() { stop(); }

void AsyncAppender::throw_if_failed() {
  if (error_) throw Error(*error_);
  if (stopping_) {
    throw Error(ErrorCode::kClosed, writer_.path() + ": the async writer is closed");
  }
}

void AsyncAppender::push(Batch&& batch) {
  std::unique_lock lock(mutex_);
  throw_if_failed();
  auto has_room = [&] {
    return error_ || stopping_ || stats_.queued_bytes == 0 ||
           stats_.queued_bytes + batch.queued_bytes <= capacity_bytes_;
  };
  if (!has_room()) {
    // Back-pressure: the caller (with the GIL released) waits for the writer thread.
    ++stats_.blocked_appends;
    space_cv_.wait(lock, has_room);
    --stats_.blocked_appends;
  }
  throw_if_failed();
  stats_.queued_bytes += batch.queued_bytes;
  queue_.push_back(std::move(batch));
  work_cv_.notify_one();
}

void AsyncAppender::flush() {
  std::unique_lock lock(mutex_);
  idle_cv_.wait(lock, [&] { return queue_.empty(); });
  if (error_) throw Error(*error_);
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

void AsyncAppender::take_done(std::vector<void*>& out) {
  std::lock_guard lock(mutex_);
  out.insert(out.end(), done_.begin(), done_.end());
  done_.clear();
}

WriteStats AsyncAppender::stats() {
  std::lock_guard lock(mutex_);
  return stats_;
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
    work_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) break;  // Stopping, and everything queued is written.
    // The batch stays at the front (counted as queued) until written; push_back on a deque
    // keeps references to existing elements valid.
    Batch& batch = queue_.front();
    lock.unlock();
    std::optional<Error> failure;
    const auto start = std::chrono::steady_clock::now();
    try {
      const std::span<const std::uint64_t> keys(batch.keys);
      if (batch.epochs.empty()) {
        writer_.append(keys, batch.epoch, batch.rows);
      } else {
        writer_.append(keys, std::span<const std::uint64_t>(batch.epochs), batch.rows);
      }
    } catch (const Error& error) {
      failure = error;
    } catch (const std::exception& error) {
      failure = Error(ErrorCode::kIO, writer_.path() + ": async append: " + error.what());
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    lock.lock();
    stats_.queued_bytes -= batch.queued_bytes;
    done_.push_back(batch.hold);
    if (!failure) {
      ++stats_.batches;
      stats_.rows += batch.rows.rows;
      stats_.bytes += batch.rows.rows * record_bytes_;
      stats_.append_seconds += seconds;
    }
    const std::uint64_t failed_rows = batch.rows.rows;
    queue_.pop_front();
    if (failure) {
      std::uint64_t dropped_rows = failed_rows;
      const std::uint64_t dropped = queue_.size() + 1;
      for (Batch& later : queue_) {
        dropped_rows += later.rows.rows;
        done_.push_back(later.hold);
      }
      queue_.clear();
      stats_.queued_bytes = 0;
      stats_.dropped_batches += dropped;
      error_ = Error(failure->code(),
                     std::string(failure->what()) + " [async writer: this batch and the " +
                         std::to_string(dropped - 1) + " queued behind it (" +
                         std::to_string(dropped_rows) + " rows) were not written]",
                     failure->sys_errno());
      space_cv_.notify_all();
    }
    space_cv_.notify_all();
    if (queue_.empty()) idle_cv_.notify_all();
  }
  idle_cv_.notify_all();
}

}  // namespace embstore::python
