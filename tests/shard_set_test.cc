// Several stores as one: the manifest, ShardSet lookups against a std::map oracle, merge, and
// the Writer's refusal of network file systems.
#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "platform/testing.h"
#include "support/error_code.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::code_of;
using embstore::test::TempDir;

namespace {

CreateOptions opts(std::uint32_t dim, DType dtype = DType::kFloat32) {
  CreateOptions o;
  o.dim = dim;
  o.dtype = dtype;
  o.segment_bytes = 64 * 1024;
  o.metadata = R"({"run": 7})";
  return o;
}

std::string write_text(const std::string& path, const std::string& text) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
  ::close(fd);
  return path;
}

// What each shard holds, row by row; concatenated in shard order it is what a ShardSet must show.
struct Oracle {
  struct Row {
    std::uint64_t key, epoch;
    float value;
  };
  std::vector<Row> rows;                                                  // By global row.
  std::vector<std::size_t> shard_of;                                      // By global row.
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::uint64_t> last;  // (key, epoch) -> row

  static Oracle of(const std::vector<std::vector<Row>>& shards) {
    Oracle oracle;
    for (std::size_t s = 0; s < shards.size(); ++s) {
      for (const Row& row : shards[s]) {
        oracle.last[{row.key, row.epoch}] = oracle.rows.size();
        oracle.rows.push_back(row);
        oracle.shard_of.push_back(s);
      }
    }
    return oracle;
  }

  // The rows merge_stores() writes: the shards merged as sorted sequences by (epoch, shard),
  // one row at a time.
  Oracle merged() const {
    std::vector<std::vector<Row>> by_shard;
    for (std::uint64_t row = 0; row < rows.size(); ++row) {
      if (by_shard.size() <= shard_of[row]) by_shard.resize(shard_of[row] + 1);
      by_shard[shard_of[row]].push_back(rows[row]);
    }
    std::vector<std::size_t> next(by_shard.size(), 0);
    std::vector<Row> out;
    for (;;) {
      std::size_t s = by_shard.size();
      for (std::size_t t = 0; t < by_shard.size(); ++t) {
        if (next[t] < by_shard[t].size() &&
            (s == by_shard.size() || by_shard[t][next[t]].epoch < by_shard[s][next[s]].epoch)) {
          s = t;
        }
      }
      if (s == by_shard.size()) break;
      out.push_back(by_shard[s][next[s]++]);
    }
    return of({out});
  }

  // find(key)'s answer: of each shard's last row of `key`, the one of the highest epoch (ties:
  // the later shard), or kNoRow.
  std::uint64_t latest(std::uint64_t key) const {
    std::map<std::size_t, std::uint64_t> last_in_shard;
    for (std::uint64_t row = 0; row < rows.size(); ++row) {
      if (rows[row].key == key) last_in_shard[shard_of[row]] = row;
    }
    std::uint64_t best = ShardSet::kNoRow;
    for (const auto& [shard, row] : last_in_shard) {
      if (best == ShardSet::kNoRow || rows[row].epoch >= rows[best].epoch) best = row;
    }
    return best;
  }
};

// Appends `n` random rows to each writer (few distinct keys, so duplicates and histories occur,
// and key 2^64-1); dim 4, every element of a row equal to a value unique to it.
void fill(const std::vector<Writer*>& writers, std::vector<std::vector<Oracle::Row>>& shards,
          std::mt19937_64& rng, int n) {
  static float next_value = 0;
  shards.resize(writers.size());
  for (std::size_t s = 0; s < writers.size(); ++s) {
    for (int b = 0; b < n; b += 5) {
      std::vector<std::uint64_t> keys, epochs;
      std::vector<float> values;
      for (int i = 0; i < 5; ++i) {
        keys.push_back(rng() % 40 == 0 ? ~std::uint64_t{0} : rng() % 40);
        epochs.push_back(rng() % 4);
        const float v = next_value++;
        values.insert(values.end(), 4, v);
        shards[s].push_back({keys.back(), epochs.back(), v});
      }
      writers[s]->append(keys, epochs, ConstMatrix{values.data(), DType::kFloat32, 5, 4, 0});
    }
  }
}

void check_against(const ShardSet& set, const Oracle& oracle) {
  REQUIRE(set.size() == oracle.rows.size());
  for (std::uint64_t row = 0; row < set.size(); ++row) {
    const Record record = set.record(row);
    REQUIRE(record.row == row);
    REQUIRE(record.key == oracle.rows[row].key);
    REQUIRE(record.epoch == oracle.rows[row].epoch);
    float value;
    std::memcpy(&value, record.data, sizeof value);
    REQUIRE(value == oracle.rows[row].value);
  }
  std::vector<std::uint64_t> keys, epochs, expected_pairs, expected_latest, expected_epoch1;
  for (std::uint64_t key : {std::uint64_t{0}, std::uint64_t{3}, std::uint64_t{39},
                            std::uint64_t{40}, ~std::uint64_t{0}}) {
    std::vector<ShardSet::Version> history;
    for (std::uint64_t row = 0; row < oracle.rows.size(); ++row) {
      if (oracle.rows[row].key == key) history.push_back({row, oracle.rows[row].epoch});
    }
    const auto got = set.history(key);
    REQUIRE(got.size() == history.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      REQUIRE(got[i].row == history[i].row);
      REQUIRE(got[i].epoch == history[i].epoch);
    }
    const auto latest = set.find(key);
    REQUIRE(latest.has_value() == !history.empty());
    if (latest) REQUIRE(*latest == oracle.latest(key));
    expected_latest.push_back(oracle.latest(key));
    for (std::uint64_t epoch = 0; epoch < 5; ++epoch) {
      auto it = oracle.last.find({key, epoch});
      const auto found = set.find(key, epoch);
      REQUIRE(found.has_value() == (it != oracle.last.end()));
      if (found) REQUIRE(*found == it->second);
      keys.push_back(key);
      epochs.push_back(epoch);
      expected_pairs.push_back(it == oracle.last.end() ? ShardSet::kNoRow : it->second);
    }
    auto it = oracle.last.find({key, 1});
    expected_epoch1.push_back(it == oracle.last.end() ? ShardSet::kNoRow : it->second);
  }
  REQUIRE(set.find_many(keys, epochs) == expected_pairs);
  const std::vector<std::uint64_t> five = {0, 3, 39, 40, ~std::uint64_t{0}};
  REQUIRE(set.find_many(five, std::uint64_t{1}) == expected_epoch1);
  REQUIRE(set.find_many(five) == expected_latest);
  for (std::uint64_t epoch = 0; epoch < 5; ++epoch) {
    std::vector<std::uint64_t> rows;
    for (std::uint64_t row = 0; row < oracle.rows.size(); ++row) {
      if (oracle.rows[row].epoch == epoch) rows.push_back(row);
    }
    REQUIRE(set.epoch_rows(epoch) == rows);
  }
}

Manifest manifest_of(const std::vector<std::string>& names, const TempDir& dir) {
  Manifest manifest;
  manifest.dim = 4;
  manifest.metadata = R"({"run": 7})";
  for (const auto& name : names) {
    const StoreInfo info = read_info(dir / name);
    manifest.shards.push_back({name, info.store_id, info.committed_rows, {}});
  }
  return manifest;
}

}  // namespace

TEST_CASE("A ShardSet over four stores answers like one store, before and after refresh",
          "[shard_set]") {
  TempDir dir;
  std::vector<Writer> writers;
  for (int i = 0; i < 4; ++i) {
    writers.push_back(Writer::create(dir / ("node-" + std::to_string(i)), opts(4)));
  }
  // Shard 2 stays empty: global numbering must step over it.
  const std::vector<Writer*> filled = {&writers[0], &writers[1], &writers[3]};
  std::vector<std::vector<Oracle::Row>> shards;
  std::mt19937_64 rng(7);
  fill(filled, shards, rng, 60);
  shards.insert(shards.begin() + 2, std::vector<Oracle::Row>{});
  write_manifest(dir / kManifestFileName,
                 manifest_of({"node-0", "node-1", "node-2", "node-3"}, dir));
  ShardSet set = ShardSet::open(dir.path());
  REQUIRE(set.shard_count() == 4);
  REQUIRE(set.shard(2).size() == 0);
  REQUIRE(set.shard_first_row(2) == set.shard_first_row(3));
  REQUIRE(set.locate(set.shard_first_row(3)).shard == 3);
  REQUIRE(set.metadata() == R"({"run": 7})");
  check_against(set, Oracle::of(shards));

  // More rows in every shard: the set sees none until refresh, then all, renumbered.
  std::vector<std::vector<Oracle::Row>> more;
  fill(filled, more, rng, 40);
  for (std::size_t s : {0, 1, 2}) {
    shards[s == 2 ? 3 : s].insert(shards[s == 2 ? 3 : s].end(), more[s].begin(), more[s].end());
  }
  REQUIRE(set.size() == 180);
  REQUIRE(set.refresh() == 300);
  check_against(set, Oracle::of(shards));
  REQUIRE(code_of([&] { set.locate(set.size()); }) == ErrorCode::kInvalidArgument);
  std::vector<std::uint64_t> one = {1};
  std::vector<std::uint64_t> two = {1, 2};
  REQUIRE(code_of([&] { set.find_many(one, two); }) == ErrorCode::kInvalidArgument);
}

