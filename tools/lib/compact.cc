#include "compact.h"

#include <algorithm>
#include <optional>
#include <vector>

#include "export.h"

namespace embstore::tools {
namespace {

constexpr std::uint64_t kRunBytes = 4 << 20;

}  // namespace

CompactResult compact_store(const std::string& source, const std::string& out,
                            const CompactOptions& options) {
  const Reader reader = Reader::open(source);
  StagedOutput::require_absent(out);
  refuse_output_inside(out, source);
  const DType dtype = options.dtype.value_or(reader.dtype());
  // Refused as import refuses rows of a type it may not convert (kFormatMismatch), before
  // anything is made at `out` (and before the selection's scan).
  if (!RowConverter::converts(reader.dtype(), dtype)) {
    throw Error(ErrorCode::kFormatMismatch,
                source + " holds " + std::string(dtype_name(reader.dtype())) +
                    " rows but --dtype " + std::string(dtype_name(dtype)) +
                    " was asked for (compact converts rows between float types only, never to or "
                    "from int8 or uint8); no store was made at " +
                    out);
  }
  RowSelection selection;
  selection.epochs = options.epochs;
  selection.latest_per_key = options.latest_per_key;
  // Its scan (every row checked when selecting: rows.h) reports progress, and can be stopped.
  const RowSelector selector(reader, selection, options.progress);
  const StoreInfo info = reader.info();
  CreateOptions create;
  create.dim = reader.dim();
  create.dtype = dtype;
  // As many rows per segment as the source: a wider dtype's row would not fit its segment.
  create.segment_bytes =
      info.segment_bytes *
      std::max<std::uint64_t>(1, dtype_size(create.dtype) / dtype_size(reader.dtype()));
  create.key_index = info.keeps_key_index;
  create.metadata = info.metadata;
  RowConverter converter(reader.dtype(), create.dtype, reader.dim(), reader.path(),
                         "no store was made at " + out);

  CompactResult result;
  result.source_rows = reader.size();
  result.source_bytes = info.data_file_bytes + info.index_file_bytes;
  StagedOutput staged(out);  // After the selection's scan: a kill during it leaves nothing.
  try {
    std::optional<Writer> writer;
    // The rows it will hold are known: the key index is built once for them, not grown.
    WriterOptions writing;
    writing.expected_rows = selector.count();
    writer.emplace(staged.create_writer(create, writing));
    const std::uint64_t row_bytes = info.record_bytes;
    std::vector<std::uint64_t> keys, epochs;
    // Copied with Reader::read(), not through the mapping: this process has not touched the
    // rows, and a first pass through a new mapping pays for every page's page-table entry. Each
    // row is checked against its checksum, so no damaged row leaves the store unnoticed.
    std::vector<std::byte> run;
    selector.for_each_run(std::max<std::uint64_t>(1, kRunBytes / row_bytes),
                          [&](std::uint64_t first, std::uint64_t n) {
                            const auto key_view = reader.keys(first, first + n);
                            const auto epoch_view = reader.epochs(first, first + n);
                            keys.resize(n);
                            epochs.resize(n);
                            for (std::uint64_t i = 0; i < n; ++i) {
                              keys[i] = key_view[i];
                              epochs[i] = epoch_view[i];
                            }
                            run.resize(n * row_bytes);
                            reader.read(first, first + n, run.data(), run.size(),
                                        ReadCheck::kChecksums);
                            writer->append(keys, epochs, converter.convert(run.data(), n, first));
                            result.rows += n;
                            if (options.progress) options.progress(result.rows, selector.count());
                          });
    writer->sync();
    const StoreInfo written = writer->info();
    result.bytes = written.data_file_bytes + written.index_file_bytes;
    result.warning = staged.close_writer(*writer, result.rows);
  } catch (...) {
    staged.rethrow_naming_out();
  }
  staged.publish();
  return result;
}

}  // namespace embstore::tools
