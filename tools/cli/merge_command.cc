// merge: consolidates the shards of a manifest (or several stores) into one new store, through
// the library's merge_stores (include/embstore/shard_set.h), which verifies every row on the way.
#include <fmt/core.h>

#include <memory>
#include <string>
#include <vector>

#include "cli.h"
#include "embstore/shard_set.h"

namespace embstore::cli {
namespace {

struct MergeArgs {
  std::string out;
  std::vector<std::string> inputs;
  bool json = false;
  bool quiet = false;
};

// Metadata text for a note: quoted, at most 80 characters of it.
std::string quoted(const std::string& text) {
  return "'" + (text.size() <= 80 ? text : text.substr(0, 77) + "...") + "'";
}

// Says on stderr which shards' epochs go down somewhere (epoch_drops(): merging by epoch may
// then keep another row as a key's latest than the ShardSet does).
void note_epochs_going_down(const ShardSet& shards) {
  for (const EpochDrop& drop : epoch_drops(shards)) {
    fmt::print(stderr,
               "embstore merge: note: {}: its epochs go down at row {} ({} after {}); rows were "
               "merged by epoch, so for a key stored there on both sides of that row, the "
               "merged store's latest row may be another than the ShardSet's (which keeps the "
               "shard's later row)\n",
               shards.shard_path(drop.shard), drop.row, drop.epoch, drop.previous);
  }
}

// Says on stderr which shards' metadata the manifest's replaces in the merged store
// (metadata_overrides()): a manifest's choice, named rather than taken without a word.
void note_metadata_replaced(const ShardSet& shards) {
  for (const std::size_t s : metadata_overrides(shards)) {
    fmt::print(stderr,
               "embstore merge: note: {}: its metadata {} is not the manifest's {}; the merged "
               "store gets the manifest's\n",
               shards.shard_path(s), quoted(shards.shard(s).metadata()), quoted(shards.metadata()));
  }
}

int run_merge(const MergeArgs& args) {
  install_work_stop_handlers();  // Ctrl-C cleans up (cli.h).
  const ShardSet shards = ShardSet::open(args.inputs);
  note_epochs_going_down(shards);
  note_metadata_replaced(shards);
  StoreInfo info;
  std::string warning;
  {
    Progress progress("merging", args.quiet);
    info = merge_stores(
        args.out, shards,
        [&](const MergeProgress& p) { progress.update(p.rows_done, p.rows_total); }, &warning);
  }
  note_done(fmt::format("wrote {} to {}", tools::counted(info.committed_rows, "row"), args.out));
  if (args.json) {
    nlohmann::json out = info_json(info);
    out["shards"] = shards.shard_count();
    print_json(out);
  } else {
    print_out("merged {}, {}, into {}\n", tools::counted(shards.shard_count(), "shard"),
              tools::counted(info.committed_rows, "row"), args.out);
  }
  warn("merge", warning);
  return kExitOk;
}

}  // namespace

void add_merge_command(CLI::App& app, Registry& registry) {
  auto args = std::make_shared<MergeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "merge",
      "Consolidate the shards of a manifest, or several stores, into one new store (every row's "
      "checksum is verified; shards that disagree on dim or dtype are refused by name)");
  cmd->add_option("out", args->out, "The new store (must not exist)")->required();
  cmd->add_option("inputs", args->inputs,
                  "A manifest (file or its directory) alone, or store directories")
      ->required();
  cmd->add_flag("--json", args->json, "Print the new store's info as JSON");
  cmd->add_flag("-q,--quiet", args->quiet, "No progress bar");
  registry.add(cmd, [args] { return run_merge(*args); });
}

}  // namespace embstore::cli
