// key_index_bench — lookups by (key, epoch) through the key index, with LMDB's mdb_get on the
// same pairs in the same run as the baseline (the targets and the figures measured against
// them: bench/RESULTS.md, "Key lookups").
//
// The store: EMBSTORE_BENCH_KEYS keys x 10 epochs (default 1M x 10 = 10M rows), dim 64 float32,
// appended epoch by epoch in batches of 4,096 as a training run would; the fill reports the
// append latencies, and separately those of appends made while a key index growth was being
// built (the Writer's growth thread running: one thread more than the process had before). LMDB
// holds the same rows under a 16-byte big-endian (key, epoch) key. The smoke test sets
// EMBSTORE_BENCH_ROWS to shrink everything.
//
// Percentiles come from timing each lookup with steady_clock (its ~20-30 ns overhead is included
// in both embstore's and LMDB's figures). Warm cache: every file was just written.
#include <benchmark/benchmark.h>
#include <lmdb.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_util.h"
#include "embstore/embstore.h"

namespace {

using Clock = std::chrono::steady_clock;
using embstore::bench::env_u64;

constexpr std::uint32_t kDim = 64;
constexpr std::uint64_t kEpochs = 10;
constexpr std::uint64_t kBatch = 4096;

void check_lmdb(int rc, const char* what) {
  if (rc != 0) throw std::runtime_error(std::string(what) + ": " + mdb_strerror(rc));
}

void lmdb_key(std::uint64_t key, std::uint64_t epoch, unsigned char out[16]) {
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<unsigned char>(key >> (56 - 8 * i));
    out[8 + i] = static_cast<unsigned char>(epoch >> (56 - 8 * i));
  }
}

// The process's thread count (/proc/self/status): a Writer builds a key index growth on a
// thread of its own, which exits when the growth is done.
int thread_count() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Threads:", 0) == 0) return std::stoi(line.substr(8));
  }
  return 0;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  const std::size_t i = std::min(v.size() - 1, static_cast<std::size_t>(p * v.size()));
  std::nth_element(v.begin(), v.begin() + i, v.end());
  return v[i];
}

// The store and the LMDB environment, built once for all benchmarks.
struct Fixture {
  embstore::bench::TempDir dir;
  std::string store;
  std::uint64_t keys = 0;
  std::uint64_t rows = 0;
  std::vector<double> append_us, append_during_growth_us;
  MDB_env* env = nullptr;
  MDB_dbi dbi = 0;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> probes;  // Random (key, epoch) pairs.

  Fixture() {
    rows = env_u64("EMBSTORE_BENCH_ROWS", 0);
    keys = rows != 0 ? std::max<std::uint64_t>(1, rows / kEpochs)
                     : env_u64("EMBSTORE_BENCH_KEYS", 1'000'000);
    rows = keys * kEpochs;
    store = dir.sub("store");
    fill_store();
    fill_lmdb();
    std::mt19937_64 rng(99);
    probes.resize(1 << 20);
    for (auto& p : probes) p = {rng() % keys, rng() % kEpochs};
  }
  ~Fixture() {
    if (env != nullptr) mdb_env_close(env);
  }

  void fill_store() {
    embstore::CreateOptions o;
    o.dim = kDim;
    o.segment_bytes = 64ull << 20;
    embstore::Writer w = embstore::Writer::create(store, o);
    const auto values = embstore::bench::random_floats(kBatch, kDim);
    std::vector<std::uint64_t> batch_keys(kBatch);
    const int threads_before = thread_count();
    auto growing = [&] { return thread_count() > threads_before; };
    for (std::uint64_t epoch = 0; epoch < kEpochs; ++epoch) {
      for (std::uint64_t first = 0; first < keys; first += kBatch) {
        const std::uint64_t n = std::min(kBatch, keys - first);
        std::iota(batch_keys.begin(), batch_keys.begin() + n, first);
        const bool growth_before = growing();
        const auto start = Clock::now();
        w.append(std::span<const std::uint64_t>(batch_keys.data(), n), epoch,
                 embstore::ConstMatrix{values.data(), embstore::DType::kFloat32, n, kDim, 0});
        const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
        append_us.push_back(us);
        if (growth_before || growing()) append_during_growth_us.push_back(us);
      }
    }
    w.close();  // Waits for a growth in progress.
  }

