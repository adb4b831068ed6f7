#include "hdf5_file.h"

#include <hdf5.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <vector>

#include "embstore/error.h"

namespace embstore::tools {
namespace {

// HDF5 prints its own error stack on stderr by default; embstore reports one line instead.
// H5dont_atexit comes first, before the library initialises: HDF5's exit handler would close
// again a file whose close failed (a full disk) after its directory was removed, and crash.
// Every file is closed explicitly instead.
void silence_hdf5() {
  static const bool done = [] {
    H5dont_atexit();
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)done;
}

// The errno of the failed system call recorded on HDF5's error stack by its file driver
// ("..., errno = 28, ..."), 0 if there is none: a full disk must be reported as one.
int hdf5_errno() {
  int err = 0;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* entry, void* data) -> herr_t {
        const char* at = entry->desc != nullptr ? std::strstr(entry->desc, "errno = ") : nullptr;
        if (at != nullptr && *static_cast<int*>(data) == 0) {
          *static_cast<int*>(data) = std::atoi(at + std::strlen("errno = "));
        }
        return 0;
      },
      &err);
  return err;
}

// The most specific message on HDF5's error stack ("truncated file: eof = 800, ..."), "" if
// there is none: why an input file could not be read.
std::string hdf5_reason() {
  std::string reason;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned n, const H5E_error2_t* entry, void* data) -> herr_t {
        if (n == 0 && entry->desc != nullptr) *static_cast<std::string*>(data) = entry->desc;
        return 0;
      },
      &reason);
  return reason;
}

// Owns one hid_t and closes it with the matching H5*close.
class Id {
 public:
  Id() = default;
  Id(hid_t id, herr_t (*closer)(hid_t)) : id_(id), closer_(closer) {}
  Id(Id&& other) noexcept : id_(other.id_), closer_(other.closer_) { other.id_ = -1; }
  Id& operator=(Id&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = other.id_;
      closer_ = other.closer_;
      other.id_ = -1;
    }
    return *this;
  }
  ~Id() { reset(); }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  hid_t release() {
    const hid_t id = id_;
    id_ = -1;
    return id;
  }
  void reset() {
    if (id_ >= 0 && closer_ != nullptr) closer_(id_);
    id_ = -1;
  }

 private:
  hid_t id_ = -1;
  herr_t (*closer_)(hid_t) = nullptr;
};

// kFull for a full disk, as the other exports give; kIO for anything else (fail() serves
// reading too, where the write mapping of EACCES to kReadOnly would be wrong).
[[noreturn]] void fail(const std::string& path, const std::string& what) {
  const int err = hdf5_errno();
  if (err == 0) throw Error(ErrorCode::kIO, "HDF5 " + what + " failed for " + path);
  const ErrorCode code =
      error_code_for_write_errno(err) == ErrorCode::kFull ? ErrorCode::kFull : ErrorCode::kIO;
  throw Error(code, "HDF5 " + what + " failed for " + path + ": " + std::strerror(err), err);
}

Id checked(hid_t id, herr_t (*closer)(hid_t), const std::string& path, const std::string& what) {
  if (id < 0) fail(path, what);
  return Id(id, closer);
}

// IEEE binary16, built as h5py builds it (HDF5 1.10 has no predefined half type).
Id float16_type() {
  const hid_t type = H5Tcopy(H5T_IEEE_F32LE);
  H5Tset_fields(type, 15, 10, 5, 0, 10);
  H5Tset_size(type, 2);
  H5Tset_ebias(type, 15);
  H5Tpack(type);
  return Id(type, H5Tclose);
}

// The in-memory HDF5 type of a store dtype (bfloat16: its uint16 bit patterns).
Id memory_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return Id(H5Tcopy(H5T_NATIVE_FLOAT), H5Tclose);
    case DType::kFloat64:
      return Id(H5Tcopy(H5T_NATIVE_DOUBLE), H5Tclose);
    case DType::kFloat16:
      return float16_type();
    case DType::kBFloat16:
      return Id(H5Tcopy(H5T_NATIVE_UINT16), H5Tclose);
    case DType::kInt8:
      return Id(H5Tcopy(H5T_NATIVE_INT8), H5Tclose);
    case DType::kUInt8:
      return Id(H5Tcopy(H5T_NATIVE_UINT8), H5Tclose);
  }
  return Id();
}

