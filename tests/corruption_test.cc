// Hostile and truncated store files: every open refuses with an error naming the file and the
// field, never crashes, and never changes a byte of what is stored.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>
#include <vector>

#include "embstore/embstore.h"
#include "format/checksum.h"
#include "format/format.h"
#include "platform/testing.h"
#include "support/payload.h"
#include "support/process.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

constexpr std::uint32_t kDim = 4;

// dim kDim, 4 KiB segments.
CreateOptions small_options() {
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;
  return o;
}

// A store at `path` of `batches` batches of 30 rows: row r has key make_key(0, r), epoch r / 30.
void write_batches(const std::string& path, const CreateOptions& o, std::uint64_t batches) {
  Writer w = Writer::create(path, o);
  for (std::uint64_t b = 0; b < batches; ++b) {
    const auto values = test::batch_payload(0, b * 30, 30, kDim);
    std::vector<std::uint64_t> keys(30);
    for (std::uint64_t i = 0; i < 30; ++i) keys[i] = test::make_key(0, b * 30 + i);
    w.append(keys, b, std::span<const float>(values));
  }
}

// Whether one of the report's damage messages contains `text`.
bool says(const SalvageReport& report, const std::string& text) {
  return std::any_of(report.damage.begin(), report.damage.end(),
                     [&](const std::string& d) { return d.find(text) != std::string::npos; });
}

std::string make_store(const TempDir& dir) {
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;
  Writer w = Writer::create(path, o);
  const auto values = test::batch_payload(0, 0, 100, kDim);
  std::vector<std::uint64_t> keys(100);
  for (int i = 0; i < 100; ++i) keys[i] = test::make_key(0, i);
  w.append(keys, 0, std::span<const float>(values));
  return path;
}

template <typename T>
void put(const std::string& file, std::uint64_t offset, T value) {
  std::string bytes(sizeof(T), '\0');
  std::memcpy(bytes.data(), &value, sizeof(T));
  test::write_bytes(file, offset, bytes);
}

// Where the two copies of the fixed header sit (FORMAT.md).
constexpr std::uint64_t kCopies[] = {0, detail::kHeaderCopyOffset};

// Rewrites a fixed-header field in both copies and re-seals each checksum, so the field's own
// check (not the checksum) must catch it.
template <typename T>
void put_sealed(const std::string& header, std::uint64_t offset, T value) {
  for (std::uint64_t copy : kCopies) {
    put(header, copy + offset, value);
    std::string bytes = test::read_file(header);
    // make_store() writes no metadata, so the checksum covers bytes 0..119 only.
    put(header, copy + 120, detail::header_hash(bytes.data() + copy, 120, nullptr, 0));
  }
}

// Flips bit `bit` of byte `offset` of `file`.
void flip(const std::string& file, std::uint64_t offset, int bit = 2) {
  std::string b = test::read_file(file).substr(offset, 1);
  b[0] = static_cast<char>(b[0] ^ (1 << bit));
  test::write_bytes(file, offset, b);
}

std::string snapshot_bytes(const std::string& path) {
  std::string all;
  for (const char* name : {"header", "rows.1", "index.1", "lock"}) {
    if (::access((path + "/" + name).c_str(), F_OK) == 0) all += test::read_file(path + "/" + name);
  }
  return all;
}

// Opens as a reader and as a writer; both must throw `code` with all of `words` in the message,
// and leave every byte as it was.
void expect_refused(const std::string& path, ErrorCode code, std::vector<std::string> words) {
  const std::string before = snapshot_bytes(path);
  for (int role = 0; role < 2; ++role) {
    INFO((role == 0 ? "reader" : "writer"));
    try {
      if (role == 0) {
        Reader::open(path);
      } else {
        Writer::open(path);
      }
      FAIL("a hostile store was opened");
    } catch (const Error& e) {
      INFO(e.what());
      CHECK(e.code() == code);
      for (const auto& word : words) CHECK_THAT(std::string(e.what()), Catch::Contains(word));
    }
  }
  CHECK(snapshot_bytes(path) == before);
}

}  // namespace

