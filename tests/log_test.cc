// The log's two write-side components on real store files: a prepared batch (src/log/batch.h:
// validate, convert, hash) and the commit (src/log/commit.h: grow, era, write, publish).
#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "embstore/embstore.h"
#include "format/checksum.h"
#include "format/convert.h"
#include "log/batch.h"
#include "log/commit.h"
#include "platform/testing.h"
#include "storage/store_files.h"
#include "support/payload.h"
#include "support/smaps.h"
#include "support/temp_dir.h"
#include "writer_internals.h"

using namespace embstore;
using embstore::detail::IndexEntry;
using embstore::detail::PreparedBatch;
using embstore::detail::StoreFiles;
using embstore::test::resident_kib;
using embstore::test::TempDir;

namespace {

constexpr std::uint32_t kDim = 8;

// A new store of `dtype`, opened the way a Writer opens it (no lock: the test is its only user).
std::unique_ptr<StoreFiles> make_store(const TempDir& dir, DType dtype = DType::kFloat32,
                                       std::uint64_t segment_bytes = 4096) {
  CreateOptions o;
  o.dim = kDim;
  o.dtype = dtype;
  o.segment_bytes = segment_bytes;
  create_store(dir / "s", o);
  auto files = StoreFiles::open(dir / "s", detail::os::Access::kReadWrite, 1ull << 30);
  files->map_rows(files->state().capacity());
  return files;
}

std::vector<std::uint64_t> keys_from(std::uint64_t first, std::uint64_t n) {
  std::vector<std::uint64_t> keys(n);
  for (std::uint64_t i = 0; i < n; ++i) keys[i] = test::make_key(0, first + i);
  return keys;
}

ConstMatrix matrix(const std::vector<float>& values, std::uint64_t rows, std::uint32_t dim = kDim,
                   DType dtype = DType::kFloat32, std::uint64_t stride = 0) {
  return ConstMatrix{values.data(), dtype, rows, dim, stride};
}

PreparedBatch prepare(const StoreFiles& f, const std::vector<std::uint64_t>& keys,
                      const ConstMatrix& rows, std::uint64_t epoch = 3,
                      detail::RowMemory memory = detail::RowMemory::kCallers,
                      detail::HashAt hash_at = detail::HashAt::kStaged) {
  return detail::prepare_batch(f.layout(), f.hash_key(), f.dir(), keys, nullptr, epoch, rows,
                               memory, hash_at);
}

// prepare_batch's error for `rows`: kInvalidArgument naming the store and `what`.
void expect_refused(const StoreFiles& f, const std::vector<std::uint64_t>& keys,
                    const ConstMatrix& rows, const std::string& what) {
  try {
    (void)prepare(f, keys, rows);
    FAIL("prepare_batch accepted it");
  } catch (const Error& e) {
    INFO(e.what());
    CHECK(e.code() == ErrorCode::kInvalidArgument);
    CHECK_THAT(std::string(e.what()), Catch::Contains(f.dir()) && Catch::Contains(what));
  }
}

std::uint64_t commit(StoreFiles& f, const PreparedBatch& batch, std::uint64_t& synced_era) {
  return detail::commit_batch(f, batch, synced_era, [](const Error&) {});
}

IndexEntry entry_at(const StoreFiles& f, std::uint64_t row) {
  IndexEntry e;
  std::memcpy(&e, f.entry_ptr(row), sizeof(e));
  return e;
}

// While one lives, TSan ignores the memory accesses of the thread that made it.
#if defined(__SANITIZE_THREAD__)
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
struct TsanIgnoreThisThread {
  TsanIgnoreThisThread() { __tsan_ignore_thread_begin(); }
  ~TsanIgnoreThisThread() { __tsan_ignore_thread_end(); }
};
#else
struct TsanIgnoreThisThread {};
#endif

struct WritePathReset {
  ~WritePathReset() {
    detail::testing::set_write_path("");
    detail::testing::disarm_all();
  }
};

}  // namespace

