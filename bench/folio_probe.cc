// folio_probe — what the first scan of a freshly mapped file costs, depending on how its page
// cache was created. No store is involved: a file is allocated (posix_fallocate, as a store's
// segments are), written with `pwrite()` in batches of 512 x 768 float32 (as a writer alone
// writes rows), and then a fresh child process maps it read-only at a 2 MiB-aligned address (as
// a Reader does, with the library's own platform/os.h), fills the page tables
// (MADV_POPULATE_READ, as Reader::rows() does) and sums every 8-byte word twice. Three ways to
// create the page cache, run in a fresh random order each round:
//   pwrite   the writes allocate the page cache (what a plain writer does): folios no larger
//            than a write, so the child's mapping takes one page-table entry per 4 KiB page;
//   folios   the file's page cache is first created in 2 MiB folios, by MADV_POPULATE_READ
//            through a MADV_HUGEPAGE mapping of the allocated (zero) space, and the writes then
//            copy into those folios: the child's mapping takes one entry per 2 MiB;
//   filled   each write that enters a 2 MiB block of the file not written before carries zeros
//            up to that block's end in the same pwritev: the kernel sizes the block's folio by
//            the write from the block's start (2 MiB), and later writes copy into it (what a
//            writer with WriterOptions::huge_pages does).
// Prints each round (the time to create the folios, the writes, the child's populate, first and
// second scan, and how much of its mapping the kernel mapped in 2 MiB pages: FilePmdMapped) and
// the min / median over the rounds per way. bench/RESULTS.md, "A fresh process's first scan, and
// 2 MiB page-cache folios" and "2 MiB pages from the writes themselves". --pause S sleeps S
// seconds before each way's run (after the previous file was removed), long enough for a
// guest's free page reporting to hand the freed memory back to the host.
//
//   folio_probe [--mib N (default 600)] [--rounds R (default 5)] [--dir D (default $TMPDIR or
//   /tmp)] [--pause S (default 0)]
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "platform/os.h"

namespace {

constexpr std::uint64_t kBatchBytes = 512 * 768 * 4;

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what + ": " + std::strerror(errno));
}

namespace os = embstore::detail::os;

// Maps `bytes` of `fd` read-only where a Reader maps a store's files: from offset 0, in an
// address-space reservation of the library's (2 MiB-aligned). Released with os::unmap.
char* map_like_a_reader(int fd, std::uint64_t bytes, const std::string& path) {
  void* at = os::reserve(bytes, path);
  os::map_fixed(at, bytes, fd, 0, os::Access::kReadOnly, path);
  return static_cast<char*>(at);
}

std::uint64_t file_pmd_mapped_kib() {
  std::ifstream in("/proc/self/smaps_rollup");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("FilePmdMapped:", 0) == 0) return std::strtoull(line.c_str() + 14, nullptr, 10);
  }
  return 0;
}

struct Round {
  double create_ms = 0, write_ms = 0, populate_ms = 0, scan1_ms = 0, scan2_ms = 0;
  std::uint64_t pmd_kib = 0;
  std::uint64_t sum = 0;  // Of the child's first scan: checked against the bytes written.
};

// The child's part: map, populate, scan twice. Returns through `out` (a pipe); exits 1 without
// writing it if the file cannot be mapped (the parent then reports the child failed).
[[noreturn]] void reader_child(int fd, std::uint64_t bytes, int out) {
  Round r;
  char* m = nullptr;
  try {
    m = map_like_a_reader(fd, bytes, "the probe's file");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "folio_probe: reader child: %s\n", e.what());
    ::_exit(1);
  }
  auto t = std::chrono::steady_clock::now();
  os::populate_read(m, bytes);
  r.populate_ms = ms_since(t);
  const auto* words = reinterpret_cast<const std::uint64_t*>(m);
  for (double* scan : {&r.scan1_ms, &r.scan2_ms}) {
    t = std::chrono::steady_clock::now();
    std::uint64_t sum = 0;
    for (std::uint64_t i = 0; i < bytes / 8; ++i) sum += words[i];
    *scan = ms_since(t);
    r.sum = sum;
  }
  r.pmd_kib = file_pmd_mapped_kib();
  const bool ok = ::write(out, &r, sizeof(r)) == static_cast<ssize_t>(sizeof(r));
  ::_exit(ok ? 0 : 1);
}

// The sum of the 8-byte words of `bytes` bytes of `batch` repeated, as the child computes it.
std::uint64_t expected_sum(const std::vector<char>& batch, std::uint64_t bytes) {
  std::uint64_t sum = 0;
  for (std::uint64_t at = 0; at + 8 <= bytes; at += 8) {
    std::uint64_t word = 0;
    for (int b = 0; b < 8; ++b) {
      word |= std::uint64_t{static_cast<unsigned char>(batch[(at + b) % batch.size()])} << (8 * b);
    }
    sum += word;
  }
  return sum;
}

enum Way { kPwrite, kFolios, kFilled, kWays };

