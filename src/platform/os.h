// os.h — the one seam between embstore and the operating system.
//
// Every system call the store makes goes through here, so test builds can fail any of them on
// demand (testing.h) and so the rest of the code never includes POSIX headers. Each function
// that can fail throws embstore::Error with the operation, the path and strerror in the message:
// ENOENT -> kNotFound, ENOSPC/EFBIG/EDQUOT -> kFull, EROFS -> kReadOnly, EACCES/EPERM ->
// kReadOnly when writing was asked and kPermissionDenied when only reading or looking (stat,
// statfs) was, anything else -> kIO. Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace embstore::detail::os {

enum class Access { kReadOnly, kReadWrite };

// Opens an existing regular file: anything else there (a FIFO, a directory, a device) is
// kCorruption naming it, without blocking (every file opened so is a store's or a manifest).
int open_file(const std::string& path, Access access);
// Creates a new file (O_EXCL) for reading and writing, mode 0644.
int create_file(const std::string& path);
// Opens `path` for reading and writing, creating it (mode 0644) if it does not exist.
int open_or_create_file(const std::string& path);
// True when `fd` is the file `path` names now (same device and inode).
bool same_file(int fd, const std::string& path) noexcept;
// A file's identity: no other file has it while this one exists (a mapping keeps a removed
// file in existence).
struct FileId {
  std::uint64_t device = 0;
  std::uint64_t inode = 0;
  bool operator==(const FileId&) const = default;
};
// The identity of the file `fd` is open on; nullopt if fstat fails.
std::optional<FileId> file_id(int fd) noexcept;
// The identity of the file `path` names now; nullopt if there is none (or stat fails).
std::optional<FileId> file_id_at(const std::string& path) noexcept;
// The file `path` names now as of its last change: identity, size and modification time. A file
// replaced (renamed over) or rewritten in place stamps differently; nullopt if there is none.
struct FileStamp {
  FileId id;
  std::uint64_t bytes = 0;
  std::int64_t modified_ns = 0;
  bool operator==(const FileStamp&) const = default;
};
std::optional<FileStamp> file_stamp_at(const std::string& path) noexcept;
// True when paths `a` and `b` name the same file or directory now (same device and inode; a
// bind mount or a symbolic link gives one several names); false if either does not exist.
bool same_entry(const std::string& a, const std::string& b) noexcept;
void remove_file(const std::string& path) noexcept;
void close_fd(int fd) noexcept;
// Creates a file with no name in directory `dir` (O_TMPFILE), mode 0644, for reading and
// writing: no other process can open, replace or remove it, and it disappears with its last
// descriptor, so a process killed while writing it leaves nothing behind. Returns -1 when the
// file system of `dir` cannot make one (EOPNOTSUPP, or a kernel before 3.11): the caller then
// creates a named file. Other errors throw.
int create_unnamed_file(const std::string& dir);
// Gives the unnamed file `fd` (create_unnamed_file) the name `path`, which must not exist
// (linkat). `what` names the file in an error.
void name_file(int fd, const std::string& path, const std::string& what);

std::uint64_t file_size(int fd, const std::string& path);
void read_exact(int fd, void* buf, std::size_t bytes, std::uint64_t offset,
                const std::string& path);
void write_all(int fd, const void* buf, std::size_t bytes, std::uint64_t offset,
               const std::string& path);
// A piece of memory for write_chunks.
struct Chunk {
  const void* data;
  std::size_t bytes;
};
// Writes the chunks back to back at `offset` (pwritev, IOV_MAX at a time, short writes resumed).
void write_chunks(int fd, const Chunk* chunks, std::size_t count, std::uint64_t offset,
                  const std::string& path);
// posix_fallocate: the range is allocated (and the file extended) or an error is thrown.
void allocate(int fd, std::uint64_t offset, std::uint64_t bytes, const std::string& path);
void datasync(int fd, const std::string& path);
// Starts writeback of the file's dirty pages without waiting for it (sync_file_range with
// SYNC_FILE_RANGE_WRITE alone): durable only after a datasync(), which also reports any error
// (this call neither reports nor consumes one).
void start_writeback(int fd) noexcept;
void sync_dir(const std::string& dir_path);

