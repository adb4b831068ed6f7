// Recovery after a reboot (simulated by a new boot id): rows past the durable point are
// re-checked and the commit counter cut back exactly; synced rows are never cut, only reported.
// Through the public handles first, then the one loader itself (src/log/recovery.h) on the same
// real files: read-only vs applied, the cut, counters against file sizes, idempotence.
#include "log/recovery.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "embstore/embstore.h"
#include "platform/testing.h"
#include "storage/store_files.h"
#include "support/payload.h"
#include "support/process.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

constexpr std::uint32_t kDim = 8;
constexpr std::uint64_t kRowBytes = kDim * 4;
const char* const kBootA = "11111111-1111-1111-1111-111111111111";
const char* const kBootB = "22222222-2222-2222-2222-222222222222";

void append_rows(Writer& w, std::uint64_t first_seq, std::uint64_t n) {
  const auto values = test::batch_payload(0, first_seq, n, kDim);
  std::vector<std::uint64_t> keys(n);
  for (std::uint64_t i = 0; i < n; ++i) keys[i] = test::make_key(0, first_seq + i);
  w.append(keys, 0, std::span<const float>(values));
}

// Power losses leave unsynced tails: these writers neither sync in the background nor at close.
WriterOptions unsynced() {
  WriterOptions options;
  options.sync = SyncPolicy::kNone;
  return options;
}

// 100 synced rows then 50 unsynced ones in five batches of 10, written in "boot A".
void make_store(const std::string& path) {
  detail::testing::set_boot_id(kBootA);
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;
  Writer w = Writer::create(path, o, unsynced());
  append_rows(w, 0, 100);
  w.sync();
  for (std::uint64_t seq = 100; seq < 150; seq += 10) append_rows(w, seq, 10);
  REQUIRE(w.durable_rows() == 100);
  REQUIRE(w.committed_rows() == 150);
}

// A writer process killed before publishing its batch of `n` rows (sequence numbers from
// `first_seq`): the rows and entries sit past the commit point.
void leave_dead_batch(const std::string& path, std::uint64_t first_seq, std::uint64_t n) {
  const pid_t child = test::spawn([&] {
    Writer w = Writer::open(path, unsynced());
    detail::testing::arm_crash("before-publish", 1);
    append_rows(w, first_seq, n);
    return 1;
  });
  REQUIRE(test::wait_for(child) == 128 + SIGKILL);
}

void flip_row_byte(const std::string& path, std::uint64_t row) {
  const std::string file = path + "/rows.1";
  std::string byte = test::read_file(file).substr(row * kRowBytes + 3, 1);
  byte[0] = static_cast<char>(byte[0] ^ 0x40);
  test::write_bytes(file, row * kRowBytes + 3, byte);
}

struct BootReset {
  ~BootReset() { detail::testing::set_boot_id(""); }
};

}  // namespace

TEST_CASE("After a reboot a damaged tail past the durable point is cut back exactly",
          "[recovery]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  // Row 125 is torn: its batch [120, 130) goes whole, the batches before it stay.
  flip_row_byte(path, 125);
  detail::testing::set_boot_id(kBootB);

  SECTION("a reader clamps its snapshot without writing anything") {
    const std::string before = test::read_file(path + "/header");
    Reader r = Reader::open(path);
    CHECK(r.size() == 120);
    const VerifyReport report = r.verify();
    CHECK(report.bad_row_count == 0);  // Every row it shows is sound...
    CHECK(report.rows_to_cut == 30);   // ...and it names the ones a writer will cut.
    CHECK(test::read_file(path + "/header") == before);
  }
  SECTION("a writer cuts the commit counter and appends over the torn tail") {
    Writer w = Writer::open(path, unsynced());
    CHECK(w.committed_rows() == 120);
    // The verified rows were read back from the device after the reboot: durable now.
    CHECK(w.durable_rows() == 120);
    append_rows(w, 120, 5);
    Reader r = Reader::open(path);
    REQUIRE(r.size() == 125);
    CHECK(r.verify().ok());
    for (std::uint64_t row = 0; row < 125; ++row) {
      REQUIRE(test::payload_matches(test::make_key(0, row), kDim, r.rows().row(row)));
    }
  }
}

