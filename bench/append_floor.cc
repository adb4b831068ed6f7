// append_floor — what the checksum rule costs a writer alone at best, against `pwrite()` into a
// preallocated file (`pwrite-pre`, the ceiling the append targets are measured against), in
// turns, in one process, as BM_Paired in append_bench does. No store is involved: each variant is
// the bare sequence of system calls and hashing that one design of the append would need, with the
// library's own row hash (format/checksum.h), so the figure is a floor for that design, not a
// measurement of embstore.
//
//   BM_Floor/batch/dim/variant   per batch, a `pwrite()` of the rows into one preallocated file
//                                and, in turn, the variant into another; counter x_pwrite_pre is
//                                the `pwrite()`s' total time over the variant's (1.0: free).
//     variant 0  the same `pwrite()` again (the pairing's own noise: ~1.0)
//     variant 1  hash every row of the caller's array, then `pwrite()` it. Not a way to keep the
//                rule (another thread may change the array between the hash and the copy) but
//                the bound of every design that hashes on the writer's own thread: the hash
//                cannot cost less than this.
//     variant 2  `pwrite()` from the caller's array, then read the rows back with `pread()`,
//                kReadBackBytes at a time, and hash them there: what a writer alone does
//                (src/log/commit.cc, HashAt::kPageCache).
//     variant 3  copy and hash every row into a page-aligned buffer of the thread, then
//                `pwrite()` that buffer: what a writer that shares the lock does
//                (src/log/batch.h, HashAt::kStaged).
//
// Fresh page-cache pages for every batch, as in append_bench (a new pair of files every
// EMBSTORE_BENCH_BYTES). bench/RESULTS.md, "What the checksum rule costs a writer alone".
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_util.h"
#include "format/checksum.h"
#include "log/batch.h"

namespace embstore::bench {
namespace {

enum Variant { kPwriteAgain = 0, kHashCallerFirst = 1, kReadBack = 2, kStageFirst = 3 };

const char* variant_label(int variant) {
  static const char* const kNames[] = {"pwrite again", "hash caller's rows, pwrite (bound)",
                                       "pwrite, pread back, hash", "copy+hash to a buffer, pwrite"};
  return kNames[variant];
}

int fresh_file(const std::string& path, std::uint64_t bytes, int old_fd) {
  if (old_fd >= 0) ::close(old_fd);
  ::unlink(path.c_str());
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)) != 0) {
    throw std::runtime_error("cannot create and preallocate " + path);
  }
  return fd;
}

bool write_exact(int fd, const void* data, std::uint64_t bytes, std::uint64_t offset) {
  return ::pwrite(fd, data, bytes, static_cast<off_t>(offset)) == static_cast<ssize_t>(bytes);
}

void BM_Floor(benchmark::State& state) {
  const std::uint64_t batch = state.range(0);
  const auto dim = static_cast<std::uint32_t>(state.range(1));
  const int variant = static_cast<int>(state.range(2));
  const std::uint64_t row_bytes = std::uint64_t{dim} * 4;
  const std::uint64_t bytes = batch * row_bytes;
  const Floats values = random_floats(batch, dim);
  const auto* source = reinterpret_cast<const std::byte*>(values.data());
  const detail::RowHashKey key(0x5eed);
  std::vector<std::uint64_t> hashes(batch);
  std::vector<std::byte> storage;  // detail::staging_buffer's, as the library uses it.
  const std::uint64_t per_read = detail::read_back_rows(row_bytes);
  const std::uint64_t limit =
      std::max<std::uint64_t>(batch, bytes_per_file() / row_bytes) / batch * batch;

  TempDir dir;
  const std::string base_path = dir.sub("pwrite"), variant_path = dir.sub("variant");
  int base_fd = -1, variant_fd = -1;
  std::uint64_t rows_in_file = limit;
  using Clock = std::chrono::steady_clock;
  Clock::duration variant_time{}, pwrite_time{};
  std::uint64_t n = 0;
  auto run_variant = [&](std::uint64_t offset) {
    switch (variant) {
      case kPwriteAgain:
        return write_exact(variant_fd, source, bytes, offset);
      case kHashCallerFirst:
        for (std::uint64_t i = 0; i < batch; ++i) {
          hashes[i] = detail::payload_hash(source + i * row_bytes, row_bytes, key);
        }
        return write_exact(variant_fd, source, bytes, offset);
      case kReadBack: {
        if (!write_exact(variant_fd, source, bytes, offset)) return false;
        for (std::uint64_t begin = 0; begin < batch; begin += per_read) {
          const std::uint64_t count = std::min(per_read, batch - begin);
          const std::uint64_t at = offset + begin * row_bytes;
          std::byte* piece = detail::staging_buffer(storage, count * row_bytes, at);
          if (::pread(variant_fd, piece, count * row_bytes, static_cast<off_t>(at)) !=
              static_cast<ssize_t>(count * row_bytes)) {
            return false;
          }
          for (std::uint64_t i = 0; i < count; ++i) {
            hashes[begin + i] = detail::payload_hash(piece + i * row_bytes, row_bytes, key);
          }
        }
        return true;
      }
      default: {
        std::byte* staged = detail::staging_buffer(storage, bytes, offset);
        detail::copy_and_hash(staged, source, row_bytes, batch, row_bytes, key, hashes.data());
        return write_exact(variant_fd, staged, bytes, offset);
      }
    }
  };
  for (auto _ : state) {
    if (rows_in_file + batch > limit) {
      state.PauseTiming();
      base_fd = fresh_file(base_path, limit * row_bytes, base_fd);
      variant_fd = fresh_file(variant_path, limit * row_bytes, variant_fd);
      rows_in_file = 0;
      state.ResumeTiming();
    }
    const std::uint64_t offset = rows_in_file * row_bytes;
    for (int turn = 0; turn < 2; ++turn) {
      const auto start = Clock::now();
      if ((turn == 0) == (n % 2 == 0)) {
        if (!run_variant(offset)) {
          state.SkipWithError("variant: a pwrite or pread failed");
          break;
        }
        variant_time += Clock::now() - start;
      } else {
        if (!write_exact(base_fd, source, bytes, offset)) {
          state.SkipWithError("pwrite failed");
          break;
        }
        pwrite_time += Clock::now() - start;
      }
    }
    benchmark::DoNotOptimize(hashes.data());
    rows_in_file += batch;
    ++n;
  }
  if (base_fd >= 0) ::close(base_fd);
  if (variant_fd >= 0) ::close(variant_fd);
  const double variant_s = std::chrono::duration<double>(variant_time).count();
  const double pwrite_s = std::chrono::duration<double>(pwrite_time).count();
  state.counters["x_pwrite_pre"] = variant_s > 0 ? pwrite_s / variant_s : 0;
  state.counters["variant_us"] = n > 0 ? 1e6 * variant_s / static_cast<double>(n) : 0;
  state.counters["pwrite_us"] = n > 0 ? 1e6 * pwrite_s / static_cast<double>(n) : 0;
  state.SetItemsProcessed(state.iterations() * batch);
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetLabel(variant_label(variant));
}

void FloorArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "dim", "variant"});
  for (int dim : {768, 64}) {
    for (int variant : {kPwriteAgain, kHashCallerFirst, kReadBack, kStageFirst}) {
      b->Args({512, dim, variant});
    }
  }
}

BENCHMARK(BM_Floor)
    ->Apply(FloorArgs)
    ->Apply(add_min_max)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace embstore::bench

int main(int argc, char** argv) { return embstore::bench::run_benchmarks(argc, argv); }
