// A full disk is an error from append(), never SIGBUS: on a small tmpfs and under RLIMIT_FSIZE.
// Earlier rows stay intact, readers keep reading, and appends resume once space frees.
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <vector>

#include "embstore/embstore.h"
#include "platform/testing.h"
#include "support/payload.h"
#include "support/process.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

constexpr std::uint32_t kDim = 256;  // 1 KiB rows

// The key of row `seq`: all distinct, or cycling through `key_count` keys (0: all distinct).
std::uint64_t key_of(std::uint64_t seq, std::uint64_t key_count) {
  return test::make_key(0, key_count == 0 ? seq : seq % key_count);
}

// Appends 64-row batches until one throws; returns the error (kIO if none was thrown). `seq`
// counts the rows of every append that returned.
// Appends batches of 64 rows until an append fails (its error) or `batches` were appended (kIO,
// "the disk never filled").
Error fill(Writer& w, std::uint64_t& seq, std::uint64_t key_count = 0, int batches = 100000) {
  for (int i = 0; i < batches; ++i) {
    std::vector<float> values(64 * kDim);
    std::vector<std::uint64_t> keys(64);
    for (int k = 0; k < 64; ++k) {
      keys[k] = key_of(seq + k, key_count);
      test::payload_for(keys[k], kDim, values.data() + k * kDim);
    }
    try {
      w.append(keys, 0, std::span<const float>(values));
    } catch (const Error& e) {
      return e;
    }
    seq += 64;
  }
  return Error(ErrorCode::kIO, "the disk never filled");
}

bool rows_intact(const std::string& path, std::uint64_t rows, std::uint64_t key_count = 0) {
  Reader r = Reader::open(path);
  if (r.size() != rows || !r.verify().ok()) return false;
  for (std::uint64_t row = 0; row < rows; ++row) {
    if (!test::payload_matches(key_of(row, key_count), kDim, r.rows().row(row))) return false;
  }
  return true;
}

// Mounts a tmpfs of `size` (e.g. "2m") at dir/mnt for the life of the object; `mounted` is false
// when this process may not mount (not root).
struct SmallTmpfs {
  std::string at;
  bool mounted = false;
  SmallTmpfs(const TempDir& dir, const char* size) : at(dir / "mnt") {
    test::run_shell("mkdir -p '" + at + "'");
    mounted = ::mount("tmpfs", at.c_str(), "tmpfs", 0, (std::string("size=") + size).c_str()) == 0;
  }
  ~SmallTmpfs() {
    if (mounted) ::umount2(at.c_str(), MNT_DETACH);
  }
};

}  // namespace

TEST_CASE("On a full tmpfs append fails cleanly and resumes once space frees", "[faults][full]") {
  TempDir dir;
  const SmallTmpfs tmpfs(dir, "2m");
  if (!tmpfs.mounted) {
    WARN("cannot mount tmpfs here (not root?): skipped");
    return;
  }
  const std::string& mnt = tmpfs.at;

  const std::string path = mnt + "/s";
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 64 * 1024;
  Writer w = Writer::create(path, o);
  // Ballast that will be deleted to free space.
  test::run_shell("dd if=/dev/zero of='" + mnt + "/ballast' bs=64k count=8 status=none");
  Reader follower = Reader::open(path);

  std::uint64_t seq = 0;
  const Error full = fill(w, seq);
  CHECK(full.code() == ErrorCode::kFull);
  CHECK(full.sys_errno() == ENOSPC);
  CHECK_THAT(std::string(full.what()), Catch::Contains("fallocate") && Catch::Contains(path));
  CHECK(seq > 0);
  CHECK(w.committed_rows() == seq);  // nothing partial was published
  CHECK(follower.refresh() == seq);
  CHECK(follower.verify().ok());
  CHECK(rows_intact(path, seq));
  CHECK(read_info(path).data_file_bytes % 4096 == 0);

  // The failure repeats cleanly while the disk is full. Every append that returns counts: the
  // store may free space by itself meanwhile (the refresh above let go of a key index
  // generation a growth replaced: see the test below), and such appends then succeed.
  CHECK(fill(w, seq).code() == ErrorCode::kFull);
  CHECK(w.committed_rows() == seq);
  CHECK(rows_intact(path, seq));
  // ...and appends resume once space frees, with no reopen.
  test::run_shell("rm -f '" + mnt + "/ballast'");
  const std::uint64_t before = seq;
  const Error again = fill(w, seq);
  CHECK(again.code() == ErrorCode::kFull);
  CHECK(seq > before);
  CHECK(rows_intact(path, seq));
  CHECK(follower.refresh() == seq);
}

