#include "cli.h"

#include <fmt/format.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>

namespace embstore::cli {

std::int64_t now_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

namespace {

// Stop signals (install_stop_handlers(), install_work_stop_handlers()): how many came, and the
// last one's number.
volatile std::sig_atomic_t g_stop_signals = 0;
volatile std::sig_atomic_t g_stop_signal = 0;
bool g_stop_handlers = false;  // install_stop_handlers() was called.
// install_work_stop_handlers() was called: Progress::update() throws, a second signal kills.
volatile std::sig_atomic_t g_work_stops = 0;

std::string duration_text(double seconds) {
  if (seconds < 60) return fmt::format("{:.0f}s", seconds);
  if (seconds < 3600) return fmt::format("{:.0f}m{:02.0f}s", seconds / 60, std::fmod(seconds, 60));
  return fmt::format("{:.0f}h{:02.0f}m", seconds / 3600, std::fmod(seconds / 60, 60));
}

}  // namespace

int exit_status(const Error& error) {
  // Invalid arguments are usage errors whether CLI11 or the library finds them.
  if (error.code() == ErrorCode::kInvalidArgument) return kExitUsage;
  // Stopped by a signal (install_work_stop_handlers()): as a shell reports it.
  if (error.code() == ErrorCode::kInterrupted && g_work_stops && stop_signal() != 0) {
    return 128 + stop_signal();
  }
  return kExitErrorBase + static_cast<int>(error.code());
}

std::string dtype_names() {
  // The table lists each canonical name (dtype_name()) before its aliases.
  std::string text;
  bool open = false;
  for (const DTypeAlias& alias : dtype_aliases()) {
    if (alias.name == dtype_name(alias.dtype)) {
      if (open) text += ")";
      if (!text.empty()) text += ", ";
      text += alias.name;
      open = false;
    } else {
      text += open ? ", " : " (";
      text += alias.name;
      open = true;
    }
  }
  if (open) text += ")";
  return text + "; case ignored";
}

CLI::Validator dtype_validator() {
  return CLI::Validator(
      [](std::string& name) -> std::string {
        if (parse_dtype(name)) return {};
        return "unknown dtype \"" + name + "\" (" + dtype_names() + ")";
      },
      "DTYPE", "dtype");
}

CLI::Validator non_empty_path() {
  return CLI::Validator(
      [](std::string& path) -> std::string {
        return path.empty() ? "the path is empty" : std::string();
      },
      "PATH", "path");
}

CLI::Validator unsigned_validator(const std::string& what) {
  return CLI::Validator(
      [what](std::string& text) -> std::string {
        const bool digits = !text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
          return std::isdigit(static_cast<unsigned char>(c));
        });
        if (!digits) return "takes " + what + " (a non-negative integer), not \"" + text + "\"";
        // CLI11 2.1 converts with strtoull(text, 0): "010" would be octal 8 and "09" refused.
        // Numbers here are decimal, so the text CLI11 converts is the canonical decimal one.
        const std::size_t first = std::min(text.find_first_not_of('0'), text.size() - 1);
        const std::string decimal = text.substr(first);
        // Past 2^64 - 1 CLI11 would saturate the value silently (same length: compare as text).
        if (decimal.size() > 20 || (decimal.size() == 20 && decimal > "18446744073709551615")) {
          return what + " \"" + text + "\" is beyond 2^64 - 1";
        }
        text = decimal;
        return {};
      },
      "UINT", "unsigned");
}

