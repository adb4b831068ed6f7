// async_writer.h — a bounded queue of batches appended to a Writer by one background thread.
//
// Free of Python: each batch carries an opaque `hold` (the binding's strong reference to the
// caller's array), handed back through take_done() once the batch is written or dropped, so the
// binding can release it while holding the GIL. The background thread never touches Python.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "embstore/error.h"
#include "embstore/writer.h"

namespace embstore::python {

// One append waiting to be written. `rows` points into memory kept alive by `hold`.
struct Batch {
  std::vector<std::uint64_t> keys;
  std::vector<std::uint64_t> epochs;  // Empty: every row gets `epoch`.
  std::uint64_t epoch = 0;
  ConstMatrix rows;
  std::uint64_t queued_bytes = 0;  // What the batch counts against the queue's capacity.
  void* hold = nullptr;
};

// Counters of what a writer did; the binding exposes them as Writer.stats().
struct WriteStats {
  std::uint64_t batches = 0;
  std::uint64_t rows = 0;
  std::uint64_t bytes = 0;            // Row bytes as stored.
  double append_seconds = 0;          // Time inside Writer::append (the real write work).
  std::uint64_t copied_batches = 0;   // Batches the binding had to make contiguous first.
  std::uint64_t queued_bytes = 0;     // Async: bytes accepted but not yet written.
  std::uint64_t blocked_appends = 0;  // Async: append calls waiting for room right now.
  std::uint64_t dropped_batches = 0;  // Async: batches discarded after a background error.
};

// Appends batches in the order push() accepted them, from one background thread.
// Thread-safe: push/flush/stats/take_done may be called from any thread; stop() once.
// A failed append makes the error sticky: the failed batch and every batch queued behind it
// are dropped (their holds returned by take_done), and every later push() and flush() throws
// it, with a message that says how many batches and rows were not written.
class AsyncAppender {
 public:
  // `writer` must outlive this object. A batch larger than `capacity_bytes` is accepted when
  // the queue is empty, so any batch can be written.
  AsyncAppender(Writer& writer, std::uint64_t capacity_bytes);
  ~AsyncAppender();  // Calls stop().

  // Queues the batch, blocking while the queue is full. On success the batch (and its hold) is
  // owned by the queue; on a throw the caller still owns batch.hold.
  void push(Batch&& batch);
  // Blocks until every batch pushed so far is written (or dropped); throws the sticky error.
  void flush();
  // Writes what is queued, then joins the thread. Idempotent. Returns the sticky error if any.
  std::optional<Error> stop();
  // Moves out the holds of batches written or dropped since the last call.
  void take_done(std::vector<void*>& out);
  WriteStats stats();

 private:
  void run();
  void throw_if_failed();  // Caller holds mutex_.

  Writer& writer_;
  const std::uint64_t capacity_bytes_;
  const std::uint64_t record_bytes_;
  std::mutex mutex_;
  std::condition_variable work_cv_;   // A batch arrived, or stop.
  std::condition_variable space_cv_;  // Room freed, or failure.
  std::condition_variable idle_cv_;   // The queue became empty.
  std::deque<Batch> queue_;           // Front is being written while busy_.
  std::vector<void*> done_;
  std::optional<Error> error_;
  WriteStats stats_;
  bool stopping_ = false;
  bool stopped_ = false;
  std::thread thread_;
};

}  // namespace embstore::python
