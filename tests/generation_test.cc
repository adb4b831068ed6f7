// Generations: reservations sized to the store, remapping at a larger range while earlier views
// stay valid, and many stores open in one process.
#include <dirent.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "support/payload.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

constexpr std::uint32_t kDim = 8;

CreateOptions small() {
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;  // 128 rows of 32 bytes
  return o;
}

void append_rows(Writer& w, std::uint64_t writer, std::uint64_t first_seq, std::uint64_t n) {
  const auto values = test::batch_payload(writer, first_seq, n, kDim);
  std::vector<std::uint64_t> keys(n);
  for (std::uint64_t i = 0; i < n; ++i) keys[i] = test::make_key(writer, first_seq + i);
  w.append(keys, 0, std::span<const float>(values));
}

// Every row of the view holds the payload its key names, and the keys are writer's 0..n-1.
bool view_holds(const RowsView& rows, const StridedView<std::uint64_t>& keys, std::uint64_t writer,
                std::uint64_t n) {
  if (rows.rows != n || keys.size != n) return false;
  for (std::uint64_t i = 0; i < n; ++i) {
    if (keys[i] != test::make_key(writer, i)) return false;
    if (!test::payload_matches(keys[i], kDim, rows.row(i))) return false;
  }
  return true;
}

std::uint64_t open_descriptors() {
  std::uint64_t n = 0;
  DIR* dir = ::opendir("/proc/self/fd");
  REQUIRE(dir != nullptr);
  while (::readdir(dir) != nullptr) ++n;
  ::closedir(dir);
  return n;
}

}  // namespace

