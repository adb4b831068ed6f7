// truncate.h — dropping the rows past a point by switching the store to a new generation of its
// files (FORMAT.md, "Protocols", "Truncate"). Writer lock and key index lock held for every call.
#pragma once

#include <cstdint>

#include "storage/store_files.h"

namespace embstore::detail {

// Keeps rows [0, rows) (rows < committed_rows, files following the current generation and
// mapped): writes and flushes the files of generation G+1, marks the state page switching
// (kGenerationSwitching, with `era` raised and `key_generation` 0) and flushes the header, then
// finish_switch(). Killed at any instant, the store is the old one (before the flagged header
// reaches the page cache or the disk) or the new one (after: the next writer or reader finishes
// the switch). Throws, store unchanged, if the new files cannot be written, or (kCorruption) if
// a damaged row stands in the way: an all-zero entry among the rows kept, or a last row kept
// that fails its checksum and does not end a batch. An error after the flag is the caller's to
// treat as a failed flush.
void truncate_log(StoreFiles& files, std::uint64_t rows);

// When the state page is switching: follows the new generation, stores its counters (every row
// of the new files: committed = durable = switched_rows(), capacity = what the files hold), clears
// the flag, flushes the header and removes the old generation's files. True if it did.
bool finish_switch(StoreFiles& files);

// The rows of a switching store's new files (following and mapped up to what they hold): the
// first all-zero index entry, found by binary search (the files were zero-filled, then rows
// [0, n) copied; no valid entry is all zero). After a reboot, the rows of the truncate's new
// era (appended after the switch) are checked and kept up to the last whole batch that verifies
// (valid_batch_prefix): the flag may have reached the disk while the header that cleared it did
// not, after writers had appended to the new files in that boot, and of their rows a power loss
// may have kept some entries and not the data (a sync that flushed them would have flushed the
// cleared header too). The truncate's own rows, of older eras and flushed before the flag, are
// taken as they are (a damaged one among them is verify's to name, as in any store).
std::uint64_t switched_rows(const StoreFiles& files);

}  // namespace embstore::detail