TEST_CASE("After a reboot a zero-filled tail (pages never written back) is cut", "[recovery]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  // Rows 130.. and their index entries never reached the disk: zeros.
  test::write_bytes(path + "/rows.1", 130 * kRowBytes, std::string(20 * kRowBytes, '\0'));
  test::write_bytes(path + "/index.1", 130 * 32, std::string(20 * 32, '\0'));
  detail::testing::set_boot_id(kBootB);
  CHECK(Writer::open(path, unsynced()).committed_rows() == 130);
}

TEST_CASE(
    "After a reboot, until a writer recovers, a reader's info counts the rows that writer keeps "
    "and verify fails naming the rows it cuts",
    "[recovery]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);  // durable 100, committed 150 in batches of 10
  SECTION("a torn row") { flip_row_byte(path, 125); }
  SECTION("pages never written back") {
    test::write_bytes(path + "/rows.1", 120 * kRowBytes, std::string(30 * kRowBytes, '\0'));
    test::write_bytes(path + "/index.1", 120 * 32, std::string(30 * 32, '\0'));
  }
  detail::testing::set_boot_id(kBootB);
  const std::string before = test::read_file(path + "/header");
  Reader r = Reader::open(path);
  const StoreInfo info = r.info();
  CHECK(info.committed_rows == 120);
  CHECK(info.committed_rows == r.size());
  CHECK(info.durable_rows == 100);
  CHECK(info.rows_to_cut == 30);
  CHECK(read_info(path).committed_rows == 120);
  const VerifyReport report = r.verify();
  CHECK(report.bad_row_count == 0);
  CHECK(report.rows_to_cut == 30);
  CHECK_FALSE(report.ok());
  CHECK(r.verify(0, 60).rows_to_cut == 0);             // Part of the snapshot: its rows alone.
  CHECK(test::read_file(path + "/header") == before);  // Readers write nothing.

  Writer w = Writer::open(path, unsynced());
  CHECK(w.committed_rows() == info.committed_rows);
  // Recovered: the same Reader, not refreshed, reports the counters as they now are.
  CHECK(r.info().rows_to_cut == 0);
  CHECK(r.info().committed_rows == 120);
  CHECK(r.verify().ok());
  CHECK(Reader::open(path).verify().ok());
}

TEST_CASE("After a reboot a reader finds nothing to cut when every unsynced row survived",
          "[recovery]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  detail::testing::set_boot_id(kBootB);
  Reader r = Reader::open(path);
  CHECK(r.size() == 150);
  CHECK(r.info().committed_rows == 150);
  CHECK(r.info().durable_rows == 100);
  CHECK(r.info().rows_to_cut == 0);
  CHECK(r.verify().ok());
}

TEST_CASE("After a reboot counters beyond the files are clamped, not trusted", "[recovery]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  // The state page reached the disk but the file growth did not.
  const std::uint64_t huge = 1'000'000;
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &huge, 8);
  test::write_bytes(path + "/header", 4096, bytes);        // committed_rows
  test::write_bytes(path + "/header", 4096 + 128, bytes);  // capacity_rows
  detail::testing::set_boot_id(kBootB);
  Writer w = Writer::open(path, unsynced());
  CHECK(w.committed_rows() == 150);
  CHECK(w.info().capacity_rows == w.info().data_file_bytes / kRowBytes);
  append_rows(w, 150, 3);
  CHECK(Reader::open(path).verify().ok());
}

TEST_CASE("Damage inside synced rows is reported by verify and record, never cut",
          "[recovery][corruption]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  flip_row_byte(path, 10);
  detail::testing::set_boot_id(kBootB);
  Writer w = Writer::open(path, unsynced());
  CHECK(w.committed_rows() == 150);  // row 10 is below durable: reported, not cut
  Reader r = Reader::open(path);
  const VerifyReport report = r.verify();
  CHECK(report.bad_row_count == 1);
  CHECK(report.bad_rows == std::vector<std::uint64_t>{10});
  try {
    (void)r.record(10);
    FAIL("record() returned a row that fails its checksum");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kCorruption);
    CHECK_THAT(std::string(e.what()), Catch::Contains("row 10") && Catch::Contains("rows.1"));
  }
  CHECK(r.record(11).key == test::make_key(0, 11));
}

