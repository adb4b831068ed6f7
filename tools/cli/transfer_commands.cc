// export, import and compact.
#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <memory>
#include <optional>
#include <set>

#include "cli.h"
#include "compact.h"
#include "export.h"
#include "import.h"

namespace embstore::cli {
namespace {

// Whether `text` ends with `suffix` (lower case), in any case: "OUT.H5" is an HDF5 file.
bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         std::equal(suffix.begin(), suffix.end(), text.end() - suffix.size(), [](char s, char t) {
           return s == std::tolower(static_cast<unsigned char>(t));
         });
}

struct ExportArgs {
  std::string store;
  std::string out;
  std::string format;
  std::vector<std::uint64_t> epochs;
  bool latest = false;
  std::optional<std::uint64_t> from;
  std::optional<std::uint64_t> to;
  bool json = false;
  bool quiet = false;
};

int run_export(const ExportArgs& args) {
  install_work_stop_handlers();  // Ctrl-C cleans up (cli.h).
  tools::ExportOptions options;
  std::string format = args.format;
  if (format.empty()) {
    // From the output's name: .h5/.hdf5 and .csv in any case, anything else is an npy directory.
    format = ends_with(args.out, ".h5") || ends_with(args.out, ".hdf5") ? "hdf5"
             : ends_with(args.out, ".csv")                              ? "csv"
                                                                        : "npy";
  }
  options.format = format == "hdf5"  ? tools::ExportFormat::kHdf5
                   : format == "csv" ? tools::ExportFormat::kCsv
                                     : tools::ExportFormat::kNpy;
  options.selection.begin_row = args.from.value_or(0);
  options.selection.end_row = args.to;
  options.selection.epochs.insert(args.epochs.begin(), args.epochs.end());
  options.selection.latest_per_key = args.latest;
  StagedOutput::require_absent(args.out);  // Said first: before the store is even opened.
  const Reader reader = Reader::open(args.store);
  tools::ExportResult result;
  {
    Progress progress("exporting", args.quiet);
    options.progress = progress.fn();
    result = tools::export_store(reader, args.out, options);
  }
  note_done(fmt::format("wrote {} to {}", tools::counted(result.rows, "row"), args.out));
  if (args.json) {
    print_json({{"store", reader.path()},
                {"out", args.out},
                {"format", format},
                {"rows", result.rows},
                {"bytes", result.bytes}});
  } else {
    print_out("exported {} ({} bytes of {}) from {} to {} ({})\n",
              tools::counted(result.rows, "row"), result.bytes, dtype_name(reader.dtype()),
              reader.path(), args.out, format);
  }
  return kExitOk;
}

struct ImportArgs {
  std::string store;
  std::string from;
  std::string keys;
  std::string epochs;
  std::optional<std::uint64_t> epoch;
  std::string dtype;
  std::optional<std::string> metadata;  // Given: "" asks for none (not the source's).
  std::optional<double> segment_mb;
  bool json = false;
  bool quiet = false;
};

int run_import(const ImportArgs& args) {
  install_work_stop_handlers();  // Ctrl-C cleans up (cli.h).
  tools::ImportOptions options;
  if (!args.keys.empty()) options.keys = args.keys;
  if (!args.epochs.empty()) options.epochs = args.epochs;
  options.epoch = args.epoch;
  if (!args.dtype.empty()) options.dtype = dtype_from_name(args.dtype);
  if (args.metadata) {
    options.metadata = args.metadata->empty() ? "" : checked_metadata(*args.metadata);
  }
  if (args.segment_mb) {
    options.segment_bytes = segment_bytes_from_mb(*args.segment_mb);
  }
  tools::ImportResult result;
  {
    Progress progress("importing", args.quiet);
    options.progress = progress.fn();
    result = tools::import_rows(args.store, args.from, options);
  }
  // Other writers may have appended between the batches: then the rows are among theirs.
  const std::string where =
      fmt::format("{}rows {}..{}", result.contiguous ? "" : "among other writers' rows, in ",
                  result.first_row, result.end_row);
  note_done(
      fmt::format("appended {} to {} ({})", tools::counted(result.rows, "row"), args.store, where));
  if (args.json) {
    print_json({{"store", args.store},
                {"from", args.from},
                {"rows", result.rows},
                {"first_row", result.first_row},
                {"end_row", result.end_row},
                {"contiguous", result.contiguous},
                {"created", result.created},
                {"source_dtype", std::string(dtype_name(result.source_dtype))},
                {"store_dtype", std::string(dtype_name(result.store_dtype))}});
  } else {
    print_out("imported {} from {} into {}{} ({})\n", tools::counted(result.rows, "row"), args.from,
              result.created ? "new store " : "", args.store, where);
  }
  warn("import", result.warning);
  return kExitOk;
}

struct CompactArgs {
  std::string store;
  std::string out;
  bool latest_per_key = false;
  std::vector<std::uint64_t> epochs;
  std::string dtype;
  bool json = false;
  bool quiet = false;
};

int run_compact(const CompactArgs& args) {
  install_work_stop_handlers();  // Ctrl-C cleans up (cli.h).
  tools::CompactOptions options;
  options.latest_per_key = args.latest_per_key;
  options.epochs.insert(args.epochs.begin(), args.epochs.end());
  if (!args.dtype.empty()) options.dtype = dtype_from_name(args.dtype);
  tools::CompactResult result;
  {
    Progress progress("compacting", args.quiet);
    options.progress = progress.fn();
    result = tools::compact_store(args.store, args.out, options);
  }
  note_done(fmt::format("wrote {} to {}", tools::counted(result.rows, "row"), args.out));
  if (args.json) {
    print_json({{"store", args.store},
                {"out", args.out},
                {"source_rows", result.source_rows},
                {"rows", result.rows},
                {"source_bytes", result.source_bytes},
                {"bytes", result.bytes}});
  } else {
    print_out("compacted {} ({}, {} bytes) into {} ({}, {} bytes)\n", args.store,
              tools::counted(result.source_rows, "row"), result.source_bytes, args.out,
              tools::counted(result.rows, "row"), result.bytes);
  }
  warn("compact", result.warning);
  return kExitOk;
}

}  // namespace

