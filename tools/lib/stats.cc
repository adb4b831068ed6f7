#include "stats.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <unordered_set>

namespace embstore::tools {

DiskStats disk_stats(const std::string& store) {
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
