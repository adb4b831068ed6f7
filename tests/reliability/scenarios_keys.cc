// Scenario 21: the key index under kill -9 (at its crash points and at random moments of runs
// that grow it) and with its files missing or damaged. After each: THE INVARIANT, which includes
// check_key_lookups (every committed (key, epoch) found at its row, nothing past the snapshot).
// Power-loss images (scenario 6) and every other scenario run the same lookup checks.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "harness.h"
#include "scenarios.h"

namespace embstore::torture {
namespace {

bool fail(const std::string& text) {
  std::fprintf(stderr, "FAIL: %s\n", text.c_str());
  return false;
}

// The current key index file of `store` ("" if none).
std::string key_index_path(const std::string& store) {
  std::string found;
  for (const auto& entry : std::filesystem::directory_iterator(store)) {
    const std::string name = entry.path().filename().string();
    // keys.<K>, not a build file (keys.build.<pid>.<n>, or keys.next of older libraries).
    if (name.rfind("keys.", 0) == 0 && name.find_first_not_of("0123456789", 5) == std::string::npos)
      found = entry.path().string();
  }
  return found;
}

// The key index file's chain_offset field (FORMAT.md, "key-header").
std::uint64_t chain_offset(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  f.seekg(72);
  std::uint64_t value = 0;
  f.read(reinterpret_cast<char*>(&value), sizeof(value));
  return value;
}

void overwrite(const std::string& path, std::uint64_t offset, const std::string& bytes) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Lookups through a Reader opened now (no writer has repaired anything): exact answers,
// whatever state the key index is in, or (damaged body) never a wrong row.
bool readers_answer(const std::string& store, const std::string& context, bool exact) {
  Reader r = Reader::open(store);
  bool ok = true;
  auto problem = [&](const std::string& text) { ok = fail(context + ": " + text); };
  if (exact) {
    check_key_lookups(r, problem);
  } else {
    const auto keys = r.keys(0, r.size());
    for (std::uint64_t row = 0; row < r.size(); ++row) {
      for (const KeyVersion& v : r.history(keys[row])) {
        if (v.row >= r.size() || keys[v.row] != keys[row]) problem("history returns a wrong row");
      }
    }
  }
  return ok;
}

}  // namespace

bool scenario_key_index(std::uint64_t seed) {
  Rng rng(seed);
  bool ok = true;
  // 1. kill -9 at the key index's crash points: while indexing after a publish, while building a
  //    larger generation, and just before switching to it. Writers bring 8-row batches of new
  //    keys, so the tables (1,024 slots at first) grow every few hundred batches.
  const std::uint64_t passes = scaled(3, 10);
  for (const std::string point :
       {"mid-key-index", "during-key-index-build", "before-key-index-switch"}) {
    for (std::uint64_t n = 1; n <= passes; ++n) {
      Setup s("keys-crash", rng.next());
      s.create(16384);
      const std::string what = point + ":" + std::to_string(n);
      const pid_t reader = s.start_reader();
      const pid_t victim =
          s.start_writer({"--batches", "1500", "--sync-every", "0"}, {"EMBSTORE_CRASH=" + what});
      const ExitStatus st = wait_child(victim);
      // A late pass of a point may never come before the writer's batches end.
      if (st.exited ? st.code != 0 : st.signal != SIGKILL) {
        ok = fail(what + ": writer ended with " + st.describe());
      }
      stat_add(st.exited ? "crash_points_not_reached" : "key_index_crash_kills");
      ok &= readers_answer(s.params().store, what + ", before any writer", true);
      const pid_t next = s.start_writer({"--batches", "300"});
      const ExitStatus st2 = wait_child(next);
      if (!st2.exited || st2.code != 0) ok = fail(what + ": next writer " + st2.describe());
      ok &= stop_child(reader, "reader");
      ok &= s.verify("key index crash " + what);
    }
  }

  // 2. kill -9 at random moments of two writers that keep growing the index.
  {
    Setup s("keys-kill9", rng.next());
    s.create(16384);
    const pid_t reader = s.start_reader();
    std::vector<pid_t> writers = {s.start_writer(), s.start_writer()};
    const std::uint64_t rounds = scaled(40, 25);
    for (std::uint64_t r = 0; r < rounds; ++r) {
      const std::size_t slot = rng.below(writers.size());
      sleep_us(rng.range(2000, 30000));
      ::kill(writers[slot], SIGKILL);
      const ExitStatus st = wait_child(writers[slot]);
      if (st.exited ? st.code != 0 : st.signal != SIGKILL) {
        ok = fail("key index kill -9: a writer died of " + st.describe());
      }
      stat_add("key_index_kill9_rounds");
      if (r % 8 == 7) ok &= readers_answer(s.params().store, "kill -9 round", true);
      writers[slot] = s.start_writer();
    }
    for (pid_t w : writers) ok &= stop_child(w, "writer");
    ok &= stop_child(reader, "reader");
    ok &= s.verify("key index kill -9");
  }

  // 3. Missing and damaged key index files: readers answer exactly (by scan) or, when the body
  //    is damaged, never wrongly; the next writer rebuilds (or rebuild_key_index() repairs).
  struct Damage {
    const char* name;
    bool exact_before_repair;  // Lookups stay exact (the reader refuses the file and scans).
  };
  for (const Damage d : {Damage{"missing", true}, Damage{"header", true}, Damage{"truncated", true},
                         Damage{"zeroed slots", false}, Damage{"garbage chain", false}}) {
    Setup s("keys-damage", rng.next());
    s.create(16384);
    const pid_t w = s.start_writer({"--batches", "300"});
    ok &= wait_child(w).exited;
    const std::string file = key_index_path(s.params().store);
    if (file.empty()) return fail("no key index file after a writer ran");
    const std::string name = d.name;
    if (name == "missing") {
      std::filesystem::remove(file);
    } else if (name == "header") {
      overwrite(file, 48, "\x13");
    } else if (name == "truncated") {
      std::filesystem::resize_file(file, 100);
    } else if (name == "zeroed slots") {
      overwrite(file, 4096, std::string(chain_offset(file) - 4096, '\0'));  // Every table.
    } else {
      std::string junk(4096, '\0');
      for (char& c : junk) c = static_cast<char>(rng.next());
      overwrite(file, chain_offset(file), junk);  // The chain records of the first 256 rows.
    }
    stat_add("key_index_damages");
    ok &= readers_answer(s.params().store, "damage " + name, d.exact_before_repair);
    if (!d.exact_before_repair) {
      Reader r = Reader::open(s.params().store);
      const VerifyReport report = r.verify();
      if (report.key_index_problems == 0 || report.bad_row_count != 0) {
        ok = fail(name + ": verify does not report the damaged key index (" +
                  std::to_string(report.key_index_problems) + " problems)");
      }
      Writer writer = Writer::open(s.params().store);
      writer.rebuild_key_index();
    }
    ok &= s.verify("key index damage " + name);
  }
  return ok;
}

}  // namespace embstore::torture
