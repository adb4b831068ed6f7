#include "platform/os.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

#include "embstore/error.h"
#include "platform/testing.h"

namespace embstore::detail::os {
namespace {

using testing::Op;

// What to raise after an error that a per-process limit caused ("" for other errors).
std::string limit_hint(int err) {
  if (err == EMFILE) return " (the process is at its limit of open files: raise ulimit -n)";
  if (err == ENFILE) return " (the system is at its limit of open files: the sysctl fs.file-max)";
  return "";
}

[[noreturn]] void fail(const char* op, const std::string& path, int err) {
  throw Error(error_code_for_write_errno(err),
              std::string(op) + " " + path + ": " + std::strerror(err) + limit_hint(err), err);
}

// Runs the fault seam for `op`; returns the injected errno (0: make the real call).
int injected([[maybe_unused]] Op op) { return EMBSTORE_FAULT(op); }

// pwritev; in test builds with EMBSTORE_PWRITE_CAP set, it writes at most that many bytes, the
// short write a kernel may return (testing.h), so the resumption below gets exercised.
ssize_t pwritev_seam(int fd, const iovec* iov, int count, off_t offset) {
  if (const std::size_t cap = EMBSTORE_PWRITE_CAP(); cap > 0) {
    std::vector<iovec> capped;
    std::size_t room = cap;
    for (int i = 0; i < count && room > 0; ++i) {
      capped.push_back({iov[i].iov_base, std::min(iov[i].iov_len, room)});
      room -= capped.back().iov_len;
    }
    return ::pwritev(fd, capped.data(), static_cast<int>(capped.size()), offset);
  }
  return ::pwritev(fd, iov, count, offset);
}

// A look (stat, statfs) that fails: EACCES/EPERM is a directory on the way the process may not
// search, a permission problem whatever the caller means to do next, not a read-only store.
[[noreturn]] void fail_looking(const char* op, const std::string& path, int err) {
  if (err == EACCES || err == EPERM) {
    throw Error(ErrorCode::kPermissionDenied,
                std::string(op) + " " + path + ": " + std::strerror(err), err);
  }
  fail(op, path, err);
}

}  // namespace

int open_file(const std::string& path, Access access) {
  if (int err = injected(Op::kOpen)) fail("open", path, err);
  // O_NONBLOCK: a FIFO where a store's file or a manifest should be would block the open (and a
  // read) until some writer came; it is refused below instead, as is anything not a regular file.
  int flags = (access == Access::kReadOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK;
  int fd;
  do fd = ::open(path.c_str(), flags);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    const int err = errno;
    // A file this user may not read is a permission problem, not a read-only store.
    if (access == Access::kReadOnly && (err == EACCES || err == EPERM)) {
      throw Error(ErrorCode::kPermissionDenied,
                  "open " + path + " for reading: " + std::strerror(err), err);
    }
    fail("open", path, err);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail("fstat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    const char* kind = S_ISDIR(st.st_mode)    ? "a directory"
                       : S_ISFIFO(st.st_mode) ? "a FIFO"
                       : S_ISSOCK(st.st_mode) ? "a socket"
                                              : "a device";
    throw Error(ErrorCode::kCorruption, path + ": is " + kind + ", not a regular file");
  }
  // Blocking again, as every descriptor the code uses is assumed to be.
  if (::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0) {
    const int err = errno;
    ::close(fd);
    fail("fcntl", path, err);
  }
  return fd;
}

int create_file(const std::string& path) {
  if (int err = injected(Op::kOpen)) fail("create", path, err);
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) fail("create", path, errno);
  return fd;
}

int create_unnamed_file(const std::string& dir) {
  int err = injected(Op::kTmpfile);
  if (err == 0) {
    const int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
    if (fd >= 0) return fd;
    err = errno;
  }
  // O_TMPFILE unknown to the kernel reads as a directory opened for writing (EISDIR).
  if (err == EOPNOTSUPP || err == EISDIR) return -1;
  fail("create an unnamed file in", dir, err);
}

void name_file(int fd, const std::string& path, const std::string& what) {
  if (int err = injected(Op::kRename)) fail("link", what + " -> " + path, err);
  // linkat(fd, "", AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; the /proc link of the descriptor
  // does not. Without /proc, try the former.
  const std::string self = "/proc/self/fd/" + std::to_string(fd);
  if (::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, path.c_str(), AT_SYMLINK_FOLLOW) == 0) return;
  int err = errno;
  if (err == ENOENT && !exists("/proc/self/fd")) {
    if (::linkat(fd, "", AT_FDCWD, path.c_str(), AT_EMPTY_PATH) == 0) return;
    err = errno;
  }
  fail("link", what + " -> " + path, err);
}

