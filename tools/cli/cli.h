// cli.h — what every embstore subcommand shares: exit codes, the registry that main() runs,
// option helpers, the progress bar and table output.
#pragma once

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "embstore/embstore.h"
#include "rows.h"

namespace embstore::cli {

// Exit statuses, the same for every command (README, "Command-line tool").
inline constexpr int kExitOk = 0;
inline constexpr int kExitDamage = 1;  // verify found rows that fail their checksum.
inline constexpr int kExitUsage = 2;   // A bad option or argument (ErrorCode::kInvalidArgument).
inline constexpr int kExitErrorBase = 10;  // 10 + ErrorCode for every other embstore::Error.

// The exit status for an embstore::Error.
int exit_status(const Error& error);

// A subcommand's work, run by main() after the whole command line parsed.
using Action = std::function<int()>;

// Every subcommand registers itself here: its CLI11 app and what to run when it is chosen.
class Registry {
 public:
  void add(CLI::App* command, Action action) { commands_.emplace_back(command, std::move(action)); }
  const std::vector<std::pair<CLI::App*, Action>>& commands() const { return commands_; }

 private:
  std::vector<std::pair<CLI::App*, Action>> commands_;
};

void add_store_commands(CLI::App& app, Registry& registry);     // create info verify version
void add_row_commands(CLI::App& app, Registry& registry);       // head tail
void add_get_command(CLI::App& app, Registry& registry);        // get (by key, epoch)
void add_transfer_commands(CLI::App& app, Registry& registry);  // export import compact
void add_serve_command(CLI::App& app, Registry& registry);
void add_merge_command(CLI::App& app, Registry& registry);  // merge (shards into one store)
void add_salvage_command(CLI::App& app, Registry& registry);
void add_truncate_command(CLI::App& app, Registry& registry);  // truncate (roll back)
void add_bench_command(CLI::App& app, Registry& registry);

// A CLI11 validator that accepts the dtype names parse_dtype() knows and names them otherwise.
CLI::Validator dtype_validator();
// Every dtype name parse_dtype() accepts, from the library's table (dtype_aliases()), for help
// texts and messages: "float32 (f4), float16 (f2, half), ...".
std::string dtype_names();
// A CLI11 validator that refuses an empty path (an option given as "" is given: it must not
// read as one left out).
CLI::Validator non_empty_path();
// A CLI11 validator for a non-negative decimal integer (a row, a key, an epoch, a count):
// "-3" or "1e3" are refused with a message naming `what`, never wrapped around; "010" is ten.
// It rewrites the text to its canonical decimal form, so add it with ->transform(), never
// ->check() (which hands it a copy: CLI11 would then read "010" as octal 8).
CLI::Validator unsigned_validator(const std::string& what);

// Adds option `name` to `cmd`: non-negative integers (unsigned_validator's rules, each named
// `what`), given as a comma list, the option repeated, or both ("--epoch 1,2 --epoch 5"), into
// `out`. An empty item ("1,,2", "3,", ",") is refused naming the text: CLI11's own comma lists
// drop it without a word, so a list with a typo ran as another list.
CLI::Option* add_unsigned_list(CLI::App* cmd, const std::string& name,
                               std::vector<std::uint64_t>& out, const std::string& description,
                               const std::string& what);

// parse_dtype() of a name the validator has accepted.
DType dtype_from_name(const std::string& name);

// --segment-mb as bytes; kInvalidArgument naming the value when it is not a finite number of
// MiB in (0, 2^20] (the library checks the rest: a multiple of 4 KiB, at least one row).
std::uint64_t segment_bytes_from_mb(double mb);

// Parses --metadata text as JSON (nlohmann-json) and returns it unchanged; throws
// kInvalidArgument with the parser's message otherwise.
std::string checked_metadata(const std::string& text);

// Progress on stderr with rate and ETA, drawn only when stderr is a terminal and not --quiet;
// at most ten times a second. Thread-compatible.
class Progress {
 public:
  Progress(std::string label, bool quiet);
  ~Progress();  // Clears the line.
  // A callback for the library's long operations (drawing unless quiet); null only when it has
  // nothing to do (quiet, and no install_work_stop_handlers()).
  tools::ProgressFn fn();
  // Draws the line (at most every 0.1 s, unless quiet or stderr is no terminal); first throws
  // the kInterrupted error after install_work_stop_handlers() once a stop signal came.
  void update(std::uint64_t done, std::uint64_t total);

