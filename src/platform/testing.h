// testing.h — crash points and the fault seam, compiled into test builds only.
//
// The library is built twice: `embstore` (release: every hook below compiles to nothing) and
// `embstore_testing` (EMBSTORE_TESTING defined), which the reliability tests link. Only the
// sources that include this header differ between the two; the others compile once, into objects
// both share (CMakeLists.txt, EMBSTORE_HOOK_FREE_SOURCES), and may not include it. Hooks are armed
// in-process through the functions below or, for child processes, through the environment:
//   EMBSTORE_CRASH=<point>:<n>          raise SIGKILL at the n-th pass (1-based) of <point>
//   EMBSTORE_FAULT=<op>:<n>:<errno>[:forever][,...]   fail the n-th call of <op> with <errno>
//   EMBSTORE_BOOT_ID=<uuid>             the boot id the store sees (simulates a reboot)
//   EMBSTORE_WRITE_PATH=<path>          how appends write rows and index entries
//   (src/log/commit.cc,
//                                       plan_writes): mapping | syscall for both, every batch;
//                                       alternate: the four combinations in turn, one per
//                                       append; unset: by batch size
//   EMBSTORE_FS_MAGIC=<f_type>          the statfs f_type every path reports (0x6969: NFS), to
//                                       test the refusal of remote file systems
//   EMBSTORE_PWRITE_CAP=<bytes>         each pwrite/pwritev writes at most this much, as a
//                                       kernel may (a short write), so callers must resume
// A crash point can also pause the thread passing it (arm_pause, in-process only).
// Points: after-grow-data, after-grow-index, after-copy, mid-index-write, before-publish,
//         after-publish, mid-sync, during-recovery, create-staged, create-allocated,
//         create-before-rename, truncate-copied, truncate-files-synced, truncate-flag-stored,
//         truncate-flagged, truncate-mid-switch, truncate-switched, header-copy-written,
//         mid-key-index, key-index-create (a growth or rebuild about to create its file),
//         during-key-index-build (after each step of a build), key-index-publish (about to
//         name a built file keys.<K>), before-key-index-switch, ahead-of-appends (a growth's
//         switch or a flush has asked for a Writer's mutex: its appends wait from here on),
//         close-joins-growth (close() has told a growth in progress the rows stored),
//         info-opened (open_with_info has its first Reader, not yet the counters), log-loaded
//         (the loader read a generation's counters and mapped its files, not yet checked that
//         no truncate moved the store meanwhile: log/recovery.cc), salvage-counted (salvage has
//         read the counters, not yet the files' sizes).
// Ops: open, fallocate, fstat, mmap, msync (fdatasync/fsync of store files), pwrite, pread,
//      rename (also the link that names an unnamed file), mkdir, lock (the OFD writer lock),
//      getrandom, futex (a failed wait returns at once, as a spurious wake-up; a failed wake
//      wakes no one), tmpfile (creating an unnamed file; EOPNOTSUPP makes the caller fall back
//      to a named one, as on a file system without O_TMPFILE), alloc (the key index's indexing
//      of rows after an append published them throws std::bad_alloc; the errno is unused),
//      rename-noreplace (renameat2 with RENAME_NOREPLACE alone: EINVAL, as NFS and most FUSE file
//      systems answer, makes os::rename_no_replace take its way without flags).
#pragma once

#ifdef EMBSTORE_HOOK_FREE  // Shared objects must not differ between the two libraries.
#error "testing.h in a source of EMBSTORE_HOOK_FREE_SOURCES: list it in EMBSTORE_HOOKED_SOURCES"
#endif

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace embstore::detail::testing {

enum class Op : int {
  kOpen,
  kFallocate,
  kFstat,
  kMmap,
  kMsync,
  kPwrite,
  kPread,
  kRename,
  kMkdir,
  kLock,
  kRandom,
  kFutex,
  kTmpfile,
  kAlloc,
  kRenameNoReplace,
  kCount,
};

std::string_view op_name(Op op) noexcept;

// What EMBSTORE_WRITE_PATH imposes on one append: nothing (forced false), or which of the rows
// and the index entries go through a system call rather than the mapping.
struct WritePath {
  bool forced = false;
  bool rows_by_syscall = false;
  bool entries_by_syscall = false;
};

#ifdef EMBSTORE_TESTING
inline constexpr bool kEnabled = true;
// Fails the nth call (1-based, counted from now) of `op` with `err`; if `forever`, every later
// call too. Replaces any earlier arming of the same op.
void arm_fault(Op op, std::uint64_t nth, int err, bool forever);
void arm_crash(std::string_view point, std::uint64_t nth);
// At the nth pass (1-based, counted from now) of crash point `point`, the passing thread creates
// the file <dir>/paused.<point> and waits until <dir>/resume.<point> exists; other threads run
// on. Several may be armed (one per point and pass). For tests that must order what threads of
// several processes do (fork after arming, or arm in the child).
void arm_pause(std::string_view point, std::uint64_t nth, std::string_view dir);
void disarm_all();
std::uint64_t faults_injected() noexcept;
// Returns the errno to fail with, or 0 to proceed. Called by the seam before each real call.
int fault_for(Op op) noexcept;
void crash_point(const char* point) noexcept;
// Overrides the boot id the store sees (simulates a reboot). Empty: the kernel's.
void set_boot_id(std::string_view boot_id_text);
// The path this append must take (EMBSTORE_WRITE_PATH; "alternate" moves on at every call).
WritePath write_path() noexcept;
// Overrides EMBSTORE_WRITE_PATH for this process: "", "mapping", "syscall" or "alternate".
// Returns the mode it replaces.
std::string_view set_write_path(std::string_view mode);
// The most bytes one pwrite/pwritev may write (EMBSTORE_PWRITE_CAP); 0: no cap.
std::size_t pwrite_cap() noexcept;
void set_pwrite_cap(std::size_t bytes);
// The f_type os::filesystem_magic reports for every path (EMBSTORE_FS_MAGIC); 0: the real one.
std::uint64_t filesystem_magic() noexcept;
void set_filesystem_magic(std::uint64_t f_type);
// Called by os::datasync with the file's path each time an fdatasync of it succeeds, in the
// thread that made it, before the caller goes on: a power-loss model records the file as the
// disk then holds it (tests/reliability, scenario 6). nullptr: none. In-process only.
using SyncObserver = void (*)(const char* path);
void set_sync_observer(SyncObserver observer);
void synced(const char* path) noexcept;
#define EMBSTORE_SYNCED(path) ::embstore::detail::testing::synced(path)
#define EMBSTORE_CRASH_POINT(name) ::embstore::detail::testing::crash_point(name)
#define EMBSTORE_FAULT(op) ::embstore::detail::testing::fault_for(op)
#define EMBSTORE_WRITE_PATH() ::embstore::detail::testing::write_path()
#define EMBSTORE_PWRITE_CAP() ::embstore::detail::testing::pwrite_cap()
#define EMBSTORE_FS_MAGIC() ::embstore::detail::testing::filesystem_magic()
#else
inline constexpr bool kEnabled = false;
#define EMBSTORE_CRASH_POINT(name) ((void)0)
#define EMBSTORE_FAULT(op) 0
#define EMBSTORE_WRITE_PATH() \
  ::embstore::detail::testing::WritePath {}
#define EMBSTORE_PWRITE_CAP() \
  std::size_t { 0 }
#define EMBSTORE_FS_MAGIC() \
  std::uint64_t { 0 }
#define EMBSTORE_SYNCED(path) ((void)0)
#endif

}  // namespace embstore::detail::testing
