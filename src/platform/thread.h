// thread.h — how the library starts a thread of its own.
//
// Every thread the library starts (a Writer's sync, indexer, key index growth and pages-ahead
// threads, the Python binding's async appender) starts through start_thread(), which returns only
// once the new thread runs. A thread's start-up allocates (its stack, TLS); a fork in that
// instant would hand the child an allocator locked by a thread the child does not have.
//
// Signals: the new thread blocks every signal sent to the process (SIGTERM, SIGINT, SIGHUP,
// SIGUSR1, ...), so the kernel hands them to a thread of the application, whose handlers wait
// for them there. Python runs its handlers in its main thread only: a SIGTERM the kernel gave
// to a library thread left the main thread blocked (in a lock, a pipe) with the handler never
// run (a Pool worker terminated while it waited for its task queue hung for good). The signals
// of a fault (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS) stay unblocked: they go to the
// thread that faults, and a blocked one would kill the process without its handler (a
// sanitizer's report, say).
#pragma once

#include <signal.h>

#include <cstring>
#include <future>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "embstore/error.h"

namespace embstore::detail {

// The signal mask start_thread() gives a new thread (see above).
inline sigset_t library_thread_signal_mask() {
  sigset_t mask;
  sigfillset(&mask);
  for (const int fault : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS}) {
    sigdelset(&mask, fault);
  }
  return mask;
}

// A thread that could not be started, as an Error (kIO, the errno kept) naming `what` and the
// limits that refuse one, instead of the bare "Resource temporarily unavailable" of
// std::system_error.
[[noreturn]] inline void thread_not_started(const std::string& what,
                                            const std::system_error& error) {
  const int err = error.code().value();
  throw Error(ErrorCode::kIO,
              what + ": cannot start a thread: " + std::strerror(err) +
                  (err == EAGAIN || err == ENOMEM
                       ? " (the process is at its limit of threads or processes, ulimit -u, or "
                         "of address space for their stacks, ulimit -v)"
                       : ""),
              err);
}

// Starts `body` on a new thread; `what` names it in the Error thrown when it cannot start.
template <typename Body>
std::thread start_thread(const std::string& what, Body&& body) {
  // Shared with the new thread, which may still be inside set_value() when the wait returns.
  auto started = std::make_shared<std::promise<void>>();
  std::future<void> running = started->get_future();
  // A new thread inherits the mask of the thread that creates it.
  const sigset_t blocked = library_thread_signal_mask();
  sigset_t previous;
  pthread_sigmask(SIG_BLOCK, &blocked, &previous);
  std::thread thread;
  try {
    thread = std::thread([started, body = std::forward<Body>(body)]() mutable {
      started->set_value();
      started.reset();
      body();
    });
  } catch (const std::system_error& error) {
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    thread_not_started(what, error);
  } catch (...) {
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    throw;
  }
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  running.wait();
  return thread;
}

}  // namespace embstore::detail
