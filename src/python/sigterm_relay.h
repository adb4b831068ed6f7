// sigterm_relay.h — makes sure a multiprocessing child's SIGTERM reaches its Python handler.
//
// The package writes what a multiprocessing child's Writers and recorders hold when the child is
// sent SIGTERM (embstore._write_then_terminate, installed by _leave_cleanly_on_sigterm). Python
// runs that handler in its main thread only: between two bytecodes, or when a blocking call of
// the main thread is interrupted (EINTR) and checks for signals. Python's C-level handler only
// records the signal. So a SIGTERM recorded while the main thread is not in the blocking call yet
// (it lands between Python's last check and the sem_wait of multiprocessing's task-queue lock),
// or handled by another thread of the process (the kernel hands a process's signal to any
// thread that does not block it: a program's own threads, torch's), leaves the handler waiting
// for a wait that never ends: Pool.terminate() then waited for that worker for good (about one
// Pool round in 60 on the test VM), and the rows were not written either.
//
// relay_sigterm() puts a C handler in front of Python's for SIGTERM: it calls Python's (which
// records the signal, as before) and wakes a thread of the library (started once per process,
// every signal blocked, see platform/thread.h). Until Python's handler has run — seen as
// SIGTERM's disposition no longer being the relay, since that handler's first act is to restore
// the default — that thread sends the main thread kNudgeSignal every kNudgeInterval: a signal
// whose handler does nothing and, without SA_RESTART, interrupts the main thread's blocking call,
// which then checks for signals and runs the pending handler. A SIGTERM Python handles at once
// costs one wake-up of that thread and no nudge.
//
// Called from the main thread (the one nudged), after Python's handler for SIGTERM was installed.
// Returns false, changing nothing, when SIGTERM's handler is not a plain one (SA_SIGINFO: not
// Python's) or the program has a handler of its own for kNudgeSignal. Safe to call again (and in
// a forked child, whose relay thread it starts). A program that installs its own SIGTERM handler
// later replaces the relay with it; nothing is nudged then.
#pragma once

#include <signal.h>

#include <chrono>

namespace embstore::python {

// The last real-time signal: no default use, and queued rather than merged.
inline int nudge_signal() { return SIGRTMAX; }
constexpr std::chrono::milliseconds kNudgeInterval{20};

bool relay_sigterm();

}  // namespace embstore::python
