// Recovery after a reboot (simulated by a new boot id): rows past the durable point are
// re-checked and the commit counter cut back exactly; synced rows are never cut, only reported.
#include <signal.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "embstore/embstore.h"
#include "platform/testing.h"
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
    CHECK(r.verify().ok());
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
  make_store(path);  // committed 150
  const pid_t child = test::spawn([&] {
    Writer w = Writer::open(path, unsynced());
    detail::testing::arm_crash("before-publish", 1);
    append_rows(w, 150, 40);  // entries [150, 190) written, never published
    return 1;
  });
  REQUIRE(test::wait_for(child) == 128 + SIGKILL);
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
