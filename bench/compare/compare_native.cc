// compare_native — one workload through embstore and the C/C++ alternatives users pick instead.
//
//   compare_native --system NAME [--dir DIR] [--rows N] [--dim D] [--batch B] [--lookups L]
//                  [--redis-port P]
// NAME: memcpy, pwrite, embstore, hdf5, lmdb-sync, lmdb-nosync, sqlite-wal, redis.
// Workload: N rows of D float32 (default 200000 x 768), batches of B (512), random u64 keys,
// epoch 0. Prints one JSON object: append MB/s (payload bytes / time), two-writer-process MB/s
// (or "unsafe"/"-"), sync seconds, lookup p50/p99 us, scan MB/s, open ms, bytes on disk.
// Every lookup's answer is checked; a wrong one fails the run (exit 1, no JSON). Without --dir
// the stores go into a fresh directory under $TMPDIR, removed at exit.
// Run by bench/compare/run.sh; a small run of embstore is a ctest smoke test (bench-smoke).
#include <fcntl.h>
#include <hdf5.h>
#include <hiredis/hiredis.h>
#include <lmdb.h>
#include <sqlite3.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "page_reporting.h"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::uint64_t sum_words(const void* data, std::uint64_t bytes) {
  const auto* w = static_cast<const std::uint64_t*>(data);
  std::uint64_t a = 0, b = 0, c = 0, d = 0, i = 0, n = bytes / 8;
  for (; i + 4 <= n; i += 4) {
    a += w[i];
    b += w[i + 1];
    c += w[i + 2];
    d += w[i + 3];
  }
  for (; i < n; ++i) a += w[i];
  return a + b + c + d;
}

// sum_words() plus the bytes past the last whole word: any wrong row changes it (almost surely).
std::uint64_t payload_sum(const void* data, std::uint64_t bytes) {
  std::uint64_t s = sum_words(data, bytes);
  for (std::uint64_t i = bytes / 8 * 8; i < bytes; ++i) {
    s = s * 31 + static_cast<const unsigned char*>(data)[i];
  }
  return s;
}

struct Workload {
  std::uint64_t rows = 200000;
  std::uint32_t dim = 768;
  std::uint64_t batch = 512;
  std::uint64_t lookups = 20000;
  std::uint64_t row_bytes() const { return std::uint64_t{dim} * 4; }
  std::vector<std::uint64_t> keys;  // keys[i] is row i's key; epoch 0.
  std::vector<float> pool;          // kPoolBatches distinct batches the rows cycle through.
  static constexpr std::uint64_t kPoolBatches = 8;
  std::vector<std::uint64_t> pool_sums;  // payload_sum() of each pool row.
  const float* batch_data(std::uint64_t batch_index) const {
    return pool.data() + (batch_index % kPoolBatches) * batch * dim;
  }
  // payload_sum() of row `row`'s payload: a lookup's answer is checked against it without
  // touching the pool (which would evict the store's pages from the cache between timed lookups).
  std::uint64_t row_sum(std::uint64_t row) const {
    return pool_sums[(row / batch) % kPoolBatches * batch + row % batch];
  }
  void build() {
    std::mt19937_64 rng(12345);
    keys.resize(rows);
    for (auto& k : keys) k = rng();
    pool.resize(kPoolBatches * batch * dim);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (auto& v : pool) v = dist(rng);
    pool_sums.resize(kPoolBatches * batch);
    for (std::uint64_t i = 0; i < pool_sums.size(); ++i) {
      pool_sums[i] = payload_sum(pool.data() + i * dim, row_bytes());
    }
  }
};

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error(what); }

std::uint64_t disk_bytes(const std::string& path) {
  std::uint64_t total = 0;
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) return st.st_blocks * 512ull;
  std::error_code ec;
  for (const auto& e : std::filesystem::recursive_directory_iterator(path, ec)) {
    if (::lstat(e.path().c_str(), &st) == 0 && S_ISREG(st.st_mode)) total += st.st_blocks * 512ull;
  }
  return total;
}

// One system under test. Rows [begin, end) of the workload go through append(); a system that
// cannot take two writer processes says so in two_writers().
class System {
 public:
  virtual ~System() = default;
  // "ok" (supported), "unsafe" (corrupts or is unsupported), "-" (not applicable).
  virtual const char* two_writers() const { return "ok"; }
  // Creates the empty store at `path` (parent, before any writer opens it).
  virtual void create(const std::string& path, const Workload& w) = 0;
  // Opens for writing (in this process).
  virtual void open_writer(const std::string& path, const Workload& w) = 0;
  virtual void append(const Workload& w, std::uint64_t first_row, std::uint64_t n,
                      const float* data) = 0;
  virtual void end_append() {}
  virtual void sync() = 0;
  virtual void close_writer() = 0;
  // Opens for reading and reads row 0 (timed as "open").
  virtual void open_reader(const std::string& path, const Workload& w) = 0;
  // Reads the row with key/epoch (or row index, where the system has no keys) into `out`.
  // Returns false when the system has no lookup.
  virtual bool lookup(const Workload& w, std::uint64_t row, void* out) = 0;
  // Checks, beyond the payload, what the last lookup() of `row` found; throws if it is wrong.
  virtual void check_lookup(const Workload&, std::uint64_t) const {}
  // Reads every row; returns bytes read.
  virtual std::uint64_t scan(const Workload& w) = 0;
  virtual void close_reader() = 0;
  virtual std::string lookup_note() const { return ""; }
};

