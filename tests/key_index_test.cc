// The key index on its own (src/index/key_index.h): rows of (key, epoch) in a real mapped
// offset-index file, indexed into real keys.K files, every answer checked against std::map.
#include "index/key_index.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <vector>

#include "embstore/error.h"
#include "format/format.h"
#include "index/key_index_handle.h"
#include "platform/mapping.h"
#include "platform/os.h"
#include "platform/testing.h"
#include "support/temp_dir.h"

using namespace embstore;
using namespace embstore::detail;
using embstore::test::TempDir;

namespace {

// An offset index file of IndexEntry, mapped read-write, that the test fills row by row.
class EntriesFile {
 public:
  EntriesFile(const std::string& path, std::uint64_t capacity) : path_(path) {
    fd_ = os::create_file(path);
    os::allocate(fd_, 0, capacity * kIndexEntryBytes, path);
    mapping_ = std::make_unique<ReservedMapping>(capacity * kIndexEntryBytes, path,
                                                 os::Access::kReadWrite);
    mapping_->map_to(fd_, capacity * kIndexEntryBytes);
  }
  ~EntriesFile() {
    mapping_.reset();
    os::close_fd(fd_);
  }
  const IndexEntry* entries() const { return reinterpret_cast<IndexEntry*>(mapping_->base()); }
  void append(std::uint64_t key, std::uint64_t epoch) {
    reinterpret_cast<IndexEntry*>(mapping_->base())[rows_] = {key, epoch, rows_, 1};
    pairs_.push_back({key, epoch});
    ++rows_;
  }
  std::uint64_t rows() const { return rows_; }
  const std::vector<std::pair<std::uint64_t, std::uint64_t>>& pairs() const { return pairs_; }

 private:
  std::string path_;
  int fd_ = -1;
  std::unique_ptr<ReservedMapping> mapping_;
  std::uint64_t rows_ = 0;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> pairs_;
};

KeyIndexIdentity identity() {
  KeyIndexIdentity id;
  for (int i = 0; i < 16; ++i) id.store_id[i] = static_cast<std::uint8_t>(i * 7 + 1);
  id.seed = 0x1234567890abcdefull;
  id.max_rows = 1 << 22;
  return id;
}

// The oracle: answers computed from the first `snapshot` rows with std::map.
struct Oracle {
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::uint64_t> pair_latest;
  std::map<std::uint64_t, std::vector<std::uint64_t>> by_key;
  std::map<std::uint64_t, std::vector<std::uint64_t>> by_epoch;

  Oracle(const EntriesFile& file, std::uint64_t snapshot) {
    for (std::uint64_t r = 0; r < snapshot; ++r) {
      const auto [key, epoch] = file.pairs()[r];
      pair_latest[{key, epoch}] = r;
      by_key[key].push_back(r);
      by_epoch[epoch].push_back(r);
    }
  }
};

// Every kind of lookup for the keys and epochs in `probe_keys`/`probe_epochs`, against the oracle.
void check_against_oracle(const KeyQuery& q, const EntriesFile& file, std::uint64_t snapshot,
                          const std::vector<std::uint64_t>& probe_keys,
                          const std::vector<std::uint64_t>& probe_epochs) {
  const Oracle oracle(file, snapshot);
  std::vector<std::uint64_t> many_keys, many_epochs;
  std::vector<std::int64_t> want_pairs, want_latest;
  for (const std::uint64_t key : probe_keys) {
    const auto it = oracle.by_key.find(key);
    const std::vector<std::uint64_t> none;
    const auto& rows = it == oracle.by_key.end() ? none : it->second;
    INFO("key " << key << " snapshot " << snapshot << " indexed " << q.indexed_limit());
    CHECK(q.history(key) == rows);
    std::vector<std::uint64_t> epochs_of_rows, want_epochs;
    for (const std::uint64_t r : rows) want_epochs.push_back(file.pairs()[r].second);
    CHECK(q.history(key, &epochs_of_rows) == rows);
    CHECK(epochs_of_rows == want_epochs);
    if (const auto by_epochs = q.history_by_epochs(key)) {
      // When it answers, it answers exactly: the key's rows below the index limit.
      std::vector<std::uint64_t> indexed;
      for (const std::uint64_t r : rows) {
        if (r < q.indexed_limit()) indexed.push_back(r);
      }
      CHECK(*by_epochs == indexed);
    }
    const auto latest = q.find_latest(key);
    CHECK(latest.has_value() == !rows.empty());
    if (latest && !rows.empty()) CHECK(*latest == rows.back());
    want_latest.push_back(rows.empty() ? -1 : static_cast<std::int64_t>(rows.back()));
    for (const std::uint64_t epoch : probe_epochs) {
      const auto p = oracle.pair_latest.find({key, epoch});
      const auto found = q.find(key, epoch);
      CHECK(found.has_value() == (p != oracle.pair_latest.end()));
      if (found && p != oracle.pair_latest.end()) CHECK(*found == p->second);
      many_keys.push_back(key);
      many_epochs.push_back(epoch);
      want_pairs.push_back(p == oracle.pair_latest.end() ? -1
                                                         : static_cast<std::int64_t>(p->second));
    }
  }
  std::vector<std::int64_t> got(many_keys.size());
  q.find_many(many_keys, many_epochs, got.data());
  CHECK(got == want_pairs);
  got.assign(probe_keys.size(), 0);
  q.find_many(probe_keys, {}, got.data());
  CHECK(got == want_latest);
  if (!probe_epochs.empty()) {
    // One epoch for the whole batch.
    const std::uint64_t epoch = probe_epochs.front();
    std::vector<std::int64_t> want;
    for (const std::uint64_t key : probe_keys) {
      const auto p = oracle.pair_latest.find({key, epoch});
      want.push_back(p == oracle.pair_latest.end() ? -1 : static_cast<std::int64_t>(p->second));
    }
    got.assign(probe_keys.size(), 0);
    const std::uint64_t one[1] = {epoch};
    q.find_many(probe_keys, one, got.data());
    CHECK(got == want);
  }
  for (const std::uint64_t epoch : probe_epochs) {
    const auto it = oracle.by_epoch.find(epoch);
    CHECK(q.epoch_rows(epoch) ==
          (it == oracle.by_epoch.end() ? std::vector<std::uint64_t>{} : it->second));
  }
  std::vector<EpochCount> want_epochs;
  for (const auto& [epoch, rows] : oracle.by_epoch) want_epochs.push_back({epoch, rows.size()});
  const auto got_epochs = q.epochs();
  REQUIRE(got_epochs.size() == want_epochs.size());
  for (std::size_t i = 0; i < want_epochs.size(); ++i) {
    CHECK(got_epochs[i].epoch == want_epochs[i].epoch);
    CHECK(got_epochs[i].rows == want_epochs[i].rows);
  }
  CHECK(q.distinct_keys() == oracle.by_key.size());
}

constexpr std::uint64_t kMaxKey = ~0ull;

// Rows of keys 0, step, 2 step, .. (`keys` of them) in each epoch of [first_epoch, end_epoch),
// epoch by epoch, as a training run appends them.
void append_epochs(EntriesFile& file, std::uint64_t first_epoch, std::uint64_t end_epoch,
                   std::uint64_t keys, std::uint64_t step) {
  for (std::uint64_t epoch = first_epoch; epoch < end_epoch; ++epoch) {
    for (std::uint64_t key = 0; key < keys; ++key) file.append(key * step, epoch);
  }
}

}  // namespace