TEST_CASE("A batch is copied into a buffer of the thread and every row hashed there",
          "[log][batch]") {
  TempDir dir;
  auto f = make_store(dir);
  const auto values = test::batch_payload(0, 0, 5, kDim);
  const auto keys = keys_from(0, 5);
  const PreparedBatch b = prepare(*f, keys, matrix(values, 5));
  REQUIRE(b.rows == 5);
  // A copy: the caller may change its array from now on without changing what is written.
  CHECK(b.source != reinterpret_cast<const std::byte*>(values.data()));
  CHECK(std::memcmp(b.source, values.data(), 5 * kDim * 4) == 0);
  CHECK(b.stride == kDim * 4);
  CHECK(b.keys.data() == keys.data());
  REQUIRE(b.hashes != nullptr);
  for (std::uint64_t i = 0; i < 5; ++i) {
    CHECK(b.epoch(i) == 3);
    CHECK(b.hashes[i] ==
          detail::payload_hash_reference(values.data() + i * kDim, kDim * 4, f->layout().seed));
  }
}

TEST_CASE("A staging buffer starts at the offset in a page where its rows will land",
          "[log][batch]") {
  // The kernel's copy into the page cache is slow from a source a few bytes off the
  // destination's offset in its page (bench/RESULTS.md): staged rows must not be.
  std::vector<std::byte> storage;
  for (const std::uint64_t bytes :
       {std::uint64_t{1}, std::uint64_t{4096}, std::uint64_t{1} << 20}) {
    for (const std::uint64_t offset : {std::uint64_t{0}, std::uint64_t{16}, std::uint64_t{4095},
                                       std::uint64_t{4096 + 100}, std::uint64_t{3072} * 7}) {
      INFO(bytes << " bytes for file offset " << offset);
      std::byte* p = detail::staging_buffer(storage, bytes, offset);
      CHECK(reinterpret_cast<std::uintptr_t>(p) % detail::kPageBytes ==
            offset % detail::kPageBytes);
      CHECK(p >= storage.data());
      CHECK(p + bytes <= storage.data() + storage.size());
      std::memset(p, 0x5a, bytes);  // ASan: all of it is the buffer's
    }
  }
}

TEST_CASE("Rows staged before the lock start on a page, whatever page offset the caller's have",
          "[log][batch]") {
  TempDir dir;
  auto f = make_store(dir);
  const std::uint64_t n = 20000;  // well past kRowsSyscallMinBytes: written with pwrite
  const auto packed = test::batch_payload(0, 0, n, kDim);
  // The caller's rows 16 bytes into a page, as a large heap block's are.
  std::vector<float> storage(packed.size() + 2 * detail::kPageBytes / 4);
  const auto base = reinterpret_cast<std::uintptr_t>(storage.data());
  auto* rows = reinterpret_cast<float*>(
      ((base + detail::kPageBytes - 1) & ~std::uintptr_t{detail::kPageBytes - 1}) + 16);
  std::memcpy(rows, packed.data(), packed.size() * 4);
  const auto keys = keys_from(0, n);
  const PreparedBatch b = detail::prepare_batch(f->layout(), f->hash_key(), f->dir(), keys, nullptr,
                                                3, ConstMatrix{rows, DType::kFloat32, n, kDim, 0});
  REQUIRE(b.source != reinterpret_cast<const std::byte*>(rows));  // staged
  CHECK(reinterpret_cast<std::uintptr_t>(b.source) % detail::kPageBytes == 0);
  CHECK(std::memcmp(b.source, packed.data(), n * kDim * 4) == 0);
}

