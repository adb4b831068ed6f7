// Scenarios 10-15 (and the threaded variant of 5): threads in one process, capacity edges,
// corruption, mutation fuzzing through the fuzz entry, Python views, and a model-based test.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../fuzz/fuzz_store.h"
#include "embstore/embstore.h"
#include "format/format.h"
#include "platform/testing.h"
#include "scenarios.h"
#include "support/payload.h"

namespace embstore::torture {
namespace {

bool fail(const std::string& text) {
  std::fprintf(stderr, "FAIL: %s\n", text.c_str());
  return false;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void patch(const std::string& path, std::uint64_t offset, const std::string& bytes) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Appends batch `index` of writer `w` through `writer`, logging it.
std::uint64_t append_logged(Writer& writer, AckLog& log, Schedule& schedule, const Params& p,
                            std::uint64_t w, std::uint64_t index) {
  Schedule::Batch b = schedule.batch(index);
  std::vector<std::uint64_t> keys;
  for (std::uint64_t j = 0; j < b.rows; ++j) keys.push_back(test::make_key(w, b.first_seq + j));
  log.intent(b.first_seq, b.rows);
  const std::uint64_t first =
      writer.append(keys, b.index, test::batch_payload(w, b.first_seq, b.rows, p.dim));
  log.acked(b.first_seq, b.rows);
  return first;
}

template <typename F>
bool expect_error(ErrorCode code, const std::string& what, F&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    if (e.code() == code) return true;
    return fail(what + ": expected " + error_code_name(code) + ", got " +
                error_code_name(e.code()) + ": " + e.what());
  }
  return fail(what + ": expected " + std::string(error_code_name(code)) + ", but it succeeded");
}

}  // namespace

// ---- 10 (and 5, threaded). Threads appending through one handle and through many ------------

bool scenario_threads(std::uint64_t seed) {
  Rng rng(seed);
  bool ok = true;
  const std::uint64_t rounds = scaled(20, 20);
  for (std::uint64_t round = 0; round < rounds; ++round) {
    Setup s("threads", rng.next());
    s.create(8192);
    const Params p = s.params();
    // The shared handle also runs the background sync thread (SyncPolicy::kInterval), so TSan
    // sees flushes racing the appends of two threads.
    WriterOptions interval = wopts();
    interval.sync = SyncPolicy::kInterval;
    interval.sync_interval = std::chrono::milliseconds(2);
    Writer shared = Writer::open(p.store, interval);
    const int kThreads = 4, kReaders = 2;
    const std::uint64_t batches = scaled(300, 20);
    std::atomic<int> writers_left{kThreads};
    std::atomic<std::uint64_t> torn{0}, problems{0}, rows_read{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      const std::uint64_t w = s.new_writer();
      const bool sync_some = rng.chance(0.5);
      threads.emplace_back([&, t, w, sync_some] {
        try {
          // Threads 0 and 1 share one handle; 2 and 3 each open their own.
          std::optional<Writer> own;
          if (t >= 2) own.emplace(Writer::open(p.store, wopts()));
          Writer& writer = t >= 2 ? *own : shared;
          AckLog log(p.log_dir, w);
          Schedule schedule(p.seed, w, p.max_batch);
          for (std::uint64_t i = 0; i < batches; ++i) {
            Schedule::Batch b = schedule.batch(i);
            append_logged(writer, log, schedule, p, w, i);
            if (sync_some && i % 25 == 24) {
              writer.sync();
              log.durable(b.first_seq + b.rows);
            }
          }
        } catch (const std::exception& e) {
          std::fprintf(stderr, "writer thread: %s\n", e.what());
          ++problems;
        }
        --writers_left;
      });
    }
    for (int r = 0; r < kReaders; ++r) {
      threads.emplace_back([&] {
        try {
          Reader reader = Reader::open(p.store, ropts());
          std::map<std::uint64_t, Schedule> schedules;
          std::uint64_t checked = 0;
          // Hammer the counter; check every row below it, and that no snapshot ends mid-batch.
          for (bool last = false; !last;) {
            last = writers_left.load() == 0;
            const std::uint64_t size = reader.refresh();
            for (std::uint64_t row = checked; row < size; ++row) {
              Record rec;
              try {
                rec = reader.record(row);
              } catch (const Error&) {
                ++torn;
                continue;
              }
              if (!test::payload_matches(rec.key, p.dim, rec.data)) ++torn;
              const std::uint64_t w = test::key_writer(rec.key);
              auto [it, fresh] = schedules.try_emplace(w, p.seed, w, p.max_batch);
              (void)fresh;
              Schedule::Batch b = it->second.containing(test::key_seq(rec.key));
              if (row + 1 == size && test::key_seq(rec.key) != b.first_seq + b.rows - 1) {
                std::fprintf(stderr, "reader thread: snapshot %llu ends inside a batch\n",
                             static_cast<unsigned long long>(size));
                ++problems;
              }
            }
            checked = std::max(checked, size);
          }
          rows_read += checked;
        } catch (const std::exception& e) {
          std::fprintf(stderr, "reader thread: %s\n", e.what());
          ++problems;
        }
      });
    }
    for (auto& t : threads) t.join();
    stat_add("threads", threads.size());
    stat_add("torn_rows_seen", torn.load());
    stat_add("rows_read_by_readers", rows_read.load());
    shared.close();
    if (torn.load() != 0 || problems.load() != 0) ok = fail("threads: torn rows or errors");
    CheckOptions co;
    co.fresh_writer = s.new_writer();
    ok &= report_check(check_invariant(p, co), "threads");
  }
  return ok;
}

// ---- 11. Capacity edges --------------------------------------------------------------------

bool scenario_capacity(std::uint64_t seed) {
  Rng rng(seed);
  bool ok = true;
  Setup s("capacity", seed);
  const std::string dir = s.dir();
  auto fresh = [&](const std::string& name) { return dir + "/" + name; };
  // dim * itemsize: the largest dim, and one past it.
  {
    CreateOptions o;
    o.dim = (1u << 24) + 1;
    ok &= expect_error(ErrorCode::kInvalidArgument, "dim 2^24+1",
                       [&] { create_store(fresh("dim-over"), o); });
    o.dim = 0;
    ok &=
        expect_error(ErrorCode::kInvalidArgument, "dim 0", [&] { create_store(fresh("dim0"), o); });
    o.dim = 1u << 24;
    o.dtype = DType::kFloat64;
    o.segment_bytes = 4096;
    ok &= expect_error(ErrorCode::kInvalidArgument, "segment smaller than a row",
                       [&] { create_store(fresh("seg-small"), o); });
  }
  // Huge dim: one 16 MiB row (uint8, 2^24 elements) written and read back.
  {
    CreateOptions o;
    o.dim = 1u << 24;
    o.dtype = DType::kUInt8;
    o.segment_bytes = 1ull << 24;
    Writer w = Writer::create(fresh("huge"), o, wopts());
    std::vector<std::uint8_t> row(o.dim);
    for (std::size_t i = 0; i < row.size(); ++i) row[i] = static_cast<std::uint8_t>(i * 31 + 7);
    const std::uint64_t key = 5;
    w.append(std::span<const std::uint64_t>(&key, 1), 1,
             ConstMatrix{row.data(), DType::kUInt8, 1, o.dim, 0});
    w.append(std::span<const std::uint64_t>(&key, 1), 2,
             ConstMatrix{row.data(), DType::kUInt8, 1, o.dim, 0});
    Reader r = Reader::open(fresh("huge"), ropts());
    if (r.size() != 2 || std::memcmp(r.record(1).data, row.data(), row.size()) != 0) {
      ok = fail("a 16 MiB row does not read back");
    }
    if (read_info(fresh("huge")).data_file_bytes % o.segment_bytes != 0)
      ok = fail("huge: partial segment");
  }
  // dim 1, batches of 0 and 1, a batch larger than several segments, counter at capacity.
  {
    CreateOptions o;
    o.dim = 1;
    o.segment_bytes = 4096;  // 1024 rows of 4 bytes
    Writer w = Writer::create(fresh("dim1"), o, wopts());
    std::vector<std::uint64_t> none;
    if (w.append(none, 0, std::span<const float>()) != 0)
      ok = fail("a batch of 0 rows moved the counter");
    std::uint64_t next_key = 0;
    auto append_n = [&](std::uint64_t n) {
      std::vector<std::uint64_t> keys(n);
      std::vector<float> values(n);
      for (std::uint64_t i = 0; i < n; ++i) {
        keys[i] = next_key;
        values[i] = static_cast<float>(next_key++);
      }
      return w.append(keys, 0, values);
    };
    append_n(1);
    const std::uint64_t capacity = w.info().capacity_rows;
    append_n(capacity - 1);  // exactly at capacity
    if (w.info().capacity_rows != capacity || w.committed_rows() != capacity) {
      ok = fail("counter at capacity " + std::to_string(capacity) + ": capacity/committed are " +
                std::to_string(w.info().capacity_rows) + "/" + std::to_string(w.committed_rows()));
    }
    append_n(1);     // the next row grows the store
    append_n(5000);  // larger than several segments in one batch
    if (w.append(none, 0, std::span<const float>()) != w.committed_rows()) ok = fail("empty batch");
    Reader r = Reader::open(fresh("dim1"), ropts());
    if (r.size() != next_key) ok = fail("dim1: wrong row count");
    for (std::uint64_t i = 0; i < r.size(); ++i) {
      Record rec = r.record(i);
      float v;
      std::memcpy(&v, rec.data, 4);
      if (rec.key != i || v != static_cast<float>(i)) {
        ok = fail("dim1: row " + std::to_string(i) + " reads back wrong");
        break;
      }
    }
    if (!r.verify().ok()) ok = fail("dim1: verify");
    const StoreInfo info = r.info();
    if (info.data_file_bytes % 4096 != 0 || info.capacity_rows * 4 > info.data_file_bytes ||
        info.index_file_bytes % 4096 != 0 || info.capacity_rows * 32 > info.index_file_bytes) {
      ok = fail("dim1: file sizes are not whole pages holding capacity_rows");
    }
    // Wrong shapes write nothing.
    const std::uint64_t before = w.committed_rows();
    std::vector<std::uint64_t> two = {1, 2};
    std::vector<float> three(3);
    ok &= expect_error(ErrorCode::kInvalidArgument, "values not keys x dim",
                       [&] { w.append(two, 0, three); });
    ok &= expect_error(ErrorCode::kInvalidArgument, "rows beyond 2^40", [&] {
      w.append(two, 0, ConstMatrix{three.data(), DType::kFloat32, (1ull << 40) + 1, 1, 0});
    });
    ok &= expect_error(ErrorCode::kInvalidArgument, "wrong dim", [&] {
      w.append(two, 0, ConstMatrix{three.data(), DType::kFloat32, 2, 3, 0});
    });
    ok &= expect_error(ErrorCode::kInvalidArgument, "wrong dtype", [&] {
      w.append(two, 0, ConstMatrix{three.data(), DType::kInt8, 2, 1, 0});
    });
    if (w.committed_rows() != before) ok = fail("a refused append changed the counter");
  }
  // The store outgrowing map_bytes: kFull, nothing partial, and it still reads back.
  {
    CreateOptions o;
    o.dim = 16;
    o.segment_bytes = 4096;
    create_store(fresh("mapfull"), o);
    WriterOptions wo;
    wo.map_bytes = 64 << 10;
    Writer w = Writer::open(fresh("mapfull"), wo);
    std::uint64_t key = 0;
    bool full = false;
    while (!full) {
      const std::uint64_t n = rng.range(1, 40);
      std::vector<std::uint64_t> keys(n);
      for (auto& k : keys) k = key++;
      std::vector<float> values(n * 16, 1.0f);
      const std::uint64_t before = w.committed_rows();
      try {
        w.append(keys, 0, values);
      } catch (const Error& e) {
        if (e.code() != ErrorCode::kFull) throw;
        full = true;
        if (w.committed_rows() != before) ok = fail("kFull changed the counter");
      }
    }
    Reader r = Reader::open(fresh("mapfull"), ropts());
    if (!r.verify().ok()) ok = fail("mapfull: verify");
  }
  // Rows past 4 GiB of file offset: soak only (writes > 4 GiB).
  if (soak()) {
    CreateOptions o;
    o.dim = 1024;  // 4 KiB rows
    o.segment_bytes = 256ull << 20;
    Writer w = Writer::create(fresh("big"), o, wopts());
    const std::uint64_t n = 1024;
    std::vector<float> values(n * o.dim);
    std::vector<std::uint64_t> keys(n);
    std::uint64_t rows = 0;
    while (rows * 4096ull <= (4ull << 30) + (8ull << 20)) {
      for (std::uint64_t i = 0; i < n; ++i) {
        keys[i] = rows + i;
        values[i * o.dim] = static_cast<float>(rows + i);
      }
      w.append(keys, 0, values);
      rows += n;
    }
    Reader r = Reader::open(fresh("big"), ropts());
    for (std::uint64_t row = r.size() - 2000; row < r.size(); ++row) {
      Record rec = r.record(row);
      float v;
      std::memcpy(&v, rec.data, 4);
      if (v != static_cast<float>(row)) ok = fail("a row past 4 GiB reads back wrong");
    }
  }
  return ok;
}

// ---- 12. Corruption ------------------------------------------------------------------------

bool scenario_corruption(std::uint64_t seed) {
  Rng rng(seed);
  bool ok = true;
  const std::uint64_t rounds = scaled(40, 25);
  for (std::uint64_t round = 0; round < rounds; ++round) {
    Setup s("corrupt", rng.next());
    s.create(8192);
    const Params p = s.params();
    const std::uint64_t w = s.new_writer();
    std::uint64_t committed = 0, durable = 0;
    {
      Writer writer = Writer::open(p.store, wopts_unsynced());
      AckLog log(p.log_dir, w);
      Schedule schedule(p.seed, w, p.max_batch);
      for (std::uint64_t i = 0; i < 60; ++i) append_logged(writer, log, schedule, p, w, i);
      writer.sync();
      log.durable(schedule.batch(59).first_seq + schedule.batch(59).rows);
      durable = writer.durable_rows();
      for (std::uint64_t i = 60; i < 80; ++i) append_logged(writer, log, schedule, p, w, i);
      committed = writer.committed_rows();
    }
    if (durable == 0 || durable >= committed) ok = fail("corruption setup: no unsynced rows");
    const std::string rows_path = p.store + "/rows.1", index_path = p.store + "/index.1";
    const std::uint64_t rb = p.dim * 4;
    // (a) Nonsense past the commit point: ignored, and recovery after a reboot cuts exactly at
    //     committed (the rows below are intact).
    {
      std::string junk(rng.range(1, 3000), '\0');
      for (auto& c : junk) c = static_cast<char>(rng.next());
      patch(
          rows_path, committed * rb,
          junk.substr(0, std::min<std::size_t>(
                             junk.size(), read_info(p.store).capacity_rows * rb - committed * rb)));
      patch(index_path, committed * 32, junk.substr(0, 32 * rng.range(1, 4)));
      stat_add("corrupt_inputs");
      detail::testing::set_boot_id(random_boot_id(rng));
      {
        Reader before = Reader::open(p.store, ropts());
        if (before.size() != committed) ok = fail("a reader after reboot clamped intact rows");
        Writer writer = Writer::open(p.store, wopts_unsynced());
        if (writer.committed_rows() != committed) {
          ok = fail("recovery moved committed " + std::to_string(committed) + " -> " +
                    std::to_string(writer.committed_rows()) + " with junk past the commit point");
        }
      }
      detail::testing::set_boot_id("");
      CheckOptions co;
      ok &= report_check(check_invariant(p, co), "junk past commit");
    }
    // (b) Flipped bytes inside committed rows and in index entries: verify names exactly those
    //     rows; reading them reports kCorruption; every other row still reads.
    {
      Reader reader = Reader::open(p.store, ropts());
      const std::uint64_t n = reader.size();
      std::set<std::uint64_t> bad;
      const std::uint64_t flips = rng.range(1, 6);
      for (std::uint64_t i = 0; i < flips; ++i) {
        const std::uint64_t row = rng.below(n);
        bad.insert(row);
        if (rng.chance(0.5)) {
          const std::uint64_t off = row * rb + rng.below(rb);
          std::string b = read_all(rows_path).substr(off, 1);
          b[0] = static_cast<char>(b[0] ^ (1 << rng.below(8)));
          patch(rows_path, off, b);
        } else {
          const std::uint64_t off = row * 32 + rng.below(32);
          std::string b = read_all(index_path).substr(off, 1);
          b[0] = static_cast<char>(b[0] ^ (1 << rng.below(8)));
          patch(index_path, off, b);
        }
        stat_add("corrupt_inputs");
      }
      VerifyReport report = reader.verify();
      std::set<std::uint64_t> named(report.bad_rows.begin(), report.bad_rows.end());
      if (named != bad)
        ok = fail("verify named " + std::to_string(named.size()) + " rows, not the " +
                  std::to_string(bad.size()) + " corrupted");
      for (std::uint64_t row = 0; row < n; ++row) {
        try {
          Record rec = reader.record(row);
          if (bad.count(row))
            ok = fail("a corrupted row " + std::to_string(row) + " read without error");
          if (!test::payload_matches(rec.key, p.dim, rec.data))
            ok = fail("an intact row reads wrong");
        } catch (const Error& e) {
          if (!bad.count(row)) ok = fail("an intact row failed: " + std::string(e.what()));
          if (e.code() != ErrorCode::kCorruption)
            ok = fail("a bad row gave a non-corruption error");
          if (std::string(e.what()).find(std::to_string(row)) == std::string::npos) {
            ok = fail("the error does not name row " + std::to_string(row));
          }
        }
      }
    }
    // (c) Header damage: named errors, never a crash; counters beyond the files are refused.
    {
      const std::string header = p.store + "/header";
      const std::string saved = read_all(header);
      auto with = [&](std::uint64_t off, const std::string& bytes, ErrorCode code,
                      const std::string& what) {
        patch(header, off, bytes);
        // Format 1.2 keeps a second copy of the fixed header: damage both, or it is read.
        if (off < detail::kHeaderCopyOffset) patch(header, off + detail::kHeaderCopyOffset, bytes);
        stat_add("corrupt_inputs");
        ok &= expect_error(code, what, [&] { Reader::open(p.store, ropts()); });
        patch(header, 0, saved);
      };
      // One damaged copy is not an error: the other is read, and the rows with it.
      patch(header, 16, std::string("\x00\x00\x00\x00", 4));
      stat_add("corrupt_inputs");
      try {
        if (Reader::open(p.store, ropts()).dim() != p.dim) ok = fail("header copy: wrong dim");
      } catch (const Error& e) {
        ok = fail(std::string("one damaged header copy refused the store: ") + e.what());
      }
      patch(header, 0, saved);
      with(0, "EMBSTORF", ErrorCode::kNotFound, "bad magic");
      with(8, std::string("\x02\x00", 2), ErrorCode::kUnsupportedVersion, "format_major + 1");
      with(8, std::string("\x00\x00", 2), ErrorCode::kUnsupportedVersion, "format_major 0");
      with(12, std::string("\x09", 1), ErrorCode::kCorruption, "unknown dtype (checksum)");
      with(16, std::string("\x00\x00\x00\x00", 4), ErrorCode::kCorruption, "dim 0 (checksum)");
      std::string big(8, '\0');
      const std::uint64_t huge = 1ull << 50;
      std::memcpy(big.data(), &huge, 8);
      // Counters beyond capacity or beyond the files: refused, not mapped past EOF (SIGBUS).
      with(4096, big, ErrorCode::kCorruption, "committed_rows beyond 2^40");
      std::string beyond(8, '\0');
      const std::uint64_t past = read_info(p.store).capacity_rows + 1;
      std::memcpy(beyond.data(), &past, 8);
      with(4096, beyond, ErrorCode::kCorruption, "committed_rows beyond capacity");
      ok &= expect_error(ErrorCode::kNotFound, "missing directory",
                         [&] { Reader::open(s.dir() + "/nothing", ropts()); });
      ok &= expect_error(ErrorCode::kNotFound, "not a store",
                         [&] { Reader::open(p.log_dir, ropts()); });
    }
  }
  return ok;
}

// ---- 13. Mutation fuzzing through the fuzz entry (the libFuzzer run is tests/fuzz/run.sh) ---

// The input the fuzz entry is running, kept for the SIGABRT handler below: the entry aborts on a
// broken promise, and the input is what a replay needs (the seed replays the whole run, slowly).
const std::string* g_fuzz_input = nullptr;
char g_fuzz_input_path[256];

// One write() from the signal handler; its result is of no use to a process that is ending.
void write_once(int fd, const char* data, std::size_t size) {
  if (::write(fd, data, size) < 0) return;
}

void save_fuzz_input(int) {
  // Async-signal-safe calls only; then the default action ends the process as before.
  if (g_fuzz_input != nullptr) {
    const int fd = ::open(g_fuzz_input_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
      write_once(fd, g_fuzz_input->data(), g_fuzz_input->size());
      ::close(fd);
      constexpr char kSaved[] = "scenario 13: the input is saved; replay: embstore_fuzz_replay ";
      write_once(STDERR_FILENO, kSaved, sizeof(kSaved) - 1);
      write_once(STDERR_FILENO, g_fuzz_input_path, std::strlen(g_fuzz_input_path));
      write_once(STDERR_FILENO, "\n", 1);
    }
  }
  ::signal(SIGABRT, SIG_DFL);
  ::raise(SIGABRT);
}

bool scenario_fuzz_smoke(std::uint64_t seed) {
  Rng rng(seed);
  Setup s("fuzzsmoke", seed);
  // Valid small stores to mutate.
  std::vector<std::string> seeds;
  for (int i = 0; i < 3; ++i) {
    CreateOptions o;
    o.dim = static_cast<std::uint32_t>(rng.range(1, 12));
    o.dtype = static_cast<DType>(rng.range(1, 6));
    o.segment_bytes = 4096;
    const std::string store = s.dir() + "/seed" + std::to_string(i);
    Writer w = Writer::create(store, o, wopts());
    std::vector<std::byte> row(std::uint64_t{o.dim} * dtype_size(o.dtype));
    for (std::uint64_t r = 0; r < rng.range(0, 150); ++r) {
      for (auto& b : row) b = static_cast<std::byte>(rng.next());
      const std::uint64_t key = r;
      w.append(std::span<const std::uint64_t>(&key, 1), r,
               ConstMatrix{row.data(), o.dtype, 1, o.dim, 0});
      if (r == 20) w.sync();
    }
    w.close();
    seeds.push_back(fuzz::encode_store(store, static_cast<std::uint8_t>(rng.below(8))));
  }
  const std::uint64_t inputs = scaled(8000, 40);
  const char* tmp = std::getenv("TMPDIR");
  std::snprintf(g_fuzz_input_path, sizeof(g_fuzz_input_path), "%s/embstore-scenario13-%llu.bin",
                tmp != nullptr && *tmp != '\0' ? tmp : "/tmp",
                static_cast<unsigned long long>(seed));
  std::string in;
  g_fuzz_input = &in;
  ::signal(SIGABRT, save_fuzz_input);
  for (std::uint64_t i = 0; i < inputs; ++i) {
    in = seeds[rng.below(seeds.size())];
    const std::uint64_t kind = rng.below(6);
    if (kind == 0) {
      in.resize(rng.below(in.size() + 1));  // truncated anywhere
    } else {
      const std::uint64_t edits = rng.range(1, 8);
      for (std::uint64_t e = 0; e < edits && !in.empty(); ++e) {
        const std::uint64_t at = kind == 1   ? rng.below(std::min<std::size_t>(in.size(), 200))
                                 : kind == 2 ? 4097 + rng.below(300)
                                             : rng.below(in.size());
        if (at >= in.size()) continue;
        if (kind == 3) {
          std::uint64_t v = rng.chance(0.5) ? ~0ull >> rng.below(64) : rng.next();
          std::memcpy(in.data() + at, &v, std::min<std::size_t>(8, in.size() - at));
        } else {
          in[at] = static_cast<char>(rng.next());
        }
      }
      // Flags (fuzz_store.h): fix checksum, same boot, writer; and in 1 of 8 each a truncate
      // (by rows or from an epoch), a salvage, and a close and reopen, which all flush files (a
      // truncate in half the inputs doubled the scenario's time).
      const std::uint64_t truncate = rng.chance(0.125) ? 8 | (rng.below(2) << 4) : 0;
      const std::uint64_t salvage = rng.chance(0.125) ? 32 : 0;
      const std::uint64_t reopen = rng.chance(0.125) ? 64 : 0;
      in[0] = static_cast<char>(rng.below(8) | truncate | salvage | reopen);
    }
    LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(in.data()), in.size());
    stat_add("corrupt_inputs");
  }
  ::signal(SIGABRT, SIG_DFL);
  g_fuzz_input = nullptr;
  return true;  // A failure is a crash or a sanitizer report, which ends the process.
}

