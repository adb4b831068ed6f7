// Writer::truncate: rolling a store back to a prefix through a new generation of its files, with
// live Readers, Writers of other processes, and kills at every step of the switch.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "format/format.h"
#include "platform/testing.h"
#include "support/error_code.h"
#include "support/payload.h"
#include "support/process.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

constexpr std::uint32_t kDim = 8;
const char* const kBootA = "11111111-1111-1111-1111-111111111111";
const char* const kBootB = "22222222-2222-2222-2222-222222222222";

struct BootReset {
  ~BootReset() { detail::testing::set_boot_id(""); }
};

WriterOptions unsynced() {
  WriterOptions options;
  options.sync = SyncPolicy::kNone;
  return options;
}

// Appends rows seq [first, first + n) of `writer` with one epoch.
void append_rows(Writer& w, std::uint64_t writer, std::uint64_t first, std::uint64_t n,
                 std::uint64_t epoch) {
  const auto values = test::batch_payload(writer, first, n, kDim);
  std::vector<std::uint64_t> keys(n);
  for (std::uint64_t i = 0; i < n; ++i) keys[i] = test::make_key(writer, first + i);
  w.append(keys, epoch, std::span<const float>(values));
}

Writer make_store(const std::string& path, const WriterOptions& options = {}) {
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;  // Several growths for 100 rows: the copy crosses segments.
  return Writer::create(path, o, options);
}

// Every row of the reader's snapshot is row `row` of writer 0 at its place, and verifies.
void check_prefix(const Reader& r, std::uint64_t rows) {
  REQUIRE(r.size() == rows);
  for (std::uint64_t row = 0; row < rows; ++row) {
    const Record rec = r.record(row);
    REQUIRE(rec.key == test::make_key(0, row));
    REQUIRE(test::payload_matches(rec.key, kDim, rec.data));
  }
  const VerifyReport report = r.verify();
  CHECK(report.bad_row_count == 0);
  CHECK(report.key_index_problems == 0);
}

// Descriptors of this process open on a store's files in `dir` (rows.G, index.G, keys.K) that
// were deleted (/proc/self/fd). (A key index being built is an unnamed file, "#inode".)
int deleted_files_open_in(const std::string& dir) {
  int n = 0;
  for (const auto& fd : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const std::string target = std::filesystem::read_symlink(fd.path(), ec).string();
    const bool hit =
        !ec && target.ends_with(" (deleted)") &&
        (target.rfind(dir + "/rows.", 0) == 0 || target.rfind(dir + "/index.", 0) == 0 ||
         target.rfind(dir + "/keys.", 0) == 0);
    if (hit) UNSCOPED_INFO("open, deleted: " << target);
    n += hit;
  }
  return n;
}

// 40 rows of writer 0 in two batches (epochs 0 and 1), synced, in boot kBootA.
void make_synced_rows_in_boot_a(const std::string& path) {
  detail::testing::set_boot_id(kBootA);
  Writer w = make_store(path, unsynced());
  append_rows(w, 0, 0, 20, 0);
  append_rows(w, 0, 20, 20, 1);
  w.sync();
}

// A child process truncates the store to `rows` and is killed once the switch is decided (the
// flag stored and flushed), before it finishes it.
void kill_truncate_once_decided(const std::string& path, std::uint64_t rows) {
  const pid_t child = test::spawn([&] {
    Writer w = Writer::open(path, unsynced());
    detail::testing::arm_crash("truncate-flagged", 1);
    w.truncate(rows);
    return 1;
  });
  REQUIRE(test::wait_for(child) == 128 + SIGKILL);
}

}  // namespace

TEST_CASE("A truncate lets go of the old files at once, whatever the sync policy", "[truncate]") {
  // The truncating handle kept the old generation's descriptors until its next sync or close:
  // a store truncated to reclaim its space kept all of it (with SyncPolicy::kNone, until the
  // caller synced).
  const SyncPolicy policy = GENERATE(SyncPolicy::kNone, SyncPolicy::kInterval);
  TempDir dir;
  const std::string path = dir / "s";
  WriterOptions options;
  options.sync = policy;
  Writer w = make_store(path, options);
  for (std::uint64_t b = 0; b < 10; ++b) append_rows(w, 0, b * 10, 10, b);
  CHECK(w.truncate(5) == 5);
  CHECK_FALSE(std::filesystem::exists(path + "/rows.1"));
  CHECK(deleted_files_open_in(path) == 0);
  append_rows(w, 0, 5, 10, 1);  // and the new files take appends
  CHECK(w.committed_rows() == 15);
}