// ---- memcpy: the ceiling ----------------------------------------------------------------------
class MemcpySystem : public System {
 public:
  const char* two_writers() const override { return "-"; }
  void create(const std::string&, const Workload& w) override {
    buffer_.assign(w.rows * w.row_bytes(), std::byte{1});  // Touched: warm pages.
  }
  void open_writer(const std::string&, const Workload&) override {}
  void append(const Workload& w, std::uint64_t first, std::uint64_t n, const float* data) override {
    std::memcpy(buffer_.data() + first * w.row_bytes(), data, n * w.row_bytes());
  }
  void sync() override {}
  void close_writer() override {}
  void open_reader(const std::string&, const Workload&) override {}
  bool lookup(const Workload&, std::uint64_t, void*) override { return false; }
  std::uint64_t scan(const Workload&) override {
    volatile std::uint64_t s = sum_words(buffer_.data(), buffer_.size());
    (void)s;
    return buffer_.size();
  }
  void close_reader() override {}

 private:
  std::vector<std::byte> buffer_;
};

// ---- pwrite into the page cache ---------------------------------------------------------------
// Two writers share an offset counter in shared memory (what O_APPEND gives): safe.
class PwriteSystem : public System {
 public:
  PwriteSystem() {
    void* p = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    next_ = new (p) std::atomic<std::uint64_t>(0);
  }
  void create(const std::string& path, const Workload&) override {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) fail("create " + path);
    ::close(fd);
    next_->store(0);
  }
  void open_writer(const std::string& path, const Workload&) override {
    fd_ = ::open(path.c_str(), O_RDWR);
  }
  void append(const Workload& w, std::uint64_t, std::uint64_t n, const float* data) override {
    const std::uint64_t bytes = n * w.row_bytes();
    const std::uint64_t off = next_->fetch_add(bytes);
    if (::pwrite(fd_, data, bytes, off) != static_cast<ssize_t>(bytes)) fail("pwrite");
  }
  void sync() override { ::fdatasync(fd_); }
  void close_writer() override { ::close(fd_); }
  void open_reader(const std::string& path, const Workload& w) override {
    fd_ = ::open(path.c_str(), O_RDONLY);
    buf_.resize(w.row_bytes());
    if (::pread(fd_, buf_.data(), w.row_bytes(), 0) < 0) fail("pread");
  }
  bool lookup(const Workload&, std::uint64_t, void*) override { return false; }
  std::uint64_t scan(const Workload& w) override {
    std::vector<std::byte> buf(1ull << 20);  // Stays in cache: measures the read path.
    std::uint64_t total = 0, s = 0;
    const std::uint64_t size = w.rows * w.row_bytes();
    while (total < size) {
      const ssize_t got =
          ::pread(fd_, buf.data(), std::min<std::uint64_t>(buf.size(), size - total),
                  static_cast<off_t>(total));
      if (got <= 0) break;
      s += sum_words(buf.data(), got);
      total += got;
    }
    volatile std::uint64_t sink = s;
    (void)sink;
    return total;
  }
  void close_reader() override { ::close(fd_); }

 private:
  std::atomic<std::uint64_t>* next_;
  int fd_ = -1;
  std::vector<std::byte> buf_;
};