// ---- 14. Python views ----------------------------------------------------------------------

bool scenario_python(std::uint64_t seed) {
  const char* module_dir = std::getenv("EMBSTORE_PYTHONPATH");
  const char* script = std::getenv("EMBSTORE_PY_VIEWS_TEST");
  if (module_dir == nullptr || script == nullptr || !std::filesystem::exists(module_dir)) {
    scenario_skipped(
        "scenario 14: skipped (the Python module is not built; ctest runs "
        "tests/reliability/python_views.py when it is)");
    return true;
  }
  const std::string cmd = "PYTHONPATH='" + std::string(module_dir) + "' /usr/bin/python3 '" +
                          script + "' --seed " + std::to_string(seed);
  stat_add("processes");
  return std::system(cmd.c_str()) == 0 || fail("python views test failed");
}

// ---- 20. Python in ordinary use: reused buffers, processes that exit without close() ---------

bool scenario_python_use(std::uint64_t seed) {
  const char* module_dir = std::getenv("EMBSTORE_PYTHONPATH");
  const char* script = std::getenv("EMBSTORE_PY_USE_TEST");
  if (module_dir == nullptr || script == nullptr || !std::filesystem::exists(module_dir)) {
    scenario_skipped(
        "scenario 20: skipped (the Python module is not built; ctest runs "
        "tests/reliability/python_use.py when it is)");
    return true;
  }
  const std::string cmd = "PYTHONPATH='" + std::string(module_dir) + "' /usr/bin/python3 '" +
                          script + "' --seed " + std::to_string(seed) + " --rounds " +
                          std::to_string(scaled(12, 20));
  stat_add("processes");
  return std::system(cmd.c_str()) == 0 || fail("python ordinary-use test failed");
}