TEST_CASE("Strided rows are packed in the copy, and per-row epochs are read from the caller's",
          "[log][batch]") {
  TempDir dir;
  auto f = make_store(dir);
  // Rows of 8 floats, 11 floats apart (e.g. x[:, :8] of a wider array).
  std::vector<float> wide(4 * 11);
  for (std::size_t i = 0; i < wide.size(); ++i) wide[i] = static_cast<float>(i);
  const auto keys = keys_from(0, 4);
  const std::vector<std::uint64_t> epochs = {9, 8, 7, 6};
  const PreparedBatch b =
      detail::prepare_batch(f->layout(), f->hash_key(), f->dir(), keys, epochs.data(), 0,
                            matrix(wide, 4, kDim, DType::kFloat32, 44));
  CHECK(b.stride == kDim * 4);
  REQUIRE(b.hashes != nullptr);
  for (std::uint64_t i = 0; i < 4; ++i) {
    CHECK(b.epoch(i) == epochs[i]);
    CHECK(std::memcmp(b.source + i * kDim * 4, wide.data() + i * 11, kDim * 4) == 0);
    CHECK(b.hashes[i] ==
          detail::payload_hash_reference(wide.data() + i * 11, kDim * 4, f->layout().seed));
  }
}

TEST_CASE("A batch larger than kStageBytes is left to the commit to copy and hash in pieces",
          "[log][batch]") {
  TempDir dir;
  auto f = make_store(dir);
  const std::uint64_t n = detail::kStageBytes / (kDim * 4) + 1;
  const std::vector<float> values(n * kDim, 1.0f);
  const auto keys = keys_from(0, n);
  const PreparedBatch b = prepare(*f, keys, matrix(values, n));
  CHECK(b.source == reinterpret_cast<const std::byte*>(values.data()));
  CHECK(b.hashes == nullptr);
}

TEST_CASE(
    "HashAt::kPageCache leaves only the caller's packed, unconverted rows of one read-back "
    "piece or more unhashed, to be written from where they are",
    "[log][batch]") {
  TempDir dir;
  auto f = make_store(dir);
  const std::uint64_t big = detail::read_back_rows(kDim * 4);  // exactly the least
  const auto values = test::batch_payload(0, 0, big, kDim);
  const auto keys = keys_from(0, big);
  const auto page_cache = detail::HashAt::kPageCache;
  const PreparedBatch b =
      prepare(*f, keys, matrix(values, big), 3, detail::RowMemory::kCallers, page_cache);
  CHECK(b.hash_written);
  CHECK(b.hashes == nullptr);
  CHECK(b.source == reinterpret_cast<const std::byte*>(values.data()));
  // One row fewer: staged and hashed here (its two system calls would cost more, batch.h).
  const std::vector<std::uint64_t> fewer(keys.begin(), keys.end() - 1);
  const PreparedBatch small =
      prepare(*f, fewer, matrix(values, big - 1), 3, detail::RowMemory::kCallers, page_cache);
  CHECK_FALSE(small.hash_written);
  CHECK(small.hashes != nullptr);
  CHECK(small.source != reinterpret_cast<const std::byte*>(values.data()));
  // Strided rows are packed into the staging buffer (a commit writes packed rows).
  std::vector<float> wide(big * (kDim + 1));
  const PreparedBatch strided =
      prepare(*f, keys, matrix(wide, big, kDim, DType::kFloat32, (kDim + 1) * 4), 3,
              detail::RowMemory::kCallers, page_cache);
  CHECK_FALSE(strided.hash_written);
  CHECK(strided.hashes != nullptr);
  // Private rows are hashed where they are, before the lock, whatever hash_at says.
  const PreparedBatch private_rows =
      prepare(*f, keys, matrix(values, big), 3, detail::RowMemory::kPrivate, page_cache);
  CHECK_FALSE(private_rows.hash_written);
  CHECK(private_rows.hashes != nullptr);
  // kStaged copies and hashes the same batch before the lock.
  const PreparedBatch staged = prepare(*f, keys, matrix(values, big));
  CHECK_FALSE(staged.hash_written);
  CHECK(staged.hashes != nullptr);
  CHECK(staged.source != reinterpret_cast<const std::byte*>(values.data()));
}