namespace {

// The items of a comma list, empty ones kept ("1,,2": "1", "", "2").
std::vector<std::string> comma_items(const std::string& text) {
  std::vector<std::string> items;
  for (std::size_t begin = 0; begin <= text.size();) {
    const std::size_t end = std::min(text.find(',', begin), text.size());
    items.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return items;
}

}  // namespace

CLI::Option* add_unsigned_list(CLI::App* cmd, const std::string& name,
                               std::vector<std::uint64_t>& out, const std::string& description,
                               const std::string& what) {
  // Each argument as given (no CLI11 delimiter): checked and rewritten item by item here, then
  // converted by the callback.
  const CLI::Validator item = unsigned_validator(what);
  CLI::Option* option = cmd->add_option_function<std::vector<std::string>>(
      name,
      [&out](const std::vector<std::string>& given) {
        out.clear();
        for (const std::string& text : given) {
          for (const std::string& one : comma_items(text)) out.push_back(std::stoull(one));
        }
      },
      description);
  option->transform(CLI::Validator(
      [item, what](std::string& text) -> std::string {
        if (text.empty()) return "takes " + what + " or a comma list of them, not \"\"";
        std::string canonical;
        for (std::string one : comma_items(text)) {
          if (one.empty()) {
            return "takes " + what + " or a comma list of them; \"" + text + "\" has an empty item";
          }
          if (std::string error = item(one); !error.empty()) return error;
          canonical += (canonical.empty() ? "" : ",") + one;
        }
        text = canonical;
        return {};
      },
      "", "unsigned list"));
  option->type_name("UINT[,UINT...]");
  return option;
}

DType dtype_from_name(const std::string& name) {
  if (auto dtype = parse_dtype(name)) return *dtype;
  throw Error(ErrorCode::kInvalidArgument, "unknown dtype \"" + name + "\"");
}

std::uint64_t segment_bytes_from_mb(double mb) {
  // Checked before the conversion: a NaN or a value past 2^64 bytes converts undefined.
  if (!std::isfinite(mb) || mb <= 0 || mb > static_cast<double>(1 << 20)) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("--segment-mb {} is not a size in MiB in (0, 1048576]", mb));
  }
  const auto bytes = static_cast<std::uint64_t>(mb * (1 << 20));
  if (bytes == 0 || bytes % 4096 != 0) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("--segment-mb {} is {} bytes, not a whole number of 4 KiB pages "
                            "(a multiple of 1/256 MiB)",
                            mb, bytes));
  }
  return bytes;
}

std::string checked_metadata(const std::string& text) {
  try {
    [[maybe_unused]] const nlohmann::json parsed = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string("--metadata is not valid JSON: ") + e.what());
  }
  return text;
}

Progress::Progress(std::string label, bool quiet)
    : label_(std::move(label)), enabled_(!quiet && ::isatty(STDERR_FILENO) == 1) {
  start_ns_ = now_ns();
}

Progress::~Progress() {
  if (drawn_) std::fputs("\r\033[K", stderr);
}

tools::ProgressFn Progress::fn() {
  if (!enabled_ && !g_work_stops) return nullptr;
  return [this](std::uint64_t done, std::uint64_t total) { update(done, total); };
}

void Progress::update(std::uint64_t done, std::uint64_t total) {
  if (g_work_stops && stop_requested()) throw interrupted_error();
  if (!enabled_) return;
  const std::int64_t now = now_ns();
  if (done < total && now - last_draw_ns_ < 100'000'000) return;
  last_draw_ns_ = now;
  const double seconds = std::max(1e-9, (now - start_ns_) / 1e9);
  const double rate = done / seconds;
  const double fraction = total ? static_cast<double>(done) / total : 1.0;
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(fraction * kWidth);
  const std::string eta =
      rate > 0 && done < total ? duration_text((total - done) / rate) : std::string("-");
  fmt::print(stderr, "\r\033[K{} [{}{}] {:3.0f}% {}/{} rows {:.0f} rows/s ETA {}", label_,
             std::string(filled, '#'), std::string(kWidth - filled, '.'), fraction * 100, done,
             total, rate, eta);
  std::fflush(stderr);
  drawn_ = true;
}