 private:
  std::string label_;
  bool enabled_;
  bool drawn_ = false;
  std::int64_t start_ns_ = 0;
  std::int64_t last_draw_ns_ = 0;
};

// Standard output. Every command writes it through write_stdout() (print_out(), print_json(),
// Table::print() call it), and main() flushes and checks it once more after the command ran: a
// write that fails is an error (exit status 17, "cannot write to stdout: ..."), never output
// lost behind exit status 0 (README, "Command-line tool").

// stdout could not be written: an Error with code kIO and the errno (0 when it is not known).
class StdoutError : public Error {
 public:
  explicit StdoutError(int err);
};

// Writes `text` on stdout (buffered, in chunks of up to PIPE_BUF bytes that end at a line end
// where one is in reach: atomic into a pipe); throws StdoutError when that fails, except
// for EPIPE (the reader of a pipe went away) and a stop signal that interrupted a blocked
// write (install_stop_handlers()), which are kept for flush_stdout() to report. Other EINTR
// is retried. Once a write failed, the rest of the output is dropped.
void write_stdout(std::string_view text);

// fmt::print on stdout, through write_stdout().
template <typename... T>
void print_out(fmt::format_string<T...> format, T&&... args) {
  write_stdout(fmt::format(format, std::forward<T>(args)...));
}

// Flushes stdout and checks every write to it so far: true when all of them reached it, false
// when its reader went away (EPIPE) or a stop signal ended a write that was blocked; throws
// StdoutError on any other failure.
bool flush_stdout();

// For head and tail, which end when the reader of stdout goes away (tail -f | head -5) or on a
// stop signal: forgets what flush_stdout() returned false for, so that main() does not report
// it.
void accept_closed_stdout();

// For tail -f, which ends on SIGINT and SIGTERM with exit 0: from now on they only set
// stop_requested(), and interrupt a write to stdout blocked on a reader that does not read
// (the output then ends after the last whole line written; a second signal ends it even in the
// middle of a line longer than PIPE_BUF).
void install_stop_handlers();
bool stop_requested();

// For the commands that write (export, import, compact, merge, salvage): from now on SIGINT and
// SIGTERM set stop_requested() (system calls restarted), and every Progress::update() throws
// an Error with code kInterrupted ("interrupted by SIGINT"), so the command's clean-up runs: a
// new output's hidden working directory is removed, an import into an existing store says
// which rows stay there. A second signal ends the process at once, as without handlers. main()
// exits 128 + the signal's number for such an error (130 for SIGINT), as a shell does.
void install_work_stop_handlers();
// The signal that stop_requested() answers for (SIGINT or SIGTERM), 0 when none came.
int stop_signal();
// The kInterrupted error a command stopped by that signal ends with ("interrupted by SIGINT").
Error interrupted_error();

// Called by a command once its action has changed something on disk, with what it did in a few
// words ("run.emb: kept rows [0, 20)"): if stdout then fails, main() says the action was done
// and only its report was lost, not just that stdout failed. A closed pipe too: SIGPIPE is
// ignored from here, so its write fails (EPIPE) rather than kill the process without a word.
void note_done(std::string what);
// What note_done() was given, or "" when nothing was done.
const std::string& done_note();

// A command that succeeded with a warning (a new output whose key index could not be kept):
// "embstore COMMAND: warning: TEXT" on stderr, after the report on stdout; the exit status
// stays 0 (README, "Command-line tool"). Nothing when `text` is empty.
void warn(const std::string& command, const std::string& text);

// What an error line adds for the errno `err` of a failed write: for EFBIG under a file-size
// limit (RLIMIT_FSIZE, ulimit -f; main() ignores SIGXFSZ, so a write past it fails instead of
// killing the process), " (the file-size limit is N bytes: raise ulimit -f)"; else "".
std::string errno_hint(int err);

// `text` as one word of a POSIX shell command line: as it is when it holds only characters no
// shell treats specially (letters, digits, and @%+=:,./-_), else in single quotes (a quote in it
// as '\''). For every hint that prints a command to run ("repair it: embstore rebuild-index
// 'sp ace/s t.emb'").
std::string shell_quoted(std::string_view text);

// The row, key and epoch columns that head, tail and get print: right-aligned, each as wide as
// its name in the header, its former width (12, 20, 10) and the widest value fit() was given,
// so that a wide epoch (up to 20 digits) does not shift the columns after it.
class RowColumns {
 public:
  void fit(std::uint64_t row, std::uint64_t epoch);
  // "row  key  epoch" aligned, then `rest` (the column names that follow) and a line end.
  std::string header(std::string_view rest) const;
  // A row's three cells, aligned as the header, without a line end.
  std::string cells(std::uint64_t row, std::uint64_t key, std::uint64_t epoch) const;

 private:
  std::size_t row_width_ = 12;
  std::size_t epoch_width_ = 10;
};

// Rows of text printed in aligned columns on stdout: numbers (cells starting with a digit)
// right-aligned.
class Table {
 public:
  explicit Table(std::vector<std::string> header) { rows_.push_back(std::move(header)); }
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  void print(const std::string& indent = "") const;

 private:
  std::vector<std::vector<std::string>> rows_;
};

// The header and counters as JSON (the fields of StoreInfo, last_commit_unix_ns 0 when unknown;
// format_major and format_minor: the names Python's embstore.info() uses for every field).
nlohmann::json info_json(const StoreInfo& info);

// A row's values as a JSON array (integers for int8/uint8, numbers for the float types, except
// NaN, +inf and -inf, which JSON numbers cannot hold: the strings "NaN", "Infinity" and
// "-Infinity", as in protobuf's JSON mapping) and as text ("v0 v1 ..."), decoded from the
// store's dtype.
nlohmann::json vector_json(const Reader& reader, const Record& record);
std::string vector_text(const Reader& reader, const Record& record);

// Prints `value` as one line of JSON on stdout, through write_stdout().
void print_json(const nlohmann::json& value);

// "2026-12-01T20:11:05Z" for nanoseconds since the Unix epoch.
std::string utc_time(std::int64_t unix_ns);

// CLOCK_MONOTONIC in nanoseconds (progress rates, `embstore bench` timings).
std::int64_t now_ns();

}  // namespace embstore::cli
