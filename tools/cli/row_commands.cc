// head and tail, including tail -f (follow rows as other processes commit them).
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>

#include "cli.h"

namespace embstore::cli {
namespace {

// How long tail -f sleeps on the commit counter before it re-checks for SIGINT and a closed
// stdout; rows committed meanwhile wake it at once.
constexpr auto kFollowCheck = std::chrono::milliseconds(200);

struct RowArgs {
  std::string store;
  std::uint64_t n = 10;
  bool vectors = false;
  bool json = false;
  bool follow = false;
};

// Prints rows one line each, as aligned text or JSON lines.
class RowPrinter {
 public:
  RowPrinter(const Reader& reader, const RowArgs& args) : reader_(reader), args_(args) {}

  // The header, its columns as wide as rows [begin, end) need.
  void header(std::uint64_t begin, std::uint64_t end) {
    if (args_.json) return;
    if (begin < end) {
      const StridedView<std::uint64_t> epochs = reader_.epochs(begin, end);
      for (std::uint64_t i = 0; i < end - begin; ++i) columns_.fit(end - 1, epochs[i]);
    }
    write_stdout(columns_.header(args_.vectors ? "  vector" : ""));
  }

  void print(std::uint64_t row) {
    const Record record = reader_.record(row);  // Checks the row's checksum.
    if (args_.json) {
      nlohmann::json line = {{"row", record.row}, {"key", record.key}, {"epoch", record.epoch}};
      if (args_.vectors) line["vector"] = vector_json(reader_, record);
      print_json(line);
      return;
    }
    // Rows that tail -f prints later widen the columns from there on if they need it.
    columns_.fit(record.row, record.epoch);
    write_stdout(columns_.cells(record.row, record.key, record.epoch));
    if (args_.vectors) print_out("  [{}]", vector_text(reader_, record));
    print_out("\n");
  }

