// The one recovery loader (src/log/recovery.h): Reader and Writer read the same counters, check
// them against each other and the files the same way, and so accept, repair or refuse the same
// stores. A counter that disagrees with the files is a named kCorruption, never a silent cut.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "embstore/embstore.h"
#include "platform/testing.h"
#include "support/payload.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

constexpr std::uint32_t kDim = 16;
constexpr std::uint64_t kRowBytes = kDim * 4;
constexpr std::uint64_t kState = 4096;  // The state page inside the header file (FORMAT.md).
const char* const kBootA = "33333333-3333-3333-3333-333333333333";
const char* const kBootB = "44444444-4444-4444-4444-444444444444";

struct BootReset {
  ~BootReset() { detail::testing::set_boot_id(""); }
};

void put_u64(const std::string& file, std::uint64_t offset, std::uint64_t value) {
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &value, 8);
  test::write_bytes(file, offset, bytes);
}

// The tests need unsynced tails, as a power loss leaves them: no sync in the background or at
// close.
WriterOptions unsynced() {
  WriterOptions options;
  options.sync = SyncPolicy::kNone;
  return options;
}

// 1,000 rows of dim 16 in one unsynced batch, written in boot A.
std::string make_store(const TempDir& dir) {
  detail::testing::set_boot_id(kBootA);
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = kDim;
  Writer w = Writer::create(path, o, unsynced());
  const auto values = test::batch_payload(0, 0, 1000, kDim);
  std::vector<std::uint64_t> keys(1000);
  for (std::uint64_t i = 0; i < 1000; ++i) keys[i] = test::make_key(0, i);
  w.append(keys, 0, std::span<const float>(values));
  REQUIRE(w.committed_rows() == 1000);
  return path;
}

std::string store_bytes(const std::string& path) {
  return test::read_file(path + "/header") + test::read_file(path + "/rows.1") +
         test::read_file(path + "/index.1");
}

// Reader::open, Reader::verify and Writer::open all refuse with kCorruption naming `field`, and
// no byte of the store changes.
void expect_both_refuse(const std::string& path, const std::string& field) {
  const std::string before = store_bytes(path);
  try {
    Reader r = Reader::open(path);
    (void)r.verify();
    FAIL("a reader opened and verified the store: size " << r.size());
  } catch (const Error& e) {
    INFO(e.what());
    CHECK(e.code() == ErrorCode::kCorruption);
    CHECK_THAT(std::string(e.what()), Catch::Contains(field));
  }
  try {
    Writer w = Writer::open(path, unsynced());
    FAIL("a writer opened the store: committed " << w.committed_rows());
  } catch (const Error& e) {
    INFO(e.what());
    CHECK(e.code() == ErrorCode::kCorruption);
    CHECK_THAT(std::string(e.what()), Catch::Contains(field));
  }
  CHECK(store_bytes(path) == before);
}

}  // namespace

TEST_CASE("After a reboot capacity_rows below committed_rows is a named corruption for both",
          "[recovery-loader]") {
  BootReset reset;
  TempDir dir;
  const std::string path = make_store(dir);
  put_u64(path + "/header", kState + 128, 10);  // capacity_rows
  detail::testing::set_boot_id(kBootB);
  expect_both_refuse(path, "capacity_rows 10");
}

TEST_CASE("In the same boot, counters a writer refuses are refused by readers and verify",
          "[recovery-loader]") {
  BootReset reset;
  TempDir dir;
  const std::string path = make_store(dir);
  SECTION("capacity 0") {
    put_u64(path + "/header", kState + 128, 0);
    expect_both_refuse(path, "capacity_rows 0");
  }
  SECTION("durable beyond committed") {
    put_u64(path + "/header", kState + 64, 1001);
    expect_both_refuse(path, "durable_rows 1001");
  }
  SECTION("the data file cut to committed rows + 13 bytes") {
    REQUIRE(::truncate((path + "/rows.1").c_str(), 1000 * kRowBytes + 13) == 0);
    expect_both_refuse(path, "capacity_rows");
  }
}