TEST_CASE("Truncate keeps a prefix, and the store takes appends and reopens", "[truncate]") {
  TempDir dir;
  const std::string path = dir / "s";
  {
    Writer w = make_store(path);
    for (std::uint64_t b = 0; b < 10; ++b) append_rows(w, 0, b * 10, 10, b);
    CHECK(w.truncate(37) == 37);
    CHECK(w.committed_rows() == 37);
    CHECK(w.durable_rows() == 37);
    CHECK(w.info().generation == 2);
    CHECK(test::file_size(path + "/rows.2") > 0);
    CHECK_FALSE(std::filesystem::exists(path + "/rows.1"));
    CHECK_FALSE(std::filesystem::exists(path + "/index.1"));
    append_rows(w, 0, 37, 13, 20);
    CHECK(w.committed_rows() == 50);
    w.close();
  }
  Reader r = Reader::open(path);
  check_prefix(r, 50);
  CHECK(r.find(test::make_key(0, 40)) == std::optional<std::uint64_t>(40));
  CHECK(r.epochs().back().epoch == 20);
  // The batch the truncate cut ends at row 36 now: a writer after a reboot keeps it whole.
  {
    BootReset reset;
    detail::testing::set_boot_id(kBootB);
    Writer w = Writer::open(path, unsynced());
    CHECK(w.committed_rows() == 50);
  }
}

TEST_CASE("read_generation names the files a truncate switched to, and refuses a non-store",
          "[truncate]") {
  TempDir dir;
  const std::string path = dir / "s";
  {
    Writer w = make_store(path);
    append_rows(w, 0, 0, 10, 0);
    CHECK(read_generation(path) == 1);
    w.truncate(4);
    CHECK(read_generation(path) == 2);
    CHECK(read_generation(path + "/") == w.info().generation);
  }
  std::string message;
  CHECK(test::code_of([&] { read_generation(dir / "none"); }, &message) == ErrorCode::kNotFound);
  CHECK_THAT(message, Catch::Contains("none/header"));
  // A header cut inside its state page: named, never a read past the end of a mapping.
  const std::string cut = dir / "cut";
  std::filesystem::create_directory(cut);
  std::filesystem::copy_file(path + "/header", cut + "/header");
  std::filesystem::resize_file(cut + "/header", 4100);
  CHECK(test::code_of([&] { read_generation(cut); }, &message) == ErrorCode::kCorruption);
  CHECK_THAT(message, Catch::Contains("4100 bytes"));
}

TEST_CASE("Truncate refuses more rows than the store holds and ignores as many", "[truncate]") {
  TempDir dir;
  const std::string path = dir / "s";
  Writer w = make_store(path);
  append_rows(w, 0, 0, 20, 0);
  try {
    w.truncate(21);
    FAIL("truncate past the end succeeded");
  } catch (const Error& error) {
    CHECK(error.code() == ErrorCode::kInvalidArgument);
    CHECK_THAT(error.what(), Catch::Contains("21") && Catch::Contains("20 rows"));
  }
  CHECK(w.truncate(20) == 20);
  CHECK(w.info().generation == 1);        // Nothing was rewritten.
  CHECK(w.truncate_from_epoch(1) == 20);  // No row of epoch >= 1.
  CHECK(w.info().generation == 1);
  CHECK(w.truncate(0) == 0);
  append_rows(w, 0, 0, 5, 0);
  w.close();
  check_prefix(Reader::open(path), 5);
}

