#include "log/recovery.h"

#include <algorithm>
#include <string>

#include "embstore/error.h"
#include "log/truncate.h"
#include "platform/os.h"
#include "platform/testing.h"

namespace embstore::detail {
namespace {

[[noreturn]] void corrupt(const StoreFiles& files, const std::string& what) {
  throw Error(ErrorCode::kCorruption, files.header_path() + ": " + what);
}

// The rules that hold in every boot (recovery.h).
void check_relations(const StoreFiles& files, const Counters& c) {
  if (c.capacity == 0) {
    corrupt(files, "field capacity_rows 0: a store always holds at least one row");
  }
  if (c.committed > c.capacity) {
    corrupt(files, "field committed_rows " + std::to_string(c.committed) +
                       " exceeds capacity_rows " + std::to_string(c.capacity));
  }
  if (c.durable > c.committed) {
    corrupt(files, "field durable_rows " + std::to_string(c.durable) + " exceeds committed_rows " +
                       std::to_string(c.committed));
  }
}

// Same boot: the counters only grow, capacity first and durable last, so reading them in the
// opposite order gives a consistent set while a writer appends.
Counters read_growing(const StoreFiles& files) {
  const SharedState& state = files.state();
  Counters c;
  c.durable = state.durable();
  c.committed = state.committed();
  c.capacity = state.capacity();
  return c;
}

// After a reboot the only writer that can be active is one recovering, which lowers durable,
// then committed, then capacity (apply_recovery): read them in the opposite order.
Counters read_shrinking(const StoreFiles& files) {
  const SharedState& state = files.state();
  Counters c;
  c.capacity = state.capacity();
  c.committed = state.committed();
  c.durable = state.durable();
  return c;
}

// "<data file> holds D rows and <index file> I": which file is short, for an error.
std::string rows_each_file_holds(const StoreFiles& files) {
  const auto [data_rows, index_rows] = files.rows_each_file_holds();
  return files.data_path() + " holds " + std::to_string(data_rows) + " rows and " +
         files.index_path() + " " + std::to_string(index_rows);
}

LoadedLog load_same_boot(StoreFiles& files) {
  LoadedLog log;
  log.same_boot = true;
  log.stored = read_growing(files);
  check_relations(files, log.stored);
  // Mapped rows were backed by the files when mapped; only a larger capacity needs a look.
  if (log.stored.capacity > files.mapped_rows()) {
    const std::uint64_t hold = files.rows_files_hold();
    if (log.stored.capacity > hold) {
      corrupt(files, "field capacity_rows " + std::to_string(log.stored.capacity) +
                         " exceeds the rows the files hold (a file is too short): " +
                         rows_each_file_holds(files));
    }
  }
  files.map_rows(log.stored.committed);
  log.recovered = log.stored;
  log.verified_upto = log.stored.committed;
  return log;
}

// A truncate is switching the store (FORMAT.md, "Truncate"): the new files are complete and
// durable and hold the store; the counters may be half-stored, so they are not read.
LoadedLog load_switching(StoreFiles& files) {
  LoadedLog log;
  log.switching = true;
  log.same_boot = true;  // Nothing to verify: the new files were flushed before the switch.
  const std::uint64_t hold = files.rows_files_hold();
  files.map_rows(hold);
  const std::uint64_t rows = switched_rows(files);
  log.stored = Counters{rows, rows, hold};
  log.recovered = log.stored;
  log.verified_upto = rows;
  return log;
}

LoadedLog load_generation(StoreFiles& files, std::uint64_t verified_from);

}  // namespace

LoadedLog load_log(StoreFiles& files, std::uint64_t verified_from) {
  // A truncate may switch the generation while this reads the counters: they are trusted only
  // if the generation word is the same after (the counters of one generation are consistent
  // by the rules above; a truncate stores new ones only after changing the word).
  for (int attempt = 0;; ++attempt) {
    const std::uint64_t word = files.state().generation_word();
    try {
      files.follow_generation();
      LoadedLog log = (word & kGenerationSwitching) != 0 ? load_switching(files)
                                                         : load_generation(files, verified_from);
      EMBSTORE_CRASH_POINT("log-loaded");
      if (files.state().generation_word() == word) return log;
    } catch (const Error& error) {
      // Counters read across a switch, or files a later truncate removed: read again.
      if (files.state().generation_word() == word || attempt >= 100) throw;
    }
    if (attempt >= 100) {
      corrupt(files, "field generation changes on every read (" + std::to_string(word) + ")");
    }
  }
}

namespace {

LoadedLog load_generation(StoreFiles& files, std::uint64_t verified_from) {
  if (files.same_boot()) return load_same_boot(files);
  LoadedLog log;
  log.same_boot = false;
  log.stored = read_shrinking(files);
  try {
    check_relations(files, log.stored);
  } catch (const Error&) {
    // A writer finished recovering and appended between the boot-id check and the reads: the
    // counters grew under us. It stored the boot id first, so the same-boot rules now apply.
    if (files.same_boot()) return load_same_boot(files);
    throw;
  }
  // File growth may not have reached the disk: the files bound the counters. Except
  // durable_rows: a sync flushed the files before it raised it, so files that hold fewer rows
  // were cut since (damage, not a power loss) and took synced rows with them.
  const std::uint64_t hold = files.rows_files_hold();
  if (log.stored.durable > hold) {
    corrupt(files, "field durable_rows " + std::to_string(log.stored.durable) +
                       " exceeds the rows the files hold, though a sync flushed them before it "
                       "counted them: a file was cut since (" +
                       rows_each_file_holds(files) +
                       "; embstore salvage copies the rows that are left)");
  }
  Counters& r = log.recovered;
  r.capacity = std::min(log.stored.capacity, hold);
  r.committed = std::min(log.stored.committed, r.capacity);
  r.durable = std::min(log.stored.durable, r.committed);
  files.map_rows(r.committed);
  // Cutting at the first bad row could leave the front of a torn batch visible: cut at the end
  // of the last whole batch before it (every batch's last entry carries kEntryBatchEnd).
  const std::uint64_t start = std::max(r.durable, std::min(verified_from, r.committed));
  r.committed = start >= r.committed ? start : files.valid_batch_prefix(start, r.committed);
  log.verified_upto = r.committed;
  return log;
}

}  // namespace

bool apply_recovery(StoreFiles& files, const LoadedLog& log, const RebuildDerived& rebuild) {
  if (log.same_boot) return false;
  EMBSTORE_CRASH_POINT("during-recovery");
  SharedState& state = files.state();
  const Counters& r = log.recovered;
  std::uint64_t boot[2];
  const bool boot_known = os::boot_id(boot);
  // Files that hold no row at all (the growth at creation never reached the disk) are grown
  // again first: capacity_rows is never 0 (the rules in recovery.h).
  const std::uint64_t capacity = r.capacity > 0 ? r.capacity : files.allocate_rows(0, 1);
  // Lower durable, then committed, then capacity, so a reader (read_shrinking) never sees them
  // out of order.
  if (log.stored.durable > r.durable) state.set_durable(r.durable);
  state.publish_committed(r.committed);
  state.set_capacity(capacity);
  // The verified rows were read back from the device (the page cache began empty in this boot),
  // so they are durable: the next reboot need not check them again. Without a boot id that is
  // not known, and durable stays.
  if (boot_known) state.set_durable(r.committed);
  if (rebuild) rebuild(files, r.committed);
  // Entries past the cut may still validate; everything written from now on carries a newer
  // era, so a later power loss can never splice them back in (FORMAT.md, "era").
  state.set_era(state.era() + 1);
  state.set_boot_id(boot);  // Last: an interrupted recovery runs again.
  os::datasync(files.header_fd(), files.header_path());
  return true;
}

}  // namespace embstore::detail