TEST_CASE("A manifest round-trips and is replaced atomically", "[shard_set]") {
  TempDir dir;
  Manifest manifest;
  manifest.dim = 8;
  manifest.dtype = DType::kBFloat16;
  manifest.metadata = "quote \" and \\ and \n newline";
  manifest.shards.push_back({"node-0", std::string(32, 'a'), 10, {0, 1, 2}, 3});
  manifest.shards.push_back({"nodes/host-b", std::string(32, 'b'), 0, {}});
  const std::string path = dir / "m.json";
  write_manifest(path, manifest);
  manifest.shards[0].rows = 20;
  write_manifest(path, manifest);  // Over the old one.
  const Manifest back = read_manifest(path);
  REQUIRE(back.dim == 8);
  REQUIRE(back.dtype == DType::kBFloat16);
  REQUIRE(back.metadata == manifest.metadata);
  REQUIRE(back.shards.size() == 2);
  REQUIRE(back.shards[0].rows == 20);
  REQUIRE(back.shards[0].epochs == std::vector<std::uint64_t>{0, 1, 2});
  REQUIRE(back.shards[1].path == "nodes/host-b");
  REQUIRE(back.shards[0].generation == 3);
  REQUIRE(back.shards[1].generation == 0);  // Not recorded: no field written.
  REQUIRE(test::read_file(path).find("\"generation\": 3") != std::string::npos);
  REQUIRE(test::read_file(path).find("\"generation\": 0") == std::string::npos);
  REQUIRE(test::read_file(path).find(".tmp") == std::string::npos);
}

TEST_CASE("write_manifest refuses text that is not UTF-8 naming the field", "[shard_set]") {
  TempDir dir;
  const std::string latin1 = "caf\xe9";
  Manifest manifest;
  manifest.dim = 4;
  manifest.metadata = "model " + latin1;
  std::string message;
  REQUIRE(code_of([&] { write_manifest(dir / "m.json", manifest); }, &message) ==
          ErrorCode::kInvalidArgument);
  CHECK(message.find(dir / "m.json: metadata is not UTF-8") != std::string::npos);
  manifest.metadata = "caf\u00e9";  // UTF-8: written, and read back as written.
  manifest.shards.push_back({"node-" + latin1, std::string(32, 'a'), 0, {}});
  REQUIRE(code_of([&] { write_manifest(dir / "m.json", manifest); }, &message) ==
          ErrorCode::kInvalidArgument);
  CHECK(message.find("shards[0].path is not UTF-8") != std::string::npos);
  manifest.shards[0].path = "node-0";
  manifest.shards[0].store_id = latin1;
  REQUIRE(code_of([&] { write_manifest(dir / "m.json", manifest); }, &message) ==
          ErrorCode::kInvalidArgument);
  CHECK(message.find("shards[0].store_id is not UTF-8") != std::string::npos);
  CHECK(!std::filesystem::exists(dir / "m.json"));
  manifest.shards[0].store_id = std::string(32, 'a');
  write_manifest(dir / "m.json", manifest);
  CHECK(read_manifest(dir / "m.json").metadata == manifest.metadata);
}

TEST_CASE("write_manifest refuses what read_manifest would refuse", "[shard_set]") {
  TempDir dir;
  const std::string path = dir / "m.json";
  Manifest manifest;
  manifest.shards.push_back({"node-0", std::string(32, 'a'), 0, {}});
  std::string message;
  for (const std::uint32_t dim : {0u, kMaxDim + 1}) {
    manifest.dim = dim;
    REQUIRE(code_of([&] { write_manifest(path, manifest); }, &message) ==
            ErrorCode::kInvalidArgument);
    CHECK_THAT(message, Catch::StartsWith(path + ": dim is " + std::to_string(dim)));
  }
  manifest.dim = 4;
  manifest.dtype = static_cast<DType>(99);
  REQUIRE(code_of([&] { write_manifest(path, manifest); }, &message) ==
          ErrorCode::kInvalidArgument);
  CHECK_THAT(message, Catch::StartsWith(path + ": dtype 99 is not one of"));
  CHECK(!std::filesystem::exists(path));
  // Text beyond kMaxManifestBytes: refused before the JSON is built.
  manifest.dtype = DType::kFloat32;
  manifest.metadata.assign(kMaxManifestBytes + 1, 'm');
  REQUIRE(code_of([&] { write_manifest(path, manifest); }, &message) ==
          ErrorCode::kInvalidArgument);
  CHECK_THAT(message,
             Catch::Contains("beyond a manifest's limit of " + std::to_string(kMaxManifestBytes)));
  CHECK(!std::filesystem::exists(path));
}

TEST_CASE("A ShardSet opened with max_rows takes each shard's first rows of a manifest",
          "[shard_set]") {
  // The check against the manifest's row counts compared the capped snapshot: every shard
  // with more rows than max_rows was called a stale copy.
  TempDir dir;
  std::vector<Writer> writers;
  for (int i = 0; i < 2; ++i) {
    writers.push_back(Writer::create(dir / ("node-" + std::to_string(i)), opts(4)));
  }
  std::vector<std::vector<Oracle::Row>> shards;
  std::mt19937_64 rng(11);
  fill({&writers[0], &writers[1]}, shards, rng, 10);
  write_manifest(dir / kManifestFileName, manifest_of({"node-0", "node-1"}, dir));
  ReaderOptions capped;
  capped.max_rows = 4;
  ShardSet set = ShardSet::open(dir.path(), capped);
  REQUIRE(set.size() == 8);
  REQUIRE(set.shard(1).size() == 4);
  REQUIRE(set.record(5).key == shards[1][1].key);
  // A shard that holds fewer rows than recorded is still refused, capped or not.
  Manifest more = manifest_of({"node-0", "node-1"}, dir);
  more.shards[1].rows = 11;
  write_manifest(dir / kManifestFileName, more);
  std::string message;
  REQUIRE(code_of([&] { ShardSet::open(dir.path(), capped); }, &message) == ErrorCode::kCorruption);
  REQUIRE(message.find("holds 10 rows, fewer than the 11") != std::string::npos);
}

