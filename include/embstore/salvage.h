// embstore/salvage.h — getting the intact rows out of a store too damaged to open.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace embstore {

// What salvage() found and copied.
struct SalvageReport {
  // The damaged store's directory, absolute as a Reader's path() is (joined to the working
  // directory, trailing slashes dropped, not resolved further).
  std::string path;
  std::string header_source;       // "primary" or "copy": the fixed header copy that verified.
  std::uint64_t rows_scanned = 0;  // Rows [0, rows_scanned) examined (see salvage()).
  std::uint64_t rows_copied = 0;   // Rows whose entry and checksum verified, now in `out`.
  std::uint64_t rows_lost = 0;     // rows_scanned - rows_copied.
  // The lost rows as [begin, end) ranges of row numbers in the damaged store, in order.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> lost_ranges;
  // Damage worked around besides lost rows: why the store does not open (the error info and
  // verify give, naming the file and field, e.g. "field durable_rows 25 exceeds
  // committed_rows 5"), or a `generation` field naming files that do not exist when the
  // directory holds exactly one rows.X/index.X pair (then salvaged from those); a header copy
  // that fails its checks (the primary, header_source then "copy", or the second one); rows
  // past the committed counter, copied or not; files cut short. Empty when the store is sound.
  std::vector<std::string> damage;
  // Set when a writer held the store's writer lock while salvage read it (a Writer appending,
  // or a truncate or rebuild-index), or the committed counter moved meanwhile: the scan then
  // stopped at the rows committed when salvage read the counter, and the rows past them, the
  // writer's, were neither copied nor counted as damage.
  bool writer_active = false;
  // Set when `out` was made with every row copied although its key index could not be kept
  // (Writer::close() failed for it: open files or memory ran out at its last growth, say): the
  // store is whole, lookups scan the rows it did not index until the next writer indexes them.
  // close()'s message, naming `out`, for the caller to show as a warning. Empty otherwise.
  std::string warning;
};

// Copies every row of the store at `store` whose index entry and checksum verify, in order and
// with its key and epoch, into a new store at `out` (same dtype, dim, segment size and
// metadata; `out` must not exist), and reports what was lost. For stores too damaged to open:
// trusts only a fixed header copy whose checksum holds and each row's own checksum, and the
// committed counter as far as the files can hold it. Scans rows [0, n): the committed rows
// and the whole batches after them that verify, then, since the counter may be the damage,
// further rows that verify and are of no older era, up to the last one that ends a batch.
// Never a part of a batch (a writer killed while writing it never committed it) or a stale row
// of an older era: rows past n that verify are not copied and are named in `damage`. Rows
// copied past the committed counter are named in `damage` too. When one file is shorter than
// the counter while the other still covers it (cut short), the rows both hold are committed
// rows, copied where they verify, and the committed rows past them are lost (n is then the
// counter, and `damage` says so).
// A live writer's rows past the committed counter are its batch in the making, not damage:
// when one holds the writer lock (a read-only probe, before and after the scan), the scan stops
// at the committed rows and `writer_active` says so.
// Takes no lock and writes nothing to `store`. Throws kCorruption if neither header copy
// verifies (the rows cannot be checked without the header), or if the `generation` field is
// damaged and the directory does not hold exactly one rows.X/index.X pair, or if one of the
// generation's rows.G and index.G is missing (naming it: the rows cannot be read or checked
// without both); kAlreadyExists if `out` exists; kInvalidArgument if `out` lies inside `store`;
// kReadOnly naming `out` and the cause when its directory takes no new entry (a read-only file
// system, or no write permission).
// The new store is built in a hidden directory `.<name of out>.partial-<hex>` beside `out` and
// renamed to `out` only when complete: on any error (a full disk, say) nothing is left at `out`.
// A process killed meanwhile leaves that directory, never `out`; it is not the salvaged store
// and may be deleted. `progress`, if set, is called from the calling thread with (rows examined,
// rows to examine) every few thousand rows and once at the end.
SalvageReport salvage(
    const std::string& store, const std::string& out,
    const std::function<void(std::uint64_t rows_done, std::uint64_t rows_total)>& progress = {});

}  // namespace embstore
