// pages_ahead.h — makes a huge-page writer's 2 MiB page-cache pages ahead of its appends, on a
// thread of its own (WriterOptions::huge_pages).
//
// A writer with huge_pages writes rows through its mapping of the data file. The first write
// into each 2 MiB of the file makes a 2 MiB page and zeroes it, which on the VMs of
// bench/RESULTS.md cost more than the append's own copy ("Rows in 2 MiB pages"). After each
// growth of the files the appending thread hands the new rows' range to this thread, which makes
// those pages (MADV_POPULATE_WRITE, 2 MiB at a time) while the appends go on: an append that
// reaches a page before it is made makes it itself, as without this thread.
//
// Contract: advisory. It never changes a byte of the file (a populate only makes pages, zeroed
// where the file holds zeros); a page it cannot make is left to the appends. Each job pins the
// Generation whose mapping it populates, so the range stays mapped until the job is done or
// dropped. One owner thread calls make() and stop(); the thread is joined by stop() or the
// destructor. In a forked child the owner (Writer::Impl) is leaked, never destroyed, so the
// child never joins the parent's thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

#include "storage/generation.h"

namespace embstore::detail {

class PagesAhead {
 public:
  PagesAhead();  // Returns once the thread runs (platform/thread.h).
  ~PagesAhead();
  PagesAhead(const PagesAhead&) = delete;
  PagesAhead& operator=(const PagesAhead&) = delete;

  // Queues the whole 2 MiB pages inside the data file's rows [first, end) as `pinned` maps them
  // (never past its mapped rows).
  void make(std::shared_ptr<const Generation> pinned, std::uint64_t first, std::uint64_t end);
  // Drops the jobs not done and joins the thread. Idempotent.
  void stop();
  // Blocks until every job queued so far is done (tests; close() does not wait for them).
  void wait_idle();

 private:
  struct Job {
    std::shared_ptr<const Generation> pinned;
    std::byte* from = nullptr;  // [from, to) inside pinned's mapping, 2 MiB-aligned.
    std::byte* to = nullptr;
  };
  void run();

  std::mutex mutex_;
  std::condition_variable wake_;  // A job or stop for the thread.
  std::condition_variable idle_;  // The queue ran empty.
  std::deque<Job> jobs_;          // Under mutex_.
  bool busy_ = false;             // The thread works on a job taken from jobs_. Under mutex_.
  bool stopping_ = false;         // Under mutex_ (the thread looks between pages).
  std::thread thread_;
};

}  // namespace embstore::detail