void add_transfer_commands(CLI::App& app, Registry& registry) {
  {
    auto args = std::make_shared<ExportArgs>();
    CLI::App* cmd = app.add_subcommand(
        "export",
        "Write rows, keys and epochs as .npy files, HDF5 or CSV (read-only on the store)");
    cmd->add_option("store", args->store, "Store directory")->required();
    cmd->add_option("out", args->out, "Output: a new directory (npy), or a new .h5 / .csv file")
        ->required();
    cmd->add_option("--format", args->format,
                    "npy (vectors.npy, keys.npy, epochs.npy, embstore.json), hdf5 or csv "
                    "(default: from OUT's extension, else npy)")
        ->check(CLI::IsMember({"npy", "hdf5", "csv"}));
    add_unsigned_list(cmd, "--epoch", args->epochs, "Only this epoch (repeatable, or a comma list)",
                      "an epoch");
    cmd->add_flag("--latest", args->latest, "Only the latest row of each key");
    cmd->add_option("--from", args->from, "First row (default 0)")
        ->transform(unsigned_validator("a row number"));
    cmd->add_option("--to", args->to, "Row to stop before (default: all committed rows)")
        ->transform(unsigned_validator("a row number"));
    cmd->add_flag("--json", args->json, "Print the summary as JSON");
    cmd->add_flag("-q,--quiet", args->quiet, "No progress bar");
    cmd->footer(
        "Examples: embstore export run.emb out/ --epoch 9 ; embstore export run.emb "
        "run.h5 ; embstore export run.emb rows.csv --to 100");
    registry.add(cmd, [args] { return run_export(*args); });
  }
  {
    auto args = std::make_shared<ImportArgs>();
    CLI::App* cmd = app.add_subcommand(
        "import", "Append rows from .npy files or an HDF5 dataset, creating the store if needed");
    cmd->add_option("store", args->store, "Store directory (created when missing)")->required();
    cmd->add_option("from", args->from,
                    "An npy export directory, a 2-D .npy file, or FILE.h5[:/dataset] "
                    "(default dataset /vectors)")
        ->required();
    cmd->add_option("--keys", args->keys,
                    "Keys: a .npy file or FILE.h5:/dataset (default: the source's keys, an "
                    "HDF5 file's /keys whatever dataset is imported, else 0..rows-1)");
    auto* epochs = cmd->add_option("--epochs", args->epochs,
                                   "Per-row epochs: a .npy file or FILE.h5:/dataset");
    auto* epoch = cmd->add_option("--epoch", args->epoch,
                                  "One epoch for every row (default: the source's epochs, else 0)")
                      ->transform(unsigned_validator("an epoch"));
    epochs->excludes(epoch);
    cmd->add_option("--dtype", args->dtype,
                    "dtype of a new store (default: the source's), or an existing store's, to "
                    "convert rows of a float type it does not take as they are (float64 into "
                    "float32, say); bfloat16 also reads uint16 input as bfloat16 bit patterns. "
                    "Names: " +
                        dtype_names())
        ->check(dtype_validator());
    cmd->add_option("--metadata", args->metadata,
                    "Metadata of a new store, JSON (default: the source's; '' for none)");
    cmd->add_option("--segment-mb", args->segment_mb,
                    "Growth step of a new store, MiB");  // Checked by segment_bytes_from_mb().
    cmd->add_flag("--json", args->json, "Print the summary as JSON");
    cmd->add_flag("-q,--quiet", args->quiet, "No progress bar");
    cmd->footer(
        "Examples: embstore import new.emb out/ ; embstore import run.emb x.npy --keys "
        "ids.npy --epoch 3 ; embstore import run.emb data.h5:/emb");
    registry.add(cmd, [args] { return run_import(*args); });
  }
  {
    auto args = std::make_shared<CompactArgs>();
    CLI::App* cmd = app.add_subcommand(
        "compact", "Write a new, smaller store from some rows of this one (source untouched)");
    cmd->add_option("store", args->store, "Source store directory")->required();
    cmd->add_option("out", args->out, "New store directory (must not exist)")->required();
    cmd->add_flag("--latest-per-key", args->latest_per_key, "Keep only each key's latest row");
    add_unsigned_list(cmd, "--epochs", args->epochs, "Keep only these epochs (comma list)",
                      "an epoch");
    cmd->add_option("--dtype", args->dtype,
                    "Convert rows (between float types only; another exits 15, format "
                    "mismatch): " +
                        dtype_names())
        ->check(dtype_validator());
    cmd->add_flag("--json", args->json, "Print the summary as JSON");
    cmd->add_flag("-q,--quiet", args->quiet, "No progress bar");
    cmd->footer("Example: embstore compact run.emb last.emb --epochs 9 --dtype float16");
    registry.add(cmd, [args] { return run_compact(*args); });
  }
}

}  // namespace embstore::cli
