#include "platform/lock.h"

#include <pthread.h>

#include <array>
#include <atomic>
#include <mutex>

#include "embstore/error.h"
#include "platform/os.h"

namespace embstore::detail {
namespace {

// Lock descriptors of this process, closed in a forked child. Fixed-size and lock-free because
// the child handler runs right after fork(), where taking a mutex another thread held would hang.
constexpr int kMaxLocks = 1024;
// Slots hold fd + 1, so the zero-initialized array means "empty" with no constructor to run.
std::array<std::atomic<int>, kMaxLocks> g_lock_slots;

void close_locks_in_child() {
  for (auto& slot : g_lock_slots) {
    int stored = slot.exchange(0);
    if (stored > 0) os::close_fd(stored - 1);
  }
}

void register_fd(int fd) {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, close_locks_in_child); });
  for (auto& slot : g_lock_slots) {
    int expected = 0;
    if (slot.compare_exchange_strong(expected, fd + 1)) return;
  }
  // More than kMaxLocks locks open at once (a Writer holds two: kMaxLocks / 2 writers): the
  // fork guard is lost for this one only; the pid check in WriterLock still refuses use from a
  // child.
}

void unregister_fd(int fd) {
  for (auto& slot : g_lock_slots) {
    int expected = fd + 1;
    if (slot.compare_exchange_strong(expected, 0)) return;
  }
}

}  // namespace

void close_in_forked_child(int fd) { register_fd(fd); }
void forget_in_forked_child(int fd) { unregister_fd(fd); }

WriterLock::WriterLock(const std::string& lock_path, LockByte byte)
    : path_(lock_path), byte_(byte), owner_pid_(os::current_pid()) {
  fd_ = os::open_file(lock_path, os::Access::kReadWrite);
  register_fd(fd_);
}

WriterLock::~WriterLock() {
  if (!in_owner_process()) return;  // The atfork handler already closed our copy.
  release();
  unregister_fd(fd_);
  os::close_fd(fd_);
}

bool WriterLock::in_owner_process() const noexcept { return os::current_pid() == owner_pid_; }

void WriterLock::check_owner_process() const {
  if (!in_owner_process()) {
    throw Error(ErrorCode::kForkedChild, path_ + ": this writer was opened by process " +
                                             std::to_string(owner_pid_) +
                                             "; a forked child must open its own Writer");
  }
}

bool WriterLock::try_acquire() {
  check_owner_process();
  held_ = os::try_lock_exclusive(fd_, path_, static_cast<std::uint64_t>(byte_));
  return held_;
}

bool WriterLock::acquire(bool interruptible) {
  check_owner_process();
  // Tried first, so the caller learns whether another handle held it (a system call more only
  // when it had to wait anyway).
  const auto byte = static_cast<std::uint64_t>(byte_);
  const bool waited = !os::try_lock_exclusive(fd_, path_, byte);
  if (waited) {
    const bool mark = byte_ == LockByte::kWriter;
    if (mark) os::mark_waiting(fd_, true);
    try {
      os::lock_exclusive(fd_, path_, byte, interruptible);
    } catch (...) {
      if (mark) os::mark_waiting(fd_, false);
      throw;
    }
    if (mark) os::mark_waiting(fd_, false);
  }
  held_ = true;
  return waited;
}

bool writer_lock_held(const std::string& lock_path) noexcept {
  try {
    const int fd = os::open_file(lock_path, os::Access::kReadOnly);
    const bool held = os::lock_held(fd, static_cast<std::uint64_t>(LockByte::kWriter));
    os::close_fd(fd);
    return held;
  } catch (const Error&) {
    return false;
  }
}

bool WriterLock::others_waiting() const noexcept {
  return byte_ == LockByte::kWriter && in_owner_process() && os::others_waiting(fd_);
}

void WriterLock::release() noexcept {
  if (held_ && in_owner_process()) os::unlock(fd_, static_cast<std::uint64_t>(byte_));
  held_ = false;
}

}  // namespace embstore::detail