// ---- embstore ---------------------------------------------------------------------------------
class EmbstoreSystem : public System {
 public:
  void create(const std::string& path, const Workload& w) override {
    embstore::CreateOptions c;
    c.dim = w.dim;
    embstore::create_store(path, c);
  }
  void open_writer(const std::string& path, const Workload&) override {
    writer_.emplace(embstore::Writer::open(path));
  }
  void append(const Workload& w, std::uint64_t first, std::uint64_t n, const float* data) override {
    writer_->append(std::span(w.keys.data() + first, n), 0,
                    embstore::ConstMatrix{data, embstore::DType::kFloat32, n, w.dim, 0});
  }
  void sync() override { writer_->sync(); }
  void close_writer() override { writer_.reset(); }
  void open_reader(const std::string& path, const Workload&) override {
    reader_.emplace(embstore::Reader::open(path));
    volatile auto b = reader_->rows(0, 1).data[0];
    (void)b;
  }
  std::string lookup_note() const override { return "by (key, epoch) through the key index"; }
  bool lookup(const Workload& w, std::uint64_t row, void* out) override {
    const std::optional<std::uint64_t> found = reader_->find(w.keys[row], 0);
    if (!found) fail("embstore find: key " + std::to_string(w.keys[row]) + " at epoch 0 not found");
    std::memcpy(out, reader_->rows(*found, *found + 1).data, w.row_bytes());
    found_ = *found;
    return true;
  }
  // Outside the timed part: the row found must be the one appended with that key at epoch 0 (the
  // only writer appended row i as workload row i).
  void check_lookup(const Workload& w, std::uint64_t row) const override {
    const embstore::Record r = reader_->record(found_);
    if (found_ != row || r.key != w.keys[row] || r.epoch != 0) {
      fail("embstore find(" + std::to_string(w.keys[row]) + ", 0) returned row " +
           std::to_string(found_) + " (key " + std::to_string(r.key) + ", epoch " +
           std::to_string(r.epoch) + "); expected row " + std::to_string(row));
    }
  }
  std::uint64_t scan(const Workload&) override {
    const embstore::RowsView v = reader_->rows();
    volatile std::uint64_t s = sum_words(v.data, v.size_bytes());
    (void)s;
    return v.size_bytes();
  }
  void close_reader() override { reader_.reset(); }

 private:
  std::optional<embstore::Writer> writer_;
  std::optional<embstore::Reader> reader_;
  std::uint64_t found_ = 0;  // The row the last lookup() found.
};

// ---- HDF5: chunked, extendable 2-D dataset ----------------------------------------------------
class Hdf5System : public System {
 public:
  const char* two_writers() const override { return "unsafe"; }
  std::string lookup_note() const override { return "by row index (no key index)"; }
  void create(const std::string& path, const Workload& w) override {
    hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t dims[2] = {0, w.dim}, maxdims[2] = {H5S_UNLIMITED, w.dim};
    hid_t space = H5Screate_simple(2, dims, maxdims);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    hsize_t chunk[2] = {w.batch, w.dim};
    H5Pset_chunk(dcpl, 2, chunk);
    hid_t ds =
        H5Dcreate2(file, "embeddings", H5T_NATIVE_FLOAT, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Dclose(ds);
    H5Pclose(dcpl);
    H5Sclose(space);
    H5Fclose(file);
  }
  void open_writer(const std::string& path, const Workload&) override {
    file_ = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ds_ = H5Dopen2(file_, "embeddings", H5P_DEFAULT);
    if (file_ < 0 || ds_ < 0) fail("H5Fopen " + path);
  }
  void append(const Workload& w, std::uint64_t first, std::uint64_t n, const float* data) override {
    hsize_t size[2] = {first + n, w.dim};
    H5Dset_extent(ds_, size);
    hid_t fspace = H5Dget_space(ds_);
    hsize_t start[2] = {first, 0}, count[2] = {n, w.dim};
    H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr);
    hid_t mspace = H5Screate_simple(2, count, nullptr);
    if (H5Dwrite(ds_, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, data) < 0) fail("H5Dwrite");
    H5Sclose(mspace);
    H5Sclose(fspace);
  }
  void sync() override {
    H5Fflush(file_, H5F_SCOPE_GLOBAL);
    void* handle = nullptr;
    H5Fget_vfd_handle(file_, H5P_DEFAULT, &handle);
    if (handle) ::fsync(*static_cast<int*>(handle));
  }
  void close_writer() override {
    H5Dclose(ds_);
    H5Fclose(file_);
  }
  void open_reader(const std::string& path, const Workload& w) override {
    file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    ds_ = H5Dopen2(file_, "embeddings", H5P_DEFAULT);
    std::vector<float> row(w.dim);
    lookup(w, 0, row.data());
  }
  bool lookup(const Workload& w, std::uint64_t row, void* out) override {
    hid_t fspace = H5Dget_space(ds_);
    hsize_t start[2] = {row, 0}, count[2] = {1, w.dim};
    H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr);
    hid_t mspace = H5Screate_simple(2, count, nullptr);
    H5Dread(ds_, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, out);
    H5Sclose(mspace);
    H5Sclose(fspace);
    return true;
  }
  std::uint64_t scan(const Workload& w) override {
    all_.resize(w.rows * w.dim);  // Reused across scans: the second one writes warm pages.
    std::vector<float>& all = all_;
    H5Dread(ds_, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, all.data());
    volatile std::uint64_t s = sum_words(all.data(), all.size() * 4);
    (void)s;
    return all.size() * 4;
  }
  void close_reader() override { close_writer(); }

 private:
  hid_t file_ = -1, ds_ = -1;
  std::vector<float> all_;
};