TEST_CASE("10,000 Readers stay open in one process, every view valid, holding no descriptors",
          "[generation]") {
  TempDir dir;
  constexpr std::uint64_t kStores = 50, kReadersPerStore = 200, kRows = 100;
  std::vector<std::string> paths;
  for (std::uint64_t s = 0; s < kStores; ++s) {
    paths.push_back(dir / ("s" + std::to_string(s)));
    Writer w = Writer::create(paths.back(), small());
    append_rows(w, s + 1, 0, kRows);
  }
  const std::uint64_t fds_before = open_descriptors();
  std::vector<Reader> readers;
  readers.reserve(kStores * kReadersPerStore);
  for (std::uint64_t r = 0; r < kReadersPerStore; ++r) {
    for (std::uint64_t s = 0; s < kStores; ++s) readers.push_back(Reader::open(paths[s]));
  }
  REQUIRE(readers.size() == 10'000);
  CHECK(open_descriptors() == fds_before);
  std::uint64_t good = 0;
  for (std::uint64_t i = 0; i < readers.size(); ++i) {
    const std::uint64_t writer = i % kStores + 1;
    good += view_holds(readers[i].rows(), readers[i].keys(0, kRows), writer, kRows);
  }
  CHECK(good == readers.size());
  // Lookups map the key index on first use, and hold no descriptor for it either.
  std::uint64_t found = 0;
  for (std::uint64_t i = 0; i < readers.size(); i += 10) {
    const std::uint64_t writer = i % kStores + 1;
    const auto row = readers[i].find(test::make_key(writer, kRows - 1));
    found += row == kRows - 1;
  }
  CHECK(found == readers.size() / 10);
  CHECK(readers[10].info().key_index_used);
  CHECK(open_descriptors() == fds_before);
  // A refresh after the store grew reopens the files by path and sees the new rows, and a
  // lookup maps the key index's longer chain (the same file, or the generation that replaced it).
  {
    Writer w = Writer::open(paths[0]);
    append_rows(w, 1, kRows, 1000);
  }
  CHECK(readers[0].refresh() == kRows + 1000);
  CHECK(view_holds(readers[0].rows(), readers[0].keys(0, kRows + 1000), 1, kRows + 1000));
  CHECK(readers[0].info().data_file_bytes >= (kRows + 1000) * 32);
  CHECK(readers[0].find(test::make_key(1, kRows + 999)) == kRows + 999);
  CHECK(readers[0].history(test::make_key(1, 3)).size() == 1);
  CHECK(open_descriptors() == fds_before);
}

TEST_CASE("Hundreds of Writers stay open in one process", "[generation]") {
  TempDir dir;
  constexpr std::uint64_t kWriters = 200, kRows = 50;
  std::vector<Writer> writers;
  for (std::uint64_t i = 0; i < kWriters; ++i) {
    writers.push_back(Writer::create(dir / ("w" + std::to_string(i)), small()));
  }
  for (std::uint64_t i = 0; i < kWriters; ++i) append_rows(writers[i], i + 1, 0, kRows);
  for (std::uint64_t i = 0; i < kWriters; ++i) {
    // Past the first reservation: every Writer remaps while the others stay open.
    append_rows(writers[i], i + 1, kRows, 600);
  }
  std::uint64_t good = 0;
  for (std::uint64_t i = 0; i < kWriters; ++i) {
    Reader r = Reader::open(writers[i].path());
    good += view_holds(r.rows(), r.keys(0, r.size()), i + 1, kRows + 600);
  }
  CHECK(good == kWriters);
}

TEST_CASE("A view taken before the reservation moved stays readable and unchanged",
          "[generation]") {
  TempDir dir;
  const std::string path = dir / "s";
  Writer w = Writer::create(path, small());
  append_rows(w, 7, 0, 10);
  Reader r = Reader::open(path);
  const RowsView before = r.rows();
  const auto keys_before = r.keys(0, 10);
  const std::vector<std::byte> copy(before.data, before.data + before.size_bytes());

  // Far past the reader's reservation (twice the next power of two of the rows its files held).
  constexpr std::uint64_t kMore = 20'000;
  append_rows(w, 7, 10, kMore);
  REQUIRE(r.refresh() == 10 + kMore);
  const RowsView after = r.rows();
  CHECK(after.data != before.data);  // the reader mapped the files again, at a new range
  CHECK(view_holds(after, r.keys(0, 10 + kMore), 7, 10 + kMore));
  CHECK(std::memcmp(before.data, copy.data(), copy.size()) == 0);
  CHECK(view_holds(before, keys_before, 7, 10));

  // After the Reader is closed, an owner() copy keeps both the old and the new range.
  auto owner = r.owner();
  r.close();
  CHECK(std::memcmp(before.data, copy.data(), copy.size()) == 0);
  CHECK(view_holds(before, keys_before, 7, 10));
  CHECK(std::memcmp(after.data, before.data, copy.size()) == 0);
  CHECK(test::payload_matches(test::make_key(7, 10 + kMore - 1), kDim, after.row(10 + kMore - 1)));
}

TEST_CASE("A Writer growing past its reservation keeps appending at the new range",
          "[generation]") {
  TempDir dir;
  const std::string path = dir / "s";
  Writer w = Writer::create(path, small());
  for (std::uint64_t seq = 0; seq < 50'000; seq += 5'000) append_rows(w, 3, seq, 5'000);
  Reader r = Reader::open(path);
  CHECK(view_holds(r.rows(), r.keys(0, r.size()), 3, 50'000));
  CHECK(r.verify().ok());
}

TEST_CASE(
    "A Reader's key index maps its growing chain at larger ranges, and falls back to a scan "
    "when the file it mapped was replaced",
    "[generation][keys]") {
  TempDir dir;
  const std::string path = dir / "s";
  Writer w = Writer::create(path, small());
  // 16 keys, each appended again and again: a key's latest row is far past any early snapshot,
  // and a lookup walks the chain back from it.
  auto append_cycle = [&](std::uint64_t n) {
    const std::uint64_t first = w.committed_rows();
    std::vector<std::uint64_t> keys(n);
    for (std::uint64_t i = 0; i < n; ++i) keys[i] = (first + i) % 16;
    const std::vector<float> values(n * kDim, static_cast<float>(first));
    w.append(keys, first, std::span<const float>(values));  // epoch = the batch's first row
  };
  append_cycle(32);
  Reader early = Reader::open(path);
  REQUIRE(early.find(3) == 19);  // maps keys.1 while its chain is a page or two
  Reader follower = Reader::open(path);
  REQUIRE(follower.find(3) == 19);

  // The chain grows to thousands of pages: the follower maps it at larger ranges as it follows.
  for (std::uint64_t round = 0; round < 6; ++round) {
    append_cycle(std::uint64_t{4000} << round);
    const std::uint64_t rows = follower.refresh();
    for (std::uint64_t key = 0; key < 16; ++key) {
      CHECK(follower.find(key) == rows - 16 + key);
      CHECK(follower.history(key).size() == rows / 16);
    }
  }
  // The writer's info() returns once its appends' rows are indexed (index/background_indexer.h).
  (void)w.info();
  CHECK(follower.info().key_index_used);
  CHECK_THAT(follower.info().key_index, !Catch::Contains("scan"));
  CHECK(follower.verify().ok());

  // The early Reader's snapshot is 32 rows; the latest row of each key is past its mapping.
  // Its answers come from the chain it maps now, by reopening keys.1...
  for (std::uint64_t key = 0; key < 16; ++key) CHECK(early.find(key) == 16 + key);
  // ... or, once keys.1 was replaced and removed, from a scan of its snapshot: never wrong, and
  // not reported as damage.
  Reader early2 = Reader::open(path);
  (void)early2.find(0);   // maps keys.1 as it is now
  append_cycle(200'000);  // keys.1's chain grows past early2's mapping
  w.rebuild_key_index();  // keys.2 replaces keys.1
  REQUIRE_FALSE(std::filesystem::exists(path + "/keys.1"));
  const std::uint64_t snapshot = early2.size();
  for (std::uint64_t key = 0; key < 16; ++key) {
    CHECK(early2.find(key) == snapshot - 16 + key);
  }
  CHECK_THAT(early2.info().key_index, !Catch::Contains("damaged"));
  CHECK(early2.refresh() == w.committed_rows());
  CHECK(early2.find(5) == w.committed_rows() - 16 + 5);
  CHECK_THAT(early2.info().key_index, Catch::Contains("keys.2"));
}