TEST_CASE("A store copied sparse onto a full disk gives kFull and never SIGBUS", "[faults][full]") {
  TempDir dir;
  const std::string mnt = dir / "mnt";
  test::run_shell("mkdir -p '" + mnt + "'");
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=4m") != 0) {
    WARN("cannot mount tmpfs here (not root?): skipped");
    return;
  }
  struct Unmount {
    std::string at;
    ~Unmount() { ::umount2(at.c_str(), MNT_DETACH); }
  } unmount{mnt};

  // 100 rows in a store allocated for 128: the tail of the data file is zeros.
  const std::string original = dir / "original";
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 64 * 1024;
  {
    Writer w = Writer::create(original, o);
    std::uint64_t seq = 0;
    for (; seq < 100; ++seq) {
      const auto values = test::batch_payload(0, seq, 1, kDim);
      const std::vector<std::uint64_t> keys = {test::make_key(0, seq)};
      w.append(keys, 0, std::span<const float>(values));
    }
  }
  const std::string path = mnt + "/s";
  REQUIRE(test::run_shell("cp -r --sparse=always '" + original + "' '" + path + "'") == 0);
  // And a hole punched where rows 100.. will go, whatever cp chose to copy.
  const std::string data = path + "/rows.1";
  {
    const int fd = ::open(data.c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    REQUIRE(::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100 * 1024, 28 * 1024) ==
            0);
    ::close(fd);
  }
  struct stat st;
  REQUIRE(::stat(data.c_str(), &st) == 0);
  REQUIRE(static_cast<std::uint64_t>(st.st_blocks) * 512 < static_cast<std::uint64_t>(st.st_size));
  // Fill the disk.
  test::run_shell("dd if=/dev/zero of='" + mnt + "/ballast' bs=4k status=none 2>/dev/null");

  const pid_t child = test::spawn([&] {
    std::uint64_t seq = 100;
    try {
      Writer w = Writer::open(path);
      for (int i = 0; i < 64; ++i, ++seq) {
        const auto values = test::batch_payload(0, seq, 1, kDim);
        const std::vector<std::uint64_t> keys = {test::make_key(0, seq)};
        w.append(keys, 0, std::span<const float>(values));
      }
    } catch (const Error& e) {
      if (e.code() == ErrorCode::kFull && e.sys_errno() == ENOSPC) return 0;
      std::fprintf(stderr, "unexpected: %s\n", e.what());
      return 2;
    }
    return 3;  // 64 rows appended on a full disk: the test did not fill it.
  });
  CHECK(test::wait_for(child) == 0);  // SIGBUS would be 128 + 7
  CHECK(rows_intact(path, 100));

  // Once space frees, the same store takes rows again.
  test::run_shell("rm -f '" + mnt + "/ballast'");
  {
    Writer w = Writer::open(path);
    REQUIRE(w.committed_rows() == 100);
    for (std::uint64_t seq = 100; seq < 140; ++seq) {
      const auto values = test::batch_payload(0, seq, 1, kDim);
      const std::vector<std::uint64_t> keys = {test::make_key(0, seq)};
      w.append(keys, 0, std::span<const float>(values));
    }
  }
  CHECK(rows_intact(path, 140));
}