TEST_CASE("Private packed rows are hashed where they are at any size, strided ones are copied",
          "[log][batch]") {
  TempDir dir;
  auto f = make_store(dir);
  const std::uint64_t seed = f->layout().seed;
  // Under and over kStageBytes: the private route has no piece size.
  for (const std::uint64_t n : {std::uint64_t{5}, detail::kStageBytes / (kDim * 4) + 1}) {
    INFO(n << " rows");
    const auto values = test::batch_payload(0, 0, n, kDim);
    const auto keys = keys_from(0, n);
    const PreparedBatch b = prepare(*f, keys, matrix(values, n), 3, detail::RowMemory::kPrivate);
    CHECK(b.source == reinterpret_cast<const std::byte*>(values.data()));
    CHECK(b.stride == kDim * 4);
    REQUIRE(b.hashes != nullptr);
    for (std::uint64_t i = 0; i < n; i += n / 5) {
      CHECK(b.hashes[i] ==
            detail::payload_hash_reference(values.data() + i * kDim, kDim * 4, seed));
    }
  }
  // Strided private rows are packed into the thread's buffer, since a commit writes packed rows.
  std::vector<float> wide(4 * 11);
  for (std::size_t i = 0; i < wide.size(); ++i) wide[i] = static_cast<float>(i);
  const auto keys = keys_from(0, 4);
  const PreparedBatch b =
      prepare(*f, keys, matrix(wide, 4, kDim, DType::kFloat32, 44), 3, detail::RowMemory::kPrivate);
  CHECK(b.source != reinterpret_cast<const std::byte*>(wide.data()));
  CHECK(b.stride == kDim * 4);
  REQUIRE(b.hashes != nullptr);
  CHECK(std::memcmp(b.source + kDim * 4, wide.data() + 11, kDim * 4) == 0);
}

TEST_CASE("float32 rows for 16-bit stores are converted into a buffer of the thread and hashed",
          "[log][batch]") {
  for (const DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    INFO(dtype_name(dtype));
    TempDir dir;
    auto f = make_store(dir, dtype);
    std::vector<float> values = test::batch_payload(0, 0, 3, kDim);
    values[1] = 1.0f + 1.0f / 4096;  // not representable in either: rounded
    const auto keys = keys_from(0, 3);
    const PreparedBatch b = prepare(*f, keys, matrix(values, 3));
    REQUIRE(b.stride == kDim * 2);
    CHECK(b.source != reinterpret_cast<const std::byte*>(values.data()));
    for (std::uint64_t i = 0; i < 3 * kDim; ++i) {
      std::uint16_t stored;
      std::memcpy(&stored, b.source + i * 2, 2);
      CHECK(stored == (dtype == DType::kFloat16 ? detail::float_to_half(values[i])
                                                : detail::float_to_bfloat16(values[i])));
    }
    REQUIRE(b.hashes != nullptr);
    for (std::uint64_t i = 0; i < 3; ++i) {
      CHECK(b.hashes[i] ==
            detail::payload_hash_reference(b.source + i * b.stride, kDim * 2, f->layout().seed));
    }
  }
}

TEST_CASE("A batch of zero rows is empty and touches nothing", "[log][batch]") {
  TempDir dir;
  auto f = make_store(dir);
  const PreparedBatch b = prepare(*f, {}, ConstMatrix{nullptr, DType::kFloat32, 0, kDim, 0});
  CHECK(b.rows == 0);
  CHECK(b.source == nullptr);
}