TEST_CASE("Hostile headers are refused by name", "[corruption]") {
  TempDir dir;
  const std::string path = make_store(dir);
  const std::string header = path + "/header";
  SECTION("bad magic") {
    for (std::uint64_t copy : kCopies) test::write_bytes(header, copy, "NOTSTORE");
    expect_refused(path, ErrorCode::kNotFound, {header, "magic"});
  }
  SECTION("newer major version") {
    put_sealed<std::uint16_t>(header, 8, 2);
    expect_refused(path, ErrorCode::kUnsupportedVersion, {header, "format_major 2"});
  }
  SECTION("newer minor version: read, not written") {
    // A later minor may add rules its writers keep (FORMAT.md, "Versions"): a writer of this
    // library wrote to it without a word.
    put_sealed<std::uint16_t>(header, 10, 9);
    const std::string before = snapshot_bytes(path);
    CHECK(Reader::open(path).info().format_minor == 9);
    try {
      Writer::open(path);
      FAIL("a writer opened a store of a later minor");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kUnsupportedVersion);
      CHECK_THAT(e.what(), Catch::Contains("format 1.9, newer than this library's 1."));
    }
    CHECK(snapshot_bytes(path) == before);
  }
  SECTION("dim 0") {
    put_sealed<std::uint32_t>(header, 16, 0);
    expect_refused(path, ErrorCode::kCorruption, {header, "dim 0"});
  }
  SECTION("dim whose row size overflows") {
    put_sealed<std::uint32_t>(header, 16, 0x80000000u);
    expect_refused(path, ErrorCode::kCorruption, {header, "field dim"});
  }
  SECTION("unknown dtype") {
    put_sealed<std::uint8_t>(header, 12, 9);
    expect_refused(path, ErrorCode::kCorruption, {header, "field dtype 9"});
  }
  SECTION("a flipped bit in each copy the checksum catches") {
    for (std::uint64_t copy : kCopies) flip(header, copy + 60);
    expect_refused(path, ErrorCode::kCorruption, {header, "header_checksum"});
  }
  SECTION("truncated to 200, 1 and 0 bytes") {
    for (int size : {200, 1, 0}) {
      REQUIRE(::truncate(header.c_str(), size) == 0);
      expect_refused(path, size < 128 ? ErrorCode::kNotFound : ErrorCode::kCorruption, {header});
    }
  }
  SECTION("generation 0") {
    put<std::uint64_t>(header, 4096 + 256, 0);
    expect_refused(path, ErrorCode::kCorruption, {header, "generation 0"});
  }
}

TEST_CASE("Counters beyond capacity or the files are refused by name", "[corruption]") {
  TempDir dir;
  const std::string path = make_store(dir);
  const std::string header = path + "/header";
  SECTION("committed beyond the data file") {
    put<std::uint64_t>(header, 4096, 1'000'000);
    put<std::uint64_t>(header, 4096 + 128, 1'000'000);
    // The reader refuses because the files cannot back the rows; the writer names the counter.
    const std::string before = snapshot_bytes(path);
    try {
      Reader::open(path);
      FAIL("opened");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kCorruption);
      CHECK_THAT(std::string(e.what()), Catch::Contains("rows.1") && Catch::Contains("too short"));
    }
    try {
      Writer::open(path);
      FAIL("opened");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kCorruption);
      CHECK_THAT(std::string(e.what()), Catch::Contains("capacity_rows 1000000"));
    }
    CHECK(snapshot_bytes(path) == before);
  }
  SECTION("committed beyond capacity") {
    put<std::uint64_t>(header, 4096, 300);
    put<std::uint64_t>(header, 4096 + 128, 200);
    try {
      Writer::open(path);
      FAIL("opened");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kCorruption);
      CHECK_THAT(std::string(e.what()),
                 Catch::Contains("committed_rows 300") && Catch::Contains("capacity_rows 200"));
    }
  }
  SECTION("durable beyond committed") {
    put<std::uint64_t>(header, 4096 + 64, 500);
    try {
      Writer::open(path);
      FAIL("opened");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kCorruption);
      CHECK_THAT(std::string(e.what()), Catch::Contains("durable_rows 500"));
    }
  }
  SECTION("a counter near 2^64") {
    put<std::uint64_t>(header, 4096, ~0ull);
    expect_refused(path, ErrorCode::kCorruption, {});
  }
  SECTION("a truncated data file") {
    REQUIRE(::truncate((path + "/rows.1").c_str(), 1000) == 0);
    expect_refused(path, ErrorCode::kCorruption, {"rows.1"});
  }
  SECTION("a truncated index file") {
    REQUIRE(::truncate((path + "/index.1").c_str(), 64) == 0);
    expect_refused(path, ErrorCode::kCorruption, {"index.1"});
  }
  // Damage, not "no store here" (which open_or_create would take as a path to create at).
  SECTION("a missing index file") {
    REQUIRE(::unlink((path + "/index.1").c_str()) == 0);
    expect_refused(path, ErrorCode::kCorruption, {path + "/index.1: missing", "rows.1 is there"});
  }
  SECTION("a missing data file") {
    REQUIRE(::unlink((path + "/rows.1").c_str()) == 0);
    expect_refused(path, ErrorCode::kCorruption, {path + "/rows.1: missing", "index.1 is there"});
    try {
      salvage(path, dir / "out");
      FAIL("salvaged without the data file");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kCorruption);
      CHECK_THAT(std::string(e.what()), Catch::Contains(path + "/rows.1: missing"));
    }
    CHECK(::access((dir / "out").c_str(), F_OK) != 0);
  }
}

