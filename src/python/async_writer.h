// async_writer.h — a bounded queue of batches appended to a Writer by one background thread.
//
// Every queued batch is written from the queue's own memory (a ring of `capacity_bytes`,
// allocated once and reused), never from the caller's buffer, so what is stored is what the
// caller passed at the time of the call, whenever the batch is written. Only this queue writes
// the ring, and a batch's range is not reused before its append returns, so the core hashes the
// rows there and writes them from there (RowMemory::kPrivate, log/batch.h, through
// writer_internals.h) without copying them again. A copied batch is copied into the ring by
// push(); a borrowed batch (the caller promised not to touch its buffer until it is written) is
// copied there by the background thread, so push() returns at once. A borrowed batch carries an
// opaque `hold` (the binding's strong reference to the caller's array), handed back through
// take_done() once its rows are copied or dropped, so the binding can release it while holding the
// GIL. The background thread never touches Python.
//
// Waking the background thread is a system call and an inter-processor interrupt, 10-50 us of
// the caller's time on virtual machines, which would be most of a donated append's cost. So
// while batches arrive at a steady pace (a training loop), the thread naps between them on its
// own timer, until the next batch is due, and push() wakes it only when it sleeps for good (no
// batch for a while), when a second batch queues behind one it has not taken yet, or when the
// caller waits for room; flush() and stop() always wake it. A queued batch is therefore taken
// at most about one push interval late (naps end by themselves; see run()), and an idle writer
// costs no wake-ups: after twice the usual interval without a batch it sleeps until woken.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "embstore/error.h"
#include "embstore/writer.h"
#include "platform/os.h"

namespace embstore::python {

// One append waiting to be written. `rows` describes the caller's rows: read by push() for a
// copied batch, by the background thread for a borrowed one (then kept alive by `hold`).
struct Batch {
  std::vector<std::uint64_t> keys;
  std::vector<std::uint64_t> epochs;  // Empty: every row gets `epoch`.
  std::uint64_t epoch = 0;
  ConstMatrix rows;
  bool borrowed = false;  // Copied into the ring by the background thread, not by push().
  void* hold = nullptr;   // Borrowed batches only.
  // Set by push(): where the rows live in the ring (packed, rows.dim * dtype bytes each).
  std::byte* ring_rows = nullptr;  // In the store's dtype.
  std::uint64_t ring_offset = 0;
  std::uint64_t queued_bytes = 0;
};

// The wall time and the CPU time of one piece of write work on the calling thread, from its
// construction to elapsed(). The kernel's per-thread CPU clock and the monotonic clock can
// disagree by milliseconds on a virtual machine (a thread moved between vCPUs whose clocks are
// not in step: one 4-batch run counted 3.4 ms of CPU inside 1.0 ms of wall time), so the CPU time
// is capped at the wall time: a thread cannot use more CPU than the time that passed.
class WorkClock {
 public:
  struct Elapsed {
    double seconds;
    double cpu_seconds;  // <= seconds
  };
  WorkClock();
  Elapsed elapsed() const;

 private:
  std::chrono::steady_clock::time_point start_;
  double cpu_start_;
};

// Counters of what a writer did; the binding exposes them as Writer.stats().
struct WriteStats {
  std::uint64_t batches = 0;
  std::uint64_t rows = 0;
  std::uint64_t bytes = 0;                // Row bytes as stored.
  double append_seconds = 0;              // Time inside Writer::append (the real write work).
  double append_cpu_seconds = 0;          // CPU time of the appending thread inside it (no waits).
  std::uint64_t copied_batches = 0;       // Batches the binding had to make contiguous first.
  std::uint64_t queued_bytes = 0;         // Async: bytes accepted but not yet written.
  std::uint64_t blocked_appends = 0;      // Async: append calls waiting for room right now.
  std::uint64_t dropped_batches = 0;      // Async: batches discarded after a background error.
  std::uint64_t dropped_rows = 0;         // Async: the rows of those batches.
  std::uint64_t appends_woke_writer = 0;  // Async: push() calls that had to wake the thread.
  std::uint64_t writer_naps = 0;          // Async: timed naps the thread took between batches.
};

// Appends batches in the order push() accepted them, from one background thread.
// Thread-safe: push/flush/stats/take_done may be called from any thread; stop() once.
// A failed append makes the error sticky: the failed batch and every batch queued behind it
// are dropped (their holds returned by take_done), and every later push() and flush() throws
// it, with a message that says how many batches and rows were not written.
class AsyncAppender {
 public:
  // `writer` must outlive this object. The ring is reserved at once but its pages are touched
  // (so count against the process's memory) only as batches fill them.
  // Key buffers of written batches kept for reuse, at most this many, each of at most
  // kSpareKeyBufferMaxKeys keys (a larger one is freed: it would hold memory for good).
  static constexpr std::size_t kSpareKeyBuffers = 4;
  static constexpr std::size_t kSpareKeyBufferMaxKeys = std::size_t{1} << 16;

  // `interrupt_check` (may be null): asked every kInterruptCheckInterval while push() waits
  // for room or flush() waits for the queue to be written, without mutex_; true ends the wait
  // with kInterrupted (push(): the batch is not queued; flush(): the queue is written on).
  AsyncAppender(Writer& writer, std::uint64_t capacity_bytes,
                detail::os::InterruptCheck interrupt_check = nullptr);
  ~AsyncAppender();  // Calls stop().

