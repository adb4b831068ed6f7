// truncate: roll a store back to a prefix (Writer::truncate / truncate_from_epoch), for training
// that resumes from a checkpoint; says what it drops, and asks first unless --yes.
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "cli.h"

namespace embstore::cli {
namespace {

struct TruncateArgs {
  std::string store;
  std::optional<std::uint64_t> rows;
  std::optional<std::uint64_t> from_epoch;
  bool yes = false;
  bool json = false;
};

struct Plan {
  std::uint64_t rows_before = 0;
  std::uint64_t keep = 0;
  std::map<std::uint64_t, std::uint64_t> dropped_epochs;  // epoch -> rows dropped
  std::string path;  // The store's, absolute, as Reader::path() gives it.
  std::string store_id;
  std::uint64_t generation = 0;  // Of the snapshot the plan was made from.
};

// What the truncate would drop, as `reader`'s snapshot shows the store.
Plan plan_truncate(const TruncateArgs& args, const Reader& reader) {
  Plan plan;
  plan.path = reader.path();
  plan.store_id = reader.info().store_id;
  plan.generation = reader.generation();
  plan.rows_before = reader.size();
  const auto epochs = reader.epochs(0, plan.rows_before);
  if (args.rows) {
    if (*args.rows > plan.rows_before) {
      throw Error(ErrorCode::kInvalidArgument,
                  fmt::format("{}: --rows {} is more than the {} the store holds", args.store,
                              *args.rows, tools::counted(plan.rows_before, "row")));
    }
    plan.keep = *args.rows;
  } else {
    plan.keep = plan.rows_before;
    for (std::uint64_t row = 0; row < plan.rows_before; ++row) {
      if (epochs[row] >= *args.from_epoch) {
        plan.keep = row;
        break;
      }
    }
  }
  for (std::uint64_t row = plan.keep; row < plan.rows_before; ++row) {
    ++plan.dropped_epochs[epochs[row]];
  }
  return plan;
}

// Whether two plans drop the same rows: the same rows of the same files of the same store.
bool same_cut(const Plan& a, const Plan& b) {
  return a.store_id == b.store_id && a.generation == b.generation && a.keep == b.keep &&
         a.rows_before == b.rows_before;
}

std::string epochs_text(const std::map<std::uint64_t, std::uint64_t>& epochs) {
  std::string text;
  for (const auto& [epoch, rows] : epochs) {
    if (text.size() > 200) {  // One line, however many epochs.
      text += ", ...";
      break;
    }
    text +=
        fmt::format("{}epoch {}: {}", text.empty() ? "" : ", ", epoch, tools::counted(rows, "row"));
  }
  return text;
}

std::string question(const TruncateArgs& args, const Plan& plan) {
  return fmt::format("drop rows [{}, {}) of {} ({})", plan.keep, plan.rows_before, args.store,
                     epochs_text(plan.dropped_epochs));
}

// Without --yes: refuses when stdin is no terminal to ask on.
void require_terminal(const TruncateArgs& args, const Plan& plan) {
  if (::isatty(STDIN_FILENO) != 1) {
    throw Error(ErrorCode::kInvalidArgument, "refusing to " + question(args, plan) +
                                                 " without --yes (stdin is not a terminal to ask)");
  }
}

bool confirmed(const TruncateArgs& args, const Plan& plan) {
  std::fprintf(stderr, "%s? [y/N] ", question(args, plan).c_str());
  std::string answer;
  std::getline(std::cin, answer);
  // y or yes in any case, spaces around it ignored ("YES" and "Yes " were a no).
  const auto first = answer.find_first_not_of(" \t\r");
  const auto last = answer.find_last_not_of(" \t\r");
  answer = first == std::string::npos ? "" : answer.substr(first, last - first + 1);
  for (char& c : answer) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return answer == "y" || answer == "yes";
}

// The epochs of rows [begin, end) of `reader`'s snapshot, with their row counts.
std::map<std::uint64_t, std::uint64_t> epochs_of(const Reader& reader, std::uint64_t begin,
                                                 std::uint64_t end) {
  std::map<std::uint64_t, std::uint64_t> counts;
  if (begin >= end) return counts;
  const auto epochs = reader.epochs(begin, end);
  for (std::uint64_t i = 0; i < end - begin; ++i) ++counts[epochs[i]];
  return counts;
}

int run_truncate(const TruncateArgs& args) {
  if (args.rows.has_value() == args.from_epoch.has_value()) {
    throw CLI::ValidationError("exactly one of --rows and --from-epoch is required");
  }
  Plan plan = plan_truncate(args, Reader::open(args.store));
  std::uint64_t before = plan.rows_before, kept = plan.keep, generation = plan.generation;
  std::map<std::uint64_t, std::uint64_t> dropped_epochs;
  if (plan.keep < plan.rows_before && !args.yes) require_terminal(args, plan);
  while (plan.keep < plan.rows_before) {
    if (!args.yes && !confirmed(args, plan)) {
      std::fprintf(stderr, "embstore truncate: nothing changed\n");
      return kExitUsage;
    }
    Writer writer = Writer::open(args.store);
    // The report is counted from a snapshot taken just before the truncate, whose views still
    // show the rows it dropped once it is done. Asked on a terminal, it must drop the rows the
    // answer was about: if other writers appended (or another truncate ran) while the question
    // was asked, the question is asked again with the rows it would drop now. Rows committed
    // in the instant between this snapshot and the truncate's lock are dropped too (they are
    // past the cut) and not counted; --yes drops whatever is past the cut when it runs.
    const Reader snapshot = Reader::open(args.store);
    if (!args.yes) {
      Plan now = plan_truncate(args, snapshot);
      if (!same_cut(plan, now)) {
        std::fprintf(stderr,
                     "embstore truncate: %s changed while it asked (another process appended "
                     "rows or truncated it): nothing dropped; the rows to drop are no longer "
                     "[%llu, %llu)\n",
                     args.store.c_str(), static_cast<unsigned long long>(plan.keep),
                     static_cast<unsigned long long>(plan.rows_before));
        plan = std::move(now);
        before = plan.rows_before;
        kept = plan.keep;
        generation = plan.generation;
        continue;
      }
    }
    kept = args.rows ? writer.truncate(*args.rows) : writer.truncate_from_epoch(*args.from_epoch);
    before = std::max(snapshot.size(), kept);
    dropped_epochs = epochs_of(snapshot, kept, before);
    generation = writer.info().generation;
    writer.close();
    note_done(fmt::format("{}: kept rows [0, {}), dropped {}; now generation {}", args.store, kept,
                          before - kept, generation));
    break;
  }
  const std::uint64_t dropped = before - kept;
  if (args.json) {
    nlohmann::json epochs = nlohmann::json::array();
    for (const auto& [epoch, rows] : dropped_epochs) {
      epochs.push_back({{"epoch", epoch}, {"rows", rows}});
    }
    print_json({{"store", args.store},
                {"path", plan.path},  // As create, info and verify name the store.
                {"rows_before", before},
                {"rows_kept", kept},
                {"rows_dropped", dropped},
                {"generation", generation},
                {"dropped_epochs", epochs}});
    return kExitOk;
  }
  if (dropped == 0) {
    print_out("{}: nothing to drop ({} kept)\n", args.store, tools::counted(kept, "row"));
  } else {
    print_out("{}: kept rows [0, {}), dropped {} [{}, {}) ({}); now generation {}\n", args.store,
              kept, tools::counted(dropped, "row"), kept, before, epochs_text(dropped_epochs),
              generation);
  }
  return kExitOk;
}

}  // namespace

void add_truncate_command(CLI::App& app, Registry& registry) {
  auto args = std::make_shared<TruncateArgs>();
  CLI::App* cmd = app.add_subcommand(
      "truncate",
      "Roll a store back when training resumes from a checkpoint: keep the first --rows N rows, "
      "or the rows before the first one of an epoch >= --from-epoch E, and drop every later row "
      "(takes the writer lock; killed at any instant it leaves the old store or the new one)");
  cmd->add_option("store", args->store, "Store directory")->required();
  CLI::Option* rows = cmd->add_option("--rows", args->rows, "Rows to keep")
                          ->transform(unsigned_validator("a row count"));
  CLI::Option* epoch =
      cmd->add_option("--from-epoch", args->from_epoch,
                      "Drop the first row whose epoch is >= E and every row after it")
          ->transform(unsigned_validator("an epoch"));
  rows->excludes(epoch);
  cmd->add_flag("-y,--yes", args->yes,
                "Do not ask: drop every row past the cut as the store is when it runs (without "
                "it, asks on a terminal and refuses otherwise; if the rows to drop change while "
                "it asks, says so and asks again)");
  cmd->add_flag("--json", args->json, "One JSON object on stdout");
  cmd->footer(
      "Exit status: 0 done (or nothing to drop), 2 usage (neither or both of --rows and "
      "--from-epoch, more rows than the store holds, no --yes off a terminal, or the answer "
      "was no), 10 + error code otherwise.\n"
      "Examples: embstore truncate run.emb --from-epoch 5 --yes ; "
      "embstore truncate run.emb --rows 1000000 --yes --json");
  registry.add(cmd, [args] { return run_truncate(*args); });
}

}  // namespace embstore::cli
