// stats.h — what `embstore info` shows beyond the header: files on disk and, by a scan of the
// index, the epochs present with their rows and distinct keys.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "rows.h"

namespace embstore::tools {

struct FileStats {
  std::string name;
  std::uint64_t bytes = 0;       // Apparent size.
  std::uint64_t disk_bytes = 0;  // Blocks allocated (st_blocks * 512).
};

struct DiskStats {
  std::vector<FileStats> files;  // Every regular file in the store directory, by name.
  std::uint64_t disk_bytes = 0;  // Sum over files.
  // Of those, the files no reader uses that an interrupted operation left (FORMAT.md, "Files"):
  // rows.X and index.X of a generation X other than the store's (a truncate killed before it
  // finished), keys.build.* and keys.next (a key index build killed). The next writer removes
  // them. By name, with their share of disk_bytes.
  std::vector<std::string> leftovers;
  std::uint64_t leftover_disk_bytes = 0;
};

// Sizes of the files in the directory of `store`, whose current generation is `generation`
// (stat only; nothing is opened).
DiskStats disk_stats(const std::string& store, std::uint64_t generation);

struct EpochStats {
  std::uint64_t epoch = 0;
  std::uint64_t rows = 0;
  std::uint64_t distinct_keys = 0;
};

struct KeyStats {
  std::vector<EpochStats> epochs;   // Ascending by epoch.
  std::uint64_t distinct_keys = 0;  // Over all epochs.
};

// Scans the index entries of the snapshot (keys and epochs only, no row data). Memory grows
// with the number of distinct (epoch, key) pairs.
KeyStats key_stats(const Reader& reader, const ProgressFn& progress);

}  // namespace embstore::tools