TEST_CASE("Key index answers like a std::map at every snapshot, across growth and lagging writers",
          "[key_index]") {
  TempDir dir;
  EntriesFile file(dir / "index.1", 1 << 16);
  std::mt19937_64 rng(GENERATE(1u, 2u, 3u));
  // Keys from a small pool (many versions each) and the edges 0 and 2^64-1.
  std::vector<std::uint64_t> pool = {0, kMaxKey, 1, kMaxKey - 1};
  for (int i = 0; i < 1500; ++i) pool.push_back(rng());
  const std::vector<std::uint64_t> epochs_pool = {0, 1, 2, 3, 7, kMaxKey};

  std::uint64_t generation = 1;
  auto index = KeyIndexFile::create(dir.path(), generation, identity(), {}, 0);
  index->publish_as_current(dir.path());
  std::vector<std::shared_ptr<KeyIndexFile>> old_generations;
  int growths = 0;
  for (int round = 0; round < 40; ++round) {
    const std::uint64_t batch = 1 + rng() % 300;
    for (std::uint64_t i = 0; i < batch; ++i) {
      file.append(pool[rng() % pool.size()], epochs_pool[rng() % epochs_pool.size()]);
    }
    // Some batches are left unindexed, as by a writer killed after publishing.
    if (rng() % 4 != 0) {
      const bool complete = index->index_rows(file.entries(), file.rows());
      if (!complete || index->wants_growth()) {
        // Growth: a larger generation built from the offset index; the old one stays readable.
        auto next = KeyIndexFile::create(dir.path(), ++generation, identity(), index->next_sizes(),
                                         file.rows());
        REQUIRE(next->index_rows(file.entries(), file.rows()));
        next->publish_as_current(dir.path());
        old_generations.push_back(index);
        index = next;
        ++growths;
      }
    }
    const std::uint64_t committed = file.rows();
    const std::uint64_t snapshot = rng() % (committed + 1);
    std::vector<std::uint64_t> keys = {0, kMaxKey, 12345};
    for (int i = 0; i < 20; ++i) keys.push_back(pool[rng() % pool.size()]);
    std::vector<std::uint64_t> epochs = {epochs_pool[rng() % epochs_pool.size()], 5};
    check_against_oracle(KeyQuery(index.get(), file.entries(), snapshot), file, snapshot, keys,
                         epochs);
    check_against_oracle(KeyQuery(index.get(), file.entries(), committed), file, committed, keys,
                         epochs);
    // No index at all: the scan gives the same answers.
    check_against_oracle(KeyQuery(nullptr, file.entries(), snapshot), file, snapshot, keys, epochs);
    // Old generations, whose watermark stopped, still answer for any snapshot.
    for (const auto& old : old_generations) {
      check_against_oracle(KeyQuery(old.get(), file.entries(), committed), file, committed, keys,
                           epochs);
    }
  }
  CHECK(growths >= 2);
  index->index_rows(file.entries(), file.rows());
  std::string problem;
  CHECK(index->check(file.entries(), file.rows(), &problem) == 0);
  INFO(problem);
}

