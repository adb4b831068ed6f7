// Storage: how the data and index files grow (FORMAT.md "File sizes"). Small stores stay small
// on disk, large ones carry at most a segment of slack, every byte below a file's size is
// allocated, and stores whose files were sized in whole segments (format 1.0) open and grow.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "embstore/embstore.h"
#include "platform/os.h"
#include "storage/store_files.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

struct DiskUse {
  std::uint64_t allocated = 0;  // st_blocks * 512, summed over the store directory's files
  std::uint64_t size = 0;       // st_size, summed likewise
  std::uint64_t key_index = 0;  // st_blocks * 512 of the key index files (keys.*), included above
};

DiskUse disk_use(const std::string& store) {
  DiskUse use;
  DIR* dir = ::opendir(store.c_str());
  REQUIRE(dir != nullptr);
  while (const dirent* entry = ::readdir(dir)) {
    const std::string name = entry->d_name;
    if (name == "." || name == "..") continue;
    struct stat st {};
    if (::stat((store + "/" + name).c_str(), &st) != 0) {
      // A key index generation replaced by a growth in the background may go between readdir()
      // and stat(): it no longer takes space. Any other file must be there.
      const int err = errno;
      INFO(name << ": " << std::strerror(err));
      REQUIRE((err == ENOENT && name.rfind("keys.", 0) == 0));
      continue;
    }
    use.allocated += static_cast<std::uint64_t>(st.st_blocks) * 512;
    use.size += static_cast<std::uint64_t>(st.st_size);
    if (name.rfind("keys.", 0) == 0)
      use.key_index += static_cast<std::uint64_t>(st.st_blocks) * 512;
  }
  ::closedir(dir);
  return use;
}

// Both files hold capacity_rows in whole pages and are allocated to their ends: no hole a
// mapping could fault in (SIGBUS on a full disk instead of an error).
void check_files_allocated(const std::string& store) {
  const StoreInfo info = read_info(store);
  CHECK(info.data_file_bytes % 4096 == 0);
  CHECK(info.index_file_bytes % 4096 == 0);
  CHECK(info.data_file_bytes >= info.capacity_rows * info.record_bytes);
  CHECK(info.index_file_bytes >= info.capacity_rows * 32);
  for (const char* prefix : {"/rows.", "/index."}) {
    struct stat st {};
    const std::string file = store + prefix + std::to_string(info.generation);
    REQUIRE(::stat(file.c_str(), &st) == 0);
    INFO(file);
    CHECK(static_cast<std::uint64_t>(st.st_blocks) * 512 >= static_cast<std::uint64_t>(st.st_size));
  }
}

// The bound of FORMAT.md "File sizes" for a store of `rows` rows, without its key index.
std::uint64_t disk_bound(const StoreInfo& info, std::uint64_t rows) {
  const std::uint64_t need = rows * (info.record_bytes + 32);
  return need < info.segment_bytes ? 2 * need + (1 << 20) : need + info.segment_bytes;
}

// The bound of FORMAT.md "File sizes" for the key index of `rows` rows, between growths.
std::uint64_t key_index_bound(std::uint64_t rows) { return 112 * rows + (160 << 10); }

std::vector<std::uint8_t> row_bytes(std::uint64_t key, std::uint64_t record_bytes) {
  std::vector<std::uint8_t> out(record_bytes);
  for (std::uint64_t i = 0; i < record_bytes; ++i) {
    out[i] = static_cast<std::uint8_t>((key * 131 + i * 7 + 1) & 0x3f);  // finite in every dtype
  }
  return out;
}

// Appends keys [first, first + n) as one batch of the store's dtype.
void append(Writer& w, std::uint64_t first, std::uint64_t n) {
  const std::uint64_t record = w.info().record_bytes;
  std::vector<std::uint8_t> data;
  data.reserve(n * record);
  std::vector<std::uint64_t> keys(n);
  for (std::uint64_t i = 0; i < n; ++i) {
    keys[i] = first + i;
    const auto row = row_bytes(first + i, record);
    data.insert(data.end(), row.begin(), row.end());
  }
  w.append(keys, 0, ConstMatrix{data.data(), w.dtype(), n, w.dim(), record});
}

bool rows_intact(const std::string& store, std::uint64_t rows) {
  Reader r = Reader::open(store);
  if (r.size() != rows || !r.verify().ok()) return false;
  const std::uint64_t record = r.info().record_bytes;
  for (std::uint64_t row = 0; row < rows; ++row) {
    const Record rec = r.record(row);
    const auto expected = row_bytes(row, record);
    if (rec.key != row || std::memcmp(rec.data, expected.data(), expected.size()) != 0)
      return false;
  }
  return true;
}