TEST_CASE(
    "A truncate refuses to keep an all-zero entry or to end on a damaged row, store unchanged",
    "[truncate]") {
  // Both only in a damaged store. The switch ends the new generation at its first all-zero
  // entry, so keeping one dropped every row after it while truncate reported them kept; and the
  // last row kept gets the batch-end flag with a checksum recomputed over its bytes, which made
  // a damaged row verify. Reliability scenario 13 found the first through the fuzz entry.
  TempDir dir;
  const std::string path = dir / "s";
  {
    Writer w = make_store(path, unsynced());
    for (std::uint64_t batch = 0; batch < 3; ++batch) append_rows(w, 0, batch * 10, 10, batch);
  }
  auto expect_refused = [&](Writer& w, std::uint64_t rows, const std::vector<std::string>& words) {
    try {
      w.truncate(rows);
      FAIL("a truncate to " << rows << " rows of a damaged store succeeded");
    } catch (const Error& error) {
      CHECK(error.code() == ErrorCode::kCorruption);
      for (const std::string& word : words) CHECK_THAT(error.what(), Catch::Contains(word));
    }
    // Nothing was written: the same generation, rows and files.
    CHECK(w.committed_rows() == 30);
    CHECK(w.info().generation == 1);
    CHECK_FALSE(std::filesystem::exists(path + "/index.2"));
    CHECK_FALSE(std::filesystem::exists(path + "/rows.2"));
  };
  auto bad_rows = [&] { return Reader::open(path).verify().bad_rows; };

  SECTION("an all-zero entry among the rows kept") {
    test::write_bytes(path + "/index.1", 12 * detail::kIndexEntryBytes,
                      std::string(detail::kIndexEntryBytes, '\0'));
    Writer w = Writer::open(path, unsynced());
    expect_refused(w, 20, {path + "/index.1", "row 12", "all zero", "at most 12 rows"});
    try {
      w.truncate_from_epoch(2);  // Keeps 20 rows: the same refusal.
      FAIL("a truncate from epoch 2 of a damaged store succeeded");
    } catch (const Error& error) {
      CHECK(error.code() == ErrorCode::kCorruption);
    }
    CHECK(bad_rows() == std::vector<std::uint64_t>{12});
    // The rows before it can be kept, and the writer goes on.
    CHECK(w.truncate(12) == 12);
    append_rows(w, 0, 12, 3, 5);
    w.close();
    check_prefix(Reader::open(path), 15);
  }
  SECTION("a damaged last row that does not end a batch") {
    test::write_bytes(path + "/rows.1", 14 * kDim * sizeof(float), "damaged!");
    Writer w = Writer::open(path, unsynced());
    expect_refused(w, 15, {path + "/rows.1", "row 14", "fails its checksum", path + "/index.1"});
    CHECK(bad_rows() == std::vector<std::uint64_t>{14});
    // Kept inside the prefix, the damaged row stays as it is and still fails its checksum.
    CHECK(w.truncate(20) == 20);
    w.close();
    Reader r = Reader::open(path);
    CHECK(r.size() == 20);
    CHECK(r.verify().bad_rows == std::vector<std::uint64_t>{14});
  }
}

TEST_CASE("Truncate from an epoch drops its first row and everything after", "[truncate]") {
  TempDir dir;
  const std::string path = dir / "s";
  Writer w = make_store(path);
  for (std::uint64_t epoch = 0; epoch < 5; ++epoch) append_rows(w, 0, epoch * 10, 10, epoch);
  append_rows(w, 0, 50, 5, 1);  // An earlier epoch after epoch 4: dropped too (a prefix).
  CHECK(w.truncate_from_epoch(3) == 30);
  w.close();
  Reader r = Reader::open(path);
  check_prefix(r, 30);
  const auto epochs = r.epochs();
  REQUIRE(epochs.size() == 3);
  CHECK(epochs.back().epoch == 2);
  CHECK(r.epoch_rows(3).empty());
}

TEST_CASE("A live Reader keeps its views across a truncate and sees it after refresh",
          "[truncate]") {
  TempDir dir;
  const std::string path = dir / "s";
  Writer w = make_store(path);
  for (std::uint64_t b = 0; b < 5; ++b) append_rows(w, 0, b * 10, 10, 0);
  Reader r = Reader::open(path);
  REQUIRE(r.size() == 50);
  const RowsView view = r.rows(0, 50);
  const auto keys = r.keys(0, 50);
  const std::string before(reinterpret_cast<const char*>(view.data), view.size_bytes());
  CHECK(r.find(test::make_key(0, 45)) == std::optional<std::uint64_t>(45));

  CHECK(w.truncate(20) == 20);
  // Rows of another writer land in the new generation over the dropped ones' places.
  append_rows(w, 1, 0, 10, 7);

  // Unchanged until refresh: the same snapshot, views and lookups over the old files.
  CHECK(r.size() == 50);
  CHECK(std::memcmp(before.data(), view.data, before.size()) == 0);
  CHECK(keys[45] == test::make_key(0, 45));
  CHECK(r.find(test::make_key(0, 45)) == std::optional<std::uint64_t>(45));
  CHECK(r.record(45).key == test::make_key(0, 45));

  CHECK(r.refresh() == 30);  // The snapshot went down to the truncated store plus the append.
  CHECK(std::memcmp(before.data(), view.data, before.size()) == 0);
  CHECK_FALSE(r.find(test::make_key(0, 45)).has_value());
  CHECK(r.history(test::make_key(0, 45)).empty());
  CHECK(r.find(test::make_key(1, 3)) == std::optional<std::uint64_t>(23));
  CHECK(r.find(test::make_key(0, 19)) == std::optional<std::uint64_t>(19));
  CHECK(r.epoch_rows(7).size() == 10);
  const VerifyReport report = r.verify();
  CHECK(report.bad_row_count == 0);
  CHECK(report.key_index_problems == 0);
  w.close();
}

