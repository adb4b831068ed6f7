// scenarios.h — the scenarios of README.md here, each run by the supervisor.
// Every scenario returns true when it held, and checks the invariant before returning.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "harness.h"

namespace embstore::torture {

// One scenario's working directory: a store, its ack logs, writer ids handed out in order.
class Setup {
 public:
  Setup(const std::string& tag, std::uint64_t seed, std::uint32_t dim = 16,
        std::uint32_t max_batch = 8);
  ~Setup();
  Setup(const Setup&) = delete;
  Setup& operator=(const Setup&) = delete;

  const Params& params() const { return p_; }
  const std::string& dir() const { return dir_; }
  std::uint64_t new_writer() { return next_writer_++; }
  void create(std::uint64_t segment_bytes);
  // Starts a writer process with its own new writer id.
  pid_t start_writer(const std::vector<std::string>& extra = {},
                     const std::vector<std::string>& env = {});
  pid_t start_reader(bool hammer = false, const std::vector<std::string>& env = {});
  // Runs the verifier process to the end: the invariant, plus a fresh batch.
  bool verify(const std::string& context, bool power_loss = false,
              const std::vector<std::string>& env = {});
  // With another store directory (a power-loss image) but the same logs, or those of
  // `log_dir` (a copy of them taken when the image's moment came).
  bool verify_store(const std::string& store, const std::string& context, bool power_loss,
                    const std::vector<std::string>& env, const std::string& log_dir = "");

 private:
  std::string dir_;
  Params p_;
  std::uint64_t next_writer_ = 1;
};

// Stops a child with SIGTERM and expects a clean exit 0.
bool stop_child(pid_t pid, const std::string& what);

using ScenarioFn = bool (*)(std::uint64_t seed);
struct Scenario {
  const char* id;
  const char* title;
  ScenarioFn run;
};
const std::vector<Scenario>& all_scenarios();

// Process-based scenarios (scenarios_proc.cc).
bool scenario_kill9(std::uint64_t seed);           // 1
bool scenario_crash_points(std::uint64_t seed);    // 2
bool scenario_growth(std::uint64_t seed);          // 3
bool scenario_recovery_crash(std::uint64_t seed);  // 4
bool scenario_stall(std::uint64_t seed);           // 5
bool scenario_power_loss(std::uint64_t seed);      // 6
bool scenario_full_disk(std::uint64_t seed);       // 7
bool scenario_faults(std::uint64_t seed);          // 8
bool scenario_memory(std::uint64_t seed);          // 9
bool scenario_sparse_full(std::uint64_t seed);     // 17
bool scenario_create_stress(std::uint64_t seed);   // 18
// In-process scenarios (scenarios_inproc.cc).
bool scenario_threads(std::uint64_t seed);     // 10 (and the threaded variant of 5)
bool scenario_capacity(std::uint64_t seed);    // 11
bool scenario_corruption(std::uint64_t seed);  // 12
bool scenario_fuzz_smoke(std::uint64_t seed);  // 13
bool scenario_python(std::uint64_t seed);      // 14
bool scenario_model(std::uint64_t seed);       // 15
// Many stores in one process (scenarios_many.cc).
bool scenario_many_stores(std::uint64_t seed);  // 19
// Scenario 16 (scenarios_counters.cc).
bool scenario_counters(std::uint64_t seed);  // 16
// Scenario 20 (scenarios_inproc.cc).
bool scenario_python_use(std::uint64_t seed);  // 20
// Key index scenario (scenarios_keys.cc).
bool scenario_key_index(std::uint64_t seed);  // 21
// Truncate under writers, readers and kills (scenarios_truncate.cc).
bool scenario_truncate(std::uint64_t seed);  // 22
// The checkers catch planted faults (scenarios_checks.cc).
bool scenario_checkers(std::uint64_t seed);  // 23

}  // namespace embstore::torture