TEST_CASE("Garbage past the commit point is ignored and garbage in the index is reported",
          "[corruption]") {
  TempDir dir;
  const std::string path = make_store(dir);
  test::write_bytes(path + "/rows.1", 100 * kDim * 4, std::string(500, 'x'));
  test::write_bytes(path + "/index.1", 100 * 32, std::string(300, 'y'));
  {
    Reader r = Reader::open(path);
    CHECK(r.size() == 100);
    CHECK(r.verify().ok());
  }
  Writer w = Writer::open(path);
  const auto values = test::batch_payload(1, 0, 3, kDim);
  const std::vector<std::uint64_t> keys = {test::make_key(1, 0), test::make_key(1, 1),
                                           test::make_key(1, 2)};
  CHECK(w.append(keys, 0, std::span<const float>(values)) == 100);  // written over the garbage
  CHECK(Reader::open(path).verify().ok());
  // Now damage a committed index entry: the row is named, its neighbours still read.
  test::write_bytes(path + "/index.1", 50 * 32 + 8, "zz");
  Reader r = Reader::open(path);
  CHECK(r.verify().bad_rows == std::vector<std::uint64_t>{50});
  CHECK_THROWS_AS(r.record(50), Error);
  CHECK_NOTHROW(r.record(49));
  CHECK_NOTHROW(r.record(51));
}

TEST_CASE("One damaged copy of the fixed header or the metadata is not the end of a store",
          "[corruption][header]") {
  TempDir dir;
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;
  o.metadata = R"({"model": "m"})";
  {
    Writer w = Writer::create(path, o);
    const auto values = test::batch_payload(0, 0, 100, kDim);
    std::vector<std::uint64_t> keys(100);
    for (int i = 0; i < 100; ++i) keys[i] = test::make_key(0, i);
    w.append(keys, 0, std::span<const float>(values));
  }
  const std::string header = path + "/header";
  const std::string pristine = test::read_file(header);
  // Every row and the metadata read; verify names the damaged copy (`problem`), which went
  // unreported (from a review: one more damaged byte in the other copy, and the store is
  // unreadable), or none.
  const auto reads_everything = [&](const std::string& problem) {
    Reader r = Reader::open(path);
    CHECK(r.size() == 100);
    const VerifyReport report = r.verify();
    CHECK(report.bad_row_count == 0);
    CHECK(report.key_index_problems == 0);
    if (problem.empty()) {
      CHECK(report.header_problem.empty());
      CHECK(report.ok());
    } else {
      CHECK_THAT(report.header_problem, Catch::Contains(problem));
      CHECK(r.verify_header() == report.header_problem);
      CHECK(!report.ok());
    }
    CHECK(r.info().metadata == o.metadata);
    CHECK(r.info().dim == kDim);
    CHECK(r.info().format_minor == kFormatVersionMinor);
  };
  const std::string primary_fails = "the primary fixed header or its metadata fails its checks";
  const std::string copy_fails = "the fixed header copy at byte 2048 fails its checks";
  reads_everything("");
  for (std::uint64_t offset : {0, 8, 16, 40, 64, 100, 120, 127}) {
    INFO("primary byte " << offset);
    flip(header, offset);
    reads_everything(primary_fails);
    CHECK(read_info(path).committed_rows == 100);
    test::write_bytes(header, 0, pristine);
  }
  SECTION("a flipped metadata byte, which a writer restores") {
    flip(header, detail::kMetadataOffset + 3);
    reads_everything(primary_fails);
    // It rewrote the primary fixed header alone, which still failed over the damaged metadata
    // (from a review): one more byte in the metadata copy and the store was unreadable.
    { Writer w = Writer::open(path); }
    reads_everything("");
    CHECK(test::read_file(header).substr(detail::kMetadataOffset, o.metadata.size()) == o.metadata);
  }
  SECTION("a flipped byte in the copy") {
    flip(header, detail::kHeaderCopyOffset + 16);
    reads_everything(copy_fails);
  }
  SECTION("a writer restores the primary from the copy") {
    flip(header, 16);
    { Writer w = Writer::open(path); }
    CHECK(test::read_file(header).substr(0, 128) == pristine.substr(0, 128));
    reads_everything("");
    flip(header, detail::kHeaderCopyOffset + 16);  // now the copy alone is damaged
    reads_everything(copy_fails);
  }
  SECTION("a writer restores the copy from the primary") {
    // A damaged copy went unrepaired by writers: the store stayed one byte from unreadable.
    flip(header, detail::kHeaderCopyOffset + 16);
    { Writer w = Writer::open(path); }
    CHECK(test::read_file(header).substr(detail::kHeaderCopyOffset, 128) ==
          pristine.substr(detail::kHeaderCopyOffset, 128));
    reads_everything("");
    flip(header, 16);  // the primary now: the copy carries the store
    reads_everything(primary_fails);
  }
  SECTION("both copies damaged: refused, naming the primary's fault") {
    flip(header, 16);
    flip(header, detail::kHeaderCopyOffset + 16);
    expect_refused(path, ErrorCode::kCorruption, {header, "header_checksum"});
  }
}