 private:
  const Reader& reader_;
  const RowArgs& args_;
  RowColumns columns_;
};

// True once nobody reads our stdout any more (the reader of a pipe closed it).
bool stdout_closed() {
  pollfd fd{STDOUT_FILENO, 0, 0};
  return ::poll(&fd, 1, 0) == 1 && (fd.revents & (POLLERR | POLLHUP)) != 0;
}

// Flushes stdout; false when its reader went away, which ends head and tail without an error.
bool flush_rows() {
  if (flush_stdout()) return true;
  accept_closed_stdout();
  return false;
}

// After a truncate, where following goes on: the first row of [0, min(printed, now's size))
// that `old` (the snapshot the rows were printed from) and `now` (the store after the truncate)
// do not show alike (key, epoch and bytes), else min(printed, now's size). Scanned from row 0,
// not from the first row printed: a truncate may cut below it, and the rows appended after it
// there are printed too. Rows appended after the truncate may equal the ones they replaced
// anywhere, so no row past the first that differs says what came before it. Compared a block
// at a time (keys and epochs, then the block's bytes in one memcmp): the store is read once,
// at memory speed, per truncate seen.
std::uint64_t first_row_dropped(const Reader& old, const Reader& now, std::uint64_t printed) {
  const std::uint64_t end = std::min(printed, now.size());
  constexpr std::uint64_t kBlock = 4096;
  for (std::uint64_t from = 0; from < end; from += kBlock) {
    const std::uint64_t to = std::min(end, from + kBlock);
    const StridedView<std::uint64_t> old_keys = old.keys(from, to);
    const StridedView<std::uint64_t> now_keys = now.keys(from, to);
    const StridedView<std::uint64_t> old_epochs = old.epochs(from, to);
    const StridedView<std::uint64_t> now_epochs = now.epochs(from, to);
    const RowsView old_rows = old.rows(from, to);
    const RowsView now_rows = now.rows(from, to);
    for (std::uint64_t i = 0; i < to - from; ++i) {
      if (old_keys[i] != now_keys[i] || old_epochs[i] != now_epochs[i]) return from + i;
    }
    if (std::memcmp(old_rows.data, now_rows.data, old_rows.size_bytes()) == 0) continue;
    for (std::uint64_t i = 0; i < to - from; ++i) {
      if (std::memcmp(old_rows.row(i), now_rows.row(i), old_rows.row_bytes) != 0) {
        return from + i;
      }
    }
  }
  return end;
}

// The identity (device, inode) of the store's header file: a store deleted and created again at
// its path (or another renamed onto it) has another, while the deleted one's stays in use as
// long as a Reader maps it. nullopt when there is none at the path.
std::optional<std::pair<dev_t, ino_t>> header_identity(const std::string& store) {
  struct stat st;
  if (::stat((store + "/header").c_str(), &st) != 0) return std::nullopt;
  return std::make_pair(st.st_dev, st.st_ino);
}

int run_rows(const RowArgs& args, bool tail) {
  const auto identity = header_identity(args.store);
  Reader reader = Reader::open(args.store);
  // `reader` keeps the snapshot the rows were printed from; `latest` waits for new ones. Both
  // are opened before a row is printed: a caller may act on a row (delete the store) at once.
  std::optional<Reader> latest;
  // A closed pipe (`| head -1`) ends the printing with exit 0 (flush_rows()), not SIGPIPE's
  // death (141 in a shell: a failure under `set -o pipefail`).
  ::signal(SIGPIPE, SIG_IGN);
  if (args.follow) {
    latest = Reader::open(args.store);
    // End cleanly on Ctrl-C and kill: no signal death, exit 0.
    install_stop_handlers();
  }
  RowPrinter printer(reader, args);
  const std::uint64_t size = reader.size();
  const std::uint64_t count = std::min(args.n, size);
  const std::uint64_t begin = tail ? size - count : 0;
  printer.header(begin, begin + count);
  for (std::uint64_t row = begin; row < begin + count && !stop_requested(); ++row) {
    printer.print(row);
  }
  if (!flush_rows()) return kExitOk;
  if (!args.follow) return kExitOk;
  std::uint64_t next = size;
  // When another process truncates the store (a new generation), the rows printed that the
  // truncate dropped are said so on stderr, and following goes on from the first of them: the
  // rows appended after the truncate are printed under their row numbers. When the store is
  // deleted, or replaced by another at its path, the Readers map files no longer there: nothing
  // would ever be printed again (or a refresh fails with a message that does not say so).
  auto check_same_store = [&] {
    if (header_identity(args.store) == identity) return;
    throw Error(ErrorCode::kNotFound,
                args.store +
                    ": the store followed is no longer at this path (deleted, moved, "
                    "or replaced by another store)");
  };
  // The generations of the Readers' snapshots (no file read: info() would stat the files).
  std::uint64_t generation = reader.generation();
  try {
    while (!stop_requested()) {
      if (stdout_closed()) break;
      const bool more = latest->wait(next + 1, kFollowCheck);
      check_same_store();
      const std::uint64_t now_generation = latest->generation();  // As of the wait's refresh.
      if (now_generation != generation) {
        const std::uint64_t kept = first_row_dropped(reader, *latest, next);
        // Rows before `begin` were never printed: only [max(kept, begin), next) were.
        const std::uint64_t lost = std::max(kept, begin);
        if (lost < next) {
          fmt::print(stderr,
                     "embstore tail: {} was truncated: rows [{}, {}) printed above are no "
                     "longer in it; following from row {}\n",
                     args.store, lost, next, kept);
        } else if (kept < next) {
          fmt::print(stderr,
                     "embstore tail: {} was truncated (no row printed above was dropped); "
                     "following from row {}\n",
                     args.store, kept);
        }
        next = std::min(next, kept);
        generation = now_generation;
      } else if (!more) {
        continue;
      }
      // The rows are printed from the snapshot whose generation was just looked at (a refresh
      // of `reader` could land past a truncate not seen yet, whose dropped rows it would skip),
      // and `reader` keeps being the snapshot they were printed from: the two swap, and the
      // next wait refreshes the older one.
      std::swap(reader, *latest);
      const std::uint64_t now = reader.size();
      for (; next < now && !stop_requested(); ++next) printer.print(next);
      if (!flush_rows()) break;
    }
  } catch (const Error&) {
    check_same_store();
    throw;
  }
  return kExitOk;
}

void add_row_command(CLI::App& app, Registry& registry, bool tail) {
  auto args = std::make_shared<RowArgs>();
  CLI::App* cmd = app.add_subcommand(
      tail ? "tail" : "head",
      tail ? "Last rows (key, epoch, optionally the vector); -f follows new commits (read-only)"
           : "First rows (key, epoch, optionally the vector) (read-only)");
  cmd->add_option("store", args->store, "Store directory")->required();
  cmd->add_option("-n,--rows", args->n, "Rows to print")
      ->transform(unsigned_validator("a row count"))
      ->capture_default_str();
  cmd->add_flag("--vectors", args->vectors, "Print each row's values too");
  cmd->add_flag("--json", args->json, "One JSON object per row (JSON lines)");
  if (tail) {
    cmd->add_flag("-f,--follow", args->follow,
                  "Keep printing rows as other processes commit them, until Ctrl-C, SIGTERM or "
                  "the reader of stdout goes away (exit 0), or until the store is no longer at "
                  "its path (deleted, moved or replaced: exit 12)");
    cmd->footer("Example: embstore tail -f run.emb --json | head -100");
  } else {
    cmd->footer("Example: embstore head run.emb -n 5 --vectors");
  }
  registry.add(cmd, [args, tail] { return run_rows(*args, tail); });
}

}  // namespace

void add_row_commands(CLI::App& app, Registry& registry) {
  add_row_command(app, registry, false);
  add_row_command(app, registry, true);
}

}  // namespace embstore::cli