std::string shell_quoted(std::string_view text) {
  const bool plain = !text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) ||
           std::string_view("@%+=:,./-_").find(c) != std::string_view::npos;
  });
  if (plain) return std::string(text);
  std::string quoted = "'";
  for (const char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

void RowColumns::fit(std::uint64_t row, std::uint64_t epoch) {
  row_width_ = std::max(row_width_, fmt::formatted_size("{}", row));
  epoch_width_ = std::max(epoch_width_, fmt::formatted_size("{}", epoch));
}

std::string RowColumns::header(std::string_view rest) const {
  return fmt::format("{:>{}}  {:>20}  {:>{}}{}\n", "row", row_width_, "key", "epoch", epoch_width_,
                     rest);
}

std::string RowColumns::cells(std::uint64_t row, std::uint64_t key, std::uint64_t epoch) const {
  return fmt::format("{:>{}}  {:>20}  {:>{}}", row, row_width_, key, epoch, epoch_width_);
}

void Table::print(const std::string& indent) const {
  std::vector<std::size_t> widths;
  std::vector<bool> numeric;
  for (std::size_t r = 0; r < rows_.size(); ++r) {
    const auto& row = rows_[r];
    if (widths.size() < row.size()) {
      widths.resize(row.size(), 0);
      numeric.resize(row.size(), true);
    }
    for (std::size_t i = 0; i < row.size(); ++i) {
      widths[i] = std::max(widths[i], row[i].size());
      const bool number = !row[i].empty() &&
                          (std::isdigit(static_cast<unsigned char>(row[i][0])) || row[i][0] == '-');
      if (r > 0 && !number) numeric[i] = false;
    }
  }
  for (const auto& row : rows_) {
    std::string line = indent;
    for (std::size_t i = 0; i < row.size(); ++i) {
      const std::size_t pad = widths[i] - row[i].size();
      if (i) line += "  ";
      if (numeric[i]) line.append(pad, ' ');
      line += row[i];
      if (!numeric[i]) line.append(pad, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    line += '\n';
    write_stdout(line);
  }
}

nlohmann::json info_json(const StoreInfo& info) {
  return {
      {"path", info.path},
      {"format_major", info.format_major},
      {"format_minor", info.format_minor},
      {"dtype", std::string(dtype_name(info.dtype))},
      {"dim", info.dim},
      {"record_bytes", info.record_bytes},
      {"segment_bytes", info.segment_bytes},
      {"keeps_key_index", info.keeps_key_index},
      {"store_id", info.store_id},
      {"created_unix_ns", info.created_unix_ns},
      {"generation", info.generation},
      {"committed_rows", info.committed_rows},
      {"durable_rows", info.durable_rows},
      {"rows_to_cut", info.rows_to_cut},
      {"capacity_rows", info.capacity_rows},
      {"last_commit_unix_ns", info.last_commit_unix_ns},
      {"data_file_bytes", info.data_file_bytes},
      {"index_file_bytes", info.index_file_bytes},
      {"metadata", info.metadata},
  };
}

nlohmann::json vector_json(const Reader& reader, const Record& record) {
  nlohmann::json out = nlohmann::json::array();
  const DType dtype = reader.dtype();
  for (std::uint32_t i = 0; i < reader.dim(); ++i) {
    const double value = tools::element_value(dtype, record.data, i);
    if (std::isnan(value)) {
      // nlohmann-json dumps a non-finite number as null, which would read back as a missing
      // value; these are the strings protobuf's JSON mapping (and Python's float()) reads.
      out.push_back("NaN");
    } else if (std::isinf(value)) {
      out.push_back(value > 0 ? "Infinity" : "-Infinity");
    } else if (dtype == DType::kFloat64) {
      out.push_back(value);
    } else if (dtype == DType::kInt8 || dtype == DType::kUInt8) {
      out.push_back(static_cast<int>(value));
    } else {
      out.push_back(static_cast<float>(value));
    }
  }
  return out;
}

std::string vector_text(const Reader& reader, const Record& record) {
  std::string text;
  for (std::uint32_t i = 0; i < reader.dim(); ++i) {
    text += fmt::format("{}{}", i ? " " : "",
                        tools::printable(tools::element_value(reader.dtype(), record.data, i)));
  }
  return text;
}

namespace {

// Standard output is written here, not through stdio: stdio cannot retry a write a signal
// interrupted (glibc drops the buffer a write failed for), and its chunks end mid-line.
// g_stdout holds what write_stdout() was given and write(2) has not taken yet.
std::string g_stdout;

// Each write(2) takes at most PIPE_BUF bytes, ending at a line end when one is in reach: into
// a pipe such a write is atomic, so a stop signal that interrupts it leaves whole lines.
constexpr std::size_t kStdoutChunk = PIPE_BUF;

// The errno of the first write to stdout that failed, 0 while none has; kStopped once a stop
// signal (tail -f) ended the output. Once set, output is dropped, not retried.
int g_stdout_errno = 0;
constexpr int kStopped = -1;

std::string g_done_note;

void on_stop_signal(int signal) {
  // Only this handler writes them, with SIGINT and SIGTERM both blocked while it runs.
  g_stop_signals = g_stop_signals + 1;
  g_stop_signal = signal;
  if (g_work_stops && g_stop_signals > 1) {
    // The clean-up the first asked for is not coming (a long flush, say): end as without a
    // handler. signal() and raise() are async-signal-safe.
    ::signal(signal, SIG_DFL);
    ::raise(signal);
  }
}

void stdout_failed(int err) {
  if (g_stdout_errno == 0) g_stdout_errno = err;
}

// Whether a stop signal ends `data` with `done` bytes of it written: at once at a line end (or
// with nothing of it written); in the middle of a line once the line is ended (a stop that
// came while a line longer than PIPE_BUF was half written), or at once at another stop signal,
// so that a reader that never reads cannot keep the command from ending.
bool stop_now(std::string_view data, std::size_t done, int& stops_at_cut) {
  if (!stop_requested()) return false;
  if (done == 0 || data[done - 1] == '\n') return true;
  if (stops_at_cut < 0) {
    stops_at_cut = g_stop_signals;
    return false;
  }
  return g_stop_signals != stops_at_cut;
}

// One write(2) of at most PIPE_BUF bytes of `data` from `done`, made only once stdout takes it
// (poll: a pipe then has room for all of it) and unless a stop signal ends the output
// (stop_now()). The stop signals are blocked from the check of stop_requested() to the write,
// except while ppoll() waits: one that comes at any instant ends a wait for a reader that does
// not read, and none can come between the check and a write that would then wait. The bytes
// written, -1 with errno set (EINTR: a signal, look again), or 0 with `stopped` set.
::ssize_t write_unless_stopped(std::string_view data, std::size_t done, int& stops_at_cut,
                               bool& stopped) {
  sigset_t stops, old;
  ::sigemptyset(&stops);
  ::sigaddset(&stops, SIGINT);
  ::sigaddset(&stops, SIGTERM);
  ::pthread_sigmask(SIG_BLOCK, &stops, &old);
  ::ssize_t n = 0;
  stopped = stop_now(data, done, stops_at_cut);
  if (!stopped) {
    pollfd fd{STDOUT_FILENO, POLLOUT, 0};
    // POLLERR or POLLHUP: the write says which (EPIPE).
    n = ::ppoll(&fd, 1, nullptr, &old) < 0 ? -1
                                           : ::write(STDOUT_FILENO, data.data() + done,
                                                     std::min(data.size() - done, kStdoutChunk));
  }
  const int err = errno;
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  errno = err;
  return n;
}

// Writes `data` whole with write(2); 0 once done, else the errno that ended it (kStopped for
// a stop signal, with install_stop_handlers()). EINTR of another signal is retried, and a
// non-blocking stdout that is full is waited for.
int write_all(std::string_view data) {
  std::size_t done = 0;
  int stops_at_cut = -1;  // g_stop_signals when a stop found a line half written.
  while (done < data.size()) {
    bool stopped = false;
    const ::ssize_t n = g_stop_handlers
                            ? write_unless_stopped(data, done, stops_at_cut, stopped)
                            : ::write(STDOUT_FILENO, data.data() + done, data.size() - done);
    if (stopped) return kStopped;
    if (n > 0) {
      done += static_cast<std::size_t>(n);
      continue;
    }
    const int err = n == 0 ? EIO : errno;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      pollfd fd{STDOUT_FILENO, POLLOUT, 0};
      if (::poll(&fd, 1, -1) >= 0 || errno == EINTR) continue;
      return errno;
    }
    if (err != EINTR) return err;
  }
  return 0;
}

// Hands g_stdout to write(2): all of it, or with `all` false what is beyond a chunk
// (kStdoutChunk). A chunk ends at the last line end in reach; a line longer than a chunk is
// written whole (as far as it is there: past kLongLine bytes without one, all of them). A
// failure is recorded (stdout_failed()) and the rest dropped.
void drain_stdout(bool all) {
  constexpr std::size_t kLongLine = std::size_t{1} << 20;
  std::string_view rest = g_stdout;
  while (!rest.empty() && g_stdout_errno == 0) {
    std::size_t length = rest.size();
    if (rest.size() <= kStdoutChunk) {
      if (!all) break;
    } else if (const std::size_t end = rest.rfind('\n', kStdoutChunk - 1);
               end != std::string_view::npos) {
      length = end + 1;
    } else if (const std::size_t long_end = rest.find('\n', kStdoutChunk);
               long_end != std::string_view::npos) {
      length = long_end + 1;
    } else if (!all && rest.size() < kLongLine) {
      break;
    }
    const int err = write_all(rest.substr(0, length));
    if (err != 0) stdout_failed(err);
    rest.remove_prefix(length);
  }
  if (g_stdout_errno != 0) rest = {};
  g_stdout.erase(0, g_stdout.size() - rest.size());
}

// The error for a failed stdout (g_stdout_errno neither EPIPE nor kStopped).
StdoutError stdout_error() { return StdoutError(g_stdout_errno); }

}  // namespace

StdoutError::StdoutError(int err)
    : Error(ErrorCode::kIO,
            std::string("cannot write to stdout: ") +
                (err != 0 ? std::strerror(err) : "an earlier write failed"),
            err) {}

void write_stdout(std::string_view text) {
  // After a failure the output goes nowhere: a closed pipe or a stop signal ends head and tail
  // at their next flush_stdout(); anything else has thrown already.
  if (text.empty() || g_stdout_errno != 0) return;
  g_stdout.append(text);
  // On a terminal every line shows at once, in order with what goes to stderr.
  static const bool terminal = ::isatty(STDOUT_FILENO) == 1;
  drain_stdout(terminal && text.find('\n') != std::string_view::npos);
  // A closed pipe is how tail -f learns to stop (flush_stdout() returns false); anything else
  // (a full disk) ends the command now rather than after all its output was computed.
  if (g_stdout_errno != 0 && g_stdout_errno != EPIPE && g_stdout_errno != kStopped) {
    throw stdout_error();
  }
}

bool flush_stdout() {
  drain_stdout(true);
  // Nothing should write stdout through stdio; if something did (a library), check it too. Its
  // failure recorded no errno: the error then says only that a write failed.
  if (g_stdout_errno == 0 && (std::fflush(stdout) != 0 || std::ferror(stdout))) stdout_failed(0);
  if (g_stdout_errno == 0) return true;
  if (g_stdout_errno == EPIPE || g_stdout_errno == kStopped) return false;
  throw stdout_error();
}

void accept_closed_stdout() {
  std::clearerr(stdout);
  g_stdout.clear();
  g_stdout_errno = 0;
}

void install_stop_handlers() {
  struct sigaction action = {};
  action.sa_handler = on_stop_signal;
  ::sigemptyset(&action.sa_mask);
  ::sigaddset(&action.sa_mask, SIGINT);
  ::sigaddset(&action.sa_mask, SIGTERM);
  // No SA_RESTART: a wait for a reader that does not read (a full pipe) returns EINTR, and
  // write_stdout() ends the output instead of waiting on (write_unless_stopped()).
  action.sa_flags = 0;
  ::sigaction(SIGINT, &action, nullptr);
  ::sigaction(SIGTERM, &action, nullptr);
  g_stop_handlers = true;
}

bool stop_requested() { return g_stop_signals != 0; }

void install_work_stop_handlers() {
  g_work_stops = 1;
  struct sigaction action = {};
  action.sa_handler = on_stop_signal;
  ::sigemptyset(&action.sa_mask);
  ::sigaddset(&action.sa_mask, SIGINT);
  ::sigaddset(&action.sa_mask, SIGTERM);
  // Restarted: the library's system calls go on, and the work stops at its next progress step.
  action.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &action, nullptr);
  ::sigaction(SIGTERM, &action, nullptr);
}

int stop_signal() { return g_stop_signals != 0 ? static_cast<int>(g_stop_signal) : 0; }

Error interrupted_error() {
  return Error(ErrorCode::kInterrupted,
               std::string("interrupted by ") + (stop_signal() == SIGTERM ? "SIGTERM" : "SIGINT"));
}

void note_done(std::string what) {
  g_done_note = std::move(what);
  // From here a closed pipe on stdout must not end the process without a word (SIGPIPE's
  // death, 141 in a shell, reads as a failure that did nothing): the write fails with EPIPE
  // instead, and main() says what was done. Read-only commands keep the default death.
  ::signal(SIGPIPE, SIG_IGN);
}

const std::string& done_note() { return g_done_note; }

void warn(const std::string& command, const std::string& text) {
  if (text.empty()) return;
  flush_stdout();  // The report first, as on a terminal.
  std::fprintf(stderr, "embstore %s: warning: %s\n", command.c_str(), text.c_str());
}

std::string errno_hint(int err) {
  // EFBIG with no limit set is a file system's own largest file: nothing the user can raise.
  rlimit limit{};
  if (err != EFBIG || ::getrlimit(RLIMIT_FSIZE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) {
    return {};
  }
  return fmt::format(" (the file-size limit is {} bytes: raise ulimit -f)",
                     static_cast<std::uint64_t>(limit.rlim_cur));
}

void print_json(const nlohmann::json& value) {
  // Replace, not throw, on bytes that are not UTF-8 (metadata is free-form text).
  std::string text = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  text += '\n';
  write_stdout(text);
}

std::string utc_time(std::int64_t unix_ns) {
  const time_t seconds = static_cast<time_t>(unix_ns / 1'000'000'000);
  struct tm tm;
  ::gmtime_r(&seconds, &tm);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

}  // namespace embstore::cli
