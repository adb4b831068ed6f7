// embstore — command-line tool. Read-only commands never change a byte of the store.
//
//   embstore info <store> [--json]
//   embstore verify <store> [--from ROW] [--to ROW] [--json]
//   embstore bench [options]          (tools/cli/bench_command.h)
//
// Exit status: 0 success; 1 verify found bad rows; 2 usage error; otherwise 10 + ErrorCode.
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "bench_command.h"
#include "embstore/embstore.h"

namespace {

constexpr int kExitBadRows = 1;
constexpr int kExitUsage = 2;

const char* const kUsage =
    "usage: embstore <command> [options]\n"
    "\n"
    "commands:\n"
    "  info <store> [--json]                      header, counters and file sizes\n"
    "  verify <store> [--from R] [--to R] [--json] recompute every row's checksum\n"
    "  version                                    library and format versions\n"
    "  bench [options]                            append/read throughput on this disk, beside\n"
    "                                             pwrite() and memcpy (embstore bench --help)\n"
    "\n"
    "Read-only commands take no lock and change nothing.\n";

std::string json_escape(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out;
}

struct Args {
  std::string command;
  std::string store;
  bool json = false;
  std::optional<std::uint64_t> from, to;
};

std::uint64_t parse_row(const std::string& flag, const char* text) {
  char* end = nullptr;
  errno = 0;
  unsigned long long value = std::strtoull(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || text[0] == '-') {
    throw embstore::Error(embstore::ErrorCode::kInvalidArgument,
                          flag + " takes a row number, not \"" + text + "\"");
  }
  return value;
}

Args parse(int argc, char** argv) {
  Args args;
  if (argc < 2) throw embstore::Error(embstore::ErrorCode::kInvalidArgument, "no command given");
  args.command = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--json") {
      args.json = true;
    } else if ((arg == "--from" || arg == "--to") && i + 1 < argc) {
      (arg == "--from" ? args.from : args.to) = parse_row(arg, argv[++i]);
    } else if (!arg.empty() && arg[0] == '-') {
      throw embstore::Error(embstore::ErrorCode::kInvalidArgument, "unknown option " + arg);
    } else if (args.store.empty()) {
      args.store = arg;
    } else {
      throw embstore::Error(embstore::ErrorCode::kInvalidArgument, "unexpected argument " + arg);
    }
  }
  return args;
}

int cmd_info(const Args& args) {
  const embstore::StoreInfo info = embstore::read_info(args.store);
  if (args.json) {
    std::printf(
        "{\"path\":\"%s\",\"format\":\"%d.%d\",\"dtype\":\"%s\",\"dim\":%u,"
        "\"record_bytes\":%llu,\"segment_bytes\":%llu,\"store_id\":\"%s\","
        "\"created_unix_ns\":%lld,\"generation\":%llu,\"committed_rows\":%llu,"
        "\"durable_rows\":%llu,\"capacity_rows\":%llu,\"data_file_bytes\":%llu,"
        "\"index_file_bytes\":%llu,\"metadata\":\"%s\"}\n",
        json_escape(info.path).c_str(), info.format_major, info.format_minor,
        std::string(embstore::dtype_name(info.dtype)).c_str(), info.dim,
        static_cast<unsigned long long>(info.record_bytes),
        static_cast<unsigned long long>(info.segment_bytes), info.store_id.c_str(),
        static_cast<long long>(info.created_unix_ns),
        static_cast<unsigned long long>(info.generation),
        static_cast<unsigned long long>(info.committed_rows),
        static_cast<unsigned long long>(info.durable_rows),
        static_cast<unsigned long long>(info.capacity_rows),
        static_cast<unsigned long long>(info.data_file_bytes),
        static_cast<unsigned long long>(info.index_file_bytes), json_escape(info.metadata).c_str());
    return 0;
  }
  std::printf("store           %s\n", info.path.c_str());
  std::printf("format          %d.%d\n", info.format_major, info.format_minor);
  std::printf("store id        %s\n", info.store_id.c_str());
  std::printf("dtype           %s\n", std::string(embstore::dtype_name(info.dtype)).c_str());
  std::printf("dim             %u\n", info.dim);
  std::printf("record bytes    %llu\n", static_cast<unsigned long long>(info.record_bytes));
  std::printf("segment bytes   %llu\n", static_cast<unsigned long long>(info.segment_bytes));
  std::printf("committed rows  %llu\n", static_cast<unsigned long long>(info.committed_rows));
  std::printf("durable rows    %llu\n", static_cast<unsigned long long>(info.durable_rows));
  std::printf("capacity rows   %llu\n", static_cast<unsigned long long>(info.capacity_rows));
  std::printf("data file       %llu bytes\n",
              static_cast<unsigned long long>(info.data_file_bytes));
  std::printf("index file      %llu bytes\n",
              static_cast<unsigned long long>(info.index_file_bytes));
  std::printf("generation      %llu\n", static_cast<unsigned long long>(info.generation));
  std::printf("metadata        %s\n", info.metadata.empty() ? "(none)" : info.metadata.c_str());
  return 0;
}

