// process.h — real child processes for multi-process tests: fork, run a function, report back.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace embstore::test {

// $EMBSTORE_TORTURE_SCALE, or 1 when unset or not a positive number: the factor on the CI sizes
// of the reliability scenarios and of randomized multi-process tests (tests/reliability/ci.sh
// sets 0.5 for the sanitizer builds, whose instrumented code runs several times slower).
double torture_scale();
// The rounds a randomized multi-process test runs: `rounds` times torture_scale(), at least 1.
// Only for rounds that repeat the same paths with fresh random choices; the plain build runs
// them all.
int scaled_rounds(int rounds);

// Forks; the child runs `body` and _exits with its return value (1 if it throws, after printing
// the exception to stderr). Returns the child's pid.
pid_t spawn(const std::function<int()>& body);
// Waits for `pid`; returns its exit status, or 128 + signal number if it was killed.
int wait_for(pid_t pid);

// Whether byte `byte` of the store lock file `lock_path` is free (0: the writer lock, 2: the
// key index lock), tried through a fresh open file description (an OFD lock, or with
// `classic_posix_lock` a per-process fcntl lock) and released again if taken. Throws on any
// error other than "held".
bool lock_is_free(const std::string& lock_path, std::uint64_t byte = 0,
                  bool classic_posix_lock = false);

// Polls `done` every 10 ms for up to a minute; returns its last answer.
bool within_a_minute(const std::function<bool()>& done);

// A one-way pipe of fixed-size records from children to the parent.
class Pipe {
 public:
  Pipe();
  ~Pipe();
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  // In the child: write one record (atomic: records are <= PIPE_BUF).
  void send(const void* record, std::size_t bytes) const;
  // In the parent after closing the write end: every complete record sent so far.
  std::vector<std::string> drain(std::size_t record_bytes);
  void close_write();
  // Blocks until exactly `bytes` bytes arrive (or EOF: returns what came).
  std::string receive(std::size_t bytes);

 private:
  int fds_[2];
};

}  // namespace embstore::test
