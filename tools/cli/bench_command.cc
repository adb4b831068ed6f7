// bench_command.cc — `embstore bench`: the I/O throughput tool users run on their own disks.
//
// N writer processes (fork) append batches of `dim` x `dtype` rows to one fresh store for a row
// count or a duration while M reader processes follow it; then the same workload (same process
// count, same bytes) goes through pwrite() into the page cache and through memcpy into memory,
// in the same run, and the report gives embstore's figures as ratios to those two.
// Uses only the public headers plus POSIX (fork, pwrite) for the baselines.
// Registered by add_bench_command() (cli.h).
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cli.h"
#include "embstore/embstore.h"
#include "page_reporting.h"

namespace embstore::cli {
namespace {

struct Config {
  std::vector<int> writers{1};
  int readers = 0;
  std::uint64_t batch = 512;
  std::uint32_t dim = 768;
  DType in_dtype = DType::kFloat32;
  DType store_dtype = DType::kFloat32;
  std::string dtype_text = "float32";
  std::uint64_t rows = 200000;
  double seconds = 0;
  SyncPolicy sync = SyncPolicy::kNone;
  std::string sync_text = "none";
  std::string dir;
  int repeat = 5;
  bool keep = false;
  bool baselines = true;
  bool no_baselines = false;        // The option; baselines follows it.
  bool no_key_index = false;        // The store is created without a key index (its cost apart).
  bool huge_pages = false;          // Writers open with WriterOptions::huge_pages.
  std::uint64_t expected_rows = 0;  // Writers open with WriterOptions::expected_rows.
  bool json = false;
  bool quiet = false;
  // Before each phase: "warm" writes and removes a file as large as the phase's payload in the
  // work directory (see warm_page_cache()); "as-is" does nothing.
  std::string page_state = "warm";
};

[[noreturn]] void usage_error(const std::string& what) {
  throw Error(ErrorCode::kInvalidArgument, what);
}

// Fills in what the options do not set directly (dtype and sync names, the default directory).
void finish_config(Config& config) {
  config.baselines = !config.no_baselines;
  if (config.dtype_text == "f32->f16" || config.dtype_text == "f32->bf16") {
    config.in_dtype = DType::kFloat32;
    config.store_dtype = config.dtype_text == "f32->f16" ? DType::kFloat16 : DType::kBFloat16;
  } else if (auto parsed = parse_dtype(config.dtype_text)) {
    config.in_dtype = config.store_dtype = *parsed;
  } else {
    usage_error("unknown --dtype \"" + config.dtype_text + "\"");
  }
  config.sync = config.sync_text == "every"      ? SyncPolicy::kEveryAppend
                : config.sync_text == "interval" ? SyncPolicy::kInterval
                                                 : SyncPolicy::kNone;
  if (config.dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    config.dir = tmp && *tmp ? tmp : "/tmp";
  }
}

// CPU time of this process, all its threads (those that ended too), in nanoseconds.
std::int64_t process_cpu_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

// State shared by the parent and its children: an anonymous MAP_SHARED page set up before fork.
struct Shared {
  std::atomic<int> ready;
  std::atomic<int> go;
  std::atomic<int> stop_readers;
  std::atomic<std::uint64_t> next_offset;  // pwrite baseline: bytes reserved so far.
  std::atomic<std::int64_t> first_start_ns;
  std::atomic<std::int64_t> last_end_ns;
  std::atomic<std::uint64_t> rows_done;
  std::atomic<std::uint64_t> reader_bytes;
  std::atomic<std::int64_t> close_ns;  // The longest Writer::close() of the phase.
  // CPU time of the writer processes (all their threads) from "go" to the end of their close():
  // what a phase cost the machine, whether it waited or computed (writer_child()).
  std::atomic<std::int64_t> writer_cpu_ns;
  std::atomic<int> failed;
  char error[512];
  ErrorCode error_code;  // Of the first failure (error): a full disk is kFull, as elsewhere.
};

Shared* map_shared() {
  void* p =
      ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw Error(ErrorCode::kIO, "mmap of the shared page failed");
  auto* shared = new (p) Shared();
  shared->first_start_ns = INT64_MAX;
  return shared;
}

void atomic_min(std::atomic<std::int64_t>& word, std::int64_t value) {
  std::int64_t current = word.load();
  while (value < current && !word.compare_exchange_weak(current, value)) {
  }
}
void atomic_max(std::atomic<std::int64_t>& word, std::int64_t value) {
  std::int64_t current = word.load();
  while (value > current && !word.compare_exchange_weak(current, value)) {
  }
}

[[noreturn]] void fail_child(Shared* shared, const std::string& what,
                             ErrorCode code = ErrorCode::kIO) {
  if (shared->failed.exchange(1) == 0) {
    std::snprintf(shared->error, sizeof(shared->error), "%s", what.c_str());
    shared->error_code = code;
  }
  ::_exit(1);
}
[[noreturn]] void fail_child(Shared* shared, const std::exception& error) {
  const auto* ours = dynamic_cast<const Error*>(&error);
  fail_child(shared, error.what(), ours != nullptr ? ours->code() : ErrorCode::kIO);
}

void write_samples(const std::string& path, const std::vector<std::uint32_t>& samples) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw Error(ErrorCode::kIO, "cannot write " + path);
  std::fwrite(samples.data(), sizeof(std::uint32_t), samples.size(), f);
  std::fclose(f);
}

std::vector<std::uint32_t> read_samples(const std::string& path) {
  std::vector<std::uint32_t> samples;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return samples;
  std::uint32_t buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, sizeof(std::uint32_t), 4096, f)) > 0) {
    samples.insert(samples.end(), buf, buf + n);
  }
  std::fclose(f);
  std::remove(path.c_str());
  return samples;
}

struct Percentiles {
  double p50_us = 0, p99_us = 0, max_us = 0;
  std::uint64_t count = 0;
};

Percentiles percentiles(std::vector<std::uint32_t> ns) {
  Percentiles p;
  p.count = ns.size();
  if (ns.empty()) return p;
  std::sort(ns.begin(), ns.end());
  auto at = [&](double q) {
    return ns[std::min(ns.size() - 1, static_cast<std::size_t>(q * (ns.size() - 1) + 0.5))] / 1e3;
  };
  p.p50_us = at(0.50);
  p.p99_us = at(0.99);
  p.max_us = ns.back() / 1e3;
  return p;
}

