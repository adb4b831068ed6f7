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

}  // namespace embstore::test