TEST_CASE("Manifests with escaping paths, missing shards or mismatched shards are named errors",
          "[shard_set]") {
  TempDir dir;
  Writer::create(dir / "node-0", opts(4)).close();
  Writer::create(dir / "wide", opts(5)).close();
  Writer::create(dir / "half", opts(4, DType::kFloat16)).close();
  const StoreInfo info = read_info(dir / "node-0");
  auto manifest_with = [&](const std::string& shard_path, const std::string& store_id,
                           int dim = 4) {
    return std::string(R"({"embstore_manifest": 1, "dim": )") + std::to_string(dim) +
           R"(, "dtype": "float32", "shards": [{"path": ")" + shard_path + R"(", "store_id": ")" +
           store_id + R"(", "rows": 0}]})";
  };
  std::string message;
  for (const std::string bad : {"../node-0", "a/../../node-0", "..", "/etc"}) {
    const auto path = write_text(dir / "bad.json", manifest_with(bad, info.store_id));
    REQUIRE(code_of([&] { ShardSet::open(path); }, &message) == ErrorCode::kInvalidArgument);
    REQUIRE(message.find("'" + bad + "'") != std::string::npos);
    Manifest m;
    m.dim = 4;
    m.shards.push_back({bad, info.store_id, 0, {}});
    REQUIRE(code_of([&] { write_manifest(dir / "w.json", m); }) == ErrorCode::kInvalidArgument);
  }
  // A NUL byte (JSON's \u0000) would end the name the file system sees: refused too.
  {
    const auto path = write_text(dir / "bad.json", manifest_with("node-0\\u0000x", info.store_id));
    REQUIRE(code_of([&] { ShardSet::open(path); }, &message) == ErrorCode::kInvalidArgument);
    CHECK_THAT(message, Catch::Contains("shard path 'node-0\\0x' holds a NUL byte"));
    Manifest m;
    m.dim = 4;
    m.shards.push_back({std::string("node-0\0x", 8), info.store_id, 0, {}});
    CHECK(code_of([&] { write_manifest(dir / "w.json", m); }, &message) ==
          ErrorCode::kInvalidArgument);
    CHECK_THAT(message, Catch::Contains("holds a NUL byte"));
  }

  auto path = write_text(dir / "missing.json", manifest_with("node-9", info.store_id));
  REQUIRE(code_of([&] { ShardSet::open(path); }, &message) == ErrorCode::kNotFound);
  REQUIRE(message.find("'node-9' is missing") != std::string::npos);
  // There but no store (an empty directory): said so, not "missing".
  std::filesystem::create_directory(dir / "node-9");
  REQUIRE(code_of([&] { ShardSet::open(path); }, &message) == ErrorCode::kNotFound);
  REQUIRE(message.find("'node-9' is not a store (") != std::string::npos);
  std::filesystem::remove(dir / "node-9");

  path = write_text(dir / "id.json", manifest_with("node-0", std::string(32, 'f')));
  REQUIRE(code_of([&] { ShardSet::open(path); }, &message) == ErrorCode::kFormatMismatch);
  REQUIRE(message.find(info.store_id) != std::string::npos);

  path = write_text(dir / "dim.json", manifest_with("node-0", info.store_id, 5));
  REQUIRE(code_of([&] { ShardSet::open(path); }, &message) == ErrorCode::kFormatMismatch);
  REQUIRE(message.find("dim 4") != std::string::npos);

  REQUIRE(code_of(
              [&] {
                ShardSet::open({dir / "node-0", dir / "wide"});
              },
              &message) == ErrorCode::kFormatMismatch);
  REQUIRE(message.find(dir / "wide") != std::string::npos);
  REQUIRE(message.find(dir / "node-0") != std::string::npos);
  REQUIRE(code_of(
              [&] {
                ShardSet::open({dir / "node-0", dir / "half"});
              },
              &message) == ErrorCode::kFormatMismatch);
  REQUIRE(message.find("float16") != std::string::npos);

  path = write_text(dir / "none.json",
                    R"({"embstore_manifest": 1, "dim": 4, "dtype": "float32", "shards": []})");
  REQUIRE(code_of([&] { ShardSet::open(path); }, &message) == ErrorCode::kInvalidArgument);
  REQUIRE(message.find("no shards") != std::string::npos);

  path = write_text(dir / "junk.json", "{\"embstore_manifest\": 1, \"dim\": 4}");
  REQUIRE(code_of([&] { read_manifest(path); }, &message) == ErrorCode::kCorruption);
  REQUIRE(message.find("'dtype'") != std::string::npos);
  std::string newer = manifest_with("node-0", info.store_id);
  newer.replace(newer.find("1,"), 1, "9");
  path = write_text(dir / "new.json", newer);
  REQUIRE(code_of([&] { read_manifest(path); }) == ErrorCode::kUnsupportedVersion);
}

TEST_CASE("A manifest file larger than kMaxManifestBytes is refused naming its size",
          "[shard_set]") {
  TempDir dir;
  // 1 TiB, sparse: read whole, it would be an allocation of 1 TiB.
  const std::string path = write_text(dir / "huge.json", "");
  REQUIRE(::truncate(path.c_str(), 1ll << 40) == 0);
  std::string message;
  REQUIRE(code_of([&] { read_manifest(path); }, &message) == ErrorCode::kCorruption);
  CHECK(message.find(path + ": not a manifest (1099511627776 bytes") != std::string::npos);
  CHECK(code_of([&] { ShardSet::open(path); }) == ErrorCode::kCorruption);
}

TEST_CASE("A store or a directory of shards named .json is no manifest file", "[shard_set]") {
  TempDir dir;
  {
    Writer w = Writer::create(dir / "store.json", opts(2));
    w.append(std::vector<std::uint64_t>{1, 2}, 0, std::vector<float>(4, 1.0f));
  }
  ShardSet set = ShardSet::open(dir / "store.json");
  CHECK(set.size() == 2);
  CHECK(set.shard_path(0) == dir / "store.json");
  // A directory of shards named so: its manifest.json is read.
  std::filesystem::create_directory(dir / "run.json");
  std::filesystem::rename(dir / "store.json", dir / "run.json/node-0");
  Manifest manifest;
  manifest.dim = 2;
  manifest.shards.push_back(
      {"node-0", read_info(dir / "run.json/node-0").store_id, 2, std::vector<std::uint64_t>{0}});
  write_manifest(dir / "run.json/manifest.json", manifest);
  CHECK(ShardSet::open(dir / "run.json").find(2) == std::optional<std::uint64_t>(1));
}

TEST_CASE("Manifest integers out of range or not whole are refused by field name", "[shard_set]") {
  TempDir dir;
  Writer::create(dir / "node-0", opts(4)).close();
  const StoreInfo info = read_info(dir / "node-0");
  auto manifest = [&](const std::string& dim, const std::string& rows, const std::string& epochs) {
    return R"({"embstore_manifest": 1, "dim": )" + dim +
           R"(, "dtype": "float32", "shards": [{"path": "node-0", "store_id": ")" + info.store_id +
           R"(", "rows": )" + rows + R"(, "epochs": )" + epochs + "}]}";
  };
  struct Case {
    std::string dim, rows, epochs, words;
  };
  // 4294967300 is 2^32 + 4: cast to uint32 it was a dim of 4, matching the shard.
  for (const Case& c : {Case{"4294967300", "0", "[]", "field 'dim' is 4294967300"},
                        Case{"-1", "0", "[]", "field 'dim' is -1"},
                        Case{"0", "0", "[]", "field 'dim' is 0, outside 1..16777216"},
                        Case{"16777217", "0", "[]", "field 'dim' is 16777217, outside 1.."},
                        Case{"4.7", "0", "[]", "field 'dim' has the wrong type (4.7)"},
                        Case{"true", "0", "[]", "field 'dim' has the wrong type (true)"},
                        Case{"4", "-1", "[]", "shards[0]: field 'rows' is -1"},
                        Case{"4", "0", "[0, -2]", "shards[0]: field 'epochs[1]' is -2"},
                        Case{"4", "0", "7", "shards[0]: field 'epochs' has the wrong type (7)"}}) {
    INFO(c.words);
    const std::string path = write_text(dir / "m.json", manifest(c.dim, c.rows, c.epochs));
    std::string message;
    REQUIRE(code_of([&] { ShardSet::open(path); }, &message) == ErrorCode::kCorruption);
    CHECK_THAT(message, Catch::StartsWith(path) && Catch::Contains(c.words));
  }
  // Version 0 (or below) was read as version 1.
  for (const char* version : {"0", "-3"}) {
    std::string older = manifest("4", "0", "[]");
    older.replace(older.find("1,"), 1, version);
    const std::string path = write_text(dir / "old.json", older);
    std::string message;
    REQUIRE(code_of([&] { read_manifest(path); }, &message) == ErrorCode::kCorruption);
    CHECK_THAT(message, Catch::Contains("field 'embstore_manifest' is " + std::string(version) +
                                        ", not a manifest version"));
  }
  // A version beyond int: named as it is, not wrapped to 1.
  std::string newer = manifest("4", "0", "[]");
  newer.replace(newer.find("1,"), 1, "4294967297");
  const std::string path = write_text(dir / "new.json", newer);
  std::string message;
  REQUIRE(code_of([&] { read_manifest(path); }, &message) == ErrorCode::kUnsupportedVersion);
  CHECK_THAT(message, Catch::Contains("manifest version 4294967297"));
  // The same manifest with sound integers opens.
  CHECK(ShardSet::open(write_text(dir / "ok.json", manifest("4", "0", "[]"))).size() == 0);
}