int open_or_create_file(const std::string& path) {
  if (int err = injected(Op::kOpen)) fail("open", path, err);
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) fail("open", path, errno);
  return fd;
}

bool same_file(int fd, const std::string& path) noexcept {
  const std::optional<FileId> id = file_id(fd);
  return id && id == file_id_at(path);
}

std::optional<FileId> file_id(int fd) noexcept {
  struct stat st;
  if (::fstat(fd, &st) != 0) return std::nullopt;
  return FileId{static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino)};
}

std::optional<FileId> file_id_at(const std::string& path) noexcept {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return FileId{static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino)};
}

std::optional<FileStamp> file_stamp_at(const std::string& path) noexcept {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return FileStamp{
      FileId{static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino)},
      static_cast<std::uint64_t>(st.st_size),
      static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

bool same_entry(const std::string& a, const std::string& b) noexcept {
  const std::optional<FileId> id = file_id_at(a);
  return id && id == file_id_at(b);
}

void remove_file(const std::string& path) noexcept { ::unlink(path.c_str()); }

void close_fd(int fd) noexcept {
  if (fd >= 0) ::close(fd);
}

std::uint64_t file_size(int fd, const std::string& path) {
  if (int err = injected(Op::kFstat)) fail("fstat", path, err);
  struct stat st;
  if (::fstat(fd, &st) != 0) fail("fstat", path, errno);
  return static_cast<std::uint64_t>(st.st_size);
}

void read_exact(int fd, void* buf, std::size_t bytes, std::uint64_t offset,
                const std::string& path) {
  auto* p = static_cast<char*>(buf);
  while (bytes > 0) {
    if (int err = injected(Op::kPread)) fail("read", path, err);
    ssize_t n = ::pread(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("read", path, errno);
    if (n == 0) {
      throw Error(ErrorCode::kCorruption, "read " + path + ": file ends at byte " +
                                              std::to_string(offset) + " before the " +
                                              std::to_string(bytes) + " bytes expected there");
    }
    p += n;
    bytes -= static_cast<std::size_t>(n);
    offset += static_cast<std::uint64_t>(n);
  }
}

void write_chunks(int fd, const Chunk* chunks, std::size_t count, std::uint64_t offset,
                  const std::string& path) {
  iovec iov[IOV_MAX];
  std::size_t next = 0;     // First chunk not yet copied into iov.
  std::size_t pending = 0;  // iovecs in iov not yet written.
  while (next < count || pending > 0) {
    for (; pending < IOV_MAX && next < count; ++next) {
      if (chunks[next].bytes == 0) continue;
      iov[pending++] = iovec{const_cast<void*>(chunks[next].data), chunks[next].bytes};
    }
    if (pending == 0) return;
    if (int err = injected(Op::kPwrite)) fail("write", path, err);
    const ssize_t n = pwritev_seam(fd, iov, static_cast<int>(pending), static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("write", path, errno);
    if (n == 0) fail("write", path, EIO);  // No progress on a regular file: do not spin.
    offset += static_cast<std::uint64_t>(n);
    // Drop the iovecs written in full; resume a partly written one where it stopped.
    auto left = static_cast<std::size_t>(n);
    std::size_t written = 0;
    while (written < pending && left >= iov[written].iov_len) left -= iov[written++].iov_len;
    if (written < pending) {
      iov[written].iov_base = static_cast<char*>(iov[written].iov_base) + left;
      iov[written].iov_len -= left;
    }
    if (written > 0) std::move(iov + written, iov + pending, iov);
    pending -= written;
  }
}

void write_all(int fd, const void* buf, std::size_t bytes, std::uint64_t offset,
               const std::string& path) {
  const Chunk whole{buf, bytes};
  write_chunks(fd, &whole, 1, offset, path);
}

void allocate(int fd, std::uint64_t offset, std::uint64_t bytes, const std::string& path) {
  if (bytes == 0) return;  // posix_fallocate rejects an empty range with EINVAL.
  if (int err = injected(Op::kFallocate)) fail("fallocate", path, err);
  int err;
  do err = ::posix_fallocate(fd, static_cast<off_t>(offset), static_cast<off_t>(bytes));
  while (err == EINTR);
  if (err == EOPNOTSUPP || err == EINVAL) {
    throw Error(ErrorCode::kIO,
                "fallocate " + path + ": the file system does not support preallocation (" +
                    std::strerror(err) + "); embstore refuses to map unallocated space",
                err);
  }
  if (err != 0) fail("fallocate", path, err);
}

void datasync(int fd, const std::string& path) {
  if (int err = injected(Op::kMsync)) fail("fdatasync", path, err);
  if (::fdatasync(fd) != 0) fail("fdatasync", path, errno);
  EMBSTORE_SYNCED(path.c_str());
}

void start_writeback(int fd) noexcept { (void)::sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE); }

void sync_dir(const std::string& dir_path) {
  if (int err = injected(Op::kMsync)) fail("fsync", dir_path, err);
  int fd = ::open(dir_path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail("open", dir_path, errno);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) fail("fsync", dir_path, err);
}

namespace {
// What to change after mmap's ENOMEM, the likeliest limit first: the count of mappings a
// process may hold when it is at it (each open store holds about five), the data-segment limit
// for a private writable mapping (`as_data`), the address-space limit if one is set; else the
// kernel's own accounting. (A hint named the address-space limit for every ENOMEM once one was
// set, whatever ran out: found by a resource-limit review.)
std::string enomem_hint(bool as_data = false) {
  std::uint64_t mappings = 0, max_mappings = 0;
  {
    std::ifstream maps("/proc/self/maps");
    for (std::string line; std::getline(maps, line);) ++mappings;
    std::ifstream("/proc/sys/vm/max_map_count") >> max_mappings;
  }
  if (max_mappings > 0 && mappings + 16 >= max_mappings) {
    return " (the process holds " + std::to_string(mappings) + " mappings, at the sysctl " +
           "vm.max_map_count of " + std::to_string(max_mappings) +
           ": raise it or open fewer stores)";
  }
  rlimit limit{};
  if (as_data && ::getrlimit(RLIMIT_DATA, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
    return " (the data-segment limit is " + std::to_string(limit.rlim_cur) +
           " bytes: raise ulimit -d)";
  }
  if (::getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
    return " (the address-space limit is " + std::to_string(limit.rlim_cur) +
           " bytes: raise ulimit -v)";
  }
  return " (the kernel refused the memory: see the sysctl vm.overcommit_memory, or open fewer "
         "stores)";
}
}  // namespace

void* reserve(std::uint64_t bytes, const std::string& what) {
  if (int err = injected(Op::kMmap)) fail("reserve address space for", what, err);
  // kHugePageBytes more than asked, then the slack before the first boundary and after the
  // range is given back. Ranges smaller than a large page hold none: placed as the kernel
  // likes, packed (thousands of small stores open in one process, each with several ranges,
  // would otherwise leave a 2 MiB gap beside each and run out of mappings under sanitizers).
  const std::uint64_t slack = bytes >= kHugePageBytes ? kHugePageBytes : 0;
  void* p =
      ::mmap(nullptr, bytes + slack, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    int err = errno;
    throw Error(err == ENOMEM ? ErrorCode::kFull : ErrorCode::kIO,
                "reserve " + std::to_string(bytes) + " bytes of address space for " + what + ": " +
                    std::strerror(err) + (err == ENOMEM ? enomem_hint() : std::string()),
                err);
  }
  auto* raw = static_cast<std::byte*>(p);
  if (slack == 0) return raw;
  const std::uint64_t head =
      (kHugePageBytes - reinterpret_cast<std::uintptr_t>(raw) % kHugePageBytes) % kHugePageBytes;
  unmap(raw, head);
  unmap(raw + head + bytes, kHugePageBytes - head);
  return raw + head;
}

void map_fixed(void* addr, std::uint64_t bytes, int fd, std::uint64_t offset, Access access,
               const std::string& path) {
  if (int err = injected(Op::kMmap)) fail("mmap", path, err);
  int prot = access == Access::kReadOnly ? PROT_READ : PROT_READ | PROT_WRITE;
  void* p = ::mmap(addr, bytes, prot, MAP_SHARED | MAP_FIXED, fd, static_cast<off_t>(offset));
  if (p == MAP_FAILED) {
    int err = errno;
    // A failed MAP_FIXED may already have unmapped the range: reserve it again, so no other
    // mapping of this process can land inside the store's address range.
    ::mmap(addr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    throw Error(err == ENOMEM ? ErrorCode::kFull : ErrorCode::kIO,
                "mmap " + path + " bytes [" + std::to_string(offset) + ", " +
                    std::to_string(offset + bytes) + "): " + std::strerror(err) +
                    (err == ENOMEM ? enomem_hint() : std::string()),
                err);
  }
}

void* map_private(int fd, std::uint64_t offset, std::uint64_t bytes, const std::string& what) {
  const int flags = MAP_PRIVATE | MAP_NORESERVE | (fd < 0 ? MAP_ANONYMOUS : 0);
  int err = injected(Op::kMmap);
  void* p = MAP_FAILED;
  if (err == 0) {
    p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, flags, fd, static_cast<off_t>(offset));
    if (p == MAP_FAILED) err = errno;
  }
  if (err != 0) {
    throw Error(err == ENOMEM ? ErrorCode::kFull : ErrorCode::kIO,
                "map " + std::to_string(bytes) + " bytes of " + what + " privately: " +
                    std::strerror(err) + (err == ENOMEM ? enomem_hint(true) : std::string()),
                err);
  }
  return p;
}

void* map_shared(int fd, std::uint64_t offset, std::uint64_t bytes, Access access,
                 const std::string& path) {
  if (int err = injected(Op::kMmap)) fail("mmap", path, err);
  int prot = access == Access::kReadOnly ? PROT_READ : PROT_READ | PROT_WRITE;
  void* p = ::mmap(nullptr, bytes, prot, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (p == MAP_FAILED) {
    const int err = errno;
    if (err != ENOMEM) fail("mmap", path, err);
    throw Error(ErrorCode::kFull, "mmap " + path + ": " + std::strerror(err) + enomem_hint(), err);
  }
  return p;
}

namespace {
void populate(const void* addr, std::uint64_t bytes, int advice) noexcept {
  const auto start = reinterpret_cast<std::uintptr_t>(addr) & ~std::uintptr_t{4095};
  const std::uintptr_t end = reinterpret_cast<std::uintptr_t>(addr) + bytes;
  int err;
  do err = ::madvise(reinterpret_cast<void*>(start), end - start, advice) == 0 ? 0 : errno;
  while (err == EINTR);
}

// madvise over the whole `unit`-aligned units inside [addr, addr + bytes), if any; advisory.
void advise_inside(const void* addr, std::uint64_t bytes, std::uint64_t unit, int advice) noexcept {
  const auto start = reinterpret_cast<std::uintptr_t>(addr);
  const std::uintptr_t first = (start + unit - 1) / unit * unit;
  const std::uintptr_t end = (start + bytes) / unit * unit;
  if (end > first) (void)::madvise(reinterpret_cast<void*>(first), end - first, advice);
}
}  // namespace

// The advice values, absent from older headers: MADV_POPULATE_READ, MADV_POPULATE_WRITE.
void populate_read(const void* addr, std::uint64_t bytes) noexcept { populate(addr, bytes, 22); }
void populate_write(void* addr, std::uint64_t bytes) noexcept { populate(addr, bytes, 23); }

void populate_resident(const void* addr, std::uint64_t bytes) noexcept {
  constexpr std::uint64_t kPage = 4096;
  constexpr std::uint64_t kChunkPages = 16384;  // 64 MiB a mincore call
  constexpr std::uint64_t kMinRunPages = 16;    // shorter runs are left to fault-around
  const auto start = reinterpret_cast<std::uintptr_t>(addr) & ~std::uintptr_t{kPage - 1};
  const std::uintptr_t end = reinterpret_cast<std::uintptr_t>(addr) + bytes;
  std::vector<unsigned char> resident;
  try {
    resident.resize(std::min<std::uint64_t>(kChunkPages, (end - start + kPage - 1) / kPage));
  } catch (...) {
    return;
  }
  for (std::uintptr_t chunk = start; chunk < end; chunk += kChunkPages * kPage) {
    const std::uint64_t pages =
        std::min<std::uint64_t>(kChunkPages, (end - chunk + kPage - 1) / kPage);
    if (::mincore(reinterpret_cast<void*>(chunk), pages * kPage, resident.data()) != 0) return;
    std::uint64_t run = 0;  // resident pages ending at page i
    for (std::uint64_t i = 0; i <= pages; ++i) {
      if (i < pages && (resident[i] & 1) != 0) {
        ++run;
        continue;
      }
      if (run >= kMinRunPages) {
        populate(reinterpret_cast<const void*>(chunk + (i - run) * kPage), run * kPage, 22);
      }
      run = 0;
    }
  }
}

void advise_huge_pages(void* addr, std::uint64_t bytes) noexcept {
  advise_inside(addr, bytes, kHugePageBytes, MADV_HUGEPAGE);
}

const std::byte* zeros() noexcept {
  static const std::byte* const at = [] {
    void* m = ::mmap(nullptr, kHugePageBytes, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return static_cast<const std::byte*>(nullptr);
    // Not the 2 MiB zero page: a copy from it would stream from memory.
    ::madvise(m, kHugePageBytes, MADV_NOHUGEPAGE);
    return static_cast<const std::byte*>(m);
  }();
  return at;
}

void unmap(void* addr, std::uint64_t bytes) noexcept {
  if (addr != nullptr && bytes != 0) ::munmap(addr, bytes);
}

void make_dir(const std::string& path) {
  if (int err = injected(Op::kMkdir)) fail("mkdir", path, err);
  if (::mkdir(path.c_str(), 0755) != 0) {
    int err = errno;
    if (err == EEXIST) {
      throw Error(ErrorCode::kAlreadyExists, "mkdir " + path + ": already exists", err);
    }
    fail("mkdir", path, err);
  }
}

int rename_path(const std::string& from, const std::string& to) {
  if (int err = injected(Op::kRename)) fail("rename", from + " -> " + to, err);
  if (::rename(from.c_str(), to.c_str()) == 0) return 0;
  int err = errno;
  if (err == EEXIST || err == ENOTEMPTY || err == EISDIR || err == ENOTDIR || err == EBUSY) {
    return err;
  }
  fail("rename", from + " -> " + to, err);
}

namespace {

// rename_no_replace() where renameat2's flags are refused (os.h).
int rename_no_replace_without_flags(const std::string& from, const std::string& to) {
  struct stat st {};
  if (::lstat(from.c_str(), &st) != 0) fail("rename", from + " -> " + to, errno);
  if (S_ISDIR(st.st_mode)) {
    if (::mkdir(to.c_str(), 0700) != 0) {
      const int err = errno;
      if (err == EEXIST) return err;
      fail("mkdir", to, err);
    }
    if (::rename(from.c_str(), to.c_str()) == 0) return 0;
    const int err = errno;
    ::rmdir(to.c_str());  // Ours, still empty; not when another process's files are in it.
    if (err == ENOTEMPTY || err == EEXIST) return EEXIST;
    fail("rename", from + " -> " + to, err);
  }
  if (::link(from.c_str(), to.c_str()) == 0) {
    ::unlink(from.c_str());  // Left in the caller's working directory, removed with it.
    return 0;
  }
  const int err = errno;
  if (err == EEXIST) return err;
  fail("rename",
       from + " -> " + to + " (the file system renames only with replacing, and link failed too)",
       err);
}

}  // namespace

int rename_no_replace(const std::string& from, const std::string& to) {
  if (int err = injected(Op::kRename)) fail("rename", from + " -> " + to, err);
  int err = injected(Op::kRenameNoReplace);
  if (err == 0) {
    if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) {
      return 0;
    }
    err = errno;
  }
  if (err == EEXIST) return err;
  // NFS and most FUSE file systems take no rename flags.
  if (err == EINVAL || err == ENOSYS || err == EOPNOTSUPP) {
    return rename_no_replace_without_flags(from, to);
  }
  fail("rename", from + " -> " + to, err);
}

std::uint64_t filesystem_magic(const std::string& path) {
  if (const std::uint64_t fake = EMBSTORE_FS_MAGIC(); fake != 0) return fake;
  std::string at = path;
  for (;;) {
    struct statfs st;
    if (::statfs(at.c_str(), &st) == 0) return static_cast<std::uint64_t>(st.f_type);
    const int err = errno;
    const auto slash = at.find_last_of('/', at.size() > 1 ? at.size() - 2 : 0);
    // ENOTDIR: a path under a regular file, which cannot exist either; the caller's own open
    // then names it (kNotFound), as a Reader's does, rather than this look-up failing with kIO.
    if ((err != ENOENT && err != ENOTDIR) || at == "/" || at == ".") {
      fail_looking("statfs", at, err);
    }
    at = slash == std::string::npos ? "." : slash == 0 ? "/" : at.substr(0, slash);
  }
}

void remove_tree(const std::string& path) noexcept {
  if (DIR* dir = ::opendir(path.c_str())) {
    while (dirent* entry = ::readdir(dir)) {
      std::string name = entry->d_name;
      if (name == "." || name == "..") continue;
      ::unlink((path + "/" + name).c_str());
    }
    ::closedir(dir);
  }
  ::rmdir(path.c_str());
}

std::vector<std::string> list_dir(const std::string& path) noexcept {
  std::vector<std::string> names;
  DIR* dir = ::opendir(path.c_str());
  if (dir == nullptr) return names;
  try {
    while (dirent* entry = ::readdir(dir)) {
      std::string name = entry->d_name;
      if (name != "." && name != "..") names.push_back(std::move(name));
    }
  } catch (...) {
    // Out of memory: what was listed so far.
  }
  ::closedir(dir);
  return names;
}

bool exists(const std::string& path) noexcept {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) noexcept {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool look_up(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) return true;
  const int err = errno;
  if (err == ENOENT || err == ENOTDIR) return false;
  fail_looking("stat", path, err);
}

bool entry_exists(const std::string& path) noexcept {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

bool process_alive(std::uint64_t pid) noexcept {
  const std::string dir = "/proc/" + std::to_string(pid);
  try {
    // "pid (comm) state ...": comm may hold spaces and parentheses, so the state is the first
    // field after the last ')'.
    std::ifstream in(dir + "/stat");
    std::string line;
    if (!std::getline(in, line)) return exists(dir);  // Gone, or unreadable.
    const std::size_t close = line.rfind(')');
    if (close == std::string::npos || close + 2 >= line.size()) return true;
    const char state = line[close + 2];
    return state != 'Z' && state != 'X';
  } catch (...) {
    return true;
  }
}

namespace {
// An OFD lock request of `type` on one byte (l_pid must be 0 for OFD locks): byte 0 is the
// writer lock, byte 1 the mark of writers waiting for it, byte 2 the key index lock.
struct flock byte_lock(short type, off_t byte = 0) noexcept {
  struct flock fl;
  std::memset(&fl, 0, sizeof(fl));
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  return fl;
}
constexpr off_t kWaitingByte = 1;

std::atomic<InterruptCheck> g_interrupt_check{nullptr};  // set_interrupt_check()

// An exclusive lock on `byte`, waiting for it or not: false when not waiting and another holds
// it. `interruptible`: see lock_exclusive().
bool take_exclusive(int fd, const std::string& path, std::uint64_t byte, bool wait,
                    bool interruptible = false) {
  if (int err = injected(Op::kLock)) fail("lock", path, err);
  struct flock fl = byte_lock(F_WRLCK, static_cast<off_t>(byte));
  while (::fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl) != 0) {
    if (errno == EINTR) {
      const InterruptCheck check = g_interrupt_check.load(std::memory_order_acquire);
      if (interruptible && check != nullptr && check()) {
        throw Error(ErrorCode::kInterrupted,
                    path + ": interrupted while waiting for the writer lock; nothing was written");
      }
      continue;
    }
    if (!wait && (errno == EAGAIN || errno == EACCES)) return false;
    fail("lock", path, errno);
  }
  return true;
}
}  // namespace

void lock_exclusive(int fd, const std::string& path, std::uint64_t byte, bool interruptible) {
  take_exclusive(fd, path, byte, true, interruptible);
}

void set_interrupt_check(InterruptCheck check) noexcept {
  g_interrupt_check.store(check, std::memory_order_release);
}

bool try_lock_exclusive(int fd, const std::string& path, std::uint64_t byte) {
  return take_exclusive(fd, path, byte, false);
}

void mark_waiting(int fd, bool waiting) noexcept {
  struct flock fl = byte_lock(waiting ? F_RDLCK : F_UNLCK, kWaitingByte);
  while (::fcntl(fd, F_OFD_SETLK, &fl) != 0 && errno == EINTR) {
  }
}

bool others_waiting(int fd) noexcept {
  struct flock fl = byte_lock(F_WRLCK, kWaitingByte);
  return ::fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

bool lock_held(int fd, std::uint64_t byte) noexcept {
  struct flock fl = byte_lock(F_WRLCK, static_cast<off_t>(byte));
  return ::fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

void unlock(int fd, std::uint64_t byte) noexcept {
  struct flock fl = byte_lock(F_UNLCK, static_cast<off_t>(byte));
  ::fcntl(fd, F_OFD_SETLK, &fl);
}

void futex_wait(const std::uint32_t* word, std::uint32_t expected,
                std::int64_t timeout_ns) noexcept {
  if (injected(Op::kFutex) != 0) return;  // Callers re-check the word: a spurious wake-up.
  struct timespec ts;
  ts.tv_sec = timeout_ns / 1'000'000'000;
  ts.tv_nsec = timeout_ns % 1'000'000'000;
  // No FUTEX_PRIVATE_FLAG: waiters and wakers live in different processes.
  ::syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake_all(std::uint32_t* word) noexcept {
  // A lost wake-up: waiters sleep in bounded slices (Reader::wait), so they still notice.
  if (injected(Op::kFutex) != 0) return;
  ::syscall(SYS_futex, word, FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

void random_bytes(void* buf, std::size_t bytes, const std::string& what) {
  if (int err = injected(Op::kRandom)) fail("getrandom for", what, err);
  auto* p = static_cast<char*>(buf);
  while (bytes > 0) {
    ssize_t n = ::getrandom(p, bytes, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("getrandom for", what, errno);
    p += n;
    bytes -= static_cast<std::size_t>(n);
  }
}

namespace {

bool parse_uuid(std::string_view text, std::uint64_t out[2]) {
  unsigned char bytes[16] = {};
  int n = 0;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (std::size_t i = 0; i + 1 < text.size() && n < 16; ++i) {
    const int hi = hex(text[i]);
    if (hi < 0) continue;
    const int lo = hex(text[i + 1]);
    if (lo < 0) continue;
    bytes[n++] = static_cast<unsigned char>(hi * 16 + lo);
    ++i;
  }
  std::memcpy(out, bytes, 16);
  return n == 16;
}

// Lock-free, so Readers on many threads (and forked children) never contend or deadlock here.
struct BootOverride {
  std::atomic<bool> set{false};
  std::atomic<std::uint64_t> id[2] = {0, 0};
};
BootOverride g_boot_override;

struct KernelBootId {
  bool known = false;
  std::uint64_t id[2] = {0, 0};
};

const KernelBootId& kernel_boot_id() {
  static const KernelBootId kernel = [] {
    KernelBootId k;
    std::ifstream in("/proc/sys/kernel/random/boot_id");
    std::string text;
    std::getline(in, text);
    k.known = parse_uuid(text, k.id);
    if (testing::kEnabled) {
      // Test builds: child processes simulate a reboot through the environment.
      if (const char* env = std::getenv("EMBSTORE_BOOT_ID")) override_boot_id(env);
    }
    return k;
  }();
  return kernel;
}

}  // namespace

bool boot_id(std::uint64_t out[2]) {
  const KernelBootId& kernel = kernel_boot_id();
  if (g_boot_override.set.load(std::memory_order_acquire)) {
    out[0] = g_boot_override.id[0].load(std::memory_order_relaxed);
    out[1] = g_boot_override.id[1].load(std::memory_order_relaxed);
    return true;
  }
  out[0] = kernel.id[0];
  out[1] = kernel.id[1];
  return kernel.known;
}

void override_boot_id(std::string_view text) {
  std::uint64_t id[2] = {0, 0};
  if (text.empty() || !parse_uuid(text, id)) {
    g_boot_override.set.store(false, std::memory_order_release);
    return;
  }
  g_boot_override.id[0].store(id[0], std::memory_order_relaxed);
  g_boot_override.id[1].store(id[1], std::memory_order_relaxed);
  g_boot_override.set.store(true, std::memory_order_release);
}

std::int64_t unix_time_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

namespace {
// glibc no longer caches getpid(): keep our own copy, refreshed in every forked child.
std::atomic<int> g_pid{0};
void refresh_pid_after_fork() { g_pid.store(static_cast<int>(::getpid())); }
}  // namespace

int current_pid() noexcept {
  int pid = g_pid.load(std::memory_order_relaxed);
  if (pid == 0) {
    static const bool registered = [] {
      ::pthread_atfork(nullptr, nullptr, refresh_pid_after_fork);
      return true;
    }();
    (void)registered;
    pid = static_cast<int>(::getpid());
    g_pid.store(pid, std::memory_order_relaxed);
  }
  return pid;
}

}  // namespace embstore::detail::os
