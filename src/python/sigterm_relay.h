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
// SIGTERM's disposition no longer being the relay, since that handler's first act is to replace
// it (ignore_repeated_sigterm()) — that thread sends the main thread nudge_signal() every
// kNudgeInterval, at most kMaxNudges times: a signal whose handler does nothing and, without
// SA_RESTART, interrupts the main thread's blocking call, which then checks for signals and runs
// the pending handler. A SIGTERM Python handles at once costs one wake-up of that thread and no
// nudge. A main thread inside a long call of native code meanwhile sees its system calls
// interrupted (EINTR) up to 50 times a second until it returns to Python, or for kMaxNudges
// intervals.
//
// A main thread that never returns to Python within those nudges (a collective of
// torch.distributed waiting for a slow or dead peer: gloo and NCCL retry on EINTR) would keep
// the process alive until that wait ended, 30 minutes by default, where the default action
// ended it at once. Then the relay thread calls `stuck` (when given), as write_on_sigterm()'s
// relay thread calls `write`: it takes the GIL and, unless the main thread is where the handler
// must wait for it (embstore._Termination), has the rows written and the process ended, and
// returns true; false leaves the process to the handler. From a call of `stuck` that returned
// true or never returned, the process ends within kWriteDeadline, by the signal's default
// action if not by Python's hand (the GIL held for good by native code).
//
// Called from the main thread (the one nudged), after Python's handler for SIGTERM was installed.
// Returns false, changing nothing, when SIGTERM's handler is not a plain one (SA_SIGINFO: not
// Python's), or the program uses nudge_signal(): a handler of its own, or blocked in the main
// thread (read with sigwait() or a signalfd). Safe to call again from the main thread, and in a
// forked child, whose relay thread it starts. A program that installs its own SIGTERM handler
// later replaces the relay with it; nothing is nudged then.
#pragma once

#include <signal.h>

#include <chrono>

namespace embstore::python {

// The last real-time signal: no default use. (Real-time signals queue: hence no nudge to a
// main thread that blocks it, and at most kMaxNudges.)
inline int nudge_signal() { return SIGRTMAX; }
constexpr std::chrono::milliseconds kNudgeInterval{20};
constexpr int kMaxNudges = 250;  // 5 s of nudges

using WriteAndEnd = bool (*)();
bool relay_sigterm(WriteAndEnd stuck = nullptr);

// The same job where Python cannot take SIGTERM: a Writer opened in a thread other than the main
// one (Python installs signal handlers from its main thread only), in a multiprocessing child
// whose SIGTERM still has its default action. Puts a C handler in its place, which wakes the
// relay thread; that thread calls `write`, which takes the GIL and has what the process's Writers
// and recorders hold written, then the process ended (embstore._write_off_main_thread: at once,
// or by the exit function's epilogue when the main thread is already exiting), and returns true;
// false when it could do neither (the interpreter gone, an error), and then, or when the process
// is still there kWriteDeadline after the signal (the GIL held for good by a thread in native
// code), the relay thread ends it by the signal's default action. A SIGTERM in a forked child
// of this process, which has no relay thread, takes the default action at once. Returns false,
// changing nothing, when SIGTERM's action is not the default (Python's handler, the program's
// own, or ignored). Safe to call again, from any thread.
constexpr std::chrono::seconds kWriteDeadline{30};
bool write_on_sigterm(WriteAndEnd write);

// What a SIGTERM being acted on (its rows being written) does to the ones after it: from this
// call on, a SIGTERM within kRepeatGrace of the first one's arrival (when the relay took it;
// else of this call) is ignored, as the same request delivered twice (a
// process group's SIGTERM — Slurm's scancel or time limit, systemd's stop, kill -TERM -PGID —
// reaches a torchrun worker a few milliseconds before its agent forwards its own); a later one
// ends the process at once by the default action, saying on stderr that what the process held
// may not be written. An ignored one is said on stderr too. Called first thing by Python's
// handler (after it gives SIGTERM's default action back in Python's own table, which forked
// children read) and the relay thread's `stuck`; write_on_sigterm()'s handler stays instead, and
// ignores repeats until its deadline. In a forked child: the default action at once. From any
// thread.
constexpr std::chrono::seconds kRepeatGrace{5};
void ignore_repeated_sigterm();

}  // namespace embstore::python