void write_string_attribute(hid_t object, const char* name, const std::string& value,
                            const std::string& path) {
  // Variable-length UTF-8 strings: h5py returns them as str.
  Id type = checked(H5Tcopy(H5T_C_S1), H5Tclose, path, "string type");
  H5Tset_size(type.get(), H5T_VARIABLE);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  Id space = checked(H5Screate(H5S_SCALAR), H5Sclose, path, "dataspace");
  Id attr = checked(H5Acreate2(object, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                    H5Aclose, path, std::string("attribute ") + name);
  const char* text = value.c_str();
  if (H5Awrite(attr.get(), type.get(), &text) < 0) fail(path, std::string("attribute ") + name);
}

// Reads rows [first, first + n) of a 1-D or 2-D dataset into `out` as `memory_type`.
void read_hyperslab(hid_t dataset, const std::string& name, int rank, hsize_t columns,
                    std::uint64_t first, std::uint64_t n, void* out, hid_t memory_type) {
  if (n == 0) return;
  Id file_space = checked(H5Dget_space(dataset), H5Sclose, name, "dataspace");
  const hsize_t start[2] = {first, 0};
  const hsize_t count[2] = {n, columns};
  H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr);
  Id memory_space = checked(H5Screate_simple(rank, count, nullptr), H5Sclose, name, "dataspace");
  if (H5Dread(dataset, memory_type, memory_space.get(), file_space.get(), H5P_DEFAULT, out) < 0) {
    throw Error(ErrorCode::kIO, "cannot read rows of " + name);
  }
}

// An HDF5 element type as numpy would name it, for messages.
std::string element_type_name(H5T_class_t type_class, std::size_t size, bool is_signed) {
  const std::string bits = std::to_string(8 * size);
  switch (type_class) {
    case H5T_INTEGER:
      return (is_signed ? "int" : "uint") + bits;
    case H5T_FLOAT:
      return "float" + bits;
    case H5T_STRING:
      return "string";
    case H5T_ENUM:
      return "enum";
    case H5T_COMPOUND:
      return "compound";
    default:
      return "non-numeric";
  }
}

// The store dtype of an HDF5 float type laid out as IEEE binary16, binary32 or binary64 (sign,
// exponent and mantissa where IEEE puts them, IEEE's bias, an implied leading bit); else nullopt.
std::optional<DType> ieee_float_dtype(hid_t type, std::size_t size) {
  struct Layout {
    std::size_t size, exponent, mantissa;
    std::size_t bias;
    DType dtype;
  };
  static constexpr Layout kIeee[] = {{2, 5, 10, 15, DType::kFloat16},
                                     {4, 8, 23, 127, DType::kFloat32},
                                     {8, 11, 52, 1023, DType::kFloat64}};
  std::size_t sign = 0, exponent_at = 0, exponent = 0, mantissa_at = 0, mantissa = 0;
  if (H5Tget_fields(type, &sign, &exponent_at, &exponent, &mantissa_at, &mantissa) < 0) {
    return std::nullopt;
  }
  for (const Layout& ieee : kIeee) {
    if (size == ieee.size && sign == size * 8 - 1 && exponent == ieee.exponent &&
        exponent_at == ieee.mantissa && mantissa == ieee.mantissa && mantissa_at == 0 &&
        H5Tget_ebias(type) == ieee.bias && H5Tget_norm(type) == H5T_NORM_IMPLIED &&
        H5Tget_precision(type) == size * 8 && H5Tget_offset(type) == 0) {
      return ieee.dtype;
    }
  }
  return std::nullopt;
}

}  // namespace

struct Hdf5Writer::Handles {
  Id file, vectors, keys, epochs, vector_type;
};

