// harness.h — the torture driver's shared pieces: seeded randomness, deterministic batch
// schedules, the ack log writers keep for the supervisor, child processes, summary figures and
// the invariant of README.md here.
//
// Every row the torture suite writes is derived from (writer, seq): key = writer << 40 | seq
// (support/payload.h), values = payload_for(key), epoch = the index of its batch. A writer's
// batch sizes come from Schedule(seed, writer, max_batch), so any process that knows the seed can
// tell where every batch of every writer starts and ends, and check all-or-nothing visibility
// from the rows alone.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "embstore/options.h"
#include "embstore/reader.h"

namespace embstore::torture {

// splitmix64: small, seedable, the same sequence in every process.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next();
  std::uint64_t below(std::uint64_t n) { return n == 0 ? 0 : next() % n; }
  // In [lo, hi].
  std::uint64_t range(std::uint64_t lo, std::uint64_t hi) { return lo + below(hi - lo + 1); }
  bool chance(double p) { return static_cast<double>(next() >> 11) * 0x1.0p-53 < p; }

 private:
  std::uint64_t state_;
};

std::uint64_t mix(std::uint64_t a, std::uint64_t b);

// The batches of one writer: batch i holds seqs [first_seq, first_seq + rows), epoch i.
class Schedule {
 public:
  struct Batch {
    std::uint64_t index = 0;
    std::uint64_t first_seq = 0;
    std::uint64_t rows = 0;
  };
  Schedule(std::uint64_t seed, std::uint64_t writer, std::uint32_t max_batch);
  Batch batch(std::uint64_t index);
  Batch containing(std::uint64_t seq);

 private:
  void extend_to_seq(std::uint64_t seq);
  Rng rng_;
  std::uint32_t max_batch_;
  std::vector<std::uint64_t> starts_{0};  // starts_[i] = first seq of batch i; one past the end.
};

// What every role needs to agree on.
struct Params {
  std::string store;
  std::string log_dir;
  std::uint64_t seed = 1;
  std::uint32_t dim = 16;
  std::uint32_t max_batch = 8;
};

// Ack log of one writer, <log_dir>/w<writer>.log, one write(2) per line (O_APPEND):
//   I <first_seq> <rows>   before append() (intent: these rows may now exist)
//   A <first_seq> <rows>   after append() returned (acked)
//   D <seq_end>            after sync() returned: every acked seq below seq_end is durable
class AckLog {
 public:
  AckLog(const std::string& log_dir, std::uint64_t writer);
  ~AckLog();
  AckLog(const AckLog&) = delete;
  AckLog& operator=(const AckLog&) = delete;
  void intent(std::uint64_t first_seq, std::uint64_t rows);
  void acked(std::uint64_t first_seq, std::uint64_t rows);
  void durable(std::uint64_t seq_end);

 private:
  void line(const std::string& text);
  int fd_ = -1;
};

struct WriterHistory {
  std::uint64_t attempted_end = 0;  // One past the largest seq any intent named.
  std::uint64_t durable_end = 0;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> acked;  // (first_seq, rows)
};
// Reads every w*.log in `log_dir`; a torn last line (writer killed mid-write) is ignored.
std::map<std::uint64_t, WriterHistory> read_logs(const std::string& log_dir);

// ---- Summary figures ---------------------------------------------------------------------
// Each process adds to its own counters; flush_stats() appends them to
// $EMBSTORE_STATS_DIR/stats.<pid> (nothing when unset). The summary sums every file.
void stat_add(const std::string& name, std::uint64_t value = 1);
void flush_stats();
std::map<std::string, std::uint64_t> read_stats(const std::string& dir);
// Prints the summary table; returns false if a must-be-zero figure is not zero, if a scenario
// started and never finished (killed, or its process crashed: counted when it starts), or if no
// scenario passed (an empty or missing stats directory).
bool print_summary(const std::map<std::string, std::uint64_t>& stats);
// A scenario that cannot run here (no mount permission, a sanitizer, no Python module) says why
// and returns true: counted as skipped, not passed. A part of one skipped likewise (the rest
// ran and passed).
void scenario_skipped(const std::string& why);
void scenario_part_skipped(const std::string& why);
// Whether scenario_skipped() was called since the last call of this (torture_main's run_one).
bool take_scenario_skipped();

// ---- Processes -----------------------------------------------------------------------------
// fork + exec of this same executable (/proc/self/exe) with `args`, plus `env` ("K=V") on top
// of the current environment. Counted in the summary.
pid_t spawn_self(const std::vector<std::string>& args, const std::vector<std::string>& env = {});
struct ExitStatus {
  bool exited = false;
  int code = -1;
  int signal = 0;
  std::string describe() const;
};
ExitStatus wait_child(pid_t pid);
std::vector<std::string> role_args(const std::string& role, const Params& p);

// ---- The invariant -----------------------------------------------------------------------
struct CheckOptions {
  // After a simulated power loss only durable acks are promised; otherwise every ack is.
  bool power_loss = false;
  // Append a fresh batch as writer `fresh_writer` and read it back (0: skip).
  std::uint64_t fresh_writer = 0;
};
struct CheckResult {
  std::vector<std::string> problems;
  std::uint64_t rows = 0;
  std::uint64_t acked_rows_lost = 0;
  std::uint64_t durable_rows_lost = 0;
  bool ok() const { return problems.empty(); }
};
// Opens the store (a Reader first, then a Writer, which recovers), verifies every row, checks
// every row against the ack logs and the schedules, and appends and reads back a fresh batch.
CheckResult check_invariant(const Params& p, const CheckOptions& options);
// Part of the invariant (scenario 21): every row is found at its row by key and (key, epoch),
// one by one and through find_many; epoch_rows count every row; unknown keys are not found.
void check_key_lookups(const Reader& reader,
                       const std::function<void(const std::string&)>& problem);

// Adds the figures of a check to the stats and prints its problems. Returns ok().
bool report_check(const CheckResult& result, const std::string& context);

// ---- Misc ----------------------------------------------------------------------------------
std::string make_temp_dir(const std::string& tag);  // mkdtemp under $TMPDIR (or /tmp)
void remove_all(const std::string& path);
void create_f32_store(const std::string& path, std::uint32_t dim, std::uint64_t segment_bytes);
std::string random_boot_id(Rng& rng);
void sleep_us(std::uint64_t us);  // Only to pick a random moment, never to wait for an event.
bool soak();                      // EMBSTORE_SOAK=1 or --soak
void set_soak(bool on);
// CI-sized count, times $EMBSTORE_TORTURE_SCALE, times soak_factor in soak mode.
std::uint64_t scaled(std::uint64_t ci, std::uint64_t soak_factor = 50);
bool under_sanitizer();
// Options for every open in the suite: map_bytes from $EMBSTORE_TORTURE_MAP_BYTES, else the
// library's 1 TiB default, except under TSan, whose address-space layout cannot hold several
// 1 TiB reservations at once (16 GiB there).
std::uint64_t torture_map_bytes();
WriterOptions wopts();
// wopts() without any sync but the ones asked for (SyncPolicy::kNone): for scenarios that need
// unsynced tails, as a power loss or reboot leaves them.
WriterOptions wopts_unsynced();
ReaderOptions ropts();

}  // namespace embstore::torture