// ---- LMDB: one put per row, one write transaction per batch -----------------------------------
class LmdbSystem : public System {
 public:
  explicit LmdbSystem(bool sync) : sync_(sync) {}
  void create(const std::string& path, const Workload&) override {
    std::filesystem::create_directories(path);
  }
  void open_env(const std::string& path, const Workload& w, unsigned flags) {
    mdb_env_create(&env_);
    mdb_env_set_mapsize(env_, w.rows * (w.row_bytes() + 256) * 2 + (64ull << 20));
    if (mdb_env_open(env_, path.c_str(), flags, 0644) != 0) fail("mdb_env_open " + path);
  }
  void open_writer(const std::string& path, const Workload& w) override {
    open_env(path, w, sync_ ? 0 : MDB_NOSYNC);
  }
  static void make_key(const Workload& w, std::uint64_t row, std::uint64_t out[2]) {
    out[0] = __builtin_bswap64(w.keys[row]);  // Big-endian: byte order = numeric order.
    out[1] = 0;
  }
  void append(const Workload& w, std::uint64_t first, std::uint64_t n, const float* data) override {
    MDB_txn* txn;
    mdb_txn_begin(env_, nullptr, 0, &txn);
    MDB_dbi dbi;
    mdb_dbi_open(txn, nullptr, 0, &dbi);
    for (std::uint64_t i = 0; i < n; ++i) {
      std::uint64_t k[2];
      make_key(w, first + i, k);
      MDB_val key{sizeof(k), k};
      MDB_val val{w.row_bytes(), const_cast<float*>(data + i * w.dim)};
      if (mdb_put(txn, dbi, &key, &val, 0) != 0) fail("mdb_put");
    }
    if (mdb_txn_commit(txn) != 0) fail("mdb_txn_commit");
  }
  void sync() override { mdb_env_sync(env_, 1); }
  void close_writer() override { mdb_env_close(env_); }
  void open_reader(const std::string& path, const Workload& w) override {
    open_env(path, w, MDB_RDONLY);
    mdb_txn_begin(env_, nullptr, MDB_RDONLY, &rtxn_);
    mdb_dbi_open(rtxn_, nullptr, 0, &dbi_);
    std::vector<float> row(w.dim);
    lookup(w, 0, row.data());
  }
  bool lookup(const Workload& w, std::uint64_t row, void* out) override {
    std::uint64_t k[2];
    make_key(w, row, k);
    MDB_val key{sizeof(k), k}, val;
    if (mdb_get(rtxn_, dbi_, &key, &val) != 0) fail("mdb_get");
    std::memcpy(out, val.mv_data, val.mv_size);
    return true;
  }
  std::uint64_t scan(const Workload&) override {
    MDB_cursor* cur;
    mdb_cursor_open(rtxn_, dbi_, &cur);
    MDB_val key, val;
    std::uint64_t total = 0, s = 0;
    while (mdb_cursor_get(cur, &key, &val, MDB_NEXT) == 0) {
      s += sum_words(val.mv_data, val.mv_size);
      total += val.mv_size;
    }
    mdb_cursor_close(cur);
    volatile std::uint64_t sink = s;
    (void)sink;
    return total;
  }
  void close_reader() override {
    mdb_txn_abort(rtxn_);
    mdb_env_close(env_);
  }

 private:
  bool sync_;
  MDB_env* env_ = nullptr;
  MDB_txn* rtxn_ = nullptr;
  MDB_dbi dbi_ = 0;
};

