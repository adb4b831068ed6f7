// The writer lock (src/platform/lock.h): an OFD lock that excludes other processes and other
// handles in this process, survives unrelated open()/close() of store files, dies with its holder,
// and is never kept alive by a forked child.
#include "platform/lock.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>

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