// The batch every writer appends, in the input dtype; random bits for the non-float types. It
// starts on a page, the source the kernel copies into the page cache fastest: from a block a few
// bytes into its page (a heap block's 16) that copy ran 10-20% slower on some VMs
// (bench/RESULTS.md, "Staging buffers start where the rows land"). Users' arrays start anywhere.
class Batch {
 public:
  explicit Batch(std::uint64_t bytes) : storage_(bytes + kPage), bytes_(bytes) {
    const auto base = reinterpret_cast<std::uintptr_t>(storage_.data());
    data_ = storage_.data() + ((kPage - base % kPage) % kPage);
  }
  std::byte* data() { return data_; }
  const std::byte* data() const { return data_; }
  std::uint64_t size() const { return bytes_; }

 private:
  static constexpr std::uintptr_t kPage = 4096;
  std::vector<std::byte> storage_;
  std::byte* data_ = nullptr;
  std::uint64_t bytes_ = 0;
};

Batch make_batch(const Config& config, int seed) {
  const std::uint64_t bytes = config.batch * config.dim * dtype_size(config.in_dtype);
  Batch data(bytes);
  std::mt19937_64 rng(static_cast<std::uint64_t>(seed) * 7919 + 1);
  if (config.in_dtype == DType::kFloat32) {
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (std::uint64_t i = 0; i < bytes / 4; ++i) {
      const float v = dist(rng);
      std::memcpy(data.data() + i * 4, &v, 4);
    }
  } else {
    for (std::uint64_t i = 0; i < bytes; ++i) {
      data.data()[i] = static_cast<std::byte>(rng() & 0x3f);  // Finite 16-bit floats.
    }
  }
  return data;
}

// Rows writer `index` of `writers` appends in row-count mode: the total split evenly, in batches.
std::uint64_t rows_for_writer(std::uint64_t total, int writers, int index) {
  const std::uint64_t base = total / writers;
  return base + (static_cast<std::uint64_t>(index) < total % writers ? 1 : 0);
}

// The children sleep on `go` (a futex shared by the processes, not a polling loop): the phase's
// N writers would otherwise wake thousands of times a second while the parent waits for a free
// page reporting pass, and fill a profile of the run (bench/RESULTS.md's perf recipe) with it.
static_assert(sizeof(std::atomic<int>) == sizeof(int) && std::atomic<int>::is_always_lock_free);
int* go_word(Shared* shared) { return reinterpret_cast<int*>(&shared->go); }

void wait_for_go(Shared* shared) {
  shared->ready.fetch_add(1);
  while (shared->go.load() == 0) {
    ::syscall(SYS_futex, go_word(shared), FUTEX_WAIT, 0, nullptr, nullptr, 0);
  }
}