  void fill_lmdb() {
    check_lmdb(mdb_env_create(&env), "mdb_env_create");
    check_lmdb(mdb_env_set_mapsize(env, (rows * (kDim * 4 + 64) + (64ull << 20)) * 3 / 2),
               "mdb_env_set_mapsize");
    const std::string path = dir.sub("lmdb");
    check_lmdb(mdb_env_open(env, path.c_str(), MDB_NOSUBDIR | MDB_NOSYNC | MDB_WRITEMAP, 0644),
               "mdb_env_open");
    embstore::Reader r = embstore::Reader::open(store);
    const auto view = r.rows();
    MDB_txn* txn;
    check_lmdb(mdb_txn_begin(env, nullptr, 0, &txn), "mdb_txn_begin");
    check_lmdb(mdb_dbi_open(txn, nullptr, 0, &dbi), "mdb_dbi_open");
    // Sorted by (key, epoch), so MDB_APPEND builds the tree without searching it.
    for (std::uint64_t key = 0; key < keys; ++key) {
      for (std::uint64_t epoch = 0; epoch < kEpochs; ++epoch) {
        unsigned char kbuf[16];
        lmdb_key(key, epoch, kbuf);
        MDB_val k{16, kbuf};
        MDB_val v{kDim * 4, const_cast<std::byte*>(view.row(epoch * keys + key))};
        check_lmdb(mdb_put(txn, dbi, &k, &v, MDB_APPEND), "mdb_put");
      }
    }
    check_lmdb(mdb_txn_commit(txn), "mdb_txn_commit");
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

void BM_Fill(benchmark::State& state) {
  Fixture& f = fixture();
  for (auto _ : state) benchmark::DoNotOptimize(f.rows);
  state.counters["rows"] = static_cast<double>(f.rows);
  state.counters["append_p50_us"] = percentile(f.append_us, 0.5);
  state.counters["append_max_us"] = percentile(f.append_us, 1.0);
  state.counters["growth_appends"] = static_cast<double>(f.append_during_growth_us.size());
  state.counters["growth_append_max_us"] = percentile(f.append_during_growth_us, 1.0);
  state.counters["growth_append_p50_us"] = percentile(f.append_during_growth_us, 0.5);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

void BM_OpenAndFirstFind(benchmark::State& state) {
  Fixture& f = fixture();
  std::uint64_t i = 0;
  for (auto _ : state) {
    embstore::Reader r = embstore::Reader::open(f.store);
    const auto& p = f.probes[i++ % f.probes.size()];
    auto row = r.find(p.first, p.second);
    if (!row) state.SkipWithError("a stored pair was not found");
    benchmark::DoNotOptimize(row);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

// Times every lookup of a pass over the probes; reports p50/p99 in us.
template <typename Lookup>
void timed_lookups(benchmark::State& state, Lookup&& lookup) {
  Fixture& f = fixture();
  // Warm: one untimed pass faults in this handle's pages of every table and file the probes
  // touch (a fresh mapping costs a page fault per first touch, LMDB's included).
  for (const auto& p : f.probes) benchmark::DoNotOptimize(lookup(p.first, p.second));
  std::vector<double> ns;
  ns.reserve(f.probes.size());
  std::uint64_t i = 0;
  for (auto _ : state) {
    const auto& p = f.probes[i++ % f.probes.size()];
    const auto start = Clock::now();
    const bool found = lookup(p.first, p.second);
    const auto end = Clock::now();
    if (!found) state.SkipWithError("a stored pair was not found");
    if (ns.size() < f.probes.size())
      ns.push_back(std::chrono::duration<double, std::nano>(end - start).count());
  }
  state.counters["p50_us"] = percentile(ns, 0.50) / 1000;
  state.counters["p99_us"] = percentile(ns, 0.99) / 1000;
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

void BM_FindWarm(benchmark::State& state) {
  embstore::Reader r = embstore::Reader::open(fixture().store);
  timed_lookups(state, [&](std::uint64_t key, std::uint64_t epoch) {
    const auto row = r.find(key, epoch);
    if (!row) return false;
    // What a caller does next: the row's address (zero-copy), as mdb_get returns.
    benchmark::DoNotOptimize(r.rows(*row, *row + 1).data);
    return true;
  });
}

void BM_LmdbGetWarm(benchmark::State& state) {
  Fixture& f = fixture();
  MDB_txn* txn;
  check_lmdb(mdb_txn_begin(f.env, nullptr, MDB_RDONLY, &txn), "mdb_txn_begin");
  timed_lookups(state, [&](std::uint64_t key, std::uint64_t epoch) {
    unsigned char kbuf[16];
    lmdb_key(key, epoch, kbuf);
    MDB_val k{16, kbuf}, v;
    if (mdb_get(txn, f.dbi, &k, &v) != 0) return false;
    benchmark::DoNotOptimize(v.mv_data);
    return true;
  });
  mdb_txn_abort(txn);
}

void BM_FindLatestWarm(benchmark::State& state) {
  embstore::Reader r = embstore::Reader::open(fixture().store);
  timed_lookups(state, [&](std::uint64_t key, std::uint64_t) { return r.find(key).has_value(); });
}

void BM_FindMany(benchmark::State& state) {
  Fixture& f = fixture();
  embstore::Reader r = embstore::Reader::open(f.store);
  const std::size_t n = static_cast<std::size_t>(state.range(0));
  std::mt19937_64 rng(5);
  std::vector<std::uint64_t> keys(n), epochs(n);
  std::vector<std::int64_t> out(n);
  for (std::size_t i = 0; i < f.probes.size(); i += n) {  // Warm, as timed_lookups does.
    for (std::size_t j = 0; j < n; ++j) {
      keys[j] = f.probes[(i + j) % f.probes.size()].first;
      epochs[j] = f.probes[(i + j) % f.probes.size()].second;
    }
    r.find_many(keys, epochs, out);
  }
  for (auto _ : state) {
    state.PauseTiming();
    for (std::size_t i = 0; i < n; ++i) {
      keys[i] = rng() % f.keys;
      epochs[i] = rng() % kEpochs;
    }
    state.ResumeTiming();
    r.find_many(keys, epochs, out);
    benchmark::DoNotOptimize(out.data());
  }
  if (std::count(out.begin(), out.end(), -1) != 0) state.SkipWithError("missing rows");
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}

void BM_LmdbGetMany(benchmark::State& state) {
  Fixture& f = fixture();
  const std::size_t n = static_cast<std::size_t>(state.range(0));
  std::mt19937_64 rng(5);
  std::vector<std::uint64_t> keys(n), epochs(n);
  MDB_txn* txn;
  check_lmdb(mdb_txn_begin(f.env, nullptr, MDB_RDONLY, &txn), "mdb_txn_begin");
  for (auto _ : state) {
    state.PauseTiming();
    for (std::size_t i = 0; i < n; ++i) {
      keys[i] = rng() % f.keys;
      epochs[i] = rng() % kEpochs;
    }
    state.ResumeTiming();
    for (std::size_t i = 0; i < n; ++i) {
      unsigned char kbuf[16];
      lmdb_key(keys[i], epochs[i], kbuf);
      MDB_val k{16, kbuf}, v;
      if (mdb_get(txn, f.dbi, &k, &v) != 0) state.SkipWithError("missing rows");
      benchmark::DoNotOptimize(v.mv_data);
    }
  }
  mdb_txn_abort(txn);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}

void BM_History10(benchmark::State& state) {
  Fixture& f = fixture();
  embstore::Reader r = embstore::Reader::open(f.store);
  std::mt19937_64 rng(3);
  for (std::uint64_t key = 0; key < f.keys; ++key) benchmark::DoNotOptimize(r.history(key));
  std::vector<double> ns;
  for (auto _ : state) {
    const std::uint64_t key = rng() % f.keys;
    const auto start = Clock::now();
    const auto versions = r.history(key);
    const auto end = Clock::now();
    if (versions.size() != kEpochs) state.SkipWithError("history is not 10 versions");
    ns.push_back(std::chrono::duration<double, std::nano>(end - start).count());
  }
  state.counters["p50_us"] = percentile(ns, 0.50) / 1000;
  state.counters["p99_us"] = percentile(ns, 0.99) / 1000;
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

// The floor under every figure above: one random load from memory the size of the store's
// offset index, each load's address depending on the one before (as a probe's slot gives the
// row whose entry is read next). A lookup that must touch n such places costs about n of these.
void BM_DependentLoad(benchmark::State& state) {
  constexpr std::uint64_t kEntryBytes = 32;  // An offset index entry (FORMAT.md).
  const std::uint64_t n = std::max<std::uint64_t>(1024, fixture().rows * kEntryBytes / 8);
  // One cycle through every slot in random order (Sattolo), so no load can be predicted.
  std::vector<std::uint64_t> next(n);
  std::iota(next.begin(), next.end(), 0);
  std::mt19937_64 rng(7);
  for (std::uint64_t i = n - 1; i > 0; --i) std::swap(next[i], next[rng() % i]);
  std::uint64_t at = 0;
  for (std::uint64_t i = 0; i < n; ++i) at = next[at];  // Warm: every page touched.
  constexpr std::uint64_t kSteps = 1 << 16;
  double ns = 0;
  for (auto _ : state) {
    const auto start = Clock::now();
    for (std::uint64_t i = 0; i < kSteps; ++i) at = next[at];
    ns += std::chrono::duration<double, std::nano>(Clock::now() - start).count();
    benchmark::DoNotOptimize(at);
  }
  state.counters["bytes"] = static_cast<double>(n * 8);
  state.counters["load_ns"] = ns / static_cast<double>(state.iterations() * kSteps);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * kSteps));
}

}  // namespace

BENCHMARK(BM_Fill)->Iterations(1)->UseRealTime();
BENCHMARK(BM_OpenAndFirstFind)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_FindWarm)->UseRealTime();
BENCHMARK(BM_LmdbGetWarm)->UseRealTime();
BENCHMARK(BM_FindLatestWarm)->UseRealTime();
BENCHMARK(BM_FindMany)->Arg(4096)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_LmdbGetMany)->Arg(4096)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_History10)->UseRealTime();
BENCHMARK(BM_DependentLoad)->UseRealTime();

BENCHMARK_MAIN();
