/* An LD_PRELOAD shim for tests/cli/test_limits.py and tests/python/test_io_failures.py:
 * fdatasync(2) of a store's `header` file fails with EIO at its N-th call in this process
 * (HEADER_SYNC_EIO_AT=N), as a failing disk's would; every other call is the real one. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int fdatasync(int fd) {
  static int (*real)(int);
  static int header_syncs;
  if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
  char link[64], target[4096] = {0};
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  const ssize_t n = readlink(link, target, sizeof target - 1);
  const char* at = getenv("HEADER_SYNC_EIO_AT");
  if (at && n > 7 && strcmp(target + n - 7, "/header") == 0 && ++header_syncs == atoi(at)) {
    errno = EIO;
    return -1;
  }
  return real(fd);
}
