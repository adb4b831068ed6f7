// Scenario 19: many stores open in one process. Thousands of Readers and hundreds of Writers;
// the writers grow their stores past the readers' reservations (so readers map again at larger
// ranges) while every view taken along the way is kept and re-checked to the end, also after
// the readers are closed with only owner() copies left.
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "scenarios.h"
#include "support/payload.h"

namespace embstore::torture {
namespace {

constexpr std::uint32_t kDim = 8;

// One view and what it must show: rows [0, rows) of writer `store + 1`, keys 0..rows-1.
struct TakenView {
  RowsView rows;
  StridedView<std::uint64_t> keys;
  std::uint64_t store;
};

bool view_ok(const TakenView& v) {
  for (std::uint64_t i = 0; i < v.rows.rows; ++i) {
    const std::uint64_t key = test::make_key(v.store + 1, i);
    if (v.keys[i] != key || !test::payload_matches(key, kDim, v.rows.row(i))) return false;
  }
  return true;
}

}  // namespace

bool scenario_many_stores(std::uint64_t seed) {
  Rng rng(seed);
  Setup s("many-stores", seed);
  const std::uint64_t stores = scaled(200, 5);
  const std::uint64_t readers_per_store = 10;
  const std::uint64_t rounds = scaled(400);
  std::vector<Writer> writers;
  std::vector<std::uint64_t> committed(stores, 0);
  auto append = [&](std::uint64_t store, std::uint64_t n) {
    std::vector<std::uint64_t> keys(n);
    for (std::uint64_t i = 0; i < n; ++i) keys[i] = test::make_key(store + 1, committed[store] + i);
    writers[store].append(keys, 0, test::batch_payload(store + 1, committed[store], n, kDim));
    committed[store] += n;
  };
  for (std::uint64_t i = 0; i < stores; ++i) {
    CreateOptions o;
    o.dim = kDim;
    o.segment_bytes = 4096;
    writers.push_back(Writer::create(s.dir() + "/s" + std::to_string(i), o));
    append(i, rng.range(1, 50));
  }
  std::vector<Reader> readers;
  std::vector<TakenView> views;
  auto take = [&](std::uint64_t r) {
    const std::uint64_t store = r % stores;
    const std::uint64_t n = readers[r].size();
    views.push_back({readers[r].rows(), readers[r].keys(0, n), store});
  };
  for (std::uint64_t k = 0; k < readers_per_store; ++k) {
    for (std::uint64_t i = 0; i < stores; ++i) {
      readers.push_back(Reader::open(writers[i].path()));
      take(readers.size() - 1);
    }
  }
  for (std::uint64_t round = 0; round < rounds; ++round) {
    const std::uint64_t store = rng.below(stores);
    // Now and then a large batch: past the readers' reservations.
    append(store, rng.chance(0.05) ? rng.range(1000, 5000) : rng.range(1, 64));
    for (std::uint64_t k = 0; k < 3; ++k) {
      const std::uint64_t r = rng.below(readers_per_store) * stores + store;
      readers[r].refresh();
      take(r);
    }
  }
  bool ok = true;
  std::uint64_t bad = 0;
  for (const TakenView& v : views) bad += !view_ok(v);
  for (std::uint64_t i = 0; i < stores; ++i) {
    Reader fresh = Reader::open(writers[i].path());
    if (fresh.size() != committed[i]) {
      std::fprintf(stderr, "FAIL: store %llu holds %llu rows, %llu committed\n",
                   static_cast<unsigned long long>(i),
                   static_cast<unsigned long long>(fresh.size()),
                   static_cast<unsigned long long>(committed[i]));
      ok = false;
    }
  }
  // Only owner() copies left: every view still reads back.
  std::vector<std::shared_ptr<const void>> owners;
  for (Reader& r : readers) owners.push_back(r.owner());
  readers.clear();
  for (const TakenView& v : views) bad += !view_ok(v);
  if (bad != 0) {
    std::fprintf(stderr, "FAIL: %llu of %llu view checks failed\n",
                 static_cast<unsigned long long>(bad),
                 static_cast<unsigned long long>(2 * views.size()));
    ok = false;
  }
  std::printf("scenario 19: %llu stores, %llu readers, %llu writers, %llu views kept and checked\n",
              static_cast<unsigned long long>(stores),
              static_cast<unsigned long long>(stores * readers_per_store),
              static_cast<unsigned long long>(stores),
              static_cast<unsigned long long>(views.size()));
  return ok;
}

}  // namespace embstore::torture
