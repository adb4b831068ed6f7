// hdf5_file.h — the HDF5 side of export and import, through libhdf5's C API. An export file holds
// datasets /vectors (rows x dim), /keys and /epochs (uint64) and root attributes dtype, dim,
// metadata, store_id and embstore_format; h5py reads it with no embstore installed. bfloat16 rows
// are stored as uint16 bit patterns (HDF5 has no bfloat16), named by the dtype attribute.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "embstore/dtype.h"

namespace embstore::tools {

// Value of the root attribute embstore_format, so import can tell an export from other files.
inline constexpr const char* kHdf5ExportFormat = "embstore-export-1";

// Writes an export file of exactly `rows` rows, given in order. Thread-compatible.
class Hdf5Writer {
 public:
  struct Attributes {
    std::string dtype;
    std::uint32_t dim = 0;
    std::string metadata;
    std::string store_id;
  };
  // Creates `path` (kAlreadyExists if it exists).
  Hdf5Writer(const std::string& path, DType dtype, std::uint32_t dim, std::uint64_t rows,
             const Attributes& attributes);
  ~Hdf5Writer();
  Hdf5Writer(const Hdf5Writer&) = delete;
  Hdf5Writer& operator=(const Hdf5Writer&) = delete;

  // Writes rows [first, first + n) of the file: n rows of vectors, n keys and n epochs.
  void write(std::uint64_t first, std::uint64_t n, const void* vectors, const std::uint64_t* keys,
             const std::uint64_t* epochs);
  // Closes the file; throws kIO if HDF5 reports a failure.
  void finish();

 private:
  struct Handles;
  std::string path_;
  DType dtype_;
  std::uint32_t dim_;
  std::unique_ptr<Handles> h_;
};

// One dataset of an HDF5 file, 1-D or 2-D, read by rows. Thread-compatible.
class Hdf5Dataset {
 public:
  // Opens `dataset` (e.g. "/vectors") in `path`: kNotFound if either is missing.
  Hdf5Dataset(const std::string& path, const std::string& dataset);
  ~Hdf5Dataset();
  Hdf5Dataset(const Hdf5Dataset&) = delete;
  Hdf5Dataset& operator=(const Hdf5Dataset&) = delete;

  std::uint64_t rows() const { return rows_; }
  std::uint64_t columns() const { return columns_; }  // 1 for a 1-D dataset.
  int rank() const { return rank_; }
  // The store dtype of the elements: float32/float16/float64 (IEEE layouts only), int8/uint8,
  // or bfloat16 for uint16 data under a root attribute dtype = "bfloat16" or with
  // u2_is_bfloat16 (import --dtype bfloat16); nullopt for anything else.
  std::optional<DType> dtype(bool u2_is_bfloat16 = false) const;
  // A root attribute of the file as text, if present (metadata, dtype, store_id).
  std::optional<std::string> root_attribute(const std::string& name) const;
  // Reads rows [first, first + n) as `as`, one of the dtype()s this dataset answers.
  void read_rows(std::uint64_t first, std::uint64_t n, void* out, DType as) const;
  // Reads elements [first, first + n) of an integer dataset as uint64. kInvalidArgument naming
  // the dataset for any other element type, or naming the position of a negative value.
  void read_uint64(std::uint64_t first, std::uint64_t n, std::uint64_t* out) const;

  const std::string& name() const { return name_; }
  // The file's element type, for messages ("float64", "int32", ...).
  const std::string& type_name() const { return type_name_; }

 private:
  struct Handles;
  std::string name_;
  std::unique_ptr<Handles> h_;
  int rank_ = 0;
  std::uint64_t rows_ = 0;
  std::uint64_t columns_ = 1;
  std::optional<DType> dtype_;
  std::string type_name_;  // The file's element type, for messages ("float64", "int32", ...).
  bool integer_ = false;   // Integers of at most 64 bits.
  bool uint16_ = false;    // Unsigned 16-bit integers (bfloat16 bit patterns when so named).
  bool signed_ = false;
};

// True when `path` starts with the HDF5 signature.
bool is_hdf5_file(const std::string& path);

}  // namespace embstore::tools
