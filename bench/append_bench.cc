// append_bench — Writer::append throughput against its baselines, in one binary and one run.
//
//   BM_Append/batch/dim/dtype/sync     embstore append of `batch` rows (fresh file pages: "cold")
//   BM_Pwrite/batch/dim/sync/prealloc  pwrite() of the same payload bytes into a fresh file that
//                                      grows with each write (prealloc 0) or that was
//                                      posix_fallocate'd first (prealloc 1: what embstore's
//                                      large batches do; src/log/commit.cc)
//   BM_Memcpy/batch/dim                memcpy of the same bytes into already-touched memory
//   BM_Paired/batch/dim/sync/index     per batch, an embstore append and a pwrite() of the same
//                                      bytes into a preallocated file (with sync 1: each followed
//                                      by fdatasync), in turns, in one process. Reports the
//                                      counter x_pwrite_pre: the pwrite()s' total time over the
//                                      appends'. Both draw fresh page-cache pages in the same
//                                      moment, so the ratio holds still while the VM's cost of a
//                                      fresh page swings 10x with what the host took back
//                                      (bench/RESULTS.md). Keys as in training: a dataset of 64
//                                      batches of distinct ids in a fixed shuffled order, the
//                                      epoch advancing each time round; index 0 appends into a
//                                      store made without the key index.
//   BM_EpochPerAppend/epoch_per_append/appends  40,000 appends of 8 rows into a fresh store,
//                                      the epoch fixed (0) or one more each append (1): the
//                                      same cost is expected (an epoch per step is allowed)
//   BM_IndexAfterWrite/index/write_kib an append of 512 rows of 8 floats (keys as above) right
//                                      after a pwrite() of write_kib KiB of fresh pages of another
//                                      file, outside the timing: what indexing costs once a write
//                                      has pushed the key index out of the caches (and its page
//                                      table entries out of the TLB), as an append's own write
//                                      of its rows does, while gigabytes of fresh page cache are
//                                      made beside it. Counter ns_per_row; index 0: no key
//                                      index, so the difference is the index's share.
//
// dtype: 0 float32, 1 float16, 2 bfloat16, 3 float32 input converted to a float16 store,
//        4 float32 input converted to a bfloat16 store.
// sync:  0 none, 1 every append (pwrite: fdatasync after each batch), 2 interval (100 ms).
// bytes_per_second counts bytes stored (payload, not the 32-byte index entries); items are rows.
// Each benchmark starts a fresh store every EMBSTORE_BENCH_BYTES bytes, outside the timing, so
// every append writes pages the file has never had: the cold case users hit while training.
// By default 5 repetitions, randomly interleaved, with min / median / max (bench_util.h);
// bench/ratios.py turns the per-repetition JSON into same-repetition ratios.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <optional>

#include "bench_util.h"

