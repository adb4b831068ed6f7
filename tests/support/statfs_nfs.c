/* An LD_PRELOAD shim for tests/cli/test_commands.py and tests/python/test_basic.py: every
 * statfs(2) of the process reports NFS's f_type (0x6969), so that the refusal of network file
 * systems is tried without a network mount (the library's own hook, EMBSTORE_FS_MAGIC, is
 * compiled out of the release library the tool and the Python module link). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/vfs.h>

int statfs(const char* path, struct statfs* st) {
  int (*real)(const char*, struct statfs*) =
      (int (*)(const char*, struct statfs*))dlsym(RTLD_NEXT, "statfs");
  int rc = real(path, st);
  if (rc == 0) st->f_type = 0x6969;
  return rc;
}