// A store's shape and the batches appended to it, to follow its growth.
struct GrowthCase {
  DType dtype;
  std::uint32_t dim;
  std::uint64_t segment_bytes;
  std::vector<std::uint64_t> batches;
};

CreateOptions options(DType dtype, std::uint32_t dim, std::uint64_t segment_bytes) {
  CreateOptions o;
  o.dtype = dtype;
  o.dim = dim;
  o.segment_bytes = segment_bytes;
  return o;
}

}  // namespace

TEST_CASE("capacity_for doubles up to one segment, then adds the rows needed and a step",
          "[storage][growth]") {
  using detail::capacity_for;
  const std::uint64_t header = 8192, row = 16 + 32;  // float16 x 8 rows and their entries
  const std::uint64_t segment = 64 << 20;
  CHECK(capacity_for(0, 16, segment, header) == (64 << 10) / row);
  CHECK(capacity_for(1, 16, segment, header) == (64 << 10) / row);
  // Doubling: the files together take the next power of two of what the rows need.
  CHECK(capacity_for(2000, 16, segment, header) == (128 << 10) / row);
  CHECK(capacity_for(segment / row, 16, segment, header) == segment / row);
  // Past one segment: the rows needed plus a segment less the header and four pages.
  const std::uint64_t step = (segment - header - 16384) / row;
  CHECK(capacity_for(segment / row + 1, 16, segment, header) == segment / row + 1 + step);
  CHECK(capacity_for(10'000'000, 16, segment, header) == 10'000'000 + step);
  // Segments too small for the header: whole segments' worth of rows, at least one.
  CHECK(capacity_for(500, 400, 4096, header) == 500 + 4096 / 432);
  CHECK(capacity_for(0, 4096, 4096, header) == 1);
  CHECK(capacity_for(7, 4096, 4096, header) == 8);
  // Never below what was asked, and never shrinking as more is asked.
  std::uint64_t previous = 0;
  for (std::uint64_t rows = 0; rows < 5'000'000; rows = rows * 3 / 2 + 1) {
    const std::uint64_t c = capacity_for(rows, 100, 1 << 20, header);
    CHECK(c >= rows);
    CHECK(c >= previous);
    previous = c;
  }
}

TEST_CASE("Small stores stay small on disk: every file of the directory within the bound",
          "[storage][growth]") {
  const std::vector<GrowthCase> cases = {
      // 8 rows of float16 x 8, then growth through many doublings, all under one segment.
      {DType::kFloat16, 8, kDefaultSegmentBytes, {8, 1, 100, 1000, 5000, 20000, 100000}},
      // A 1.1 MB run of float32 x 768 in batches of 30 rows, then more.
      {DType::kFloat32, 768, kDefaultSegmentBytes, std::vector<std::uint64_t>(40, 30)},
      // Past one segment: small batches, a batch of several segments, small batches again.
      {DType::kUInt8, 100, 1 << 20, {1, 7, 500, 3, 9000, 30000, 1, 1, 8000, 12000, 2}},
      {DType::kFloat32, 256, 256 << 10, {1, 1000, 1, 1, 1, 3000, 100}},
  };
  for (const GrowthCase& c : cases) {
    TempDir dir;
    const std::string store = dir / "s";
    Writer w = Writer::create(store, options(c.dtype, c.dim, c.segment_bytes));
    INFO("dim " << c.dim << ", segment " << c.segment_bytes);
    const StoreInfo created = w.info();
    CHECK(disk_use(store).allocated <= disk_bound(created, 0) + key_index_bound(0));
    std::uint64_t rows = 0;
    for (std::uint64_t n : c.batches) {
      append(w, rows, n);
      rows += n;
      // The key index may be growing in the background (two generations for a moment): it is
      // checked after close(), when that has finished.
      const DiskUse use = disk_use(store);
      const std::uint64_t bound = disk_bound(created, rows);
      INFO(rows << " rows: " << use.allocated - use.key_index << " bytes allocated, " << use.size
                << " bytes long with the key index, bound " << bound);
      CHECK(use.allocated - use.key_index <= bound);
      check_files_allocated(store);
    }
    w.close();
    const DiskUse use = disk_use(store);
    INFO(rows << " rows, closed: " << use.key_index << " bytes of key index");
    CHECK(use.allocated - use.key_index <= disk_bound(created, rows));
    CHECK(use.key_index <= key_index_bound(rows));
    CHECK(use.size <= disk_bound(created, rows) + key_index_bound(rows));
    CHECK(rows_intact(store, rows));
  }
}

