// Scenario 22: truncate while writers append and a reader holds views, with the truncating
// process killed -9 at random instants and at every crash point of the switch.
//
// The invariant, judged against a snapshot S of c rows taken just before each truncate to n <= c
// (README.md here): rows [0, n) keep their keys and payloads at their places; rows [n, c) of S are
// either all still at their places (the old store) or none of their keys is anywhere in the
// store (the new one), never a mix; a truncate that returned leaves the new one, and a killed one
// leaves the new one exactly when the generation moved on. Every row verifies and holds its
// key's payload, every batch is whole and contiguous, views taken before the truncate are
// unchanged (also after refresh()), and no writer fails.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "harness.h"
#include "platform/testing.h"
#include "scenarios.h"
#include "support/payload.h"

namespace embstore::torture {
namespace {

const char* const kTruncatePoints[] = {"truncate-copied",      "truncate-files-synced",
                                       "truncate-flag-stored", "truncate-flagged",
                                       "truncate-mid-switch",  "truncate-switched"};

bool fail(const std::string& text) {
  std::fprintf(stderr, "FAIL: %s\n", text.c_str());
  return false;
}

std::vector<std::uint64_t> keys_of(const Reader& r, std::uint64_t end) {
  const auto view = r.keys(0, end);
  std::vector<std::uint64_t> keys(end);
  for (std::uint64_t i = 0; i < end; ++i) keys[i] = view[i];
  return keys;
}

// Every row verifies and holds its key's payload; every batch (Schedule) is whole and in order,
// except one that a truncate cut: its rows end at one of `cuts`.
bool rows_sound(const Params& p, const Reader& r, const std::set<std::uint64_t>& cuts,
                const std::string& context) {
  const std::uint64_t size = r.size();
  if (const VerifyReport report = r.verify(); !report.ok()) {
    return fail(context + ": verify found " + std::to_string(report.bad_row_count) + " bad rows");
  }
  const std::vector<std::uint64_t> keys = keys_of(r, size);
  std::set<std::uint64_t> seen;
  std::map<std::uint64_t, Schedule> schedules;  // Per writer: each extends once, not per batch.
  for (std::uint64_t row = 0; row < size;) {
    const std::uint64_t key = keys[row];
    if (!seen.insert(key).second)
      return fail(context + ": key appears twice at row " + std::to_string(row));
    if (!test::payload_matches(key, p.dim, r.record(row).data)) {
      return fail(context + ": row " + std::to_string(row) + " does not hold its key's payload");
    }
    const std::uint64_t writer = test::key_writer(key);
    auto it = schedules.find(writer);
    if (it == schedules.end()) {
      it = schedules.emplace(writer, Schedule(p.seed, writer, p.max_batch)).first;
    }
    const Schedule::Batch batch = it->second.containing(test::key_seq(key));
    if (batch.first_seq != test::key_seq(key)) {
      return fail(context + ": row " + std::to_string(row) + " does not start a batch");
    }
    std::uint64_t i = 1;
    for (; i < batch.rows && row + i < size && keys[row + i] == key + i; ++i) {
      seen.insert(key + i);
      if (!test::payload_matches(key + i, p.dim, r.record(row + i).data)) {
        return fail(context + ": row " + std::to_string(row + i) + " has a wrong payload");
      }
    }
    if (i < batch.rows && cuts.count(row + i) == 0) {
      return fail(context + ": the batch at row " + std::to_string(row) + " is not whole");
    }
    row += i;
  }
  return true;
}

// Runs Writer::truncate(n) in a forked child: killed at `point` (mode 2), killed from here at a
// random instant (mode 1), or to the end (mode 0). Returns true if the truncate returned.
bool run_truncator(const std::string& store, std::uint64_t n, int mode, const char* point, Rng& rng,
                   bool& ok) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    int code = 0;
    try {
      if (mode == 2) detail::testing::arm_crash(point, 1);
      Writer w = Writer::open(store, wopts_unsynced());
      w.truncate(n);
      w.close();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "truncator: %s\n", e.what());
      code = 2;
    }
    ::_exit(code);
  }
  if (mode == 1) {
    sleep_us(rng.range(0, 4000));
    ::kill(pid, SIGKILL);
  }
  const ExitStatus st = wait_child(pid);
  if (st.exited && st.code == 0) return true;
  if (st.exited || st.signal != SIGKILL || mode == 0) {
    ok = fail(std::string("truncator ended with ") + st.describe());
  }
  stat_add("truncate_kills");
  return false;
}

}  // namespace