void start_phase(Shared* shared) {
  shared->go.store(1);
  ::syscall(SYS_futex, go_word(shared), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

enum class Workload { kEmbstore, kPwrite, kPwritePrealloc, kMemcpy };

const char* workload_name(Workload workload) {
  switch (workload) {
    case Workload::kEmbstore:
      return "embstore";
    case Workload::kPwrite:
      return "pwrite";
    case Workload::kPwritePrealloc:
      return "pwrite-pre";
    case Workload::kMemcpy:
      return "memcpy";
  }
  return "?";
}

bool is_pwrite(Workload workload) {
  return workload == Workload::kPwrite || workload == Workload::kPwritePrealloc;
}

// Body of one writer child. Never returns.
[[noreturn]] void writer_child(const Config& config, Workload workload, int index,
                               const std::string& store, const std::string& pwrite_path,
                               std::uint64_t quota_rows, const std::string& latency_path,
                               Shared* shared) {
  try {
    const Batch batch = make_batch(config, index);
    const std::uint64_t store_row_bytes =
        std::uint64_t{config.dim} * dtype_size(config.store_dtype);
    const std::uint64_t batch_bytes = batch.size();
    const bool by_time = config.seconds > 0 && workload == Workload::kEmbstore;
    const std::uint64_t quota = by_time ? UINT64_MAX : quota_rows;
    std::vector<std::uint32_t> latencies;
    std::vector<std::uint64_t> keys(config.batch);
    std::optional<Writer> writer;
    int fd = -1;
    std::vector<std::byte> memory;
    if (workload == Workload::kEmbstore) {
      WriterOptions options;
      options.sync = config.sync;
      options.huge_pages = config.huge_pages;
      options.expected_rows = config.expected_rows;
      writer.emplace(Writer::open(store, options));
    } else if (is_pwrite(workload)) {
      fd = ::open(pwrite_path.c_str(), O_WRONLY);
      if (fd < 0) fail_child(shared, "bench: cannot open " + pwrite_path);
    } else {
      // A warm private buffer the batches cycle through (at most 256 MiB).
      const std::uint64_t rows_fit =
          std::max<std::uint64_t>(1, (256ull << 20) / batch_bytes) * config.batch;
      memory.assign(std::min(quota_rows, rows_fit) * store_row_bytes + batch_bytes, std::byte{1});
    }
    wait_for_go(shared);
    const std::int64_t start = now_ns();
    const std::int64_t cpu_start = process_cpu_ns();
    const std::int64_t deadline =
        by_time ? start + static_cast<std::int64_t>(config.seconds * 1e9) : INT64_MAX;
    std::uint64_t done = 0;
    std::uint64_t memory_offset = 0;
    while (done < quota) {
      const std::uint64_t n = std::min(config.batch, quota - done);
      const std::int64_t t0 = now_ns();
      if (workload == Workload::kEmbstore) {
        // A new key for every row, as a training run's sample ids are, so the key index does
        // its whole work; each still says when its append started, within n ns.
        for (std::uint64_t i = 0; i < n; ++i) keys[i] = static_cast<std::uint64_t>(t0) + i;
        writer->append(std::span(keys.data(), n), static_cast<std::uint64_t>(index),
                       ConstMatrix{batch.data(), config.in_dtype, n, config.dim, 0});
      } else if (is_pwrite(workload)) {
        const std::uint64_t bytes = n * store_row_bytes;
        const std::uint64_t offset = shared->next_offset.fetch_add(bytes);
        const ssize_t wrote = ::pwrite(fd, batch.data(), bytes, static_cast<off_t>(offset));
        if (wrote != static_cast<ssize_t>(bytes)) {
          // A short write (a disk filling up) leaves errno as it was: write the rest for the
          // error, as the library does.
          const ssize_t rest = wrote < 0 ? wrote
                                         : ::pwrite(fd, batch.data() + wrote, bytes - wrote,
                                                    static_cast<off_t>(offset + wrote));
          const int err = rest < 0 ? errno : ENOSPC;
          if (wrote < 0 || rest != static_cast<ssize_t>(bytes - wrote)) {
            fail_child(shared, "bench: pwrite to " + pwrite_path + " failed: " + std::strerror(err),
                       error_code_for_write_errno(err));
          }
        }
        if (config.sync == SyncPolicy::kEveryAppend) ::fdatasync(fd);
      } else {
        const std::uint64_t bytes = n * store_row_bytes;
        if (memory_offset + bytes > memory.size()) memory_offset = 0;
        std::memcpy(memory.data() + memory_offset, batch.data(), bytes);
        std::atomic_signal_fence(std::memory_order_seq_cst);
        memory_offset += bytes;
      }
      const std::int64_t t1 = now_ns();
      latencies.push_back(static_cast<std::uint32_t>(std::min<std::int64_t>(t1 - t0, UINT32_MAX)));
      done += n;
      shared->rows_done.fetch_add(n, std::memory_order_relaxed);
      if (t1 >= deadline) break;
    }
    if (writer) {
      // Part of the phase: close() finishes a key index growth in progress and any last sync.
      const std::int64_t close_start = now_ns();
      writer->close();
      atomic_max(shared->close_ns, now_ns() - close_start);
    }
    if (workload == Workload::kMemcpy && !memory.empty()) {
      volatile std::byte sink = memory[memory_offset / 2];
      (void)sink;
    }
    // The CPU window lies inside the wall-time window [start, end].
    shared->writer_cpu_ns.fetch_add(process_cpu_ns() - cpu_start);
    const std::int64_t end = now_ns();
    atomic_min(shared->first_start_ns, start);
    atomic_max(shared->last_end_ns, end);
    if (fd >= 0) ::close(fd);
    write_samples(latency_path, latencies);
    ::_exit(0);
  } catch (const std::exception& error) {
    fail_child(shared, error);
  }
}

// Body of one reader child: follows the store until told to stop and it has seen every row.
[[noreturn]] void reader_child(const std::string& store, const std::string& lag_path,
                               Shared* shared) {
  try {
    Reader reader = Reader::open(store);
    std::vector<std::uint32_t> lags;
    std::uint64_t seen = reader.size();
    std::uint64_t sink = 0;
    wait_for_go(shared);
    while (true) {
      const bool stopping = shared->stop_readers.load() != 0;
      reader.wait(seen + 1, std::chrono::milliseconds(20));
      const std::uint64_t size = reader.size();
      if (size > seen) {
        const std::int64_t now = now_ns();
        // The key of the newest row is when its append started: lag = now - that.
        const auto keys = reader.keys(size - 1, size);
        lags.push_back(static_cast<std::uint32_t>(
            std::clamp<std::int64_t>(now - static_cast<std::int64_t>(keys[0]), 0, UINT32_MAX)));
        // Consume what arrived: read every byte of the new rows (zero-copy).
        const RowsView view = reader.rows(seen, size);
        const auto* words = reinterpret_cast<const std::uint64_t*>(view.data);
        for (std::uint64_t i = 0; i < view.size_bytes() / 8; i += 8) sink += words[i];
        shared->reader_bytes.fetch_add(view.size_bytes(), std::memory_order_relaxed);
        seen = size;
      } else if (stopping) {
        break;
      }
    }
    volatile std::uint64_t keep = sink;
    (void)keep;
    write_samples(lag_path, lags);
    ::_exit(0);
  } catch (const std::exception& error) {
    fail_child(shared, error);
  }
}

struct PhaseResult {
  std::uint64_t rows = 0;
  double seconds = 0;
  Percentiles latency;
  Percentiles reader_lag;
  std::uint64_t reader_bytes = 0;
  double close_seconds = 0;       // The longest Writer::close() (embstore phases).
  double writer_cpu_seconds = 0;  // Shared::writer_cpu_ns.
  double rows_per_s() const { return seconds > 0 ? rows / seconds : 0; }
  // Writer CPU per row, and the processors the writers kept busy on average over the phase.
  double cpu_ns_per_row() const { return rows > 0 ? writer_cpu_seconds * 1e9 / rows : 0; }
  double cpus_busy() const { return seconds > 0 ? writer_cpu_seconds / seconds : 0; }
};

void progress(const Config& config, const char* what, std::int64_t start, std::uint64_t rows,
              std::uint64_t row_bytes, bool final_line) {
  if (config.quiet) return;
  const double s = (now_ns() - start) / 1e9;
  std::fprintf(stderr, "\r  %-8s %6.1fs %12llu rows %9.1f MB/s", what, s,
               static_cast<unsigned long long>(rows), s > 0 ? rows * row_bytes / s / 1e6 : 0.0);
  if (final_line) std::fputc('\n', stderr);
  std::fflush(stderr);
}

// Removes the warm-up file right before a phase starts, right after a free page reporting pass
// where the kernel makes them and the payload is large enough to start one
// (bench/page_reporting.h): the pages freed here then stay the VM's for ~2 s, longer than a
// phase of this tool at its default sizes. Returns the milliseconds that took.
double release_warm_file(const std::string& path, std::uint64_t bytes) {
  const auto start = now_ns();
  bench::wait_for_reporting_pass(bytes);
  ::unlink(path.c_str());
  return (now_ns() - start) / 1e6;
}

// `warm` (may be null): the warm-up file to remove right before the phase starts, and where to
// add the milliseconds that took (release_warm_file()).
struct WarmFile {
  std::string path;
  std::uint64_t bytes = 0;
  std::vector<double>* waited_ms = nullptr;
};

PhaseResult run_phase(const Config& config, Workload workload, int writers, int readers,
                      const std::string& work_dir, const std::string& store,
                      std::uint64_t total_rows, const WarmFile* warm) {
  // A stop signal ends the run (interrupted_error(): main() exits 128 + its number), and
  // run_bench() removes the work directory on the way out.
  if (stop_requested()) throw interrupted_error();
  Shared* shared = map_shared();
  const std::string pwrite_path = work_dir + "/pwrite.data";
  if (is_pwrite(workload)) {
    const int fd = ::open(pwrite_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) throw Error(ErrorCode::kIO, "cannot create " + pwrite_path);
    if (workload == Workload::kPwritePrealloc) {
      const std::uint64_t bytes =
          total_rows * std::uint64_t{config.dim} * dtype_size(config.store_dtype);
      const int err = bytes > 0 ? ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)) : 0;
      if (err != 0) {
        ::close(fd);
        throw Error(error_code_for_write_errno(err), "cannot preallocate " + std::to_string(bytes) +
                                                         " bytes for " + pwrite_path + ": " +
                                                         std::strerror(err));
      }
    }
    ::close(fd);
  }
  std::fflush(nullptr);
  std::vector<pid_t> pids;
  auto spawn = [&](auto&& body) {
    const pid_t pid = ::fork();
    if (pid < 0) throw Error(ErrorCode::kIO, "fork failed");
    if (pid == 0) {
      // A child dies of Ctrl-C (its process group's SIGINT) as it would without the parent's
      // handlers; the parent, told by its own, kills the rest and removes the work directory.
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM, SIG_DFL);
      body();
    }
    pids.push_back(pid);
  };
  for (int i = 0; i < writers; ++i) {
    const std::uint64_t quota = rows_for_writer(total_rows, writers, i);
    const std::string lat = work_dir + "/latency." + std::to_string(i);
    spawn([&] { writer_child(config, workload, i, store, pwrite_path, quota, lat, shared); });
  }
  std::vector<pid_t> reader_pids;
  for (int i = 0; i < readers; ++i) {
    const std::string lag = work_dir + "/lag." + std::to_string(i);
    spawn([&] { reader_child(store, lag, shared); });
    reader_pids.push_back(pids.back());
  }
  const int children = writers + readers;
  while (shared->ready.load() < children && shared->failed.load() == 0 && !stop_requested()) {
    ::usleep(200);
  }
  if (warm != nullptr) warm->waited_ms->push_back(release_warm_file(warm->path, warm->bytes));
  const char* name = workload_name(workload);
  const std::uint64_t row_bytes = std::uint64_t{config.dim} * dtype_size(config.store_dtype);
  const std::int64_t start = now_ns();
  start_phase(shared);
  int writers_left = writers;
  std::int64_t last_progress = start;
  bool failed = stop_requested();
  while (writers_left > 0 && !failed) {
    if (stop_requested()) {  // Ctrl-C or SIGTERM: every child is killed below.
      failed = true;
      break;
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      const bool is_reader =
          std::find(reader_pids.begin(), reader_pids.end(), pid) != reader_pids.end();
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed = true;
      if (!is_reader) --writers_left;
      if (failed) break;
      continue;
    }
    ::usleep(2000);
    if (now_ns() - last_progress > 500'000'000) {
      last_progress = now_ns();
      progress(config, name, start, shared->rows_done.load(), row_bytes, false);
    }
  }
  shared->stop_readers.store(1);
  for (pid_t pid : pids) {
    if (failed) ::kill(pid, SIGKILL);
  }
  while (true) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) break;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed = true;
  }
  if (stop_requested()) {
    ::munmap(shared, sizeof(Shared));
    throw interrupted_error();
  }
  if (failed || shared->failed.load()) {
    const std::string message = shared->error[0] ? shared->error : "a child process failed";
    const ErrorCode code = shared->error[0] ? shared->error_code : ErrorCode::kIO;
    ::munmap(shared, sizeof(Shared));
    throw Error(code, std::string(name) + " phase: " + message);
  }
  PhaseResult result;
  result.rows = shared->rows_done.load();
  result.seconds = (shared->last_end_ns.load() - shared->first_start_ns.load()) / 1e9;
  result.close_seconds = shared->close_ns.load() / 1e9;
  result.writer_cpu_seconds = shared->writer_cpu_ns.load() / 1e9;
  progress(config, name, start, result.rows, row_bytes, true);
  std::vector<std::uint32_t> all;
  for (int i = 0; i < writers; ++i) {
    auto s = read_samples(work_dir + "/latency." + std::to_string(i));
    all.insert(all.end(), s.begin(), s.end());
  }
  result.latency = percentiles(std::move(all));
  all.clear();
  for (int i = 0; i < readers; ++i) {
    auto s = read_samples(work_dir + "/lag." + std::to_string(i));
    all.insert(all.end(), s.begin(), s.end());
  }
  result.reader_lag = percentiles(std::move(all));
  result.reader_bytes = shared->reader_bytes.load();
  ::munmap(shared, sizeof(Shared));
  if (is_pwrite(workload)) std::remove(pwrite_path.c_str());
  return result;
}