// ---- SQLite: BLOB rows, WAL, one transaction per batch ---------------------------------------
class SqliteSystem : public System {
 public:
  void exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string e = err ? err : "?";
      sqlite3_free(err);
      fail(std::string("sqlite: ") + sql + ": " + e);
    }
  }
  void open_db(const std::string& path, int flags) {
    if (sqlite3_open_v2(path.c_str(), &db_, flags, nullptr) != SQLITE_OK) fail("sqlite open");
    sqlite3_busy_timeout(db_, 60000);
  }
  void create(const std::string& path, const Workload&) override {
    open_db(path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    exec("PRAGMA journal_mode=WAL");
    exec(
        "CREATE TABLE emb(key INTEGER NOT NULL, epoch INTEGER NOT NULL, vec BLOB NOT NULL, "
        "PRIMARY KEY(key, epoch))");
    sqlite3_close(db_);
  }
  void open_writer(const std::string& path, const Workload&) override {
    open_db(path, SQLITE_OPEN_READWRITE);
    exec("PRAGMA synchronous=NORMAL");
    sqlite3_prepare_v2(db_, "INSERT INTO emb(key, epoch, vec) VALUES (?, 0, ?)", -1, &insert_,
                       nullptr);
  }
  void append(const Workload& w, std::uint64_t first, std::uint64_t n, const float* data) override {
    exec("BEGIN IMMEDIATE");
    for (std::uint64_t i = 0; i < n; ++i) {
      sqlite3_bind_int64(insert_, 1, static_cast<sqlite3_int64>(w.keys[first + i]));
      sqlite3_bind_blob(insert_, 2, data + i * w.dim, static_cast<int>(w.row_bytes()),
                        SQLITE_STATIC);
      if (sqlite3_step(insert_) != SQLITE_DONE) fail("sqlite insert");
      sqlite3_reset(insert_);
    }
    exec("COMMIT");
  }
  void sync() override { exec("PRAGMA wal_checkpoint(FULL)"); }
  void close_writer() override {
    sqlite3_finalize(insert_);
    sqlite3_close(db_);
  }
  void open_reader(const std::string& path, const Workload& w) override {
    open_db(path, SQLITE_OPEN_READONLY);
    sqlite3_prepare_v2(db_, "SELECT vec FROM emb WHERE key = ? AND epoch = 0", -1, &select_,
                       nullptr);
    std::vector<float> row(w.dim);
    lookup(w, 0, row.data());
  }
  bool lookup(const Workload& w, std::uint64_t row, void* out) override {
    sqlite3_bind_int64(select_, 1, static_cast<sqlite3_int64>(w.keys[row]));
    if (sqlite3_step(select_) != SQLITE_ROW) fail("sqlite select");
    std::memcpy(out, sqlite3_column_blob(select_, 0), sqlite3_column_bytes(select_, 0));
    sqlite3_reset(select_);
    return true;
  }
  std::uint64_t scan(const Workload&) override {
    sqlite3_stmt* all;
    sqlite3_prepare_v2(db_, "SELECT vec FROM emb", -1, &all, nullptr);
    std::uint64_t total = 0, s = 0;
    while (sqlite3_step(all) == SQLITE_ROW) {
      const int n = sqlite3_column_bytes(all, 0);
      s += sum_words(sqlite3_column_blob(all, 0), n);
      total += n;
    }
    sqlite3_finalize(all);
    volatile std::uint64_t sink = s;
    (void)sink;
    return total;
  }
  void close_reader() override {
    sqlite3_finalize(select_);
    sqlite3_close(db_);
  }

 private:
  sqlite3* db_ = nullptr;
  sqlite3_stmt* insert_ = nullptr;
  sqlite3_stmt* select_ = nullptr;
};

// ---- Redis: SET embedding:{id}:{epoch} per row, pipelined per batch ---------------------------
class RedisSystem : public System {
 public:
  explicit RedisSystem(int port) : port_(port) {}
  std::string lookup_note() const override { return "over TCP loopback"; }
  void connect() {
    ctx_ = redisConnect("127.0.0.1", port_);
    if (ctx_ == nullptr || ctx_->err) fail("redis connect to port " + std::to_string(port_));
  }
  void create(const std::string&, const Workload&) override {
    connect();
    freeReplyObject(redisCommand(ctx_, "FLUSHALL"));
    redisFree(ctx_);
  }
  void open_writer(const std::string&, const Workload&) override { connect(); }
  void append(const Workload& w, std::uint64_t first, std::uint64_t n, const float* data) override {
    char key[64];
    for (std::uint64_t i = 0; i < n; ++i) {
      const int len = std::snprintf(key, sizeof(key), "embedding:%llu:0",
                                    static_cast<unsigned long long>(w.keys[first + i]));
      redisAppendCommand(ctx_, "SET %b %b", key, static_cast<size_t>(len), data + i * w.dim,
                         static_cast<size_t>(w.row_bytes()));
    }
    for (std::uint64_t i = 0; i < n; ++i) {
      void* reply = nullptr;
      if (redisGetReply(ctx_, &reply) != REDIS_OK) fail("redis SET");
      freeReplyObject(reply);
    }
  }
  void sync() override { freeReplyObject(redisCommand(ctx_, "SAVE")); }
  void close_writer() override { redisFree(ctx_); }
  void open_reader(const std::string&, const Workload& w) override {
    connect();
    std::vector<float> row(w.dim);
    lookup(w, 0, row.data());
  }
  bool lookup(const Workload& w, std::uint64_t row, void* out) override {
    auto* reply = static_cast<redisReply*>(
        redisCommand(ctx_, "GET embedding:%llu:0", static_cast<unsigned long long>(w.keys[row])));
    if (reply == nullptr || reply->type != REDIS_REPLY_STRING) fail("redis GET");
    std::memcpy(out, reply->str, reply->len);
    freeReplyObject(reply);
    return true;
  }
  std::uint64_t scan(const Workload& w) override {
    std::uint64_t total = 0, s = 0;
    for (std::uint64_t first = 0; first < w.rows; first += w.batch) {
      const std::uint64_t n = std::min(w.batch, w.rows - first);
      for (std::uint64_t i = 0; i < n; ++i) {
        redisAppendCommand(ctx_, "GET embedding:%llu:0",
                           static_cast<unsigned long long>(w.keys[first + i]));
      }
      for (std::uint64_t i = 0; i < n; ++i) {
        void* reply = nullptr;
        if (redisGetReply(ctx_, &reply) != REDIS_OK) fail("redis GET");
        auto* r = static_cast<redisReply*>(reply);
        s += sum_words(r->str, r->len);
        total += r->len;
        freeReplyObject(reply);
      }
    }
    volatile std::uint64_t sink = s;
    (void)sink;
    return total;
  }
  void close_reader() override { redisFree(ctx_); }