TEST_CASE("A reader holding a replaced key index frees its space at refresh, then appends resume",
          "[faults][full][keys]") {
  TempDir dir;
  const SmallTmpfs tmpfs(dir, "8m");
  if (!tmpfs.mounted) {
    WARN("cannot mount tmpfs here (not root?): skipped");
    return;
  }
  const std::string path = tmpfs.at + "/s";
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 64 * 1024;
  Writer w = Writer::create(path, o);
  // 64 keys in one epoch: the key index's tables never grow. 4096 rows give keys.1 a chain of
  // 64 KiB or more, which a lookup makes the follower map.
  constexpr std::uint64_t kKeys = 64;
  std::uint64_t seq = 0;
  CHECK(fill(w, seq, kKeys, 64).code() == ErrorCode::kIO);
  Reader follower = Reader::open(path);
  CHECK(follower.find(key_of(seq - 1, kKeys), 0) == seq - 1);  // Maps keys.1.
  // keys.2 replaces keys.1, which is unlinked but stays allocated while the follower maps it.
  w.rebuild_key_index();
  CHECK_FALSE(std::filesystem::exists(path + "/keys.1"));
  CHECK(std::filesystem::exists(path + "/keys.2"));

  CHECK(fill(w, seq, kKeys).code() == ErrorCode::kFull);
  const std::uint64_t full_at = seq;
  CHECK(full_at > 0);
  CHECK(fill(w, seq, kKeys).code() == ErrorCode::kFull);
  CHECK(seq == full_at);  // Nothing freed yet: the failure repeats.
  CHECK(w.committed_rows() == seq);

  // The follower moves to keys.2 and lets go of keys.1: its tables and 64 KiB or more of chain
  // are freed, more than a batch of 64 KiB and its offset index entries take.
  CHECK(follower.refresh() == seq);
  CHECK(fill(w, seq, kKeys).code() == ErrorCode::kFull);
  CHECK(seq > full_at);
  // Every append that returned is stored, and only those.
  CHECK(w.committed_rows() == seq);
  CHECK(follower.refresh() == seq);
  CHECK(rows_intact(path, seq, kKeys));
  CHECK(follower.find(key_of(seq - 1, kKeys), 0) == seq - 1);
}

TEST_CASE(
    "A key index that met a full disk: appends succeed, close() reports it, the next writer "
    "rebuilds",
    "[faults][full][keys]") {
  TempDir dir;
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = 4;
  o.segment_bytes = 4 << 20;
  Writer w = Writer::create(path, o);
  // 256 rows over 64 keys in epoch `epoch`: 256 (key, epoch) pairs at most, so no table grows.
  auto append_batch = [&](std::uint64_t epoch, std::uint64_t rows = 256) {
    std::vector<std::uint64_t> keys(rows);
    std::vector<float> values(rows * 4);
    const std::uint64_t first = w.committed_rows();
    for (std::uint64_t i = 0; i < keys.size(); ++i) {
      keys[i] = i % 64;
      for (std::uint64_t j = 0; j < 4; ++j) values[i * 4 + j] = static_cast<float>(first + i);
    }
    return w.append(keys, epoch, std::span<const float>(values));
  };
  // One large batch: the files then hold about a segment more rows (87,000 of these) than it,
  // the key index's chain about 1/8 more (25,000): only the chain allocates in what follows.
  append_batch(0, 200'000);
  REQUIRE_THAT(w.info().key_index, !Catch::Contains("scan"));
  const std::uint64_t capacity = w.info().capacity_rows;

  // Every fallocate fails from here; the appends go on until the chain must grow, and succeed.
  const std::uint64_t injected_before = detail::testing::faults_injected();
  detail::testing::arm_fault(detail::testing::Op::kFallocate, 1, ENOSPC, /*forever=*/true);
  std::uint64_t last_of_epoch3 = 0;  // The first row of the last batch of epoch 3.
  for (std::uint64_t b = 1; detail::testing::faults_injected() == injected_before && b < 200; ++b) {
    CHECK_NOTHROW(append_batch(b % 4));
  }
  CHECK_NOTHROW(last_of_epoch3 = append_batch(3));  // A batch after the failure.
  detail::testing::disarm_all();
  REQUIRE(detail::testing::faults_injected() > injected_before);
  CHECK(w.info().capacity_rows == capacity);  // The data and index files did not grow.
  CHECK_THAT(w.info().key_index, Catch::Contains("answered by scan"));
  Reader r = Reader::open(path);
  CHECK(r.find(5, 3) == last_of_epoch3 + 5 + 192);  // Key 5's last row in that batch.

  // Space is back, but this handle has stopped indexing for its lifetime: its rows are stored and
  // found by scan, and close() reports the failure (nothing lost silently, nothing half-indexed).
  const std::uint64_t first = append_batch(7);
  CHECK_THAT(w.info().key_index, Catch::Contains("answered by scan"));
  CHECK(r.refresh() == first + 256);
  for (std::uint64_t key = 0; key < 64; ++key) CHECK(r.find(key, 7) == first + 192 + key);
  try {
    w.close();
    FAIL("close() did not report the key index failure");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kFull);
    CHECK_THAT(std::string(e.what()), Catch::Contains("key index could not be maintained"));
  }
  // The next writer indexes every row.
  {
    Writer again = Writer::open(path);
    CHECK_THAT(again.info().key_index, !Catch::Contains("scan"));
  }
  CHECK(r.refresh() == first + 256);
  for (std::uint64_t key = 0; key < 64; ++key) {
    CHECK(r.find(key, 7) == first + 192 + key);
    CHECK(r.find(key, 3) == last_of_epoch3 + 192 + key);
  }
  const VerifyReport report = r.verify();
  CHECK(report.key_index_checked);
  CHECK(report.ok());
}