TEST_CASE("merge_stores refuses a manifest's metadata beyond a store's limit naming the output",
          "[shard_set]") {
  TempDir dir;
  Writer::create(dir / "node-0", opts(4)).close();
  Manifest manifest;
  manifest.dim = 4;
  manifest.metadata.assign(kMaxMetadataBytes + 1, 'm');
  manifest.shards.push_back({"node-0", read_info(dir / "node-0").store_id, 0, {}});
  write_manifest(dir / "m.json", manifest);
  const ShardSet set = ShardSet::open(dir / "m.json");
  std::string message;
  REQUIRE(code_of([&] { merge_stores(dir / "out", set); }, &message) ==
          ErrorCode::kInvalidArgument);
  CHECK_THAT(message, Catch::StartsWith(dir / "out") && Catch::Contains("65537 bytes"));
  CHECK(!std::filesystem::exists(dir / "out"));
}

TEST_CASE("merge_stores copies a ShardSet's rows in epoch order and refuses bad rows",
          "[shard_set]") {
  TempDir dir;
  Writer a = Writer::create(dir / "a", opts(4));
  Writer b = Writer::create(dir / "b", opts(4));
  std::vector<std::vector<Oracle::Row>> shards;
  std::mt19937_64 rng(11);
  fill({&a, &b}, shards, rng, 50);
  const Oracle oracle = Oracle::of(shards);
  const ShardSet set = ShardSet::open({dir / "a", dir / "b"});  // Store paths, no manifest.
  check_against(set, oracle);
  std::vector<std::uint64_t> progress;
  const StoreInfo info = merge_stores(dir / "merged", set, [&](const MergeProgress& p) {
    REQUIRE(p.rows_total == 100);
    REQUIRE(*p.shard_path == set.shard_path(p.shard));
    progress.push_back(p.rows_done);
  });
  REQUIRE(info.committed_rows == 100);
  REQUIRE(info.durable_rows == 100);
  REQUIRE(info.metadata == R"({"run": 7})");
  REQUIRE(progress.back() == 100);
  check_against(ShardSet::open(dir / "merged"), oracle.merged());
  REQUIRE(code_of([&] { merge_stores(dir / "merged", set); }) == ErrorCode::kAlreadyExists);

  // A flipped byte in shard b's row 7: the merge stops, names it, and leaves nothing behind.
  std::string byte = test::read_file(dir / "b/rows.1").substr(7 * 16, 1);
  byte[0] = static_cast<char>(byte[0] ^ 0x40);
  test::write_bytes(dir / "b/rows.1", 7 * 16, byte);
  std::string message;
  REQUIRE(code_of([&] { merge_stores(dir / "again", set); }, &message) == ErrorCode::kCorruption);
  REQUIRE(message.find(dir / "b") != std::string::npos);
  REQUIRE(message.find("row 7") != std::string::npos);
  REQUIRE(code_of([&] { read_info(dir / "again"); }) == ErrorCode::kNotFound);
}

TEST_CASE("epoch_drops names each shard's first row whose epoch goes down", "[shard_set]") {
  TempDir dir;
  const std::vector<float> v(4 * 4, 1.0f);
  {
    Writer a = Writer::create(dir / "a", opts(4));  // Epochs 0 0 1 1: never down.
    a.append(std::vector<std::uint64_t>{1, 2}, 0, std::span<const float>(v.data(), 8));
    a.append(std::vector<std::uint64_t>{1, 2}, 1, std::span<const float>(v.data(), 8));
    Writer b = Writer::create(dir / "b", opts(4));  // 3 5 2 4 1: down at rows 2 and 4.
    const std::vector<std::uint64_t> epochs{3, 5, 2, 4, 1};
    for (std::size_t i = 0; i < epochs.size(); ++i) {
      b.append(std::vector<std::uint64_t>{i}, epochs[i], std::span<const float>(v.data(), 4));
    }
  }
  const ShardSet set = ShardSet::open({dir / "a", dir / "b"});
  const std::vector<EpochDrop> drops = epoch_drops(set);
  REQUIRE(drops.size() == 1);
  CHECK(drops[0].shard == 1);
  CHECK(drops[0].row == 2);
  CHECK(drops[0].epoch == 2);
  CHECK(drops[0].previous == 5);
  CHECK(epoch_drops(ShardSet::open({dir / "a"})).empty());
}

TEST_CASE("A ShardSet after a shard was truncated and refilled to its old size answers anew",
          "[shard_set][truncate]") {
  TempDir dir;
  Writer w = Writer::create(dir / "s0", opts(2));
  const std::vector<float> v(8, 1.0f);
  w.append(std::vector<std::uint64_t>{10, 11, 12, 13}, 1, v);
  ShardSet set = ShardSet::open({dir / "s0"});
  REQUIRE(set.find(12, 1) == std::optional<std::uint64_t>(2));
  REQUIRE(set.history(13).size() == 1);
  w.truncate(2);
  w.append(std::vector<std::uint64_t>{20, 21}, 1, std::span<const float>(v.data(), 4));
  set.refresh();
  REQUIRE(set.size() == 4);  // As before the truncate: the size alone does not tell.
  CHECK(set.find(12, 1) == std::nullopt);
  CHECK(set.find(21) == std::optional<std::uint64_t>(3));
  CHECK(set.history(13).empty());
  CHECK(set.epoch_rows(1) == std::vector<std::uint64_t>{0, 1, 2, 3});
  const std::vector<std::uint64_t> keys{12, 20, 10};
  CHECK(set.find_many(keys, 1) == std::vector<std::uint64_t>{ShardSet::kNoRow, 2, 0});
}

TEST_CASE("A refresh that fails at a later shard leaves the set numbered as its snapshots",
          "[shard_set]") {
  TempDir dir;
  Writer a = Writer::create(dir / "a", opts(4));
  Writer b = Writer::create(dir / "b", opts(4));
  const std::vector<float> v(4 * 10, 1.0f);
  a.append(std::vector<std::uint64_t>{100, 101}, 0, std::span<const float>(v.data(), 8));
  b.append(std::vector<std::uint64_t>{500, 501}, 0, std::span<const float>(v.data(), 8));
  ShardSet set = ShardSet::open({dir / "a", dir / "b"});
  REQUIRE(set.size() == 4);
  // Shard a gains a row; shard b grows past its mapping (a refresh must open its files again),
  // then its directory is moved away, so refreshing it fails after shard a was refreshed.
  a.append(std::vector<std::uint64_t>{102}, 0, std::span<const float>(v.data(), 4));
  const std::uint64_t grown = 200000;
  b.append(std::vector<std::uint64_t>(grown, 9), 1, std::vector<float>(4 * grown, 2.0f));
  b.close();
  std::filesystem::rename(dir / "b", dir / "b-moved");
  REQUIRE(code_of([&] { set.refresh(); }) == ErrorCode::kNotFound);
  // Shard a holds its new snapshot and shard b its old one: numbered for those.
  REQUIRE(set.shard(0).size() == 3);
  REQUIRE(set.shard(1).size() == 2);
  CHECK(set.shard_first_row(1) == 3);
  CHECK(set.size() == 5);
  const auto row = set.find(102);
  REQUIRE(row == std::optional<std::uint64_t>(2));
  CHECK(set.record(*row).key == 102);
  CHECK(set.find(500) == std::optional<std::uint64_t>(3));
  CHECK(set.record(3).key == 500);
  CHECK(set.locate(4).shard == 1);
}

TEST_CASE("A set that lists one store twice is refused naming both paths", "[shard_set]") {
  TempDir dir;
  {
    Writer w = Writer::create(dir / "a", opts(2));
    w.append(std::vector<std::uint64_t>{1, 2}, 0, std::vector<float>(4, 1.0f));
  }
  std::string message;
  REQUIRE(code_of(
              [&] {
                ShardSet::open({dir / "a", dir / "a/"});
              },
              &message) == ErrorCode::kInvalidArgument);
  CHECK(message.find("is the same store as shard " + (dir / "a")) != std::string::npos);
  REQUIRE(code_of([&] {
            merge_stores(dir / "m", ShardSet::open({dir / "a", dir / "a"}));
          }) == ErrorCode::kInvalidArgument);
  CHECK(code_of([&] { read_info(dir / "m"); }) == ErrorCode::kNotFound);
}

