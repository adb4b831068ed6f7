#include "import.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string_view>
#include <vector>

#include "export.h"
#include "hdf5_file.h"
#include "npy.h"

namespace embstore::tools {
namespace {

constexpr std::uint64_t kBatchBytes = 4 << 20;

bool is_directory(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_directory(path, ec);
}

bool exists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}

// Splits "FILE.h5:/dataset" into its parts; a path that exists as a file is taken whole.
std::pair<std::string, std::string> split_hdf5_spec(const std::string& spec,
                                                    const std::string& default_dataset) {
  if (exists(spec)) return {spec, default_dataset};
  const std::size_t colon = spec.rfind(':');
  if (colon != std::string::npos && exists(spec.substr(0, colon))) {
    if (colon + 1 == spec.size()) {
      throw Error(ErrorCode::kInvalidArgument,
                  spec +
                      " names no dataset after its ':' (FILE.h5:/NAME names one; FILE.h5 "
                      "alone reads " +
                      default_dataset + ")");
    }
    return {spec.substr(0, colon), spec.substr(colon + 1)};
  }
  return {spec, default_dataset};
}

// True when every `from` value is a `to` value: a narrower float type into a wider one.
bool widens_exactly(DType from, DType to) {
  const bool half = from == DType::kFloat16 || from == DType::kBFloat16;
  return (half && (to == DType::kFloat32 || to == DType::kFloat64)) ||
         (from == DType::kFloat32 && to == DType::kFloat64);
}

// A 1-D or 2-D array read by rows, from a .npy file or an HDF5 dataset.
class ArraySource {
 public:
  virtual ~ArraySource() = default;
  virtual const std::string& name() const = 0;
  virtual std::uint64_t rows() const = 0;
  virtual std::uint64_t columns() const = 0;
  virtual int rank() const = 0;
  // The array's shape, as numpy has it (() for a 0-d .npy file).
  virtual std::vector<std::uint64_t> shape() const = 0;
  // The element type as a store dtype, nullopt when it is none of them.
  virtual std::optional<DType> dtype(bool u2_is_bfloat16) const = 0;
  // The file's element type as the file names it, for messages.
  virtual std::string type_name() const = 0;
  // Reads rows as `as`, the dtype() given for them (an HDF5 dataset is converted to it).
  virtual void read_rows(std::uint64_t first, std::uint64_t n, void* out, DType as) const = 0;
  // Reads n integers as uint64, refusing negative values.
  virtual void read_uint64(std::uint64_t first, std::uint64_t n, std::uint64_t* out) const = 0;
};

class NpySource : public ArraySource {
 public:
  explicit NpySource(const std::string& path) : name_(path), npy_(path) {}
  const std::string& name() const override { return name_; }
  std::uint64_t rows() const override { return npy_.rows(); }
  std::uint64_t columns() const override { return npy_.shape().size() >= 2 ? npy_.shape()[1] : 1; }
  int rank() const override { return static_cast<int>(npy_.shape().size()); }
  std::vector<std::uint64_t> shape() const override { return npy_.shape(); }
  std::optional<DType> dtype(bool u2_is_bfloat16) const override {
    try {
      return dtype_of_npy_descr(npy_.descr(), u2_is_bfloat16, name_);
    } catch (const Error&) {
      return std::nullopt;
    }
  }
  std::string type_name() const override { return "'" + npy_.descr() + "'"; }
  void read_rows(std::uint64_t first, std::uint64_t n, void* out, DType) const override {
    npy_.read_rows(first, n, out);  // The file's bytes, which dtype() described.
  }
  void read_uint64(std::uint64_t first, std::uint64_t n, std::uint64_t* out) const override {
    const std::string& d = npy_.descr();
    const bool is_signed = d.size() >= 2 && d[1] == 'i';
    const std::uint64_t width = npy_.row_bytes();
    if (rank() != 1 || d.empty() || d[0] == '>' || (d[1] != 'i' && d[1] != 'u') ||
        (width != 1 && width != 2 && width != 4 && width != 8)) {
      throw Error(ErrorCode::kInvalidArgument,
                  name_ + " must be a 1-D integer array, not '" + d + "'");
    }
    std::vector<unsigned char> raw(n * width);
    npy_.read_rows(first, n, raw.data());
    for (std::uint64_t i = 0; i < n; ++i) {
      std::uint64_t value = 0;
      for (std::uint64_t b = 0; b < width; ++b) {
        value |= std::uint64_t{raw[i * width + b]} << (8 * b);
      }
      if (is_signed && (value >> (8 * width - 1)) & 1) {
        throw Error(ErrorCode::kInvalidArgument,
                    name_ + " holds a negative value at position " + std::to_string(first + i));
      }
      out[i] = value;
    }
  }