namespace embstore::bench {
namespace {

enum DTypeArg { kF32 = 0, kF16 = 1, kBF16 = 2, kF32ToF16 = 3, kF32ToBF16 = 4 };
enum SyncArg { kNoSync = 0, kEvery = 1, kInterval = 2 };
// Up to 8 rows of 768 x f32 (24 KiB) go through the mapping, 16 (48 KiB) and more through
// pwritev (src/log/commit.cc, kRowsSyscallMinBytes): 8 and 16 show the switch.
constexpr int kBatches[] = {1, 8, 16, 32, 64, 512, 4096};

DType store_dtype(int arg) {
  switch (arg) {
    case kF16:
    case kF32ToF16:
      return DType::kFloat16;
    case kBF16:
    case kF32ToBF16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;
  }
}
DType input_dtype(int arg) { return arg >= kF32ToF16 ? DType::kFloat32 : store_dtype(arg); }

const char* dtype_label(int arg) {
  static const char* const kNames[] = {"f32", "f16", "bf16", "f32->f16", "f32->bf16"};
  return kNames[arg];
}
const char* sync_label(int arg) {
  static const char* const kNames[] = {"no-sync", "sync-every-append", "sync-interval-100ms"};
  return kNames[arg];
}

std::uint64_t rows_per_file(std::uint64_t batch, std::uint64_t row_bytes) {
  const std::uint64_t rows = bytes_per_file() / row_bytes;
  return std::max<std::uint64_t>(batch, rows / batch * batch);
}

void BM_Append(benchmark::State& state) {
  const std::uint64_t batch = state.range(0);
  const auto dim = static_cast<std::uint32_t>(state.range(1));
  const int dtype_arg = static_cast<int>(state.range(2));
  const int sync_arg = static_cast<int>(state.range(3));
  const DType in_dtype = input_dtype(dtype_arg);
  const DType out_dtype = store_dtype(dtype_arg);
  const std::uint64_t in_row_bytes = std::uint64_t{dim} * dtype_size(in_dtype);
  const std::uint64_t out_row_bytes = std::uint64_t{dim} * dtype_size(out_dtype);

  // Input bytes: float32 values reinterpreted for 16-bit dtypes (any bit pattern is a value).
  const Floats values = random_floats(batch * in_row_bytes / 4 + 1, 1);
  const std::vector<std::uint64_t> keys = random_keys(batch);
  const ConstMatrix matrix{values.data(), in_dtype, batch, dim, 0};

  TempDir dir;
  WriterOptions options;
  options.sync = sync_arg == kEvery      ? SyncPolicy::kEveryAppend
                 : sync_arg == kInterval ? SyncPolicy::kInterval
                                         : SyncPolicy::kNone;
  options.sync_interval = std::chrono::milliseconds(100);
  const std::uint64_t limit = rows_per_file(batch, out_row_bytes);
  int generation = 0;
  std::optional<Writer> writer;
  std::uint64_t rows_in_file = 0;
  auto fresh_store = [&] {
    writer.reset();
    const std::string path = dir.sub("store" + std::to_string(generation++));
    remove_tree(dir.sub("store" + std::to_string(generation - 2)));
    CreateOptions create;
    create.dim = dim;
    create.dtype = out_dtype;
    writer.emplace(Writer::create(path, create, options));
    rows_in_file = 0;
  };
  fresh_store();
  std::uint64_t epoch = 0;
  for (auto _ : state) {
    if (rows_in_file + batch > limit) {
      state.PauseTiming();
      fresh_store();
      state.ResumeTiming();
    }
    benchmark::DoNotOptimize(writer->append(keys, epoch, matrix));
    rows_in_file += batch;
  }
  writer.reset();
  state.SetItemsProcessed(state.iterations() * batch);
  state.SetBytesProcessed(state.iterations() * batch * out_row_bytes);
  state.SetLabel(std::string("cold ") + dtype_label(dtype_arg) + " " + sync_label(sync_arg));
}

void BM_Pwrite(benchmark::State& state) {
  const std::uint64_t batch = state.range(0);
  const auto dim = static_cast<std::uint32_t>(state.range(1));
  const int sync_arg = static_cast<int>(state.range(2));
  const bool prealloc = state.range(3) != 0;
  const std::uint64_t row_bytes = std::uint64_t{dim} * 4;
  const Floats values = random_floats(batch, dim);
  const std::uint64_t limit = rows_per_file(batch, row_bytes);
  TempDir dir;
  const std::string path = dir.sub("data");
  int fd = -1;
  std::uint64_t rows_in_file = 0;
  auto fresh_file = [&] {
    if (fd >= 0) ::close(fd);
    ::unlink(path.c_str());
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) throw std::runtime_error("cannot create " + path);
    if (prealloc && ::posix_fallocate(fd, 0, static_cast<off_t>(limit * row_bytes)) != 0) {
      throw std::runtime_error("cannot preallocate " + path);
    }
    rows_in_file = 0;
  };
  fresh_file();
  const std::uint64_t bytes = batch * row_bytes;
  for (auto _ : state) {
    if (rows_in_file + batch > limit) {
      state.PauseTiming();
      fresh_file();
      state.ResumeTiming();
    }
    if (::pwrite(fd, values.data(), bytes, rows_in_file * row_bytes) !=
        static_cast<ssize_t>(bytes)) {
      state.SkipWithError("pwrite failed");
      break;
    }
    if (sync_arg == kEvery) ::fdatasync(fd);
    rows_in_file += batch;
  }
  ::close(fd);
  state.SetItemsProcessed(state.iterations() * batch);
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetLabel(std::string("cold baseline f32 ") + (prealloc ? "preallocated " : "") +
                 sync_label(sync_arg));
}

void BM_Memcpy(benchmark::State& state) {
  const std::uint64_t batch = state.range(0);
  const auto dim = static_cast<std::uint32_t>(state.range(1));
  const std::uint64_t row_bytes = std::uint64_t{dim} * 4;
  const Floats values = random_floats(batch, dim);
  const std::uint64_t limit = rows_per_file(batch, row_bytes);
  std::vector<std::byte> target(limit * row_bytes, std::byte{1});  // Touched: warm pages.
  std::uint64_t rows_in_buffer = 0;
  const std::uint64_t bytes = batch * row_bytes;
  for (auto _ : state) {
    if (rows_in_buffer + batch > limit) rows_in_buffer = 0;
    std::memcpy(target.data() + rows_in_buffer * row_bytes, values.data(), bytes);
    benchmark::ClobberMemory();
    rows_in_buffer += batch;
  }
  state.SetItemsProcessed(state.iterations() * batch);
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetLabel("warm baseline f32 memcpy");
}

void BM_Paired(benchmark::State& state) {
  const std::uint64_t batch = state.range(0);
  const auto dim = static_cast<std::uint32_t>(state.range(1));
  const int sync_arg = static_cast<int>(state.range(2));
  const bool key_index = state.range(3) != 0;
  const std::uint64_t row_bytes = std::uint64_t{dim} * 4;
  const std::uint64_t bytes = batch * row_bytes;
  const Floats values = random_floats(batch, dim);
  const ConstMatrix matrix{values.data(), DType::kFloat32, batch, dim, 0};
  constexpr std::uint64_t kDatasetBatches = 64;
  const std::vector<std::uint64_t> ids = random_keys(batch * kDatasetBatches);
  const std::uint64_t limit = rows_per_file(batch, row_bytes);

  TempDir dir;
  WriterOptions options;
  options.sync = sync_arg == kEvery ? SyncPolicy::kEveryAppend : SyncPolicy::kNone;
  int generation = 0;
  std::optional<Writer> writer;
  int fd = -1;
  std::uint64_t rows_in_file = 0;
  auto fresh_files = [&] {
    writer.reset();
    if (fd >= 0) ::close(fd);
    const std::string path = dir.sub("store" + std::to_string(generation));
    remove_tree(dir.sub("store" + std::to_string(generation - 1)));
    ::unlink(dir.sub("data" + std::to_string(generation - 1)).c_str());
    CreateOptions create;
    create.dim = dim;
    create.key_index = key_index;
    writer.emplace(Writer::create(path, create, options));
    const std::string data = dir.sub("data" + std::to_string(generation));
    fd = ::open(data.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ::posix_fallocate(fd, 0, static_cast<off_t>(limit * row_bytes)) != 0) {
      throw std::runtime_error("cannot create and preallocate " + data);
    }
    ++generation;
    rows_in_file = 0;
  };
  fresh_files();
  using Clock = std::chrono::steady_clock;
  Clock::duration appends{}, pwrites{};
  std::uint64_t n = 0;
  for (auto _ : state) {
    if (rows_in_file + batch > limit) {
      state.PauseTiming();
      fresh_files();
      state.ResumeTiming();
    }
    const std::span<const std::uint64_t> keys(ids.data() + (n % kDatasetBatches) * batch, batch);
    const std::uint64_t epoch = n / kDatasetBatches;
    for (int turn = 0; turn < 2; ++turn) {
      const auto start = Clock::now();
      if ((turn == 0) == (n % 2 == 0)) {
        benchmark::DoNotOptimize(writer->append(keys, epoch, matrix));
        appends += Clock::now() - start;
      } else {
        if (::pwrite(fd, values.data(), bytes, static_cast<off_t>(rows_in_file * row_bytes)) !=
            static_cast<ssize_t>(bytes)) {
          state.SkipWithError("pwrite failed");
          break;
        }
        if (sync_arg == kEvery) ::fdatasync(fd);
        pwrites += Clock::now() - start;
      }
    }
    rows_in_file += batch;
    ++n;
  }
  writer.reset();
  if (fd >= 0) ::close(fd);
  const double append_s = std::chrono::duration<double>(appends).count();
  const double pwrite_s = std::chrono::duration<double>(pwrites).count();
  state.counters["x_pwrite_pre"] = append_s > 0 ? pwrite_s / append_s : 0;
  state.counters["append_us"] = n > 0 ? 1e6 * append_s / static_cast<double>(n) : 0;
  state.counters["pwrite_us"] = n > 0 ? 1e6 * pwrite_s / static_cast<double>(n) : 0;
  state.SetItemsProcessed(state.iterations() * batch);
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetLabel(std::string("paired f32 ") + sync_label(sync_arg) +
                 (key_index ? "" : " no-key-index"));
}

void BM_IndexAfterWrite(benchmark::State& state) {
  const bool key_index = state.range(0) != 0;
  const std::uint64_t write_bytes = static_cast<std::uint64_t>(state.range(1)) << 10;
  constexpr std::uint64_t kBatch = 512, kDim = 8, kDatasetBatches = 64;
  const Floats values = random_floats(kBatch, kDim);
  const ConstMatrix matrix{values.data(), DType::kFloat32, kBatch, kDim, 0};
  const std::vector<std::uint64_t> ids = random_keys(kBatch * kDatasetBatches);
  const std::vector<std::byte> junk(std::max<std::uint64_t>(write_bytes, 1), std::byte{3});
  const std::uint64_t limit = rows_per_file(kBatch, kDim * 4);
  TempDir dir;
  WriterOptions options;
  options.sync = SyncPolicy::kNone;
  int generation = 0;
  std::optional<Writer> writer;
  const std::string other = dir.sub("other");
  const int fd = ::open(other.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + other);
  std::uint64_t rows_in_file = 0, n = 0;
  auto fresh_store = [&] {
    writer.reset();
    remove_tree(dir.sub("store" + std::to_string(generation - 1)));
    CreateOptions create;
    create.dim = kDim;
    create.key_index = key_index;
    writer.emplace(
        Writer::create(dir.sub("store" + std::to_string(generation++)), create, options));
    rows_in_file = 0;
  };
  fresh_store();
  // The other file takes fresh page-cache pages, as a store's rows do: 16 times
  // EMBSTORE_BENCH_BYTES of them (4 GiB by default: gigabytes, as in a training run; with 256
  // MiB the key index cost a fifth of what it did here), then it starts over (truncated, so its
  // pages are freed).
  const std::uint64_t other_limit = std::max<std::uint64_t>(write_bytes, 16 * bytes_per_file());
  std::uint64_t other_offset = other_limit;
  for (auto _ : state) {
    state.PauseTiming();
    if (rows_in_file + kBatch > limit) fresh_store();
    if (write_bytes > 0) {
      if (other_offset + write_bytes > other_limit) {
        if (::ftruncate(fd, 0) != 0 ||
            ::posix_fallocate(fd, 0, static_cast<off_t>(other_limit)) != 0) {
          state.SkipWithError("cannot preallocate the other file");
          break;
        }
        other_offset = 0;
      }
      if (::pwrite(fd, junk.data(), write_bytes, static_cast<off_t>(other_offset)) < 0) {
        state.SkipWithError("pwrite failed");
        break;
      }
      other_offset += write_bytes;
    }
    state.ResumeTiming();
    const std::span<const std::uint64_t> keys(ids.data() + (n % kDatasetBatches) * kBatch, kBatch);
    benchmark::DoNotOptimize(writer->append(keys, n / kDatasetBatches, matrix));
    rows_in_file += kBatch;
    ++n;
  }
  writer.reset();
  ::close(fd);
  state.counters["ns_per_row"] =
      benchmark::Counter(static_cast<double>(state.iterations() * kBatch),
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.SetItemsProcessed(state.iterations() * kBatch);
  state.SetLabel(key_index ? "key index" : "no key index");
}

// Appends of 8 rows of 16 floats into one store of `appends` appends, the epoch the same for
// all (epoch_per_append 0) or one more each append (1: the epoch is the global step, as some
// training loops key their rows). The two should cost the same: a new epoch used to make the
// indexer read the whole epoch table (its slots counted), so appends grew slower with every
// epoch the store held (bench/RESULTS.md, "A new epoch every append").
void BM_EpochPerAppend(benchmark::State& state) {
  const bool epoch_per_append = state.range(0) != 0;
  const std::uint64_t appends = static_cast<std::uint64_t>(state.range(1));
  constexpr std::uint32_t kDim = 16;
  constexpr std::uint64_t kRows = 8;
  const Floats values = random_floats(kRows * kDim, 3);
  const ConstMatrix matrix{values.data(), DType::kFloat32, kRows, kDim, 0};
  std::vector<std::uint64_t> keys(kRows);
  TempDir dir;
  WriterOptions options;
  options.sync = SyncPolicy::kNone;
  int generation = 0;
  for (auto _ : state) {
    state.PauseTiming();
    const std::string path = dir.sub("store" + std::to_string(generation++));
    remove_tree(dir.sub("store" + std::to_string(generation - 2)));
    CreateOptions create;
    create.dim = kDim;
    Writer writer = Writer::create(path, create, options);
    state.ResumeTiming();
    for (std::uint64_t i = 0; i < appends; ++i) {
      for (std::uint64_t j = 0; j < kRows; ++j) keys[j] = i * kRows + j;
      benchmark::DoNotOptimize(writer.append(keys, epoch_per_append ? i : 0, matrix));
    }
    writer.close();
  }
  state.SetItemsProcessed(state.iterations() * appends);  // items_per_second: appends a second
}

void IndexAfterWriteArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"index", "write_kib"});
  for (int write_kib : {0, 1536}) {
    for (int index : {1, 0}) b->Args({index, write_kib});
  }
}

void PairedArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "dim", "sync", "index"});
  for (int index : {1, 0}) {
    b->Args({512, 768, kNoSync, index});
    b->Args({512, 64, kNoSync, index});
    b->Args({512, 768, kEvery, index});
  }
}

void AppendArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "dim", "dtype", "sync"});
  for (int batch : kBatches) b->Args({batch, 768, kF32, kNoSync});
  for (int dim : {64, 1536}) b->Args({512, dim, kF32, kNoSync});
  for (int dtype : {kF16, kBF16, kF32ToF16, kF32ToBF16}) b->Args({512, 768, dtype, kNoSync});
  b->Args({512, 768, kF32, kEvery});
  b->Args({512, 768, kF32, kInterval});
}

void PwriteArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "dim", "sync", "prealloc"});
  for (int prealloc : {0, 1}) {
    for (int batch : kBatches) b->Args({batch, 768, kNoSync, prealloc});
    for (int dim : {64, 1536}) b->Args({512, dim, kNoSync, prealloc});
    b->Args({512, 768, kEvery, prealloc});
  }
}

void MemcpyArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "dim"});
  for (int batch : kBatches) b->Args({batch, 768});
  for (int dim : {64, 1536}) b->Args({512, dim});
}

BENCHMARK(BM_Append)
    ->Apply(AppendArgs)
    ->Apply(add_min_max)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Pwrite)
    ->Apply(PwriteArgs)
    ->Apply(add_min_max)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Paired)
    ->Apply(PairedArgs)
    ->Apply(add_min_max)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_IndexAfterWrite)
    ->Apply(IndexAfterWriteArgs)
    ->Apply(add_min_max)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_EpochPerAppend)
    ->ArgNames({"epoch_per_append", "appends"})
    ->Args({0, 40000})
    ->Args({1, 40000})
    ->Apply(add_min_max)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Memcpy)
    ->Apply(MemcpyArgs)
    ->Apply(add_min_max)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace embstore::bench

int main(int argc, char** argv) { return embstore::bench::run_benchmarks(argc, argv); }