TEST_CASE("Bad shapes and dtypes are named errors", "[log][batch]") {
  TempDir dir;
  auto f = make_store(dir);
  const auto values = test::batch_payload(0, 0, 4, kDim);
  SECTION("fewer keys than rows") {
    expect_refused(*f, keys_from(0, 3), matrix(values, 4), "3 keys for 4 rows");
  }
  SECTION("no data") {
    expect_refused(*f, keys_from(0, 2), ConstMatrix{nullptr, DType::kFloat32, 2, kDim, 0},
                   "rows.data is null");
  }
  SECTION("another dim") {
    expect_refused(*f, keys_from(0, 2), matrix(values, 2, 4), "dim 4 but the store's dim is 8");
  }
  SECTION("another dtype") {
    expect_refused(*f, keys_from(0, 2), matrix(values, 2, kDim, DType::kFloat64),
                   "cannot append float64 rows to a float32 store");
  }
  SECTION("a stride shorter than a row") {
    expect_refused(*f, keys_from(0, 2), matrix(values, 2, kDim, DType::kFloat32, 16),
                   "row_stride_bytes 16 is less than a row's 32 bytes");
  }
  SECTION("float16 rows for a bfloat16 store") {
    TempDir other;
    auto g = make_store(other, DType::kBFloat16);
    expect_refused(*g, keys_from(0, 2), matrix(values, 2, kDim, DType::kFloat16),
                   "cannot append float16 rows to a bfloat16 store (only bfloat16 or float32");
  }
}

TEST_CASE("A commit writes rows and entries at the counter, then publishes it", "[log][commit]") {
  WritePathReset reset;
  const char* mode = GENERATE("mapping", "syscall");
  INFO(mode);
  detail::testing::set_write_path(mode);
  TempDir dir;
  auto f = make_store(dir);
  std::uint64_t synced_era = 0;
  std::uint64_t next = 0;
  for (const std::uint64_t n : {3u, 1u, 7u}) {
    const auto values = test::batch_payload(0, next, n, kDim);
    const auto keys = keys_from(next, n);
    const std::uint64_t first = commit(*f, prepare(*f, keys, matrix(values, n), next), synced_era);
    CHECK(first == next);
    next += n;
    CHECK(f->state().committed() == next);
    CHECK(std::memcmp(f->row_ptr(first), values.data(), n * kDim * 4) == 0);
    for (std::uint64_t i = 0; i < n; ++i) {
      const IndexEntry e = entry_at(*f, first + i);
      CHECK(f->row_valid(first + i));
      CHECK(e.key == keys[i]);
      CHECK(e.epoch == first);
      CHECK((e.row & detail::kEntryRowMask) == first + i);
      CHECK(detail::entry_era(e.row) == (f->state().era() & detail::kEntryEraMask));
      // Only the last entry of a batch ends it (recovery keeps whole batches).
      CHECK(((e.row & detail::kEntryBatchEnd) != 0) == (i + 1 == n));
    }
  }
  CHECK(synced_era == f->state().era());
  // Nothing past the counter was touched: the next entry is still all zeros.
  const IndexEntry after = entry_at(*f, next);
  CHECK(after.key == 0);
  CHECK(after.checksum == 0);
  // Readers see exactly these rows.
  Reader r = Reader::open(dir / "s");
  CHECK(r.size() == next);
  CHECK(r.verify().ok());
}