// kFilled's source of zeros: an anonymous mapping never written, whose reads the kernel serves
// from its one 4 KiB zero page (not the 2 MiB one: it would not stay in the cache).
const char* zeros_2mib() {
  static const char* zeros = [] {
    void* m = ::mmap(nullptr, 2 << 20, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    check(m != MAP_FAILED, "mmap zeros");
    ::madvise(m, 2 << 20, MADV_NOHUGEPAGE);
    return static_cast<const char*>(m);
  }();
  return zeros;
}

Round run(Way way, const std::string& dir, std::uint64_t bytes, const std::vector<char>& batch) {
  const std::string path = dir + "/folio_probe.data";
  ::unlink(path.c_str());
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  check(fd >= 0, "open " + path);
  check(::posix_fallocate(fd, 0, static_cast<off_t>(bytes)) == 0, "posix_fallocate " + path);
  Round r;
  auto t = std::chrono::steady_clock::now();
  if (way == kFolios) {
    char* m = map_like_a_reader(fd, bytes, path);
    os::advise_huge_pages(m, bytes);
    os::populate_read(m, bytes);
    os::unmap(m, bytes);
    r.create_ms = ms_since(t);
  }
  t = std::chrono::steady_clock::now();
  constexpr std::uint64_t kBlock = 2 << 20;
  std::uint64_t filled_to = 0;  // kFilled: the file's bytes before this were written.
  for (std::uint64_t at = 0; at < bytes; at += batch.size()) {
    const std::uint64_t n = std::min<std::uint64_t>(batch.size(), bytes - at);
    iovec parts[2] = {{const_cast<char*>(batch.data()), n}, {nullptr, 0}};
    int count = 1;
    if (way == kFilled && at + n > filled_to) {
      // Up to the end of the block the write ends in, capped at the allocated size.
      const std::uint64_t end = std::min(bytes, (at + n + kBlock - 1) / kBlock * kBlock);
      parts[1] = {const_cast<char*>(zeros_2mib()), end - (at + n)};
      count = parts[1].iov_len ? 2 : 1;
      filled_to = end;
    }
    const std::uint64_t total = n + parts[1].iov_len;
    check(::pwritev(fd, parts, count, static_cast<off_t>(at)) == static_cast<ssize_t>(total),
          "pwritev " + path);
  }
  r.write_ms = ms_since(t);
  int pipe_fds[2];
  check(::pipe(pipe_fds) == 0, "pipe");
  const pid_t child = ::fork();
  check(child >= 0, "fork");
  if (child == 0) reader_child(fd, bytes, pipe_fds[1]);
  ::close(pipe_fds[1]);
  Round from_child;
  const bool got = ::read(pipe_fds[0], &from_child, sizeof(from_child)) ==
                   static_cast<ssize_t>(sizeof(from_child));
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  ::close(fd);
  ::unlink(path.c_str());
  if (!got || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error("the reader child failed");
  }
  from_child.create_ms = r.create_ms;
  from_child.write_ms = r.write_ms;
  return from_child;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

}  // namespace

int main(int argc, char** argv) try {
  std::uint64_t mib = 600;
  int rounds = 5;
  double pause_s = 0;
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = tmp && *tmp ? tmp : "/tmp";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 < argc && arg == "--mib") {
      mib = std::strtoull(argv[++i], nullptr, 10);
    } else if (i + 1 < argc && arg == "--rounds") {
      rounds = std::atoi(argv[++i]);
    } else if (i + 1 < argc && arg == "--dir") {
      dir = argv[++i];
    } else if (i + 1 < argc && arg == "--pause") {
      pause_s = std::atof(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: folio_probe [--mib N] [--rounds R] [--dir D] [--pause S]\n");
      return 2;
    }
  }
  if (mib < 2 || rounds < 1 || !(pause_s >= 0)) {
    std::fprintf(stderr, "folio_probe: --mib must be >= 2, --rounds >= 1 and --pause >= 0\n");
    return 2;
  }
  const std::uint64_t bytes = mib << 20;
  std::vector<char> batch(kBatchBytes);
  for (std::size_t i = 0; i < batch.size(); ++i) batch[i] = static_cast<char>(i * 131 + 7);
  std::mt19937_64 rng(std::random_device{}());
  const std::uint64_t want = expected_sum(batch, bytes);
  std::vector<Round> by_way[kWays];
  const char* const names[kWays] = {"pwrite", "folios", "filled"};
  std::printf("folio_probe: %llu MiB in %s, %d rounds, every way in a fresh random order each\n",
              static_cast<unsigned long long>(mib), dir.c_str(), rounds);
  for (int round = 1; round <= rounds; ++round) {
    Way order[kWays] = {kPwrite, kFolios, kFilled};
    std::shuffle(order, order + kWays, rng);
    for (Way way : order) {
      if (pause_s > 0) std::this_thread::sleep_for(std::chrono::duration<double>(pause_s));
      const Round r = run(way, dir, bytes, batch);
      if (r.sum != want) throw std::runtime_error("the reader read other bytes than were written");
      by_way[way].push_back(r);
      std::printf(
          "round %d %-6s: create %7.1f ms, pwrite %7.1f ms (%5.0f MB/s), reader populate %6.2f "
          "ms, first scan %7.1f ms, second %6.1f ms, FilePmdMapped %llu KiB\n",
          round, names[way], r.create_ms, r.write_ms, bytes / 1e3 / r.write_ms, r.populate_ms,
          r.scan1_ms, r.scan2_ms, static_cast<unsigned long long>(r.pmd_kib));
    }
  }
  for (int way = 0; way < kWays; ++way) {
    auto field = [&](double Round::*m) {
      std::vector<double> v;
      for (const Round& r : by_way[way]) v.push_back(r.*m);
      return std::make_pair(*std::min_element(v.begin(), v.end()), median(v));
    };
    const auto create = field(&Round::create_ms), write = field(&Round::write_ms),
               populate = field(&Round::populate_ms), scan1 = field(&Round::scan1_ms),
               scan2 = field(&Round::scan2_ms);
    std::printf(
        "%-6s min / median: create %.1f / %.1f ms, pwrite %.1f / %.1f ms, reader populate %.2f / "
        "%.2f ms, first scan %.1f / %.1f ms, second scan %.1f / %.1f ms\n",
        names[way], create.first, create.second, write.first, write.second, populate.first,
        populate.second, scan1.first, scan1.second, scan2.first, scan2.second);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "folio_probe: %s\n", e.what());
  return 1;
}