TEST_CASE("Key index: history looks a key up in every epoch at once, and proves the answer",
          "[key_index]") {
  TempDir dir;
  EntriesFile file(dir / "index.1", 1 << 14);
  auto index = KeyIndexFile::create(dir.path(), 1, identity(), {4096, 1024, 1024}, 0);
  // 200 keys (0 and 2^64-1 among them) in epochs 0..9, one row per (key, epoch), appended
  // epoch by epoch as a training run does; keys 0..49 skip the odd epochs.
  std::vector<std::uint64_t> keys = {0, kMaxKey};
  for (std::uint64_t k = 1; k < 199; ++k) keys.push_back(k * 0x9e3779b97f4a7c15ull);
  for (std::uint64_t epoch = 0; epoch < 10; ++epoch) {
    for (std::size_t i = 0; i < keys.size(); ++i) {
      if (i < 50 && epoch % 2 == 1) continue;
      file.append(keys[i], epoch);
    }
  }
  REQUIRE(index->index_rows(file.entries(), file.rows()));
  auto expect = [&](std::uint64_t key, std::uint64_t snapshot) {
    std::vector<std::uint64_t> rows;
    for (std::uint64_t r = 0; r < snapshot; ++r) {
      if (file.pairs()[r].first == key) rows.push_back(r);
    }
    return rows;
  };
  for (const std::uint64_t snapshot : {file.rows(), file.rows() / 2, std::uint64_t{1}}) {
    const KeyQuery q(index.get(), file.entries(), snapshot);
    for (const std::uint64_t key : keys) {
      INFO("key " << key << " snapshot " << snapshot);
      bool from_slots = false;
      const auto by_epochs = q.history_by_epochs(key, nullptr, &from_slots);
      REQUIRE(by_epochs.has_value());  // No duplicates and every epoch known: it answers.
      CHECK(*by_epochs == expect(key, snapshot));
      CHECK(q.history(key) == expect(key, snapshot));
      // With every row in the snapshot, the pair slots prove it alone (one round of loads). In
      // an earlier snapshot the slots of later rows name rows past it: the chain proves it.
      if (snapshot == file.rows()) CHECK(from_slots);
    }
    CHECK(q.history_by_epochs(12345) == std::vector<std::uint64_t>{});  // Never stored.
  }

  // A (key, epoch) stored twice: the pair table names only the later row, so the proof fails
  // and history() follows the chain, which has both.
  file.append(keys[7], 2);
  // A new epoch after the hint was made: the hint is made again (epochs_used changed).
  file.append(keys[8], 10);
  REQUIRE(index->index_rows(file.entries(), file.rows()));
  {
    const KeyQuery q(index.get(), file.entries(), file.rows());
    bool from_slots = true;
    CHECK_FALSE(q.history_by_epochs(keys[7], nullptr, &from_slots).has_value());
    CHECK_FALSE(from_slots);  // Its slot of epoch 2 is marked repeated.
    CHECK(q.history(keys[7]) == expect(keys[7], file.rows()));
    const auto eight = q.history_by_epochs(keys[8], nullptr, &from_slots);
    REQUIRE(eight.has_value());
    CHECK(from_slots);
    CHECK(*eight == expect(keys[8], file.rows()));
    CHECK(eight->size() == 6);  // Epochs 0, 2, 4, 6, 8 and 10.
  }

  // More epochs than it probes at once: it declines, and history() follows the chain.
  for (std::uint64_t epoch = 11; epoch <= KeyQuery::kHistoryEpochProbes + 1; ++epoch) {
    file.append(keys[9], epoch);
  }
  REQUIRE(index->index_rows(file.entries(), file.rows()));
  const KeyQuery q(index.get(), file.entries(), file.rows());
  CHECK_FALSE(q.history_by_epochs(keys[9]).has_value());
  CHECK(q.history(keys[9]) == expect(keys[9], file.rows()));
  CHECK(q.history(keys[9]).size() == 5 + KeyQuery::kHistoryEpochProbes - 9);  // 0, 2, .., 8, 11..65
}

TEST_CASE("Key index: history from the pair slots alone needs every epoch in its hint",
          "[key_index]") {
  // A hint that lacks an epoch would leave that epoch's rows out of an answer the slots prove.
  // The hint knows it is complete only when it saw as many epoch slots as the header counts:
  // with one epoch slot lost (zeroed in the file), history is still every row, through the
  // chain.
  TempDir dir;
  EntriesFile file(dir / "index.1", 4096);
  append_epochs(file, 0, 6, 100, 7919);
  const KeyIndexSizes sizes{4096, 1024, 1024};
  auto index = KeyIndexFile::create(dir.path(), 1, identity(), sizes, 0);
  REQUIRE(index->index_rows(file.entries(), file.rows()));
  index->publish_as_current(dir.path());
  // FORMAT.md "keys.K": the epoch table follows 16-byte pair slots and 8-byte key slots; a slot
  // holds row + 1 in bits 0..40. Epoch 2's slot names its last row, 299.
  const std::uint64_t epoch_table = 4096 + 16 * sizes.pair_slots + 8 * sizes.key_slots;
  std::ifstream in(dir / "keys.1", std::ios::binary);
  std::vector<std::uint64_t> words(sizes.epoch_slots);
  in.seekg(static_cast<std::streamoff>(epoch_table));
  in.read(reinterpret_cast<char*>(words.data()), static_cast<std::streamsize>(8 * words.size()));
  REQUIRE(in.good());
  std::size_t lost = words.size();
  for (std::size_t i = 0; i < words.size(); ++i) {
    if (words[i] != 0 && (words[i] & ((1ull << 41) - 1)) == 300) lost = i;
  }
  REQUIRE(lost < words.size());
  {
    const KeyQuery q(index.get(), file.entries(), file.rows());
    bool from_slots = false;
    REQUIRE(q.history_by_epochs(7919 * 5, nullptr, &from_slots).has_value());
    CHECK(from_slots);
  }
  embstore::test::write_bytes(dir / "keys.1", epoch_table + 8 * lost, std::string(8, '\0'));
  // A fresh file view: the hint of the one above was made before the loss.
  auto reopened = KeyIndexFile::open(dir.path(), 1, identity(), os::Access::kReadOnly);
  const KeyQuery q(reopened.get(), file.entries(), file.rows());
  for (std::uint64_t key = 0; key < 100; ++key) {
    INFO("key " << key * 7919);
    bool from_slots = true;
    const auto by_epochs = q.history_by_epochs(key * 7919, nullptr, &from_slots);
    CHECK_FALSE(from_slots);
    const std::vector<std::uint64_t> want = {key,       100 + key, 200 + key,
                                             300 + key, 400 + key, 500 + key};
    if (by_epochs) CHECK(*by_epochs == want);
    CHECK(q.history(key * 7919) == want);
  }
}

