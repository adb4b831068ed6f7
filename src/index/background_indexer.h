// background_indexer.h — a Writer's key indexing, run on a thread of its own so that an append
// returns once its rows are published, not once they are indexed.
//
// The key index is derived data (key_index.h): rows past its watermark are answered by a scan
// of the offset index, so indexing late changes no lookup's answer, only its cost. An append
// publishes its rows and wakes the readers; every fourth such append post()s
// (kIndexLaterAppends in src/writer.cc: a wake-up costs about what indexing a batch does), and
// this thread then indexes every committed row (Writer::Impl::index_in_background(), under the
// key index lock) while the caller prepares and commits its next batches. Before it posts, an
// append waits for the runs the appends before it asked for (wait_idle()): at most 2 x 4 - 1
// appends' rows are left to index when an append returns, the indexing of some batches
// overlaps the commits of the next, and a writer whose indexing is slower than its commits is
// held to the indexing's pace (the watermark never falls further behind). sync(), info() and
// close() post what the last appends left. src/writer.cc, "Lock order", says which locks the
// run takes.
//
// Contract: post() asks for one run of the job that begins after the call; wait_idle() returns
// once every run asked for before it has finished; stop() waits for those, then ends the thread
// (idempotent; the destructor calls it). The job must not throw. A job that blocks blocks
// wait_idle() and stop() with it. The thread starts at construction (platform/thread.h).
// In a forked child the owner (Writer::Impl) is leaked, never destroyed, so the child never
// joins the parent's thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

namespace embstore::detail {

class BackgroundIndexer {
 public:
  // Throws Error (kIO) naming `what` when its thread cannot be started.
  BackgroundIndexer(const std::string& what, std::function<void()> job);
  ~BackgroundIndexer();
  BackgroundIndexer(const BackgroundIndexer&) = delete;
  BackgroundIndexer& operator=(const BackgroundIndexer&) = delete;

  void post();
  void wait_idle();
  void stop();
  // How long the thread, and wait_idle(), poll (yielding the processor between looks) before
  // they sleep: a thread woken from sleep on these VMs starts tens of microseconds later, about
  // the indexing of a batch of short rows, so a writer whose batches come back to back would
  // pay two wake-ups an append (bench/RESULTS.md, "Indexing off the append's path").
  static constexpr std::int64_t kPollMicros = 50;
  // Runs finished so far (tests: a post was followed by a run).
  std::uint64_t runs() const;

 private:
  void loop();

  std::function<void()> job_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;  // A post or stop for the thread.
  std::condition_variable done_;  // A run finished.
  // Posts so far, and asked_ as it was when the last finished run began: written under mutex_,
  // read by the polls without it.
  std::atomic<std::uint64_t> asked_{0};
  std::atomic<std::uint64_t> finished_{0};
  int sleepers_ = 0;        // Threads waiting on wake_ or done_. Under mutex_.
  std::uint64_t runs_ = 0;  // Under mutex_.
  bool stopping_ = false;   // Under mutex_.
  std::thread thread_;
};

}  // namespace embstore::detail