TEST_CASE("A store created without a key index keeps every file within the bound of its log",
          "[storage][growth][keys]") {
  // The bound above counts the data and index files; a key index comes on top (up to 112 B a
  // row). With CreateOptions::key_index false there is none: the whole directory stays within
  // the log's bound, through every growth, and lookups are answered by a scan.
  const std::vector<GrowthCase> cases = {
      {DType::kFloat16, 8, kDefaultSegmentBytes, {8, 1, 100, 1000, 5000, 20000, 100000}},
      {DType::kUInt8, 100, 1 << 20, {1, 7, 500, 3, 9000, 30000, 1, 1, 8000, 12000, 2}},
  };
  for (const GrowthCase& c : cases) {
    TempDir dir;
    const std::string store = dir / "s";
    CreateOptions o = options(c.dtype, c.dim, c.segment_bytes);
    o.key_index = false;
    std::uint64_t rows = 0;
    {
      Writer w = Writer::create(store, o);
      INFO("dim " << c.dim << ", segment " << c.segment_bytes);
      const StoreInfo created = w.info();
      CHECK_FALSE(created.keeps_key_index);
      for (std::uint64_t n : c.batches) {
        append(w, rows, n);
        rows += n;
        const DiskUse use = disk_use(store);
        INFO(rows << " rows: " << use.allocated << " bytes allocated, " << use.size << " long");
        CHECK(use.key_index == 0);
        CHECK(use.allocated <= disk_bound(created, rows));
        CHECK(use.size <= disk_bound(created, rows));
      }
    }
    // Reopened by another writer: still none built.
    { Writer again = Writer::open(store); }
    CHECK(disk_use(store).key_index == 0);
    Reader r = Reader::open(store);
    CHECK_FALSE(r.info().keeps_key_index);
    CHECK_FALSE(r.info().key_index_used);
    CHECK(r.find(rows / 2, 0) == rows / 2);
    CHECK(r.find(rows - 1) == rows - 1);
    CHECK_FALSE(r.find(rows).has_value());
    CHECK(rows_intact(store, rows));
  }
}

TEST_CASE("The two examples of a small store take about what they hold", "[storage][growth]") {
  TempDir dir;
  {
    Writer w = Writer::create(dir / "tiny", options(DType::kFloat16, 8, kDefaultSegmentBytes));
    append(w, 0, 8);
  }
  // The header page pair, and 64 KiB for both files: it was 193 MB.
  CHECK(disk_use(dir / "tiny").allocated <= 128 << 10);
  {
    Writer w = Writer::create(dir / "run", options(DType::kFloat32, 768, kDefaultSegmentBytes));
    for (std::uint64_t i = 0; i < 12; ++i) append(w, 30 * i, 30);
  }
  // 1.1 MB of rows and 11.5 KB of entries in files of 2 MiB: it was 67 MB at the default segment.
  CHECK(disk_use(dir / "run").allocated <= (2 << 20) + (64 << 10));
  CHECK(rows_intact(dir / "tiny", 8));
  CHECK(rows_intact(dir / "run", 360));
}

TEST_CASE("A view taken at the first allocation stays unchanged through every growth",
          "[storage][growth]") {
  TempDir dir;
  const std::string store = dir / "s";
  Writer w = Writer::create(store, options(DType::kFloat32, 64, 1 << 20));
  append(w, 0, 10);
  Reader r = Reader::open(store);
  const RowsView early = r.rows();
  const std::vector<std::byte> copy(early.data, early.data + early.size_bytes());
  std::uint64_t rows = 10;
  for (std::uint64_t n : {100, 1000, 5000, 20000}) {
    append(w, rows, n);
    rows += n;
    CHECK(r.refresh() == rows);
    CHECK(std::memcmp(early.data, copy.data(), copy.size()) == 0);
  }
  CHECK(rows_intact(store, rows));
}

