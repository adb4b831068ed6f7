// kill -9 of a writer at random moments while other writers and a reader run
// (tests/reliability/README.md, scenario 1): no acknowledged row is lost, no torn batch is ever
// visible, and the store reopens and accepts appends with no manual step.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "embstore/embstore.h"
#include "platform/testing.h"
#include "support/checker.h"
#include "support/payload.h"
#include "support/process.h"
#include "support/temp_dir.h"
#include "writer_internals.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

constexpr std::uint32_t kDim = 16;

struct Ack {
  std::uint64_t writer;
  std::uint64_t batches;  // batches acknowledged so far by this writer
};

// Appends batches until `batches` are done (forever if negative), reporting each one after
// append() returned. Every other writer keeps its rows in 2 MiB pages (WriterOptions::huge_pages:
// its writes carry zeros past its rows, log/commit.cc), the others do not; writers 0 and 1 of every
// four leave the indexing of every batch to their indexer thread while they look alone (writer.cc,
// kIndexLaterMinBytes), the others only of batches of 1 MiB (none here).
int writer_role(const std::string& path, std::uint64_t writer, int batches,
                const test::Pipe& acks) {
  WriterOptions options;
  options.huge_pages = writer % 2 == 1;
  Writer w = Writer::open(path, options);
  if (writer % 4 < 2) detail::WriterInternals::set_index_later_min_bytes(w, 0);
  const std::uint64_t n = test::batch_rows(writer);
  for (int b = 0; batches < 0 || b < batches; ++b) {
    const std::uint64_t seq = std::uint64_t(b) * n;
    const auto values = test::batch_payload(writer, seq, n, kDim);
    std::vector<std::uint64_t> keys(n);
    for (std::uint64_t i = 0; i < n; ++i) keys[i] = test::make_key(writer, seq + i);
    w.append(keys, 0, std::span<const float>(values));
    const Ack ack{writer, std::uint64_t(b) + 1};
    acks.send(&ack, sizeof(ack));
  }
  return 0;
}

}  // namespace

