// embstore_torture — the reliability suite's one executable: supervisor and every role.
//
//   embstore_torture scenario <id> [--seed S] [--soak]   one scenario of README.md here (1..22)
//   embstore_torture all [--seed S] [--soak] [--only 1,6,8]  every scenario, then the summary
//   embstore_torture summary <stats-dir>                 sums the figures every process left there
//   embstore_torture reset-stats <stats-dir>
//   embstore_torture writer|reader|verifier|faultrun|memlimit|recover --store ... (roles)
//
// Figures go to $EMBSTORE_STATS_DIR (ctest sets it; `all` makes its own). A failing scenario
// prints its seed and the command that replays it.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <sstream>
#include <string>

#include "harness.h"
#include "roles.h"
#include "scenarios.h"

using namespace embstore::torture;

namespace {

std::uint64_t pick_seed(const Args& args) {
  if (args.has("seed")) return args.num("seed");
  if (const char* s = std::getenv("EMBSTORE_TORTURE_SEED")) return std::strtoull(s, nullptr, 0);
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32 | rd()) & ((1ull << 53) - 1);
}

bool run_one(const Scenario& sc, std::uint64_t seed) {
  std::printf("---- scenario %s: %s (seed %llu%s)\n", sc.id, sc.title,
              static_cast<unsigned long long>(seed), soak() ? ", soak" : "");
  std::fflush(stdout);
  // Counted before it runs, so that one killed meanwhile shows in the summary as unfinished.
  stat_add("scenarios_started");
  flush_stats();
  take_scenario_skipped();
  const auto start = std::chrono::steady_clock::now();
  bool ok = false;
  try {
    ok = sc.run(seed);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "scenario %s threw: %s\n", sc.id, e.what());
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const bool skipped = take_scenario_skipped();
  stat_add(!ok ? "scenarios_failed" : skipped ? "scenarios_skipped" : "scenarios_passed");
  if (ok && skipped) {
    std::printf("---- scenario %s skipped\n", sc.id);
  } else if (ok) {
    std::printf("---- scenario %s passed in %.1f s\n", sc.id, secs);
  } else {
    std::printf(
        "---- scenario %s FAILED (seed %llu). Replay: embstore_torture scenario %s --seed %llu%s\n",
        sc.id, static_cast<unsigned long long>(seed), sc.id, static_cast<unsigned long long>(seed),
        soak() ? " --soak" : "");
  }
  flush_stats();
  return ok;
}

const Scenario* find_scenario(const std::string& id) {
  for (const Scenario& sc : all_scenarios()) {
    if (id == sc.id) return &sc;
  }
  return nullptr;
}

int usage() {
  std::fprintf(stderr,
               "usage: embstore_torture scenario <1..22> [--seed S] [--soak]\n"
               "       embstore_torture all [--seed S] [--soak] [--only 1,2,...]\n"
               "       embstore_torture summary <stats-dir> | reset-stats <stats-dir>\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  // Every process of the suite (children inherit it) alternates its appends between the two
  // ways a writer writes rows and entries, so each scenario covers both whatever its batch
  // sizes. Set the variable to mapping or syscall to pin one.
  ::setenv("EMBSTORE_WRITE_PATH", "alternate", 0);
  const std::string cmd = argv[1];
  // Roles.
  if (cmd == "writer") return role_writer(parse_args(argc, argv, 2));
  if (cmd == "reader") return role_reader(parse_args(argc, argv, 2));
  if (cmd == "verifier") return role_verifier(parse_args(argc, argv, 2));
  if (cmd == "faultrun") return role_faultrun(parse_args(argc, argv, 2));
  if (cmd == "memlimit") return role_memlimit(parse_args(argc, argv, 2));
  if (cmd == "recover") return role_recover(parse_args(argc, argv, 2));
  if (cmd == "snapshot") return role_snapshot(parse_args(argc, argv, 2));
  if (cmd == "creator") return role_creator(parse_args(argc, argv, 2));

  if (cmd == "reset-stats" && argc == 3) {
    std::filesystem::remove_all(argv[2]);
    std::filesystem::create_directories(argv[2]);
    return 0;
  }
  if (cmd == "summary" && argc == 3) {
    return print_summary(read_stats(argv[2])) ? 0 : 1;
  }
  if (cmd == "scenario" && argc >= 3) {
    const Args args = parse_args(argc, argv, 3);
    if (args.has("soak")) set_soak(true);
    const Scenario* sc = find_scenario(argv[2]);
    if (sc == nullptr) return usage();
    return run_one(*sc, pick_seed(args)) ? 0 : 1;
  }
  if (cmd == "all") {
    const Args args = parse_args(argc, argv, 2);
    if (args.has("soak")) set_soak(true);
    std::string stats_dir;
    if (const char* d = std::getenv("EMBSTORE_STATS_DIR")) {
      stats_dir = d;
    } else {
      stats_dir = make_temp_dir("stats");
      ::setenv("EMBSTORE_STATS_DIR", stats_dir.c_str(), 1);
    }
    std::set<std::string> only;
    std::stringstream ss(args.get("only"));
    for (std::string id; std::getline(ss, id, ',');) {
      if (!id.empty()) only.insert(id);
    }
    const std::uint64_t seed = pick_seed(args);
    std::printf("embstore_torture all: seed %llu%s\n", static_cast<unsigned long long>(seed),
                soak() ? " (soak)" : "");
    bool ok = true;
    for (const Scenario& sc : all_scenarios()) {
      if (!only.empty() && only.count(sc.id) == 0) continue;
      ok &= run_one(sc, mix(seed, std::strtoull(sc.id, nullptr, 10)));
    }
    ok &= print_summary(read_stats(stats_dir));
    if (!std::getenv("EMBSTORE_KEEP_STATS") && args.get("stats-dir").empty()) {
      // Our own temporary stats directory.
      if (stats_dir.find("/embstore-stats-") != std::string::npos) remove_all(stats_dir);
    }
    return ok ? 0 : 1;
  }
  return usage();
}