TEST_CASE("In the same boot opening checks no rows: a process crash cannot tear the page cache",
          "[recovery]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  flip_row_byte(path, 140);  // not something a process crash can cause; shows open is O(1)
  CHECK(Writer::open(path, unsynced()).committed_rows() == 150);
  CHECK(Reader::open(path).verify().bad_rows == std::vector<std::uint64_t>{140});
}

TEST_CASE("Recovery killed half-way reaches the same state when run again", "[recovery][crash]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  flip_row_byte(path, 133);  // in the batch [130, 140)
  const std::string expected_dir = dir / "copy";
  test::run_shell("cp -a '" + path + "' '" + expected_dir + "'");
  detail::testing::set_boot_id(kBootB);
  const pid_t child = test::spawn([&] {
    detail::testing::arm_crash("during-recovery", 1);
    Writer::open(path, unsynced());
    return 1;
  });
  CHECK(test::wait_for(child) == 128 + SIGKILL);
  Writer again = Writer::open(path, unsynced());
  Writer uninterrupted = Writer::open(expected_dir, unsynced());
  CHECK(again.committed_rows() == 130);
  CHECK(uninterrupted.committed_rows() == 130);
  CHECK(again.durable_rows() == uninterrupted.durable_rows());
  // Recovery is idempotent: a third open in the same (new) boot changes nothing.
  again.close();
  CHECK(Writer::open(path, unsynced()).committed_rows() == 130);
}

TEST_CASE("Entries cut by one recovery never come back after a second power loss",
          "[recovery][power-loss]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  const std::string index = path + "/index.1";
  const std::string rows = path + "/rows.1";
  detail::testing::set_boot_id(kBootA);
  {
    CreateOptions o;
    o.dim = kDim;
    o.segment_bytes = 4096;
    Writer w = Writer::create(path, o, unsynced());
    append_rows(w, 0, 10);
    w.sync();
    append_rows(w, 10, 200);  // batch B: rows [10, 210), never synced
  }
  // Power loss 1: one index page never reached the disk (a hole over rows [10, 128)); B's later
  // entries did and still validate.
  test::write_bytes(index, 10 * 32, std::string(118 * 32, '\0'));
  detail::testing::set_boot_id(kBootB);
  const std::string disk_index = [&] {
    Writer w = Writer::open(path, unsynced());
    REQUIRE(w.committed_rows() == 10);  // B is cut whole
    return test::read_file(index);
  }();
  const std::string disk_rows = test::read_file(rows);
  {
    Writer w = Writer::open(path, unsynced());
    append_rows(w, 1000, 150);  // batch C: rows [10, 160)
    append_rows(w, 2000, 100);  // batch D: rows [160, 260)
  }
  // Power loss 2: the header (committed 260) reached the disk, and C's first index page, but
  // nothing past row 128: there the disk still holds B's old entries and rows.
  const std::string now_index = test::read_file(index);
  const std::string now_rows = test::read_file(rows);
  test::write_bytes(index, 128 * 32, disk_index.substr(128 * 32, 132 * 32));
  test::write_bytes(rows, 128 * kRowBytes, disk_rows.substr(128 * kRowBytes, 132 * kRowBytes));
  REQUIRE(now_index.substr(0, 128 * 32) == test::read_file(index).substr(0, 128 * 32));
  detail::testing::set_boot_id("33333333-3333-3333-3333-333333333333");
  {
    Reader before_recovery = Reader::open(path);
    CHECK(before_recovery.size() == 10);  // neither C's front nor B's tail
  }
  Writer w = Writer::open(path, unsynced());
  CHECK(w.committed_rows() == 10);
  Reader r = Reader::open(path);
  for (std::uint64_t row = 0; row < r.size(); ++row) {
    REQUIRE(test::payload_matches(test::make_key(0, row), kDim, r.rows().row(row)));
  }
}