TEST_CASE("merge and salvage refuse a bare relative output from a cwd inside the store",
          "[shard_set][salvage]") {
  TempDir dir;
  {
    Writer w = Writer::create(dir / "s", opts(2));
    w.append(std::vector<std::uint64_t>{1, 2}, 0, std::vector<float>(4, 1.0f));
  }
  const ShardSet set = ShardSet::open({dir / "s"});
  struct InDirectory {  // The working directory, restored however the test ends.
    std::filesystem::path before = std::filesystem::current_path();
    explicit InDirectory(const std::string& path) { std::filesystem::current_path(path); }
    ~InDirectory() { std::filesystem::current_path(before); }
  } in_store(dir / "s");
  std::string message;
  CHECK(code_of([&] { merge_stores("merged", set); }, &message) == ErrorCode::kInvalidArgument);
  CHECK(message.find("inside the store " + (dir / "s")) != std::string::npos);
  CHECK(code_of([&] { salvage("../s", "out"); }, &message) == ErrorCode::kInvalidArgument);
  CHECK(message.find("inside the store ../s") != std::string::npos);
  CHECK(!std::filesystem::exists(dir / "s/merged"));
  CHECK(!std::filesystem::exists(dir / "s/out"));
}

TEST_CASE("merge_stores merges a shard whose key index file is missing (no row is lost)",
          "[shard_set][corruption]") {
  TempDir dir;
  {
    Writer w = Writer::create(dir / "m0", opts(2));
    w.append(std::vector<std::uint64_t>{1, 2, 3}, 1, std::vector<float>(6, 1.0f));
  }
  std::filesystem::remove(dir / "m0/keys.1");
  const ShardSet set = ShardSet::open({dir / "m0"});
  REQUIRE(set.shard(0).verify().key_index_problems == 1);  // A problem of derived data only.
  const StoreInfo info = merge_stores(dir / "merged", set);
  CHECK(info.committed_rows == 3);
  Reader merged = Reader::open(dir / "merged");
  CHECK(merged.verify().ok());
  CHECK(merged.find(2, 1) == std::optional<std::uint64_t>(1));
}

TEST_CASE("merge_stores keeps a key index unless no shard keeps one", "[shard_set]") {
  // Shards created without one (to stay small) merged into a store that kept one: ~50% larger,
  // unasked (compact and salvage kept the choice; a review found merge did not).
  TempDir dir;
  CreateOptions none = opts(2);
  none.key_index = false;
  for (const char* name : {"n0", "n1"}) {
    Writer w = Writer::create(dir / name, none);
    w.append(std::vector<std::uint64_t>{1, 2}, name[1] == '0' ? 0 : 1, std::vector<float>(4, 1));
  }
  {
    Writer w = Writer::create(dir / "k0", opts(2));
    w.append(std::vector<std::uint64_t>{3}, 2, std::vector<float>(2, 1));
  }
  CHECK_FALSE(merge_stores(dir / "none", ShardSet::open({dir / "n0", dir / "n1"})).keeps_key_index);
  CHECK_FALSE(read_info(dir / "none").keeps_key_index);
  CHECK(Reader::open(dir / "none").find(2, 1) == std::optional<std::uint64_t>(3));
  const ShardSet mixed = ShardSet::open({dir / "n0", dir / "k0"});
  CHECK(merge_stores(dir / "mixed", mixed).keeps_key_index);
  const Reader merged = Reader::open(dir / "mixed");
  CHECK(merged.info().key_index_used);
  CHECK(merged.find(3) == std::optional<std::uint64_t>(2));
}

TEST_CASE("Writers refuse network file systems unless forced, and readers read anywhere",
          "[shard_set][faults]") {
  TempDir dir;
  Writer::create(dir / "local", opts(4)).close();
  struct Fake {
    std::uint64_t magic;
    const char* name;
  };
  for (const Fake fake :
       {Fake{0x6969, "NFS"}, Fake{0xFF534D42, "CIFS"}, Fake{0x65735546, "FUSE"},
        Fake{0x01021997, "9p"}, Fake{0x0BD00BD0, "Lustre"}, Fake{0x47504653, "GPFS"}}) {
    detail::testing::set_filesystem_magic(fake.magic);
    std::string message;
    REQUIRE(code_of([&] { Writer::open(dir / "local"); }, &message) == ErrorCode::kInvalidArgument);
    REQUIRE(message.find(fake.name) != std::string::npos);
    REQUIRE(message.find("node-local disk") != std::string::npos);
    REQUIRE(code_of([&] { Writer::create(dir / "new", opts(4)); }) == ErrorCode::kInvalidArgument);
    REQUIRE(code_of([&] { Writer::open_or_create(dir / "new", opts(4)); }) ==
            ErrorCode::kInvalidArgument);
    REQUIRE(code_of([&] { read_info(dir / "new"); }) == ErrorCode::kNotFound);
    REQUIRE(Reader::open(dir / "local").size() == 0);
    WriterOptions forced;
    forced.allow_remote_filesystem = true;
    Writer::open(dir / "local", forced).close();
  }
  detail::testing::set_filesystem_magic(0xEF53);  // ext4
  Writer::open(dir / "local").close();
  detail::testing::set_filesystem_magic(0);  // The real file system: local in the test's $TMPDIR.
  Writer::open(dir / "local").close();
}

TEST_CASE("merge_stores takes metadata of the same JSON value in other spacing as the same",
          "[shard_set]") {
  // Ranks that serialise one config with other separators or key order: the merge refused
  // them ("different metadata") where the CLI's import took the same pair (same_metadata()).
  TempDir dir;
  CreateOptions a = opts(4);
  a.metadata = R"({"model":"A","lr":0.1})";
  CreateOptions b = opts(4);
  b.metadata = R"({"lr": 0.1, "model": "A"})";
  Writer::create(dir / "a", a).close();
  Writer::create(dir / "b", b).close();
  merge_stores(dir / "out", ShardSet::open({dir / "a", dir / "b"}));
  CHECK(Reader::open(dir / "out").metadata() == a.metadata);  // The first shard's text.
  CHECK(same_metadata(a.metadata, b.metadata));
  CHECK_FALSE(same_metadata(R"({"model": "A"})", R"({"model": "B"})"));
  CHECK_FALSE(same_metadata("run 7", "run  7"));  // Text that is no JSON: compared as text.
  CHECK(same_metadata("run 7", "run 7"));
  // What the parser would read as one though the texts differ: never the same (a helper's
  // review found merges of both).
  CHECK_FALSE(
      same_metadata(R"({"seed": 100000000000000000000})", R"({"seed": 100000000000000000001})"));
  CHECK_FALSE(same_metadata(R"({"run": "a", "run": "b"})", R"({"run": "b"})"));
  CHECK_FALSE(same_metadata(R"({"x": {"k": 1, "k": 1}})", R"({"x": {"k": 1}})"));
  CHECK(same_metadata(R"({"seed": 18446744073709551615})", R"({ "seed":18446744073709551615 })"));
  CHECK(same_metadata(R"([{"k": 1}, {"k": 1}])", R"([{"k":1},{"k":1}])"));  // Keys per object.
}

TEST_CASE("merge_stores refuses stores of different metadata unless a manifest gives it",
          "[shard_set]") {
  TempDir dir;
  CreateOptions a = opts(4);
  a.metadata = R"({"model": "A"})";
  CreateOptions b = opts(4);
  b.metadata = R"({"model": "B"})";
  Writer::create(dir / "a", a).close();
  Writer::create(dir / "b", b).close();
  const ShardSet set = ShardSet::open({dir / "a", dir / "b"});
  CHECK_FALSE(set.from_manifest());
  std::string message;
  REQUIRE(code_of([&] { merge_stores(dir / "out", set); }, &message) == ErrorCode::kFormatMismatch);
  CHECK_THAT(message, Catch::StartsWith(dir / "out: shards " + dir / "a" + " and " + dir / "b" +
                                        " have different metadata"));
  CHECK(!std::filesystem::exists(dir / "out"));
  Manifest manifest;
  manifest.dim = 4;
  manifest.metadata = "both";
  for (const char* name : {"a", "b"}) {
    manifest.shards.push_back({name, read_info(dir / name).store_id, 0, {}});
  }
  write_manifest(dir / "m.json", manifest);
  const ShardSet listed = ShardSet::open(dir / "m.json");
  CHECK(listed.from_manifest());
  merge_stores(dir / "out", listed);
  CHECK(Reader::open(dir / "out").metadata() == "both");
}