TEST_CASE("Writers killed at random moments lose nothing acknowledged", "[crash][multiprocess]") {
  TempDir dir;
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096;  // growth every 64 rows: kills land inside growth too
  create_store(path, o);

  const std::uint64_t seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const int rounds = test::scaled_rounds(30);
  constexpr int kWriters = 3, kBatches = 400;
  std::map<std::uint64_t, std::uint64_t> acked;  // writer -> batches acknowledged
  std::uint64_t kills = 0;

  for (int round = 0; round < rounds; ++round) {
    test::Pipe acks;
    const std::string stop_file = dir / ("stop." + std::to_string(round));
    const pid_t reader = test::spawn([&] {
      // Checks every row as it becomes visible, until the round ends.
      Reader r = Reader::open(path);
      for (;;) {
        const bool stopping = ::access(stop_file.c_str(), F_OK) == 0;
        r.refresh();
        const VerifyReport report = r.verify(0, r.size());
        if (!report.ok()) {
          if (report.bad_rows.empty()) {
            std::fprintf(stderr, "reader: key index problem: %s\n",
                         report.key_index_problem.c_str());
          } else {
            std::fprintf(stderr, "reader saw bad row %llu\n",
                         static_cast<unsigned long long>(report.bad_rows.front()));
          }
          return 1;
        }
        if (stopping) return 0;
        r.wait(r.size() + 1, std::chrono::milliseconds(20));
      }
    });
    // The victim appends until it is killed: after a random number of its own acks, plus a
    // random few microseconds (so anywhere inside an append, growth included).
    const int victim = static_cast<int>(rng() % kWriters);
    std::vector<pid_t> pids;
    std::vector<std::uint64_t> ids;
    for (int w = 0; w < kWriters; ++w) {
      const std::uint64_t id = std::uint64_t(round) * kWriters + w;
      const int batches = w == victim ? -1 : kBatches;
      ids.push_back(id);
      pids.push_back(
          test::spawn([&, id, batches] { return writer_role(path, id, batches, acks); }));
    }
    const std::uint64_t kill_after = 1 + rng() % 100;
    for (;;) {
      const std::string rec = acks.receive(sizeof(Ack));
      REQUIRE(rec.size() == sizeof(Ack));
      Ack ack;
      std::memcpy(&ack, rec.data(), sizeof(ack));
      acked[ack.writer] = std::max(acked[ack.writer], ack.batches);
      if (ack.writer == ids[victim] && ack.batches >= kill_after) break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
    ::kill(pids[victim], SIGKILL);
    for (int w = 0; w < kWriters; ++w) {
      const int status = test::wait_for(pids[w]);
      if (w == victim) {
        REQUIRE(status == 128 + SIGKILL);
        ++kills;
      } else {
        REQUIRE(status == 0);
      }
    }
    test::run_shell("touch '" + stop_file + "'");
    REQUIRE(test::wait_for(reader) == 0);
    for (const std::string& rec : acks.drain(sizeof(Ack))) {
      Ack ack;
      std::memcpy(&ack, rec.data(), sizeof(ack));
      acked[ack.writer] = std::max(acked[ack.writer], ack.batches);
    }

    // The invariant, with the victim's unfinished batch as the only thing that may be missing.
    Writer w = Writer::open(path);  // recovery (none needed: same boot) must just work
    Reader r = Reader::open(path);
    test::StreamChecker checker(kDim);
    const std::string problem = checker.check(r, r.size());
    INFO("round " << round);
    REQUIRE(problem == "");
    REQUIRE(r.verify().ok());
    for (std::uint64_t id : ids) {
      const std::uint64_t rows_present =
          checker.next_seq().count(id) ? checker.next_seq().at(id) : 0;
      const std::uint64_t rows_acked = acked[id] * test::batch_rows(id);
      // Every acked row is there; at most the one batch in flight beyond the acks.
      REQUIRE(rows_present >= rows_acked);
      REQUIRE(rows_present <= rows_acked + test::batch_rows(id));
    }
    // The store accepts and reads back a fresh batch.
    const std::uint64_t fresh_writer = 1'000'000 + round;
    const std::uint64_t n = test::batch_rows(fresh_writer);
    const auto values = test::batch_payload(fresh_writer, 0, n, kDim);
    std::vector<std::uint64_t> keys(n);
    for (std::uint64_t i = 0; i < n; ++i) keys[i] = test::make_key(fresh_writer, i);
    const std::uint64_t first = w.append(keys, 0, std::span<const float>(values));
    REQUIRE(r.refresh() == first + n);
    REQUIRE(test::payload_matches(keys[0], kDim, r.rows().row(first)));
  }
  // Every victim was killed with hundreds of batches still to go.
  CHECK(kills == static_cast<std::uint64_t>(rounds));
  std::printf("crash_test: %d rounds, %llu writers killed, %zu writers, acked rows lost: 0\n",
              rounds, static_cast<unsigned long long>(kills), acked.size());
}

namespace {

// Directory entries a create leaves next to the store `s` while it works: staging directories
// and the create lock.
std::vector<std::string> create_leftovers(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename();
    if (name.starts_with("s.creating.") || name == "s.create-lock") names.push_back(name);
  }
  return names;
}

}  // namespace

TEST_CASE("A create killed at any point leaves nothing once the next create runs",
          "[crash][create]") {
  TempDir dir;
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = 8;
  o.segment_bytes = 1 << 20;
  for (const char* point : {"create-staged", "create-allocated", "create-before-rename"}) {
    INFO(point);
    const pid_t child = test::spawn([&] {
      detail::testing::arm_crash(point, 1);
      create_store(path, o);
      return 2;  // The crash point never fired.
    });
    REQUIRE(test::wait_for(child) == 128 + SIGKILL);
    // The killed creator left its staging directory and its lock file, and no more: the
    // earlier leftovers went when this create began.
    CHECK(create_leftovers(dir.path()).size() == 2);
  }
  create_store(path, o);
  CHECK(create_leftovers(dir.path()).empty());
  Writer w = Writer::open(path);
  CHECK(w.committed_rows() == 0);
}

