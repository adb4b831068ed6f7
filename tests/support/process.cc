#include "support/process.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>

namespace embstore::test {

double torture_scale() {
  static const double scale = [] {
    const char* text = std::getenv("EMBSTORE_TORTURE_SCALE");
    const double v = text != nullptr ? std::strtod(text, nullptr) : 1.0;
    return v > 0 ? v : 1.0;
  }();
  return scale;
}

int scaled_rounds(int rounds) {
  return std::max(1, static_cast<int>(rounds * torture_scale() + 0.5));
}

bool lock_is_free(const std::string& lock_path, std::uint64_t byte, bool classic_posix_lock) {
  const int fd = ::open(lock_path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + lock_path);
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(byte);
  fl.l_len = 1;
  const int rc = ::fcntl(fd, classic_posix_lock ? F_SETLK : F_OFD_SETLK, &fl);
  const int err = errno;
  ::close(fd);  // Also drops a lock taken above.
  if (rc != 0 && err != EAGAIN && err != EACCES) {
    throw std::runtime_error("fcntl on " + lock_path + " failed with errno " + std::to_string(err));
  }
  return rc == 0;
}

bool within_a_minute(const std::function<bool()>& done) {
  for (int i = 0; i < 6000; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return done();
}

pid_t spawn(const std::function<int()>& body) {
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    int code = 1;
    try {
      code = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child %d: %s\n", static_cast<int>(::getpid()), e.what());
    }
    std::fflush(nullptr);
    ::_exit(code);
  }
  return pid;
}

int wait_for(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

Pipe::Pipe() {
  if (::pipe2(fds_, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
}

Pipe::~Pipe() {
  if (fds_[0] >= 0) ::close(fds_[0]);
  if (fds_[1] >= 0) ::close(fds_[1]);
}

void Pipe::send(const void* record, std::size_t bytes) const {
  if (::write(fds_[1], record, bytes) != static_cast<ssize_t>(bytes)) {
    throw std::runtime_error("pipe write failed");
  }
}

void Pipe::close_write() {
  if (fds_[1] >= 0) ::close(fds_[1]);
  fds_[1] = -1;
}

std::string Pipe::receive(std::size_t bytes) {
  std::string out(bytes, '\0');
  std::size_t got = 0;
  while (got < bytes) {
    ssize_t n = ::read(fds_[0], out.data() + got, bytes - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  out.resize(got);
  return out;
}

std::vector<std::string> Pipe::drain(std::size_t record_bytes) {
  close_write();
  std::string all;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fds_[0], buf, sizeof(buf));
    if (n <= 0) break;
    all.append(buf, static_cast<std::size_t>(n));
  }
  std::vector<std::string> records;
  for (std::size_t off = 0; off + record_bytes <= all.size(); off += record_bytes) {
    records.push_back(all.substr(off, record_bytes));
  }
  return records;
}

}  // namespace embstore::test