TEST_CASE("An append over a dead writer's unpublished entries starts a new era",
          "[recovery][crash]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);                 // committed 150
  leave_dead_batch(path, 150, 40);  // entries [150, 190) written, never published
  Writer w = Writer::open(path, unsynced());
  append_rows(w, 150, 10);  // over the dead batch's first entries
  // Power loss: the counter reached the disk with the next batch, whose index page did not; the
  // dead writer's entries at [160, 190) are still there and validate (same rows, older era).
  const std::string index = test::read_file(path + "/index.1");
  append_rows(w, 160, 30);
  test::write_bytes(path + "/index.1", 160 * 32, index.substr(160 * 32, 30 * 32));
  detail::testing::set_boot_id(kBootB);
  Writer recovered = Writer::open(path, unsynced());
  CHECK(recovered.committed_rows() == 160);  // the dead batch's entries lose to the newer era
}

TEST_CASE("An append over a dead writer's entries makes its batch durable before publishing it",
          "[recovery][crash]") {
  // FORMAT.md "Append over an unpublished tail": after writing over entries that may validate,
  // the writer fdatasyncs data and index before it publishes. Else a power loss could keep the
  // dead writer's whole batch on the old page of the first rows and this batch's tail on the
  // new page of the rest, with the counter covering both: recovery would pass that splice (the
  // tail's newer era follows the older one, as after any recovery). The syncs are its second
  // and third fdatasync (the first flushes the raised era): each failing one fails the append,
  // which publishes nothing.
  for (const int nth : {2, 3}) {
    BootReset reset;
    TempDir dir;
    const std::string path = dir / "s";
    make_store(path);                // committed 150
    leave_dead_batch(path, 150, 2);  // a whole batch [150, 152), written, never published
    Writer w = Writer::open(path, unsynced());
    detail::testing::arm_fault(detail::testing::Op::kMsync, nth, EIO, false);
    INFO("fdatasync " << nth << " fails");
    CHECK_THROWS_AS(append_rows(w, 150, 8), Error);
    detail::testing::disarm_all();
    CHECK(Reader::open(path).size() == 150);
  }
  // An ordinary append syncs nothing: a fault on the first fdatasync is never met.
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  Writer w = Writer::open(path, unsynced());
  append_rows(w, 150, 2);
  detail::testing::arm_fault(detail::testing::Op::kMsync, 1, EIO, false);
  append_rows(w, 152, 8);
  detail::testing::disarm_all();
  CHECK(Reader::open(path).size() == 160);
}

TEST_CASE("Recovery ends the valid run where the era changes inside a batch", "[recovery]") {
  // A batch is written in one era. A dead writer's batch [150, 190) (other rows, the current
  // era, never published) is written over by [150, 160) in a newer era; a disk that kept the old
  // pages of rows 150-151 and the new ones of 152-159 under a counter of 160 (the sync before
  // publishing rules that out; this is recovery's own check) must not show that splice.
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);                  // committed 150, durable 100
  leave_dead_batch(path, 1000, 40);  // other keys and rows than the batch written over them
  const std::string stale_rows = test::read_file(path + "/rows.1");
  const std::string stale_index = test::read_file(path + "/index.1");
  {
    Writer w = Writer::open(path, unsynced());
    append_rows(w, 150, 10);
  }
  test::write_bytes(path + "/rows.1", 150 * kRowBytes,
                    stale_rows.substr(150 * kRowBytes, 2 * kRowBytes));
  test::write_bytes(path + "/index.1", 150 * 32, stale_index.substr(150 * 32, 2 * 32));
  detail::testing::set_boot_id(kBootB);
  Reader r = Reader::open(path);
  CHECK(r.size() == 150);  // not 160: rows 150-151 are the dead writer's, 152-159 another batch's
  Writer recovered = Writer::open(path, unsynced());
  CHECK(recovered.committed_rows() == 150);
}

