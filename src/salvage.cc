// salvage: every row that verifies, out of a store that may not open.
#include "embstore/salvage.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "embstore/error.h"
#include "embstore/staged_output.h"
#include "embstore/store.h"
#include "embstore/writer.h"
#include "format/format.h"
#include "log/recovery.h"
#include "log/truncate.h"
#include "platform/lock.h"
#include "platform/testing.h"
#include "storage/store_files.h"

namespace embstore {
namespace {

// Why the store's normal open refuses it (the header and files, then the one recovery loader,
// log/recovery.h, as a Reader runs it, on a StoreFiles of its own), or "" if it opens: what
// salvage works around besides lost rows and a damaged primary header, reported by the same
// checks and words as info and verify give.
std::string open_refusal(const std::string& store) {
  try {
    auto files = detail::StoreFiles::open(store, detail::os::Access::kReadOnly, 0);
    detail::load_log(*files);
  } catch (const Error& error) {
    if (error.code() != ErrorCode::kCorruption) throw;
    return error.what();
  }
  return "";
}

}  // namespace

SalvageReport salvage(
    const std::string& store, const std::string& out,
    const std::function<void(std::uint64_t rows_done, std::uint64_t rows_total)>& progress) {
  auto files = detail::StoreFiles::open(store, detail::os::Access::kReadOnly, 0,
                                        detail::DamagedGeneration::kUseOnlyPair);
  const detail::Layout& layout = files->layout();
  SalvageReport report;
  report.path = files->dir();
  report.header_source = files->header_source();
  if (!files->generation_damage().empty()) {
    // The normal open stops at this field, so the counter checks after it are not run (the
    // files bound the scan anyway).
    report.damage.push_back(files->generation_damage());
  } else if (std::string refused = open_refusal(store); !refused.empty()) {
    report.damage.push_back(std::move(refused));
  }
  // The header copy that failed its checks: the primary (the store read from its copy), or the
  // second copy. Nothing in `out` depends on it, but the store is damaged there, as verify says:
  // a damaged primary was worked around like any other damage, and is named like it.
  if (std::string problem = files->header_copy_problem(); !problem.empty()) {
    report.damage.push_back(std::move(problem));
  }

  // A writer appending meanwhile (it holds the writer lock) has rows past committed_rows that are
  // its batch in the making, not damage: then the scan stops at the committed rows. Probed
  // before the counters are read and again after the scan, with the counter re-read: a writer
  // that opened or committed in between counts too.
  const std::string lock_path = files->dir() + "/" + detail::kLockFileName;
  report.writer_active = detail::writer_lock_held(lock_path);

  // Mid-truncate (the switching flag set) the counters may be half-stored and are not read
  // (FORMAT.md, "Truncate"): the new files, complete and flushed, hold the store. Otherwise the
  // counters are read before the files' sizes: a live writer grows the files before it commits,
  // so sizes read after its counter hold every row it counts (read the other way round, a commit
  // between the two reads looked like files cut short, rows lost: a review).
  const bool switching = (files->state().generation_word() & detail::kGenerationSwitching) != 0;
  // In the order a writer's changes keep them in rule (durable <= committed <= capacity): each
  // one read after the one it bounds.
  const std::uint64_t counted_durable = files->state().durable();
  const std::uint64_t counted = files->state().committed();
  const std::uint64_t counted_capacity = files->state().capacity();
  EMBSTORE_CRASH_POINT("salvage-counted");
  // The counters may be what is damaged: the files' sizes bound the scan, not capacity_rows.
  const std::uint64_t held = files->rows_files_hold();
  files->map_rows(held);
  // The log: the committed rows, if the files hold the counter, and the whole batches after
  // them that verify with eras that never go back (valid_batch_prefix(), as recovery after a
  // reboot keeps them). Past it, because the counter may be the damage (low), rows that verify
  // and whose era is not older than the rows kept before them are kept too, up to the last one
  // that ends a batch: never inside a batch (a writer killed while writing one leaves its
  // first rows valid; that batch was never committed), and never a stale row of an older era
  // (left past a cut by a recovery or a truncate). Rows in [0, rows_scanned) that fail or are
  // stale are lost; rows past it that verify are not copied, and said (damage).
  auto entry_at = [&](std::uint64_t row) {
    detail::IndexEntry entry;
    std::memcpy(&entry, files->entry_ptr(row), sizeof(entry));
    return entry;
  };
  const std::uint64_t committed = switching ? detail::switched_rows(*files) : counted;
  const std::uint64_t durable = switching ? committed : counted_durable;
  const std::uint64_t capacity = switching ? held : counted_capacity;
  // Files that hold fewer rows than committed_rows counts, while the counters keep their rules
  // (they share one sector: damaged together or not at all) and say the rows past the files'
  // end were there: the files were cut short (a copy that stopped, a file truncated). The rows
  // both hold are committed rows, kept wherever they verify; the rows past them are lost. The
  // counters say so when rows past the end were synced (durable_rows: a sync flushes the files
  // and their sizes first), or when one file still holds the committed rows (and the capacity
  // does). Otherwise (committed rows past both files that no sync flushed, as a power loss
  // leaves them, or a counter that is itself the damage) the files bound the log, as below.
  const auto [data_rows, index_rows] = files->rows_each_file_holds();
  const std::uint64_t longest = std::max(data_rows, index_rows);
  const bool counters_hold = capacity > 0 && committed <= capacity && durable <= committed;
  const bool cut_short = committed > held && counters_hold &&
                         (durable > held || committed <= std::min(longest, capacity));
  const std::uint64_t log_end = committed <= held ? files->valid_batch_prefix(committed, held)
                                : cut_short       ? held
                                                  : 0;
  // The era of the last row kept before the scan past the log: of the last row before log_end
  // that verifies (a damaged last row must not let stale rows of an older era past it pass for
  // the log's continuation).
  std::optional<std::uint64_t> newest_era;  // Of the last row kept so far.
  if (const auto before = files->last_valid_row_before(log_end)) {
    newest_era = detail::entry_era(entry_at(*before).row);
  }
  std::vector<bool> kept_past_log;  // Rows [log_end, rows_scanned): whether each is kept.
  std::uint64_t verify_past = 0;    // Rows past rows_scanned that verify.
  report.rows_scanned = log_end;
  for (std::uint64_t row = log_end; row < held; ++row) {
    const detail::IndexEntry entry = entry_at(row);
    const std::uint64_t era = detail::entry_era(entry.row);
    const bool valid = files->row_valid(row);
    verify_past += valid ? 1 : 0;
    const bool keep = valid && (!newest_era || detail::era_not_older(era, *newest_era));
    kept_past_log.push_back(keep);
    if (!keep) continue;
    newest_era = era;
    if ((entry.row & detail::kEntryBatchEnd) != 0) {
      report.rows_scanned = row + 1;
      verify_past = 0;
    }
  }
  if (!switching &&
      (detail::writer_lock_held(lock_path) || files->state().committed() != committed)) {
    report.writer_active = true;
  }
  if (report.writer_active && !switching && committed <= held) {
    // The rows past the counter read are a live writer's (being written, or committed since):
    // neither copied nor damage. The counter bounds the scan; rows before it that fail are lost.
    report.rows_scanned = committed;
    verify_past = 0;
  }
  kept_past_log.resize(report.rows_scanned > log_end ? report.rows_scanned - log_end : 0);
  if (report.rows_scanned > committed && committed <= held) {
    // Whole batches past the counter that verify (valid_batch_prefix() and the scan above), as
    // recovery after a reboot keeps them: copied, and said, since no Reader of the store shows
    // them (a writer killed before publishing them, or a counter that is itself damaged).
    report.damage.push_back(files->data_path() + ": rows " + std::to_string(committed) + ".." +
                            std::to_string(report.rows_scanned) +
                            " past committed_rows verify as whole batches and were copied (a "
                            "writer killed before publishing them, or a damaged counter)");
  }
  if (cut_short) {
    report.damage.push_back(files->data_path() + " and " + files->index_path() + " hold " +
                            std::to_string(held) + " rows, fewer than the " +
                            std::to_string(committed) +
                            " committed_rows counts (cut short?): rows " + std::to_string(held) +
                            ".." + std::to_string(committed) + " are lost");
  }
  if (verify_past > 0) {
    report.damage.push_back(
        files->data_path() + ": " + std::to_string(verify_past) + " rows past row " +
        std::to_string(report.rows_scanned) +
        " verify but were not copied: the rest of a batch whose end is missing or damaged (a "
        "writer killed while writing it, which never committed it), or stale rows of an older "
        "era");
  }
  auto kept = [&](std::uint64_t row) {
    return row < log_end ? files->row_valid(row) : static_cast<bool>(kept_past_log[row - log_end]);
  };

  CreateOptions create;
  create.dim = layout.dim;
  create.dtype = layout.dtype;
  create.segment_bytes = layout.segment_bytes;
  create.key_index = layout.key_index;
  create.metadata = layout.metadata;
  WriterOptions options;
  options.sync = SyncPolicy::kNone;  // One sync at the end.
  // No expected_rows: which rows verify is known only as they are copied, and a guess of every
  // row scanned would size the key index of a store that keeps a few of them for all of them
  // (25 MB for 256 rows kept of 400,000: a review).
  // Built aside and renamed into place when complete: a salvage that fails (a full disk), or is
  // killed, leaves no store at `out`.
  refuse_output_inside(out, store);
  StagedOutput build(out);
  try {
    Writer writer = build.create_writer(create, options);

    // Runs of valid rows are appended in chunks: contiguous in the old store, so one view each.
    constexpr std::uint64_t kChunkRows = 4096;
    std::vector<std::uint64_t> keys, epochs;
    std::uint64_t run_begin = 0;
    auto flush_run = [&](std::uint64_t end) {
      for (std::uint64_t begin = run_begin; begin < end; begin += kChunkRows) {
        const std::uint64_t rows = std::min(kChunkRows, end - begin);
        keys.clear();
        epochs.clear();
        for (std::uint64_t row = begin; row < begin + rows; ++row) {
          detail::IndexEntry entry;
          std::memcpy(&entry, files->entry_ptr(row), sizeof(entry));
          keys.push_back(entry.key);
          epochs.push_back(entry.epoch);
        }
        writer.append(keys, epochs,
                      ConstMatrix{files->row_ptr(begin), layout.dtype, rows, layout.dim, 0});
        report.rows_copied += rows;
      }
    };
    bool in_run = false;
    for (std::uint64_t row = 0; row < report.rows_scanned; ++row) {
      const bool valid = kept(row);
      if (valid && !in_run) {
        run_begin = row;
        in_run = true;
      } else if (!valid && in_run) {
        flush_run(row);
        in_run = false;
      }
      if (progress && row % kChunkRows == 0) progress(row, report.rows_scanned);
      if (!valid) {
        if (!report.lost_ranges.empty() && report.lost_ranges.back().second == row) {
          ++report.lost_ranges.back().second;
        } else {
          report.lost_ranges.emplace_back(row, row + 1);
        }
      }
    }
    if (in_run) flush_run(report.rows_scanned);
    if (cut_short) {  // The committed rows past the files' end: lost, never read.
      if (!report.lost_ranges.empty() && report.lost_ranges.back().second == held) {
        report.lost_ranges.back().second = committed;
      } else {
        report.lost_ranges.emplace_back(held, committed);
      }
      report.rows_scanned = committed;
    }
    report.rows_lost = report.rows_scanned - report.rows_copied;
    if (progress) progress(report.rows_scanned, report.rows_scanned);
    writer.sync();
    report.warning = build.close_writer(writer, report.rows_copied);
  } catch (...) {
    build.rethrow_naming_out();
  }
  build.publish();
  return report;
}

}  // namespace embstore