TEST_CASE("A store is created in an empty mount point, and a create killed in one leaves nothing",
          "[crash][create]") {
  // rename(2) cannot replace a mount point (EBUSY): create failed on an empty mounted volume,
  // which the tool's import fills, with "Device or resource busy".
  TempDir dir;
  const std::string path = dir / "s";
  std::filesystem::create_directory(path);
  const test::MountedTmpfs tmpfs(path, "16m");
  if (!tmpfs.mounted()) {
    WARN("cannot mount tmpfs here (not root?): skipped");
    return;
  }
  const auto inside = [&] {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path)) {
      names.push_back(entry.path().filename());
    }
    return names;
  };
  CreateOptions o;
  o.dim = 8;
  o.segment_bytes = 1 << 20;
  for (const char* point : {"create-staged", "create-allocated", "create-before-rename"}) {
    INFO(point);
    const pid_t child = test::spawn([&] {
      detail::testing::arm_crash(point, 1);  // A mount point is filled from inside at once.
      create_store(path, o);
      return 2;  // The crash point never fired.
    });
    REQUIRE(test::wait_for(child) == 128 + SIGKILL);
    // The killed creator left its hidden directory inside the mount point (and its lock file
    // beside it); no store is there.
    const auto names = inside();
    REQUIRE(names.size() == 1);
    CHECK(names[0].starts_with(".creating."));
    CHECK_THROWS_AS(Reader::open(path), Error);
  }
  create_store(path, o);
  CHECK(create_leftovers(dir.path()).empty());
  auto names = inside();
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"header", "index.1", "lock", "rows.1"});
  {
    Writer w = Writer::open(path);
    const std::vector<float> values(8, 2.5f);
    w.append(std::vector<std::uint64_t>{7}, 1, values);
  }
  Reader r = Reader::open(path);
  REQUIRE(r.size() == 1);
  CHECK(r.record(0).key == 7);
  CHECK(r.verify().ok());
  // A mount point holding anything is refused, and left as it is.
  CHECK_THROWS_WITH(create_store(path, o), Catch::Contains("a store already exists"));
  std::filesystem::remove_all(path + "/header");
  const auto left = inside();
  try {
    create_store(path, o);
    FAIL("created over a non-empty directory");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kAlreadyExists);
    CHECK_THAT(e.what(), Catch::Contains("already exists and is not empty"));
  }
  CHECK(inside() == left);
}

TEST_CASE("Creates killed at random moments leave nothing once the next create runs",
          "[crash][create]") {
  TempDir dir;
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = 8;
  o.segment_bytes = 8 << 20;
  std::mt19937_64 rng(Catch::rngSeed());
  int leftovers_seen = 0;
  for (int round = 0; round < 10; ++round) {
    const pid_t child = test::spawn([&] {
      for (;;) {
        create_store(path, o);
        std::filesystem::remove_all(path);
      }
      return 0;
    });
    // A random moment, not a synchronisation: the kill lands wherever the child happens to be.
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 20000));
    ::kill(child, SIGKILL);
    CHECK(test::wait_for(child) == 128 + SIGKILL);
    leftovers_seen += create_leftovers(dir.path()).empty() ? 0 : 1;
    std::filesystem::remove_all(path);
  }
  create_store(path, o);
  CHECK(create_leftovers(dir.path()).empty());
  INFO("rounds whose kill left staging or lock files: " << leftovers_seen);
  CHECK(Writer::open(path).committed_rows() == 0);
}