// Reserves `bytes` of address space with no access and no backing (PROT_NONE, MAP_NORESERVE),
// starting on a kHugePageBytes boundary when `bytes` is at least that large (so a file mapped
// at its start from offset 0 can be mapped with 2 MiB pages). Released with
// unmap(result, bytes).
void* reserve(std::uint64_t bytes, const std::string& what);
// Maps [offset, offset + bytes) of `fd` shared at `addr`, which lies inside a reservation.
void map_fixed(void* addr, std::uint64_t bytes, int fd, std::uint64_t offset, Access access,
               const std::string& path);
void unmap(void* addr, std::uint64_t bytes) noexcept;
// Fills the page tables of [addr, addr + bytes), a mapped range, from the page cache in one call
// (MADV_POPULATE_READ), so reading it takes no page faults. Advisory: does nothing where the
// kernel cannot (before Linux 5.14) or on any error; a later read behaves as it would have.
void populate_read(const void* addr, std::uint64_t bytes) noexcept;
// populate_read() of the parts of [addr, addr + bytes) already in the page cache (mincore(2),
// a chunk at a time): the rest is not read from the disk now, only when (if) it is touched. For
// a view of a range its caller may touch a little of (a whole store's rows, to index a few);
// where mincore cannot tell (a file this process may not write: Linux 5.0 on), it does nothing.
void populate_resident(const void* addr, std::uint64_t bytes) noexcept;
// The same for writing (MADV_POPULATE_WRITE): allocates the page-cache pages of a shared file
// mapping (file space must be allocated already) and maps them writable in one call, so the
// stores that follow take no page faults. Advisory like populate_read.
void populate_write(void* addr, std::uint64_t bytes) noexcept;
// Asks for 2 MiB pages over the whole 2 MiB blocks of [addr, addr + bytes), a mapped range
// (MADV_HUGEPAGE): page-cache pages created there by later faults come as 2 MiB folios where
// the file system can hold them, each mapped by one page-table entry when the range is 2 MiB-
// aligned in both the address space and the file. Advisory: does nothing where refused.
void advise_huge_pages(void* addr, std::uint64_t bytes) noexcept;
// 2 MiB: the large page size advise_huge_pages() asks for, and the alignment of reservations.
inline constexpr std::uint64_t kHugePageBytes = 2 << 20;
// kHugePageBytes of zeros for writes to copy from: a read-only anonymous mapping, made once per
// process and never unmapped, whose reads the kernel serves from its one 4 KiB zero page (so a
// copy from it stays in the first-level cache). Null where the mapping cannot be made.
const std::byte* zeros() noexcept;
// Maps [offset, offset + bytes) of `fd` private and writable (MAP_PRIVATE: the page cache's pages
// until a page is written, then a copy of this process's own; nothing written reaches the file),
// or, with fd -1, `bytes` of zeroed anonymous memory. MAP_NORESERVE: no swap is set aside for
// pages never written. `offset` a multiple of the page size. Released with unmap(result, bytes).
void* map_private(int fd, std::uint64_t offset, std::uint64_t bytes, const std::string& what);
// Maps [offset, offset + bytes) of `fd` shared at an address the kernel picks.
void* map_shared(int fd, std::uint64_t offset, std::uint64_t bytes, Access access,
                 const std::string& path);