 private:
  std::string name_;
  NpyReader npy_;
};

class Hdf5Source : public ArraySource {
 public:
  Hdf5Source(const std::string& path, const std::string& dataset) : dataset_(path, dataset) {}
  const std::string& name() const override { return dataset_.name(); }
  std::uint64_t rows() const override { return dataset_.rows(); }
  std::uint64_t columns() const override { return dataset_.columns(); }
  int rank() const override { return dataset_.rank(); }
  std::vector<std::uint64_t> shape() const override {
    if (rank() == 1) return {rows()};
    return {rows(), columns()};
  }
  std::optional<DType> dtype(bool u2_is_bfloat16) const override {
    return dataset_.dtype(u2_is_bfloat16);
  }
  std::string type_name() const override { return dataset_.type_name(); }
  void read_rows(std::uint64_t first, std::uint64_t n, void* out, DType as) const override {
    dataset_.read_rows(first, n, out, as);
  }
  void read_uint64(std::uint64_t first, std::uint64_t n, std::uint64_t* out) const override {
    if (rank() != 1) {
      throw Error(ErrorCode::kInvalidArgument, name() + " must be a 1-D integer dataset");
    }
    dataset_.read_uint64(first, n, out);
  }
  const Hdf5Dataset& dataset() const { return dataset_; }

 private:
  Hdf5Dataset dataset_;
};

// A shape as numpy writes it: "()", "(4,)", "(4, 1)".
std::string shape_text(const std::vector<std::uint64_t>& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    text += (i == 0 ? "" : ", ") + std::to_string(shape[i]);
  }
  return text + (shape.size() == 1 ? ",)" : ")");
}

// Whether `file` is read as HDF5 (its signature says so) or as .npy; a file named .h5 or .hdf5
// without HDF5's signature is refused, not read as a .npy file (whose error would puzzle).
bool read_as_hdf5(const std::string& file) {
  if (is_hdf5_file(file)) return true;
  if (file.ends_with(".h5") || file.ends_with(".hdf5")) {
    throw Error(ErrorCode::kInvalidArgument,
                file + " is not an HDF5 file (it does not start with HDF5's signature)");
  }
  return false;
}

// A .npy file named with a dataset ("v.npy:/emb"): refused, not read whole without a word.
void refuse_dataset_of_npy(const std::string& spec, const std::string& file) {
  if (file == spec) return;
  throw Error(ErrorCode::kInvalidArgument,
              spec + ": " + file + " is not an HDF5 file, and only an HDF5 file has datasets (\"" +
                  spec.substr(file.size()) + "\"); give the .npy file alone");
}

std::unique_ptr<ArraySource> open_array(const std::string& spec, const std::string& dataset) {
  const auto [file, name] = split_hdf5_spec(spec, dataset);
  if (!exists(file)) throw Error(ErrorCode::kNotFound, "no such file " + file);
  if (read_as_hdf5(file)) return std::make_unique<Hdf5Source>(file, name);
  refuse_dataset_of_npy(spec, file);
  return std::make_unique<NpySource>(file);
}

// What the source says about itself: dtype name and metadata (sidecar or HDF5 attributes).
struct SourceFacts {
  std::optional<std::string> dtype;
  std::optional<std::string> metadata;
  // The files of an npy export, by column, as its sidecar's "files" names them (an export
  // names vectors.npy, keys.npy, epochs.npy; each defaults to that name when not listed). A
  // column listed holds rows: its file missing is an incomplete export (an HDF5 export, with
  // its root attribute embstore_format, always holds /keys and /epochs).
  std::string vectors_file = kNpyVectorsFile;
  std::string keys_file = kNpyKeysFile;
  std::string epochs_file = kNpyEpochsFile;
  bool lists_keys = false;
  bool lists_epochs = false;
};

