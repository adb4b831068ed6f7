#include "harness.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "embstore/embstore.h"
#include "support/payload.h"
#include "support/process.h"

extern char** environ;

namespace embstore::torture {

std::uint64_t Rng::next() {
  std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::uint64_t mix(std::uint64_t a, std::uint64_t b) {
  Rng r(a * 0x9e3779b97f4a7c15ull ^ (b + 0x632be59bd9b4e019ull));
  r.next();
  return r.next();
}

// ---- Schedule ------------------------------------------------------------------------------

Schedule::Schedule(std::uint64_t seed, std::uint64_t writer, std::uint32_t max_batch)
    : rng_(mix(seed, writer)), max_batch_(std::max<std::uint32_t>(max_batch, 1)) {}

void Schedule::extend_to_seq(std::uint64_t seq) {
  while (starts_.back() <= seq) starts_.push_back(starts_.back() + rng_.range(1, max_batch_));
}

Schedule::Batch Schedule::batch(std::uint64_t index) {
  while (starts_.size() <= index + 1) starts_.push_back(starts_.back() + rng_.range(1, max_batch_));
  return {index, starts_[index], starts_[index + 1] - starts_[index]};
}

Schedule::Batch Schedule::containing(std::uint64_t seq) {
  extend_to_seq(seq);
  auto it = std::upper_bound(starts_.begin(), starts_.end(), seq);
  const std::uint64_t index = static_cast<std::uint64_t>(it - starts_.begin()) - 1;
  return batch(index);
}

// ---- AckLog --------------------------------------------------------------------------------

AckLog::AckLog(const std::string& log_dir, std::uint64_t writer) {
  const std::string path = log_dir + "/w" + std::to_string(writer) + ".log";
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) throw std::runtime_error("cannot open ack log " + path);
}

AckLog::~AckLog() {
  if (fd_ >= 0) ::close(fd_);
}

void AckLog::line(const std::string& text) {
  // One write(2) per line: a writer killed by SIGKILL leaves whole lines or none.
  if (::write(fd_, text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
    throw std::runtime_error("short write to an ack log");
  }
}

void AckLog::intent(std::uint64_t first_seq, std::uint64_t rows) {
  line("I " + std::to_string(first_seq) + " " + std::to_string(rows) + "\n");
}
void AckLog::acked(std::uint64_t first_seq, std::uint64_t rows) {
  line("A " + std::to_string(first_seq) + " " + std::to_string(rows) + "\n");
}
void AckLog::durable(std::uint64_t seq_end) { line("D " + std::to_string(seq_end) + "\n"); }

std::map<std::uint64_t, WriterHistory> read_logs(const std::string& log_dir) {
  std::map<std::uint64_t, WriterHistory> out;
  DIR* dir = ::opendir(log_dir.c_str());
  if (dir == nullptr) return out;
  while (dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (name.size() < 6 || name[0] != 'w' || name.substr(name.size() - 4) != ".log") continue;
    const std::uint64_t writer = std::strtoull(name.c_str() + 1, nullptr, 10);
    WriterHistory& h = out[writer];
    std::ifstream in(log_dir + "/" + name);
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::size_t start = 0;
    while (true) {
      std::size_t end = all.find('\n', start);
      if (end == std::string::npos) break;  // A torn last line: the writer died writing it.
      std::istringstream ls(all.substr(start, end - start));
      start = end + 1;
      char kind = 0;
      std::uint64_t a = 0, b = 0;
      ls >> kind >> a;
      if (kind == 'I' || kind == 'A') ls >> b;
      if (kind == 'I') h.attempted_end = std::max(h.attempted_end, a + b);
      if (kind == 'A') h.acked.emplace_back(a, b);
      if (kind == 'D') h.durable_end = std::max(h.durable_end, a);
    }
  }
  ::closedir(dir);
  return out;
}

// ---- Stats ---------------------------------------------------------------------------------

namespace {
std::mutex g_stats_mutex;
std::map<std::string, std::uint64_t>& local_stats() {
  static std::map<std::string, std::uint64_t> stats;
  return stats;
}
bool g_soak = false;
}  // namespace

namespace {
std::atomic<bool> g_scenario_skipped{false};
}  // namespace

void scenario_skipped(const std::string& why) {
  std::printf("%s\n", why.c_str());
  g_scenario_skipped = true;
}

void scenario_part_skipped(const std::string& why) {
  std::printf("%s\n", why.c_str());
  stat_add("scenario_parts_skipped");
}

bool take_scenario_skipped() { return g_scenario_skipped.exchange(false); }

void stat_add(const std::string& name, std::uint64_t value) {
  std::lock_guard guard(g_stats_mutex);
  local_stats()[name] += value;
}

void flush_stats() {
  std::lock_guard guard(g_stats_mutex);
  const char* dir = std::getenv("EMBSTORE_STATS_DIR");
  auto& stats = local_stats();
  if (dir == nullptr || *dir == 0 || stats.empty()) {
    stats.clear();
    return;
  }
  std::string text;
  for (const auto& [k, v] : stats) text += k + " " + std::to_string(v) + "\n";
  const std::string path = std::string(dir) + "/stats." + std::to_string(::getpid());
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd >= 0) {
    ssize_t ignored = ::write(fd, text.data(), text.size());
    (void)ignored;
    ::close(fd);
  }
  stats.clear();
}

std::map<std::string, std::uint64_t> read_stats(const std::string& dir_path) {
  std::map<std::string, std::uint64_t> out;
  DIR* dir = ::opendir(dir_path.c_str());
  if (dir == nullptr) return out;
  while (dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (name.rfind("stats.", 0) != 0) continue;
    std::ifstream in(dir_path + "/" + name);
    std::string key;
    std::uint64_t value;
    while (in >> key >> value) out[key] += value;
  }
  ::closedir(dir);
  return out;
}

bool print_summary(const std::map<std::string, std::uint64_t>& stats) {
  auto get = [&](const char* k) -> std::uint64_t {
    auto it = stats.find(k);
    return it == stats.end() ? 0 : it->second;
  };
  struct Line {
    const char* key;
    const char* label;
  };
  const Line lines[] = {
      {"scenarios_started", "scenarios started"},
      {"scenarios_passed", "scenarios passed"},
      {"scenarios_failed", "scenarios failed"},
      {"scenarios_skipped", "scenarios skipped (what they need is missing here)"},
      {"scenario_parts_skipped", "parts of scenarios skipped (likewise)"},
      {"kill9_rounds", "kill -9 rounds"},
      {"crash_point_kills", "crash points x passes (SIGKILLs at a named point)"},
      {"crash_points_not_reached", "  children that ended before their point (15, 21)"},
      {"powerloss_images", "power-loss images opened"},
      {"faults_injected", "faults injected (I/O error countdown)"},
      {"fault_runs", "fault runs (op x n x once/forever)"},
      {"fault_runs_without_fault", "  of them met no fault (the op was not called n times)"},
      {"corrupt_inputs", "corrupt inputs tried"},
      {"fuzz_execs", "fuzz executions (libFuzzer)"},
      {"processes", "processes spawned"},
      {"threads", "threads started"},
      {"invariant_checks", "invariant checks"},
      {"rows_checked", "rows checked by the invariant"},
      {"rows_read_by_readers", "rows checked by concurrent readers"},
      {"model_steps", "model-based steps"},
      {"key_lookups_checked", "rows found by key lookups in the invariant"},
      {"key_index_crash_kills", "key index crash points x passes (SIGKILLs)"},
      {"key_index_kill9_rounds", "kill -9 rounds while the key index grows"},
      {"key_index_damages", "key index files removed or damaged"},
      {"checker_plants", "planted faults the checkers must report (and a control)"},
      {"acked_rows_lost", "acked rows lost (must be 0)"},
      {"durable_rows_lost", "durable rows lost (must be 0)"},
      {"torn_rows_seen", "torn rows ever seen by a reader (must be 0)"},
  };
  const std::uint64_t finished =
      get("scenarios_passed") + get("scenarios_failed") + get("scenarios_skipped");
  const std::uint64_t unfinished =
      get("scenarios_started") > finished ? get("scenarios_started") - finished : 0;
  std::printf("\n==== embstore reliability summary ====\n");
  for (const Line& l : lines) {
    std::printf("  %-52s %llu\n", l.label, static_cast<unsigned long long>(get(l.key)));
  }
  std::printf("  %-52s %llu\n", "scenarios that never finished (must be 0)",
              static_cast<unsigned long long>(unfinished));
  std::printf("======================================\n");
  if (get("scenarios_passed") == 0) {
    std::printf("no scenario passed: these figures prove nothing\n");
    return false;
  }
  return get("acked_rows_lost") == 0 && get("durable_rows_lost") == 0 &&
         get("torn_rows_seen") == 0 && get("scenarios_failed") == 0 && unfinished == 0;
}

// ---- Processes -----------------------------------------------------------------------------

pid_t spawn_self(const std::vector<std::string>& args, const std::vector<std::string>& env) {
  static const std::string self = [] {
    std::error_code ec;
    auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
    return p.string();
  }();
  std::vector<std::string> envs;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string entry = *e;
    const std::string key = entry.substr(0, entry.find('='));
    bool overridden = false;
    for (const auto& x : env) overridden |= x.substr(0, x.find('=')) == key;
    if (!overridden) envs.push_back(entry);
  }
  for (const auto& x : env) envs.push_back(x);
  std::vector<char*> argv, envp;
  argv.push_back(const_cast<char*>(self.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : envs) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  std::fflush(nullptr);
  // SIGTERM stays blocked from before the fork until a role that handles it has installed its
  // handler, so a stop request that races with the child's start-up is delivered, not fatal.
  sigset_t term, saved;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  ::pthread_sigmask(SIG_BLOCK, &term, &saved);
  pid_t pid = ::fork();
  if (pid == 0) {
    // /proc/self/exe: the very binary that runs, even if a rebuild replaced it on disk.
    ::execve("/proc/self/exe", argv.data(), envp.data());
    ::_exit(127);
  }
  ::pthread_sigmask(SIG_SETMASK, &saved, nullptr);
  if (pid < 0) throw std::runtime_error("fork failed");
  stat_add("processes");
  return pid;
}

std::string ExitStatus::describe() const {
  if (exited) return "exit code " + std::to_string(code);
  return "signal " + std::to_string(signal) + " (" + strsignal(signal) + ")";
}

ExitStatus wait_child(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw std::runtime_error("waitpid failed");
  }
  ExitStatus s;
  if (WIFEXITED(status)) {
    s.exited = true;
    s.code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    s.signal = WTERMSIG(status);
  }
  return s;
}