TEST_CASE("A commit hashes every row from the bytes it writes, strided or packed, in any pieces",
          "[log][commit]") {
  WritePathReset reset;
  const char* mode = GENERATE("mapping", "syscall");
  detail::testing::set_write_path(mode);
  // The caller's rows, and private ones (the async queue's ring: packed ones written from there).
  const auto memory = GENERATE(detail::RowMemory::kCallers, detail::RowMemory::kPrivate);
  // Staged before the lock, or written from the caller's array and hashed where they landed.
  const auto hash_at = GENERATE(detail::HashAt::kStaged, detail::HashAt::kPageCache);
  // A staged batch, and one past kStageBytes that the commit copies in two pieces.
  for (const std::uint64_t n : {std::uint64_t{20000}, detail::kStageBytes / (kDim * 4) + 100}) {
    for (const std::uint64_t stride_floats : {std::uint64_t{kDim}, std::uint64_t{11}}) {
      INFO(mode << ", " << n << " rows " << stride_floats << " floats apart, "
                << (memory == detail::RowMemory::kPrivate ? "private" : "caller's")
                << (hash_at == detail::HashAt::kPageCache ? ", hashed in the page cache" : ""));
      TempDir dir;
      auto f = make_store(dir);
      const auto packed = test::batch_payload(0, 0, n, kDim);
      std::vector<float> values(n * stride_floats);
      for (std::uint64_t i = 0; i < n; ++i) {
        std::memcpy(values.data() + i * stride_floats, packed.data() + i * kDim, kDim * 4);
      }
      std::uint64_t synced_era = 0;
      const auto keys = keys_from(0, n);
      commit(*f,
             prepare(*f, keys, matrix(values, n, kDim, DType::kFloat32, stride_floats * 4), 3,
                     memory, hash_at),
             synced_era);
      REQUIRE(std::memcmp(f->row_ptr(0), packed.data(), n * kDim * 4) == 0);
      const std::uint64_t seed = f->layout().seed;
      for (std::uint64_t i = 0; i < n; ++i) {
        const IndexEntry e = entry_at(*f, i);
        const std::uint64_t hash = detail::payload_hash_reference(f->row_ptr(i), kDim * 4, seed);
        REQUIRE(e.checksum == detail::entry_checksum(hash, e.key, e.epoch, e.row, seed));
      }
    }
  }
}

TEST_CASE(
    "Rows hashed in the page cache match their checksums while another thread rewrites "
    "the caller's array",
    "[log][commit][threads]") {
  // pwrite copies the caller's rows while a thread of the caller changes them: which values are
  // stored is the race's business, but each stored row must match its entry's checksum, since
  // the hash is taken from the page cache after the write, not from the array.
  WritePathReset reset;
  detail::testing::set_write_path("syscall");
  TempDir dir;
  auto f = make_store(dir);
  const std::uint64_t n = detail::read_back_rows(kDim * 4);
  std::vector<float> values(n * kDim, 0.0f);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> passes{0};
  std::thread scribbler([&] {
    // The race with pwritev's read of the array is the point: TSan, which sees that read, is
    // told to ignore this thread's writes (the checks below hold in every build).
    const TsanIgnoreThisThread ignore;
    for (float v = 1.0f; !stop.load(std::memory_order_relaxed); v += 1.0f) {
      for (float& x : values) std::atomic_ref<float>(x).store(v, std::memory_order_relaxed);
      passes.fetch_add(1, std::memory_order_relaxed);
    }
  });
  std::uint64_t synced_era = 0;
  // At least 200 batches, and on until the scribbler has rewritten the array 50 times (on a
  // busy machine it may get little time): at most 600 (150 MiB of rows).
  std::uint64_t rounds = 0;
  for (; rounds < 600 && (rounds < 200 || passes.load() < 50); ++rounds) {
    const auto keys = keys_from(rounds * n, n);
    const PreparedBatch b = prepare(*f, keys, matrix(values, n), 3, detail::RowMemory::kCallers,
                                    detail::HashAt::kPageCache);
    REQUIRE(b.hash_written);
    commit(*f, b, synced_era);
  }
  stop = true;
  scribbler.join();
  const std::uint64_t seed = f->layout().seed;
  // The values stored: several, or the array did not change under the writes and the test
  // proved nothing (how many depends on the time the scribbler gets: 9 on a loaded machine).
  std::set<float> seen;
  for (std::uint64_t row = 0; row < rounds * n; ++row) {
    const IndexEntry e = entry_at(*f, row);
    const std::uint64_t hash = detail::payload_hash_reference(f->row_ptr(row), kDim * 4, seed);
    REQUIRE(e.checksum == detail::entry_checksum(hash, e.key, e.epoch, e.row, seed));
    const auto* stored = reinterpret_cast<const float*>(f->row_ptr(row));
    seen.insert(stored, stored + kDim);
  }
  CHECK(seen.size() >= 3);
  CHECK(Reader::open(dir / "s").verify().ok());
}