// Bytes allocated to the files of `dir` whose names start with `prefix` (all: "").
std::uint64_t disk_bytes(const std::string& dir, const std::string& prefix = "") {
  std::uint64_t total = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir, ec)) {
    struct stat st;
    if (entry.path().filename().string().rfind(prefix, 0) == 0 &&
        ::lstat(entry.path().c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      total += static_cast<std::uint64_t>(st.st_blocks) * 512;
    }
  }
  return total;
}

// Puts the page cache in the same state before every phase: writes `bytes` into a scratch file
// of `dir`, which run_phase() removes right before the phase starts (release_warm_file()), so
// the phase's page cache comes from pages freed a moment ago, as on a machine whose page cache
// recycles itself. Without it, a phase that starts seconds after the last large free writes into
// memory the VM host has taken back (free page reporting, this kernel's page_reporting module)
// and pays for the host faulting it in again at first touch: up to 5-8x slower, measured by `dd`
// (bench/RESULTS.md, "Same state before every phase"). Anonymous memory touched and freed does
// not do it: the page cache's large folios are carved from the freed high-order blocks the host
// takes back, which anonymous pages are not. Returns the milliseconds the write took.
double warm_page_cache(const std::string& path, std::uint64_t bytes) {
  const auto start = now_ns();
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throw Error(ErrorCode::kIO, "cannot create " + path + ": " + std::strerror(errno));
  std::vector<std::byte> chunk(std::size_t{8} << 20, std::byte{1});
  std::uint64_t done = 0;
  int err = 0;
  while (done < bytes && err == 0) {
    const std::size_t n =
        static_cast<std::size_t>(std::min<std::uint64_t>(chunk.size(), bytes - done));
    const ssize_t w = ::pwrite(fd, chunk.data(), n, static_cast<off_t>(done));
    if (w <= 0) err = w < 0 ? errno : EIO;
    done += w > 0 ? static_cast<std::uint64_t>(w) : 0;
  }
  ::close(fd);
  if (err != 0) {
    ::unlink(path.c_str());
    throw Error(error_code_for_write_errno(err),
                "warming the page cache: writing " + path + ": " + std::strerror(err) +
                    " (--page-state as-is skips it)",
                err);
  }
  return (now_ns() - start) / 1e6;
}

