// salvage: the rows that verify, out of a store too damaged to open, into a new store, through
// the library's salvage (include/embstore/salvage.h); reports what was lost.
#include <fmt/core.h>

#include <memory>
#include <string>

#include "cli.h"
#include "embstore/salvage.h"

namespace embstore::cli {
namespace {

struct SalvageArgs {
  std::string store;
  std::string out;
  bool json = false;
  bool quiet = false;
};

int run_salvage(const SalvageArgs& args) {
  install_work_stop_handlers();  // Ctrl-C cleans up (cli.h).
  SalvageReport report;
  {
    Progress progress("salvaging", args.quiet);
    report = salvage(args.store, args.out, [&](std::uint64_t done, std::uint64_t total) {
      progress.update(done, total);
    });
  }
  note_done(fmt::format("copied {} of {} rows of {} into {}, {} lost", report.rows_copied,
                        report.rows_scanned, args.store, args.out, report.rows_lost));
  // Damage found: rows that did not verify, a primary header that did not, or a field that
  // keeps the store from opening (a counter, the generation).
  const bool damaged =
      report.rows_lost != 0 || report.header_source != "primary" || !report.damage.empty();
  if (args.json) {
    nlohmann::json lost = nlohmann::json::array();
    for (const auto& [begin, end] : report.lost_ranges) lost.push_back({begin, end});
    print_json({{"store", args.store},
                {"path", report.path},  // As create, info and verify name the store.
                {"out", args.out},
                {"header_source", report.header_source},
                {"rows_scanned", report.rows_scanned},
                {"rows_copied", report.rows_copied},
                {"rows_lost", report.rows_lost},
                {"lost_ranges", lost},
                {"damage", report.damage},
                {"writer_active", report.writer_active}});
  } else {
    // "primary" or "copy": the header copy that verified.
    print_out("{}: copied {} of {} rows into {} (header: {})\n", args.store, report.rows_copied,
              report.rows_scanned, args.out,
              report.header_source == std::string("copy") ? "second copy" : "primary copy");
    for (const std::string& damage : report.damage) print_out("damaged: {}\n", damage);
    if (report.writer_active) {
      print_out(
          "a writer was at work on the store: copied the rows committed when salvage read it, "
          "not the writer's rows after them\n");
    }
    if (report.rows_lost == 0) {
      print_out("no row lost\n");
    } else {
      print_out("lost {}:\n", tools::counted(report.rows_lost, "row"));
      Table table({"first row", "end row", "rows"});
      for (const auto& [begin, end] : report.lost_ranges) {
        table.add({std::to_string(begin), std::to_string(end), std::to_string(end - begin)});
      }
      table.print("  ");
    }
  }
  warn("salvage", report.warning);
  return damaged ? kExitDamage : kExitOk;
}

}  // namespace

void add_salvage_command(CLI::App& app, Registry& registry) {
  auto args = std::make_shared<SalvageArgs>();
  CLI::App* cmd = app.add_subcommand(
      "salvage",
      "Copy every row whose checksum verifies, with its key and epoch, out of a damaged store into "
      "a new one and report the rows lost; exit 1 if anything was damaged (reads STORE only)");
  cmd->add_option("store", args->store, "The damaged store directory (left unchanged)")->required();
  cmd->add_option("out", args->out, "The new store (must not exist)")->required();
  cmd->add_flag("--json", args->json, "One JSON object on stdout");
  cmd->add_flag("-q,--quiet", args->quiet, "No progress bar");
  cmd->footer("Example: embstore salvage run.emb run-salvaged.emb --json");
  registry.add(cmd, [args] { return run_salvage(*args); });
}

}  // namespace embstore::cli