 private:
  int port_;
  redisContext* ctx_ = nullptr;
};

std::unique_ptr<System> make_system(const std::string& name, int redis_port) {
  if (name == "memcpy") return std::make_unique<MemcpySystem>();
  if (name == "pwrite") return std::make_unique<PwriteSystem>();
  if (name == "embstore") return std::make_unique<EmbstoreSystem>();
  if (name == "hdf5") return std::make_unique<Hdf5System>();
  if (name == "lmdb-sync") return std::make_unique<LmdbSystem>(true);
  if (name == "lmdb-nosync") return std::make_unique<LmdbSystem>(false);
  if (name == "sqlite-wal") return std::make_unique<SqliteSystem>();
  if (name == "redis") return std::make_unique<RedisSystem>(redis_port);
  fail("unknown system " + name);
}

// The memory-management counters a timed phase can pay for without doing the work itself: page
// reclaim (pgscan/pgsteal, allocstall), compaction, writeback of dirty pages, and memory the VM
// host took back (free page reporting hands freed guest memory in 2 MiB blocks to the host; the
// next touch of it faults in the host). Missing files or counters read as 0.
struct MmCounters {
  static constexpr const char* kVmstat[] = {"pgfault",        "pgscan_kswapd",  "pgscan_direct",
                                            "pgsteal_kswapd", "pgsteal_direct", "allocstall_normal",
                                            "compact_stall",  "nr_dirty",       "nr_writeback",
                                            "nr_dirtied",     "nr_written",     "pgalloc_normal"};
  std::uint64_t vmstat[std::size(kVmstat)] = {};
  std::uint64_t reported_kib = 0;  // /sys/module/page_reporting/parameters/reported_kib, if any.

  static MmCounters read() {
    MmCounters c;
    if (FILE* f = std::fopen("/proc/vmstat", "r")) {
      char name[128];
      unsigned long long value;
      while (std::fscanf(f, "%127s %llu", name, &value) == 2) {
        for (std::size_t i = 0; i < std::size(kVmstat); ++i) {
          if (std::strcmp(name, kVmstat[i]) == 0) c.vmstat[i] = value;
        }
      }
      std::fclose(f);
    }
    const long long reported = embstore::bench::page_reporting("reported_kib");
    c.reported_kib = reported > 0 ? static_cast<std::uint64_t>(reported) : 0;
    return c;
  }
  // JSON object of `after - this` for counters, the value at `this` for the nr_* gauges.
  std::string delta_json(const MmCounters& after) const {
    std::string out = "{";
    for (std::size_t i = 0; i < std::size(kVmstat); ++i) {
      const bool gauge =
          std::strcmp(kVmstat[i], "nr_dirty") == 0 || std::strcmp(kVmstat[i], "nr_writeback") == 0;
      const long long v = gauge ? static_cast<long long>(vmstat[i])
                                : static_cast<long long>(after.vmstat[i] - vmstat[i]);
      out += "\"" + std::string(kVmstat[i]) + (gauge ? "_at_start" : "") +
             "\":" + std::to_string(v) + ",";
    }
    out += "\"host_reported_kib\":" + std::to_string(after.reported_kib - reported_kib) + "}";
    return out;
  }
};