TEST_CASE("A format 1.0 store is read as is and upgraded by a writer to two header copies",
          "[corruption][header]") {
  TempDir dir;
  const std::string path = make_store(dir);
  const std::string header = path + "/header";
  // What format 1.0 wrote: one fixed header, minor 0, zeros at the copy's place, no
  // metadata copy (make_store() writes no metadata).
  test::write_bytes(header, detail::kHeaderCopyOffset, std::string(128, '\0'));
  put<std::uint16_t>(header, 10, 0);
  put(header, 120, detail::header_hash(test::read_file(header).data(), 120, nullptr, 0));
  {
    Reader r = Reader::open(path);
    CHECK(r.info().format_minor == 0);
    CHECK(r.size() == 100);
  }
  flip(header, 16);  // one copy only: a damaged 1.0 header is refused
  expect_refused(path, ErrorCode::kCorruption, {header});
  flip(header, 16);
  { Writer w = Writer::open(path); }
  CHECK(read_info(path).format_minor == kFormatVersionMinor);
  flip(header, 16);  // after the upgrade, the copy carries the store
  Reader r = Reader::open(path);
  CHECK(r.size() == 100);
  const VerifyReport report = r.verify();
  CHECK(report.bad_row_count == 0);
  CHECK_THAT(report.header_problem,
             Catch::Contains("the primary fixed header or its metadata fails its checks"));
}

TEST_CASE("A store file or a manifest that is a FIFO is refused naming it without blocking",
          "[corruption]") {
  TempDir dir;
  const std::string path = make_store(dir);
  const std::string header = path + "/header";
  REQUIRE(std::rename(header.c_str(), (dir / "header.saved").c_str()) == 0);
  REQUIRE(::mkfifo(header.c_str(), 0644) == 0);
  const std::string manifest = dir / "m.json";
  REQUIRE(::mkfifo(manifest.c_str(), 0644) == 0);
  // In a child with an alarm: an open of a FIFO with no writer blocks for good.
  const pid_t child = test::spawn([&] {
    ::alarm(30);
    auto refused = [](const std::string& named, const std::function<void()>& open) {
      try {
        open();
      } catch (const Error& e) {
        if (e.code() == ErrorCode::kCorruption &&
            std::string(e.what()).find(named + ": is a FIFO") != std::string::npos) {
          return true;
        }
        std::fprintf(stderr, "unexpected: %s\n", e.what());
      }
      return false;
    };
    if (!refused(header, [&] { Reader::open(path); })) return 2;
    if (!refused(header, [&] { Writer::open(path); })) return 3;
    if (!refused(manifest, [&] { read_manifest(manifest); })) return 4;
    if (!refused(manifest, [&] { ShardSet::open(manifest); })) return 5;
    return 0;
  });
  CHECK(test::wait_for(child) == 0);
  // A directory in its place is refused the same way.
  REQUIRE(std::remove(header.c_str()) == 0);
  REQUIRE(::mkdir(header.c_str(), 0755) == 0);
  try {
    Reader::open(path);
    FAIL("a store whose header is a directory opened");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kCorruption);
    CHECK_THAT(std::string(e.what()), Catch::Contains(header + ": is a directory"));
  }
}