bool scenario_truncate(std::uint64_t seed) {
  Rng rng(seed);
  bool ok = true;
  Setup s("truncate", rng.next());
  s.create(16384);  // Small segments: the copies cross growth steps.
  const Params& p = s.params();
  std::vector<pid_t> writers = {s.start_writer(), s.start_writer()};
  const std::uint64_t rounds = scaled(24, 10);
  const std::uint64_t ceiling = scaled(200000, 5);  // Rows above which a round cuts deep.
  std::set<std::uint64_t> cuts;  // Where truncates that took effect cut the store.
  for (std::uint64_t round = 0; round < rounds && ok; ++round) {
    sleep_us(rng.range(2000, 15000));
    Reader judged = Reader::open(p.store, ropts());
    const std::uint64_t c = judged.size();
    const std::uint64_t generation = judged.info().generation;
    const std::vector<std::uint64_t> before = keys_of(judged, c);
    const auto view = judged.keys(0, c);  // Must stay as it is across the switch.
    // Mostly a cut in the last third (a resumed epoch), sometimes anywhere, sometimes nothing.
    // Above the ceiling always a deep cut: each round's checks take time in proportion to the
    // rows, and the writers append all that time, so an uncut store grows geometrically round
    // after round (3.7M rows and a timeout by round 11 under ASan).
    const std::uint64_t n = c > ceiling       ? rng.below(ceiling / 2 + 1)
                            : rng.chance(0.1) ? c
                            : rng.chance(0.7) ? c - rng.below(c / 3 + 1)
                                              : rng.below(c + 1);
    int mode = static_cast<int>(rng.below(3));
    const char* point = kTruncatePoints[rng.below(std::size(kTruncatePoints))];
    // Above the ceiling the deep cut must also take effect: a truncate killed before its switch
    // leaves the store as it was, and two such rounds in a row let it grow geometrically again
    // (1.1M rows by round 8 and a timeout under TSan, seed 7632466514601804).
    if (c > ceiling) mode = 0;
    const std::string context = "round " + std::to_string(round) + " (truncate " +
                                std::to_string(c) + " -> " + std::to_string(n) +
                                (mode == 0   ? ", to the end"
                                 : mode == 1 ? ", killed"
                                             : ", at ") +
                                (mode == 2 ? point : "") + ")";
    const bool returned = run_truncator(p.store, n, mode, point, rng, ok);
    stat_add(returned ? "truncates_completed" : "truncates_killed");

    Reader after = Reader::open(p.store, ropts());
    if (after.size() < n) {
      ok = fail(context + ": " + std::to_string(after.size()) + " rows, fewer than kept");
      break;
    }
    const std::vector<std::uint64_t> now = keys_of(after, after.size());
    for (std::uint64_t row = 0; row < n; ++row) {
      if (now[row] != before[row]) {
        ok = fail(context + ": kept row " + std::to_string(row) + " changed");
        break;
      }
    }
    bool old_state = after.size() >= c;
    for (std::uint64_t row = n; old_state && row < c; ++row) old_state = now[row] == before[row];
    const std::set<std::uint64_t> present(now.begin(), now.end());
    bool new_state = true;
    for (std::uint64_t row = n; new_state && row < c; ++row) {
      new_state = present.count(before[row]) == 0;
    }
    const bool moved = after.info().generation != generation;
    if (n < c) {
      if (old_state == new_state) ok = fail(context + ": neither the old store nor the new one");
      if (returned && !new_state) ok = fail(context + ": returned, but dropped rows remain");
      if (new_state != moved) ok = fail(context + ": the generation does not match the rows");
      stat_add(new_state ? "truncate_rounds_new" : "truncate_rounds_old");
      if (new_state) cuts.insert(n);
    }
    for (std::uint64_t row = 0; row < c; ++row) {
      if (view[row] != before[row]) {
        ok = fail(context + ": a view taken before the truncate changed at row " +
                  std::to_string(row));
        break;
      }
    }
    judged.refresh();
    if (judged.size() < n) ok = fail(context + ": the refreshed snapshot lost kept rows");
    for (std::uint64_t row = 0; row < c && ok; ++row) {
      if (view[row] != before[row]) ok = fail(context + ": a view changed after refresh()");
    }
    ok &= rows_sound(p, after, cuts, context);
    ok &= rows_sound(p, judged, cuts, context + ", the refreshed reader");
    stat_add("truncate_rounds");
    std::fprintf(stderr, "%s: %s, %llu rows after\n", context.c_str(),
                 new_state && n < c ? "new store" : "old store",
                 static_cast<unsigned long long>(after.size()));
  }
  for (pid_t w : writers) ok &= stop_child(w, "writer");
  {
    // A writer opened now finishes whatever a killed truncate left; then a fresh batch.
    Writer w = Writer::open(p.store, wopts());
    const std::uint64_t first = w.committed_rows();
    const std::vector<std::uint64_t> keys = {test::make_key(99, 0)};
    std::vector<float> values(p.dim);
    test::payload_for(keys[0], p.dim, values.data());
    if (w.append(keys, 0, std::span<const float>(values)) != first) {
      ok = fail("the fresh batch did not land at the end");
    }
    w.close();
  }
  Reader last = Reader::open(p.store, ropts());
  if (!last.verify().ok()) ok = fail("final verify");
  if (last.find(test::make_key(99, 0)) != std::optional<std::uint64_t>(last.size() - 1)) {
    ok = fail("the fresh batch is not found at the last row");
  }
  stat_add("rows_checked", last.size());
  return ok;
}

}  // namespace embstore::torture