TEST_CASE("Eras past 15 bits wrap without touching the batch-end flag", "[recovery]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  detail::testing::set_boot_id(kBootA);
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;
  create_store(path, o);
  auto put_u64 = [&](std::uint64_t offset, std::uint64_t value) {
    std::string bytes(8, '\0');
    std::memcpy(bytes.data(), &value, 8);
    test::write_bytes(path + "/header", offset, bytes);
  };
  put_u64(4096 + 320, (1ull << 15) - 2);  // era just below 2^15
  // Each open in a new boot recovers and raises the era: the batches get eras 32767, 0, 1, 2.
  const char* boots[] = {kBootB, kBootA, kBootB, kBootA};
  for (int i = 0; i < 4; ++i) {
    detail::testing::set_boot_id(boots[i]);
    Writer w = Writer::open(path, unsynced());
    append_rows(w, w.committed_rows(), 10);
  }
  put_u64(4096 + 64, 0);  // durable_rows 0: the next recovery re-checks every row
  detail::testing::set_boot_id("44444444-4444-4444-4444-444444444444");
  CHECK(Reader::open(path).size() == 40);  // the wrap reads as newer, not as stale
  {
    Writer w = Writer::open(path, unsynced());
    CHECK(w.committed_rows() == 40);
    CHECK(Reader::open(path).verify().ok());
  }
  // Past the wrap the batch-end flag still marks only batch ends: a torn row in the middle of
  // the last batch [30, 40) cuts the whole batch, not just its tail.
  flip_row_byte(path, 35);
  put_u64(4096 + 64, 0);
  detail::testing::set_boot_id(kBootB);
  CHECK(Writer::open(path, unsynced()).committed_rows() == 30);
}

TEST_CASE("A writer closed normally leaves nothing to re-check after a reboot",
          "[recovery][sync]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  detail::testing::set_boot_id(kBootA);
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;
  {
    Writer w = Writer::create(path, o);  // the default policy: no sync() anywhere
    for (std::uint64_t seq = 0; seq < 150; seq += 10) append_rows(w, seq, 10);
    w.close();
  }
  const StoreInfo info = read_info(path);
  CHECK(info.durable_rows == 150);
  CHECK(info.committed_rows == 150);
  // Damage a byte of the last batch: a recovery that re-checked it would cut that batch.
  flip_row_byte(path, 145);
  detail::testing::set_boot_id(kBootB);
  CHECK(Reader::open(path).size() == 150);
  Writer w = Writer::open(path);
  CHECK(w.committed_rows() == 150);
  CHECK(Reader::open(path).verify().bad_rows == std::vector<std::uint64_t>{145});
}