TEST_CASE("Key index is reopened from its file with the same answers", "[key_index]") {
  TempDir dir;
  EntriesFile file(dir / "index.1", 4096);
  for (std::uint64_t r = 0; r < 3000; ++r) file.append(r % 700, r / 700);
  {
    auto index = KeyIndexFile::create(dir.path(), 1, identity(), {8192, 1024, 1024}, 100);
    REQUIRE(index->index_rows(file.entries(), 2000));
    index->publish_as_current(dir.path());
  }
  auto reader = KeyIndexFile::open(dir.path(), 1, identity(), os::Access::kReadOnly);
  CHECK(reader->indexed_rows() == 2000);
  CHECK(reader->built_in_current_boot());
  check_against_oracle(KeyQuery(reader.get(), file.entries(), 3000), file, 3000, {0, 5, 699, 700},
                       {0, 1, 4, 5});
  // A writer continues where it stopped; a reader mapped before that follows the longer chain.
  auto writer = KeyIndexFile::open(dir.path(), 1, identity(), os::Access::kReadWrite);
  REQUIRE(writer->index_rows(file.entries(), 3000));
  check_against_oracle(KeyQuery(reader.get(), file.entries(), 3000), file, 3000, {0, 5, 699},
                       {0, 4});
  std::string problem;
  CHECK(reader->check(file.entries(), 3000, &problem) == 0);
}

TEST_CASE("Key index refuses missing, damaged and foreign files with a named error",
          "[key_index]") {
  TempDir dir;
  EntriesFile file(dir / "index.1", 1024);
  for (std::uint64_t r = 0; r < 100; ++r) file.append(r, 0);
  {
    auto index = KeyIndexFile::create(dir.path(), 1, identity(), {}, 100);
    REQUIRE(index->index_rows(file.entries(), 100));
    index->publish_as_current(dir.path());
  }
  // The error code of opening keys.1, or nothing when it opens.
  auto code_of = [&](const KeyIndexIdentity& id) -> std::optional<ErrorCode> {
    try {
      KeyIndexFile::open(dir.path(), 1, id, os::Access::kReadOnly);
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("keys.1") != std::string::npos);
      return e.code();
    }
    return std::nullopt;
  };
  CHECK(!code_of(identity()).has_value());
  SECTION("another store") {
    KeyIndexIdentity other = identity();
    other.store_id[3] ^= 1;
    CHECK(code_of(other) == ErrorCode::kCorruption);
  }
  SECTION("another generation of the store") {
    KeyIndexIdentity other = identity();
    other.store_generation = 2;
    CHECK(code_of(other) == ErrorCode::kCorruption);
  }
  SECTION("a flipped header byte") {
    embstore::test::write_bytes(dir / "keys.1", 50, "\x7f");
    CHECK(code_of(identity()) == ErrorCode::kCorruption);
  }
  SECTION("a truncated file") {
    REQUIRE(::truncate((dir / "keys.1").c_str(), 2048) == 0);
    CHECK(code_of(identity()) == ErrorCode::kCorruption);
  }
  SECTION("a watermark beyond the chain") {
    const std::string huge(8, '\xff');
    embstore::test::write_bytes(dir / "keys.1", offsetof(KeyIndexHeader, indexed_rows), huge);
    CHECK(code_of(identity()) == ErrorCode::kCorruption);
  }
  SECTION("no file") {
    os::remove_file(dir / "keys.1");
    CHECK(code_of(identity()) == ErrorCode::kNotFound);
  }
}

TEST_CASE(
    "Key index check() finds damaged slots and chain records, and lookups stay correct or "
    "report corruption",
    "[key_index]") {
  TempDir dir;
  EntriesFile file(dir / "index.1", 8192);
  for (std::uint64_t r = 0; r < 4999; ++r) file.append(r % 500, r / 500);
  file.append(7, 3);  // Row 4999 repeats the pair of row 1507: its slot is marked repeated.
  auto index = KeyIndexFile::create(dir.path(), 1, identity(), {16384, 2048, 1024}, 5000);
  REQUIRE(index->index_rows(file.entries(), 5000));
  index->publish_as_current(dir.path());  // Named keys.1, so that the sections can damage it.
  std::string problem;
  REQUIRE(index->check(file.entries(), 5000, &problem) == 0);
  // FORMAT.md "keys.K": 16-byte pair slots, 8-byte key and epoch slots, then the chain.
  const std::uint64_t chain_offset = 4096 + 16 * index->sizes().pair_slots +
                                     8 * (index->sizes().key_slots + index->sizes().epoch_slots);
  SECTION("a chain record overwritten") {
    embstore::test::write_bytes(dir / "keys.1", round_up(chain_offset, 4096) + 16 * 4000 + 3,
                                "\x55");
  }
  SECTION("a page of the pair table zeroed") {
    embstore::test::write_bytes(dir / "keys.1", 4096 * 3, std::string(4096, '\0'));
  }
  // A pair slot's word1 holds row + 1 in bits 0..40 and the repeated mark in bit 41 (byte 5,
  // bit 1): flip the mark of the slot naming `row`.
  auto flip_repeated = [&](std::uint64_t row) {
    std::ifstream in(dir / "keys.1", std::ios::binary);
    std::vector<std::uint64_t> words(2 * index->sizes().pair_slots);
    in.seekg(4096);
    in.read(reinterpret_cast<char*>(words.data()), static_cast<std::streamsize>(8 * words.size()));
    REQUIRE(in.good());
    for (std::size_t i = 1; i < words.size(); i += 2) {
      if ((words[i] & ((1ull << 41) - 1)) != row + 1) continue;
      const char byte = static_cast<char>((words[i] >> 40 & 0xff) ^ 0x02);
      embstore::test::write_bytes(dir / "keys.1", 4096 + 8 * i + 5, std::string(1, byte));
      return;
    }
    FAIL("no pair slot names row " << row);
  };
  SECTION("a repeated pair's slot not marked so (a history from the slots would miss a row)") {
    flip_repeated(4999);
  }
  SECTION("a pair slot marked repeated that is not") { flip_repeated(4998); }
  SECTION("a pair slot made up for a pair with no row, naming another key's row") {
    // An empty slot (word1 0) given key 123456789 (never stored) at epoch 3 and row 10 (key 10,
    // epoch 0): no lookup of a stored pair meets it, only a pass over the table does.
    std::ifstream in(dir / "keys.1", std::ios::binary);
    std::vector<std::uint64_t> words(2 * index->sizes().pair_slots);
    in.seekg(4096);
    in.read(reinterpret_cast<char*>(words.data()), static_cast<std::streamsize>(8 * words.size()));
    REQUIRE(in.good());
    std::size_t empty = 1;
    while (words[empty] != 0) empty += 2;
    const std::uint64_t slot[2] = {123456789, (3ull << 42) | 11};
    embstore::test::write_bytes(dir / "keys.1", 4096 + 8 * (empty - 1),
                                std::string(reinterpret_cast<const char*>(slot), sizeof(slot)));
  }
  CHECK(index->check(file.entries(), 5000, &problem) > 0);
  CHECK(problem.find("keys.1") != std::string::npos);
  // Whatever a damaged index answers is never another key's row nor past the snapshot.
  const KeyQuery q(index.get(), file.entries(), 4500);
  for (std::uint64_t key = 0; key < 500; ++key) {
    try {
      for (const std::uint64_t row : q.history(key)) {
        CHECK(row < 4500);
        CHECK(file.pairs()[row].first == key);
      }
      const auto found = q.find(key, 3);
      if (found) CHECK(file.pairs()[*found] == std::make_pair(key, std::uint64_t{3}));
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kCorruption);
    }
  }
}

