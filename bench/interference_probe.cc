// interference_probe — how much a second thread's work slows a `pwrite()` loop, by the kind of
// work: what a key index growth does beside a writer's appends (bench/RESULTS.md, "Where a
// growth's cost lands"). No store is involved: the loop writes N MiB in 1.5 MiB `pwrite()`s
// (512 rows of 768 float32) into a preallocated file, while, in a fresh random order each round:
//   alone       nothing else runs;
//   caches      a thread writes at random into 12 MiB of memory touched beforehand (memory
//               traffic only, as indexing into built tables);
//   maps        a thread allocates a 12 MiB file, maps it, MADV_POPULATE_WRITEs it, writes at
//               random into it and unmaps it, over and over (what a growth does to build a new
//               generation: page tables of the writer's own process change);
//   maps-apart  the same in a forked process (the same kernel work, other page tables).
// Prints each round's MB/s and the min / median / max per kind.
//
//   interference_probe [--mib N (default 600)] [--rounds R (default 5)] [--dir D (default
//   $TMPDIR or /tmp)]
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr std::size_t kChurnBytes = 12 << 20;
constexpr std::size_t kBatchBytes = 512 * 768 * 4;

[[noreturn]] void die(const std::string& what) {
  std::perror(what.c_str());
  std::exit(1);
}

int temp_file(const std::string& dir, std::size_t bytes) {
  std::string path = dir + "/interference_probe.XXXXXX";
  const int fd = ::mkstemp(path.data());
  if (fd < 0) die("mkstemp " + path);
  ::unlink(path.c_str());
  if (::posix_fallocate(fd, 0, static_cast<off_t>(bytes)) != 0) die("posix_fallocate " + path);
  return fd;
}

// Random 8-byte stores into `bytes` bytes at `base` until `stop`.
void scribble(std::uint64_t* base, std::size_t bytes, std::uint64_t seed,
              const std::atomic<bool>& stop, int per_check) {
  std::mt19937_64 rng(seed);
  while (!stop.load(std::memory_order_relaxed)) {
    for (int i = 0; i < per_check; ++i) base[rng() % (bytes / 8)] += 1;
  }
}

void churn_maps(const std::string& dir, const std::atomic<bool>& stop) {
  for (std::uint64_t n = 0; !stop.load(std::memory_order_relaxed); ++n) {
    const int fd = temp_file(dir, kChurnBytes);
    void* p = ::mmap(nullptr, kChurnBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) die("mmap");
    (void)::madvise(p, kChurnBytes, 23 /* MADV_POPULATE_WRITE */);
    std::mt19937_64 rng(n);
    auto* words = static_cast<std::uint64_t*>(p);
    for (int i = 0; i < 400000 && !stop.load(std::memory_order_relaxed); ++i) {
      words[rng() % (kChurnBytes / 8)] += 1;
    }
    ::munmap(p, kChurnBytes);
    ::close(fd);
  }
}

double write_loop(int fd, std::size_t total) {
  std::vector<char> batch(kBatchBytes, 7);
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t at = 0; at + kBatchBytes <= total; at += kBatchBytes) {
    if (::pwrite(fd, batch.data(), kBatchBytes, static_cast<off_t>(at)) !=
        static_cast<ssize_t>(kBatchBytes)) {
      die("pwrite");
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return static_cast<double>(total) / seconds / 1e6;
}

double run(const std::string& kind, const std::string& dir, std::size_t total) {
  const int fd = temp_file(dir, total);
  std::atomic<bool> stop{false};
  std::thread helper;
  pid_t child = 0;
  std::vector<std::uint64_t> memory;
  if (kind == "caches") {
    memory.assign(kChurnBytes / 8, 1);  // Touched now, before the loop.
    helper = std::thread([&] { scribble(memory.data(), kChurnBytes, 1, stop, 100000); });
  } else if (kind == "maps") {
    helper = std::thread([&] { churn_maps(dir, stop); });
  } else if (kind == "maps-apart") {
    child = ::fork();
    if (child < 0) die("fork");
    if (child == 0) {
      std::atomic<bool> never{false};
      churn_maps(dir, never);
      ::_exit(0);
    }
  }
  ::usleep(20000);  // The helper under way.
  const double mbps = write_loop(fd, total);
  stop = true;
  if (helper.joinable()) helper.join();
  if (child > 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
  }
  ::close(fd);
  return mbps;
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t mib = 600;
  int rounds = 5;
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--mib" && i + 1 < argc) {
      mib = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--rounds" && i + 1 < argc) {
      rounds = std::atoi(argv[++i]);
    } else if (arg == "--dir" && i + 1 < argc) {
      dir = argv[++i];
    } else {
      std::fprintf(stderr, "usage: interference_probe [--mib N] [--rounds R] [--dir D]\n");
      return 2;
    }
  }
  if (mib == 0 || rounds <= 0) {
    std::fprintf(stderr, "interference_probe: --mib and --rounds must be positive\n");
    return 2;
  }
  std::vector<std::string> kinds = {"alone", "caches", "maps", "maps-apart"};
  std::vector<std::vector<double>> results(kinds.size());
  std::mt19937 rng(std::random_device{}());
  for (int r = 0; r < rounds; ++r) {
    std::vector<std::size_t> order = {0, 1, 2, 3};
    std::shuffle(order.begin(), order.end(), rng);
    for (const std::size_t k : order) {
      const double mbps = run(kinds[k], dir, mib << 20);
      results[k].push_back(mbps);
      std::printf("round %d %-10s %8.0f MB/s\n", r + 1, kinds[k].c_str(), mbps);
    }
  }
  std::printf("pwrite() MB/s min / median / max over %d rounds:\n", rounds);
  for (std::size_t k = 0; k < kinds.size(); ++k) {
    std::vector<double>& v = results[k];
    std::sort(v.begin(), v.end());
    std::printf("  %-10s %8.0f / %8.0f / %8.0f\n", kinds[k].c_str(), v.front(), v[v.size() / 2],
                v.back());
  }
  return 0;
}