TEST_CASE("The background sync makes committed rows durable without any sync() call",
          "[recovery][sync]") {
  TempDir dir;
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;
  WriterOptions options;
  options.sync_interval = std::chrono::milliseconds(20);
  Writer w = Writer::create(dir / "s", o, options);
  append_rows(w, 0, 30);
  // A condition with a generous deadline, not a timing assertion.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (w.durable_rows() < 30 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  CHECK(w.durable_rows() == 30);
  append_rows(w, 30, 5);
  while (w.durable_rows() < 35 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  CHECK(w.durable_rows() == 35);
}

TEST_CASE("SyncPolicy::kNone opts out: close() leaves committed rows unsynced",
          "[recovery][sync]") {
  TempDir dir;
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;
  WriterOptions none;
  none.sync = SyncPolicy::kNone;
  {
    Writer w = Writer::create(dir / "s", o, none);
    append_rows(w, 0, 20);
    w.close();
  }
  CHECK(read_info(dir / "s").committed_rows == 20);
  CHECK(read_info(dir / "s").durable_rows == 0);
}

TEST_CASE("After a reboot a data file cut inside a segment is clamped and grows again",
          "[recovery]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  // Cut short from outside (a partial copy, say): the files end inside a segment.
  REQUIRE(::truncate((path + "/rows.1").c_str(), 135 * kRowBytes + 13) == 0);
  detail::testing::set_boot_id(kBootB);
  Writer w = Writer::open(path);
  CHECK(w.committed_rows() == 130);
  CHECK(w.info().capacity_rows == 135);
  // The next growth allocates from the clamped capacity's end, not from the segment boundary
  // after it, which the file never reached: first within that segment, then past it.
  append_rows(w, 130, 10);
  CHECK(w.committed_rows() == 140);
  append_rows(w, 140, 300);
  CHECK(w.committed_rows() == 440);
  // No hole is left where the cut was (a hole under the mapping is SIGBUS on a full disk).
  struct stat st;
  REQUIRE(::stat((path + "/rows.1").c_str(), &st) == 0);
  CHECK(static_cast<std::uint64_t>(st.st_blocks) * 512 >= static_cast<std::uint64_t>(st.st_size));
  Reader r = Reader::open(path);
  REQUIRE(r.size() == 440);
  CHECK(r.verify().ok());
  for (std::uint64_t row = 0; row < 440; ++row) {
    REQUIRE(test::payload_matches(test::make_key(0, row), kDim, r.rows().row(row)));
  }
}

// ---- The loader itself (src/log/recovery.h) ------------------------------------------------

namespace {

using detail::LoadedLog;
using detail::StoreFiles;

constexpr std::uint64_t kState = 4096;  // The state page inside the header file (FORMAT.md).
constexpr std::uint64_t kCommittedAt = kState + 0;
constexpr std::uint64_t kDurableAt = kState + 64;
constexpr std::uint64_t kCapacityAt = kState + 128;
constexpr std::uint64_t kBootIdAt = kState + 192;

std::unique_ptr<StoreFiles> open_files(const std::string& path, bool writable) {
  return StoreFiles::open(
      path, writable ? detail::os::Access::kReadWrite : detail::os::Access::kReadOnly, 1ull << 30);
}

void put_u64(const std::string& file, std::uint64_t offset, std::uint64_t value) {
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &value, 8);
  test::write_bytes(file, offset, bytes);
}

std::string all_bytes(const std::string& path) {
  return test::read_file(path + "/header") + test::read_file(path + "/rows.1") +
         test::read_file(path + "/index.1");
}

// load_log on a read-only view refuses with kCorruption naming `what`, and writes nothing.
void expect_refused(const std::string& path, const std::string& what) {
  const std::string before = all_bytes(path);
  auto files = open_files(path, false);
  try {
    const LoadedLog log = detail::load_log(*files);
    FAIL("the loader accepted the store: committed " << log.recovered.committed);
  } catch (const Error& e) {
    INFO(e.what());
    CHECK(e.code() == ErrorCode::kCorruption);
    CHECK_THAT(std::string(e.what()), Catch::Contains(what));
  }
  CHECK(all_bytes(path) == before);
}

}  // namespace

TEST_CASE("In the same boot the loader trusts the counters and reads no row",
          "[recovery][loader]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  flip_row_byte(path, 125);  // Not looked at: a process crash cannot tear the page cache.
  const std::string before = all_bytes(path);
  auto files = open_files(path, true);
  const LoadedLog log = detail::load_log(*files);
  CHECK(log.same_boot);
  CHECK(log.stored.committed == 150);
  CHECK(log.stored.durable == 100);
  CHECK(log.recovered.committed == 150);
  CHECK(log.recovered.durable == 100);
  CHECK(log.recovered.capacity == log.stored.capacity);
  CHECK(log.verified_upto == 150);
  CHECK(files->mapped_rows() >= 150);
  CHECK_FALSE(detail::apply_recovery(*files, log));
  CHECK(all_bytes(path) == before);
}

