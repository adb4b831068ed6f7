// salvage: every row that verifies, out of a store that may not open.
#include "embstore/salvage.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "embstore/error.h"
#include "embstore/writer.h"
#include "format/format.h"
#include "log/recovery.h"
#include "storage/store_files.h"
#include "store_build.h"

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
  report.header_source = files->header_source();
  if (!files->generation_damage().empty()) {
    // The normal open stops at this field, so the counter checks after it are not run (the
    // files bound the scan anyway).
    report.damage.push_back(files->generation_damage());
  } else if (std::string refused = open_refusal(store); !refused.empty()) {
    report.damage.push_back(std::move(refused));
  }

  // The counters may be what is damaged: the files' sizes bound the scan, not capacity_rows.
  const std::uint64_t held = files->rows_files_hold();
  files->map_rows(held);
  // The scan ends at the last valid row that ends a batch, never inside a batch: a writer
  // killed while writing one leaves its first rows valid, and that batch was never committed
  // (atomic batches). Rows before that end that fail are lost (the counter may be the damage,
  // so rows that verify past it are kept). A committed counter the files can hold says how
  // many rows there were at least: rows below it that fail are lost too.
  for (std::uint64_t row = held; row > 0; --row) {
    detail::IndexEntry entry;
    std::memcpy(&entry, files->entry_ptr(row - 1), sizeof(entry));
    if ((entry.row & detail::kEntryBatchEnd) != 0 && files->row_valid(row - 1)) {
      report.rows_scanned = row;
      break;
    }
  }
  const std::uint64_t committed = files->state().committed();
  if (committed <= held) report.rows_scanned = std::max(report.rows_scanned, committed);

  CreateOptions create;
  create.dim = layout.dim;
  create.dtype = layout.dtype;
  create.segment_bytes = layout.segment_bytes;
  create.key_index = layout.key_index;
  create.metadata = layout.metadata;
  WriterOptions options;
  options.sync = SyncPolicy::kNone;  // One sync at the end.
  // Built aside and renamed into place when complete: a salvage that fails (a full disk), or is
  // killed, leaves no store at `out`.
  detail::refuse_output_inside(out, store);
  detail::StoreBuild build(out);
  try {
    Writer writer = Writer::create(build.path(), create, options);

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
      const bool valid = files->row_valid(row);
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
    report.rows_lost = report.rows_scanned - report.rows_copied;
    if (progress) progress(report.rows_scanned, report.rows_scanned);
    writer.sync();
    writer.close();
  } catch (...) {
    build.rethrow_naming_out();
  }
  build.publish();
  return report;
}

}  // namespace embstore