struct RunResult {
  int writers = 0;
  PhaseResult store, pwrite, pwrite_prealloc, memcpy;  // Medians over the repeats.
  // Every repeat, in order (misses kept): repeat r of each workload ran in the same shuffled
  // round, so store[r] / pwrite[r] is a same-run ratio.
  std::vector<PhaseResult> stores, pwrites, preallocs, memcpys;
  // The store's bytes on disk, and those of its key index (keys.*) among them: the bound
  // payload + 32 B/row + one segment is for the rest, the data and index files and the header.
  std::uint64_t disk = 0, key_index_disk = 0, payload = 0, segment_bytes = 0;
  std::string store_path;
  std::vector<double> warm_ms;            // warm_page_cache() before each phase, in the order run.
  std::vector<double> reporting_wait_ms;  // release_warm_file()'s wait, likewise.
};

double ratio(double a, double b) { return b > 0 ? a / b : 0; }

// The run whose rows/s is the median of `phases` (its latencies and lags go with it).
PhaseResult median_phase(std::vector<PhaseResult> phases) {
  std::sort(phases.begin(), phases.end(), [](const PhaseResult& a, const PhaseResult& b) {
    return a.rows_per_s() < b.rows_per_s();
  });
  return phases[phases.size() / 2];
}

// min / median / max of values over the repeats, and each of them in the order run.
struct Spread {
  double min = 0, median = 0, max = 0;
  std::vector<double> all;
};
Spread spread_of(std::vector<double> all) {
  Spread s;
  s.all = std::move(all);
  if (s.all.empty()) return s;
  std::vector<double> sorted = s.all;
  std::sort(sorted.begin(), sorted.end());
  s.min = sorted.front();
  s.max = sorted.back();
  const std::size_t n = sorted.size();
  s.median = n % 2 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
  return s;
}

// a[r] / b[r], the same repeat's phases.
Spread ratio_spread(const std::vector<PhaseResult>& a, const std::vector<PhaseResult>& b) {
  std::vector<double> all;
  for (std::size_t r = 0; r < a.size() && r < b.size(); ++r) {
    all.push_back(ratio(a[r].rows_per_s(), b[r].rows_per_s()));
  }
  return spread_of(std::move(all));
}

// Per repeat, how a workload at N writers scales against its own first run, over how `base`
// scales: (a[r] / a_first[r]) / (base[r] / base_first[r]). Against pwrite that is what embstore
// adds to (or takes from) the kernel's own behaviour when N processes write one file.
Spread scaling_over(const std::vector<PhaseResult>& a, const std::vector<PhaseResult>& a_first,
                    const std::vector<PhaseResult>& base,
                    const std::vector<PhaseResult>& base_first) {
  const Spread ours = ratio_spread(a, a_first);
  const Spread theirs = ratio_spread(base, base_first);
  std::vector<double> all;
  for (std::size_t r = 0; r < ours.all.size() && r < theirs.all.size(); ++r) {
    all.push_back(theirs.all[r] > 0 ? ours.all[r] / theirs.all[r] : 0);
  }
  return spread_of(std::move(all));
}