TEST_CASE("Read-only after a reboot the loader cuts at the torn batch and writes nothing",
          "[recovery][loader]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  flip_row_byte(path, 125);
  detail::testing::set_boot_id(kBootB);
  const std::string before = all_bytes(path);
  auto files = open_files(path, false);
  const LoadedLog log = detail::load_log(*files);
  CHECK_FALSE(log.same_boot);
  CHECK(log.stored.committed == 150);
  CHECK(log.recovered.committed == 120);  // The batch [120, 130) holding row 125 goes whole.
  CHECK(log.recovered.durable == 100);
  CHECK(log.verified_upto == 120);
  CHECK(files->mapped_rows() >= 120);
  // The state page still says what it said: only a writer applies a cut.
  CHECK(files->state().committed() == 150);
  CHECK(all_bytes(path) == before);

  SECTION("rows below durable are trusted, not verified") {
    TempDir other;
    const std::string p2 = other / "s";
    detail::testing::set_boot_id(kBootA);
    make_store(p2);
    flip_row_byte(p2, 50);
    detail::testing::set_boot_id(kBootB);
    auto f2 = open_files(p2, false);
    CHECK(detail::load_log(*f2).recovered.committed == 150);
  }
  SECTION("rows below verified_from are not verified again") {
    CHECK(detail::load_log(*files, 130).recovered.committed == 150);
    CHECK(detail::load_log(*files, 110).recovered.committed == 120);
  }
}

TEST_CASE(
    "Applied by a writer, a recovery publishes the cut, raises the era and stores the boot "
    "id last, and loading again changes nothing",
    "[recovery][loader]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  flip_row_byte(path, 125);
  detail::testing::set_boot_id(kBootB);
  auto files = open_files(path, true);
  const std::uint64_t era = files->state().era();
  const std::uint64_t capacity = files->state().capacity();
  std::vector<std::uint64_t> rebuilt;
  const detail::RebuildDerived rebuild = [&](StoreFiles&, std::uint64_t rows) {
    rebuilt.push_back(rows);
  };
  const LoadedLog log = detail::load_log(*files);
  CHECK(detail::apply_recovery(*files, log, rebuild));
  CHECK(rebuilt == std::vector<std::uint64_t>{120});
  CHECK(files->state().committed() == 120);
  CHECK(files->state().durable() == 120);  // Read back from the device in this boot.
  CHECK(files->state().capacity() == capacity);
  CHECK(files->state().era() == era + 1);
  CHECK(files->same_boot());

  const LoadedLog again = detail::load_log(*files);
  CHECK(again.same_boot);
  CHECK(again.recovered.committed == 120);
  CHECK_FALSE(detail::apply_recovery(*files, again, rebuild));
  CHECK(rebuilt.size() == 1);
  CHECK(files->state().era() == era + 1);

  SECTION("a recovery that died before storing the boot id runs again to the same rows") {
    // The boot id is stored last: put back the old one, as if the process died just before.
    files.reset();
    auto old = open_files(path, true);
    detail::testing::set_boot_id(kBootA);
    std::uint64_t boot_a[2];
    REQUIRE(detail::os::boot_id(boot_a));
    detail::testing::set_boot_id(kBootB);
    put_u64(path + "/header", kBootIdAt, boot_a[0]);
    put_u64(path + "/header", kBootIdAt + 8, boot_a[1]);
    const LoadedLog rerun = detail::load_log(*old);
    CHECK_FALSE(rerun.same_boot);
    CHECK(rerun.recovered.committed == 120);
    CHECK(detail::apply_recovery(*old, rerun, rebuild));
    CHECK(rebuilt == std::vector<std::uint64_t>{120, 120});
    CHECK(old->state().committed() == 120);
    CHECK(old->state().durable() == 120);
    CHECK(old->same_boot());
    old.reset();
    Reader r = Reader::open(path);
    CHECK(r.size() == 120);
    CHECK(r.verify().ok());
  }
}

TEST_CASE("Counters that break their relations are named corruption in any boot",
          "[recovery][loader]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  const bool reboot = GENERATE(false, true);
  INFO((reboot ? "after a reboot" : "same boot"));
  if (reboot) detail::testing::set_boot_id(kBootB);
  SECTION("capacity 0") {
    put_u64(path + "/header", kCapacityAt, 0);
    expect_refused(path, "capacity_rows 0");
  }
  SECTION("committed beyond capacity") {
    put_u64(path + "/header", kCapacityAt, 140);
    expect_refused(path, "committed_rows 150 exceeds capacity_rows 140");
  }
  SECTION("durable beyond committed") {
    put_u64(path + "/header", kDurableAt, 151);
    expect_refused(path, "durable_rows 151 exceeds committed_rows 150");
  }
}

