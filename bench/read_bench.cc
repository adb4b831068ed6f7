// read_bench — reading a store against memory-bandwidth baselines, in one binary and one run.
//
//   BM_ScanView        sum every 64-bit word of Reader::rows() (zero-copy), warm mapping
//   BM_ScanViewCold    the same through a freshly opened Reader (its mapping not yet faulted in;
//                      the file pages are in the page cache); populate:1 fills its page tables
//                      with MADV_POPULATE_READ first (timed); minor faults as a counter
//   BM_ScanViewFreshProcess
//                      the same through a Reader opened in a new process (a fork per
//                      iteration), timed in the child: open, rows(), sum. What every downstream
//                      process (a notebook, a loader worker) pays on its first scan; read:1
//                      copies the rows with Reader::read() in 1 MiB pieces into one buffer and
//                      sums each piece instead
//   BM_ScanMemory      baseline: the same loop over private, already-touched memory
//   BM_CopyOutView     memcpy of the view into private memory (what np.array(view) costs)
//   BM_CopyOutMemory   baseline: memcpy between two private, touched buffers
//   BM_RecordByRow     Reader::record(row) at random rows: index entry + checksum of the row
//                      (lookups by (key, epoch): bench/key_index_bench.cc)
//   BM_Refresh         Reader::refresh() with nothing new, and after another writer's append
//   BM_OpenReader      Reader::open + first record on stores of 1k .. EMBSTORE_BENCH_OPEN_ROWS rows
//   BM_OpenWriter      Writer::open + close on the same stores
//
// Sizes: EMBSTORE_BENCH_ROWS rows of 768 float32 for scans (default 200000: ~600 MB), appended
// in batches of 512 rows as in training (the page-cache folios the writes create, and so what a
// new mapping of them costs, depend on the size of each write: bench/RESULTS.md, "A fresh
// process's first scan, and 2 MiB page-cache folios");
// EMBSTORE_BENCH_OPEN_ROWS for the largest open (default 10M rows of 16 int8, ~480 MB on disk).
#include <benchmark/benchmark.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <random>

#include "bench_util.h"

