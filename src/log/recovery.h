// recovery.h — the one recovery loader: how an open store's counters become the rows a snapshot
// may show. Readers run load_log() read-only (at open and at every refresh); a Writer runs it
// under the writer lock at open and applies the result with apply_recovery(). Both therefore
// accept, repair or refuse exactly the same stores.
//
// The rules (FORMAT.md, "state-page" and "era"):
//   - Always: capacity_rows > 0, committed_rows <= capacity_rows, durable_rows <= committed_rows.
//     The counters share one sector of the state page and reach the disk together, so a store
//     that breaks these was damaged, not cut short by a power loss: kCorruption naming the field.
//   - Same boot (the state page's boot id is the machine's): the page cache holds every committed
//     row, so the files must hold capacity_rows rows (kCorruption otherwise) and no row is read.
//   - After a reboot: file growth may not have reached the disk, so capacity_rows and
//     committed_rows are clamped to the rows the files hold; then rows past durable_rows are
//     verified and the log ends at the last whole valid batch. Every row that verifies is kept.
//     Not durable_rows: a sync flushes the files (their sizes too) before it raises the counter,
//     so files that hold fewer rows were cut since, and synced rows are gone: kCorruption
//     naming the field and each file's rows (salvage copies what is left).
#pragma once

#include <cstdint>
#include <functional>

#include "storage/store_files.h"

namespace embstore::detail {

// The state page's three row counters, read together.
struct Counters {
  std::uint64_t durable = 0;
  std::uint64_t committed = 0;
  std::uint64_t capacity = 0;
};

// What load_log() found.
struct LoadedLog {
  bool same_boot = true;
  Counters stored;     // As read from the state page.
  Counters recovered;  // What the log is after recovery; equal to `stored` in the same boot.
  std::uint64_t verified_upto = 0;  // After a reboot: rows below this verified (or durable).
  // A truncate's switch was decided and not finished (FORMAT.md "Truncate"): `stored` is then
  // derived from the new files, not read from the state page, whose counters are half-stored.
  bool switching = false;
};

// Reads and checks the counters (the rules above) and, after a reboot, verifies rows from
// max(durable, verified_from) on. Maps the files as far as the log reaches. Never writes.
// Throws kCorruption naming the field and the files. Callers serialize calls per StoreFiles.
LoadedLog load_log(StoreFiles& files, std::uint64_t verified_from = 0);

// Rebuilds what is derived from the log (a key index, say) for rows [0, rows). Called by
// apply_recovery() after the cut is published and before the boot id is stored, so a rebuild
// interrupted by a crash runs again at the next open.
using RebuildDerived = std::function<void(StoreFiles& files, std::uint64_t rows)>;

// Writer only, writer lock held: makes a log loaded after a reboot the store's state: publishes
// the cut (first allocating the files again for C(1) rows if they hold none, so capacity_rows is
// never 0), raises the era, stores the boot id last and flushes the header. Re-running it after
// a crash at any point reaches the same state. Returns true if it wrote anything (the header's
// era is then durable); false for a same-boot log.
bool apply_recovery(StoreFiles& files, const LoadedLog& log, const RebuildDerived& rebuild = {});

}  // namespace embstore::detail
