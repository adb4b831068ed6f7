// import.h — appending rows from .npy files or an HDF5 dataset to a store.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "embstore/embstore.h"
#include "rows.h"

namespace embstore::tools {

struct ImportOptions {
  // Where keys and epochs come from: a .npy file or FILE.h5:/dataset. Unset: the source's own
  // (keys.npy / epochs.npy of an export directory, /keys and /epochs of an HDF5 file, whichever
  // dataset is imported), else the row's position in the source for keys and `epoch` (default
  // 0) for epochs. An export that says it holds them (its sidecar's "files", an HDF5 file's
  // embstore_format attribute) but lacks one is refused (kNotFound) unless these name others.
  std::optional<std::string> keys;
  std::optional<std::string> epochs;
  std::optional<std::uint64_t> epoch;
  // The store's dtype when import creates it (default: the source's). Also says that uint16
  // data is bfloat16. For an existing store of another dtype, kFormatMismatch and nothing
  // appended (except bfloat16 for uint16 data: that says what the source holds).
  std::optional<DType> dtype;
  // For a new store: its metadata (default: the source's, from the sidecar or HDF5 attribute)
  // and segment size.
  std::optional<std::string> metadata;
  std::optional<std::uint64_t> segment_bytes;
  ProgressFn progress;  // Rows appended out of the source's rows.
};

struct ImportResult {
  std::uint64_t rows = 0;
  std::uint64_t first_row = 0;  // Row number of the first imported row.
  std::uint64_t end_row = 0;    // After the last imported row.
  // No other writer's rows between the imported ones: they are rows [first_row, end_row).
  // Else they are `rows` of the rows in that range (each batch of a few MiB is contiguous).
  bool contiguous = true;
  bool created = false;  // The store did not exist before.
  DType source_dtype = DType::kFloat32;
  DType store_dtype = DType::kFloat32;
  // Set when every row was stored although closing the store failed for what the next writer
  // redoes (its key index could not be maintained): for a new store, StagedOutput::close_store()
  // (embstore/staged_output.h) judged it whole and it is at its path; for an existing one, every
  // row appended was committed and synced before the close. What to tell the user; "" otherwise.
  std::string warning;
};

// Appends every row of `source` to the store at `store`, creating the store if it does not
// exist (then it appears whole, or not at all, when the import finishes; an import that finds
// another's store there by then appends to it instead, as into any existing store). `source` is an
// npy export directory (vectors.npy, keys.npy, epochs.npy, embstore.json), a 2-D .npy file, or an
// HDF5 file with an optional dataset (FILE.h5 means FILE.h5:/vectors). Every key and epoch is
// checked before the first append, so input refused for its shape, type or values stores nothing.
// Rows go in batches of a few MiB, each one atomic append; into an existing store, a failure
// part-way (I/O) leaves the batches already appended, and its message says how many rows and
// which. Float rows are converted to a float store's dtype (RowConverter); dims must match
// (kFormatMismatch). Errors name the file: kNotFound for a missing source or dataset,
// kInvalidArgument for a wrong shape, element type, length or a negative key or epoch.
ImportResult import_rows(const std::string& store, const std::string& source,
                         const ImportOptions& options);

}  // namespace embstore::tools