TEST_CASE("A Writer of another process appends into the new generation after a truncate",
          "[truncate][multiprocess]") {
  TempDir dir;
  const std::string path = dir / "s";
  Writer w = make_store(path, unsynced());  // No sync thread in the process that forks.
  for (std::uint64_t b = 0; b < 5; ++b) append_rows(w, 0, b * 10, 10, 0);
  test::Pipe opened, go;
  const pid_t child = test::spawn([&] {
    Writer other = Writer::open(path);  // At generation 1, before the truncate.
    append_rows(other, 2, 0, 4, 1);     // Rows [50, 54): dropped by the truncate below.
    const char ready = 'r';
    opened.send(&ready, 1);
    if (go.receive(1).size() != 1) return 2;
    append_rows(other, 1, 0, 10, 2);  // After the truncate: must land at rows [25, 35).
    other.close();
    return 0;
  });
  REQUIRE(opened.receive(1).size() == 1);
  CHECK(w.committed_rows() == 54);
  CHECK(w.truncate(25) == 25);
  const char proceed = 'g';
  go.send(&proceed, 1);
  REQUIRE(test::wait_for(child) == 0);
  CHECK(w.committed_rows() == 35);
  append_rows(w, 0, 25, 5, 3);  // This handle too, after the other process's append.
  w.close();
  Reader r = Reader::open(path);
  REQUIRE(r.size() == 40);
  for (std::uint64_t row = 0; row < 40; ++row) {
    const std::uint64_t expected = row < 25   ? test::make_key(0, row)
                                   : row < 35 ? test::make_key(1, row - 25)
                                              : test::make_key(0, row - 10);
    const Record rec = r.record(row);
    REQUIRE(rec.key == expected);
    REQUIRE(test::payload_matches(rec.key, kDim, rec.data));
  }
  CHECK_FALSE(r.find(test::make_key(2, 0)).has_value());
  CHECK(r.verify().bad_row_count == 0);
  CHECK_FALSE(std::filesystem::exists(path + "/rows.1"));
}