// Prepares a timed phase (run.sh also settles the machine between processes; bench/RESULTS.md,
// "Comparison"). sync(): the previous system's dirty pages must not be written back, and its
// deleted files' ext4 journal commit (with online discard here) must not be waited for, on this
// one's time. Then touches and frees `bytes` of anonymous memory: the first touch of memory the VM
// host took back costs up to ~10 us per page. Then writes half of `bytes` (the payload) into a
// file of `dir` and removes it: the page cache's large folios come from the freed 2 MiB blocks
// the host takes back within seconds, which the anonymous touch does not give back to it
// (bench/RESULTS.md, "Same state before every phase"), so every system's files start from pages
// freed a moment ago (a payload large enough to start a free page reporting pass is removed right
// after one: bench/page_reporting.h). Returns the anonymous touch's ns per 4 KiB page, which
// shows how much of the memory the host had taken back.
double warm_memory(std::uint64_t bytes, const std::string& dir) {
  ::sync();
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return -1;
  const auto t = Clock::now();
  std::memset(p, 1, bytes);
  const double ns_per_page = seconds_since(t) * 1e9 / (bytes / 4096);
  const std::string path = dir + "/page-cache-warm-up";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd >= 0) {
    constexpr std::uint64_t kChunk = std::uint64_t{8} << 20;
    for (std::uint64_t done = 0; done < bytes / 2;) {
      const ssize_t n = ::pwrite(fd, p, std::min(kChunk, bytes / 2 - done), done);
      if (n <= 0) break;
      done += static_cast<std::uint64_t>(n);
    }
    ::close(fd);
    embstore::bench::wait_for_reporting_pass(bytes / 2);
    ::unlink(path.c_str());
  }
  ::munmap(p, bytes);
  return ns_per_page;
}

// Appends rows [begin, end) in batches.
void append_range(System& s, const Workload& w, std::uint64_t begin, std::uint64_t end) {
  for (std::uint64_t first = begin; first < end; first += w.batch) {
    const std::uint64_t n = std::min(w.batch, end - first);
    s.append(w, first, n, w.batch_data(first / w.batch));
  }
  s.end_append();
}

// Two writer processes, each appending half the rows to one fresh store. Returns MB/s: the
// payload over the time from the start signal to the last append's return, as the one-writer
// column times appends only. Closing is not timed: embstore's default Writer syncs at close(),
// which would time the disk's flush of the whole store for it alone.
double two_writers(const std::string& name, int redis_port, const Workload& w,
                   const std::string& path) {
  auto creator = make_system(name, redis_port);
  creator->create(path, w);
  creator.reset();
  // A shared page: the start signal, the writers ready, and each writer's end (steady clock ns,
  // one clock for every process of the machine).
  void* shared = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  auto* go = new (shared) std::atomic<int>[2] { 0, 0 };
  auto* ended = new (static_cast<char*>(shared) + 64) std::atomic<std::int64_t>[2] { 0, 0 };
  std::fflush(nullptr);
  const std::uint64_t half = w.rows / 2 / w.batch * w.batch;
  pid_t pids[2];
  for (int i = 0; i < 2; ++i) {
    pids[i] = ::fork();
    if (pids[i] == 0) {
      try {
        auto s = make_system(name, redis_port);
        s->open_writer(path, w);
        go[1].fetch_add(1);
        while (go[0].load() == 0) ::usleep(50);
        append_range(*s, w, i == 0 ? 0 : half, i == 0 ? half : w.rows);
        ended[i].store(Clock::now().time_since_epoch().count());
        s->close_writer();
        ::_exit(0);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "two-writer child: %s\n", e.what());
        ::_exit(1);
      }
    }
  }
  while (go[1].load() < 2) ::usleep(50);
  warm_memory(2 * w.rows * w.row_bytes(), std::filesystem::path(path).parent_path().string());
  const auto t = Clock::now();
  go[0].store(1);
  bool ok = true;
  for (pid_t pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  const Clock::time_point last_end{Clock::duration{std::max(ended[0].load(), ended[1].load())}};
  const double secs = std::chrono::duration<double>(last_end - t).count();
  ::munmap(shared, 4096);
  if (!ok) return -1;
  return w.rows * w.row_bytes() / secs / 1e6;
}