TEST_CASE(
    "Key index files stay within 112 bytes a row and 160 KiB, however growth and appends meet",
    "[key_index][storage]") {
  // FORMAT.md "keys.K": between growths the file takes at most 112 * rows + 160 KiB. The sizes a
  // growth picks depend on how far the writer got before the growth ran (a batch that fills the
  // tables, appends that go on while the larger generation is built): each order is played here
  // through a writer's KeyIndexHandle, on shapes that fill every table.
  struct Shape {
    const char* name;
    std::uint64_t (*key)(std::uint64_t row);
    std::uint64_t (*epoch)(std::uint64_t row);
  };
  const Shape shapes[] = {
      {"a new key every row, one epoch",
       [](std::uint64_t r) -> std::uint64_t { return r * 0x9e3779b97f4a7c15ull; },
       [](std::uint64_t) { return std::uint64_t{0}; }},
      {"a new key and a new epoch every row", [](std::uint64_t r) { return r; },
       [](std::uint64_t r) { return r + 1000; }},
      {"ten epochs of each key", [](std::uint64_t r) { return r / 10; },
       [](std::uint64_t r) { return r % 10; }},
  };
  // Rows when the writer opens, then per round: rows published (after_publish) and rows appended
  // more while the growth builds (what its source reports to build_next).
  struct Timing {
    std::uint64_t opened;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> rounds;
  };
  const Timing timings[] = {
      {0, {{8, 0}, {1000, 0}, {20000, 0}, {100000, 0}}},
      {26109, {{100000, 0}}},
      {26109, {{100000, 60000}}},
      {20000, {{1, 0}, {3000, 150000}, {5, 40000}}},
      {0, {{50000, 200000}}},
  };
  for (const Shape& shape : shapes) {
    for (const Timing& timing : timings) {
      TempDir dir;
      EntriesFile file(dir / "index.1", 1 << 19);
      auto append_to = [&](std::uint64_t rows) {
        while (file.rows() < rows) file.append(shape.key(file.rows()), shape.epoch(file.rows()));
      };
      std::uint64_t key_generation = 0;
      KeyIndexHandle handle(dir.path(), identity(), &key_generation, os::Access::kReadWrite);
      // The whole directory's keys.* files, by allocated blocks (as storage_test counts them).
      auto key_index_bytes = [&] {
        std::uint64_t bytes = 0;
        for (const std::string& name : os::list_dir(dir.path())) {
          struct stat st {};
          if (name.rfind("keys.", 0) == 0 && ::stat((dir / name).c_str(), &st) == 0) {
            bytes += static_cast<std::uint64_t>(st.st_blocks) * 512;
          }
        }
        return bytes;
      };
      auto check_bound = [&](const char* when) {
        const std::uint64_t rows = file.rows();
        INFO(shape.name << ", opened at " << timing.opened << ": " << when << ", " << rows
                        << " rows, generation " << key_generation);
        CHECK(key_index_bytes() <= 112 * rows + (160 << 10));
      };
      append_to(timing.opened);
      handle.open_for_writer(file.entries(), file.rows());
      check_bound("opened");
      for (const auto& [published, during_growth] : timing.rounds) {
        append_to(file.rows() + published);
        bool claimed = handle.after_publish(file.entries(), file.rows());
        check_bound("published");
        std::atomic<bool> stop{false};
        const std::atomic<std::uint64_t> appending{0};
        std::uint64_t extra = during_growth;
        while (claimed) {
          append_to(file.rows() + extra);
          extra = 0;
          auto next = handle.build_next(
              [&] {
                return KeyIndexHandle::Rows{file.entries(), file.rows()};
              },
              stop, appending);
          REQUIRE(next);
          std::shared_ptr<const KeyIndexFile> retired;
          claimed = handle.finish_growth(next, file.entries(), file.rows(), retired);
          CHECK(retired);
          CHECK(retired != handle.current());
          retired.reset();  // The old file's last holder: unmapped here.
          check_bound("grown");
        }
      }
      // And the index it left answers every row.
      const auto current = handle.current();
      REQUIRE(current);
      std::string problem;
      CHECK(current->check(file.entries(), file.rows(), &problem) == 0);
      INFO(problem);
      CHECK(current->indexed_rows() == file.rows());
    }
  }
}