// The file name a sidecar's "files" gives `column` (`file` unchanged when it names none): a
// name in the export's directory, or kInvalidArgument naming the sidecar, column and value.
bool listed_file(const nlohmann::json& files, const char* column, const std::string& sidecar,
                 std::string& file) {
  if (!files.contains(column)) return false;
  const nlohmann::json& name = files[column];
  if (!name.is_string() || name.get<std::string>().empty() ||
      name.get<std::string>().find('/') != std::string::npos || name == "." || name == "..") {
    throw Error(ErrorCode::kInvalidArgument,
                sidecar + ": files." + column +
                    " must be the name of a file in the export's directory; got " + name.dump());
  }
  file = name.get<std::string>();
  return true;
}

SourceFacts read_sidecar(const std::string& path) {
  SourceFacts facts;
  std::ifstream in(path);
  if (!in) return facts;
  nlohmann::json sidecar;
  try {
    sidecar = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorCode::kInvalidArgument, path + " is not valid JSON: " + e.what());
  }
  if (sidecar.contains("dtype") && sidecar["dtype"].is_string()) {
    facts.dtype = sidecar["dtype"].get<std::string>();
  }
  if (sidecar.contains("metadata") && sidecar["metadata"].is_string()) {
    facts.metadata = sidecar["metadata"].get<std::string>();
  }
  if (sidecar.contains("files") && sidecar["files"].is_object()) {
    const nlohmann::json& files = sidecar["files"];
    listed_file(files, "vectors", path, facts.vectors_file);
    facts.lists_keys = listed_file(files, "keys", path, facts.keys_file);
    facts.lists_epochs = listed_file(files, "epochs", path, facts.epochs_file);
  }
  return facts;
}

// Keys or epochs (`column`) the export says it holds but whose file or dataset (`missing`) is
// not there: a copy cut short. Refused (kNotFound, as a missing vectors.npy is), before anything
// is made or opened: taken as absent, every row would get its position as key or epoch 0, and
// a lookup by a real sample id would miss, or find another sample. `instead` names the options
// that make it unneeded. (embstore.io.import_npy refuses it in the same words.)
[[noreturn]] void refuse_incomplete_export(const std::string& missing, const std::string& because,
                                           const char* what, const char* column,
                                           const char* instead) {
  throw Error(ErrorCode::kNotFound,
              missing + " is missing, but " + because +
                  ": the export is incomplete (a copy cut short?), and nothing was imported; "
                  "restore the " +
                  what + ", or give " + instead + " to choose the rows' " + column);
}

// Rethrows the exception being handled with `note` added to its message: into an existing
// store, the batches appended before a failure stay committed, and the user must learn which.
[[noreturn]] void rethrow_with_note(const std::string& note) {
  try {
    throw;
  } catch (const Error& e) {
    throw Error(e.code(), e.what() + note, e.sys_errno());
  } catch (const std::exception& e) {
    throw Error(ErrorCode::kIO, e.what() + note);
  }
}

ImportResult import_once(const std::string& store, const std::string& source,
                         const ImportOptions& options);

}  // namespace

ImportResult import_rows(const std::string& store, const std::string& source,
                         const ImportOptions& options) {
  // Where there was no store to append to (no path, or an empty directory), the new store is
  // built aside and published only if nothing is at `store` by then. Two imports creating the
  // same store at once: the one that finds the other's store there appends to it, as any
  // import into an existing store (its checks included), instead of failing with kAlreadyExists
  // and nothing imported. (Built again from the source: its own new store was removed.)
  std::error_code ec;
  const bool was_new =
      !exists(store) || (is_directory(store) && std::filesystem::is_empty(store, ec));
  try {
    return import_once(store, source, options);
  } catch (const Error& e) {
    if (!was_new || e.code() != ErrorCode::kAlreadyExists || !exists(store) ||
        (is_directory(store) && std::filesystem::is_empty(store, ec))) {
      throw;
    }
  }
  return import_once(store, source, options);
}