  // Bytes `rows` occupy in the queue: packed, in the store's dtype (float32 rows for a float16
  // or bfloat16 store are converted as they are copied in).
  std::uint64_t queue_bytes(const ConstMatrix& rows) const {
    return rows.rows * std::uint64_t{rows.dim} * dtype_size(dtype_);
  }
  // Whether a batch of `bytes` (queue_bytes) fits the queue at all. Larger batches must be
  // written by the caller (after flush(), to keep the order).
  bool fits(std::uint64_t bytes) const { return bytes <= capacity_bytes_; }
  // Queues the batch, blocking while the ring has no room for it; a copied batch's rows are
  // copied into the ring (converted to the store's dtype) before this returns, so the caller may
  // reuse its buffer at once, and a value the conversion would turn into infinity is refused
  // here (kInvalidArgument, nothing queued). A borrowed batch is copied and converted by the
  // background thread, so such a value fails it there (the sticky error below).
  // The batch's rows must match the store (dim, an accepted dtype: the caller checks) and
  // fits(queue_bytes(batch.rows)). On success the batch (and its hold) is owned by the
  // queue; on a throw the caller still owns batch.hold.
  void push(Batch&& batch);
  // Blocks until every batch pushed so far is written (or dropped); throws the sticky error.
  void flush();
  // Writes what is queued, then joins the thread. Idempotent. Returns the sticky error if any.
  std::optional<Error> stop();
  // Moves out the holds of batches written or dropped since the last call, and appends to
  // `spare_keys` the key buffers of batches written (or failed) (up to kSpareKeyBuffers kept; see
  // kSpareKeyBufferMaxKeys), for the caller to fill for its next batches instead of allocating.
  void take_done(std::vector<void*>& holds, std::vector<std::vector<std::uint64_t>>& spare_keys);
  WriteStats stats();

 private:
  void run();
  // Returns once the queue has a batch or the queue is stopping; naps or sleeps meanwhile (see
  // the file comment). Caller holds `lock` on mutex_.
  void wait_for_work(std::unique_lock<std::mutex>& lock);
  void throw_if_failed();  // Caller holds mutex_.
  // Throws error_ (there is one) the first time, kPoisoned naming it after. Holds mutex_.
  [[noreturn]] void raise_failure();
  // Offset of a free ring range of `bytes` after the live batches, if there is one now.
  // Caller holds mutex_.
  std::optional<std::uint64_t> ring_place(std::uint64_t bytes) const;

  // Copies (converts) a batch's rows into its ring range. Throws as push() says.
  void fill_ring(const Batch& batch) const;
  // cv.wait(lock, ready), asking interrupt_check_ (see the constructor) every interval.
  template <typename Ready>
  void wait_interruptibly(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                          Ready ready, const char* waiting_for);
  static constexpr std::chrono::milliseconds kInterruptCheckInterval{100};

  Writer& writer_;
  const detail::os::InterruptCheck interrupt_check_;
  const DType dtype_;  // The store's.
  const std::uint64_t capacity_bytes_;
  const std::uint64_t record_bytes_;
  // capacity_bytes_ of anonymous memory, untouched until used, in 2 MiB pages where the kernel
  // gives them (MADV_HUGEPAGE): the first lap of the ring then takes one page fault per 2 MiB
  // instead of one per 4 KiB (microseconds each on virtual machines).
  struct Ring {
    Ring(std::uint64_t bytes, const std::string& store);
    ~Ring();
    Ring(const Ring&) = delete;
    Ring& operator=(const Ring&) = delete;
    std::byte* get() const { return data; }
    void* mapping = nullptr;
    std::uint64_t mapping_bytes = 0;
    std::byte* data = nullptr;
  };
  const Ring ring_;
  std::mutex push_mutex_;  // Serializes push(): ring ranges are taken and queued in one order.
  std::mutex mutex_;
  std::condition_variable work_cv_;   // A batch arrived, or stop.
  std::condition_variable space_cv_;  // Room freed, or failure.
  std::condition_variable idle_cv_;   // A batch was written or dropped, while flush() waits.
  std::deque<Batch> queue_;  // Front is being written; its ring range stays taken until done.
  // (offset, bytes) of the ring ranges taken, oldest first: those of queue_'s batches that have
  // rows, then possibly one that push() is filling.
  std::deque<std::pair<std::uint64_t, std::uint64_t>> ring_live_;
  std::vector<void*> done_;
  std::vector<std::vector<std::uint64_t>> spare_keys_;
  std::optional<Error> error_;
  bool failure_reported_ = false;  // raise_failure() has thrown error_ itself once.
  // Batches written or dropped since the start: flush() waits for it to count the batches
  // queued when it was called (not for an empty queue, which another thread appending
  // meanwhile keeps from ever coming).
  std::uint64_t finished_ = 0;
  int flush_waiters_ = 0;
  WriteStats stats_;
  bool stopping_ = false;
  bool stopped_ = false;
  // The writer thread is waiting without a timeout: only a notify wakes it.
  bool writer_asleep_ = false;
  bool writer_napping_ = false;  // Waiting until a deadline; see wait_for_work().
  // The pace of push(): when the last one came, and a moving average of the gaps between them.
  std::chrono::steady_clock::time_point last_push_{};
  std::chrono::steady_clock::duration push_interval_{};
  std::thread thread_;
};

}  // namespace embstore::python