TEST_CASE("A writer reads the rows it wrote back with pread to hash them, and maps none of them",
          "[log][commit][mapping]") {
  // HashAt::kPageCache hashes the caller's rows as they are read back from the page cache into
  // a buffer of the writer (log/batch.h): the writer's mapping of them is never touched, so its
  // resident size does not grow with the store. A failed read-back fails the append before
  // anything is published, and the retry lands where the batch would have.
  TempDir dir;
  CreateOptions o;
  o.dim = 1024;  // 4 KiB rows
  Writer w = Writer::create(dir / "s", o);
  const std::uint64_t n = 512;  // 2 MiB a batch
  // On a page, where each batch lands in the file (a source anywhere in a page would do).
  std::vector<float> storage(n * o.dim + 2 * detail::kPageBytes / 4);
  auto* values = reinterpret_cast<float*>(
      (reinterpret_cast<std::uintptr_t>(storage.data()) + detail::kPageBytes - 1) &
      ~std::uintptr_t{detail::kPageBytes - 1});
  std::vector<std::uint64_t> keys(n);
  auto append = [&](std::uint64_t b) {
    for (std::uint64_t i = 0; i < n; ++i) keys[i] = b * n + i;
    std::fill(values, values + n * o.dim, static_cast<float>(b));
    return w.append(keys, 0, ConstMatrix{values, DType::kFloat32, n, o.dim, 0});
  };
  auto reads_back = [&] {
    return !detail::WriterInternals::hashes_before_lock(
        w, ConstMatrix{values, DType::kFloat32, n, o.dim, 0});
  };
  // 288 MiB: past a growth at 128 MiB that maps the files anew at a reservation of 512 MiB.
  // A writer stages instead after its locking waited (a growth of the files or the key index).
  std::uint64_t batches = 0, read_back = 0;
  for (; batches < 144; ++batches) {
    read_back += reads_back();
    append(batches);
  }
  INFO(read_back << " of " << batches << " batches read back");
  CHECK(read_back > batches / 2);
  const std::uint64_t kib = resident_kib(dir / "s/rows.1");
  INFO(kib << " KiB of rows.1 resident");
  CHECK(kib < 64);  // none of the 288 MiB of rows written

  while (!reads_back() && batches < 200) append(batches++);
  REQUIRE(reads_back());
  // An append reads one index entry (at its first row), then its rows back: fail the first
  // read of the rows.
  detail::testing::arm_fault(detail::testing::Op::kPread, 2, EIO, false);
  std::string message;
  try {
    append(batches);
  } catch (const Error& error) {
    message = error.what();
    CHECK(error.code() == ErrorCode::kIO);
  }
  detail::testing::disarm_all();
  CHECK_THAT(message, Catch::Contains("read") && Catch::Contains("rows.1"));
  CHECK(w.committed_rows() == batches * n);
  CHECK(append(batches + 1) == batches * n);
  w.close();
  Reader r = Reader::open(dir / "s");
  REQUIRE(r.size() == (batches + 1) * n);
  float first = 0;
  std::memcpy(&first, r.rows().row(batches * n), sizeof(first));
  CHECK(first == static_cast<float>(batches + 1));
  CHECK(r.verify().ok());
}