TEST_CASE("A truncate killed at any step leaves the old store or the new one",
          "[truncate][crash]") {
  BootReset reset;
  struct Point {
    const char* name;
    bool decided;  // The switch was decided before the kill: the new store.
  };
  const Point point =
      GENERATE(Point{"truncate-copied", false}, Point{"truncate-files-synced", false},
               Point{"truncate-flag-stored", true}, Point{"truncate-flagged", true},
               Point{"truncate-mid-switch", true}, Point{"truncate-switched", true});
  const bool reboot = GENERATE(false, true);
  const bool reader_first = GENERATE(false, true);
  INFO(point.name << (reboot ? ", after a reboot" : ", same boot")
                  << (reader_first ? ", a Reader opens first" : ""));
  TempDir dir;
  const std::string path = dir / "s";
  detail::testing::set_boot_id(kBootA);
  {
    Writer w = make_store(path, unsynced());
    for (std::uint64_t b = 0; b < 4; ++b) append_rows(w, 0, b * 20, 20, b);
    w.sync();
    append_rows(w, 0, 80, 20, 4);  // Not synced: a reboot re-verifies it.
  }
  const pid_t child = test::spawn([&] {
    Writer w = Writer::open(path, unsynced());
    detail::testing::arm_crash(point.name, 1);
    w.truncate(37);
    return 1;
  });
  REQUIRE(test::wait_for(child) == 128 + SIGKILL);
  // Once the switch is decided (the flag stored, not yet cleared) the store is generation 2.
  CHECK(read_generation(path) == (point.decided ? 2 : 1));
  if (!reboot && !reader_first) {
    // salvage copies the store an open shows. With the flag stored the counters may be
    // half-stored and are not read (the new files hold the store): salvage read committed_rows
    // anyway and reported the rows the truncate dropped on purpose as lost (exit 1 from the CLI).
    const SalvageReport report = salvage(path, dir / "out");
    CHECK(report.rows_copied == (point.decided ? 37 : 100));
    CHECK(report.rows_lost == 0);
    CHECK(report.lost_ranges.empty());
    check_prefix(Reader::open(dir / "out"), point.decided ? 37 : 100);
  }
  if (reboot) detail::testing::set_boot_id(kBootB);
  const std::uint64_t expected = point.decided ? 37 : 100;
  if (reader_first) check_prefix(Reader::open(path), expected);
  {
    Writer w = Writer::open(path, unsynced());
    CHECK(w.committed_rows() == expected);
    CHECK(w.info().generation == (point.decided ? 2 : 1));
    // Leftovers of the other generation are gone.
    CHECK_FALSE(std::filesystem::exists(path + (point.decided ? "/rows.1" : "/rows.2")));
    CHECK_FALSE(std::filesystem::exists(path + (point.decided ? "/index.1" : "/index.2")));
    append_rows(w, 0, expected, 3, 9);
    w.close();
  }
  check_prefix(Reader::open(path), expected + 3);
  // And a truncate after it works as on a fresh store.
  {
    Writer w = Writer::open(path, unsynced());
    CHECK(w.truncate(10) == 10);
  }
  check_prefix(Reader::open(path), 10);
}

