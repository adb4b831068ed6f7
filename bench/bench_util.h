// bench_util.h — helpers shared by the Google Benchmark suites: temporary directories,
// deterministic payloads, and the size knobs the smoke test turns down.
//
// Sizes: EMBSTORE_BENCH_BYTES caps the bytes one benchmark writes into one file before it starts a
// fresh one (default 256 MiB); the smoke test sets it to a few MiB so every benchmark runs in
// milliseconds. Not thread-safe (benchmarks here run single-threaded). run_benchmarks() is the
// suites' main(): 5 interleaved repetitions by default, with min and max next to the median.
#pragma once

#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "embstore/embstore.h"

namespace embstore::bench {

inline std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  return std::strtoull(text, nullptr, 10);
}

// Bytes written into one store/file before the benchmark starts over with a fresh one.
inline std::uint64_t bytes_per_file() { return env_u64("EMBSTORE_BENCH_BYTES", 256ull << 20); }

// A directory under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/embstore-bench-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed: " + tmpl);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A vector allocated on a page boundary, so that the rows a benchmark appends, and the bytes its
// pwrite baselines write, start where they land in a page: the source the kernel copies into the
// page cache fastest. A heap block of a megabyte starts 16 bytes into its page, from where that
// copy ran 10-20% slower on some VMs (bench/RESULTS.md, "Staging buffers start where the rows
// land"): baselines written from there would measure less than their best.
template <typename T>
struct PageAlignedAllocator {
  using value_type = T;
  PageAlignedAllocator() = default;
  template <typename U>
  PageAlignedAllocator(const PageAlignedAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{4096}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete (p, std::align_val_t{4096}); }
  template <typename U>
  bool operator==(const PageAlignedAllocator<U>&) const {
    return true;
  }
};
using Floats = std::vector<float, PageAlignedAllocator<float>>;

// Random float32 values in [-1, 1), rows * dim of them, on a page boundary.
inline Floats random_floats(std::uint64_t rows, std::uint32_t dim, std::uint64_t seed = 42) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  Floats values(rows * dim);
  for (float& v : values) v = dist(rng);
  return values;
}

inline std::vector<std::uint64_t> random_keys(std::uint64_t n, std::uint64_t seed = 7) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint64_t> keys(n);
  for (auto& k : keys) k = rng();
  return keys;
}

inline void remove_tree(const std::string& path) {
  std::error_code ignored;
  std::filesystem::remove_all(path, ignored);
}

// Adds "min" and "max" to the mean / median / stddev Google Benchmark reports over repetitions:
// a target is stated as min and median over interleaved repeats (bench/RESULTS.md).
inline void add_min_max(benchmark::internal::Benchmark* b) {
  b->ComputeStatistics("min", [](const std::vector<double>& v) {
    return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end());
  });
  b->ComputeStatistics("max", [](const std::vector<double>& v) {
    return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
  });
}

// main() of the suites: 5 repetitions in random interleaved order unless the command line says
// otherwise (flags given later win), so a default run reports min / median / max, never one run.
inline int run_benchmarks(int argc, char** argv) {
  std::vector<char*> args{argv[0]};
  std::string repetitions = "--benchmark_repetitions=5";
  std::string interleave = "--benchmark_enable_random_interleaving=true";
  args.push_back(repetitions.data());
  args.push_back(interleave.data());
  for (int i = 1; i < argc; ++i) args.push_back(argv[i]);
  int count = static_cast<int>(args.size());
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace embstore::bench