TEST_CASE("A store with files in whole segments (format 1.0 sizes) opens, reads and grows",
          "[storage][growth][compat]") {
  TempDir dir;
  const std::string store = dir / "s";
  const std::uint64_t segment = 1 << 20, record = 400;
  {
    Writer w = Writer::create(store, options(DType::kFloat32, 100, segment));
    append(w, 0, 50);
  }
  // What a 1.0 writer left: the data file one whole segment, the index sized from its rows,
  // capacity_rows = size / record_bytes.
  const std::uint64_t old_capacity = segment / record;
  auto extend = [](const std::string& file, std::uint64_t bytes) {
    const int fd = ::open(file.c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    REQUIRE(::posix_fallocate(fd, 0, static_cast<off_t>(bytes)) == 0);
    ::close(fd);
  };
  extend(store + "/rows.1", segment);
  extend(store + "/index.1", (old_capacity * 32 + 4095) / 4096 * 4096);
  {
    const int fd = ::open((store + "/header").c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    REQUIRE(::pwrite(fd, &old_capacity, 8, 4096 + 128) == 8);  // capacity_rows
    ::close(fd);
  }
  REQUIRE(read_info(store).capacity_rows == old_capacity);
  CHECK(rows_intact(store, 50));

  Writer w = Writer::open(store);
  Reader follower = Reader::open(store);
  append(w, 50, old_capacity - 50);  // exactly at the old capacity: no growth
  CHECK(read_info(store).capacity_rows == old_capacity);
  CHECK(read_info(store).data_file_bytes == segment);
  append(w, old_capacity, 1);  // grows by the new rule, from the old files
  append(w, old_capacity + 1, 6000);
  const std::uint64_t rows = old_capacity + 6001;
  const StoreInfo info = read_info(store);
  CHECK(info.capacity_rows >= rows);
  check_files_allocated(store);
  const DiskUse use = disk_use(store);  // The key index may be growing: counted apart.
  CHECK(use.allocated - use.key_index <= disk_bound(info, rows));
  CHECK(follower.refresh() == rows);
  CHECK(follower.verify().ok());
  CHECK(rows_intact(store, rows));
}

TEST_CASE("A growth that extended the files and died is taken over by the next one",
          "[storage][growth]") {
  TempDir dir;
  const std::string store = dir / "s";
  {
    Writer w = Writer::create(store, options(DType::kFloat32, 64, 1 << 20));
    append(w, 0, 5);
  }
  const StoreInfo before = read_info(store);
  // As if killed between the two allocations: the data file extended, capacity not published.
  const std::string data = store + "/rows.1";
  {
    const int fd = ::open(data.c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    REQUIRE(::posix_fallocate(fd, 0, static_cast<off_t>(before.data_file_bytes * 3)) == 0);
    ::close(fd);
  }
  Writer w = Writer::open(store);
  append(w, 5, before.capacity_rows * 2);
  check_files_allocated(store);
  CHECK(read_info(store).capacity_rows >= 5 + before.capacity_rows * 2);
  CHECK(rows_intact(store, 5 + before.capacity_rows * 2));
}

namespace {
// The cachestat(2) counters of a whole file (Linux 6.5); false where the kernel lacks it.
struct CacheStat {
  std::uint64_t cache, dirty, writeback, evicted, recently_evicted;
};
bool cache_stat(int fd, CacheStat& out) {
  struct {
    std::uint64_t off, len;
  } range{0, 0};
  return ::syscall(451 /* cachestat */, fd, &range, &out, 0) == 0;
}
}  // namespace

TEST_CASE("start_writeback starts the flush of a file's dirty pages without waiting for it",
          "[storage][sync]") {
  // sync() starts the index file's writeback before it waits for the data file's flush, so
  // the two overlap (writer.cc, flush()).
  TempDir dir;
  const std::string path = dir / "f";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  REQUIRE(fd >= 0);
  const std::vector<char> bytes(8 << 20, 'x');
  CacheStat before{};
  // The kernel's own writeback waits ~30 s for pages this young, unless the machine is past its
  // dirty limits (other processes writing): then it may have cleaned them already; write again.
  for (int attempt = 0; attempt < 5 && before.dirty == 0; ++attempt) {
    REQUIRE(::pwrite(fd, bytes.data(), bytes.size(), 0) == static_cast<ssize_t>(bytes.size()));
    if (!cache_stat(fd, before)) {
      WARN("no cachestat(2) on this kernel: not checked");
      ::close(fd);
      return;
    }
  }
  if (before.dirty == 0) {
    WARN("the kernel cleaned every page at once, 5 times (past its dirty limits): not checked");
    ::close(fd);
    return;
  }
  detail::os::start_writeback(fd);
  CacheStat after{};
  for (int i = 0; i < 1000; ++i) {  // up to 10 s for the device
    REQUIRE(cache_stat(fd, after));
    if (after.dirty < before.dirty) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  INFO("dirty pages " << before.dirty << " -> " << after.dirty << ", under writeback "
                      << after.writeback);
  CHECK(after.dirty < before.dirty);
  detail::os::datasync(fd, path);
  REQUIRE(cache_stat(fd, after));
  CHECK(after.dirty == 0);
  ::close(fd);
}