TEST_CASE("Key index growth is sized for the rows it builds, and at close for the rows stored then",
          "[key_index]") {
  // A growth is claimed when a table passes 11/16 full, but appends go on until its thread
  // builds, and while it builds. Sized only for the rows at the claim, the new tables were
  // already too full when published, and a second growth rebuilt everything at once (the close
  // of a short-row run waited for both).
  TempDir dir;
  EntriesFile file(dir / "index.1", 1 << 18);
  auto append_to = [&](std::uint64_t rows) {
    while (file.rows() < rows) file.append(file.rows() * 0x9e3779b97f4a7c15ull, 3);
  };
  std::uint64_t key_generation = 0;
  KeyIndexHandle handle(dir.path(), identity(), &key_generation, os::Access::kReadWrite);
  handle.open_for_writer(file.entries(), 0);
  // Claimed at 704 rows + 1 (1,024 pair slots past 11/16), as the writer that indexed it does.
  append_to(705);
  bool claimed = handle.after_publish(file.entries(), file.rows());
  // The build finds rows past what twice the claimed size holds under 11/16 (1,408), though not
  // enough to fill it (14/16: 1,792): without sizing for them the new generation would want
  // growing again as soon as it is published.
  const KeyIndexSizes claimed_sizes = handle.current()->next_sizes();
  REQUIRE(claimed_sizes.pair_slots == 2048);
  std::atomic<bool> stop{false};
  std::uint64_t sources = 0;
  std::uint64_t grown_rows = 0;
  SECTION("appends between the claim and the build") {
    const std::atomic<std::uint64_t> appending{0};
    grown_rows = 1600;
    append_to(grown_rows);
    REQUIRE(claimed);
    auto next = handle.build_next(
        [&] {
          ++sources;
          return KeyIndexHandle::Rows{file.entries(), file.rows()};
        },
        stop, appending);
    REQUIRE(next);
    CHECK(next->sizes().pair_slots >= key_index_slots_for(grown_rows));
    std::shared_ptr<const KeyIndexFile> retired;
    claimed = handle.finish_growth(next, file.entries(), file.rows(), retired);
  }
  SECTION("the writer closes while the build is too small for the rows stored") {
    // The build starts at 705 rows (what the source gives first); the writer then closes with
    // 200,000 rows stored. The build is given up after its first step and begun again at the
    // size they want, instead of being finished, published and grown again.
    grown_rows = 200000;
    append_to(grown_rows);
    REQUIRE(claimed);
    const std::atomic<std::uint64_t> closing{grown_rows};
    auto next = handle.build_next(
        [&] {
          return KeyIndexHandle::Rows{file.entries(), ++sources == 1 ? 705 : file.rows()};
        },
        stop, closing);
    REQUIRE(next);
    CHECK(sources >= 2);
    CHECK(next->sizes().pair_slots == key_index_slots_for(grown_rows));
    std::shared_ptr<const KeyIndexFile> retired;
    claimed = handle.finish_growth(next, file.entries(), file.rows(), retired);
  }
  CHECK_FALSE(claimed);  // No second growth.
  const auto current = handle.current();
  REQUIRE(current);
  CHECK(current->indexed_rows() == grown_rows);
  CHECK_FALSE(current->wants_growth());
  std::string problem;
  CHECK(current->check(file.entries(), file.rows(), &problem) == 0);
  INFO(problem);
  // Within the file's bound (FORMAT.md: 112 bytes a row and 160 KiB).
  struct stat st {};
  REQUIRE(::stat(current->path().c_str(), &st) == 0);
  CHECK(static_cast<std::uint64_t>(st.st_blocks) * 512 <= 112 * grown_rows + (160 << 10));
}

TEST_CASE("Key index: a writer told the rows to expect builds and grows for them at once",
          "[key_index]") {
  // WriterOptions::expected_rows: without it the tables start at 1,024 slots and every doubling
  // indexes every row again (7 growths on the way to 200,000 rows in `embstore bench`).
  TempDir dir;
  constexpr std::uint64_t kExpected = 50000;
  EntriesFile file(dir / "index.1", 1 << 17);
  auto append_to = [&](std::uint64_t rows) {
    while (file.rows() < rows) file.append(file.rows() * 0x9e3779b97f4a7c15ull, 3);
  };
  std::uint64_t key_generation = 0;
  auto file_bytes = [&](const KeyIndexFile& index) {
    struct stat st {};
    REQUIRE(::stat(index.path().c_str(), &st) == 0);
    return static_cast<std::uint64_t>(st.st_blocks) * 512;
  };
  SECTION("a generation built from nothing holds the expected rows without a growth") {
    KeyIndexHandle handle(dir.path(), identity(), &key_generation, os::Access::kReadWrite);
    handle.set_expected_rows(kExpected);
    handle.open_for_writer(file.entries(), 0);
    REQUIRE(handle.current());
    CHECK(handle.current()->sizes().pair_slots == key_index_slots_for(kExpected));
    CHECK(handle.current()->sizes().key_slots == key_index_slots_for(kExpected));
    bool claimed = false;
    while (file.rows() < kExpected && !claimed) {
      append_to(std::min(kExpected, file.rows() + 512));
      claimed = handle.after_publish(file.entries(), file.rows());
    }
    CHECK_FALSE(claimed);
    CHECK(key_generation == 1);
    CHECK(handle.current()->indexed_rows() == kExpected);
    CHECK_FALSE(handle.current()->wants_growth());
    std::string problem;
    CHECK(handle.current()->check(file.entries(), file.rows(), &problem) == 0);
    INFO(problem);
    // The file's bound (FORMAT.md "File sizes"), counted for the rows expected.
    CHECK(file_bytes(*handle.current()) <= 112 * kExpected + (160 << 10));
    // Rows past the guess grow the tables as usual.
    while (!claimed) {
      append_to(file.rows() + 512);
      claimed = handle.after_publish(file.entries(), file.rows());
    }
    CHECK(file.rows() > kExpected);
  }
  SECTION("without a guess (the control), the same rows need growths") {
    KeyIndexHandle handle(dir.path(), identity(), &key_generation, os::Access::kReadWrite);
    handle.open_for_writer(file.entries(), 0);
    CHECK(handle.current()->sizes().pair_slots == kMinSlots);
    append_to(705);
    CHECK(handle.after_publish(file.entries(), file.rows()));
  }
  SECTION("a store whose tables are small grows straight to the expected size") {
    {
      KeyIndexHandle first(dir.path(), identity(), &key_generation, os::Access::kReadWrite);
      first.open_for_writer(file.entries(), 0);
      append_to(600);
      CHECK_FALSE(first.after_publish(file.entries(), file.rows()));
    }
    KeyIndexHandle handle(dir.path(), identity(), &key_generation, os::Access::kReadWrite);
    handle.set_expected_rows(kExpected);
    handle.open_for_writer(file.entries(), file.rows());
    REQUIRE(handle.current()->sizes().pair_slots == kMinSlots);  // Opened, not rebuilt.
    append_to(705);
    REQUIRE(handle.after_publish(file.entries(), file.rows()));
    const std::atomic<bool> stop{false};
    const std::atomic<std::uint64_t> appending{0};
    auto next = handle.build_next(
        [&] {
          return KeyIndexHandle::Rows{file.entries(), file.rows()};
        },
        stop, appending);
    REQUIRE(next);
    CHECK(next->sizes().pair_slots == key_index_slots_for(kExpected));
    CHECK(next->sizes().key_slots == key_index_slots_for(kExpected));
    std::shared_ptr<const KeyIndexFile> retired;
    CHECK_FALSE(handle.finish_growth(next, file.entries(), file.rows(), retired));
    append_to(kExpected);
    CHECK_FALSE(handle.after_publish(file.entries(), file.rows()));  // No second growth.
    std::string problem;
    CHECK(handle.current()->check(file.entries(), file.rows(), &problem) == 0);
    INFO(problem);
  }
}

