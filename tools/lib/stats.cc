#include "stats.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <unordered_set>

namespace embstore::tools {

namespace {

// Whether the store directory's file `name` is one an interrupted operation left (DiskStats).
bool is_leftover(const std::string& name, std::uint64_t generation) {
  if (name == "keys.next" || name.rfind("keys.build.", 0) == 0) return true;
  const std::size_t dot = name.find('.');
  if (dot == std::string::npos) return false;
  const std::string stem = name.substr(0, dot), number = name.substr(dot + 1);
  if (stem != "rows" && stem != "index") return false;
  if (number.empty() || number.find_first_not_of("0123456789") != std::string::npos) return false;
  return number != std::to_string(generation);
}

}  // namespace

DiskStats disk_stats(const std::string& store, std::uint64_t generation) {
  DiskStats stats;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(store, ec)) {
    struct stat st;
    if (::lstat(entry.path().c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    FileStats file;
    file.name = entry.path().filename().string();
    file.bytes = static_cast<std::uint64_t>(st.st_size);
    file.disk_bytes = static_cast<std::uint64_t>(st.st_blocks) * 512;
    stats.disk_bytes += file.disk_bytes;
    stats.files.push_back(file);
  }
  std::sort(stats.files.begin(), stats.files.end(),
            [](const FileStats& a, const FileStats& b) { return a.name < b.name; });
  for (const FileStats& file : stats.files) {
    if (!is_leftover(file.name, generation)) continue;
    stats.leftovers.push_back(file.name);
    stats.leftover_disk_bytes += file.disk_bytes;
  }
  return stats;
}

KeyStats key_stats(const Reader& reader, const ProgressFn& progress) {
  constexpr std::uint64_t kBlockRows = 1 << 16;
  std::map<std::uint64_t, std::pair<std::uint64_t, std::unordered_set<std::uint64_t>>> epochs;
  std::unordered_set<std::uint64_t> all_keys;
  const std::uint64_t size = reader.size();
  for (std::uint64_t block = 0; block < size; block += kBlockRows) {
    const std::uint64_t end = std::min(size, block + kBlockRows);
    const auto keys = reader.keys(block, end);
    const auto epoch_view = reader.epochs(block, end);
    for (std::uint64_t i = 0; i < end - block; ++i) {
      auto& [rows, keys_of_epoch] = epochs[epoch_view[i]];
      ++rows;
      keys_of_epoch.insert(keys[i]);
      all_keys.insert(keys[i]);
    }
    if (progress) progress(end, size);
  }
  KeyStats stats;
  stats.distinct_keys = all_keys.size();
  for (const auto& [epoch, entry] : epochs) {
    stats.epochs.push_back({epoch, entry.first, entry.second.size()});
  }
  return stats;
}

}  // namespace embstore::tools