namespace embstore::bench {
namespace {

constexpr std::uint32_t kDim = 768;

constexpr int kPopulateRead = 22;  // MADV_POPULATE_READ (Linux 5.14), absent from older headers.

long minor_faults() {
  rusage usage;
  ::getrusage(RUSAGE_THREAD, &usage);
  return usage.ru_minflt;
}

std::uint64_t scan_rows() { return env_u64("EMBSTORE_BENCH_ROWS", 200000); }
std::uint64_t open_rows_max() { return env_u64("EMBSTORE_BENCH_OPEN_ROWS", 10000000); }

// Fills `path` with `rows` rows of `dim` x `dtype` in batches of `batch` (through a writer with
// WriterOptions::huge_pages when `huge_pages`).
void fill_store(const std::string& path, std::uint64_t rows, std::uint32_t dim, DType dtype,
                std::uint64_t batch, bool huge_pages = false) {
  CreateOptions create;
  create.dim = dim;
  create.dtype = dtype;
  WriterOptions options;
  options.huge_pages = huge_pages;
  Writer writer = Writer::create(path, create, options);
  const std::uint64_t row_bytes = std::uint64_t{dim} * dtype_size(dtype);
  const Floats values = random_floats(batch * row_bytes / 4 + 1, 1);
  std::vector<std::uint64_t> keys(batch);
  for (std::uint64_t done = 0; done < rows;) {
    const std::uint64_t n = std::min(batch, rows - done);
    for (std::uint64_t i = 0; i < n; ++i) keys[i] = done + i;
    writer.append(std::span(keys.data(), n), 0, ConstMatrix{values.data(), dtype, n, dim, 0});
    done += n;
  }
  writer.close();
}

// One ~600 MB store shared by the scan and lookup benchmarks, built on first use; and one
// written by a writer with WriterOptions::huge_pages (its rows in 2 MiB page-cache pages).
struct ScanStore {
  TempDir dir;
  std::string path = dir.sub("scan");
  explicit ScanStore(bool huge_pages) {
    fill_store(path, scan_rows(), kDim, DType::kFloat32, 512, huge_pages);
  }
  static ScanStore& get(bool huge_pages = false) {
    if (huge_pages) {
      static ScanStore huge(true);
      return huge;
    }
    static ScanStore store(false);
    return store;
  }
};

std::uint64_t sum_words(const std::byte* data, std::uint64_t bytes) {
  const auto* words = reinterpret_cast<const std::uint64_t*>(data);
  const std::uint64_t n = bytes / 8;
  std::uint64_t a = 0, b = 0, c = 0, d = 0;
  std::uint64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a += words[i];
    b += words[i + 1];
    c += words[i + 2];
    d += words[i + 3];
  }
  for (; i < n; ++i) a += words[i];
  return a + b + c + d;
}

void BM_ScanView(benchmark::State& state) {
  Reader reader = Reader::open(ScanStore::get().path);
  const RowsView view = reader.rows();
  benchmark::DoNotOptimize(sum_words(view.data, view.size_bytes()));  // Fault the mapping in.
  for (auto _ : state) benchmark::DoNotOptimize(sum_words(view.data, view.size_bytes()));
  state.SetBytesProcessed(state.iterations() * view.size_bytes());
  state.SetItemsProcessed(state.iterations() * view.rows);
  state.SetLabel("warm zero-copy view, sum");
}

// rows() is timed (it fills the range's page tables: src/reader.cc). populate:1 adds an explicit
// MADV_POPULATE_READ of the view (timed), which costs only a walk of entries already there:
// kept to compare with builds or kernels where rows() does not populate (bench/RESULTS.md,
// "Scan from a fresh Reader").
// Counter: faults = minor faults of the timed part per iteration.
void BM_ScanViewCold(benchmark::State& state) {
  const bool populate = state.range(0) != 0;
  const std::string& path = ScanStore::get().path;
  std::uint64_t bytes = 0, rows = 0;
  std::uint64_t faults = 0;
  for (auto _ : state) {
    state.PauseTiming();
    std::optional<Reader> reader;
    reader.emplace(Reader::open(path));
    const long faults_before = minor_faults();
    state.ResumeTiming();
    const RowsView view = reader->rows();  // Timed: it fills the range's page tables.
    if (populate) ::madvise(const_cast<std::byte*>(view.data), view.size_bytes(), kPopulateRead);
    benchmark::DoNotOptimize(sum_words(view.data, view.size_bytes()));
    state.PauseTiming();
    faults += minor_faults() - faults_before;
    bytes += view.size_bytes();
    rows += view.rows;
    reader.reset();
    state.ResumeTiming();
  }
  state.SetBytesProcessed(bytes);
  state.SetItemsProcessed(rows);
  state.counters["faults"] = benchmark::Counter(faults, benchmark::Counter::kAvgIterations);
  state.SetLabel(populate ? "cold mapping (page cache warm), MADV_POPULATE_READ, sum"
                          : "cold mapping (page cache warm), sum");
}

// Each iteration forks a child that opens a Reader, takes rows() and sums the view, and reports
// the time of those three steps through a pipe (manual time); the fork and the exit are not
// timed. The parent holds no Writer and runs no other thread, so the child may allocate.
// huge_pages:1 scans the store written with WriterOptions::huge_pages.
void BM_ScanViewFreshProcess(benchmark::State& state) {
  const bool huge_pages = state.range(0) != 0;
  const bool by_read = state.range(1) != 0;
  const std::string& path = ScanStore::get(huge_pages).path;
  std::uint64_t bytes = 0, rows = 0;
  for (auto _ : state) {
    int fds[2];
    if (::pipe(fds) != 0) {
      state.SkipWithError("pipe failed");
      break;
    }
    const pid_t child = ::fork();
    if (child == 0) {
      ::close(fds[0]);
      double result[3] = {-1, 0, 0};  // Seconds, bytes, rows; -1: the child failed.
      try {
        const auto start = std::chrono::steady_clock::now();
        Reader reader = Reader::open(path);
        const RowsView view = reader.rows();
        if (by_read) {
          // Pieces of ~1 MiB into one buffer, summed while in the second-level cache.
          const std::uint64_t per_piece = std::max<std::uint64_t>(1, (1 << 20) / view.row_bytes);
          std::vector<std::byte> piece(per_piece * view.row_bytes);
          for (std::uint64_t begin = 0; begin < view.rows; begin += per_piece) {
            const std::uint64_t end = std::min(view.rows, begin + per_piece);
            reader.read(begin, end, piece.data(), (end - begin) * view.row_bytes);
            benchmark::DoNotOptimize(sum_words(piece.data(), (end - begin) * view.row_bytes));
          }
        } else {
          benchmark::DoNotOptimize(sum_words(view.data, view.size_bytes()));
        }
        result[0] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        result[1] = static_cast<double>(view.size_bytes());
        result[2] = static_cast<double>(view.rows);
      } catch (...) {
      }
      const bool sent = ::write(fds[1], result, sizeof(result)) == sizeof(result);
      ::_exit(sent ? 0 : 1);
    }
    ::close(fds[1]);
    double result[3] = {-1, 0, 0};
    const bool got = child > 0 && ::read(fds[0], result, sizeof(result)) == sizeof(result);
    ::close(fds[0]);
    int status = 0;
    if (child > 0) ::waitpid(child, &status, 0);
    if (!got || result[0] < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      state.SkipWithError("the child process could not open and scan the store");
      break;
    }
    state.SetIterationTime(result[0]);
    bytes += static_cast<std::uint64_t>(result[1]);
    rows += static_cast<std::uint64_t>(result[2]);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.SetItemsProcessed(static_cast<std::int64_t>(rows));
  state.SetLabel(std::string("Reader opened in a new process: open, ") +
                 (by_read ? "read() in 1 MiB pieces into one buffer, sum" : "rows(), sum") +
                 (huge_pages ? "; rows written with WriterOptions::huge_pages" : ""));
}

void BM_ScanMemory(benchmark::State& state) {
  const std::uint64_t bytes = scan_rows() * kDim * 4;
  std::vector<std::byte> buffer(bytes, std::byte{1});
  for (auto _ : state) benchmark::DoNotOptimize(sum_words(buffer.data(), bytes));
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetItemsProcessed(state.iterations() * scan_rows());
  state.SetLabel("warm baseline: private memory, sum");
}

void BM_CopyOutView(benchmark::State& state) {
  Reader reader = Reader::open(ScanStore::get().path);
  const RowsView view = reader.rows();
  std::vector<std::byte> out(view.size_bytes(), std::byte{1});
  benchmark::DoNotOptimize(sum_words(view.data, view.size_bytes()));
  for (auto _ : state) {
    std::memcpy(out.data(), view.data, view.size_bytes());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * view.size_bytes());
  state.SetItemsProcessed(state.iterations() * view.rows);
  state.SetLabel("warm zero-copy view, memcpy out");
}

void BM_CopyOutMemory(benchmark::State& state) {
  const std::uint64_t bytes = scan_rows() * kDim * 4;
  std::vector<std::byte> in(bytes, std::byte{1}), out(bytes, std::byte{2});
  for (auto _ : state) {
    std::memcpy(out.data(), in.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetItemsProcessed(state.iterations() * scan_rows());
  state.SetLabel("warm baseline: private memory, memcpy");
}

void BM_RecordByRow(benchmark::State& state) {
  Reader reader = Reader::open(ScanStore::get().path);
  std::mt19937_64 rng(1);
  const std::uint64_t rows = reader.size();
  for (auto _ : state) benchmark::DoNotOptimize(reader.record(rng() % rows).data);
  state.SetItemsProcessed(state.iterations());
  state.SetBytesProcessed(state.iterations() * kDim * 4);
  state.SetLabel("warm, checksum verified");
}

void BM_Refresh(benchmark::State& state) {
  const bool with_append = state.range(0) != 0;
  TempDir dir;
  const std::string path = dir.sub("store");
  CreateOptions create;
  create.dim = 64;
  Writer writer = Writer::create(path, create);
  const Floats values = random_floats(1, 64);
  const std::vector<std::uint64_t> keys = random_keys(1);
  writer.append(keys, 0, values);
  Reader reader = Reader::open(path);
  std::uint64_t appended = 0;
  for (auto _ : state) {
    if (with_append) {
      state.PauseTiming();
      writer.append(keys, 0, values);
      if (++appended > 4000000) {
        state.SkipWithError("grew past the bound; lower --benchmark_min_time");
        break;
      }
      state.ResumeTiming();
    }
    benchmark::DoNotOptimize(reader.refresh());
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(with_append ? "after a 1-row append (dim 64)" : "nothing new");
}

// Stores for the open benchmarks, built once per size: 16 x int8 rows keep 10M rows small.
const std::string& open_store(std::uint64_t rows) {
  static TempDir dir;
  static std::map<std::uint64_t, std::string> paths;
  auto it = paths.find(rows);
  if (it != paths.end()) return it->second;
  const std::string path = dir.sub("open" + std::to_string(rows));
  fill_store(path, rows, 16, DType::kInt8, 4096);
  return paths.emplace(rows, path).first->second;
}

void OpenArgs(benchmark::internal::Benchmark* b) {
  b->ArgName("rows");
  for (std::uint64_t rows : {std::uint64_t{1000}, open_rows_max() / 10, open_rows_max()}) {
    b->Arg(static_cast<std::int64_t>(std::max<std::uint64_t>(rows, 1)));
  }
}

void BM_OpenReader(benchmark::State& state) {
  const std::string& path = open_store(state.range(0));
  for (auto _ : state) {
    Reader reader = Reader::open(path);
    benchmark::DoNotOptimize(reader.record(reader.size() - 1).data);
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel("open + last record, page cache warm");
}

void BM_OpenWriter(benchmark::State& state) {
  const std::string& path = open_store(state.range(0));
  for (auto _ : state) {
    Writer writer = Writer::open(path);
    benchmark::DoNotOptimize(writer.committed_rows());
    writer.close();
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel("open + close, page cache warm");
}

BENCHMARK(BM_ScanView)->Unit(benchmark::kMillisecond)->UseRealTime()->Apply(add_min_max);
BENCHMARK(BM_ScanViewCold)
    ->ArgName("populate")
    ->Arg(0)
    ->Arg(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Apply(add_min_max);
BENCHMARK(BM_ScanViewFreshProcess)
    ->ArgNames({"huge_pages", "read"})
    ->Args({0, 0})
    ->Args({1, 0})
    ->Args({0, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseManualTime()
    ->Apply(add_min_max);
BENCHMARK(BM_ScanMemory)->Unit(benchmark::kMillisecond)->UseRealTime()->Apply(add_min_max);
BENCHMARK(BM_CopyOutView)->Unit(benchmark::kMillisecond)->UseRealTime()->Apply(add_min_max);
BENCHMARK(BM_CopyOutMemory)->Unit(benchmark::kMillisecond)->UseRealTime()->Apply(add_min_max);
BENCHMARK(BM_RecordByRow)->UseRealTime()->Apply(add_min_max);
BENCHMARK(BM_Refresh)->ArgName("append")->Arg(0)->Arg(1)->UseRealTime()->Apply(add_min_max);
BENCHMARK(BM_OpenReader)
    ->Apply(OpenArgs)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime()
    ->Apply(add_min_max);
BENCHMARK(BM_OpenWriter)
    ->Apply(OpenArgs)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime()
    ->Apply(add_min_max);

}  // namespace
}  // namespace embstore::bench

int main(int argc, char** argv) { return embstore::bench::run_benchmarks(argc, argv); }