std::vector<std::string> role_args(const std::string& role, const Params& p) {
  return {role,
          "--store",
          p.store,
          "--log-dir",
          p.log_dir,
          "--seed",
          std::to_string(p.seed),
          "--dim",
          std::to_string(p.dim),
          "--max-batch",
          std::to_string(p.max_batch)};
}

// ---- The invariant -----------------------------------------------------------------------

// Every row's (key, epoch) is found at that row (keys are unique per row), one by one and in one
// find_many; epoch_rows partition the store; keys never appended are not found; nothing past the
// snapshot is ever returned.
void check_key_lookups(const Reader& reader,
                       const std::function<void(const std::string&)>& problem) {
  const std::uint64_t rows = reader.size();
  const auto keys = reader.keys(0, rows);
  const auto epochs = reader.epochs(0, rows);
  std::vector<std::uint64_t> all_keys(rows), all_epochs(rows);
  std::map<std::uint64_t, std::uint64_t> per_epoch;
  // One by one for up to 100,000 rows spread over the store; every row through find_many.
  const std::uint64_t step = rows / 100'000 + 1;
  for (std::uint64_t r = 0; r < rows; ++r) {
    all_keys[r] = keys[r];
    all_epochs[r] = epochs[r];
    ++per_epoch[epochs[r]];
    if (r % step != 0 && r + 1 != rows) continue;
    const auto pair = reader.find(keys[r], epochs[r]);
    const auto latest = reader.find(keys[r]);
    if (pair != std::optional<std::uint64_t>(r) || latest != std::optional<std::uint64_t>(r)) {
      problem("key lookup: row " + std::to_string(r) + " (key " + std::to_string(keys[r]) +
              ", epoch " + std::to_string(epochs[r]) + ") found at " +
              (pair ? std::to_string(*pair) : std::string("nothing")));
      return;
    }
  }
  std::vector<std::int64_t> found(rows);
  reader.find_many(all_keys, all_epochs, found);
  for (std::uint64_t r = 0; r < rows; ++r) {
    if (found[r] != static_cast<std::int64_t>(r)) {
      problem("key lookup: find_many puts row " + std::to_string(r) + " at " +
              std::to_string(found[r]));
      return;
    }
  }
  for (const auto& [epoch, count] : per_epoch) {
    if (reader.epoch_rows(epoch).size() != count) {
      problem("key lookup: epoch_rows(" + std::to_string(epoch) + ") does not list its " +
              std::to_string(count) + " rows");
    }
  }
  if (reader.find(test::make_key(999'999, 0)) ||
      reader.history(test::make_key(999'999, 1)).size()) {
    problem("key lookup: a key never appended is found");
  }
  stat_add("key_lookups_checked", rows);
}

CheckResult check_invariant(const Params& p, const CheckOptions& options) {
  CheckResult result;
  auto problem = [&](const std::string& text) {
    if (result.problems.size() < 50) result.problems.push_back(text);
  };
  stat_add("invariant_checks");
  // 1. The store opens, for reading before any writer recovered it, then for writing.
  std::uint64_t before_recovery = 0;
  std::uint64_t durable_before = 0;  // What the store's header says a completed sync covers.
  try {
    Reader early = Reader::open(p.store, ropts());
    before_recovery = early.size();
    durable_before = early.info(InfoDetail::kState).durable_rows;
    VerifyReport report = early.verify();
    if (report.bad_row_count != 0) {
      problem("a Reader opened before recovery hands out " + std::to_string(report.bad_row_count) +
              " rows that fail their checksum (first: row " +
              std::to_string(report.bad_rows.front()) + ")");
    }
  } catch (const Error& e) {
    problem(std::string("Reader::open before recovery failed: ") + e.what());
  }
  std::optional<Writer> writer;
  try {
    // No sync at close: the check reads back its fresh batch, and a thousand power-loss images
    // need not each be flushed to the device.
    writer.emplace(Writer::open(p.store, wopts_unsynced()));
  } catch (const Error& e) {
    problem(std::string("Writer::open (recovery) failed: ") + e.what());
    return result;
  }
  std::optional<Reader> reader;
  try {
    reader.emplace(Reader::open(p.store, ropts()));
  } catch (const Error& e) {
    problem(std::string("Reader::open after recovery failed: ") + e.what());
    return result;
  }
  const std::uint64_t rows = reader->size();
  result.rows = rows;
  if (options.power_loss && before_recovery != rows) {
    problem("a Reader before recovery saw " + std::to_string(before_recovery) +
            " rows but recovery kept " + std::to_string(rows));
  }
  // The store's own promise: rows it called durable survive a power cut.
  if (options.power_loss && rows < durable_before) {
    problem("the header called " + std::to_string(durable_before) +
            " rows durable, but after the power cut recovery kept " + std::to_string(rows));
  }
  if (!options.power_loss && before_recovery > rows) {
    problem("recovery dropped committed rows: " + std::to_string(before_recovery) + " -> " +
            std::to_string(rows));
  }
  // 2. verify passes.
  VerifyReport report = reader->verify();
  if (report.bad_row_count != 0) {
    problem("verify found " + std::to_string(report.bad_row_count) + " bad rows (first: row " +
            std::to_string(report.bad_rows.front()) + ")");
  }
  // A key index in use must agree with the offset index (check_key_lookups below checks the
  // answers, by index or by scan).
  if (report.key_index_problems != 0) {
    problem("verify of the key index after Writer::open: " + report.key_index_problem);
  }
  if (reader->dim() != p.dim) problem("dim changed to " + std::to_string(reader->dim()));

  // 3. Every row: checksum-valid, derived payload, attempted by its writer, no duplicate, and
  //    the store is a sequence of whole batches, each contiguous.
  auto logs = read_logs(p.log_dir);
  std::map<std::uint64_t, Schedule> schedules;
  std::map<std::uint64_t, std::set<std::uint64_t>> present;  // writer -> batch first seqs
  std::map<std::uint64_t, std::uint64_t> last_seq_end;
  std::set<std::uint64_t> seen_keys;
  std::uint64_t row = 0;
  while (row < rows) {
    Record rec;
    try {
      rec = reader->record(row);
    } catch (const Error& e) {
      problem(std::string("row ") + std::to_string(row) + ": " + e.what());
      ++row;
      continue;
    }
    const std::uint64_t w = test::key_writer(rec.key);
    const std::uint64_t seq = test::key_seq(rec.key);
    auto log = logs.find(w);
    if (log == logs.end()) {
      problem("row " + std::to_string(row) + " has key " + std::to_string(rec.key) + " of writer " +
              std::to_string(w) + ", which never existed");
      ++row;
      continue;
    }
    auto [it, inserted] = schedules.try_emplace(w, p.seed, w, p.max_batch);
    (void)inserted;
    const Schedule::Batch b = it->second.containing(seq);
    if (seq != b.first_seq) {
      problem("row " + std::to_string(row) + " (writer " + std::to_string(w) + " seq " +
              std::to_string(seq) + ") starts in the middle of batch " + std::to_string(b.index) +
              " [" + std::to_string(b.first_seq) + ", +" + std::to_string(b.rows) +
              "): a torn batch is visible");
    }
    if (b.first_seq + b.rows > log->second.attempted_end) {
      problem("row " + std::to_string(row) + ": writer " + std::to_string(w) +
              " never attempted batch " + std::to_string(b.index) + " (attempted up to seq " +
              std::to_string(log->second.attempted_end) + ")");
    }
    if (b.first_seq < last_seq_end[w]) {
      problem("row " + std::to_string(row) + ": writer " + std::to_string(w) + " seq " +
              std::to_string(seq) + " appears after seq " + std::to_string(last_seq_end[w]) +
              " (out of order or duplicated)");
    }
    // The whole batch must follow, contiguous and in order.
    const std::uint64_t expect_rows = b.first_seq + b.rows - seq;
    std::uint64_t i = 0;
    for (; i < expect_rows; ++i) {
      const std::uint64_t r = row + i;
      if (r >= rows) {
        problem("batch " + std::to_string(b.index) + " of writer " + std::to_string(w) +
                " is cut at the end of the store (row " + std::to_string(r) + ")");
        break;
      }
      Record x;
      try {
        x = i == 0 ? rec : reader->record(r);
      } catch (const Error& e) {
        problem(std::string("row ") + std::to_string(r) + ": " + e.what());
        break;
      }
      if (x.key != test::make_key(w, seq + i)) {
        problem("row " + std::to_string(r) + " holds key " + std::to_string(x.key) + ", not seq " +
                std::to_string(seq + i) + " of writer " + std::to_string(w) +
                ": batch not contiguous");
        break;
      }
      if (x.epoch != b.index) {
        problem("row " + std::to_string(r) + " has epoch " + std::to_string(x.epoch) +
                ", not its batch index " + std::to_string(b.index));
      }
      if (!test::payload_matches(x.key, p.dim, x.data)) {
        problem("row " + std::to_string(r) + " (key " + std::to_string(x.key) +
                ") does not hold its derived payload");
      }
      if (!seen_keys.insert(x.key).second) {
        problem("row " + std::to_string(r) + " duplicates key " + std::to_string(x.key));
      }
    }
    if (i == 0) i = 1;
    present[w].insert(b.first_seq);
    last_seq_end[w] = std::max(last_seq_end[w], b.first_seq + b.rows);
    row += i;
  }
  stat_add("rows_checked", rows);
  check_key_lookups(*reader, problem);

  // 4. Every acked (or, after power loss, every durable) batch is present.
  for (const auto& [w, h] : logs) {
    for (const auto& [first, n] : h.acked) {
      if (present[w].count(first) != 0) continue;
      const bool durable = first + n <= h.durable_end;
      if (durable) result.durable_rows_lost += n;
      if (!options.power_loss) result.acked_rows_lost += n;
      if (durable || !options.power_loss) {
        problem(std::string(durable ? "durable" : "acked") + " batch of writer " +
                std::to_string(w) + " seqs [" + std::to_string(first) + ", +" + std::to_string(n) +
                ") is missing");
      }
    }
  }

  // 5. The store accepts and reads back a fresh batch.
  if (options.fresh_writer != 0) {
    try {
      AckLog log(p.log_dir, options.fresh_writer);
      Schedule s(p.seed, options.fresh_writer, p.max_batch);
      const Schedule::Batch b = s.batch(0);
      std::vector<std::uint64_t> keys;
      for (std::uint64_t i = 0; i < b.rows; ++i) {
        keys.push_back(test::make_key(options.fresh_writer, b.first_seq + i));
      }
      const auto values = test::batch_payload(options.fresh_writer, b.first_seq, b.rows, p.dim);
      log.intent(b.first_seq, b.rows);
      const std::uint64_t first = writer->append(keys, b.index, values);
      log.acked(b.first_seq, b.rows);
      reader->refresh();
      if (reader->size() < first + b.rows) {
        problem("a fresh batch appended at row " + std::to_string(first) + " is not visible");
      } else {
        for (std::uint64_t i = 0; i < b.rows; ++i) {
          Record x = reader->record(first + i);
          if (x.key != keys[i] || !test::payload_matches(x.key, p.dim, x.data)) {
            problem("the fresh batch reads back wrong at row " + std::to_string(first + i));
          }
        }
      }
    } catch (const Error& e) {
      problem(std::string("the store refuses a fresh batch: ") + e.what());
    }
  }
  return result;
}

bool report_check(const CheckResult& result, const std::string& context) {
  stat_add("acked_rows_lost", result.acked_rows_lost);
  stat_add("durable_rows_lost", result.durable_rows_lost);
  for (const auto& p : result.problems)
    std::fprintf(stderr, "INVARIANT [%s]: %s\n", context.c_str(), p.c_str());
  return result.ok();
}

// ---- Misc ----------------------------------------------------------------------------------

std::string make_temp_dir(const std::string& tag) {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/embstore-" + tag + "-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed: " + tmpl);
  return tmpl;
}

void remove_all(const std::string& path) {
  std::error_code ignored;
  std::filesystem::remove_all(path, ignored);
}

void create_f32_store(const std::string& path, std::uint32_t dim, std::uint64_t segment_bytes) {
  CreateOptions o;
  o.dim = dim;
  o.dtype = DType::kFloat32;
  o.segment_bytes = segment_bytes;
  o.metadata = R"({"suite":"reliability"})";
  create_store(path, o);
}

std::string random_boot_id(Rng& rng) {
  char buf[64];
  const std::uint64_t a = rng.next(), b = rng.next();
  std::snprintf(
      buf, sizeof(buf), "%08llx-%04llx-%04llx-%04llx-%012llx",
      static_cast<unsigned long long>(a >> 32), static_cast<unsigned long long>((a >> 16) & 0xffff),
      static_cast<unsigned long long>(a & 0xffff), static_cast<unsigned long long>(b >> 48),
      static_cast<unsigned long long>(b & 0xffffffffffffull));
  return buf;
}

void sleep_us(std::uint64_t us) { std::this_thread::sleep_for(std::chrono::microseconds(us)); }

bool soak() {
  static const bool env = [] {
    const char* s = std::getenv("EMBSTORE_SOAK");
    return s != nullptr && *s != 0 && std::string(s) != "0";
  }();
  return env || g_soak;
}
void set_soak(bool on) { g_soak = on; }

std::uint64_t scaled(std::uint64_t ci, std::uint64_t soak_factor) {
  // EMBSTORE_TORTURE_SCALE shrinks (or grows) the CI sizes, e.g. 0.5 for sanitizer builds.
  const auto base =
      std::max<std::uint64_t>(1, static_cast<std::uint64_t>(ci * test::torture_scale() + 0.5));
  return soak() ? base * soak_factor : base;
}

bool under_sanitizer() {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
  return true;
#else
  return false;
#endif
#else
  return false;
#endif
}

std::uint64_t torture_map_bytes() {
  if (const char* s = std::getenv("EMBSTORE_TORTURE_MAP_BYTES"))
    return std::strtoull(s, nullptr, 0);
#if defined(__SANITIZE_THREAD__)
  return 16ull << 30;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
  return 16ull << 30;
#endif
#endif
  return kDefaultMapBytes;
}

WriterOptions wopts() {
  WriterOptions o;
  o.map_bytes = torture_map_bytes();
  return o;
}

WriterOptions wopts_unsynced() {
  WriterOptions o = wopts();
  o.sync = SyncPolicy::kNone;
  return o;
}

ReaderOptions ropts() {
  ReaderOptions o;
  o.map_bytes = torture_map_bytes();
  return o;
}

}  // namespace embstore::torture
