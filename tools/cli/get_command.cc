// get: the vector of one sample by key (and epoch), or every version of it, via the key index.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <memory>
#include <optional>
#include <set>

#include "cli.h"
#include "export.h"
#include "npy.h"

namespace embstore::cli {
namespace {

struct GetArgs {
  std::string store;
  std::uint64_t key = 0;
  std::optional<std::uint64_t> epoch;
  bool history = false;
  bool json = false;
  std::string npy;
};

// The one line a missing key or (key, epoch) gets: what is missing and what is there instead.
// A miss is confirmed by a scan of the keys (and epochs) first (32 bytes a row, once per failed
// get): a key index damaged under an intact header answers "not in" for rows that are there (a
// review), which is corruption, naming the row.
Error not_found(const Reader& reader, const GetArgs& args) {
  const StridedView<std::uint64_t> keys = reader.keys(0, reader.size());
  const StridedView<std::uint64_t> epochs_of = reader.epochs(0, reader.size());
  for (std::uint64_t row = 0; row < keys.size; ++row) {
    if (keys[row] != args.key || (args.epoch && epochs_of[row] != *args.epoch)) continue;
    return Error(ErrorCode::kCorruption,
                 fmt::format("key {}{} is in {} (row {}) but its key index does not find it: "
                             "the key index is damaged (embstore verify names the damage; "
                             "embstore rebuild-index repairs it)",
                             args.key, args.epoch ? fmt::format(" at epoch {}", *args.epoch) : "",
                             reader.path(), row));
  }
  const std::vector<KeyVersion> versions = reader.history(args.key);
  if (versions.empty()) {
    return Error(ErrorCode::kNotFound,
                 fmt::format("key {} is not in {} ({})", args.key, reader.path(),
                             tools::counted(reader.size(), "row")));
  }
  std::set<std::uint64_t> present;
  for (const KeyVersion& v : versions) present.insert(v.epoch);
  std::string epochs;
  for (const std::uint64_t epoch : present) {
    if (epochs.size() > 60) {  // One line, however many epochs the key has.
      epochs += ", ...";
      break;
    }
    epochs += fmt::format("{}{}", epochs.empty() ? "" : ", ", epoch);
  }
  return Error(ErrorCode::kNotFound,
               fmt::format("key {} has no row in epoch {} of {} (its epochs: {})", args.key,
                           *args.epoch, reader.path(), epochs));
}

// The shape of the .npy file: one row is a vector of shape (dim,); --history a (versions, dim)
// matrix in commit order.
std::vector<std::uint64_t> npy_shape(const Reader& reader, const std::vector<Record>& records,
                                     const GetArgs& args) {
  std::vector<std::uint64_t> shape;
  if (args.history) shape.push_back(records.size());
  shape.push_back(reader.dim());
  return shape;
}

// A shape as numpy prints it: "(8,)", "(3, 8)".
std::string shape_text(const std::vector<std::uint64_t>& shape) {
  return fmt::format("({}{})", fmt::join(shape, ", "), shape.size() == 1 ? "," : "");
}

void write_npy(const Reader& reader, const std::vector<Record>& records,
               const std::vector<std::uint64_t>& shape, const std::string& path) {
  // As export writes a file: a failed write (a full disk) leaves no file at args.npy.
  tools::write_file_aside(path, [&](const std::string& file) {
    tools::NpyWriter out(file, tools::npy_descr(reader.dtype()), shape);
    const std::size_t row_bytes = reader.dim() * dtype_size(reader.dtype());
    for (const Record& record : records) out.write(record.data, row_bytes);
    out.finish();
  });
}

int run_get(const GetArgs& args) {
  const Reader reader = Reader::open(args.store);
  // As export: the store is only read, and its next Writer removes files it does not know.
  if (!args.npy.empty()) refuse_output_inside(args.npy, reader.path());
  // Checksum-checked rows: the one at --epoch, the latest, or every version (of --epoch).
  const std::vector<Record> records = reader.lookup(args.key, args.epoch, args.history);
  if (records.empty()) throw not_found(reader, args);

  if (!args.npy.empty()) {
    const std::vector<std::uint64_t> shape = npy_shape(reader, records, args);
    write_npy(reader, records, shape, args.npy);
    note_done(fmt::format("wrote {} of key {} to {}", tools::counted(records.size(), "row"),
                          args.key, args.npy));
    print_out("{}: {} of key {} ({}, shape {}{})\n", args.npy,
              tools::counted(records.size(), "row"), args.key, dtype_name(reader.dtype()),
              shape_text(shape),
              reader.dtype() == DType::kBFloat16 ? ", stored as uint16 bit patterns" : "");
    return kExitOk;
  }
  if (args.json) {
    auto row_json = [&](const Record& r) {
      return nlohmann::json{
          {"row", r.row}, {"key", r.key}, {"epoch", r.epoch}, {"vector", vector_json(reader, r)}};
    };
    if (!args.history) {
      print_json(row_json(records.front()));
    } else {
      nlohmann::json versions = nlohmann::json::array();
      for (const Record& r : records) versions.push_back(row_json(r));
      print_json({{"key", args.key}, {"versions", versions}});
    }
    return kExitOk;
  }
  RowColumns columns;
  for (const Record& r : records) columns.fit(r.row, r.epoch);
  write_stdout(columns.header("  vector"));
  for (const Record& r : records) {
    print_out("{}  [{}]\n", columns.cells(r.row, r.key, r.epoch), vector_text(reader, r));
  }
  return kExitOk;
}

}  // namespace

void add_get_command(CLI::App& app, Registry& registry) {
  auto args = std::make_shared<GetArgs>();
  CLI::App* cmd = app.add_subcommand(
      "get",
      "The vector of a sample by key: at --epoch, else its latest row; --history lists every "
      "version (read-only)");
  cmd->add_option("store", args->store, "Store directory")->required();
  cmd->add_option("key", args->key, "The sample's key (a non-negative integer)")
      ->required()
      ->transform(unsigned_validator("a key"));
  cmd->add_option("--epoch", args->epoch,
                  "The epoch to read; if (key, epoch) was appended more than once, the later row")
      ->transform(unsigned_validator("an epoch"));
  cmd->add_flag("--history", args->history,
                "Every row of the key in commit order, with its epoch (with --epoch: every row "
                "of that epoch)");
  CLI::Option* json = cmd->add_flag("--json", args->json, "One JSON object on stdout");
  cmd->add_option("--npy", args->npy,
                  "Write the vector (shape (dim,)), or with --history the versions (shape (n, "
                  "dim)), to a new .npy file; bfloat16 as uint16 bit patterns")
      ->check(non_empty_path())
      ->excludes(json);
  cmd->footer(
      "Exit status: 0 found, 2 usage (a key or epoch that is not a number, a --npy file inside "
      "the store), 12 the key, or the key at --epoch, is not in the store.\n"
      "Examples: embstore get run.emb 10 --epoch 5 ; embstore get run.emb 10 --history --json ; "
      "embstore get run.emb 10 --npy v10.npy");
  registry.add(cmd, [args] { return run_get(*args); });
}

}  // namespace embstore::cli