TEST_CASE("A ShardSet's latest row of a key is of its highest epoch, not of the last shard",
          "[shard_set]") {
  // Per-node shards written side by side (a shuffled DistributedSampler): sample 10 went to
  // node 0 in epochs 1 and 2 and to node 1 in epoch 0. find(10) answered node 1's epoch-0 row,
  // the highest global row.
  TempDir dir;
  auto put_rows = [&](Writer& w, std::vector<std::uint64_t> keys,
                      std::vector<std::uint64_t> epochs) {
    std::vector<float> values(keys.size() * 4, 1.0f);
    w.append(keys, epochs, ConstMatrix{values.data(), DType::kFloat32, keys.size(), 4, 0});
  };
  {
    Writer a = Writer::create(dir / "node-0", opts(4));
    Writer b = Writer::create(dir / "node-1", opts(4));
    put_rows(a, {10, 11, 12}, {1, 1, 1});  // rows 0..2
    put_rows(a, {10, 11}, {2, 3});         // rows 3, 4
    put_rows(b, {10, 11, 13}, {0, 3, 0});  // rows 5..7
  }
  ShardSet set =
      ShardSet::open(std::vector<std::string>{dir / "node-0", dir / "node-1"}, ReaderOptions{});
  CHECK(set.find(10) == std::optional<std::uint64_t>(3));  // epoch 2 on node 0
  CHECK(set.find(11) == std::optional<std::uint64_t>(6));  // epoch 3 on both: the higher row
  CHECK(set.find(12) == std::optional<std::uint64_t>(2));
  CHECK(set.find(13) == std::optional<std::uint64_t>(7));
  CHECK(set.find(14) == std::nullopt);
  const std::vector<std::uint64_t> keys = {10, 11, 12, 13, 14};
  CHECK(set.find_many(keys) == std::vector<std::uint64_t>{3, 6, 2, 7, ShardSet::kNoRow});
  CHECK(set.find(10, 0) == std::optional<std::uint64_t>(5));
}

TEST_CASE("merge_stores puts per-node shards in epoch order: the merged latest is the set's",
          "[shard_set]") {
  TempDir dir;
  auto put_rows = [&](Writer& w, std::vector<std::uint64_t> keys,
                      std::vector<std::uint64_t> epochs) {
    std::vector<float> values(keys.size() * 4);
    for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i / 4);
    w.append(keys, epochs, ConstMatrix{values.data(), DType::kFloat32, keys.size(), 4, 0});
  };
  {
    Writer a = Writer::create(dir / "node-0", opts(4));
    Writer b = Writer::create(dir / "node-1", opts(4));
    put_rows(a, {10, 11}, {0, 0});
    put_rows(b, {12, 13}, {0, 0});
    put_rows(a, {12, 13}, {1, 1});
    put_rows(b, {10, 11}, {1, 1});
    put_rows(a, {11, 10}, {2, 2});
    put_rows(b, {13, 12}, {2, 2});
  }
  const ShardSet set =
      ShardSet::open(std::vector<std::string>{dir / "node-0", dir / "node-1"}, ReaderOptions{});
  merge_stores(dir / "merged", set);
  Reader merged = Reader::open(dir / "merged");
  REQUIRE(merged.size() == 12);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> order;
  for (std::uint64_t row = 0; row < 12; ++row) {
    const Record record = merged.record(row);
    order.emplace_back(record.key, record.epoch);
  }
  using P = std::pair<std::uint64_t, std::uint64_t>;
  CHECK(order == std::vector<P>{{10, 0},
                                {11, 0},
                                {12, 0},
                                {13, 0},
                                {12, 1},
                                {13, 1},
                                {10, 1},
                                {11, 1},
                                {11, 2},
                                {10, 2},
                                {13, 2},
                                {12, 2}});
  for (const std::uint64_t key : {10, 11, 12, 13}) {
    const auto row = merged.find(key);
    REQUIRE(row);
    CHECK(merged.record(*row).epoch == 2);
    const auto in_set = set.find(key);
    REQUIRE(in_set);
    CHECK(set.record(*in_set).epoch == 2);
  }
}

TEST_CASE("A shard truncated since its manifest was written opens with fewer rows",
          "[shard_set][truncate]") {
  // A resume from a checkpoint truncates a node's shard; until the next end_epoch() rewrote
  // the manifest, the run could not be read ("holds 80 rows, fewer than the 96 the manifest
  // recorded"). The manifest now records each shard's generation.
  TempDir dir;
  {
    Writer w = Writer::create(dir / "node-0", opts(4));
    std::vector<float> values(4 * 10, 1.0f);
    std::vector<std::uint64_t> keys(10), epochs(10);
    for (std::uint64_t i = 0; i < 10; ++i) keys[i] = i, epochs[i] = i / 5;
    w.append(keys, epochs, ConstMatrix{values.data(), DType::kFloat32, 10, 4, 0});
  }
  const StoreInfo info = read_info(dir / "node-0");
  Manifest manifest;
  manifest.dim = 4;
  manifest.metadata = R"({"run": 7})";
  manifest.shards.push_back({"node-0", info.store_id, 10, {0, 1}, info.generation});
  write_manifest(dir / kManifestFileName, manifest);
  Manifest unrecorded = manifest;
  unrecorded.shards[0].generation = 0;
  write_manifest(dir / "old.json", unrecorded);
  {
    Writer w = Writer::open(dir / "node-0");
    REQUIRE(w.truncate_from_epoch(1) == 5);
  }
  const ShardSet set = ShardSet::open(dir.path());
  CHECK(set.size() == 5);
  std::string message;
  // Without a recorded generation a truncate cannot be told from a stale copy: refused.
  CHECK(code_of([&] { ShardSet::open(dir / "old.json"); }, &message) == ErrorCode::kCorruption);
  CHECK_THAT(message, Catch::Contains("fewer than the 10 the manifest recorded (a stale copy? a "
                                      "manifest that records no generation"));
  // The same generation with fewer rows: a stale copy, refused.
  manifest.shards[0].generation = read_info(dir / "node-0").generation;
  write_manifest(dir / kManifestFileName, manifest);
  CHECK(code_of([&] { ShardSet::open(dir.path()); }, &message) == ErrorCode::kCorruption);
  CHECK_THAT(message, Catch::Contains("in generation 2, the shard's too (a stale copy?)"));
  // An older generation than recorded (a backup from before a truncate): a stale copy too.
  manifest.shards[0].generation = 3;
  write_manifest(dir / kManifestFileName, manifest);
  CHECK(code_of([&] { ShardSet::open(dir.path()); }, &message) == ErrorCode::kCorruption);
  // The generation the manifest recorded, and the shard's (the message gave the shard's as the
  // recorded one).
  CHECK_THAT(message, Catch::Contains(
                          "in generation 3; the shard is of generation 2, older (a stale copy?)"));
  // Older, and with as many rows as recorded or more: a stale copy all the same.
  manifest.shards[0].rows = 5;
  write_manifest(dir / kManifestFileName, manifest);
  CHECK(code_of([&] { ShardSet::open(dir.path()); }, &message) == ErrorCode::kCorruption);
  CHECK_THAT(message, Catch::Contains("holds 5 rows, against the 5 the manifest recorded in "
                                      "generation 3; the shard is of generation 2, older"));
}

TEST_CASE("A ShardSet's refresh adds the shards its manifest lists since, after those it holds",
          "[shard_set]") {
  // A live reader of a run (serve, a notebook) opened its ShardSet before every node's first
  // end_epoch(): the shards listed later never appeared, however often it refreshed.
  TempDir dir;
  const std::vector<float> v(4 * 3, 1.0f);
  auto make = [&](const std::string& name, std::uint64_t key) {
    Writer w = Writer::create(dir / name, opts(4));
    w.append(std::vector<std::uint64_t>{key, key + 1, key + 2}, 0, std::span<const float>(v));
    const StoreInfo info = read_info(dir / name);
    return ManifestShard{name, info.store_id, 3, {0}, info.generation};
  };
  Manifest manifest;
  manifest.dim = 4;
  manifest.metadata = R"({"run": 7})";
  manifest.shards = {make("node-b", 200)};
  write_manifest(dir / kManifestFileName, manifest);
  ShardSet set = ShardSet::open(dir.path());
  REQUIRE(set.shard_count() == 1);
  CHECK(set.refresh() == 3);  // Nothing new: the manifest is as it was read.

  // Rank 0 lists every node sorted by path: the new shard comes first in the manifest, and
  // after the shard held in the set, whose (shard, row) pairs stay valid.
  manifest.shards = {make("node-a", 100), manifest.shards[0]};
  write_manifest(dir / kManifestFileName, manifest);
  CHECK(set.refresh() == 6);
  REQUIRE(set.shard_count() == 2);
  CHECK(set.shard_path(0) == dir.path() + "/node-b");
  CHECK(set.shard_path(1) == dir.path() + "/node-a");
  CHECK(set.find(100) == std::optional<std::uint64_t>(3));
  CHECK(set.record(3).key == 100);
  CHECK(set.find(202) == std::optional<std::uint64_t>(2));
  CHECK(set.from_manifest());

  // A shard listed before its store was copied next to the manifest: refresh raises naming it,
  // keeps what it holds (refreshed), and adds the shard once it is there.
  ManifestShard later = make("node-c", 300);
  std::filesystem::rename(dir / "node-c", dir / "elsewhere");
  manifest.shards.push_back(later);
  write_manifest(dir / kManifestFileName, manifest);
  std::string message;
  CHECK(code_of([&] { set.refresh(); }, &message) == ErrorCode::kNotFound);
  CHECK_THAT(message, Catch::Contains("shard 'node-c' is missing"));
  CHECK(set.shard_count() == 2);
  CHECK(set.size() == 6);
  std::filesystem::rename(dir / "elsewhere", dir / "node-c");
  CHECK(set.refresh() == 9);
  CHECK(set.shard_count() == 3);
  CHECK(set.record(8).key == 302);

  // A manifest removed since lists nothing new; one now of another dim is refused by name.
  std::filesystem::remove(dir / kManifestFileName);
  CHECK(set.refresh() == 9);
  manifest.dim = 8;
  write_manifest(dir / kManifestFileName, manifest);
  CHECK(code_of([&] { set.refresh(); }, &message) == ErrorCode::kFormatMismatch);
  CHECK_THAT(message, Catch::Contains("the manifest now says dim 8 float32, not the dim 4"));
  CHECK(set.size() == 9);
}