// ---- 15. Model-based: append / reopen / crash / reboot / verify / lookup vs an oracle -------

bool scenario_model(std::uint64_t seed) {
  Rng rng(seed);
  bool ok = true;
  Setup s("model", seed, 8, 6);
  s.create(4096);
  const Params p = s.params();
  struct Row {
    std::uint64_t key, epoch;
  };
  std::vector<Row> oracle;  // committed rows in order
  std::uint64_t oracle_durable = 0;
  std::uint64_t next_key = 1;
  std::optional<Writer> writer(Writer::open(p.store, wopts_unsynced()));
  const std::uint64_t steps = scaled(6000, 50);
  const char* points[] = {"after-copy",      "mid-index-write",  "before-publish", "after-publish",
                          "after-grow-data", "after-grow-index", "mid-sync"};
  auto batch_values = [&](std::uint64_t first_key, std::uint64_t n) {
    std::vector<float> v(n * p.dim);
    for (std::uint64_t i = 0; i < n; ++i)
      test::payload_for(first_key + i, p.dim, v.data() + i * p.dim);
    return v;
  };
  auto check_all = [&](const std::string& when) {
    Reader r = Reader::open(p.store, ropts());
    if (r.size() != oracle.size()) {
      return fail(when + ": store has " + std::to_string(r.size()) + " rows, oracle " +
                  std::to_string(oracle.size()));
    }
    if (!r.verify().ok()) return fail(when + ": verify");
    for (std::uint64_t i = 0; i < r.size(); ++i) {
      Record rec = r.record(i);
      if (rec.key != oracle[i].key || rec.epoch != oracle[i].epoch ||
          !test::payload_matches(rec.key, p.dim, rec.data)) {
        return fail(when + ": row " + std::to_string(i) + " differs from the oracle");
      }
    }
    return true;
  };
  for (std::uint64_t step = 0; step < steps && ok; ++step) {
    stat_add("model_steps");
    const std::uint64_t op = rng.below(100);
    if (!writer) writer.emplace(Writer::open(p.store, wopts_unsynced()));
    if (op < 55) {  // append
      const std::uint64_t n = rng.range(0, 20), epoch = rng.below(5);
      std::vector<std::uint64_t> keys(n);
      for (auto& k : keys) k = next_key++;
      const std::uint64_t first =
          writer->append(keys, epoch, batch_values(keys.empty() ? 0 : keys[0], n));
      if (first != oracle.size()) ok = fail("append returned row " + std::to_string(first));
      for (auto k : keys) oracle.push_back({k, epoch});
    } else if (op < 62) {  // sync
      writer->sync();
      oracle_durable = oracle.size();
      if (writer->durable_rows() != oracle_durable) ok = fail("durable_rows after sync");
    } else if (op < 70) {  // reopen
      writer.reset();
      writer.emplace(Writer::open(p.store, wopts_unsynced()));
    } else if (op < 80) {  // crash a child at a named point mid-append
      writer.reset();
      const char* point = points[rng.below(std::size(points))];
      const std::uint64_t n = rng.range(1, 80);
      std::vector<std::uint64_t> keys(n);
      for (auto& k : keys) k = next_key++;
      const auto values = batch_values(keys[0], n);
      std::fflush(nullptr);
      const pid_t pid = ::fork();
      if (pid == 0) {
        detail::testing::arm_crash(point, 1);
        try {
          Writer child = Writer::open(p.store, wopts_unsynced());
          child.append(keys, 9, values);
          child.sync();
        } catch (...) {
          ::_exit(3);
        }
        ::_exit(0);
      }
      stat_add("processes");
      int status = 0;
      ::waitpid(pid, &status, 0);
      const bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
      stat_add(killed ? "crash_point_kills" : "crash_points_not_reached");
      if (!killed && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
        ok = fail("crash child failed");
      // The batch is in the store whole (published before the kill) or not at all.
      Reader r = Reader::open(p.store, ropts());
      if (r.size() == oracle.size() + n) {
        for (auto k : keys) oracle.push_back({k, 9});
      } else if (r.size() != oracle.size()) {
        ok = fail(std::string("after a crash at ") + point + " the store has " +
                  std::to_string(r.size()) + " rows, neither " + std::to_string(oracle.size()) +
                  " nor +" + std::to_string(n));
      }
      if (!killed) oracle_durable = oracle.size();
    } else if (op < 85) {  // reboot: rows past durable may be cut, but never below it
      writer.reset();
      detail::testing::set_boot_id(random_boot_id(rng));
      writer.emplace(Writer::open(p.store, wopts_unsynced()));
      // Nothing was torn (the page cache held everything), so nothing may be cut.
      if (writer->committed_rows() != oracle.size()) ok = fail("a clean reboot cut rows");
    } else if (op < 95) {  // lookup by (key, epoch) through the keys/epochs views
      if (oracle.empty()) continue;
      const Row want = oracle[rng.below(oracle.size())];
      Reader r = Reader::open(p.store, ropts());
      auto keys = r.keys(0, r.size());
      auto epochs = r.epochs(0, r.size());
      std::uint64_t found = ~0ull;
      for (std::uint64_t i = 0; i < r.size(); ++i) {
        if (keys[i] == want.key && epochs[i] == want.epoch) found = i;
      }
      if (found == ~0ull || !test::payload_matches(want.key, p.dim, r.record(found).data)) {
        ok = fail("lookup of key " + std::to_string(want.key) + " failed");
      }
    } else {
      ok &= check_all("verify step " + std::to_string(step));
    }
  }
  writer.reset();
  ok &= check_all("the end");
  detail::testing::set_boot_id("");
  (void)oracle_durable;
  return ok;
}

// ---- The table -----------------------------------------------------------------------------

const std::vector<Scenario>& all_scenarios() {
  static const std::vector<Scenario> table = {
      {"1", "kill -9 a random writer among 3 (plus a reader), restart it", scenario_kill9},
      {"2", "crash-point sweep: every named point x n", scenario_crash_points},
      {"3", "crash during growth; next growth works; files whole pages, allocated",
       scenario_growth},
      {"4", "crash during recovery, recover again: same state", scenario_recovery_crash},
      {"5", "stalled writers, hammering readers (processes, then threads)", scenario_stall},
      {"6", "simulated power loss: shadow images with torn pages", scenario_power_loss},
      {"7", "full disk: small tmpfs and RLIMIT_FSIZE", scenario_full_disk},
      {"8", "I/O error countdown on every seam op, once and forever", scenario_faults},
      {"9", "address-space limits (RLIMIT_AS) and small map_bytes", scenario_memory},
      {"10", "threads through one handle and through separate handles", scenario_threads},
      {"11", "capacity edges", scenario_capacity},
      {"12", "corruption past commit, in rows, in the index, in the header", scenario_corruption},
      {"13", "mutation fuzzing of store files through the fuzz entry", scenario_fuzz_smoke},
      {"14", "Python views across growth and reader close", scenario_python},
      {"15", "model-based: random ops against an in-memory oracle", scenario_model},
      {"17", "sparse copies on a full tmpfs: kFull, never SIGBUS", scenario_sparse_full},
      {"18", "kill -9 during create; open_or_create races on a nearly full disk",
       scenario_create_stress},
      {"16", "damaged counters after a reboot: Reader and Writer agree", scenario_counters},
      {"20", "Python in ordinary use: reused buffers, exit without close", scenario_python_use},
      {"21", "key index: kill -9 while indexing and growing, missing and damaged files",
       scenario_key_index},
      {"22", "truncate under writers and a reader, killed at random and at its crash points",
       scenario_truncate},
      {"19", "many stores: thousands of readers, hundreds of writers, views kept",
       scenario_many_stores},
      {"23", "the checkers: the verifier and the reader fail on planted faults", scenario_checkers},
  };
  return table;
}

}  // namespace embstore::torture