TEST_CASE("salvage copies every row that verifies out of a store that will not open",
          "[corruption][salvage]") {
  TempDir dir;
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;
  o.metadata = "run 7";
  write_batches(path, o, 10);
  // Rows 5 and 40..42 damaged, and a committed counter beyond capacity: no Reader or Writer
  // opens this store.
  const std::uint64_t record = kDim * sizeof(float);
  flip(path + "/rows.1", 5 * record + 1);
  for (std::uint64_t row = 40; row < 43; ++row) flip(path + "/index.1", row * 32 + 3);
  put<std::uint64_t>(path + "/header", 4096, 1'000'000);
  REQUIRE_THROWS_AS(Reader::open(path), Error);

  const SalvageReport report = salvage(path, dir / "out");
  CHECK(report.header_source == "primary");
  CHECK(report.rows_scanned == 300);
  CHECK(report.rows_copied == 296);
  CHECK(report.rows_lost == 4);
  using Range = std::pair<std::uint64_t, std::uint64_t>;
  CHECK(report.lost_ranges == std::vector<Range>{{5, 6}, {40, 43}});

  Reader r = Reader::open(dir / "out");
  REQUIRE(r.size() == 296);
  CHECK(r.verify().ok());
  CHECK(r.info().metadata == "run 7");
  std::uint64_t out_row = 0;
  for (std::uint64_t row = 0; row < 300; ++row) {
    if (row == 5 || (row >= 40 && row < 43)) continue;
    const Record rec = r.record(out_row);
    CHECK(rec.key == test::make_key(0, row));
    CHECK(rec.epoch == row / 30);
    CHECK(test::payload_matches(rec.key, kDim, rec.data));
    ++out_row;
  }
  SECTION("the header copy serves when the primary is damaged too") {
    flip(path + "/header", 16);
    const SalvageReport again = salvage(path, dir / "out2");
    CHECK(again.header_source == "copy");
    CHECK(again.rows_copied == 296);
  }
  SECTION("an existing output is refused") { CHECK_THROWS_AS(salvage(path, dir / "out"), Error); }
}

TEST_CASE("salvage of files cut short keeps the rows they hold and counts the rest as lost",
          "[corruption][salvage]") {
  // 300 committed rows (10 batches of 30); files cut short hold fewer. The rows they hold are
  // committed rows, copied wherever they verify, whole batch or not; the committed rows past
  // their end are lost, in the report's count and ranges, and `damage` says why. With both
  // files cut (the rows synced: a sync flushed them, so they were there), salvage judged by
  // whether the other file still held the committed rows: it dropped the committed rows of the
  // cut batch that verify and reported no row lost.
  struct Cut {
    const char* what;
    std::uint64_t data_bytes, index_bytes;  // 0: not cut
    std::uint64_t held;
  };
  const std::uint64_t record = kDim * sizeof(float);
  const Cut cut = GENERATE_COPY(Cut{"rows.1 inside row 250", 250 * record + 7, 0, 250},
                                Cut{"index.1 at 205", 0, 205 * 32, 205},
                                Cut{"both inside batch 240..269", 256 * record, 256 * 32, 256},
                                Cut{"both to nothing", 1, 1, 0});
  INFO(cut.what);
  TempDir dir;
  const std::string path = dir / "s";
  write_batches(path, small_options(), 10);
  {
    Writer w = Writer::open(path);
    w.sync();
    REQUIRE(w.durable_rows() == 300);
  }
  for (const auto& [file, bytes] :
       {std::pair{"/rows.1", cut.data_bytes}, {"/index.1", cut.index_bytes}}) {
    if (bytes > 0)
      REQUIRE(::truncate((path + file).c_str(), static_cast<off_t>(bytes == 1 ? 0 : bytes)) == 0);
  }
  const std::uint64_t held = cut.held;

  const SalvageReport report = salvage(path, dir / "out");
  CHECK(report.rows_scanned == 300);
  CHECK(report.rows_copied == held);
  CHECK(report.rows_lost == 300 - held);
  using Range = std::pair<std::uint64_t, std::uint64_t>;
  CHECK(report.lost_ranges == std::vector<Range>{{held, 300}});
  CHECK(says(report, "cut short?): rows " + std::to_string(held) + "..300 are lost"));
  Reader r = Reader::open(dir / "out");
  REQUIRE(r.size() == held);
  CHECK(r.verify().ok());
  for (std::uint64_t row = 0; row < held; ++row) {
    const Record rec = r.record(row);
    CHECK(rec.key == test::make_key(0, row));
    CHECK(test::payload_matches(rec.key, kDim, rec.data));
  }
}