TEST_CASE("After a reboot a data file cut short is repaired the same way by reader and writer",
          "[recovery-loader]") {
  BootReset reset;
  TempDir dir;
  const std::string path = make_store(dir);
  // 1,000 rows in one batch: a power loss that kept only 600 rows keeps none of that batch.
  {
    Writer w = Writer::open(path, unsynced());
    const auto values = test::batch_payload(0, 1000, 10, kDim);
    std::vector<std::uint64_t> keys(10);
    for (std::uint64_t i = 0; i < 10; ++i) keys[i] = test::make_key(0, 1000 + i);
    w.sync();
    w.append(keys, 0, std::span<const float>(values));
  }
  REQUIRE(::truncate((path + "/rows.1").c_str(), 1005 * kRowBytes + 13) == 0);
  detail::testing::set_boot_id(kBootB);
  Reader r = Reader::open(path);
  CHECK(r.size() == 1000);  // the synced rows stay; the torn batch of 10 goes whole
  CHECK(r.verify().bad_row_count == 0);
  CHECK(r.verify().rows_to_cut == 10);
  Writer w = Writer::open(path, unsynced());
  CHECK(w.committed_rows() == r.size());
  CHECK(w.durable_rows() == 1000);
  CHECK(r.verify().ok());
}

#ifdef EMBSTORE_TEST_CLI
TEST_CASE("embstore verify exits non-zero on a store a writer refuses", "[recovery-loader][cli]") {
  const char* bin = std::getenv("EMBSTORE_TEST_BIN_DIR");
  REQUIRE(bin != nullptr);
  BootReset reset;
  TempDir dir;
  const std::string path = make_store(dir);
  put_u64(path + "/header", kState + 64, 1001);  // durable_rows > committed_rows
  const int status = test::run_shell(std::string(bin) + "/embstore verify '" + path + "' > '" +
                                     (dir / "out") + "' 2>&1");
  CHECK(status == 10 + static_cast<int>(ErrorCode::kCorruption));
  CHECK_THAT(test::read_file(dir / "out"), Catch::Contains("durable_rows 1001"));
}

// The tool runs in the machine's real boot, not in the boot the store was written in.
TEST_CASE(
    "After a reboot embstore info counts the rows the next writer keeps and verify exits 1 "
    "naming those it cuts",
    "[recovery-loader][cli]") {
  const char* bin = std::getenv("EMBSTORE_TEST_BIN_DIR");
  REQUIRE(bin != nullptr);
  BootReset reset;
  TempDir dir;
  const std::string path = make_store(dir);
  {
    Writer w = Writer::open(path, unsynced());
    w.sync();
    const auto values = test::batch_payload(0, 1000, 10, kDim);
    std::vector<std::uint64_t> keys(10);
    for (std::uint64_t i = 0; i < 10; ++i) keys[i] = test::make_key(0, 1000 + i);
    w.append(keys, 0, std::span<const float>(values));
  }
  // Row 1005 did not reach the disk before the power loss: its batch [1000, 1010) goes whole.
  test::write_bytes(path + "/rows.1", 1005 * kRowBytes, std::string(kRowBytes, '\0'));
  const std::string before = store_bytes(path);
  auto tool = [&](const std::string& args) {
    const int status = test::run_shell(std::string(bin) + "/embstore " + args + " '" + path +
                                       "' > '" + (dir / "out") + "' 2>&1");
    return std::make_pair(status, test::read_file(dir / "out"));
  };
  const auto [info_status, info] = tool("info --json");
  CHECK(info_status == 0);
  CHECK_THAT(info, Catch::Contains("\"committed_rows\":1000,") &&
                       Catch::Contains("\"durable_rows\":1000,") &&
                       Catch::Contains("\"rows_to_cut\":10,"));
  CHECK_THAT(
      tool("info").second,
      Catch::Contains("rows to cut     10 (rows [1000, 1010) did not survive the last reboot"));
  const auto [verify_status, verify] = tool("verify");
  CHECK(verify_status == 1);
  CHECK_THAT(verify, Catch::Contains("checked rows [0, 1000): 0 bad") &&
                         Catch::Contains("10 rows to cut: rows [1000, 1010)"));
  const auto [json_status, json] = tool("verify --json");
  CHECK(json_status == 1);
  CHECK_THAT(json, Catch::Contains("\"rows_to_cut\":10"));
  CHECK(store_bytes(path) == before);  // The tool only read.

  detail::testing::set_boot_id(kBootB);
  CHECK(Writer::open(path, unsynced()).committed_rows() == 1000);
  CHECK(tool("verify").first == 0);
  CHECK_THAT(tool("info --json").second, Catch::Contains("\"rows_to_cut\":0,"));
}
#endif