TEST_CASE("No room for a key index sized for expected_rows: appends succeed, close() names it",
          "[faults][full][keys]") {
  TempDir dir;
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = 4;
  auto append = [](Writer& w, std::uint64_t rows) {
    const std::vector<float> values(rows * 4, 1.0f);
    std::vector<std::uint64_t> keys(rows);
    for (std::uint64_t i = 0; i < rows; ++i) keys[i] = w.committed_rows() + i;
    return w.append(keys, 0, std::span<const float>(values));
  };
  {
    Writer w = Writer::create(path, o);  // 700 pairs: keys.1 of 1,024 slots, not yet full.
    append(w, 700);
  }
  // A guess of 600 rows sizes nothing past the rows built (1,024 slots either way): the
  // message must not blame it.
  const std::uint64_t guess = GENERATE(100'000, 600);
  WriterOptions expecting;
  expecting.expected_rows = guess;
  Writer w = Writer::open(path, expecting);
  // Every fallocate fails from here. The files hold these rows already; the growth that the
  // 705th pair claims builds tables for the guess, and finds no room.
  detail::testing::arm_fault(detail::testing::Op::kFallocate, 1, ENOSPC, /*forever=*/true);
  CHECK(append(w, 100) == 700);
  try {
    w.close();
    FAIL("close() did not report the key index failure");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kFull);
    if (guess == 100'000) {
      CHECK_THAT(std::string(e.what()), Catch::Contains("sized for 100000 expected rows"));
    } else {
      CHECK_THAT(std::string(e.what()), !Catch::Contains("expected"));
    }
  }
  detail::testing::disarm_all();
  CHECK(Reader::open(path).find(799, 0) == std::optional<std::uint64_t>(799));
}

TEST_CASE("Under RLIMIT_FSIZE append fails with kFull instead of a signal", "[faults][full]") {
  TempDir dir;
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 64 * 1024;
  create_store(path, o);
  const pid_t child = test::spawn([&] {
    ::signal(SIGXFSZ, SIG_IGN);  // the documented requirement for RLIMIT_FSIZE users
    struct rlimit limit = {1 << 20, 1 << 20};
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) return 10;
    Writer w = Writer::open(path);
    std::uint64_t seq = 0;
    const Error e = fill(w, seq);
    if (e.code() != ErrorCode::kFull || e.sys_errno() != EFBIG) {
      std::fprintf(stderr, "unexpected: %s\n", e.what());
      return 2;
    }
    if (w.committed_rows() != seq || seq == 0) return 3;
    return rows_intact(path, seq) ? 0 : 4;
  });
  CHECK(test::wait_for(child) == 0);
  // Without the limit, the same store takes more rows at once.
  Writer w = Writer::open(path);
  const std::uint64_t rows = w.committed_rows();
  CHECK(rows > 0);
  const auto values = test::batch_payload(0, rows, 64 * 20, kDim);
  std::vector<std::uint64_t> keys(64 * 20);
  for (std::size_t k = 0; k < keys.size(); ++k) keys[k] = test::make_key(0, rows + k);
  w.append(keys, 0, std::span<const float>(values));
  CHECK(rows_intact(path, rows + keys.size()));
}

