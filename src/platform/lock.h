// lock.h — the store's two locks, OFD locks on bytes of the dedicated `lock` file:
//   - the writer lock (byte 0): the log — commit, truncate, recovery, the switch of generations;
//   - the key index lock (byte 2): keys.K — indexing rows into the current file needs it alone;
//     replacing a keys file or changing the key_generation word (open, truncate, rebuild, a
//     growth's switch) needs both (FORMAT.md, "keys.K", "Protocols").
// A holder of the writer lock may take the key index lock, never the other way round: an append
// commits under the writer lock, releases it, and then indexes under the key index lock if it is
// free (try_acquire(); a later indexing covers its rows otherwise), so one writer's indexing
// overlaps the next writer's commit (src/writer.cc, "Lock order").
//
// OFD locks belong to the open file description, not the process: they exclude other
// WriterLocks in this same process too, and they survive any unrelated open()/close() of the
// store's files (unlike fcntl/flock-per-process locks). The kernel drops the lock when the
// holder dies, which is the only liveness test embstore uses.
//
// Fork: the descriptor is registered so a pthread_atfork child handler closes it in the child;
// the parent's lock is untouched (its description is still open in the parent) and a child can
// never keep a dead parent's lock alive. A WriterLock used in a process other than the one that
// created it throws kForkedChild and never unlocks.
//
// While a handle waits for the writer lock it holds a shared OFD lock on byte 1 (the waiting
// mark), so the holder can tell that others wait (others_waiting()): a hint only, which dies with
// its holder like the lock; writers before this mark existed wait without it. The key index lock
// has no mark.
//
// Not thread-safe: one thread at a time per WriterLock (the Writer serializes with a mutex),
// except others_waiting(), which any thread may call at any time.
//
// Why not Boost.Interprocess, facility by facility:
//   - file_lock: a per-process fcntl lock, lost when the process closes *any* descriptor of the
//     file (a Reader opening and closing the store would drop a Writer's lock).
//   - file_mapping/mapped_region: no address-space reservation, the address is only a hint, so a
//     growing store could not keep its views at a fixed address (platform/mapping.h does).
//   - interprocess_mutex: not robust; a holder killed by kill -9 leaves it locked forever.
//   - named_condition: needs a writable object in /dev/shm, so read-only Readers could not wait;
//     Reader::wait uses a futex on the read-only mapped counter instead.
#pragma once

#include <cstdint>
#include <string>

namespace embstore::detail {

// The byte of the lock file each lock holds (FORMAT.md, "The store directory").
enum class LockByte : std::uint64_t {
  kWriter = 0,    // The writer lock; byte 1 is its waiting mark.
  kKeyIndex = 2,  // The key index lock.
};

// Another lock's descriptor (store.cc's create lock) closed in a forked child as a WriterLock's
// is, so that a child never keeps it held: registered until forget_in_forked_child(fd), which
// must come before the descriptor is closed.
void close_in_forked_child(int fd);
void forget_in_forked_child(int fd);

class WriterLock {
 public:
  explicit WriterLock(const std::string& lock_path, LockByte byte = LockByte::kWriter);
  ~WriterLock();
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;

  // Blocks until held; true when it had to wait (another handle held the lock). While it waits
  // for the writer lock, the handle is marked waiting (byte 1 of the file, FORMAT.md "The store
  // directory").
  // `interruptible`: os::lock_exclusive()'s (a wait before anything is written only).
  bool acquire(bool interruptible = false);
  // Takes the lock only if no other handle holds it now; true when it did. Never waits, and
  // never marks this handle waiting.
  bool try_acquire();
  // Whether another handle is waiting for the writer lock right now: a hint, for a holder
  // choosing how much work to do under the lock (writer.cc, hash_at()). False for the key index
  // lock.
  bool others_waiting() const noexcept;
  void release() noexcept;
  // True when called from the process that constructed this lock.
  bool in_owner_process() const noexcept;

 private:
  void check_owner_process() const;  // kForkedChild in a process other than the creator.

  std::string path_;
  LockByte byte_;
  int fd_ = -1;
  int owner_pid_ = 0;
  bool held_ = false;
};

// Whether some handle, in any process, holds the writer lock of the store whose lock file is
// `lock_path` right now: a read-only probe for tools that take no lock (salvage), never a way
// to exclude a writer (one may take the lock the moment after). False when the file cannot be
// opened (a damaged or read-only store without it).
bool writer_lock_held(const std::string& lock_path) noexcept;

// RAII holder.
class LockGuard {
 public:
  explicit LockGuard(WriterLock& lock, bool interruptible = false)
      : lock_(lock), waited_(lock_.acquire(interruptible)) {}
  ~LockGuard() { lock_.release(); }
  bool waited() const noexcept { return waited_; }
  LockGuard(const LockGuard&) = delete;
  LockGuard& operator=(const LockGuard&) = delete;

 private:
  WriterLock& lock_;
  bool waited_;
};

}  // namespace embstore::detail
