// create, info, verify and version.
#include <fmt/format.h>

#include <memory>
#include <optional>

#include "cli.h"
#include "stats.h"

namespace embstore::cli {
namespace {

constexpr std::uint64_t kVerifyBlockRows = 1 << 16;

struct CreateArgs {
  std::string store;
  std::uint32_t dim = 0;
  std::string dtype = "float32";
  double segment_mb = static_cast<double>(kDefaultSegmentBytes >> 20);
  std::string metadata;
  bool no_key_index = false;
  bool json = false;
};

int run_create(const CreateArgs& args) {
  CreateOptions options;
  options.dim = args.dim;
  options.dtype = dtype_from_name(args.dtype);
  options.segment_bytes = segment_bytes_from_mb(args.segment_mb);
  if (!args.metadata.empty()) options.metadata = checked_metadata(args.metadata);
  options.key_index = !args.no_key_index;
  // A store no writer of this machine would open (on NFS or FUSE) is refused now, with their
  // message and override, not made for every later import or Writer to refuse.
  Writer::check_filesystem(args.store);
  create_store(args.store, options);
  note_done("created " + args.store);
  const StoreInfo info = read_info(args.store);
  if (args.json) {
    print_json(info_json(info));
  } else {
    print_out("created {}: dim {} {}, store id {}\n", info.path, info.dim, dtype_name(info.dtype),
              info.store_id);
  }
  return kExitOk;
}

// StoreInfo::rows_to_cut in words, for info and verify.
std::string rows_to_cut_text(const StoreInfo& info) {
  return fmt::format(
      "rows [{}, {}) did not survive the last reboot whole (not synced before it, or the files "
      "damaged since); no reader shows them and the next writer's open cuts them",
      info.committed_rows, info.committed_rows + info.rows_to_cut);
}

struct InfoArgs {
  std::string store;
  bool json = false;
  bool scan = false;
  bool no_scan = false;
  bool quiet = false;
};

int run_info(const InfoArgs& args) {
  // Header, counters and key statistics of one moment, and a Reader of exactly the rows they
  // count, for the key scan.
  StoreInfo info;
  const Reader reader = open_with_info(args.store, info);
  const tools::DiskStats disk = tools::disk_stats(args.store, info.generation);
  const std::uint64_t segments =
      info.segment_bytes ? (info.data_file_bytes + info.segment_bytes - 1) / info.segment_bytes : 0;
  // Epochs and distinct keys: from the key index when there is a usable one (no scan), else
  // (or with --scan, which adds distinct keys per epoch) by a scan of the offset index.
  std::optional<tools::KeyStats> keys;
  const bool from_index = info.key_index_used && !args.scan;
  if (from_index) {
    keys.emplace();
    keys->distinct_keys = info.distinct_keys;
    for (const EpochRows& e : info.epochs) keys->epochs.push_back({e.epoch, e.rows, 0});
  } else if (!args.no_scan) {
    Progress progress("scanning keys", args.quiet);
    keys = tools::key_stats(reader, progress.fn());
  }
  if (args.json) {
    nlohmann::json out = info_json(info);
    out["segments"] = segments;
    out["bytes_on_disk"] = disk.disk_bytes;
    nlohmann::json files = nlohmann::json::array();
    for (const auto& file : disk.files) {
      files.push_back(
          {{"name", file.name}, {"bytes", file.bytes}, {"disk_bytes", file.disk_bytes}});
    }
    out["files"] = files;
    out["leftover_files"] = disk.leftovers;
    out["key_index"] = info.key_index;
    out["key_index_used"] = info.key_index_used;
    if (keys) {
      nlohmann::json epochs = nlohmann::json::array();
      for (const auto& e : keys->epochs) {
        nlohmann::json epoch = {{"epoch", e.epoch}, {"rows", e.rows}};
        if (!from_index) epoch["distinct_keys"] = e.distinct_keys;
        epochs.push_back(epoch);
      }
      out["epochs"] = epochs;
      out["distinct_keys"] = keys->distinct_keys;
      out["key_source"] = from_index ? "key index" : "scan";
    }
    print_json(out);
    return kExitOk;
  }
  const std::size_t width = std::string("committed rows").size();
  auto line = [&](const std::string& name, const std::string& value) {
    print_out("{:<{}}  {}\n", name, width, value);
  };
  line("store", info.path);
  line("format", fmt::format("{}.{}", info.format_major, info.format_minor));
  line("store id", info.store_id);
  line("created", utc_time(info.created_unix_ns));
  line("last commit",
       info.last_commit_unix_ns != 0 ? utc_time(info.last_commit_unix_ns) : "unknown");
  line("dtype", std::string(dtype_name(info.dtype)));
  line("dim", std::to_string(info.dim));
  line("record bytes", std::to_string(info.record_bytes));
  line("segment bytes", std::to_string(info.segment_bytes));
  line("segments", std::to_string(segments));
  line("generation", std::to_string(info.generation));
  line("committed rows", std::to_string(info.committed_rows));
  line("durable rows", std::to_string(info.durable_rows));
  if (info.rows_to_cut > 0) {
    line("rows to cut", fmt::format("{} ({})", info.rows_to_cut, rows_to_cut_text(info)));
  }
  line("capacity rows", std::to_string(info.capacity_rows));
  line("data file", fmt::format("{} bytes", info.data_file_bytes));
  line("index file", fmt::format("{} bytes", info.index_file_bytes));
  std::string leftovers;
  for (const std::string& name : disk.leftovers) {
    leftovers += (leftovers.empty() ? "" : ", ") + name;
  }
  line("bytes on disk",
       disk.leftovers.empty()
           ? fmt::format("{} bytes", disk.disk_bytes)
           : fmt::format("{} bytes, {} of them in {}: files of a truncate or key index "
                         "build, running or interrupted, which the next writer removes",
                         disk.disk_bytes, disk.leftover_disk_bytes, leftovers));
  line("metadata", info.metadata.empty() ? "(none)" : info.metadata);
  line("key index", info.key_index);
  if (keys) {
    line("distinct keys", fmt::format("{} ({})", keys->distinct_keys,
                                      from_index ? "key index" : "scan of the offset index"));
    line("epochs", std::to_string(keys->epochs.size()));
    if (!keys->epochs.empty()) {
      Table epochs(from_index ? std::vector<std::string>{"epoch", "rows"}
                              : std::vector<std::string>{"epoch", "rows", "distinct keys"});
      for (const auto& e : keys->epochs) {
        if (from_index) {
          epochs.add({std::to_string(e.epoch), std::to_string(e.rows)});
        } else {
          epochs.add(
              {std::to_string(e.epoch), std::to_string(e.rows), std::to_string(e.distinct_keys)});
        }
      }
      epochs.print("  ");
    }
  }
  return kExitOk;
}

int run_rebuild_index(const std::string& store) {
  Writer writer = Writer::open(store);
  writer.rebuild_key_index();
  writer.close();
  note_done("rebuilt the key index of " + store);
  print_out("rebuilt the key index of {}: {}\n", store, read_info(store).key_index);
  return kExitOk;
}

struct VerifyArgs {
  std::string store;
  std::optional<std::uint64_t> from;
  std::optional<std::uint64_t> to;
  bool json = false;
  bool quiet = false;
};

int run_verify(const VerifyArgs& args) {
  const Reader reader = Reader::open(args.store);
  const std::uint64_t begin = args.from.value_or(0);
  const std::uint64_t end = tools::checked_end_row(reader, begin, args.to);
  VerifyReport total;
  total.begin_row = begin;
  total.end_row = end;
  // The key index (when there is one) is checked for the whole snapshot only: it indexes
  // every row from 0. A block that is the whole snapshot has it checked by verify() already;
  // that first check is the one reported. A second would find the index marked damaged by the
  // first (Reader::verify_key_index()) and count that mark as one problem, quoting the first
  // check's count inside its text.
  const bool whole = begin == 0 && end == reader.size();
  std::optional<VerifyReport> keys_checked;
  {
    Progress progress("verifying", args.quiet);
    for (std::uint64_t block = begin; block < end; block += kVerifyBlockRows) {
      const std::uint64_t block_end = std::min(end, block + kVerifyBlockRows);
      const VerifyReport report = reader.verify(block, block_end);
      if (block == 0 && block_end == reader.size()) keys_checked = report;
      total.rows_checked += report.rows_checked;
      total.bad_row_count += report.bad_row_count;
      for (std::uint64_t row : report.bad_rows) {
        if (total.bad_rows.size() < VerifyReport::kMaxListed) total.bad_rows.push_back(row);
      }
      progress.update(block_end - begin, end - begin);
    }
  }
  const VerifyReport keys = !whole         ? VerifyReport{}
                            : keys_checked ? *keys_checked
                                           : reader.verify_key_index();
  // The header and the rows a reboot left to cut do not depend on the rows asked for: checked
  // whatever the range.
  total.header_problem = reader.verify_header();
  const StoreInfo state = reader.info(InfoDetail::kState);
  total.rows_to_cut = state.rows_to_cut;
  const std::string& header = total.header_problem;
  // Keys and epochs as the index entry says: the entry itself may be what is damaged.
  auto key_of = [&](std::uint64_t row) { return reader.keys(row, row + 1)[0]; };
  auto epoch_of = [&](std::uint64_t row) { return reader.epochs(row, row + 1)[0]; };
  if (args.json) {
    nlohmann::json bad = nlohmann::json::array();
    for (std::uint64_t row : total.bad_rows) {
      bad.push_back({{"row", row}, {"key", key_of(row)}, {"epoch", epoch_of(row)}});
    }
    print_json({{"path", reader.path()},
                {"begin_row", begin},
                {"end_row", end},
                {"rows_checked", total.rows_checked},
                {"bad_row_count", total.bad_row_count},
                {"bad_rows", bad},
                {"key_index",
                 {{"checked", keys.key_index_checked},
                  {"problems", keys.key_index_problems},
                  {"first_problem", keys.key_index_problem}}},
                {"header_problem", header},
                {"rows_to_cut", total.rows_to_cut}});
  } else {
    print_out("{}: checked rows [{}, {}): {} bad\n", reader.path(), begin, end,
              total.bad_row_count);
    if (!total.bad_rows.empty()) {
      Table table({"bad row", "key", "epoch"});
      for (std::uint64_t row : total.bad_rows) {
        table.add(
            {std::to_string(row), std::to_string(key_of(row)), std::to_string(epoch_of(row))});
      }
      table.print();
      if (total.bad_rows.size() < total.bad_row_count) {
        print_out("... and {} more\n", total.bad_row_count - total.bad_rows.size());
      }
    }
    if (keys.key_index_problems > 0) {
      print_out("key index: {}: {} (repair it: embstore rebuild-index {})\n",
                tools::counted(keys.key_index_problems, "problem"), keys.key_index_problem,
                shell_quoted(args.store));
    } else if (keys.key_index_checked) {
      print_out("key index: consistent with the offset index\n");
    } else if (whole) {
      print_out("key index: none to check ({})\n", reader.info().key_index);
    }
    if (!header.empty()) {
      // rebuild-index opens a writer, but refuses a store made without a key index.
      print_out(
          "header: {} (nothing is lost; a writer opening the store repairs it{})\n", header,
          reader.info().keeps_key_index
              ? fmt::format(": embstore rebuild-index {}, or any Writer", shell_quoted(args.store))
              : std::string(": the next one to append"));
    }
    if (total.rows_to_cut > 0) {
      print_out("{} to cut: {}\n", tools::counted(total.rows_to_cut, "row"),
                rows_to_cut_text(state));
    }
  }
  return total.ok() && keys.ok() ? kExitOk : kExitDamage;
}

}  // namespace

void add_store_commands(CLI::App& app, Registry& registry) {
  {
    auto args = std::make_shared<CreateArgs>();
    CLI::App* cmd = app.add_subcommand("create", "Create an empty store");
    cmd->add_option("store", args->store, "Store directory to create")->required();
    cmd->add_option("--dim", args->dim, "Elements per row (1 .. 2^24)")
        ->required()
        ->transform(unsigned_validator("a dimension"));
    cmd->add_option("--dtype", args->dtype, "Element type: " + dtype_names())
        ->check(dtype_validator())
        ->capture_default_str();
    // Checked by segment_bytes_from_mb(), which names the value (CLI11's range check printed
    // the whole range of a double).
    cmd->add_option("--segment-mb", args->segment_mb, "Growth step of the data file, MiB")
        ->capture_default_str();
    cmd->add_option("--metadata", args->metadata, "Free-form metadata; must parse as JSON");
    cmd->add_flag("--no-key-index", args->no_key_index,
                  "Keep no key index: the store stays smaller (up to 112 B/row less), lookups "
                  "(get) scan every row");
    cmd->add_flag("--json", args->json, "Print the new store's info as JSON");
    cmd->footer(
        "Example: embstore create run.emb --dim 768 --dtype float16 "
        "--metadata '{\"model\":\"resnet\"}'");
    registry.add(cmd, [args] { return run_create(*args); });
  }
  {
    auto args = std::make_shared<InfoArgs>();
    CLI::App* cmd = app.add_subcommand(
        "info",
        "Header, counters, files on disk, epochs with rows and distinct keys (from the key "
        "index, else a scan) (read-only)");
    cmd->add_option("store", args->store, "Store directory")->required();
    cmd->add_flag("--json", args->json, "One JSON object on stdout");
    CLI::Option* scan =
        cmd->add_flag("--scan", args->scan,
                      "Count epochs and distinct keys (also per epoch) by a scan of the offset "
                      "index, even when the key index has them");
    cmd->add_flag("--no-scan", args->no_scan,
                  "Without a usable key index, skip the scan for epochs and distinct keys")
        ->excludes(scan);
    cmd->add_flag("-q,--quiet", args->quiet, "No progress bar");
    cmd->footer("Example: embstore info run.emb --json");
    registry.add(cmd, [args] { return run_info(*args); });
  }
  {
    auto args = std::make_shared<VerifyArgs>();
    CLI::App* cmd = app.add_subcommand(
        "verify",
        "Recompute every row's checksum and check the key index and both copies of the header; "
        "exit 1 naming bad rows, the key index's first problem, a damaged header copy or rows a "
        "reboot left for the next writer to cut (read-only)");
    cmd->add_option("store", args->store, "Store directory")->required();
    cmd->add_option("--from", args->from, "First row to check (default 0)")
        ->transform(unsigned_validator("a row number"));
    cmd->add_option("--to", args->to, "Row to stop before (default: all committed rows)")
        ->transform(unsigned_validator("a row number"));
    cmd->add_flag("--json", args->json, "One JSON object on stdout");
    cmd->add_flag("-q,--quiet", args->quiet, "No progress bar");
    cmd->footer("Example: embstore verify run.emb --from 1000 --to 2000");
    registry.add(cmd, [args] { return run_verify(*args); });
  }
  {
    auto store = std::make_shared<std::string>();
    CLI::App* cmd = app.add_subcommand(
        "rebuild-index",
        "Rebuild the key index from the offset index, for one verify reports damaged (takes the "
        "writer lock; about a second per 10M rows)");
    cmd->add_option("store", *store, "Store directory")->required();
    cmd->footer("Example: embstore rebuild-index run.emb");
    registry.add(cmd, [store] { return run_rebuild_index(*store); });
  }
  {
    auto json = std::make_shared<bool>(false);
    CLI::App* cmd = app.add_subcommand("version", "Library and on-disk format versions");
    cmd->add_flag("--json", *json, "One JSON object on stdout");
    registry.add(cmd, [json] {
      if (*json) {
        print_json({{"library", kLibraryVersion},
                    {"format", fmt::format("{}.{}", kFormatVersionMajor, kFormatVersionMinor)},
                    // As info --json names a store's format.
                    {"format_major", kFormatVersionMajor},
                    {"format_minor", kFormatVersionMinor}});
      } else {
        print_out("embstore {} (format {}.{})\n", kLibraryVersion, kFormatVersionMajor,
                  kFormatVersionMinor);
      }
      return kExitOk;
    });
  }
}

}  // namespace embstore::cli
