// compact.h — writing a smaller copy of a store.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>

#include "embstore/embstore.h"
#include "rows.h"

namespace embstore::tools {

struct CompactOptions {
  bool latest_per_key = false;     // Keep only the last row of each key.
  std::set<std::uint64_t> epochs;  // Keep only these epochs (empty: all).
  std::optional<DType> dtype;      // Convert rows (between float types) to this dtype.
  ProgressFn progress;             // Rows written out of the rows kept.
};

struct CompactResult {
  std::uint64_t source_rows = 0;
  std::uint64_t rows = 0;          // Rows in the new store.
  std::uint64_t source_bytes = 0;  // Data + index file bytes of the source.
  std::uint64_t bytes = 0;         // The same for the new store.
  // Set when the new store was made with every row although closing it failed for what the
  // next writer redoes (its key index could not be maintained: StagedOutput::close_store(),
  // embstore/staged_output.h); the store is at `out` and whole, this says what to tell the user. ""
  // otherwise.
  std::string warning;
};

// Writes the kept rows of the store at `source` (its snapshot at open), in row order, into a new
// store at `out` with the source's dim, segment size, metadata and key-index choice
// (CreateOptions::key_index) and a new store id. The
// source is only read (a Reader: no lock, no byte changed). The new store is built under a
// hidden sibling name and renamed to `out` when complete and synced, so a crash at any instant
// leaves no store at `out` (only a `.NAME.partial-*` directory to delete). Every source row's
// checksum is verified (kCorruption names the row, key and epoch). kAlreadyExists if `out`
// exists; kNotFound for an epoch the source does not hold; kFormatMismatch for a dtype the rows
// may not be converted to (only float types convert: RowConverter), as import refuses them.
CompactResult compact_store(const std::string& source, const std::string& out,
                            const CompactOptions& options);

}  // namespace embstore::tools