TEST_CASE(
    "A ShardSet follows its manifest from another working directory and refuses a store "
    "made again at a shard's path",
    "[shard_set]") {
  // From a review: the manifest was read again by the relative path it was opened with (after a
  // chdir, another run's manifest, or none); and a store deleted and made again at a shard's
  // path was added as one more shard beside the deleted one's rows.
  TempDir dir;
  const std::vector<float> v(4 * 2, 1.0f);
  auto make = [&](const std::string& name, std::uint64_t key) {
    std::filesystem::remove_all(dir / name);
    Writer w = Writer::create(dir / name, opts(4));
    w.append(std::vector<std::uint64_t>{key, key + 1}, 0, std::span<const float>(v));
    const StoreInfo info = read_info(dir / name);
    return ManifestShard{name, info.store_id, 2, {0}, info.generation};
  };
  Manifest manifest;
  manifest.dim = 4;
  manifest.metadata = R"({"run": 7})";
  manifest.shards = {make("node-0", 0)};
  write_manifest(dir / kManifestFileName, manifest);
  const std::filesystem::path before = std::filesystem::current_path();
  std::filesystem::current_path(dir.path());
  ShardSet set = ShardSet::open(kManifestFileName);
  std::filesystem::current_path("/");
  struct Back {
    std::filesystem::path to;
    ~Back() { std::filesystem::current_path(to); }
  } back{before};
  manifest.shards.push_back(make("node-1", 10));
  write_manifest(dir / kManifestFileName, manifest);
  CHECK(set.refresh() == 4);
  CHECK(set.shard_count() == 2);

  // A run started over lists node-0 made again, under another store id. (The store at node-0
  // is left as it was here: a Reader of a deleted store may see that first, at its refresh.)
  manifest.shards[0].store_id = "0123456789abcdef0123456789abcdef";
  write_manifest(dir / kManifestFileName, manifest);
  std::string message;
  CHECK(code_of([&] { set.refresh(); }, &message) == ErrorCode::kFormatMismatch);
  CHECK_THAT(message, Catch::Contains("shard 'node-0' is now listed as store " +
                                      manifest.shards[0].store_id) &&
                          Catch::Contains("open a new ShardSet"));
  CHECK(set.shard_count() == 2);
}

TEST_CASE("A manifest without metadata gives the shards' own, to the set and to a merge",
          "[shard_set]") {
  // The manifest's "" was taken as the metadata to give: a merge of shards created with
  // metadata dropped it without a word.
  TempDir dir;
  CreateOptions created = opts(4);
  created.metadata = R"({"model":"resnet","lr":0.1})";
  const std::vector<float> v(4 * 2, 1.0f);
  for (const char* name : {"a", "b"}) {
    Writer w = Writer::create(dir / name, created);
    w.append(std::vector<std::uint64_t>{1, 2}, 0, std::span<const float>(v));
  }
  auto listed = [&](const std::string& name) {
    return R"({"path": ")" + name + R"(", "store_id": ")" + read_info(dir / name).store_id +
           R"(", "rows": 2})";
  };
  write_text(dir / "none.json", R"({"embstore_manifest": 1, "dim": 4, "dtype": "float32", )"
                                R"("shards": [)" +
                                    listed("a") + ", " + listed("b") + "]}");
  const ShardSet set = ShardSet::open(dir / "none.json");
  CHECK(set.from_manifest());
  CHECK_FALSE(set.metadata_from_manifest());
  CHECK(set.metadata() == created.metadata);
  CHECK(metadata_overrides(set).empty());
  merge_stores(dir / "out", set);
  CHECK(Reader::open(dir / "out").metadata() == created.metadata);
  // The same from write_manifest with no metadata given ("").
  Manifest manifest = manifest_of({"a", "b"}, dir);
  manifest.metadata.clear();
  write_manifest(dir / "empty.json", manifest);
  CHECK(ShardSet::open(dir / "empty.json").metadata() == created.metadata);

  // Shards that disagree: refused as without a manifest, naming both.
  CreateOptions other = created;
  other.metadata = R"({"model":"vit"})";
  Writer::create(dir / "c", other).close();
  manifest = manifest_of({"a", "c"}, dir);
  manifest.shards[1].rows = 0;
  manifest.metadata.clear();
  write_manifest(dir / "mixed.json", manifest);
  std::string message;
  REQUIRE(code_of([&] { merge_stores(dir / "out2", ShardSet::open(dir / "mixed.json")); },
                  &message) == ErrorCode::kFormatMismatch);
  CHECK_THAT(message, Catch::Contains("shards " + dir / "a" + " and " + dir / "c" +
                                      " have different metadata") &&
                          Catch::Contains("give the manifest a \"metadata\" field"));
  CHECK(!std::filesystem::exists(dir / "out2"));

  // A manifest that gives metadata: the set's and the merged store's, and the shards whose own
  // it replaces are named.
  manifest.metadata = R"({"models": ["resnet", "vit"]})";
  write_manifest(dir / "given.json", manifest);
  const ShardSet given = ShardSet::open(dir / "given.json");
  CHECK(given.metadata_from_manifest());
  CHECK(given.metadata() == manifest.metadata);
  CHECK(metadata_overrides(given) == std::vector<std::size_t>{0, 1});
  merge_stores(dir / "out3", given);
  CHECK(Reader::open(dir / "out3").metadata() == manifest.metadata);
  manifest.metadata = R"({ "lr": 0.1, "model": "resnet" })";  // Shard a's, spelt otherwise.
  write_manifest(dir / "given.json", manifest);
  CHECK(metadata_overrides(ShardSet::open(dir / "given.json")) == std::vector<std::size_t>{1});
}

TEST_CASE("A manifest field given twice in one object is refused naming it", "[shard_set]") {
  // nlohmann's parser keeps the last: two "shards" lists merged the second one's shards only.
  TempDir dir;
  Writer::create(dir / "a", opts(4)).close();
  Writer::create(dir / "b", opts(4)).close();
  auto entry = [&](const std::string& name, const std::string& more = "") {
    return R"({"path": ")" + name + R"(", "store_id": ")" + read_info(dir / name).store_id +
           R"(", "rows": 0)" + more + "}";
  };
  const std::string head = R"({"embstore_manifest": 1, "dtype": "float32", )";
  struct Case {
    std::string text, words;
  };
  const std::vector<Case> cases = {
      {head + R"("dim": 4, "shards": [)" + entry("a") + R"(], "shards": [)" + entry("b") + "]}",
       dir / "m.json: field 'shards' is given twice"},
      {head + R"("dim": 4, "dim": 8, "shards": [)" + entry("a") + "]}",
       dir / "m.json: field 'dim' is given twice"},
      {head + R"("dim": 4, "shards": [)" + entry("a") + ", " + entry("b", R"(, "path": "a")") +
           "]}",
       dir / "m.json: shards[1]: field 'path' is given twice"},
      {head + R"("dim": 4, "metadata": "x", "metadata": "", "shards": [)" + entry("a") + "]}",
       dir / "m.json: field 'metadata' is given twice"},
      {head + R"("dim": 4, "shards": [)" + entry("a", R"(, "epochs": [0], "epochs": [1])") + "]}",
       dir / "m.json: shards[0]: field 'epochs' is given twice"},
  };
  for (const Case& c : cases) {
    const std::string path = write_text(dir / "m.json", c.text);
    std::string message;
    REQUIRE(code_of([&] { read_manifest(path); }, &message) == ErrorCode::kCorruption);
    CHECK_THAT(message, Catch::StartsWith(c.words));
    CHECK(code_of([&] { ShardSet::open(path); }) == ErrorCode::kCorruption);
  }
  // Fields this version does not read are not read, twice or not; nested keys of one it reads
  // as a whole (metadata is text) are its own.
  const std::string path = write_text(
      dir / "m.json", head + R"("dim": 4, "note": 1, "note": 2, "shards": [)" + entry("a") + "]}");
  CHECK(read_manifest(path).shards.size() == 1);
}