TEST_CASE("Truncate from an epoch refuses a cut at a row whose epoch fails its checksum",
          "[truncate]") {
  // From a review: one flipped bit made row 12's epoch 0 read as 8, and truncate_from_epoch(3)
  // cut there, dropping every good row of epochs 0-2 after it; verify then found nothing amiss.
  TempDir dir;
  const std::string path = dir / "s";
  {
    Writer w = make_store(path);
    for (std::uint64_t epoch = 0; epoch < 5; ++epoch) append_rows(w, 0, epoch * 10, 10, epoch);
  }
  const std::string index = path + "/index.1";
  const off_t epoch_byte = 12 * 32 + 8;  // Row 12's entry, its epoch field's low byte.
  {
    const int fd = ::open(index.c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    const std::uint8_t eight = 8;  // Row 12 is of epoch 1: 1 -> 9 (one bit).
    std::uint8_t byte = 0;
    REQUIRE(::pread(fd, &byte, 1, epoch_byte) == 1);
    REQUIRE(byte == 1);
    byte |= eight;
    REQUIRE(::pwrite(fd, &byte, 1, epoch_byte) == 1);
    ::close(fd);
  }
  Writer w = Writer::open(path);
  std::string message;
  CHECK(test::code_of([&] { w.truncate_from_epoch(3); }, &message) == ErrorCode::kCorruption);
  CHECK_THAT(message, Catch::Contains("row 12 (epoch 9 in its index entry") &&
                          Catch::Contains("fails its checksum") &&
                          Catch::Contains("nothing was dropped"));
  CHECK(w.info().committed_rows == 50);
  // The bit set right again: the cut is made as before.
  {
    const int fd = ::open(index.c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    const std::uint8_t one = 1;
    REQUIRE(::pwrite(fd, &one, 1, epoch_byte) == 1);
    ::close(fd);
  }
  CHECK(w.truncate_from_epoch(3) == 30);
}

TEST_CASE(
    "A Writer finishing another process's decided truncate is poisoned if the header's "
    "flush fails",
    "[truncate][multiprocess]") {
  // The append that finished the switch threw a plain kIO and the next one went on: a failed
  // flush then passed unnoticed (the kernel reports a writeback error once), and the handle,
  // left half-way into the new generation, built a key index of the old one.
  TempDir dir;
  const std::string path = dir / "s";
  Writer a = make_store(path, unsynced());
  append_rows(a, 0, 0, 10, 0);
  a.sync();
  kill_truncate_once_decided(path, 5);
  detail::testing::arm_fault(detail::testing::Op::kMsync, 1, EIO, false);
  const auto append_code = [&]() -> std::optional<ErrorCode> {
    try {
      append_rows(a, 0, 5, 3, 1);
    } catch (const Error& e) {
      return e.code();
    }
    return std::nullopt;
  };
  CHECK(append_code() == ErrorCode::kPoisoned);
  detail::testing::disarm_all();
  CHECK(append_code() == ErrorCode::kPoisoned);
  a.close();  // Unsynced: nothing to flush, the poison already said.
  {
    Writer c = Writer::open(path, unsynced());
    CHECK(c.committed_rows() == 5);
    append_rows(c, 0, 5, 3, 1);
  }
  Reader r = Reader::open(path);
  check_prefix(r, 8);
  CHECK(r.find(test::make_key(0, 7)) == std::optional<std::uint64_t>(7));
}

TEST_CASE("A Writer whose following of another handle's truncate failed midway follows again",
          "[truncate]") {
  // The files were switched before the mapping failed; the next append saw no generation
  // change, skipped the rest, and indexed the new files into a key index of the old generation
  // (a store whose keys.K belongs to "another store or generation").
  TempDir dir;
  const std::string path = dir / "s";
  Writer a = make_store(path, unsynced());
  append_rows(a, 0, 0, 10, 0);
  {
    Writer b = Writer::open(path, unsynced());
    CHECK(b.truncate(5) == 5);
  }
  detail::testing::arm_fault(detail::testing::Op::kMmap, 1, ENOMEM, false);
  CHECK_THROWS_AS(append_rows(a, 0, 5, 3, 1), Error);
  detail::testing::disarm_all();
  CHECK(a.committed_rows() == 5);  // Nothing of the failed append was stored.
  append_rows(a, 0, 5, 3, 1);
  a.close();
  Reader r = Reader::open(path);
  check_prefix(r, 8);
  CHECK(r.info().key_index.find("8 rows indexed") != std::string::npos);
  CHECK(r.find(test::make_key(0, 6)) == std::optional<std::uint64_t>(6));
}

TEST_CASE("sync() and close() of a Writer flush what another handle committed after its truncate",
          "[truncate]") {
  // They flushed the files of the generation this handle had last appended to: after another
  // handle's truncate, the rows committed since stayed not durable while sync() returned
  // normally, and the old, deleted files stayed open until this handle's next append.
  TempDir dir;
  const std::string path = dir / "s";
  Writer a = make_store(path, unsynced());
  append_rows(a, 0, 0, 10, 0);
  a.sync();
  {
    Writer b = Writer::open(path, unsynced());
    CHECK(b.truncate(5) == 5);
    append_rows(b, 0, 5, 5, 1);
    CHECK(b.durable_rows() == 5);
  }
  CHECK(deleted_files_open_in(path) > 0);  // a's descriptors of rows.1 and index.1.
  a.sync();
  CHECK(a.durable_rows() == 10);
  CHECK(deleted_files_open_in(path) == 0);
  {
    Writer b = Writer::open(path, unsynced());
    CHECK(b.truncate(7) == 7);
    append_rows(b, 0, 7, 2, 2);
  }
  WriterOptions synced_at_close;
  synced_at_close.sync = SyncPolicy::kInterval;
  a.close();  // unsynced(): close() flushes nothing.
  Writer c = Writer::open(path, synced_at_close);
  {
    Writer b = Writer::open(path, unsynced());
    CHECK(b.truncate(8) == 8);
    append_rows(b, 0, 8, 2, 3);
    CHECK(b.durable_rows() == 8);
  }
  c.close();
  Reader r = Reader::open(path);
  check_prefix(r, 10);
  CHECK(r.info(InfoDetail::kState).durable_rows == 10);
}

TEST_CASE("A truncate whose new key index cannot be made returns: the rows are cut", "[truncate]") {
  // The key index is opened after the switch: its failure was thrown as if the truncate had
  // failed, though the rows were gone.
  TempDir dir;
  const std::string path = dir / "s";
  Writer w = make_store(path, unsynced());
  append_rows(w, 0, 0, 10, 0);
  detail::testing::arm_fault(detail::testing::Op::kTmpfile, 1, EIO, false);
  std::uint64_t kept = 0;
  CHECK_NOTHROW(kept = w.truncate(4));
  detail::testing::disarm_all();
  CHECK(kept == 4);
  CHECK(w.committed_rows() == 4);
  append_rows(w, 0, 4, 2, 1);
  CHECK_THROWS_WITH(w.close(), Catch::Contains("the key index could not be maintained"));
  Reader r = Reader::open(path);
  check_prefix(r, 6);
  CHECK(r.find(test::make_key(0, 5)) == std::optional<std::uint64_t>(5));
}

TEST_CASE("After a reboot in the middle of a switch, rows past the truncate's are checked",
          "[truncate][crash]") {
  // The flag may reach the disk while the header that cleared it does not, after writers
  // appended to the new files in that boot; a power loss can then keep an entry of theirs and
  // not its row. The rows up to the first all-zero entry were taken as the truncate's, all
  // durable and unchecked: a torn row was served.
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_synced_rows_in_boot_a(path);
  kill_truncate_once_decided(path, 20);
  // A batch's entry on disk, its row not: row 20 of index.2.
  detail::IndexEntry torn{};
  torn.key = test::make_key(0, 20);
  torn.epoch = 2;
  // Of the era the truncate raised, as a writer's after the switch.
  const std::string header = test::read_file(path + "/header");
  std::uint64_t era = 0;
  std::memcpy(&era, header.data() + detail::kStateOffset + offsetof(detail::StatePage, era),
              sizeof(era));
  torn.row =
      20 | ((era & detail::kEntryEraMask) << detail::kEntryEraShift) | detail::kEntryBatchEnd;
  torn.checksum = 0x1234;
  {
    std::fstream index(path + "/index.2", std::ios::in | std::ios::out | std::ios::binary);
    index.seekp(20 * sizeof(torn));
    index.write(reinterpret_cast<const char*>(&torn), sizeof(torn));
  }
  detail::testing::set_boot_id(kBootB);
  check_prefix(Reader::open(path), 20);
  {
    Writer w = Writer::open(path, unsynced());
    CHECK(w.committed_rows() == 20);
    append_rows(w, 0, 20, 3, 3);
  }
  check_prefix(Reader::open(path), 23);
}

TEST_CASE("After a reboot in the middle of a switch, a damaged row the truncate kept cuts nothing",
          "[truncate][crash]") {
  // Every kept row was checked after such a reboot: one damaged row among them (bit rot, which
  // a truncate keeps, as any store does) cut the store there, and the next writer made it so.
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_synced_rows_in_boot_a(path);
  {  // One byte of row 5's data.
    const std::uint64_t at = 5 * kDim * sizeof(float) + 3;
    const std::string byte = test::read_file(path + "/rows.1").substr(at, 1);
    test::write_bytes(path + "/rows.1", at, std::string(1, static_cast<char>(byte[0] ^ 0x10)));
  }
  kill_truncate_once_decided(path, 30);
  detail::testing::set_boot_id(kBootB);
  CHECK(Reader::open(path).size() == 30);
  {
    Writer w = Writer::open(path, unsynced());
    CHECK(w.committed_rows() == 30);
  }
  Reader r = Reader::open(path);
  REQUIRE(r.size() == 30);
  const VerifyReport report = r.verify();
  CHECK(report.bad_rows == std::vector<std::uint64_t>{5});
}

TEST_CASE("The sync thread tries again after following another handle's truncate failed",
          "[truncate]") {
  // It ended for good at any error, meant for a poisoned handle: a follow that failed (a
  // mapping refused) left a usable Writer whose interval syncs never ran again.
  TempDir dir;
  const std::string path = dir / "s";
  WriterOptions interval;
  interval.sync = SyncPolicy::kInterval;
  interval.sync_interval = std::chrono::seconds(2);
  Writer a = make_store(path, interval);
  append_rows(a, 0, 0, 10, 0);
  a.sync();
  {  // Well within a's interval (a few milliseconds), so a's thread has not looked yet.
    Writer b = Writer::open(path, unsynced());
    CHECK(b.truncate(5) == 5);
    append_rows(b, 0, 5, 3, 1);
  }
  const std::uint64_t injected = detail::testing::faults_injected();
  detail::testing::arm_fault(detail::testing::Op::kMmap, 1, ENOMEM, false);
  CHECK(test::within_a_minute([&] { return a.durable_rows() == 8; }));
  CHECK(detail::testing::faults_injected() == injected + 1);  // The follow met the fault.
  detail::testing::disarm_all();
  a.close();
  check_prefix(Reader::open(path), 8);
}