TEST_CASE("A large append the kernel writes only in part fails with kFull and publishes nothing",
          "[faults][full][write-path]") {
  TempDir dir;
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4 << 20;
  create_store(path, o);
  {  // Row 0, and 4 MiB of data file allocated before any limit.
    Writer w = Writer::open(path);
    const auto values = test::batch_payload(0, 0, 1, kDim);
    const std::vector<std::uint64_t> keys = {test::make_key(0, 0)};
    w.append(keys, 0, std::span<const float>(values));
  }
  {  // A data file longer than its capacity is valid (FORMAT.md "File sizes"): growing within
     // it extends nothing, so the limit cuts the row copy, not the allocation.
    const int fd = ::open((path + "/rows.1").c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    CHECK(::posix_fallocate(fd, 0, 4 << 20) == 0);
    ::close(fd);
  }
  const pid_t child = test::spawn([&] {
    ::signal(SIGXFSZ, SIG_IGN);
    // Mid-row and mid-page: the 2 MiB batch from byte 1024 is cut short there, then refused.
    constexpr rlim_t kLimit = (1 << 20) + 1000;
    struct rlimit limit = {kLimit, RLIM_INFINITY};
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) return 10;
    detail::testing::set_write_path("syscall");  // The rows go by pwritev whatever the default.
    Writer w = Writer::open(path);
    if (w.info().data_file_bytes < (4u << 20)) return 11;
    const auto values = test::batch_payload(0, 1, 2048, kDim);
    std::vector<std::uint64_t> keys(2048);
    for (std::uint64_t k = 0; k < keys.size(); ++k) keys[k] = test::make_key(0, 1 + k);
    try {
      w.append(keys, 0, std::span<const float>(values));
      return 2;  // Not refused.
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kFull || e.sys_errno() != EFBIG ||
          std::string(e.what()).find(path) == std::string::npos) {
        std::fprintf(stderr, "unexpected: %s\n", e.what());
        return 3;
      }
    }
    if (w.committed_rows() != 1 || !rows_intact(path, 1)) return 4;
    // The part the kernel took went where it belongs: the batch's bytes up to the limit.
    std::vector<std::byte> head(kLimit - 1024);
    const int fd = ::open((path + "/rows.1").c_str(), O_RDONLY);
    if (fd < 0 || ::pread(fd, head.data(), head.size(), 1024) != static_cast<ssize_t>(head.size()))
      return 5;
    ::close(fd);
    if (std::memcmp(head.data(), values.data(), head.size()) != 0) return 6;
    // Lift the limit: the same batch now goes in whole, at the same place.
    limit.rlim_cur = RLIM_INFINITY;
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) return 12;
    if (w.append(keys, 0, std::span<const float>(values)) != 1) return 7;
    return rows_intact(path, 2049) ? 0 : 8;
  });
  CHECK(test::wait_for(child) == 0);
  CHECK(rows_intact(path, 2049));
}

TEST_CASE("On a nearly full disk a growth takes just the rows an append needs", "[faults][full]") {
  // FORMAT.md "File sizes": when the step the growth rule asks for does not fit, the writer
  // allocates the rows of the append alone before reporting the disk full.
  TempDir dir;
  const SmallTmpfs tmpfs(dir, "4m");
  if (!tmpfs.mounted) {
    WARN("cannot mount tmpfs here (not root?): skipped");
    return;
  }
  const std::string path = tmpfs.at + "/s";
  CreateOptions o;
  o.dim = kDim;  // 1 KiB rows: the files double from 64 KiB up to the 64 MiB segment
  Writer w = Writer::create(path, o);
  std::uint64_t seq = 0;
  // Up to the capacity of a 1 MiB allocation (992 rows): the next growth asks for twice that.
  while (read_info(path).capacity_rows < 900) fill(w, seq, 0, 1);
  while (w.committed_rows() + 64 <= read_info(path).capacity_rows) fill(w, seq, 0, 1);
  const std::uint64_t capacity = read_info(path).capacity_rows;
  REQUIRE(capacity - w.committed_rows() < 64);
  // Leave about 256 KiB: room for a few batches, not for the next doubling.
  struct statvfs fs {};
  REQUIRE(::statvfs(tmpfs.at.c_str(), &fs) == 0);
  const std::uint64_t avail = std::uint64_t{fs.f_bavail} * fs.f_frsize;
  REQUIRE(avail > (256 << 10));
  test::run_shell("dd if=/dev/zero of='" + tmpfs.at + "/ballast' bs=4k count=" +
                  std::to_string((avail - (256 << 10)) / 4096) + " status=none");
  const std::uint64_t before = seq;
  const Error full = fill(w, seq);
  CHECK(full.code() == ErrorCode::kFull);
  CHECK(seq >= before + 64);  // batches went on past the capacity the rule could not reach
  const StoreInfo info = read_info(path);
  CHECK(info.committed_rows == seq);
  CHECK(info.capacity_rows < 2 * capacity);  // grown by less than the rule's step
  CHECK(info.data_file_bytes % 4096 == 0);
  CHECK(rows_intact(path, seq));
  w.close();
}
