// export.h — writing a store's rows out as .npy files, an HDF5 file or CSV.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "embstore/embstore.h"
#include "rows.h"

namespace embstore::tools {

enum class ExportFormat { kNpy, kHdf5, kCsv };

// File names inside an npy export directory.
inline constexpr const char* kNpyVectorsFile = "vectors.npy";
inline constexpr const char* kNpyKeysFile = "keys.npy";
inline constexpr const char* kNpyEpochsFile = "epochs.npy";
// JSON sidecar naming the dtype (bfloat16 travels as uint16), dim, rows, store id, metadata.
inline constexpr const char* kNpySidecarFile = "embstore.json";
// Value of the sidecar's (and the HDF5 file's) "embstore_format" field.
inline constexpr const char* kExportFormatName = "embstore-export-1";

struct ExportOptions {
  ExportFormat format = ExportFormat::kNpy;
  RowSelection selection;
  ProgressFn progress;  // Rows written out of the rows selected.
};

struct ExportResult {
  std::uint64_t rows = 0;
  std::uint64_t bytes = 0;  // Row payload written.
};

// Writes the selected rows of `reader`'s snapshot to `out`: a directory of vectors.npy,
// keys.npy, epochs.npy and embstore.json (kNpy), one HDF5 file (kHdf5) or one CSV file with
// columns row,key,epoch,v0..v{dim-1} (kCsv). Streams: memory does not grow with the store
// (except a map of keys for latest_per_key). Every row's checksum is verified on the way
// (kCorruption naming the row, key and epoch). The output appears whole or not at all
// (embstore/staged_output.h). Throws kAlreadyExists if `out` exists, before the selection's scan.
ExportResult export_store(const Reader& reader, const std::string& out,
                          const ExportOptions& options);

// Writes one file at `out`, whole or not at all (a StagedOutput of OutputShape::kFile,
// embstore/staged_output.h): `write` fills the file at the path it is given, which is renamed to
// `out` once `write` returns, and removed when anything throws; errors name `out`.
// kAlreadyExists if `out` exists.
void write_file_aside(const std::string& out, const std::function<void(const std::string&)>& write);
}  // namespace embstore::tools