std::string json_number(double v, int precision) {
  if (v < 0) return "null";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", precision, v);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  std::string name, dir;
  int redis_port = 6379;
  Workload w;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const char* v = argv[i + 1];
    if (flag == "--system")
      name = v;
    else if (flag == "--dir")
      dir = v;
    else if (flag == "--rows")
      w.rows = std::strtoull(v, nullptr, 10);
    else if (flag == "--dim")
      w.dim = static_cast<std::uint32_t>(std::strtoul(v, nullptr, 10));
    else if (flag == "--batch")
      w.batch = std::strtoull(v, nullptr, 10);
    else if (flag == "--lookups")
      w.lookups = std::strtoull(v, nullptr, 10);
    else if (flag == "--redis-port")
      redis_port = std::atoi(v);
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (name.empty()) {
    std::fprintf(stderr, "usage: compare_native --system NAME [--dir DIR] [--rows N] ...\n");
    return 2;
  }
  std::string own_dir;  // Made here when there is no --dir; removed at exit.
  if (dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/compare_native-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      std::fprintf(stderr, "compare_native: cannot make a directory %s: %s\n", pattern.c_str(),
                   std::strerror(errno));
      return 1;
    }
    dir = own_dir = pattern;
  }
  const auto remove_own_dir = [&] {
    std::error_code ec;
    if (!own_dir.empty()) std::filesystem::remove_all(own_dir, ec);
  };
  try {
    w.build();
    if (name == "hdf5") H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    const std::string path = dir + "/" + name + ".store";
    auto s = make_system(name, redis_port);
    const double warm_ns_per_page = warm_memory(2 * w.rows * w.row_bytes(), dir);
    s->create(path, w);
    s->open_writer(path, w);
    const MmCounters mm_before = MmCounters::read();
    auto t = Clock::now();
    append_range(*s, w, 0, w.rows);
    const double append_s = seconds_since(t);
    const std::string append_mm = mm_before.delta_json(MmCounters::read());
    t = Clock::now();
    s->sync();
    const double sync_s = seconds_since(t);
    s->close_writer();
    const std::uint64_t on_disk = name == "memcpy" || name == "redis" ? 0 : disk_bytes(path);

    t = Clock::now();
    s->open_reader(path, w);
    const double open_ms = seconds_since(t) * 1e3;
    std::vector<float> out(w.dim);
    std::vector<double> lat;
    std::mt19937_64 rng(99);
    // Every answer is checked, outside the timed part: a wrong one fails the run.
    const auto check = [&](std::uint64_t row) {
      if (payload_sum(out.data(), w.row_bytes()) != w.row_sum(row)) {
        fail("lookup of row " + std::to_string(row) + " (key " + std::to_string(w.keys[row]) +
             ") returned another row's payload");
      }
      s->check_lookup(w, row);
    };
    bool has_lookup = s->lookup(w, 0, out.data());
    if (has_lookup) {
      check(0);
      for (std::uint64_t i = 0; i < 1000; ++i) {  // Warm.
        const std::uint64_t row = rng() % w.rows;
        s->lookup(w, row, out.data());
        check(row);
      }
      for (std::uint64_t i = 0; i < w.lookups; ++i) {
        const std::uint64_t row = rng() % w.rows;
        const auto t0 = Clock::now();
        s->lookup(w, row, out.data());
        lat.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        check(row);
      }
      std::sort(lat.begin(), lat.end());
    }
    s->scan(w);  // Warm the page cache / mapping.
    t = Clock::now();
    const std::uint64_t scanned = s->scan(w);
    const double scan_mb_s = scanned / seconds_since(t) / 1e6;
    s->close_reader();
    s.reset();
    std::error_code ec;
    std::filesystem::remove_all(path, ec);

    std::string two = "\"-\"";
    auto probe = make_system(name, redis_port);
    const std::string mode = probe->two_writers();
    probe.reset();
    if (mode == "ok") {
      const std::string path2 = dir + "/" + name + ".two";
      const double mb_s = two_writers(name, redis_port, w, path2);
      two = mb_s < 0 ? "\"failed\"" : json_number(mb_s, 1);
      std::filesystem::remove_all(path2, ec);
    } else {
      two = "\"" + mode + "\"";
    }
    auto note_system = make_system(name, redis_port);
    std::printf(
        "{\"system\":\"%s\",\"rows\":%llu,\"dim\":%u,\"batch\":%llu,"
        "\"append_mb_s\":%s,\"two_writer_mb_s\":%s,\"sync_s\":%s,"
        "\"lookup_p50_us\":%s,\"lookup_p99_us\":%s,\"lookup_note\":\"%s\","
        "\"scan_mb_s\":%s,\"open_ms\":%s,\"bytes_on_disk\":%llu,\"payload_bytes\":%llu,"
        "\"warm_touch_ns_per_page\":%s,\"append_mm\":%s}\n",
        name.c_str(), static_cast<unsigned long long>(w.rows), w.dim,
        static_cast<unsigned long long>(w.batch),
        json_number(w.rows * w.row_bytes() / append_s / 1e6, 1).c_str(), two.c_str(),
        json_number(sync_s, 3).c_str(),
        has_lookup ? json_number(lat[lat.size() / 2], 2).c_str() : "null",
        has_lookup ? json_number(lat[lat.size() * 99 / 100], 2).c_str() : "null",
        note_system->lookup_note().c_str(), json_number(scan_mb_s, 1).c_str(),
        json_number(open_ms, 3).c_str(), static_cast<unsigned long long>(on_disk),
        static_cast<unsigned long long>(w.rows * w.row_bytes()),
        json_number(warm_ns_per_page, 1).c_str(), append_mm.c_str());
    remove_own_dir();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_native %s: %s\n", name.c_str(), e.what());
    remove_own_dir();
    return 1;
  }
}
