#include "export.h"

#include <fmt/format.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "hdf5_file.h"
#include "npy.h"

namespace embstore::tools {
namespace {

// Rows per write: large enough to amortise the calls, small enough to keep memory flat.
constexpr std::uint64_t kRunBytes = 4 << 20;

std::uint64_t run_rows(const Reader& reader) {
  const std::uint64_t row_bytes = std::uint64_t{reader.dim()} * dtype_size(reader.dtype());
  return std::max<std::uint64_t>(1, kRunBytes / row_bytes);
}

void copy_strided(const StridedView<std::uint64_t>& view, std::vector<std::uint64_t>* out) {
  out->resize(view.size);
  for (std::uint64_t i = 0; i < view.size; ++i) (*out)[i] = view[i];
}

// Rows [first, first + rows) copied into `run`, each checked against its checksum, so no damaged
// row leaves the store unnoticed (Reader::read(): an export runs in a process of its own, whose
// first pass through a mapping would pay for every page's page-table entry).
const std::byte* read_run(const Reader& reader, std::uint64_t first, std::uint64_t rows,
                          std::vector<std::byte>& run) {
  run.resize(rows * reader.dim() * dtype_size(reader.dtype()));
  reader.read(first, first + rows, run.data(), run.size(), ReadCheck::kChecksums);
  return run.data();
}

std::string sidecar_text(const Reader& reader, std::uint64_t rows) {
  const StoreInfo info = reader.info();
  nlohmann::json sidecar = {
      {"embstore_format", kExportFormatName},
      {"dtype", std::string(dtype_name(reader.dtype()))},
      {"npy_dtype", npy_descr(reader.dtype())},
      {"dim", reader.dim()},
      {"rows", rows},
      {"store_id", info.store_id},
      {"metadata", info.metadata},
      {"source", reader.path()},
      {"files", {{"vectors", kNpyVectorsFile}, {"keys", kNpyKeysFile}, {"epochs", kNpyEpochsFile}}},
  };
  return sidecar.dump(2) + "\n";
}

// Throws the error of a failed write to `path` ("create" or "write"): errno is read once, before
// the message is built, and mapped as the library maps it.
[[noreturn]] void fail_write(const char* what, const std::string& path, int err = errno) {
  throw Error(error_code_for_write_errno(err),
              std::string("cannot ") + what + " " + path + ": " + std::strerror(err), err);
}

void write_text_file(const std::string& path, const std::string& text) {
  std::FILE* file = std::fopen(path.c_str(), "wbx");
  if (file == nullptr) {
    fail_write("create", path);
  }
  const bool ok = std::fwrite(text.data(), 1, text.size(), file) == text.size() &&
                  std::fflush(file) == 0 && ::fsync(::fileno(file)) == 0;
  const int err = errno;
  if (std::fclose(file) != 0 || !ok) {
    fail_write("write", path, err);
  }
}

void export_npy(const Reader& reader, const RowSelector& selector, const std::string& dir,
                const ExportOptions& options) {
  const std::uint64_t n = selector.count();
  const std::string descr = npy_descr(reader.dtype());
  NpyWriter vectors(dir + "/" + kNpyVectorsFile, descr, {n, reader.dim()});
  NpyWriter keys(dir + "/" + kNpyKeysFile, "<u8", {n});
  NpyWriter epochs(dir + "/" + kNpyEpochsFile, "<u8", {n});
  std::vector<std::uint64_t> buffer;
  std::vector<std::byte> run;
  std::uint64_t done = 0;
  selector.for_each_run(run_rows(reader), [&](std::uint64_t first, std::uint64_t rows) {
    const std::byte* rows_read = read_run(reader, first, rows, run);
    vectors.write(rows_read, run.size());
    copy_strided(reader.keys(first, first + rows), &buffer);
    keys.write(buffer.data(), buffer.size() * 8);
    copy_strided(reader.epochs(first, first + rows), &buffer);
    epochs.write(buffer.data(), buffer.size() * 8);
    done += rows;
    if (options.progress) options.progress(done, n);
  });
  vectors.finish();
  keys.finish();
  epochs.finish();
  write_text_file(dir + "/" + kNpySidecarFile, sidecar_text(reader, n));
}

void export_hdf5(const Reader& reader, const RowSelector& selector, const std::string& path,
                 const ExportOptions& options) {
  const std::uint64_t n = selector.count();
  const StoreInfo info = reader.info();
  Hdf5Writer writer(
      path, reader.dtype(), reader.dim(), n,
      {std::string(dtype_name(reader.dtype())), reader.dim(), info.metadata, info.store_id});
  std::vector<std::uint64_t> keys, epochs;
  std::vector<std::byte> run;
  std::uint64_t done = 0;
  selector.for_each_run(run_rows(reader), [&](std::uint64_t first, std::uint64_t rows) {
    copy_strided(reader.keys(first, first + rows), &keys);
    copy_strided(reader.epochs(first, first + rows), &epochs);
    writer.write(done, rows, read_run(reader, first, rows, run), keys.data(), epochs.data());
    done += rows;
    if (options.progress) options.progress(done, n);
  });
  writer.finish();
}

void export_csv(const Reader& reader, const RowSelector& selector, const std::string& path,
                const ExportOptions& options) {
  std::FILE* file = std::fopen(path.c_str(), "wbx");
  if (file == nullptr) {
    fail_write("create", path);
  }
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> closer(file, std::fclose);
  const std::uint32_t dim = reader.dim();
  const DType dtype = reader.dtype();
  fmt::memory_buffer line;
  fmt::format_to(std::back_inserter(line), "row,key,epoch");
  for (std::uint32_t i = 0; i < dim; ++i) fmt::format_to(std::back_inserter(line), ",v{}", i);
  line.push_back('\n');
  const std::uint64_t row_bytes = std::uint64_t{dim} * dtype_size(dtype);
  std::vector<std::byte> run;
  std::uint64_t done = 0;
  const std::uint64_t n = selector.count();
  auto flush = [&] {
    if (std::fwrite(line.data(), 1, line.size(), file) != line.size()) {
      fail_write("write", path);
    }
    line.clear();
  };
  selector.for_each_run(run_rows(reader), [&](std::uint64_t first, std::uint64_t rows) {
    const std::byte* rows_read = read_run(reader, first, rows, run);
    const auto keys = reader.keys(first, first + rows);
    const auto epochs = reader.epochs(first, first + rows);
    for (std::uint64_t r = 0; r < rows; ++r) {
      fmt::format_to(std::back_inserter(line), "{},{},{}", first + r, keys[r], epochs[r]);
      for (std::uint32_t i = 0; i < dim; ++i) {
        const double value = printable(element_value(dtype, rows_read + r * row_bytes, i));
        // Shortest text that reads back to the same stored value.
        if (dtype == DType::kFloat64) {
          fmt::format_to(std::back_inserter(line), ",{}", value);
        } else {
          fmt::format_to(std::back_inserter(line), ",{}", static_cast<float>(value));
        }
      }
      line.push_back('\n');
      if (line.size() > kRunBytes) flush();
    }
    done += rows;
    if (options.progress) options.progress(done, n);
  });
  flush();
  if (std::fflush(file) != 0 || ::fsync(::fileno(file)) != 0) {
    fail_write("write", path);
  }
}

}  // namespace

void write_file_aside(const std::string& out,
                      const std::function<void(const std::string&)>& write) {
  StagedOutput staged(out, OutputShape::kFile);
  try {
    write(staged.path());
  } catch (...) {
    staged.rethrow_naming_out();
  }
  staged.publish();
}

ExportResult export_store(const Reader& reader, const std::string& out,
                          const ExportOptions& options) {
  StagedOutput::require_absent(out);
  refuse_output_inside(out, reader.path());
  // Its scan (every row checked when selecting: rows.h) reports progress, and can be stopped.
  const RowSelector selector(reader, options.selection, options.progress);
  StagedOutput staged(
      out, options.format == ExportFormat::kNpy ? OutputShape::kDirectory : OutputShape::kFile);
  try {
    if (options.format == ExportFormat::kNpy) {
      export_npy(reader, selector, staged.path(), options);
    } else if (options.format == ExportFormat::kHdf5) {
      export_hdf5(reader, selector, staged.path(), options);
    } else {
      export_csv(reader, selector, staged.path(), options);
    }
  } catch (...) {
    staged.rethrow_naming_out();
  }
  staged.publish();
  ExportResult result;
  result.rows = selector.count();
  result.bytes = selector.count() * reader.dim() * dtype_size(reader.dtype());
  return result;
}

}  // namespace embstore::tools
