// The writer lock (src/platform/lock.h): an OFD lock that excludes other processes and other
// handles in this process, survives unrelated open()/close() of store files, dies with its holder,
// and is never kept alive by a forked child.
#include "platform/lock.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "embstore/embstore.h"
#include "log/batch.h"
#include "platform/os.h"
#include "platform/testing.h"
#include "support/process.h"
#include "support/temp_dir.h"
#include "writer_internals.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

using embstore::test::lock_is_free;

CreateOptions small() {
  CreateOptions o;
  o.dim = 4;
  o.segment_bytes = 4096;
  return o;
}

}  // namespace

TEST_CASE("The lock excludes another process even after this one opens and closes store files",
          "[lock][multiprocess]") {
  TempDir dir;
  create_store(dir / "s", small());
  const std::string lock_path = dir / "s/lock";
  detail::WriterLock lock(lock_path);
  lock.acquire();
  // Everything that would silently drop a classic per-process fcntl lock:
  for (const char* name : {"lock", "header", "rows.1", "index.1"}) {
    int fd = ::open((dir / "s/" + name).c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    ::close(fd);
  }
  { Reader r = Reader::open(dir / "s"); }
  (void)read_info(dir / "s");

  const pid_t child = test::spawn([&] {
    // Both lock flavours must see it held.
    return lock_is_free(lock_path) || lock_is_free(lock_path, 0, true) ? 1 : 0;
  });
  CHECK(test::wait_for(child) == 0);
  lock.release();
  const pid_t after = test::spawn([&] { return lock_is_free(lock_path) ? 0 : 1; });
  CHECK(test::wait_for(after) == 0);
}

TEST_CASE("Two handles in one process exclude each other", "[lock][threads]") {
  TempDir dir;
  create_store(dir / "s", small());
  detail::WriterLock a(dir / "s/lock");
  a.acquire();
  CHECK_FALSE(lock_is_free(dir / "s/lock"));  // another description, same process: refused
  a.release();
  CHECK(lock_is_free(dir / "s/lock"));
}

TEST_CASE("acquire() says whether it had to wait for another handle", "[lock][threads]") {
  TempDir dir;
  create_store(dir / "s", small());
  detail::WriterLock a(dir / "s/lock");
  detail::WriterLock b(dir / "s/lock");
  CHECK_FALSE(a.acquire());  // free
  CHECK_FALSE(a.others_waiting());
  std::atomic<bool> b_waited{false};
  std::atomic<bool> b_holds{false};
  std::thread t([&] {
    b_waited = b.acquire();
    b_holds = true;
    while (b_holds) std::this_thread::yield();
    b.release();
  });
  // b marks itself waiting while it waits; the holder sees it.
  for (int i = 0; i < 5000 && !a.others_waiting(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  CHECK(a.others_waiting());
  a.release();
  while (!b_holds) std::this_thread::yield();
  CHECK(b_waited);
  CHECK_FALSE(b.others_waiting());  // the mark went with the wait
  CHECK_FALSE(a.others_waiting());
  b_holds = false;
  t.join();
  CHECK_FALSE(a.acquire());
  a.release();
}

namespace {
std::atomic<int> g_checks{0};
bool interrupt_asked() noexcept {
  ++g_checks;
  return true;
}
bool wait_on() noexcept {
  ++g_checks;
  return false;
}
void no_op(int) {}
}  // namespace

TEST_CASE("An interruptible wait for the writer lock ends when the interrupt check says so",
          "[lock][threads]") {
  // The Python binding's Ctrl-C: a signal wakes the wait (EINTR, a handler without SA_RESTART),
  // the process's interrupt check decides. Only an interruptible wait asks it, and a false
  // answer waits on; the waiting mark goes with an interrupted wait.
  TempDir dir;
  create_store(dir / "s", small());
  struct sigaction action {};
  action.sa_handler = no_op;  // No SA_RESTART: the wait returns EINTR.
  sigemptyset(&action.sa_mask);
  struct sigaction previous {};
  REQUIRE(::sigaction(SIGUSR1, &action, &previous) == 0);
  detail::WriterLock holder(dir / "s/lock");
  detail::WriterLock waiter(dir / "s/lock");
  holder.acquire();
  for (const bool interrupt : {true, false}) {
    detail::os::set_interrupt_check(interrupt ? &interrupt_asked : &wait_on);
    g_checks = 0;
    std::atomic<int> outcome{0};  // 1 held, 2 interrupted
    std::thread t([&] {
      try {
        waiter.acquire(/*interruptible=*/true);
        outcome = 1;
      } catch (const Error& e) {
        outcome = e.code() == ErrorCode::kInterrupted ? 2 : 3;
      }
    });
    // Signals until the wait has been woken a few times (the check counts them).
    for (int i = 0; i < 10000 && g_checks < 3 && outcome == 0; ++i) {
      ::pthread_kill(t.native_handle(), SIGUSR1);
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (interrupt) {
      t.join();
      CHECK(outcome == 2);
      CHECK_FALSE(holder.others_waiting());  // The mark went with the wait.
    } else {
      CHECK(g_checks >= 3);
      CHECK(outcome == 0);  // Woken, asked, and waiting on.
      holder.release();
      t.join();
      CHECK(outcome == 1);
      waiter.release();
    }
  }
  detail::os::set_interrupt_check(nullptr);
  ::sigaction(SIGUSR1, &previous, nullptr);
}

TEST_CASE("A writer hashes in the page cache only while it looks like the one active writer",
          "[lock][threads]") {
  // Hashing under the lock saves a copy for one writer, but with the lock shared it would
  // serialize every writer's hash, and a writer that skips the copy would be back for the lock
  // before a woken waiter: a writer that had to wait, or that another writer got ahead of since
  // its last append, stages instead (log/batch.h, HashAt).
  TempDir dir;
  CreateOptions o;
  o.dim = 64;
  // No key index: its growth thread takes the locks too, so an append could wait for it.
  o.key_index = false;
  Writer w = Writer::create(dir / "s", o);
  const std::uint64_t n = detail::read_back_rows(o.dim * 4);  // the smallest read back
  const std::vector<float> values(n * o.dim, 1.0f);
  std::vector<std::uint64_t> keys(n);
  std::uint64_t next_key = 0;
  auto append = [&] {
    for (auto& k : keys) k = next_key++;
    w.append(keys, 0, ConstMatrix{values.data(), DType::kFloat32, n, o.dim, 0});
  };
  // Until another handle waits for the lock `holder` holds (its waiting mark), at most a minute.
  auto until_someone_waits = [](const detail::WriterLock& holder) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(1);
    while (!holder.others_waiting() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return holder.others_waiting();
  };
  CHECK_FALSE(detail::WriterInternals::hashes_before_lock(w));  // nothing since the open
  append();
  CHECK_FALSE(detail::WriterInternals::hashes_before_lock(w));
  {
    Writer other = Writer::open(dir / "s");  // another writer appends in between
    other.append(std::vector<std::uint64_t>{1u << 30}, 0, std::vector<float>(o.dim, 2.0f));
    CHECK(detail::WriterInternals::hashes_before_lock(w));
  }
  append();
  CHECK_FALSE(detail::WriterInternals::hashes_before_lock(w));
  {
    detail::WriterLock other(dir / "s/lock");  // another handle holds the store's lock
    CHECK_FALSE(other.acquire());
    std::thread t(append);
    REQUIRE(until_someone_waits(other));  // w's append found the lock taken
    other.release();
    t.join();
  }
  CHECK(detail::WriterInternals::hashes_before_lock(w));
  append();  // staged and hashed before the lock; this time the lock was free
  CHECK_FALSE(detail::WriterInternals::hashes_before_lock(w));
  {
    // Another handle waiting for the lock: w stages rather than take the lock back first.
    detail::WriterLock holder(dir / "s/lock");
    detail::WriterLock waiter(dir / "s/lock");
    CHECK_FALSE(holder.acquire());
    std::thread t([&] {
      (void)waiter.acquire();
      waiter.release();
    });
    REQUIRE(until_someone_waits(holder));
    CHECK(detail::WriterInternals::hashes_before_lock(w));
    holder.release();
    t.join();
  }
  CHECK_FALSE(detail::WriterInternals::hashes_before_lock(w));
  {
    // A thread of w's own waiting for the lock: the same (w's mark is its own, not another's).
    detail::WriterLock holder(dir / "s/lock");
    CHECK_FALSE(holder.acquire());
    std::thread own(append);
    REQUIRE(until_someone_waits(holder));  // w's thread waits
    CHECK(detail::WriterInternals::hashes_before_lock(w));
    holder.release();
    own.join();
  }
  append();
  CHECK_FALSE(detail::WriterInternals::hashes_before_lock(w));
  {
    // Alone, wherever the caller's rows start in a page: written from there and read back.
    const std::uint64_t lands = w.committed_rows() * o.dim * 4 % 4096;
    std::vector<std::byte> storage(n * o.dim * 4 + 3 * 4096);
    const auto page =
        (reinterpret_cast<std::uintptr_t>(storage.data()) + 4095) & ~std::uintptr_t{4095};
    auto rows_at = [&](std::uint64_t offset) {
      return ConstMatrix{reinterpret_cast<const void*>(page + offset), DType::kFloat32, n, o.dim,
                         0};
    };
    CHECK_FALSE(detail::WriterInternals::hashes_before_lock(w, rows_at(lands)));
    CHECK_FALSE(detail::WriterInternals::hashes_before_lock(w, rows_at(lands + 64)));
    CHECK_FALSE(detail::WriterInternals::hashes_before_lock(w, rows_at(lands + 16)));
    CHECK_FALSE(detail::WriterInternals::hashes_before_lock(w, rows_at(lands + 4096 - 16)));
    // Smaller batches are staged anyway: one row less, and a few rows.
    for (const std::uint64_t rows : {n - 1, std::uint64_t{4}}) {
      CHECK(detail::WriterInternals::hashes_before_lock(
          w, ConstMatrix{reinterpret_cast<const void*>(page + lands), DType::kFloat32, rows, o.dim,
                         0}));
    }
    // A heap block's rows, 16 bytes into a page, stored and verified below.
    std::fill(storage.begin(), storage.end(), std::byte{0x3c});
    std::vector<std::uint64_t> keys(n, 7);
    w.append(keys, 1, rows_at(lands + 16));
  }
  CHECK(w.committed_rows() == 7 * n + 1);
  w.close();
  CHECK(Reader::open(dir / "s").verify().ok());
}

TEST_CASE("A writer killed while holding the lock blocks no one", "[lock][crash]") {
  TempDir dir;
  create_store(dir / "s", small());
  const pid_t child = test::spawn([&] {
    Writer w = Writer::open(dir / "s");
    detail::testing::arm_crash("after-copy", 1);  // SIGKILL inside append, lock held
    const std::vector<float> v(4, 1.0f);
    const std::vector<std::uint64_t> k = {1};
    w.append(k, 0, std::span<const float>(v));
    return 1;  // not reached
  });
  CHECK(test::wait_for(child) == 128 + SIGKILL);
  CHECK(lock_is_free(dir / "s/lock"));
  Writer w = Writer::open(dir / "s");
  const std::vector<float> v(4, 2.0f);
  const std::vector<std::uint64_t> k = {2};
  CHECK(w.append(k, 0, std::span<const float>(v)) == 0);  // the dead batch was never published
}

TEST_CASE("A forked child never keeps a dead parent's lock alive", "[lock][fork]") {
  TempDir dir;
  create_store(dir / "s", small());
  test::Pipe pids;
  // P opens a writer, forks G (which lives on), then dies holding the lock.
  const pid_t parent = test::spawn([&] {
    Writer w = Writer::open(dir / "s");
    test::spawn([&] {
      const pid_t self = ::getpid();
      pids.send(&self, sizeof(self));
      ::pause();  // lives until killed
      return 0;
    });
    detail::testing::arm_crash("before-publish", 1);
    const std::vector<float> v(4, 1.0f);
    const std::vector<std::uint64_t> k = {1};
    w.append(k, 0, std::span<const float>(v));
    return 1;
  });
  CHECK(test::wait_for(parent) == 128 + SIGKILL);
  pid_t grandchild = 0;
  const std::string record = pids.receive(sizeof(grandchild));
  std::memcpy(&grandchild, record.data(), sizeof(grandchild));
  // G is alive and holds copies of P's descriptors, except the lock's: the atfork handler
  // closed that one, so P's death released the lock.
  CHECK(::kill(grandchild, 0) == 0);
  CHECK(lock_is_free(dir / "s/lock"));
  ::kill(grandchild, SIGKILL);
}