TEST_CASE("salvage takes a counter past both files, capacity and all, for the damage itself",
          "[corruption][salvage]") {
  // committed_rows and capacity_rows both damaged high, the files whole: no file was cut short,
  // so no committed row is claimed lost past them (the open's refusal names the damage).
  TempDir dir;
  const std::string path = dir / "s";
  write_batches(path, small_options(), 10);
  put<std::uint64_t>(path + "/header", 4096, 1'000'000);        // committed_rows
  put<std::uint64_t>(path + "/header", 4096 + 128, 2'000'000);  // capacity_rows
  const SalvageReport report = salvage(path, dir / "out");
  CHECK(report.rows_scanned == 300);
  CHECK(report.rows_copied == 300);
  CHECK(report.rows_lost == 0);
  CHECK(report.lost_ranges.empty());
  REQUIRE_FALSE(report.damage.empty());
  CHECK_THAT(report.damage[0], Catch::Contains("capacity_rows 2000000 exceeds"));
}

TEST_CASE("salvage names rows it copies past the committed counter and a damaged header copy",
          "[corruption][salvage]") {
  TempDir dir;
  const std::string path = dir / "s";
  write_batches(path, small_options(), 10);
  SECTION("whole batches past the counter: copied, and said") {
    // As a writer killed before publishing its last two batches leaves them.
    put<std::uint64_t>(path + "/header", 4096, 240);       // committed_rows
    put<std::uint64_t>(path + "/header", 4096 + 64, 240);  // durable_rows
    REQUIRE(Reader::open(path).size() == 240);
    const SalvageReport report = salvage(path, dir / "out");
    CHECK(report.rows_copied == 300);
    CHECK(report.rows_lost == 0);
    REQUIRE(report.damage.size() == 1);
    CHECK_THAT(report.damage[0],
               Catch::Contains("rows 240..300 past committed_rows") && Catch::Contains("rows.1"));
  }
  SECTION("the second header copy damaged") {
    flip(path + "/header", detail::kHeaderCopyOffset + 16);
    const std::string problem = Reader::open(path).verify_header();
    REQUIRE_FALSE(problem.empty());
    const SalvageReport report = salvage(path, dir / "out");
    CHECK(report.header_source == "primary");
    CHECK(report.rows_copied == 300);
    CHECK(report.damage == std::vector<std::string>{problem});
  }
}

TEST_CASE("salvage of a store a live writer appends to copies its committed rows, no damage",
          "[corruption][salvage]") {
  // A writer that has written a whole batch and not yet published it holds the writer lock:
  // that batch is its batch in the making, not one a killed writer left. salvage called it
  // damage (copied, exit 1 in the CLI) whenever it read the store in that window (a review).
  TempDir dir;
  const std::string path = dir / "s";
  const std::string pauses = dir / "pauses";
  std::filesystem::create_directory(pauses);
  write_batches(path, small_options(), 4);
  Writer w = Writer::open(path);
  detail::testing::arm_pause("before-publish", 1, pauses);
  std::thread appender([&] {
    const auto values = test::batch_payload(0, 120, 30, kDim);
    std::vector<std::uint64_t> keys(30);
    for (std::uint64_t i = 0; i < 30; ++i) keys[i] = test::make_key(0, 120 + i);
    w.append(keys, 4, std::span<const float>(values));
  });
  const bool paused = test::within_a_minute(
      [&] { return std::filesystem::exists(pauses + "/paused.before-publish"); });
  SalvageReport report;
  if (paused) report = salvage(path, dir / "out");
  std::ofstream(pauses + "/resume.before-publish").put('r');
  appender.join();
  detail::testing::disarm_all();
  REQUIRE(paused);
  CHECK(report.writer_active);
  CHECK(report.rows_scanned == 120);
  CHECK(report.rows_copied == 120);
  CHECK(report.rows_lost == 0);
  CHECK(report.damage.empty());
  Reader out = Reader::open(dir / "out");
  CHECK(out.size() == 120);
  CHECK(out.verify().ok());
  CHECK(w.committed_rows() == 150);
  w.close();
  // With the writer gone, the same store: nothing active, nothing damaged, every row.
  const SalvageReport after = salvage(path, dir / "after");
  CHECK_FALSE(after.writer_active);
  CHECK(after.rows_copied == 150);
  CHECK(after.damage.empty());
}