void make_dir(const std::string& path);
// rename(2); returns 0 or the errno (EEXIST, ENOTEMPTY, EISDIR, ENOTDIR and EBUSY, which callers
// expect: a target that is not an empty directory, or a mount point), others thrown.
int rename_path(const std::string& from, const std::string& to);
// renameat2(2) with RENAME_NOREPLACE: returns 0, or EEXIST when something exists at `to` (which
// is left as it was); other errors are thrown. On a file system whose rename takes no flags (NFS
// and most FUSE file systems answer EINVAL), the same promise by other means: a directory claims
// `to` with mkdir(2) and is renamed over that empty directory (files another process puts in it
// meanwhile make that fail: EEXIST, theirs kept); a file is named `to` with link(2), then its
// old name unlinked (on a file system without hard links either, the error is thrown, saying so).
int rename_no_replace(const std::string& from, const std::string& to);
void remove_tree(const std::string& path) noexcept;
// The names in directory `path` (without "." and ".."); empty if it cannot be read.
std::vector<std::string> list_dir(const std::string& path) noexcept;
bool exists(const std::string& path) noexcept;
// True when `path` is a directory (stat, following links); false for anything else, or nothing.
bool is_directory(const std::string& path) noexcept;
// Whether `path` exists (stat, following links): false when nothing is there (ENOENT, or
// ENOTDIR for a path under a regular file). A look that fails otherwise throws naming the path:
// EACCES/EPERM (a directory on the way the process may not search) is kPermissionDenied
// whatever the caller means to do next, as for filesystem_magic(); anything else kIO.
bool look_up(const std::string& path);
// True when a directory entry has this name, whatever it is: a symbolic link counts as itself,
// even one naming nothing (lstat). What an output that must not exist is checked with.
bool entry_exists(const std::string& path) noexcept;
// True while process `pid` can still run: it exists and is not a zombie (a process that died,
// killed or not, keeps its /proc entry, as state Z, until its parent reaps it, which a parent
// may never do). Reads /proc/<pid>/stat; a process whose state cannot be read counts as alive.
bool process_alive(std::uint64_t pid) noexcept;
// statfs(2)'s f_type for the file system holding `path`, or its nearest existing ancestor when
// `path` does not exist yet. Test builds may fake it (testing.h, EMBSTORE_FS_MAGIC).
std::uint64_t filesystem_magic(const std::string& path);

// Blocks until this open file description holds the exclusive OFD lock on byte `byte` of `fd`
// (FORMAT.md, "The store directory": byte 0 the writer lock, byte 2 the key index lock).
void lock_exclusive(int fd, const std::string& path, std::uint64_t byte = 0,
                    bool interruptible = false);
// Asked when an interruptible lock_exclusive() is interrupted by a signal (EINTR): true makes it
// throw kInterrupted, false waits on. One for the process (the Python binding's: whether a
// SIGINT came); none by default, so such a wait always waits on. Called on the waiting thread.
using InterruptCheck = bool (*)() noexcept;
void set_interrupt_check(InterruptCheck check) noexcept;
// The same lock without waiting: false when another open file description holds it.
bool try_lock_exclusive(int fd, const std::string& path, std::uint64_t byte = 0);
// The mark of a handle waiting for that lock: a shared OFD lock on byte 1, which dies with its
// holder like the lock itself. Hints only: a failure is ignored (no mark, or none seen).
void mark_waiting(int fd, bool waiting) noexcept;
// True when another open file description has the mark set.
bool others_waiting(int fd) noexcept;
// True when another open file description holds a lock on byte `byte` of `fd` now (F_OFD_GETLK,
// which needs no write access): a hint that may be stale by the time it returns. False when
// the kernel cannot tell.
bool lock_held(int fd, std::uint64_t byte) noexcept;
void unlock(int fd, std::uint64_t byte = 0) noexcept;

// Shared (cross-process) futex on a 32-bit word of a MAP_SHARED mapping; the word may be mapped
// read-only. Returns after a wake, a value change, or `timeout_ns`.
void futex_wait(const std::uint32_t* word, std::uint32_t expected,
                std::int64_t timeout_ns) noexcept;
void futex_wake_all(std::uint32_t* word) noexcept;

// Fills `buf` from getrandom(2); `what` (a path) names the purpose in an error.
void random_bytes(void* buf, std::size_t bytes, const std::string& what);
// The kernel's boot id as 16 bytes (or an override set by tests). False when it is unknown (no
// /proc): callers must then assume a reboot may have happened.
bool boot_id(std::uint64_t out[2]);
void override_boot_id(std::string_view text);
std::int64_t unix_time_ns() noexcept;
// getpid(), cached; correct in forked children (refreshed by a pthread_atfork handler).
int current_pid() noexcept;

}  // namespace embstore::detail::os