TEST_CASE("After a reboot files that hold no row are grown again, never left at capacity 0",
          "[recovery]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  // No sync ever completed (durable_rows 0), and the index file's growth never reached the
  // disk: it holds no entry, so no row survives.
  put_u64(path + "/header", kDurableAt, 0);
  REQUIRE(::truncate((path + "/index.1").c_str(), 0) == 0);
  detail::testing::set_boot_id(kBootB);
  {
    Writer w = Writer::open(path);
    CHECK(w.committed_rows() == 0);
    CHECK(w.info().capacity_rows > 0);
  }
  // The recovery stored a capacity the files hold: the same boot opens it as it was left
  // (capacity 0 would be refused as corruption), and it takes and reads back rows.
  {
    Reader r = Reader::open(path);
    CHECK(r.size() == 0);
  }
  {
    Writer w = Writer::open(path);
    append_rows(w, 0, 20);
  }
  Reader r = Reader::open(path);
  REQUIRE(r.size() == 20);
  CHECK(r.verify().ok());
}

TEST_CASE(
    "Counters beyond the file sizes: named corruption in the same boot, clamped after a "
    "reboot unless synced rows are missing",
    "[recovery][loader]") {
  BootReset reset;
  TempDir dir;
  const std::string path = dir / "s";
  make_store(path);
  std::uint64_t hold;
  {
    auto files = open_files(path, false);
    hold = files->rows_files_hold();
  }
  SECTION("capacity beyond the files") {
    put_u64(path + "/header", kCapacityAt, hold + 1000);
    put_u64(path + "/header", kCommittedAt, hold + 10);
    expect_refused(path, "capacity_rows " + std::to_string(hold + 1000) +
                             " exceeds the rows the files hold (a file is too short): " + path +
                             "/rows.1 holds " + std::to_string(hold) + " rows and " + path +
                             "/index.1 ");
    detail::testing::set_boot_id(kBootB);
    auto files = open_files(path, false);
    const LoadedLog log = detail::load_log(*files);
    CHECK(log.recovered.capacity == hold);
    CHECK(log.recovered.committed == 150);  // Past 150 the entries are zeros: cut there.
  }
  SECTION("a data file cut inside the unsynced tail") {
    REQUIRE(::truncate((path + "/rows.1").c_str(), 135 * kRowBytes + 13) == 0);
    expect_refused(path, "capacity_rows");
    detail::testing::set_boot_id(kBootB);
    auto files = open_files(path, false);
    const LoadedLog log = detail::load_log(*files);
    CHECK(log.recovered.capacity == 135);
    CHECK(log.recovered.committed == 130);  // Rows 130..134 survive, their batch does not.
    CHECK(log.recovered.durable == 100);
  }
  SECTION("an index file cut inside the synced rows") {
    // A sync flushed rows [0, 100) with the files' sizes before it counted them: a file that
    // holds fewer was cut since. Clamping it silently dropped synced rows (and could end the
    // log inside a batch, with no check of the batch ends below durable_rows).
    REQUIRE(::truncate((path + "/index.1").c_str(), 60 * 32) == 0);
    detail::testing::set_boot_id(kBootB);
    expect_refused(path,
                   "durable_rows 100 exceeds the rows the files hold, though a sync "
                   "flushed them before it counted them: a file was cut since (" +
                       path + "/rows.1 holds ");
    expect_refused(path, path + "/index.1 60; embstore salvage copies the rows that are left)");
    CHECK_THROWS_WITH(Writer::open(path), Catch::Matchers::Contains("durable_rows 100"));
    CHECK_THROWS_WITH(Reader::open(path), Catch::Matchers::Contains("durable_rows 100"));
  }
}