TEST_CASE("salvage beside a writer that grows the files and commits after its counters are read",
          "[corruption][salvage]") {
  // salvage read the files' sizes before the counters: a writer's growth and commits between the
  // two reads made the files look cut short below committed_rows (rows "lost", exit 1) on a
  // healthy store (a review: 1 salvage in 370 beside a writer of 2,000-row batches).
  TempDir dir;
  const std::string path = dir / "s";
  const std::string pauses = dir / "pauses";
  std::filesystem::create_directory(pauses);
  write_batches(path, small_options(), 4);  // 120 rows; 4 KiB segments: every batch grows them
  detail::testing::arm_pause("salvage-counted", 1, pauses);
  SalvageReport report;
  std::thread salvager([&] { report = salvage(path, dir / "out"); });
  const bool paused = test::within_a_minute(
      [&] { return std::filesystem::exists(pauses + "/paused.salvage-counted"); });
  if (paused) {
    Writer w = Writer::open(path);
    for (std::uint64_t b = 4; b < 14; ++b) {  // 420 rows: past the 256 a 4 KiB segment holds
      const auto values = test::batch_payload(0, b * 30, 30, kDim);
      std::vector<std::uint64_t> keys(30);
      for (std::uint64_t i = 0; i < 30; ++i) keys[i] = test::make_key(0, b * 30 + i);
      w.append(keys, b, std::span<const float>(values));
    }
  }
  std::ofstream(pauses + "/resume.salvage-counted").put('r');
  salvager.join();
  detail::testing::disarm_all();
  REQUIRE(paused);
  CHECK(report.damage.empty());
  CHECK(report.writer_active);  // The counter moved while salvage read the store.
  CHECK(report.rows_lost == 0);
  CHECK(report.rows_copied == 120);
  CHECK(Reader::open(dir / "out").verify().ok());
}

TEST_CASE("salvage never copies part of a batch a killed writer left past the commit point",
          "[corruption][salvage]") {
  // A writer killed while writing its fifth batch leaves that batch's first rows valid and its
  // last entry unwritten; the counters say 4 batches. salvage copied the valid rows of the
  // fifth (an append that never returned, half of it), and called nothing lost.
  TempDir dir;
  const std::string path = dir / "s";
  write_batches(path, small_options(), 6);
  // Batch 5 (rows 120..149) whole past the counters; batch 6 (rows 150..179) without its last
  // entry, as the kill left it.
  put<std::uint64_t>(path + "/header", 4096, 120);  // committed_rows
  put<std::uint64_t>(path + "/header", 4160, 120);  // durable_rows
  for (std::uint64_t byte = 0; byte < 32; ++byte) {
    put<std::uint8_t>(path + "/index.1", 179 * 32 + byte, 0);
  }
  auto check_copy = [&](const std::string& out, std::uint64_t rows) {
    Reader r = Reader::open(out);
    REQUIRE(r.size() == rows);
    CHECK(r.verify().ok());
    for (std::uint64_t row = 0; row < rows; ++row) {
      const Record rec = r.record(row);
      CHECK(rec.key == test::make_key(0, row));
      CHECK(rec.epoch == row / 30);
    }
  };
  SECTION("the counter sound: its rows, then whole batches that verify") {
    const SalvageReport report = salvage(path, dir / "out");
    CHECK(report.rows_scanned == 150);
    CHECK(report.rows_copied == 150);
    CHECK(report.rows_lost == 0);
    // The whole batch past the counter, copied, and the unfinished batch's rows, not copied:
    // both said.
    REQUIRE(report.damage.size() == 2);
    CHECK_THAT(report.damage[0], Catch::Contains("rows 120..150 past committed_rows verify as "
                                                 "whole batches and were copied"));
    CHECK_THAT(report.damage[1], Catch::Contains("29 rows past row 150 verify but were not "
                                                 "copied: the rest of a batch whose end is "
                                                 "missing or damaged"));
    check_copy(dir / "out", 150);
  }
  SECTION("the counter damaged low: rows that verify past it are copied, a bad one is lost") {
    // The counter says 20 rows; row 55 is damaged: everything else up to row 150 is copied.
    put<std::uint64_t>(path + "/header", 4096, 20);
    put<std::uint64_t>(path + "/header", 4160, 20);
    flip(path + "/rows.1", 55 * kDim * sizeof(float) + 1);
    const SalvageReport report = salvage(path, dir / "out");
    CHECK(report.rows_scanned == 150);
    CHECK(report.rows_copied == 149);
    CHECK(report.rows_lost == 1);
    using Range = std::pair<std::uint64_t, std::uint64_t>;
    CHECK(report.lost_ranges == std::vector<Range>{{55, 56}});
  }
  SECTION("the counter damaged (beyond the files): up to the last valid row ending a batch") {
    put<std::uint64_t>(path + "/header", 4096, 1'000'000);
    const SalvageReport report = salvage(path, dir / "out");
    CHECK(report.rows_scanned == 150);
    CHECK(report.rows_copied == 150);
    check_copy(dir / "out", 150);
  }
}