TEST_CASE("A process forked while a create runs does not keep the create lock", "[create]") {
  // The create lock's descriptor was not closed in a forked child (a data-loader worker forked
  // by another thread, say), which then held the lock as long as it lived: a process that
  // waited for it, this test's own fork among them, waited as long.
  TempDir dir;
  const std::string path = dir / "s";
  const std::string pauses = dir / "pauses";
  std::filesystem::create_directory(pauses);
  CreateOptions o;
  o.dim = 8;
  o.segment_bytes = 1 << 20;
  detail::testing::arm_pause("create-staged", 1, pauses);
  std::thread creator([&] { create_store(path, o); });
  REQUIRE(test::within_a_minute(
      [&] { return std::filesystem::exists(pauses + "/paused.create-staged"); }));
  const pid_t forked = ::fork();  // Holds every descriptor the process has, lock included.
  if (forked == 0) {
    ::sleep(120);
    ::_exit(0);
  }
  REQUIRE(forked > 0);
  const pid_t waiter = test::spawn([&] {
    try {
      create_store(path, o);  // Waits for the lock, then finds the store made.
    } catch (const Error& e) {
      return e.code() == ErrorCode::kAlreadyExists ? 0 : 3;
    }
    return 4;
  });
  std::ofstream(pauses + "/resume.create-staged").put('r');
  creator.join();
  int status = 0;
  const bool ended =
      test::within_a_minute([&] { return ::waitpid(waiter, &status, WNOHANG) == waiter; });
  ::kill(forked, SIGKILL);
  CHECK(test::wait_for(forked) == 128 + SIGKILL);
  if (!ended) {
    ::kill(waiter, SIGKILL);
    test::wait_for(waiter);
  }
  REQUIRE(ended);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(Reader::open(path).size() == 0);
  detail::testing::disarm_all();
}

TEST_CASE("A create leaves a directory's contents alone, and takes a mount point with lost+found",
          "[create]") {
  TempDir dir;
  CreateOptions o;
  o.dim = 8;
  o.segment_bytes = 1 << 20;
  // A directory of the user's that happens to hold a ".creating.<12 hex>" directory: a refused
  // create removed it (and what it held) before refusing.
  const std::string mine = dir / "mine";
  std::filesystem::create_directories(mine + "/.creating.0123456789ab");
  std::ofstream(mine + "/.creating.0123456789ab/notes.txt") << "keep";
  std::ofstream(mine + "/readme") << "keep";
  CHECK_THROWS_WITH(create_store(mine, o), Catch::Contains("already exists and is not empty"));
  CHECK(test::read_file(mine + "/.creating.0123456789ab/notes.txt") == "keep");
  // Nor when it is all the directory holds.
  std::filesystem::remove(mine + "/readme");
  CHECK_THROWS_WITH(create_store(mine, o), Catch::Contains("already exists and is not empty"));
  CHECK(test::read_file(mine + "/.creating.0123456789ab/notes.txt") == "keep");

  // An ext4 volume's root holds lost+found: such a mount point was "not empty".
  const std::string point = dir / "point";
  std::filesystem::create_directory(point);
  const test::MountedTmpfs tmpfs(point, "16m");
  if (!tmpfs.mounted()) {
    WARN("cannot mount tmpfs here (not root?): the mount point part is skipped");
    return;
  }
  std::filesystem::create_directory(point + "/lost+found");
  create_store(point, o);
  CHECK(std::filesystem::is_directory(point + "/lost+found"));
  {
    Writer w = Writer::open(point);
    w.append(std::vector<std::uint64_t>{1}, 0, std::vector<float>(8, 1.0f));
  }
  CHECK(Reader::open(point).size() == 1);
  // What a create killed while moving the files in leaves (no header) is named as such.
  for (const char* name : {"header", "keys.1"})
    std::filesystem::remove(point + "/" + std::string(name));
  CHECK_THROWS_WITH(create_store(point, o), Catch::Contains("but no header"));
}