// Repeat `r` for one writer count: the embstore phase and the three baselines once each, in an
// order drawn from (r, writers), so none always runs first, or right after another's large free,
// on a machine whose memory or disk is cold.
void run_repeat(const Config& config, int r, RunResult& run, const std::string& work_dir) {
  const int writers = run.writers;
  const std::uint64_t row_bytes = std::uint64_t{config.dim} * dtype_size(config.store_dtype);
  const std::string path =
      work_dir + "/store-w" + std::to_string(writers) + "-r" + std::to_string(r);
  std::uint64_t rows = config.rows;
  // In duration mode the store's phase runs first and sets the row count; before it, the last
  // repeat's count is the best guess of its size.
  if (config.seconds > 0 && !run.stores.empty()) rows = run.stores.back().rows;
  WarmFile warm{work_dir + "/page-cache-warm-up", 0, &run.reporting_wait_ms};
  // Writes the warm-up file; the phase removes it (run_phase()).
  auto prepare = [&]() -> const WarmFile* {
    if (config.page_state != "warm") return nullptr;
    warm.bytes = rows * row_bytes;
    run.warm_ms.push_back(warm_page_cache(warm.path, warm.bytes));
    return &warm;
  };
  auto store_phase = [&] {
    const WarmFile* warmed = prepare();
    CreateOptions create;
    create.dim = config.dim;
    create.dtype = config.store_dtype;
    create.metadata = "{\"created_by\":\"embstore bench\"}";
    create.key_index = !config.no_key_index;
    create_store(path, create);
    run.segment_bytes = create.segment_bytes;
    run.stores.push_back(run_phase(config, Workload::kEmbstore, writers, config.readers, work_dir,
                                   path, rows, warmed));
    rows = run.stores.back().rows;
    if (r == 0) {
      run.payload = rows * row_bytes;
      run.disk = disk_bytes(path);
      run.key_index_disk = disk_bytes(path, "keys.");
      run.store_path = path;
    }
    if (!config.keep || r > 0) {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  auto baseline = [&](Workload workload, std::vector<PhaseResult>& results) {
    return [&, workload] {
      const WarmFile* warmed = prepare();
      results.push_back(run_phase(config, workload, writers, 0, work_dir, path, rows, warmed));
    };
  };
  std::function<void()> phases[] = {store_phase, baseline(Workload::kPwrite, run.pwrites),
                                    baseline(Workload::kPwritePrealloc, run.preallocs),
                                    baseline(Workload::kMemcpy, run.memcpys)};
  if (!config.baselines) {
    store_phase();
    return;
  }
  // Duration mode: the baselines need the row count the store reached, so it goes first.
  std::mt19937 rng(static_cast<unsigned>(r * 1000 + writers));
  std::shuffle(std::begin(phases) + (config.seconds > 0 ? 1 : 0), std::end(phases), rng);
  for (auto& phase : phases) phase();
}

// Runs every writer count `repeat` times, interleaved (repeat r of every count before repeat
// r + 1 of any), and keeps every repeat plus the median of each workload.
std::vector<RunResult> run_all(const Config& config, const std::string& work_dir) {
  std::vector<RunResult> runs(config.writers.size());
  for (std::size_t i = 0; i < runs.size(); ++i) runs[i].writers = config.writers[i];
  for (int r = 0; r < config.repeat; ++r) {
    std::vector<std::size_t> order(runs.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::mt19937 rng(static_cast<unsigned>(r + 1));
    std::shuffle(order.begin(), order.end(), rng);
    for (std::size_t i : order) run_repeat(config, r, runs[i], work_dir);
  }
  for (RunResult& run : runs) {
    run.store = median_phase(run.stores);
    if (config.baselines) {
      run.pwrite = median_phase(run.pwrites);
      run.pwrite_prealloc = median_phase(run.preallocs);
      run.memcpy = median_phase(run.memcpys);
    }
  }
  return runs;
}

// printf on stdout, through write_stdout(), so that a report that cannot be written is an error.
__attribute__((format(printf, 1, 2))) void printf_out(const char* format, ...) {
  std::va_list args;
  va_start(args, format);
  std::va_list again;
  va_copy(again, args);
  const int length = std::vsnprintf(nullptr, 0, format, args);
  va_end(args);
  std::string text(length > 0 ? length : 0, '\0');
  std::vsnprintf(text.data(), text.size() + 1, format, again);
  va_end(again);
  write_stdout(text);
}

// Keys in the order written (ordered_json), as the report has always printed them.
void print_json(const Config& config, const std::vector<RunResult>& runs, std::uint64_t row_bytes) {
  auto phase = [&](const PhaseResult& p) {
    return nlohmann::ordered_json{
        {"rows", p.rows},
        {"seconds", p.seconds},
        {"rows_per_s", p.rows_per_s()},
        {"mb_per_s", p.rows_per_s() * row_bytes / 1e6},
        {"latency_us",
         {{"p50", p.latency.p50_us}, {"p99", p.latency.p99_us}, {"max", p.latency.max_us}}},
        {"writer_cpu_ms", p.writer_cpu_seconds * 1e3},
        {"writer_cpu_ns_per_row", p.cpu_ns_per_row()}};
  };
  nlohmann::ordered_json out_runs = nlohmann::ordered_json::array();
  for (const RunResult& r : runs) {
    nlohmann::ordered_json run = {{"writers", r.writers}, {"embstore", phase(r.store)}};
    run["embstore"]["close_ms"] = r.store.close_seconds * 1e3;
    if (config.baselines) {
      run["pwrite"] = phase(r.pwrite);
      run["pwrite_prealloc"] = phase(r.pwrite_prealloc);
      run["memcpy"] = phase(r.memcpy);
      run["ratio_vs_pwrite"] = ratio(r.store.rows_per_s(), r.pwrite.rows_per_s());
      run["ratio_vs_pwrite_prealloc"] = ratio(r.store.rows_per_s(), r.pwrite_prealloc.rows_per_s());
      run["ratio_vs_memcpy"] = ratio(r.store.rows_per_s(), r.memcpy.rows_per_s());
    }
    run["ratio_vs_first_run"] = ratio(r.store.rows_per_s(), runs[0].store.rows_per_s());
    // Same-repeat ratios over every repeat, misses kept.
    auto spread = [](const Spread& s) {
      return nlohmann::ordered_json{
          {"min", s.min}, {"median", s.median}, {"max", s.max}, {"all", s.all}};
    };
    if (config.baselines) {
      run["ratio_vs_pwrite_repeats"] = spread(ratio_spread(r.stores, r.pwrites));
      run["ratio_vs_pwrite_prealloc_repeats"] = spread(ratio_spread(r.stores, r.preallocs));
    }
    run["ratio_vs_first_run_repeats"] = spread(ratio_spread(r.stores, runs[0].stores));
    if (config.baselines) {
      // The kernel's own scaling from the first writer count, and embstore's over it.
      run["pwrite_ratio_vs_first_run_repeats"] = spread(ratio_spread(r.pwrites, runs[0].pwrites));
      run["pwrite_prealloc_ratio_vs_first_run_repeats"] =
          spread(ratio_spread(r.preallocs, runs[0].preallocs));
      run["ratio_vs_first_run_over_pwrite_repeats"] =
          spread(scaling_over(r.stores, runs[0].stores, r.pwrites, runs[0].pwrites));
    }
    run["reader_lag_us"] = {{"count", r.store.reader_lag.count},
                            {"p50", r.store.reader_lag.p50_us},
                            {"p99", r.store.reader_lag.p99_us},
                            {"max", r.store.reader_lag.max_us}};
    run["reader_bytes"] = r.store.reader_bytes;
    run["bytes_on_disk"] = r.disk;
    run["payload_bytes"] = r.payload;
    run["key_index_bytes_on_disk"] = r.key_index_disk;
    run["bytes_on_disk_bound"] = r.payload + 32 * r.store.rows + r.segment_bytes;  // without it
    run["store"] = config.keep ? r.store_path : "";
    run["page_cache_warm_ms"] = r.warm_ms;
    run["page_reporting_wait_ms"] = r.reporting_wait_ms;
    out_runs.push_back(std::move(run));
  }
  const nlohmann::ordered_json out = {{"config",
                                       {{"batch", config.batch},
                                        {"dim", config.dim},
                                        {"dtype", config.dtype_text},
                                        {"rows", config.rows},
                                        {"seconds", config.seconds},
                                        {"readers", config.readers},
                                        {"sync", config.sync_text},
                                        {"key_index", !config.no_key_index},
                                        {"huge_pages", config.huge_pages},
                                        {"expected_rows", config.expected_rows},
                                        {"row_bytes", row_bytes},
                                        {"repeat", config.repeat},
                                        {"page_state", config.page_state},
                                        {"dir", config.dir}}},
                                      {"runs", out_runs}};
  write_stdout(out.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n");
}

// One line: a same-repeat ratio's min / median / max, then every repeat in the order run.
void print_spread(int writers, const char* what, const Spread& s) {
  printf_out("%-8d %-28s per repeat min %.2f median %.2f max %.2f (all:", writers, what, s.min,
             s.median, s.max);
  for (double v : s.all) printf_out(" %.2f", v);
  printf_out(")\n");
}

void print_table(const Config& config, const std::vector<RunResult>& runs,
                 std::uint64_t row_bytes) {
  printf_out(
      "embstore bench: batch %llu x dim %u x %s (%llu B/row), sync %s,%s %s, %s, median of %d "
      "interleaved repeats\n",
      static_cast<unsigned long long>(config.batch), config.dim, config.dtype_text.c_str(),
      static_cast<unsigned long long>(row_bytes), config.sync_text.c_str(),
      (std::string(config.no_key_index ? " no key index," : "") +
       (config.huge_pages ? " huge pages," : "") +
       (config.expected_rows != 0 ? " expected rows " + std::to_string(config.expected_rows) + ","
                                  : std::string()))
          .c_str(),
      tools::counted(config.readers, "reader").c_str(),
      config.seconds > 0 ? (std::to_string(config.seconds) + " s").c_str()
                         : tools::counted(config.rows, "row").c_str(),
      config.repeat);
  printf_out("%-8s %-10s %12s %10s %10s %10s %10s %9s %11s %9s\n", "writers", "workload", "rows/s",
             "MB/s", "p50 us", "p99 us", "max us", "x pwrite", "x pwrite-pre", "x memcpy");
  for (const RunResult& r : runs) {
    auto line = [&](const char* name, const PhaseResult& p, bool ratios) {
      printf_out("%-8d %-10s %12.0f %10.1f %10.1f %10.1f %10.1f", r.writers, name, p.rows_per_s(),
                 p.rows_per_s() * row_bytes / 1e6, p.latency.p50_us, p.latency.p99_us,
                 p.latency.max_us);
      if (ratios && config.baselines) {
        printf_out(" %9.2f %11.2f %9.2f", ratio(p.rows_per_s(), r.pwrite.rows_per_s()),
                   ratio(p.rows_per_s(), r.pwrite_prealloc.rows_per_s()),
                   ratio(p.rows_per_s(), r.memcpy.rows_per_s()));
      }
      printf_out("\n");
    };
    line("embstore", r.store, true);
    if (config.baselines) {
      line("pwrite", r.pwrite, false);
      line("pwrite-pre", r.pwrite_prealloc, false);
      line("memcpy", r.memcpy, false);
      print_spread(r.writers, "x pwrite", ratio_spread(r.stores, r.pwrites));
      print_spread(r.writers, "x pwrite-pre", ratio_spread(r.stores, r.preallocs));
    }
    if (config.readers > 0) {
      printf_out(
          "%-8d reader lag p50/p99/max %.1f / %.1f / %.1f us over %llu wakeups, "
          "%.1f MB read\n",
          r.writers, r.store.reader_lag.p50_us, r.store.reader_lag.p99_us,
          r.store.reader_lag.max_us, static_cast<unsigned long long>(r.store.reader_lag.count),
          r.store.reader_bytes / 1e6);
    }
    // What close() waits for besides releasing the files (Writer::close).
    std::string waits;
    if (!config.no_key_index) waits = "any key index growth in progress";
    if (config.sync != SyncPolicy::kNone) {
      waits += std::string(waits.empty() ? "" : ", then ") + "a last sync";
    }
    // Whether a phase computed or waited: CPU of the writer processes, every thread (the key
    // index's included), per row, and the processors they kept busy over the phase.
    printf_out("%-8d writers' CPU per row (the median phases): embstore %.0f ns, %.2f CPUs busy",
               r.writers, r.store.cpu_ns_per_row(), r.store.cpus_busy());
    if (config.baselines) {
      printf_out("; pwrite %.0f ns, %.2f; pwrite-pre %.0f ns, %.2f; memcpy %.0f ns, %.2f",
                 r.pwrite.cpu_ns_per_row(), r.pwrite.cpus_busy(),
                 r.pwrite_prealloc.cpu_ns_per_row(), r.pwrite_prealloc.cpus_busy(),
                 r.memcpy.cpu_ns_per_row(), r.memcpy.cpus_busy());
    }
    printf_out("\n");
    printf_out(
        "%-8d close(), the longest of the phase's writers: %.1f ms of the phase's %.1f ms%s\n",
        r.writers, r.store.close_seconds * 1e3, r.store.seconds * 1e3,
        waits.empty() ? "" : (" (it finishes " + waits + ")").c_str());
    printf_out(
        "%-8d bytes on disk %llu = payload %llu x %.3f: key index %llu, the rest %llu (bound: "
        "payload + 32 B/row + one segment = %llu)%s%s\n",
        r.writers, static_cast<unsigned long long>(r.disk),
        static_cast<unsigned long long>(r.payload), ratio(r.disk, r.payload),
        static_cast<unsigned long long>(r.key_index_disk),
        static_cast<unsigned long long>(r.disk - r.key_index_disk),
        static_cast<unsigned long long>(r.payload + 32 * r.store.rows + r.segment_bytes),
        config.keep ? ", kept at " : "", config.keep ? r.store_path.c_str() : "");
  }
  if (config.page_state == "warm") {
    std::vector<double> all, waits;
    for (const RunResult& r : runs) {
      all.insert(all.end(), r.warm_ms.begin(), r.warm_ms.end());
      waits.insert(waits.end(), r.reporting_wait_ms.begin(), r.reporting_wait_ms.end());
    }
    std::sort(all.begin(), all.end());
    std::sort(waits.begin(), waits.end());
    if (!all.empty()) {
      printf_out(
          "page cache warmed before each phase (a file of the phase's payload written, removed "
          "as the phase starts; --page-state as-is skips it): %zu times, %.0f / %.0f / %.0f ms "
          "min / median / max\n",
          all.size(), all.front(), all[all.size() / 2], all.back());
    }
    if (!waits.empty() && bench::page_reporting("passes") >= 0) {
      printf_out(
          "free page reporting pass waited for before removing it (payloads of max_waiting_mib or "
          "more): "
          "%.0f / %.0f / %.0f ms min / median / max\n",
          waits.front(), waits[waits.size() / 2], waits.back());
    }
  }
  if (runs.size() > 1) {
    printf_out("embstore throughput vs %s:", tools::counted(runs[0].writers, "writer").c_str());
    for (const RunResult& r : runs) {
      printf_out(" %d -> %.2fx", r.writers,
                 ratio(r.store.rows_per_s(), runs[0].store.rows_per_s()));
    }
    printf_out("\n");
    const std::string what = "x " + std::to_string(runs[0].writers) + " writer(s)";
    for (const RunResult& r : runs) {
      print_spread(r.writers, what.c_str(), ratio_spread(r.stores, runs[0].stores));
    }
    if (config.baselines) {
      // The same for the kernel alone (N processes pwrite() one file): the floor of embstore's
      // scaling on this machine. Then embstore's scaling over it, repeat by repeat: 1.00 means
      // embstore loses no more than the kernel does when writers are added.
      printf_out("pwrite throughput vs %s (the kernel alone, N processes writing one file):",
                 tools::counted(runs[0].writers, "writer").c_str());
      for (const RunResult& r : runs) {
        printf_out(" %d -> %.2fx", r.writers,
                   ratio(r.pwrite.rows_per_s(), runs[0].pwrite.rows_per_s()));
      }
      printf_out("\n");
      for (const RunResult& r : runs) {
        print_spread(r.writers, ("pwrite " + what).c_str(),
                     ratio_spread(r.pwrites, runs[0].pwrites));
        print_spread(r.writers, ("pwrite-pre " + what).c_str(),
                     ratio_spread(r.preallocs, runs[0].preallocs));
        print_spread(r.writers, (what + " over pwrite's").c_str(),
                     scaling_over(r.stores, runs[0].stores, r.pwrites, runs[0].pwrites));
      }
    }
  }
}

int run_bench(Config config) {
  finish_config(config);
  // Ctrl-C and SIGTERM stop the run: its children are killed and its work directory (the
  // phases' stores and files, gigabytes) removed, as the writing commands clean up (cli.h).
  install_work_stop_handlers();
  std::string tmpl = config.dir + "/embstore-bench-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) {
    throw Error(ErrorCode::kIO,
                "cannot create a directory under " + config.dir + ": " + std::strerror(errno));
  }
  const std::string work_dir = tmpl;
  const std::uint64_t row_bytes = std::uint64_t{config.dim} * dtype_size(config.store_dtype);
  std::vector<RunResult> runs;
  try {
    runs = run_all(config, work_dir);
  } catch (...) {
    if (!config.keep) {
      std::error_code ec;
      std::filesystem::remove_all(work_dir, ec);
    }
    throw;
  }
  if (!config.keep) {
    std::error_code ec;
    std::filesystem::remove_all(work_dir, ec);
  }
  if (config.json) {
    print_json(config, runs, row_bytes);
  } else {
    print_table(config, runs, row_bytes);
  }
  return 0;
}

}  // namespace

void add_bench_command(CLI::App& app, Registry& registry) {
  auto config = std::make_shared<Config>();
  CLI::App* cmd = app.add_subcommand(
      "bench", "Append/read throughput on this disk beside pwrite() and memcpy, in the same run");
  cmd->add_option("--writers", config->writers,
                  "Writer processes; a comma list runs each count in turn")
      ->delimiter(',')
      ->transform(unsigned_validator("a writer count"))
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  cmd->add_option("--readers", config->readers, "Reader processes following the store")
      ->transform(unsigned_validator("a reader count"))
      ->check(CLI::Range(0, 256))
      ->capture_default_str();
  cmd->add_option("--batch", config->batch, "Rows per append")
      ->transform(unsigned_validator("a row count"))
      ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 32))
      ->capture_default_str();
  cmd->add_option("--dim", config->dim, "Elements per row")
      ->transform(unsigned_validator("a dimension"))
      ->check(CLI::Range(1u, 1u << 24))
      ->capture_default_str();
  cmd->add_option("--dtype", config->dtype_text,
                  dtype_names() + "; or f32->f16 / f32->bf16 to append float32 into a 16-bit store")
      ->check(CLI::IsMember({"f32->f16", "f32->bf16"}) | dtype_validator())
      ->capture_default_str();
  // 1 to 2^40, the most rows a store holds: CLI::PositiveNumber named its range as 0 to DBL_MAX
  // written out in 300 digits.
  cmd->add_option("--rows", config->rows, "Total rows over all writers")
      ->transform(unsigned_validator("a row count"))
      ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 40))
      ->capture_default_str();
  cmd->add_option("--seconds", config->seconds, "Run for S seconds instead of a row count")
      ->check(CLI::Range(1e-3, 1e6));  // Its nanoseconds must fit a phase's int64 deadline.
  cmd->add_option(
         "--repeat", config->repeat,
         "Repeats; each runs every workload once in a fresh random order (writer counts "
         "interleaved too); reports medians and each same-repeat ratio's min / median / max")
      ->transform(unsigned_validator("a repeat count"))
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  cmd->add_option("--sync", config->sync_text, "Sync policy")
      ->check(CLI::IsMember({"none", "every", "interval"}))
      ->capture_default_str();
  cmd->add_option("--dir", config->dir, "Where the temporary store goes (default $TMPDIR or /tmp)");
  cmd->add_flag("--keep", config->keep, "Keep the store afterwards (its path is printed)");
  cmd->add_flag("--no-baselines", config->no_baselines, "Skip the pwrite/pwrite-pre/memcpy runs");
  cmd->add_flag("--no-key-index", config->no_key_index,
                "Create the store without a key index (lookups by key then scan), to see its cost");
  cmd->add_flag("--huge-pages", config->huge_pages,
                "Writers keep rows in 2 MiB page-cache pages (WriterOptions::huge_pages)");
  cmd->add_option("--expected-rows", config->expected_rows,
                  "Writers open with WriterOptions::expected_rows (the key index built for that "
                  "many rows at once, not grown to it; 0: no guess)")
      ->transform(unsigned_validator("a row count"))
      ->check(CLI::Range(std::uint64_t{0}, std::uint64_t{1} << 40));
  cmd->add_option("--page-state", config->page_state,
                  "Before each phase: warm (write a file of the phase's payload and remove it as "
                  "the phase starts, after a free page reporting pass where the kernel makes "
                  "them, so every phase starts from the same page cache state) or as-is")
      ->check(CLI::IsMember({"warm", "as-is"}))
      ->capture_default_str();
  cmd->add_flag("--json", config->json, "One JSON object on stdout instead of the table");
  cmd->add_flag("-q,--quiet", config->quiet, "No progress line on stderr");
  cmd->footer(
      "Appends to a fresh store from N writer processes while M reader processes follow it,\n"
      "then runs the same workload in the same run through pwrite() appending to a new file\n"
      "(pwrite), pwrite() into a file preallocated with posix_fallocate (pwrite-pre: how\n"
      "embstore writes large batches) and memcpy into private memory, and reports\n"
      "ratios. Row i of a batch has the key t + i, t the append's CLOCK_MONOTONIC time in ns:\n"
      "a new key for every row, as sample ids are in training (readers derive their lag from\n"
      "them); the epoch is the writer's number. A phase ends when its last writer's close()\n"
      "returns; close() finishes a key index growth in progress and, unless --sync none, a\n"
      "last sync: its time is reported, and so is the CPU time of the writer processes (all\n"
      "their threads, the kernel's work in their system calls included; not the kernel's own\n"
      "threads, such as writeback) per row, with the processors they kept busy: whether a\n"
      "phase computed or waited. Before each phase a file as large as its payload is written,\n"
      "and removed as the phase starts (--page-state warm): on a VM whose host takes freed\n"
      "memory back, a phase would otherwise pay the host's first-touch faults or not, by its\n"
      "timing. Where the kernel reports free pages to the host, the removal of a payload as\n"
      "large as its max_waiting_mib or more waits for a reporting pass first (at most 4 s),\n"
      "so that the next pass comes seconds later, after the phase. With several writer\n"
      "counts, each is reported against the first, repeat by repeat, for embstore and for\n"
      "pwrite() alone (N processes writing one file: the kernel's own scaling, the floor of\n"
      "embstore's), with embstore's scaling over pwrite's.\n\n"
      "Example: embstore bench --writers 1,2,4 --rows 100000 --json");
  registry.add(cmd, [config] { return run_bench(*config); });
}

}  // namespace embstore::cli
