// sigterm_relay.cc — see sigterm_relay.h for the contract.
#include "sigterm_relay.h"

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>

#include "platform/thread.h"

namespace embstore::python {
namespace {

using Handler = void (*)(int);

std::atomic<Handler> g_python_handler{nullptr};  // Python's C-level SIGTERM handler
std::atomic<pthread_t> g_main_thread{};          // the thread nudged
sem_t g_sigterm_seen;                            // posted by relay() (async-signal-safe)
pid_t g_relay_thread_pid = 0;                    // the process whose relay thread runs

void note_arrival();

// SIGTERM's handler: Python's, then a wake-up of the relay thread. Async-signal-safe.
void relay(int signal_number) {
  const int saved_errno = errno;
  note_arrival();
  if (const Handler python = g_python_handler.load(); python != nullptr) python(signal_number);
  sem_post(&g_sigterm_seen);
  errno = saved_errno;
}

// write_on_sigterm(): what the relay thread calls, and whether a SIGTERM asked for it.
std::atomic<WriteAndEnd> g_write{nullptr};
std::atomic<bool> g_write_asked{false};
// relay_sigterm(): what the relay thread calls when the nudges did not get Python's handler run.
std::atomic<WriteAndEnd> g_stuck{nullptr};
// The armed deadline's number (arm_deadline()), 0 when none is: a call of `stuck` that
// returned false disarms its deadline.
std::atomic<std::uint64_t> g_deadline_armed{0};

// Gives `signal_number` its default action again. Async-signal-safe.
void restore_default(int signal_number) {
  struct sigaction fallback {};
  sigemptyset(&fallback.sa_mask);
  fallback.sa_handler = SIG_DFL;
  sigaction(signal_number, &fallback, nullptr);
}

// Ends the process by SIGTERM's default action (async-signal-safe), from any thread: every
// thread but the library's takes it; _exit if none does within a second.
[[noreturn]] void end_by_sigterm() {
  restore_default(SIGTERM);
  kill(getpid(), SIGTERM);
  sleep(1);
  _exit(128 + SIGTERM);
}

// SIGTERM's handler of write_on_sigterm(). Async-signal-safe. In a forked child of the process
// that installed it there is no relay thread: the default action, at once (the signal is blocked
// while its handler runs, so raise() delivers it when the handler returns).
void relay_write(int signal_number) {
  const int saved_errno = errno;
  if (getpid() != g_relay_thread_pid) {
    restore_default(signal_number);
    raise(signal_number);
  } else {
    g_write_asked.store(true);
    sem_post(&g_sigterm_seen);
  }
  errno = saved_errno;
}

// ignore_repeated_sigterm(): when, and in which process, the SIGTERM acted on came.
std::atomic<std::int64_t> g_acted_on_ns{0};
std::atomic<pid_t> g_acted_on_pid{0};
// The first SIGTERM the relay took in this process (relay()): the one acted on, maybe seconds
// later (the relay thread's nudges), whose repeats count from its arrival.
std::atomic<std::int64_t> g_arrived_ns{0};
std::atomic<pid_t> g_arrived_pid{0};

std::int64_t monotonic_ns() {  // Async-signal-safe (clock_gettime).
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return std::int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
}

void note_arrival() {  // Async-signal-safe.
  if (g_arrived_pid.load() == getpid()) return;
  g_arrived_ns.store(monotonic_ns());
  g_arrived_pid.store(getpid());
}

// SIGTERM's handler once one is acted on. Async-signal-safe.
void repeated_sigterm(int signal_number) {
  const int saved_errno = errno;
  const std::int64_t grace_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(kRepeatGrace).count();
  if (getpid() == g_acted_on_pid.load() && monotonic_ns() - g_acted_on_ns.load() < grace_ns) {
    // The same request, delivered twice: said, so that a deliberate one is not left unanswered.
    static const char message[] =
        "embstore: SIGTERM again within 5 s of the first: taken as the same one; writing what "
        "this process holds goes on (a SIGTERM after that ends it at once)\n";
    [[maybe_unused]] const ssize_t ignored = write(2, message, sizeof message - 1);
    errno = saved_errno;
    return;
  }
  if (getpid() == g_acted_on_pid.load()) {
    static const char message[] =
        "embstore: a second SIGTERM: ending at once; rows this process's Writers and recorders "
        "still held may not be written\n";
    [[maybe_unused]] const ssize_t ignored = write(2, message, sizeof message - 1);
  }
  // Blocked while this handler runs: delivered, with its default action, when it returns.
  restore_default(signal_number);
  raise(signal_number);
  errno = saved_errno;
}

// The nudge signal's handler: nothing; being run is what interrupts the main thread's wait.
void ignore_nudge(int) {}

Handler current_handler(int signal_number) {
  struct sigaction current {};
  sigaction(signal_number, nullptr, &current);
  return (current.sa_flags & SA_SIGINFO) != 0 ? nullptr : current.sa_handler;
}

// Ends the process kWriteDeadline from now unless disarmed (g_deadline_armed) by then.
void arm_deadline() {
  static std::uint64_t armed = 0;  // relay thread only
  const std::uint64_t number = ++armed;
  g_deadline_armed.store(number);
  detail::start_thread("embstore: the SIGTERM deadline", [number] {
    std::this_thread::sleep_for(kWriteDeadline);
    if (g_deadline_armed.load() != number) return;
    static const char message[] =
        "embstore: SIGTERM: the rows held could not be written in time; ending\n";
    [[maybe_unused]] const ssize_t ignored = write(2, message, sizeof message - 1);
    end_by_sigterm();
  }).detach();
}

[[noreturn]] void relay_loop() {
  for (;;) {
    while (sem_wait(&g_sigterm_seen) != 0) {
      // EINTR only: every signal is blocked in this thread, but a debugger may interrupt it.
    }
    if (g_write_asked.load()) {
      // A deadline, then the write (which ends the process unless it fails).
      arm_deadline();
      if (const WriteAndEnd write_and_end = g_write.load();
          write_and_end == nullptr || !write_and_end()) {
        end_by_sigterm();
      }
      for (;;) pause();  // The process ends by Python's hand, or at the deadline.
    }
    // Until Python's handler has run (its first act replaces this relay:
    // ignore_repeated_sigterm()), the program took SIGTERM or the nudge signal over, or
    // kMaxNudges were sent.
    bool handled = false;
    for (int nudges = 0; nudges < kMaxNudges && !handled; ++nudges) {
      std::this_thread::sleep_for(kNudgeInterval);
      handled =
          current_handler(SIGTERM) != &relay || current_handler(nudge_signal()) != &ignore_nudge;
      if (!handled) pthread_kill(g_main_thread.load(), nudge_signal());
    }
    if (handled) continue;
    // The main thread did not come back to Python (see the header): write from here. A second
    // SIGTERM meanwhile is taken as Python's handler takes it (ignore_repeated_sigterm(), its
    // first act too, so a handler that still runs later changes nothing).
    if (const WriteAndEnd stuck = g_stuck.load(); stuck != nullptr) {
      ignore_repeated_sigterm();
      arm_deadline();
      if (stuck()) {
        for (;;) pause();  // The process ends by Python's hand, or at the deadline.
      }
      g_deadline_armed.store(0);
    }
  }
}

// Starts the relay thread in this process, once (a forked child inherits handlers, not threads).
void start_relay_thread() {
  if (g_relay_thread_pid != getpid()) {
    sem_init(&g_sigterm_seen, 0, 0);
    detail::start_thread("embstore: the SIGTERM relay", &relay_loop).detach();
    g_relay_thread_pid = getpid();
  }
}

}  // namespace

bool write_on_sigterm(WriteAndEnd write) {
  static std::mutex once;  // callers on several threads
  const std::lock_guard guard(once);
  const Handler current = current_handler(SIGTERM);
  if (current == &relay_write && g_relay_thread_pid == getpid()) return true;
  if (current != SIG_DFL && current != &relay_write) return false;
  g_write.store(write);
  start_relay_thread();
  struct sigaction action {};
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // the program's calls go on; the relay thread writes
  action.sa_handler = &relay_write;
  sigaction(SIGTERM, &action, nullptr);
  return true;
}

bool relay_sigterm(WriteAndEnd stuck) {
  const Handler python = current_handler(SIGTERM);
  const Handler nudge = current_handler(nudge_signal());
  if (python == nullptr || python == SIG_DFL || python == SIG_IGN) return false;
  if (nudge != SIG_DFL && nudge != &ignore_nudge) return false;
  // Blocked by this (the main) thread: the program reads it with sigwait() or a signalfd, and
  // nudges would reach it (or pile up) instead of interrupting anything.
  sigset_t blocked;
  if (pthread_sigmask(SIG_BLOCK, nullptr, &blocked) != 0 ||
      sigismember(&blocked, nudge_signal()) == 1) {
    return false;
  }
  g_main_thread.store(pthread_self());
  if (stuck != nullptr) g_stuck.store(stuck);
  start_relay_thread();
  struct sigaction action {};
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;  // no SA_RESTART: the nudge must interrupt the main thread's wait
  action.sa_handler = &ignore_nudge;
  sigaction(nudge_signal(), &action, nullptr);
  if (python != &relay) {
    struct sigaction current {};
    sigaction(SIGTERM, nullptr, &current);
    g_python_handler.store(python);
    current.sa_handler = &relay;
    sigaction(SIGTERM, &current, nullptr);
  }
  return true;
}

void ignore_repeated_sigterm() {
  // From the arrival of the SIGTERM acted on, when the relay saw it come.
  g_acted_on_ns.store(g_arrived_pid.load() == getpid() ? g_arrived_ns.load() : monotonic_ns());
  g_acted_on_pid.store(getpid());
  struct sigaction action {};
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // the writing's calls go on
  action.sa_handler = &repeated_sigterm;
  sigaction(SIGTERM, &action, nullptr);
}

}  // namespace embstore::python