TEST_CASE("A commit past the capacity grows the files first, as FORMAT.md 'File sizes' says",
          "[log][commit]") {
  TempDir dir;
  auto f = make_store(dir, DType::kFloat32, 4096);  // rows of 32 bytes, entries of 32
  const std::uint64_t header =
      std::filesystem::file_size(dir / ("s/" + std::string(detail::kHeaderFileName)));
  // One segment holds 64 rows with their entries: a new store starts there.
  REQUIRE(f->state().capacity() == 64);
  REQUIRE(detail::capacity_for(0, 32, 4096, header) == 64);
  std::uint64_t synced_era = 0;
  const std::uint64_t n = 300;
  const auto values = test::batch_payload(0, 0, n, kDim);
  CHECK(commit(*f, prepare(*f, keys_from(0, n), matrix(values, n)), synced_era) == 0);
  CHECK(f->state().committed() == n);
  // Past one segment: the rows needed plus a segment's worth (the segment is smaller than the
  // header, so a whole one).
  CHECK(f->state().capacity() == n + 64);
  CHECK(f->rows_files_hold() >= n + 64);
  CHECK(f->info().data_file_bytes == detail::round_up((n + 64) * 32, 4096));
  CHECK(f->valid_batch_prefix(0, n) == n);
}

TEST_CASE("A commit over entries a dead writer left unpublished raises the era first",
          "[log][commit]") {
  TempDir dir;
  auto f = make_store(dir);
  std::uint64_t synced_era = 0;
  const auto values = test::batch_payload(0, 0, 4, kDim);
  commit(*f, prepare(*f, keys_from(0, 4), matrix(values, 4)), synced_era);
  const std::uint64_t era = f->state().era();
  // A writer wrote rows 4..5 and their entries, then died before publishing.
  const auto dead = test::batch_payload(1, 0, 2, kDim);
  commit(*f, prepare(*f, keys_from(100, 2), matrix(dead, 2)), synced_era);
  f->state().publish_committed(4);
  REQUIRE(f->row_valid(4));
  // The next commit writes over them with a newer era, durable in the header first.
  const auto next = test::batch_payload(0, 4, 1, kDim);
  CHECK(commit(*f, prepare(*f, keys_from(4, 1), matrix(next, 1)), synced_era) == 4);
  CHECK(f->state().era() == era + 1);
  CHECK(synced_era == era + 1);
  CHECK(detail::entry_era(entry_at(*f, 4).row) == ((era + 1) & detail::kEntryEraMask));
  // The dead writer's entry at row 5 validates but is older: a recovery scan stops before it.
  CHECK(f->row_valid(5));
  CHECK(f->valid_batch_prefix(0, 6) == 5);
}

TEST_CASE("A commit whose era flush fails reports it and publishes nothing", "[log][commit]") {
  WritePathReset reset;
  TempDir dir;
  auto f = make_store(dir);
  std::uint64_t synced_era = ~0ull;  // No era known durable: the commit must flush the header.
  detail::testing::arm_fault(detail::testing::Op::kMsync, 1, EIO, false);
  const auto values = test::batch_payload(0, 0, 2, kDim);
  int reported = 0;
  try {
    detail::commit_batch(*f, prepare(*f, keys_from(0, 2), matrix(values, 2)), synced_era,
                         [&](const Error& e) {
                           ++reported;
                           throw e;
                         });
    FAIL("the commit succeeded");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kIO);
  }
  CHECK(reported == 1);
  CHECK(synced_era == ~0ull);
  CHECK(f->state().committed() == 0);
}

TEST_CASE("A commit beyond 2^40 rows is kFull and changes nothing", "[log][commit]") {
  TempDir dir;
  auto f = make_store(dir);
  f->state().publish_committed(detail::kMaxRows - 1);
  std::uint64_t synced_era = 0;
  const auto values = test::batch_payload(0, 0, 2, kDim);
  try {
    commit(*f, prepare(*f, keys_from(0, 2), matrix(values, 2)), synced_era);
    FAIL("the commit succeeded");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kFull);
    CHECK_THAT(std::string(e.what()), Catch::Contains("2^40"));
  }
  CHECK(f->state().committed() == detail::kMaxRows - 1);
  CHECK(synced_era == 0);
}
