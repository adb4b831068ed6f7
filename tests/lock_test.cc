// The writer lock (src/platform/lock.h): an OFD lock that excludes other processes and other
// handles in this process, survives unrelated open()/close() of store files, dies with its holder,
// and is never kept alive by a forked child.
#include "platform/lock.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "embstore/embstore.h"
#include "platform/testing.h"
#include "support/process.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

// Tries to take the lock without waiting, through a fresh open file description; releases it
// again if it got it. True when the lock was free.
bool lock_is_free(const std::string& lock_path, bool classic_posix_lock = false) {
  int fd = ::open(lock_path.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  struct flock fl;
  std::memset(&fl, 0, sizeof(fl));
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_len = 1;
  const int rc = ::fcntl(fd, classic_posix_lock ? F_SETLK : F_OFD_SETLK, &fl);
  const int err = errno;
  ::close(fd);  // also drops a classic lock taken above
  if (rc != 0) REQUIRE((err == EAGAIN || err == EACCES));
  return rc == 0;
}

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
    return lock_is_free(lock_path) || lock_is_free(lock_path, true) ? 1 : 0;
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

TEST_CASE("acquire() waits until another handle releases the lock", "[lock][threads]") {
  TempDir dir;
  create_store(dir / "s", small());
  detail::WriterLock a(dir / "s/lock");
  detail::WriterLock b(dir / "s/lock");
  a.acquire();
  std::atomic<bool> b_holds{false};
  std::thread t([&] {
    b.acquire();
    b_holds = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK_FALSE(b_holds);  // still waiting: a holds it
  a.release();
  t.join();
  CHECK(b_holds);
  CHECK_FALSE(lock_is_free(dir / "s/lock"));
  b.release();
  CHECK(lock_is_free(dir / "s/lock"));
}

TEST_CASE("Rows from anywhere in a page, with another writer between appends, verify",
          "[lock][threads]") {
  // Every append of the caller's rows is copied and hashed before the lock (log/batch.h),
  // wherever its rows start in a page and whoever else writes: each row's checksum is over the
  // bytes stored.
  TempDir dir;
  CreateOptions o;
  o.dim = 64;
  Writer w = Writer::create(dir / "s", o);
  const std::uint64_t n = 256;  // 64 KiB: written by pwrite
  std::vector<std::byte> storage(n * o.dim * 4 + 3 * 4096);
  const auto page =
      (reinterpret_cast<std::uintptr_t>(storage.data()) + 4095) & ~std::uintptr_t{4095};
  auto rows_at = [&](std::uint64_t offset) {
    return ConstMatrix{reinterpret_cast<const void*>(page + offset), DType::kFloat32, n, o.dim, 0};
  };
  std::vector<std::uint64_t> keys(n);
  std::uint64_t next_key = 0;
  std::uint64_t expected = 0;
  for (const std::uint64_t offset : {0, 16, 64, 4096 - 16}) {
    std::fill(storage.begin(), storage.end(), std::byte(0x30 + offset % 251));
    for (auto& k : keys) k = next_key++;
    w.append(keys, 1, rows_at(offset));
    expected += n;
    {
      Writer other = Writer::open(dir / "s");  // another writer appends in between
      other.append(std::vector<std::uint64_t>{1u << 30}, 0, std::vector<float>(o.dim, 2.0f));
      expected += 1;
    }
    {
      detail::WriterLock holder(dir / "s/lock");  // another handle holds the lock a while
      holder.acquire();
      for (auto& k : keys) k = next_key++;
      std::thread t([&] { w.append(keys, 2, rows_at(offset)); });
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      holder.release();
      t.join();
      expected += n;
    }
  }
  CHECK(w.committed_rows() == expected);
  w.close();
  Reader r = Reader::open(dir / "s");
  CHECK(r.verify().ok());
  // The stored bytes are the caller's: the first batch's rows hold 0x30 in every byte.
  const RowsView first = r.rows(0, 1);
  CHECK(std::all_of(first.data, first.data + first.size_bytes(),
                    [](std::byte b) { return b == std::byte{0x30}; }));
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
