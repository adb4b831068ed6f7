#include "support/smaps.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cctype>
#include <fstream>
#include <stdexcept>
#include <vector>

namespace embstore::test {
namespace {

// Calls `field(line)` for each field line of the mappings of `path` in /proc/self/smaps.
template <typename Field>
void for_each_field(const std::string& path, Field field) {
  std::ifstream smaps("/proc/self/smaps");
  bool in = false;
  for (std::string line; std::getline(smaps, line);) {
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
        line.find('-') != std::string::npos && line.find(' ') > line.find('-')) {
      in = line.size() >= path.size() &&
           line.compare(line.size() - path.size(), path.size(), path) == 0;
    } else if (in) {
      field(line);
    }
  }
}

}  // namespace

std::uint64_t resident_kib(const std::string& path) {
  std::uint64_t kib = 0;
  for_each_field(path, [&](const std::string& line) {
    if (line.rfind("Rss:", 0) == 0) kib += std::stoull(line.substr(4));
  });
  return kib;
}

std::string mapping_flags(const std::string& path) {
  std::string flags;
  for_each_field(path, [&](const std::string& line) {
    if (line.rfind("VmFlags:", 0) == 0) flags += line.substr(8) + "\n";
  });
  return flags;
}

std::uint64_t cached_pages(const std::string& path, std::uint64_t from, std::uint64_t to) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + path);
  void* base = ::mmap(nullptr, to, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (base == MAP_FAILED) throw std::runtime_error("cannot map " + path);
  std::vector<unsigned char> in_core((to - from) / 4096);
  const int rc = ::mincore(static_cast<char*>(base) + from, to - from, in_core.data());
  ::munmap(base, to);
  if (rc != 0) throw std::runtime_error("mincore of " + path + " failed");
  std::uint64_t pages = 0;
  for (unsigned char c : in_core) pages += c & 1;
  return pages;
}

}  // namespace embstore::test
