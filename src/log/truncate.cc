#include "log/truncate.h"

#include <cstring>
#include <string>

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
  return low;
}

void truncate_log(StoreFiles& files, std::uint64_t rows) {
  SharedState& state = files.state();
  const std::uint64_t generation = files.file_generation();
  const std::uint64_t key_generation = state.key_generation();
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
  if (key_generation != 0) os::remove_file(files.dir() + "/" + key_index_file_name(key_generation));
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
