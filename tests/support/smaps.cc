#include "support/smaps.h"

#include <cctype>
#include <fstream>

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

std::uint64_t pmd_mapped_kib(const std::string& path) {
  std::uint64_t kib = 0;
  for_each_field(path, [&](const std::string& line) {
    if (line.rfind("FilePmdMapped:", 0) == 0) kib += std::stoull(line.substr(14));
  });
  return kib;
}

std::uint64_t anonymous_kib(const std::string& path) {
  std::uint64_t kib = 0;
  for_each_field(path, [&](const std::string& line) {
    if (line.rfind("Anonymous:", 0) == 0) kib += std::stoull(line.substr(10));
  });
  return kib;
}

std::uint64_t mappings_of(const std::string& prefix) {
  std::ifstream maps("/proc/self/maps");
  std::uint64_t n = 0;
  for (std::string line; std::getline(maps, line);) {
    const std::size_t at = line.find('/');
    n += at != std::string::npos && line.compare(at, prefix.size(), prefix) == 0;
  }
  return n;
}

}  // namespace embstore::test
