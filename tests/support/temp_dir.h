// temp_dir.h — a fresh directory under $TMPDIR (or /tmp) per test, removed with its contents.
#pragma once

#include <string>

namespace embstore::test {

class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Reads / writes whole files and single bytes, for corruption tests.
std::string read_file(const std::string& path);
void write_bytes(const std::string& path, std::uint64_t offset, const std::string& bytes);
std::uint64_t file_size(const std::string& path);
// Runs `command` with /bin/sh; returns its exit status (or 128 + signal).
int run_shell(const std::string& command);

// A tmpfs of `size` (mount(8) syntax: "16m") mounted on the existing directory `at` for the
// object's life (detached at destruction); mounted() is false where this process may not mount
// (not root), and the caller then skips what needs it, saying so.
class MountedTmpfs {
 public:
  MountedTmpfs(const std::string& at, const std::string& size);
  ~MountedTmpfs();
  MountedTmpfs(const MountedTmpfs&) = delete;
  MountedTmpfs& operator=(const MountedTmpfs&) = delete;
  bool mounted() const { return mounted_; }

 private:
  std::string at_;
  bool mounted_ = false;
};

}  // namespace embstore::test
