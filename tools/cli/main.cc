// embstore — the command-line tool. Every command and its options: `embstore --help` and
// `embstore CMD --help`; the README's "Command-line tool" section has an example of each.
// Built on the public headers only; read-only commands never change a byte of a store.
#include <CLI/CLI.hpp>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <exception>
#include <sstream>
#include <string>

#include "cli.h"

namespace {

// The one line a command whose stdout cannot be written ends with. A command that had already
// changed something says so, since the user cannot tell from the missing report.
// `command` is "" for --help and --version.
int stdout_failure(const std::string& command, const embstore::cli::StdoutError& error) {
  const std::string where = command.empty() ? "embstore" : "embstore " + command;
  const std::string& done = embstore::cli::done_note();
  const std::string hint = embstore::cli::errno_hint(error.sys_errno());
  if (done.empty()) {
    std::fprintf(stderr, "%s: %s%s\n", where.c_str(), error.what(), hint.c_str());
  } else {
    std::fprintf(stderr, "%s: %s%s; the %s itself was done (%s), only its report was lost\n",
                 where.c_str(), error.what(), hint.c_str(), command.c_str(), done.c_str());
  }
  return embstore::cli::exit_status(error);
}

// Before a failed command's error line: what it printed so far (rows before a damaged one, say)
// is written, as stdio's buffer was at exit. A failure to write it adds nothing to the error.
void flush_before_error() {
  try {
    embstore::cli::flush_stdout();
  } catch (const embstore::cli::StdoutError&) {
  }
}

// --help and --version: their text is the output asked for, so a failure to write it is an
// error too. CLI11 prints it into a string here, written like every report (write_stdout()): on
// std::cout, its std::endl flushed stdio's buffer, and the reason of a failed write was lost.
int help_printed(const CLI::App& app, const CLI::Error& call) {
  std::ostringstream text;
  const int status = app.exit(call, text, std::cerr);
  try {
    embstore::cli::write_stdout(text.str());
    if (!embstore::cli::flush_stdout()) throw embstore::cli::StdoutError(EPIPE);
  } catch (const embstore::cli::StdoutError& error) {
    return stdout_failure("", error);
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  // Under a file-size limit (ulimit -f), a write past it raises SIGXFSZ, whose default action
  // kills the process with no message and no clean-up (a new output's hidden working directory
  // left behind, a truncate's next-generation files left in the store). Ignored, as the library
  // asks (embstore.h, "Caveats"), such a write fails with EFBIG: an error that names the file and
  // the limit (kFull, exit 18), after the usual clean-up.
  std::signal(SIGXFSZ, SIG_IGN);
  using namespace embstore::cli;
  CLI::App app(
      "embstore: inspect, check, follow, export, import, compact, merge, salvage and truncate "
      "embstore stores.\n"
      "Read-only commands (info, verify, head, tail, get, export, and compact on its source) "
      "take no lock and never change a byte of the store.\n"
      "Exit status: 0 ok, 1 damage found, 2 usage, 10 + error code otherwise (see the README).",
      "embstore");
  // The variables the library reads, for every command (include/embstore/options.h).
  app.footer(
      "Environment:\n"
      "  EMBSTORE_MAP_BYTES=N         address space in bytes (1 to 2^47) each open store may "
      "reserve, in place of " +
      (embstore::kDefaultMapBytes % (1ull << 40) == 0
           ? std::to_string(embstore::kDefaultMapBytes >> 40) + " TiB"
           : std::to_string(embstore::kDefaultMapBytes) + " bytes") +
      ": a store holding more (its rows plus 32 B a row, rounded up to whole segments) cannot "
      "be opened or grown past it; any other value makes every command that opens a store "
      "fail\n"
      "  EMBSTORE_ALLOW_REMOTE_FS=1   write a store on a network or FUSE file system anyway "
      "(at your own risk: the README's \"Several machines\")");
  app.set_version_flag("--version", std::string("embstore ") + embstore::kLibraryVersion +
                                        " (format " +
                                        std::to_string(embstore::kFormatVersionMajor) + "." +
                                        std::to_string(embstore::kFormatVersionMinor) + ")");
  app.require_subcommand(1, 1);
  app.fallthrough(false);
  Registry registry;
  add_store_commands(app, registry);
  add_row_commands(app, registry);
  add_get_command(app, registry);
  add_transfer_commands(app, registry);
  add_merge_command(app, registry);
  add_salvage_command(app, registry);
  add_truncate_command(app, registry);
  add_serve_command(app, registry);
  add_bench_command(app, registry);

  // A first word that is neither an option nor a command is named as such, before CLI11 would
  // call it an unexpected positional argument; an option no command comes after would be
  // reported as "A subcommand is required" (a typo: embstore --versoin).
  if (argc >= 2 && argv[1][0] == '-') {
    const std::string given = argv[1];
    bool known = false;
    for (const CLI::Option* option : app.get_options()) {
      known = known || option->check_name(given.substr(0, given.find('=')));
    }
    if (!known) {
      std::fprintf(stderr, "embstore: unknown option %s (see embstore --help)\n", argv[1]);
      return kExitUsage;
    }
  }
  if (argc >= 2 && argv[1][0] != '-') {
    bool known = false;
    for (const auto& [command, action] : registry.commands()) {
      known = known || command->check_name(argv[1]);
    }
    if (!known) {
      std::fprintf(stderr, "embstore: unknown command %s (see embstore --help)\n", argv[1]);
      return kExitUsage;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return help_printed(app, e);
  } catch (const CLI::CallForAllHelp& e) {
    return help_printed(app, e);
  } catch (const CLI::CallForVersion& e) {
    return help_printed(app, e);
  } catch (const CLI::ParseError& e) {
    // One line naming the problem; the usage banner only on --help.
    std::string where = "embstore";
    for (const CLI::App* command : app.get_subcommands()) where += " " + command->get_name();
    std::fprintf(stderr, "%s: %s (see %s --help)\n", where.c_str(), e.what(), where.c_str());
    return kExitUsage;
  }
  for (const auto& [command, action] : registry.commands()) {
    if (!command->parsed()) continue;
    try {
      const int status = action();
      // What the command printed may still sit in stdio's buffer (all of it, for a short
      // report on a file): writing it can fail only now, and that must not exit 0.
      if (!flush_stdout()) throw StdoutError(EPIPE);
      return status;
    } catch (const StdoutError& error) {
      return stdout_failure(command->get_name(), error);
    } catch (const embstore::Error& error) {
      flush_before_error();
      std::fprintf(stderr, "embstore %s: %s%s\n", command->get_name().c_str(), error.what(),
                   errno_hint(error.sys_errno()).c_str());
      return exit_status(error);
    } catch (const CLI::ParseError& e) {
      flush_before_error();
      std::fprintf(stderr, "embstore %s: %s\n", command->get_name().c_str(), e.what());
      return kExitUsage;
    } catch (const std::bad_alloc&) {
      std::fprintf(stderr, "embstore %s: out of memory\n", command->get_name().c_str());
      return kExitErrorBase + static_cast<int>(embstore::ErrorCode::kIO);
    } catch (const std::exception& e) {
      // Anything else (a filesystem_error, say) still ends in one line, never a core dump.
      flush_before_error();
      std::fprintf(stderr, "embstore %s: %s\n", command->get_name().c_str(), e.what());
      return kExitErrorBase + static_cast<int>(embstore::ErrorCode::kIO);
    }
  }
  return kExitUsage;
}
