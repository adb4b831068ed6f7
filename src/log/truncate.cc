#include "log/truncate.h"

#include <cstring>
#include <string>

#include "embstore/error.h"
#include "index/key_index_format.h"
#include "platform/os.h"
#include "platform/testing.h"

namespace embstore::detail {
namespace {

bool entry_zero(const StoreFiles& files, std::uint64_t row) {
  IndexEntry entry;
  std::memcpy(&entry, files.entry_ptr(row), sizeof(entry));
  return entry.key == 0 && entry.epoch == 0 && entry.row == 0 && entry.checksum == 0;
}

// What a truncate to `rows` would keep that the protocol cannot carry, both only in a damaged
// store: an all-zero entry (switched_rows() would end the new generation there, dropping every
// row after it without a word), and a last row that fails its checksum but needs the batch-end
// flag (its checksum is recomputed with the flag: the damage would then verify as a sound row).
// Throws kCorruption naming the row before anything is written.
void check_keepable(const StoreFiles& files, std::uint64_t rows) {
  const std::string advice =
      "; verify lists the damaged rows, and salvage copies every row "
      "that verifies into a new store";
  for (std::uint64_t row = 0; row < rows; ++row) {
    if (entry_zero(files, row)) {
      throw Error(ErrorCode::kCorruption,
                  files.index_path() + ": truncate to " + std::to_string(rows) +
                      " rows: the entry of row " + std::to_string(row) +
                      " is all zero (damaged), and a truncate keeps only rows before such an "
                      "entry: truncate to at most " +
                      std::to_string(row) + " rows" + advice);
    }
  }
  if (rows == 0) return;
  IndexEntry last;
  std::memcpy(&last, files.entry_ptr(rows - 1), sizeof(last));
  if ((last.row & kEntryBatchEnd) == 0 && !files.row_valid(rows - 1)) {
    throw Error(ErrorCode::kCorruption,
                files.data_path() + ": truncate to " + std::to_string(rows) + " rows: row " +
                    std::to_string(rows - 1) +
                    ", which would be the last one kept, fails its checksum in " +
                    files.index_path() + ", and a truncate rewrites the last row's checksum: " +
                    "truncate to fewer rows" + advice);
  }
}

}  // namespace

std::uint64_t switched_rows(const StoreFiles& files) {
  std::uint64_t low = 0, high = files.mapped_rows();
  while (low < high) {
    const std::uint64_t mid = low + (high - low) / 2;
    if (entry_zero(files, mid)) {
      high = mid;
    } else {
      low = mid + 1;
    }
  }
  if (files.same_boot()) return low;
  // Rows appended after the switch are of the era the truncate raised before it stored the flag;
  // the rows it kept, flushed before the flag, are all older. Only the former are checked.
  const std::uint64_t era = files.state().era() & kEntryEraMask;
  std::uint64_t first_appended = low;
  for (; first_appended > 0; --first_appended) {
    IndexEntry entry;
    std::memcpy(&entry, files.entry_ptr(first_appended - 1), sizeof(entry));
    if (entry_era(entry.row) != era) break;
  }
  return files.valid_batch_prefix(first_appended, low);
}

void truncate_log(StoreFiles& files, std::uint64_t rows) {
  SharedState& state = files.state();
  const std::uint64_t generation = files.file_generation();
  const std::uint64_t key_generation = state.key_generation();
  check_keepable(files, rows);
  files.write_next_generation(rows);
  EMBSTORE_CRASH_POINT("truncate-files-synced");
  // Until the flag, everything stored here leaves the old store valid: a newer era only means
  // that entries written later win over the dropped ones (FORMAT.md, "era"), and without a key
  // index the next writer builds one.
  state.set_era(state.era() + 1);
  state.set_key_generation(0);
  // The switch is decided here: from now on every reader and writer takes the new files.
  state.set_generation_word(generation | kGenerationSwitching);
  EMBSTORE_CRASH_POINT("truncate-flag-stored");
  os::datasync(files.header_fd(), files.header_path());
  EMBSTORE_CRASH_POINT("truncate-flagged");
  if (key_generation != 0) {
    files.check_at_path();
    os::remove_file(files.dir() + "/" + key_index_file_name(key_generation));
  }
  finish_switch(files);
}

bool finish_switch(StoreFiles& files) {
  SharedState& state = files.state();
  if (!state.switching()) return false;
  files.follow_generation();
  const std::uint64_t hold = files.rows_files_hold();
  files.map_rows(hold);
  const std::uint64_t rows = switched_rows(files);
  // Readers ignore these counters while the flag is set (load_log()), so their order is free.
  state.set_durable(std::min(state.durable(), rows));
  state.publish_committed(rows);
  state.set_durable(rows);
  state.set_capacity(hold);
  EMBSTORE_CRASH_POINT("truncate-mid-switch");
  state.set_generation_word(files.file_generation());
  os::datasync(files.header_fd(), files.header_path());
  EMBSTORE_CRASH_POINT("truncate-switched");
  files.remove_stale_files(state.key_generation());
  os::futex_wake_all(state.committed_word());
  return true;
}

}  // namespace embstore::detail