int cmd_verify(const Args& args) {
  embstore::Reader reader = embstore::Reader::open(args.store);
  const std::uint64_t end = args.to.value_or(reader.size());
  const std::uint64_t begin = args.from.value_or(0);
  const embstore::VerifyReport report = reader.verify(begin, end);
  if (args.json) {
    std::printf(
        "{\"path\":\"%s\",\"begin_row\":%llu,\"end_row\":%llu,\"rows_checked\":%llu,"
        "\"bad_row_count\":%llu,\"bad_rows\":[",
        json_escape(reader.path()).c_str(), static_cast<unsigned long long>(begin),
        static_cast<unsigned long long>(end), static_cast<unsigned long long>(report.rows_checked),
        static_cast<unsigned long long>(report.bad_row_count));
    for (std::size_t i = 0; i < report.bad_rows.size(); ++i) {
      std::printf("%s%llu", i ? "," : "", static_cast<unsigned long long>(report.bad_rows[i]));
    }
    std::printf("]}\n");
  } else {
    std::printf("%s: checked rows [%llu, %llu): %llu bad\n", reader.path().c_str(),
                static_cast<unsigned long long>(begin), static_cast<unsigned long long>(end),
                static_cast<unsigned long long>(report.bad_row_count));
    for (std::uint64_t row : report.bad_rows) {
      std::printf("bad row %llu\n", static_cast<unsigned long long>(row));
    }
    if (report.bad_rows.size() < report.bad_row_count) {
      std::printf("... and %llu more\n",
                  static_cast<unsigned long long>(report.bad_row_count - report.bad_rows.size()));
    }
  }
  return report.ok() ? 0 : kExitBadRows;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
                    std::strcmp(argv[1], "help") == 0)) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  try {
    if (argc >= 2 && std::strcmp(argv[1], "bench") == 0) {
      return embstore::cli::bench_command(argc - 1, argv + 1);
    }
    const Args args = parse(argc, argv);
    if (args.command == "version") {
      std::printf("embstore %s (format %d.%d)\n", embstore::kLibraryVersion,
                  embstore::kFormatVersionMajor, embstore::kFormatVersionMinor);
      return 0;
    }
    if (args.command != "info" && args.command != "verify") {
      throw embstore::Error(embstore::ErrorCode::kInvalidArgument,
                            "unknown command \"" + args.command + "\"");
    }
    if (args.store.empty()) {
      throw embstore::Error(embstore::ErrorCode::kInvalidArgument,
                            args.command + " needs a store path");
    }
    return args.command == "info" ? cmd_info(args) : cmd_verify(args);
  } catch (const embstore::Error& error) {
    std::fprintf(stderr, "embstore: %s\n", error.what());
    if (error.code() == embstore::ErrorCode::kInvalidArgument) {
      std::fputs(kUsage, stderr);
      return kExitUsage;
    }
    return 10 + static_cast<int>(error.code());
  }
}