TEST_CASE("Key index: an epoch counted twice by a killed writer's redo asks for a rebuild",
          "[key_index]") {
  // A writer killed between raising epochs_used for a new epoch and storing its slot leaves the
  // count one too high once the next writer indexes the row again. Readers then never see as
  // many epoch slots as counted: answers stay exact (through the chain), but history never
  // answers from the pair slots alone. The writer that redoes the row notices and asks for the
  // next generation, which counts exactly.
  TempDir dir;
  EntriesFile file(dir / "index.1", 4096);
  append_epochs(file, 0, 3, 100, 31);
  auto index = KeyIndexFile::create(dir.path(), 1, identity(), {4096, 1024, 1024}, 0);
  REQUIRE(index->index_rows(file.entries(), file.rows()));
  index->publish_as_current(dir.path());
  CHECK_FALSE(index->wants_growth());
  append_epochs(file, 3, 4, 100, 31);
  // The dead writer indexed row 300, the first of epoch 3: its chain record, pair and key slots,
  // epochs_used raised to 4, and then (killed) neither the epoch slot nor the watermark. Made
  // here by indexing row 300 and undoing those two: the slot naming row 300 in the epoch table
  // (after the header, 4096 pair slots of 16 bytes and 1024 key slots of 8: FORMAT.md) and
  // indexed_rows (header offset 128) back to 300.
  REQUIRE(index->index_rows(file.entries(), 301));
  {
    const std::string path = dir / "keys.1";
    const std::uint64_t epoch_table = 4096 + 16 * 4096 + 8 * 1024;
    std::ifstream in(path, std::ios::binary);
    std::vector<std::uint64_t> slots(1024);
    in.seekg(static_cast<std::streamoff>(epoch_table));
    in.read(reinterpret_cast<char*>(slots.data()), 8 * 1024);
    REQUIRE(in);
    bool found = false;
    for (std::uint64_t i = 0; i < slots.size(); ++i) {
      if ((slots[i] & ((std::uint64_t{1} << 41) - 1)) != 301) continue;
      embstore::test::write_bytes(path, epoch_table + 8 * i, std::string(8, '\0'));
      found = true;
    }
    REQUIRE(found);
    const std::uint64_t three_hundred = 300;
    embstore::test::write_bytes(path, 128,
                                std::string(reinterpret_cast<const char*>(&three_hundred), 8));
  }
  REQUIRE(index->index_rows(file.entries(), file.rows()));
  CHECK(index->epochs_overcounted());  // the redo counted epoch 3 again
  CHECK(index->wants_growth());        // No table is past its load factor: only the count asks.
  std::vector<std::uint64_t> want;
  for (std::uint64_t epoch = 0; epoch < 4; ++epoch) want.push_back(epoch * 100 + 7);
  {
    const KeyQuery q(index.get(), file.entries(), file.rows());
    bool from_slots = true;
    const auto by_epochs = q.history_by_epochs(7 * 31, nullptr, &from_slots);
    CHECK_FALSE(from_slots);
    if (by_epochs) CHECK(*by_epochs == want);
    CHECK(q.history(7 * 31) == want);
  }
  auto next = KeyIndexFile::create(dir.path(), 2, identity(), index->next_sizes(), file.rows());
  REQUIRE(next->index_rows(file.entries(), file.rows()));
  CHECK_FALSE(next->epochs_overcounted());
  CHECK_FALSE(next->wants_growth());
  const KeyQuery q(next.get(), file.entries(), file.rows());
  bool from_slots = false;
  const auto by_epochs = q.history_by_epochs(7 * 31, nullptr, &from_slots);
  CHECK(from_slots);
  REQUIRE(by_epochs.has_value());
  CHECK(*by_epochs == want);
}

