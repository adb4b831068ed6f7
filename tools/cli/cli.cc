#include "cli.h"

#include <fmt/format.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>

namespace embstore::cli {

std::int64_t now_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

namespace {

std::string duration_text(double seconds) {
  if (seconds < 60) return fmt::format("{:.0f}s", seconds);
  if (seconds < 3600) return fmt::format("{:.0f}m{:02.0f}s", seconds / 60, std::fmod(seconds, 60));
  return fmt::format("{:.0f}h{:02.0f}m", seconds / 3600, std::fmod(seconds / 60, 60));
}

}  // namespace

int exit_status(const Error& error) {
  // Invalid arguments are usage errors whether CLI11 or the library finds them.
  if (error.code() == ErrorCode::kInvalidArgument) return kExitUsage;
  return kExitErrorBase + static_cast<int>(error.code());
}

CLI::Validator dtype_validator() {
  return CLI::Validator(
      [](std::string& name) -> std::string {
        if (parse_dtype(name)) return {};
        return "unknown dtype \"" + name +
               "\" (float32, float16, bfloat16, int8, uint8, float64; or f4, f2, f8, i1, u1)";
      },
      "DTYPE", "dtype");
}

CLI::Validator unsigned_validator(const std::string& what) {
  return CLI::Validator(
      [what](std::string& text) -> std::string {
        const bool digits =
            !text.empty() && text.size() <= 20 && std::all_of(text.begin(), text.end(), [](char c) {
              return std::isdigit(static_cast<unsigned char>(c));
            });
        // Past 2^64 - 1 CLI11 would saturate the value silently (same length: compare as text).
        const bool fits = text.size() < 20 || text <= "18446744073709551615";
        if (digits && fits) return {};
        if (digits) return what + " \"" + text + "\" is beyond 2^64 - 1";
        return "takes " + what + " (a non-negative integer), not \"" + text + "\"";
      },
      "UINT", "unsigned");
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
  return static_cast<std::uint64_t>(mb * (1 << 20));
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
  if (!enabled_) return nullptr;
  return [this](std::uint64_t done, std::uint64_t total) { update(done, total); };
}

void Progress::update(std::uint64_t done, std::uint64_t total) {
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
    text += fmt::format("{}{}", i ? " " : "", tools::element_value(reader.dtype(), record.data, i));
  }
  return text;
}

namespace {

// The errno of the first write to stdout that failed, 0 while none has. stdio keeps only a
// flag: glibc drops the buffer a write failed for, so a later fflush() succeeds and its errno
// says nothing.
int g_stdout_errno = 0;

std::string g_done_note;

void stdout_failed(int err) {
  if (g_stdout_errno == 0) g_stdout_errno = err;
}

}  // namespace

StdoutError::StdoutError(int err)
    : Error(ErrorCode::kIO,
            std::string("cannot write to stdout: ") +
                (err != 0 ? std::strerror(err) : "an earlier write failed"),
            err) {}

void write_stdout(std::string_view text) {
  if (text.empty() || std::fwrite(text.data(), 1, text.size(), stdout) == text.size()) return;
  const int err = errno != 0 ? errno : EIO;
  stdout_failed(err);
  // A closed pipe is how tail -f learns to stop (flush_stdout() returns false); anything else
  // (a full disk) ends the command now rather than after all its output was computed.
  if (err != EPIPE) throw StdoutError(err);
}

bool flush_stdout() {
  if (std::fflush(stdout) != 0) stdout_failed(errno);
  if (!std::ferror(stdout)) return true;
  // A write that failed outside write_stdout() (CLI11's --help text, say) recorded no errno:
  // the error then says only that a write failed.
  if (g_stdout_errno == EPIPE) return false;
  throw StdoutError(g_stdout_errno);
}

void accept_closed_stdout() {
  std::clearerr(stdout);
  g_stdout_errno = 0;
}

void note_done(std::string what) { g_done_note = std::move(what); }

const std::string& done_note() { return g_done_note; }

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