TEST_CASE("A manifest's shard epochs are ascending, each once, read or written", "[shard_set]") {
  TempDir dir;
  Writer::create(dir / "a", opts(4)).close();
  const std::string id = read_info(dir / "a").store_id;
  auto text = [&](const std::string& epochs) {
    return R"({"embstore_manifest": 1, "dim": 4, "dtype": "float32", "shards": [{"path": "a", )"
           R"("store_id": ")" +
           id + R"(", "rows": 0, "epochs": )" + epochs + "}]}";
  };
  std::string message;
  for (const std::string& epochs : {"[3, 1]", "[0, 2, 2]"}) {
    const std::string path = write_text(dir / "m.json", text(epochs));
    REQUIRE(code_of([&] { read_manifest(path); }, &message) == ErrorCode::kCorruption);
    CHECK_THAT(message, Catch::StartsWith(path + ": shards[0]: field 'epochs' lists") &&
                            Catch::Contains("ascending, each once"));
  }
  CHECK(read_manifest(write_text(dir / "m.json", text("[0, 2, 7]"))).shards[0].epochs ==
        std::vector<std::uint64_t>{0, 2, 7});
  Manifest manifest;
  manifest.dim = 4;
  manifest.shards.push_back({"a", id, 0, {3, 1}});
  REQUIRE(code_of([&] { write_manifest(dir / "w.json", manifest); }, &message) ==
          ErrorCode::kInvalidArgument);
  CHECK_THAT(message, Catch::StartsWith(dir / "w.json: shards[0]: epochs[1] is 1 after 3"));
  CHECK(!std::filesystem::exists(dir / "w.json"));
}

TEST_CASE("write_manifest refuses what ShardSet::open refuses: no shards, a store listed twice",
          "[shard_set]") {
  TempDir dir;
  Writer::create(dir / "a", opts(4)).close();
  Writer::create(dir / "b", opts(4)).close();
  const std::string path = dir / "m.json";
  std::string message;
  Manifest manifest = manifest_of({}, dir);
  REQUIRE(code_of([&] { write_manifest(path, manifest); }, &message) ==
          ErrorCode::kInvalidArgument);
  CHECK_THAT(message, Catch::StartsWith(path + ": the manifest lists no shards"));
  manifest = manifest_of({"a", "b", "a"}, dir);
  REQUIRE(code_of([&] { write_manifest(path, manifest); }, &message) ==
          ErrorCode::kInvalidArgument);
  CHECK_THAT(message, Catch::StartsWith(path + ": shards[2] lists store " +
                                        manifest.shards[0].store_id + " again (shards[0] does)"));
  // One path, spelt two ways, under two store ids: the second entry names the first's store.
  manifest = manifest_of({"a", "b"}, dir);
  manifest.shards[1].path = "./a/";
  REQUIRE(code_of([&] { write_manifest(path, manifest); }, &message) ==
          ErrorCode::kInvalidArgument);
  CHECK_THAT(message, Catch::StartsWith(path + ": shards[1]: path './a/' names the shard of "
                                               "shards[0] ('a')"));
  CHECK(!std::filesystem::exists(path));
  manifest.shards[1].path = "b";
  write_manifest(path, manifest);
  CHECK(ShardSet::open(path).shard_count() == 2);
}

TEST_CASE("A manifest given with other paths, or an empty path, is refused naming it",
          "[shard_set]") {
  // A manifest beside store paths was opened as a store ("not an embstore store (no header
  // file)"); "" as "no store here", and manifest_file("") named "/manifest.json".
  TempDir dir;
  Writer::create(dir / "a", opts(4)).close();
  std::filesystem::create_directory(dir / "run");
  Writer::create(dir / "run/node-0", opts(4)).close();
  Manifest manifest;
  manifest.dim = 4;
  manifest.shards.push_back({"node-0", read_info(dir / "run/node-0").store_id, 0, {}});
  write_manifest(dir / "run/manifest.json", manifest);
  std::string message;
  for (const std::string& listed : {dir / "run/manifest.json", dir / "run"}) {
    REQUIRE(code_of(
                [&] {
                  ShardSet::open({dir / "a", listed});
                },
                &message) == ErrorCode::kInvalidArgument);
    CHECK_THAT(message, Catch::StartsWith(listed + " is a manifest") &&
                            Catch::Contains("a manifest must be the only input"));
  }
  CHECK(ShardSet::open(dir / "run").shard_count() == 1);
  CHECK_FALSE(manifest_file("").has_value());
  REQUIRE(code_of([&] { ShardSet::open(""); }, &message) == ErrorCode::kInvalidArgument);
  CHECK(message == "ShardSet: path 0 of 1 is empty; give a manifest or store paths");
  REQUIRE(code_of(
              [&] {
                ShardSet::open({dir / "a", ""});
              },
              &message) == ErrorCode::kInvalidArgument);
  CHECK_THAT(message, Catch::StartsWith("ShardSet: path 1 of 2 is empty"));
}

namespace {
// The process's resident set size now, or its peak since reset_peak_rss(), in bytes.
std::uint64_t rss_bytes(const char* field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field, 0) == 0) return std::stoull(line.substr(std::strlen(field))) * 1024;
  }
  FAIL("no " << field << " in /proc/self/status");
  return 0;
}
void reset_peak_rss() { std::ofstream("/proc/self/clear_refs") << "5"; }
}  // namespace

TEST_CASE("Reading a manifest takes memory of a few times its size, not a JSON tree's",
          "[shard_set]") {
  // The whole text was parsed into a tree (16 bytes a value and more), then its shard list and
  // each list of epochs copied again: a 100 MB manifest of 50 million epochs took 3.6 GB.
  TempDir dir;
  // Compact text, as any JSON writer may give it: 2 shards of 1.5 million epochs, 8 bytes each.
  std::string text = R"({"embstore_manifest": 1, "dim": 4, "dtype": "float32", "shards": [)";
  for (int s = 0; s < 2; ++s) {
    text += std::string(s ? "," : "") + R"({"path": "node-)" + std::to_string(s) +
            R"(", "store_id": ")" + std::string(32, 'a' + s) + R"(", "rows": 0, "epochs": [)";
    for (std::uint64_t e = 0; e < 1'500'000; ++e) {
      text += (e ? "," : "") + std::to_string(1'000'000 + e);
    }
    text += "]}";
  }
  text += "]}";
  const std::string path = write_text(dir / "m.json", text);
  const std::uint64_t file_bytes = text.size();
  text = std::string();
  reset_peak_rss();
  const std::uint64_t before = rss_bytes("VmRSS:");
  const Manifest back = read_manifest(path);
  const std::uint64_t taken = rss_bytes("VmHWM:") - before;
  INFO("file " << file_bytes << " bytes, reading took " << taken);
  REQUIRE(back.shards.size() == 2);
  REQUIRE(back.shards[1].epochs.size() == 1'500'000);
  REQUIRE(back.shards[1].epochs.back() == 2'499'999);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // Their allocators keep freed memory resident (ASan's quarantine: 496 MB for this file).
  WARN("a sanitizer's allocator keeps freed memory resident: not checked (" << taken << ")");
#else
  // The text, the epochs (8 bytes each) and a list's growth: under 3 times the file (10 times
  // with the tree); the margin is for an allocator that keeps some of what is freed.
  CHECK(taken < 6 * file_bytes);
#endif
}