TEST_CASE("Key index: a writer killed while indexing leaves work the next one redoes",
          "[key_index][crash]") {
  if (!testing::kEnabled) return;
  TempDir dir;
  EntriesFile file(dir / "index.1", 1 << 15);
  std::mt19937_64 rng(7);
  for (std::uint64_t r = 0; r < 20000; ++r) file.append(rng() % 3000, rng() % 5);
  {
    auto index = KeyIndexFile::create(dir.path(), 1, identity(), {32768, 8192, 1024}, 0);
    REQUIRE(index->index_rows(file.entries(), 500));
    index->publish_as_current(dir.path());
  }
  for (const std::uint64_t nth : {1, 3, 7, 12}) {
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      try {
        testing::arm_crash("mid-key-index", nth);
        auto index = KeyIndexFile::open(dir.path(), 1, identity(), os::Access::kReadWrite);
        index->index_rows(file.entries(), 500 + nth * 1500);
      } catch (...) {
        ::_exit(2);
      }
      ::_exit(0);
    }
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    CHECK(WIFSIGNALED(status));
    auto reader = KeyIndexFile::open(dir.path(), 1, identity(), os::Access::kReadOnly);
    // The watermark never claims what the dead writer did not finish; lookups stay exact.
    CHECK(reader->indexed_rows() <= 500 + nth * 1500);
    check_against_oracle(KeyQuery(reader.get(), file.entries(), file.rows()), file, file.rows(),
                         {0, 1, 2999, 77}, {0, 4});
  }
  auto index = KeyIndexFile::open(dir.path(), 1, identity(), os::Access::kReadWrite);
  bool complete = index->index_rows(file.entries(), file.rows());
  while (!complete) {  // Tables sized for 500 rows fill up: grow as a writer would.
    auto next = KeyIndexFile::create(dir.path(), index->generation() + 1, identity(),
                                     index->next_sizes(), file.rows());
    complete = next->index_rows(file.entries(), file.rows());
    next->publish_as_current(dir.path());
    index = next;
  }
  std::string problem;
  CHECK(index->check(file.entries(), file.rows(), &problem) == 0);
  INFO(problem);
}

namespace {

// This process's mappings of the file `path` names (/proc/self/smaps, matched by inode: a file
// mapped while it had no name yet, as a key index is built, is not listed under its name):
// where each starts, its file offset and its VmFlags ("hg": MADV_HUGEPAGE asked for).
struct Vma {
  std::uintptr_t start = 0;
  std::uint64_t offset = 0;
  std::string flags;
};
std::vector<Vma> mappings_of(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  std::ifstream smaps("/proc/self/smaps");
  std::vector<Vma> out;
  std::string line;
  bool in = false;
  while (std::getline(smaps, line)) {
    std::istringstream fields(line);
    std::string range, perms, offset, device;
    std::uint64_t inode = 0;
    // A mapping's first line: "start-end perms offset major:minor inode [path]".
    if (line.find('-') < line.find(' ') && fields >> range >> perms >> offset >> device >> inode &&
        inode == st.st_ino) {
      Vma vma;
      vma.start = std::stoull(range.substr(0, range.find('-')), nullptr, 16);
      vma.offset = std::stoull(offset, nullptr, 16);
      out.push_back(vma);
      in = true;
    } else if (in && line.rfind("VmFlags:", 0) == 0) {
      out.back().flags = line.substr(8);
      in = false;
    }
  }
  return out;
}

// Whether this kernel honours MADV_HUGEPAGE (transparent huge pages not compiled out or off).
bool huge_pages_available() {
  std::ifstream enabled("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string setting;
  return std::getline(enabled, setting) && setting.find("[never]") == std::string::npos;
}

}  // namespace

TEST_CASE(
    "Reservations of 2 MiB or more start on 2 MiB boundaries, and key index tables ask for 2 MiB "
    "pages",
    "[key_index][mapping]") {
  // Every ReservedMapping (data, offset index, key index) of 2 MiB or more starts on a 2 MiB
  // boundary, so the kernel can map a file's 2 MiB folios with one page-table entry each.
  // Smaller ones are placed as the kernel likes (packed: see os::reserve).
  for (const std::uint64_t bytes :
       {std::uint64_t{2} << 20, std::uint64_t{3 << 20} + 4096, std::uint64_t{1} << 30}) {
    TempDir dir;
    const std::string path = dir / "f";
    const int fd = os::create_file(path);
    os::allocate(fd, 0, 8192, path);
    ReservedMapping mapping(bytes, path, os::Access::kReadWrite);
    CHECK(reinterpret_cast<std::uintptr_t>(mapping.base()) % os::kHugePageBytes == 0);
    mapping.map_to(fd, 8192);
    mapping.base()[8191] = std::byte{7};  // Mapped and writable where asked.
    os::close_fd(fd);
  }

  // Tables of 8 MiB (pair slots alone): the writer that creates them and a reader that opens
  // them map the file from a 2 MiB boundary and ask for 2 MiB pages over the tables.
  TempDir dir;
  const KeyIndexSizes sizes{1 << 19, 1 << 16, 1 << 10};
  auto created = KeyIndexFile::create(dir.path(), 1, identity(), sizes, 100);
  created->publish_as_current(dir.path());
  auto reader = KeyIndexFile::open(dir.path(), 1, identity(), os::Access::kReadOnly);
  const std::vector<Vma> vmas = mappings_of(dir / "keys.1");
  REQUIRE(vmas.size() >= 2);  // At least one mapping each, each split where the advice ends.
  int advised_from_start = 0;
  for (const Vma& vma : vmas) {
    if (vma.offset != 0) continue;
    CHECK(vma.start % os::kHugePageBytes == 0);
    if (vma.flags.find(" hg") != std::string::npos) ++advised_from_start;
  }
  if (huge_pages_available()) {
    CHECK(advised_from_start == 2);  // The writer's and the reader's.
  } else {
    WARN("transparent huge pages are off here: the advice is not checked");
  }
  // The chain keeps small pages: no mapping from the last 2 MiB block the tables end in carries
  // the advice (the header and tables: FORMAT.md "keys.K").
  const std::uint64_t tables =
      4096 + 16 * sizes.pair_slots + 8 * (sizes.key_slots + sizes.epoch_slots);
  for (const Vma& vma : vmas) {
    if (vma.offset >= tables / os::kHugePageBytes * os::kHugePageBytes) {
      CHECK(vma.flags.find(" hg") == std::string::npos);
    }
  }
}