Hdf5Writer::Hdf5Writer(const std::string& path, DType dtype, std::uint32_t dim, std::uint64_t rows,
                       const Attributes& attributes)
    : path_(path), dtype_(dtype), dim_(dim), h_(std::make_unique<Handles>()) {
  silence_hdf5();
  if (::access(path.c_str(), F_OK) == 0) {
    throw Error(ErrorCode::kAlreadyExists, "output " + path + " already exists");
  }
  h_->file = checked(H5Fcreate(path.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, H5P_DEFAULT), H5Fclose,
                     path, "file creation");
  h_->vector_type = memory_type(dtype);
  const hsize_t matrix_dims[2] = {rows, dim};
  Id matrix_space = checked(H5Screate_simple(2, matrix_dims, nullptr), H5Sclose, path, "dataspace");
  h_->vectors = checked(H5Dcreate2(h_->file.get(), "vectors", h_->vector_type.get(),
                                   matrix_space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                        H5Dclose, path, "dataset vectors");
  const hsize_t vector_dims[1] = {rows};
  Id vector_space = checked(H5Screate_simple(1, vector_dims, nullptr), H5Sclose, path, "dataspace");
  h_->keys = checked(H5Dcreate2(h_->file.get(), "keys", H5T_STD_U64LE, vector_space.get(),
                                H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                     H5Dclose, path, "dataset keys");
  h_->epochs = checked(H5Dcreate2(h_->file.get(), "epochs", H5T_STD_U64LE, vector_space.get(),
                                  H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                       H5Dclose, path, "dataset epochs");
  Id root = checked(H5Gopen2(h_->file.get(), "/", H5P_DEFAULT), H5Gclose, path, "root group");
  write_string_attribute(root.get(), "embstore_format", kHdf5ExportFormat, path);
  write_string_attribute(root.get(), "dtype", attributes.dtype, path);
  write_string_attribute(root.get(), "metadata", attributes.metadata, path);
  write_string_attribute(root.get(), "store_id", attributes.store_id, path);
  Id scalar = checked(H5Screate(H5S_SCALAR), H5Sclose, path, "dataspace");
  Id dim_attr =
      checked(H5Acreate2(root.get(), "dim", H5T_STD_U32LE, scalar.get(), H5P_DEFAULT, H5P_DEFAULT),
              H5Aclose, path, "attribute dim");
  const std::uint32_t dim_value = attributes.dim;
  if (H5Awrite(dim_attr.get(), H5T_NATIVE_UINT32, &dim_value) < 0) fail(path, "attribute dim");
}

Hdf5Writer::~Hdf5Writer() {
  // After a failed write: everything is closed here, datasets before the file, before export
  // removes the working directory. Nothing is left for an exit handler to close.
  h_->vectors.reset();
  h_->keys.reset();
  h_->epochs.reset();
  h_->vector_type.reset();
  h_->file.reset();
}

void Hdf5Writer::write(std::uint64_t first, std::uint64_t n, const void* vectors,
                       const std::uint64_t* keys, const std::uint64_t* epochs) {
  if (n == 0) return;
  {
    Id file_space = checked(H5Dget_space(h_->vectors.get()), H5Sclose, path_, "dataspace");
    const hsize_t start[2] = {first, 0};
    const hsize_t count[2] = {n, dim_};
    H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr);
    Id memory_space = checked(H5Screate_simple(2, count, nullptr), H5Sclose, path_, "dataspace");
    if (H5Dwrite(h_->vectors.get(), h_->vector_type.get(), memory_space.get(), file_space.get(),
                 H5P_DEFAULT, vectors) < 0) {
      fail(path_, "write of vectors");
    }
  }
  const hsize_t start[1] = {first};
  const hsize_t count[1] = {n};
  for (auto [dataset, data] : {std::pair{h_->keys.get(), keys}, {h_->epochs.get(), epochs}}) {
    Id file_space = checked(H5Dget_space(dataset), H5Sclose, path_, "dataspace");
    H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr);
    Id memory_space = checked(H5Screate_simple(1, count, nullptr), H5Sclose, path_, "dataspace");
    if (H5Dwrite(dataset, H5T_NATIVE_UINT64, memory_space.get(), file_space.get(), H5P_DEFAULT,
                 data) < 0) {
      fail(path_, "write of keys/epochs");
    }
  }
}

void Hdf5Writer::finish() {
  h_->vectors.reset();
  h_->keys.reset();
  h_->epochs.reset();
  if (H5Fflush(h_->file.get(), H5F_SCOPE_GLOBAL) < 0) fail(path_, "flush");
  if (H5Fclose(h_->file.release()) < 0) fail(path_, "close");
}

struct Hdf5Dataset::Handles {
  Id file, dataset;
};

Hdf5Dataset::Hdf5Dataset(const std::string& path, const std::string& dataset)
    : name_(path + ":" + dataset), h_(std::make_unique<Handles>()) {
  silence_hdf5();
  if (!is_hdf5_file(path)) {
    throw Error(ErrorCode::kNotFound, path + " is not an HDF5 file");
  }
  // An input HDF5 cannot read (truncated, damaged) or a name that is no dataset (a group) is
  // bad input, named with HDF5's reason; a failed system call (errno on its stack) is not.
  const auto refuse = [&](const std::string& what, const std::string& whose) {
    if (hdf5_errno() != 0) fail(path, what);
    const std::string reason = hdf5_reason();
    throw Error(ErrorCode::kInvalidArgument,
                whose + ": HDF5 cannot read it" + (reason.empty() ? "" : " (" + reason + ")"));
  };
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (file < 0) refuse("open", path);
  h_->file = Id(file, H5Fclose);
  if (H5Lexists(h_->file.get(), dataset.c_str(), H5P_DEFAULT) <= 0) {
    throw Error(ErrorCode::kNotFound, "no dataset " + dataset + " in " + path);
  }
  H5O_info_t object{};
  if (H5Oget_info_by_name2(h_->file.get(), dataset.c_str(), &object, H5O_INFO_BASIC, H5P_DEFAULT) >=
          0 &&
      object.type != H5O_TYPE_DATASET) {
    throw Error(ErrorCode::kInvalidArgument,
                name_ + " is " + (object.type == H5O_TYPE_GROUP ? "a group" : "no dataset") +
                    "; import reads a dataset (name one inside it)");
  }
  const hid_t opened = H5Dopen2(h_->file.get(), dataset.c_str(), H5P_DEFAULT);
  if (opened < 0) refuse("open of dataset " + dataset, name_);
  h_->dataset = Id(opened, H5Dclose);
  Id space = checked(H5Dget_space(h_->dataset.get()), H5Sclose, path, "dataspace");
  rank_ = H5Sget_simple_extent_ndims(space.get());
  if (rank_ < 1 || rank_ > 2) {
    throw Error(ErrorCode::kInvalidArgument,
                name_ + " has " + std::to_string(rank_) +
                    " dimensions; import reads vectors from a 2-D dataset and keys or epochs "
                    "from a 1-D one");
  }
  hsize_t dims[2] = {0, 1};
  H5Sget_simple_extent_dims(space.get(), dims, nullptr);
  rows_ = dims[0];
  columns_ = rank_ == 2 ? dims[1] : 1;
  Id type = checked(H5Dget_type(h_->dataset.get()), H5Tclose, path, "type");
  const H5T_class_t type_class = H5Tget_class(type.get());
  const std::size_t size = H5Tget_size(type.get());
  signed_ = type_class == H5T_INTEGER && H5Tget_sign(type.get()) != H5T_SGN_NONE;
  integer_ = type_class == H5T_INTEGER && size <= 8;
  type_name_ = element_type_name(type_class, size, signed_);
  if (type_class == H5T_FLOAT) {
    // Only IEEE binary16/32/64 (either byte order): HDF5 converts any float type to another,
    // so a 2-byte float of another layout (bfloat16's 8 exponent bits, say) read as binary16
    // would have its values changed without a word (overflowing to infinity).
    dtype_ = ieee_float_dtype(type.get(), size);
    if (!dtype_) type_name_ += " of a layout other than IEEE binary16/32/64";
  } else if (type_class == H5T_INTEGER && size == 1) {
    dtype_ = H5Tget_sign(type.get()) == H5T_SGN_NONE ? DType::kUInt8 : DType::kInt8;
  } else if (type_class == H5T_INTEGER && size == 2 && H5Tget_sign(type.get()) == H5T_SGN_NONE) {
    uint16_ = true;
    if (root_attribute("dtype") == std::string("bfloat16")) dtype_ = DType::kBFloat16;
  }
}

std::optional<DType> Hdf5Dataset::dtype(bool u2_is_bfloat16) const {
  if (!dtype_ && uint16_ && u2_is_bfloat16) return DType::kBFloat16;
  return dtype_;
}

Hdf5Dataset::~Hdf5Dataset() = default;

std::optional<std::string> Hdf5Dataset::root_attribute(const std::string& name) const {
  if (H5Aexists_by_name(h_->file.get(), "/", name.c_str(), H5P_DEFAULT) <= 0) return std::nullopt;
  Id attr =
      Id(H5Aopen_by_name(h_->file.get(), "/", name.c_str(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!attr.valid()) return std::nullopt;
  Id type = Id(H5Aget_type(attr.get()), H5Tclose);
  if (H5Tget_class(type.get()) == H5T_INTEGER) {
    std::uint64_t value = 0;
    if (H5Aread(attr.get(), H5T_NATIVE_UINT64, &value) < 0) return std::nullopt;
    return std::to_string(value);
  }
  if (H5Tget_class(type.get()) != H5T_STRING) return std::nullopt;
  if (H5Tis_variable_str(type.get()) > 0) {
    Id memory = Id(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(memory.get(), H5T_VARIABLE);
    H5Tset_cset(memory.get(), H5Tget_cset(type.get()));
    char* text = nullptr;
    if (H5Aread(attr.get(), memory.get(), &text) < 0) return std::nullopt;
    std::string value = text ? text : "";
    Id space = Id(H5Aget_space(attr.get()), H5Sclose);
    H5Dvlen_reclaim(memory.get(), space.get(), H5P_DEFAULT, &text);
    return value;
  }
  std::vector<char> buffer(H5Tget_size(type.get()) + 1, '\0');
  if (H5Aread(attr.get(), type.get(), buffer.data()) < 0) return std::nullopt;
  return std::string(buffer.data());
}

void Hdf5Dataset::read_rows(std::uint64_t first, std::uint64_t n, void* out, DType as) const {
  read_hyperslab(h_->dataset.get(), name_, rank_, columns_, first, n, out, memory_type(as).get());
}

void Hdf5Dataset::read_uint64(std::uint64_t first, std::uint64_t n, std::uint64_t* out) const {
  // HDF5 would convert any number to uint64, clamping negatives to 0 and truncating fractions:
  // a key or epoch would change without a word.
  if (!integer_) {
    throw Error(ErrorCode::kInvalidArgument,
                name_ + " holds " + type_name_ + " elements; keys and epochs must be integers");
  }
  if (!signed_) {
    read_hyperslab(h_->dataset.get(), name_, rank_, columns_, first, n, out, H5T_NATIVE_UINT64);
    return;
  }
  auto* values = reinterpret_cast<std::int64_t*>(out);
  read_hyperslab(h_->dataset.get(), name_, rank_, columns_, first, n, values, H5T_NATIVE_INT64);
  for (std::uint64_t i = 0; i < n; ++i) {
    if (values[i] < 0) {
      throw Error(ErrorCode::kInvalidArgument,
                  name_ + " holds a negative value at position " + std::to_string(first + i));
    }
  }
}

bool is_hdf5_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char signature[8] = {};
  in.read(signature, sizeof(signature));
  return in.gcount() == 8 && std::memcmp(signature, "\x89HDF\r\n\x1a\n", 8) == 0;
}

}  // namespace embstore::tools