TEST_CASE("salvage copies no stale row of an older era, and names rows it leaves that verify",
          "[corruption][salvage]") {
  TempDir dir;
  const std::string path = dir / "s";
  const CreateOptions o = small_options();
  SECTION("rows past a cut, then a newer writer's rows") {
    // 60 rows, cut back to 30 (a recovery, as after a writer killed before committing its
    // batch), then 10 rows of a newer era: rows 40..59 of the old batch still verify. salvage
    // copied them after the new rows (scanning back to the last valid batch end).
    write_batches(path, o, 2);
    put<std::uint64_t>(path + "/header", 4096, 30);
    put<std::uint64_t>(path + "/header", 4160, 30);
    {
      Writer w = Writer::open(path);
      const auto values = test::batch_payload(1, 0, 10, kDim);
      std::vector<std::uint64_t> keys(10);
      for (std::uint64_t i = 0; i < 10; ++i) keys[i] = test::make_key(1, i);
      w.append(keys, 9, std::span<const float>(values));
    }
    const SalvageReport report = salvage(path, dir / "out");
    CHECK(report.rows_scanned == 40);
    CHECK(report.rows_copied == 40);
    CHECK(report.rows_lost == 0);
    REQUIRE(report.damage.size() == 1);
    CHECK_THAT(report.damage[0], Catch::Contains("20 rows past row 40 verify but were not copied"));
    Reader r = Reader::open(dir / "out");
    REQUIRE(r.size() == 40);
    CHECK(r.record(29).key == test::make_key(0, 29));
    CHECK(r.record(30).key == test::make_key(1, 0));
    CHECK(r.record(39).key == test::make_key(1, 9));
    SECTION("and the last committed row damaged") {
      // Its era was then not known (it did not verify), so the stale rows 40..59 of the older
      // era past it were copied as if they continued the log.
      flip(path + "/rows.1", 39 * kDim * sizeof(float) + 3);
      const SalvageReport damaged = salvage(path, dir / "out2");
      CHECK(damaged.rows_scanned == 40);
      CHECK(damaged.rows_copied == 39);
      using Range = std::pair<std::uint64_t, std::uint64_t>;
      CHECK(damaged.lost_ranges == std::vector<Range>{{39, 40}});
      CHECK(Reader::open(dir / "out2").size() == 39);
    }
  }
  SECTION("a damaged batch end past a low counter: the batch's rows are named, not dropped") {
    write_batches(path, o, 4);
    put<std::uint64_t>(path + "/header", 4096, 30);
    put<std::uint64_t>(path + "/header", 4160, 30);
    flip(path + "/rows.1", 119 * kDim * sizeof(float) + 1);  // the last batch's end
    const SalvageReport report = salvage(path, dir / "out");
    CHECK(report.rows_scanned == 90);
    CHECK(report.rows_copied == 90);
    REQUIRE(report.damage.size() == 2);  // (counters that agree: the open refuses nothing)
    CHECK_THAT(report.damage[0], Catch::Contains("rows 30..90 past committed_rows"));
    CHECK_THAT(report.damage.back(), Catch::Contains("29 rows past row 90 verify but were not "
                                                     "copied"));
  }
}