namespace {

ImportResult import_once(const std::string& store, const std::string& source,
                         const ImportOptions& options) {
  if (store.empty()) throw Error(ErrorCode::kInvalidArgument, "the store path is empty");
  std::unique_ptr<ArraySource> vectors, keys, epochs;
  // Keys or epochs taken from the source itself (an export's), not named by an option.
  bool keys_by_default = false, epochs_by_default = false;
  SourceFacts facts;
  if (is_directory(source)) {
    const std::string sidecar = source + "/" + kNpySidecarFile;
    facts = read_sidecar(sidecar);
    const std::string vectors_path = source + "/" + facts.vectors_file;
    if (!exists(vectors_path)) {
      throw Error(ErrorCode::kNotFound, source + " holds no " + facts.vectors_file);
    }
    vectors = open_array(vectors_path, "");
    const std::string listed = sidecar + " lists it among the export's files";
    const std::string keys_path = source + "/" + facts.keys_file;
    const std::string epochs_path = source + "/" + facts.epochs_file;
    if (!options.keys) {
      if (exists(keys_path)) {
        keys = open_array(keys_path, "");
        keys_by_default = true;
      } else if (facts.lists_keys) {
        refuse_incomplete_export(keys_path, listed, "file", "keys", "--keys");
      }
    }
    if (!options.epochs && !options.epoch) {
      if (exists(epochs_path)) {
        epochs = open_array(epochs_path, "");
        epochs_by_default = true;
      } else if (facts.lists_epochs) {
        refuse_incomplete_export(epochs_path, listed, "file", "epochs", "--epochs or --epoch");
      }
    }
  } else {
    const auto [file, dataset] = split_hdf5_spec(source, "/vectors");
    if (!exists(file)) throw Error(ErrorCode::kNotFound, "no such file " + file);
    if (read_as_hdf5(file)) {
      auto h5 = std::make_unique<Hdf5Source>(file, dataset);
      facts.dtype = h5->dataset().root_attribute("dtype");
      facts.metadata = h5->dataset().root_attribute("metadata");
      const bool is_export = h5->dataset().root_attribute("embstore_format").has_value();
      vectors = std::move(h5);
      auto sibling = [&](const char* name, const char* column,
                         const char* instead) -> std::unique_ptr<ArraySource> {
        try {
          return std::make_unique<Hdf5Source>(file, name);
        } catch (const Error& e) {
          if (e.code() != ErrorCode::kNotFound) throw;
          if (is_export) {
            refuse_incomplete_export(file + ":" + name,
                                     file +
                                         " is an embstore export (root attribute "
                                         "embstore_format), which holds it",
                                     "dataset", column, instead);
          }
          return nullptr;
        }
      };
      if (!options.keys) keys = sibling("/keys", "keys", "--keys");
      if (!options.epochs && !options.epoch) {
        epochs = sibling("/epochs", "epochs", "--epochs or --epoch");
      }
      keys_by_default = keys != nullptr;
      epochs_by_default = epochs != nullptr;
    } else {
      refuse_dataset_of_npy(source, file);
      vectors = std::make_unique<NpySource>(file);
    }
  }
  if (options.keys) keys = open_array(*options.keys, "/keys");
  if (options.epochs) epochs = open_array(*options.epochs, "/epochs");

  if (vectors->rank() != 2) {
    throw Error(ErrorCode::kInvalidArgument, vectors->name() + " has " +
                                                 std::to_string(vectors->rank()) +
                                                 " dimensions; import takes a 2-D array "
                                                 "(rows x dim)");
  }
  const bool says_bfloat16 =
      options.dtype == DType::kBFloat16 || facts.dtype == std::string("bfloat16");
  const std::optional<DType> source_dtype = vectors->dtype(says_bfloat16);
  if (!source_dtype) {
    // A file of a type no store holds is bad input (exit status 2, as the README's table says),
    // whatever the store; rows of a type one store holds and this one does not are 15.
    throw Error(ErrorCode::kInvalidArgument,
                vectors->name() + ": element type " + vectors->type_name() +
                    " is not one a store holds (float32, float16, bfloat16 as uint16 with "
                    "--dtype bfloat16, int8, uint8, float64)");
  }
  const std::uint64_t n = vectors->rows();
  if (vectors->columns() == 0 || vectors->columns() > kMaxDim) {
    throw Error(ErrorCode::kInvalidArgument,
                vectors->name() + " has " + std::to_string(vectors->columns()) +
                    " columns; a store's dim is 1.." + std::to_string(kMaxDim));
  }
  const auto dim = static_cast<std::uint32_t>(vectors->columns());
  for (const bool is_keys : {true, false}) {
    const ArraySource* column = is_keys ? keys.get() : epochs.get();
    if (column == nullptr) continue;
    // One key (epoch) per row: a (4, 1) or 0-d array is named by its shape, not by a count of
    // entries or by its element type (which may be right).
    if (column->rank() != 1) {
      throw Error(ErrorCode::kInvalidArgument,
                  column->name() + " has shape " + shape_text(column->shape()) + "; expected (" +
                      std::to_string(n) + ",): one " + (is_keys ? "key" : "epoch") +
                      " per row of " + vectors->name());
    }
    if (column->rows() != n) {
      // Taken by default, not named: say so, and how to name others (FILE.h5:/other's keys are
      // the file's /keys, which were written for its /vectors).
      std::string note;
      if (is_keys ? keys_by_default : epochs_by_default) {
        note = std::string("; ") + column->name() + " was taken as the " +
               (is_keys ? "keys" : "epochs") + " of " + vectors->name() +
               " by default, being the source's own: give " +
               (is_keys ? "--keys" : "--epochs or --epoch") + " to choose others";
      }
      throw Error(ErrorCode::kInvalidArgument,
                  column->name() + " has " + counted(column->rows(), "entry", "entries") + " but " +
                      vectors->name() + " has " + counted(n, "row") + note);
    }
  }
  // Every key and epoch is checked before the first append, so input refused for a bad value
  // stores nothing, in an existing store too. Read in batches (and again when appending): the
  // columns may be larger than memory.
  {
    std::vector<std::uint64_t> scratch;
    for (const auto* column : {keys.get(), epochs.get()}) {
      if (column == nullptr) continue;
      for (std::uint64_t first = 0; first < n; first += kBatchBytes / 8) {
        const std::uint64_t count = std::min<std::uint64_t>(kBatchBytes / 8, n - first);
        scratch.resize(count);
        column->read_uint64(first, count, scratch.data());
      }
    }
  }

  ImportResult result;
  result.source_dtype = *source_dtype;
  std::optional<StagedOutput> staged;  // Where a new store is built.
  std::optional<Writer> writer;
  // An empty directory (a volume mounted for the store, say) is a place to create it, as
  // create_store takes one. The store is built in a hidden directory inside it (on that volume:
  // a mount point cannot be replaced, and beside it is another file system), and its files are
  // moved up once it is complete, the header last (move_store_into(), store.h): until then the
  // directory holds no store, so a killed import leaves no store that looks whole (it did when
  // the store was built in place, its rows appended there).
  std::error_code empty_ec;
  const bool in_place = is_directory(store) && std::filesystem::is_empty(store, empty_ec);
  // The key index is built for the rows imported (in an existing store, a growth goes straight
  // to tables for them), not grown through every size on the way.
  // (At most the 2^40 rows a store holds: more are refused at the append that passes them.)
  WriterOptions writing;
  writing.expected_rows = std::min<std::uint64_t>(n, std::uint64_t{1} << 40);
  // Rows are read, converted and appended `batch` at a time.
  const std::uint64_t source_row_bytes = std::uint64_t{dim} * dtype_size(*source_dtype);
  const std::uint64_t batch =
      std::max<std::uint64_t>(1, kBatchBytes / std::max<std::uint64_t>(1, source_row_bytes));
  if (exists(store) && !in_place) {
    // Checked first on a Reader, which changes nothing: a refused import leaves the store as it
    // was (a Writer's open may recover it, make its key index, upgrade its header). Checked
    // again on the Writer, should the store have been replaced in between.
    const auto refuse_mismatch = [&](std::uint32_t have_dim, DType stored, const StoreInfo& info) {
      if (have_dim != dim) {
        throw Error(ErrorCode::kFormatMismatch, store + " has dim " + std::to_string(have_dim) +
                                                    " but " + vectors->name() + " has " +
                                                    std::to_string(dim) + " columns");
      }
      // What only a new store takes (its metadata and growth step) is not dropped without a word
      // when the store exists: asked for and different from what the store has, it is refused.
      if (options.metadata && !same_metadata(*options.metadata, info.metadata)) {
        throw Error(ErrorCode::kFormatMismatch,
                    store +
                        " exists, with other metadata than --metadata gives; --metadata is for "
                        "a new store (an existing store's metadata is fixed)");
      }
      if (options.segment_bytes && *options.segment_bytes != info.segment_bytes) {
        throw Error(ErrorCode::kFormatMismatch, store + " exists, with segments of " +
                                                    std::to_string(info.segment_bytes) +
                                                    " bytes; --segment-mb is for a new store");
      }
      // --dtype names the store's dtype (a store's dtype is fixed at its creation): rows
      // converted to another one would not be what was asked for. Only uint16 rows with
      // bfloat16 asked say what the source holds (bit patterns), whatever the store is.
      const bool names_bit_patterns =
          options.dtype == DType::kBFloat16 && *source_dtype == DType::kBFloat16;
      if (options.dtype && *options.dtype != stored && !names_bit_patterns) {
        throw Error(ErrorCode::kFormatMismatch,
                    store + " holds " + std::string(dtype_name(stored)) + " rows but --dtype " +
                        std::string(dtype_name(*options.dtype)) +
                        " was asked for; a store's dtype is fixed when it is created");
      }
      // Other rows are converted to the store's dtype where nothing is lost (a wider float type),
      // where the library takes them as they are (float32 into a 16-bit store, as every Writer
      // does), or where --dtype names the store's dtype, asking for it: float64 rows rounded into
      // a float32 store without a word are the mistake the Python Writer refuses them as (and
      // bfloat16 bit patterns, named by --dtype bfloat16, rounded into a float16 store).
      // Rows of a type that converts to no other (int8, uint8) are refused whatever --dtype says.
      const bool converts = RowConverter::converts(*source_dtype, stored);
      if (!converts ||
          (options.dtype != stored && *source_dtype != stored &&
           !dtype_accepts(stored, *source_dtype) && !widens_exactly(*source_dtype, stored))) {
        // --dtype converts between float types only (RowConverter): for the others no hint.
        // Bit patterns --dtype bfloat16 names cannot also be asked to round: --dtype float16
        // would read the file as uint16, which no store holds; an export's sidecar names them.
        const std::string hint =
            !converts ? " (import converts rows between float types only)"
            : names_bit_patterns
                ? "; a .npy of bfloat16 bit patterns named by --dtype bfloat16 goes only into a "
                  "store that takes them as they are (bfloat16, float32, float64): to round "
                  "them to " +
                      std::string(dtype_name(stored)) +
                      ", import an export whose embstore.json says bfloat16, with --dtype " +
                      std::string(dtype_name(stored))
                : "; give --dtype " + std::string(dtype_name(stored)) +
                      " to convert them (rounded to the nearest " +
                      std::string(dtype_name(stored)) + ")";
        throw Error(ErrorCode::kFormatMismatch, store + " holds " +
                                                    std::string(dtype_name(stored)) + " rows but " +
                                                    vectors->name() + " holds " +
                                                    std::string(dtype_name(*source_dtype)) + hint);
      }
    };
    {
      const Reader reader = Reader::open(store);
      refuse_mismatch(reader.dim(), reader.dtype(), reader.info(InfoDetail::kState));
      // Every value is checked before the first append, as the keys and epochs are: input
      // refused for a value stores nothing (a retry after fixing the file would store the
      // earlier batches twice), and, checked before a Writer opens the store, changes nothing.
      RowConverter converter(*source_dtype, reader.dtype(), dim, vectors->name(),
                             "nothing of its batch was stored");
      if (converter.may_refuse()) {
        std::vector<std::byte> rows_buffer;
        for (std::uint64_t first = 0; first < n; first += batch) {
          const std::uint64_t count = std::min(batch, n - first);
          rows_buffer.resize(count * source_row_bytes);
          vectors->read_rows(first, count, rows_buffer.data(), *source_dtype);
          (void)converter.convert(rows_buffer.data(), count, first);
        }
      }
    }
    writer.emplace(Writer::open(store, writing));
    refuse_mismatch(writer->dim(), writer->dtype(), writer->info(InfoDetail::kState));
  } else {
    CreateOptions create;
    create.dim = dim;
    create.dtype = options.dtype.value_or(*source_dtype);
    // Refused as into an existing store of that dtype (kFormatMismatch), before anything is
    // made at `store`.
    if (!RowConverter::converts(*source_dtype, create.dtype)) {
      throw Error(ErrorCode::kFormatMismatch,
                  vectors->name() + " holds " + std::string(dtype_name(*source_dtype)) +
                      " rows but --dtype " + std::string(dtype_name(create.dtype)) +
                      " was asked for (import converts rows between float types only; int8 and "
                      "uint8 rows go only into a store of their own dtype)");
    }
    create.metadata = options.metadata.value_or(facts.metadata.value_or(""));
    if (options.segment_bytes) {
      create.segment_bytes = *options.segment_bytes;
    } else {
      // Rows larger than the default segment (a dim of millions) get a segment of one row,
      // whole pages: the default would refuse them, naming an option the caller never gave.
      const std::uint64_t row_bytes = std::uint64_t{dim} * dtype_size(create.dtype);
      create.segment_bytes = std::max(create.segment_bytes, (row_bytes + 4095) / 4096 * 4096);
    }
    {
      // Inside an empty directory `store`: `store/.store.partial-*`.
      staged.emplace(store, in_place ? OutputShape::kStoreInside : OutputShape::kDirectory);
      try {
        writer.emplace(staged->create_writer(create, writing));
      } catch (...) {
        staged->rethrow_naming_out();  // Its destructor removes the working directory.
      }
    }
    result.created = true;
  }
  result.store_dtype = writer->dtype();
  std::uint64_t end_row = 0;  // After the last row appended.
  bool contiguous = true;     // No other writer's rows between ours.
  try {
    // Into an existing store every value was checked before its Writer opened (above).
    RowConverter converter(
        *source_dtype, writer->dtype(), dim, vectors->name(),
        result.created ? "no store was made at " + store : "nothing of its batch was stored");
    const std::uint64_t row_bytes = source_row_bytes;
    std::vector<std::byte> rows_buffer;
    std::vector<std::uint64_t> key_buffer, epoch_buffer;
    result.first_row = writer->committed_rows();
    for (std::uint64_t first = 0; first < n; first += batch) {
      const std::uint64_t count = std::min(batch, n - first);
      rows_buffer.resize(count * row_bytes);
      vectors->read_rows(first, count, rows_buffer.data(), *source_dtype);
      key_buffer.resize(count);
      if (keys) {
        keys->read_uint64(first, count, key_buffer.data());
      } else {
        for (std::uint64_t i = 0; i < count; ++i) key_buffer[i] = first + i;
      }
      const ConstMatrix matrix = converter.convert(rows_buffer.data(), count, first);
      std::uint64_t row;
      if (epochs) {
        epoch_buffer.resize(count);
        epochs->read_uint64(first, count, epoch_buffer.data());
        row = writer->append(key_buffer, epoch_buffer, matrix);
      } else {
        row = writer->append(key_buffer, options.epoch.value_or(0), matrix);
      }
      if (first == 0) result.first_row = row;
      contiguous = contiguous && (first == 0 || row == end_row);
      end_row = row + count;
      result.rows += count;
      if (options.progress) options.progress(result.rows, n);
    }
    writer->sync();
    if (!staged) {
      // Every row appended is committed and on the device (sync() returned): close() can take
      // none of them back. When all it failed at is the key index (derived data the next
      // writer rebuilds: its message says every row is stored), that is a warning, as for a
      // new store, not an error: an error's exit status sent scripts to import the rows again,
      // storing them twice.
      try {
        writer->close();
      } catch (const Error& e) {
        // Told apart by its text alone (embstore/staged_output.h, close_store()). Any other
        // failure (a disk's EIO, a store gone from its path) stays an error, with the note
        // below that every row imported is there.
        if (e.code() == ErrorCode::kNotFound ||
            std::string_view(e.what()).find(": the key index could not be maintained (") ==
                std::string_view::npos) {
          throw;
        }
        result.warning = e.what();
      }
    } else {
      result.warning = staged->close_writer(*writer, result.rows);
      writer.reset();
      staged->publish();
    }
    result.end_row = n == 0 ? result.first_row : end_row;
    result.contiguous = contiguous;
  } catch (...) {
    if (staged) {
      writer.reset();
      staged->rethrow_naming_out();  // Removed with `staged`.
    }
    if (result.rows == 0) throw;
    rethrow_with_note("; " + std::to_string(result.rows) + " of " + std::to_string(n) +
                      " rows were imported into " + store + " before this" +
                      (contiguous ? " (rows " : " (among other writers' rows, in rows ") +
                      std::to_string(result.first_row) + ".." + std::to_string(end_row) +
                      ") and stay there");
  }
  return result;
}

}  // namespace

}  // namespace embstore::tools
