// Many writer processes x threads appending to one store while reader processes check every row
// they can see: whole, checksum-valid, equal to its derived payload, batches contiguous.
#include <sys/mount.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "embstore/embstore.h"
#include "support/checker.h"
#include "support/payload.h"
#include "support/process.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

constexpr std::uint32_t kDim = 32;

void append_batches(const std::string& path, std::uint64_t writer, int batches) {
  Writer w = Writer::open(path);
  const std::uint64_t n = test::batch_rows(writer);
  for (int b = 0; b < batches; ++b) {
    const std::uint64_t seq = std::uint64_t(b) * n;
    const auto values = test::batch_payload(writer, seq, n, kDim);
    std::vector<std::uint64_t> keys(n);
    for (std::uint64_t i = 0; i < n; ++i) keys[i] = test::make_key(writer, seq + i);
    w.append(keys, b, std::span<const float>(values));
  }
}

}  // namespace

TEST_CASE("4 writer processes x 2 threads append while 2 reader processes check every row",
          "[multiprocess]") {
  TempDir dir;
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 16 * 1024;  // frequent growth under contention
  create_store(path, o);

  constexpr int kProcesses = 4, kThreads = 2, kBatches = 1500;
  std::uint64_t total = 0;
  for (int p = 0; p < kProcesses; ++p) {
    for (int t = 0; t < kThreads; ++t) total += test::batch_rows(p * kThreads + t) * kBatches;
  }

  test::Pipe report;
  test::Pipe opened;  // A byte from each reader once it has opened the store.
  std::vector<pid_t> readers;
  for (int r = 0; r < 2; ++r) {
    readers.push_back(test::spawn([&] {
      Reader reader = Reader::open(path);
      opened.send("o", 1);
      test::StreamChecker checker(kDim);
      std::uint64_t snapshots = 0;
      while (checker.checked_rows() < total) {
        if (!reader.wait(checker.checked_rows() + 1, std::chrono::seconds(120))) {
          std::fprintf(stderr, "reader timed out at %llu rows\n",
                       static_cast<unsigned long long>(checker.checked_rows()));
          return 2;
        }
        const std::string problem = checker.check(reader, reader.size());
        if (!problem.empty()) {
          std::fprintf(stderr, "reader: %s\n", problem.c_str());
          return 1;
        }
        ++snapshots;
      }
      report.send(&snapshots, sizeof(snapshots));
      return 0;
    }));
  }
  // The writers start once both readers follow the store, so that each sees it grow.
  REQUIRE(opened.receive(2).size() == 2);
  std::vector<pid_t> writers;
  for (int p = 0; p < kProcesses; ++p) {
    writers.push_back(test::spawn([&, p] {
      std::vector<std::thread> threads;
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] { append_batches(path, p * kThreads + t, kBatches); });
      }
      for (auto& th : threads) th.join();
      return 0;
    }));
  }
  for (pid_t pid : writers) CHECK(test::wait_for(pid) == 0);
  for (pid_t pid : readers) CHECK(test::wait_for(pid) == 0);
  const auto snapshots = report.drain(sizeof(std::uint64_t));
  REQUIRE(snapshots.size() == 2);
  for (const auto& record : snapshots) {
    std::uint64_t count;
    std::memcpy(&count, record.data(), sizeof(count));
    // Readers must have watched the store grow, not just read it once at the end.
    CHECK(count > 1);
    std::printf("multiprocess_test: a reader checked %llu snapshots of up to %llu rows\n",
                static_cast<unsigned long long>(count), static_cast<unsigned long long>(total));
  }

  Reader final_reader = Reader::open(path);
  REQUIRE(final_reader.size() == total);
  test::StreamChecker checker(kDim);
  CHECK(checker.check(final_reader, total) == "");
  CHECK(final_reader.verify().ok());
  for (int id = 0; id < kProcesses * kThreads; ++id) {
    CHECK(checker.next_seq().at(id) == test::batch_rows(id) * kBatches);
  }
}

TEST_CASE("8 processes racing open_or_create on a nearly full disk all succeed",
          "[multiprocess][create]") {
  TempDir dir;
  const std::string mnt = dir / "mnt";
  std::filesystem::create_directory(mnt);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=200m") != 0) {
    WARN("cannot mount tmpfs here (not root?): skipped");
    return;
  }
  struct Unmount {
    std::string at;
    ~Unmount() { ::umount2(at.c_str(), MNT_DETACH); }
  } unmount{mnt};

  // dim 8 with the default 64 MiB segment: 128 MiB of data and index; two do not fit in 200 MB.
  const std::string path = mnt + "/s";
  CreateOptions o;
  o.dim = 8;
  constexpr int kRacers = 8;
  test::Pipe start;
  std::vector<pid_t> children;
  for (int i = 0; i < kRacers; ++i) {
    children.push_back(test::spawn([&, i] {
      start.close_write();
      start.receive(1);  // EOF once the parent closes its end: all start together.
      Writer w = Writer::open_or_create(path, o);
      const std::vector<float> row(8, static_cast<float>(i));
      const std::vector<std::uint64_t> keys = {static_cast<std::uint64_t>(i)};
      w.append(keys, 0, std::span<const float>(row));
      return 0;
    }));
  }
  start.close_write();
  for (pid_t child : children) CHECK(test::wait_for(child) == 0);

  Reader r = Reader::open(path);
  CHECK(r.size() == kRacers);
  CHECK(r.verify().ok());
  for (const auto& entry : std::filesystem::directory_iterator(mnt)) {
    CHECK(entry.path().filename() == "s");  // No staging directory, no create lock.
  }
}
