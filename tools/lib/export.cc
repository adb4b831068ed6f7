#include "export.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
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

// "out/" names the directory "out": without the separators, its parent and name are the ones
// the user means (path("out/") has parent "out" and an empty name).
std::filesystem::path without_trailing_separators(const std::string& path) {
  std::size_t end = path.size();
  while (end > 1 && path[end - 1] == '/') --end;
  return path.substr(0, end);
}

}  // namespace

void rethrow_naming_output(const Error& e, const std::string& working, const std::string& out) {
  const std::string message = e.what();
  const std::size_t at = message.find(working);
  if (at == std::string::npos) throw;
  const std::string named = without_trailing_separators(out).string();
  const std::size_t after = at + working.size();
  // A message that starts with the working directory's path (create_store's "PATH: cannot
  // create the store: ...", made absolute or not) names the output in its place. Any other
  // names a file in it (or beside it) that the user never heard of, and that the output never
  // holds under that name: the output and the cause first, that file only in parentheses.
  if (message.compare(after, 2, ": ") == 0 && message.find(' ') > at) {
    throw Error(e.code(), named + message.substr(after), e.sys_errno());
  }
  const int err = e.sys_errno();
  if (err == 0) throw Error(e.code(), named + ": cannot write it: " + message, err);
  const std::string reason = std::strerror(err);
  std::string detail = message;
  if (detail.ends_with(": " + reason)) detail.resize(detail.size() - reason.size() - 2);
  throw Error(e.code(), named + ": cannot write it: " + reason + " (" + detail + ")", err);
}

void rethrow_naming_output_if_error(const std::string& working, const std::string& out) {
  try {
    throw;
  } catch (const Error& e) {
    rethrow_naming_output(e, working, out);
  }
}

std::string close_new_store(Writer& writer, const std::string& working, const std::string& out,
                            std::uint64_t rows) {
  // Judged by the state of the store, not by which error close() threw: every row committed
  // and on the device before close() (no other writer knows the working directory), which
  // nothing close() does can take back. Read before, not after with a Reader: what close() ran
  // out of (address space, open files) a Reader needs too.
  const bool whole = writer.committed_rows() == rows && writer.durable_rows() == rows;
  try {
    writer.close();
    return {};
  } catch (const Error& e) {
    if (!whole) throw;
    // Published next, the store is at `out`: every mention of `working` names it.
    std::string message = e.what();
    const std::string named = without_trailing_separators(out).string();
    for (std::size_t at = message.find(working); at != std::string::npos;
         at = message.find(working, at + named.size())) {
      message.replace(at, working.size(), named);
    }
    return message;
  }
}

void require_absent(const std::string& out) {
  // symlink_status("") says not_found: the work would be done and the rename to "" fail.
  if (out.empty()) throw Error(ErrorCode::kInvalidArgument, "the output path is empty");
  std::error_code ec;
  if (std::filesystem::symlink_status(without_trailing_separators(out), ec).type() !=
      std::filesystem::file_type::not_found) {
    throw Error(ErrorCode::kAlreadyExists, "output " + out + " already exists");
  }
}

namespace {

// Why no working directory could be made in `parent` for the output `out`, in the user's terms
// (errno `err` of mkdtemp): the output they named and what is wrong with where it goes.
std::string partial_dir_failure(const std::string& out, const std::filesystem::path& parent,
                                bool inside, int err) {
  const std::string dir = inside          ? std::string("it")
                          : parent == "." ? std::string("the current directory")
                                          : "its directory " + parent.string();
  std::string why;
  switch (err) {
    case ENOENT:
      why = dir + " does not exist";
      break;
    case ENOTDIR:
      why = (inside ? out : parent.string()) + " is not a directory";
      break;
    case EROFS:
      why = dir + " is on a read-only file system";
      break;
    case EACCES:
    case EPERM:
      why = dir + " does not let this user create files in it (" + std::strerror(err) + ")";
      break;
    default:
      why = "cannot create a working directory in " + parent.string() + ": " + std::strerror(err);
  }
  return without_trailing_separators(out).string() + ": cannot write it: " + why;
}

}  // namespace

std::string make_partial_dir(const std::string& out, bool inside) {
  if (out.empty()) throw Error(ErrorCode::kInvalidArgument, "the output path is empty");
  const std::filesystem::path target = without_trailing_separators(out);
  std::filesystem::path parent = inside ? target : target.parent_path();
  if (parent.empty()) parent = ".";
  std::string name = inside ? std::string("store") : target.filename().string();
  if (name.empty()) name = "out";
  std::string tmpl = (parent / ("." + name + ".partial-XXXXXX")).string();
  if (::mkdtemp(tmpl.data()) == nullptr) {
    const int err = errno;
    throw Error(error_code_for_write_errno(err), partial_dir_failure(out, parent, inside, err),
                err);
  }
  // mkdtemp makes it 0700; the output it becomes gets the mode of any new directory (0777 less
  // the umask, as mkdir(1) gives), so that other users and services can read what was exported
  // as they can read the source. (A store the library makes gets 0755 less the umask:
  // src/platform/os.cc, make_dir.)
  const mode_t umask = ::umask(0);
  ::umask(umask);
  if (::chmod(tmpl.c_str(), 0777 & ~umask) != 0) {
    const int err = errno;
    std::filesystem::remove(tmpl);
    throw Error(error_code_for_write_errno(err),
                "cannot set the mode of " + tmpl + ": " + std::strerror(err), err);
  }
  return tmpl;
}

void rename_no_replace(const std::string& from, const std::string& to) {
  const std::filesystem::path target = without_trailing_separators(to);
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, target.c_str(), RENAME_NOREPLACE) != 0) {
    const int err = errno;
    if (err == EEXIST) throw Error(ErrorCode::kAlreadyExists, "output " + to + " already exists");
    throw Error(error_code_for_write_errno(err),
                "cannot rename " + from + " to " + to + ": " + std::strerror(err), err);
  }
  // The rename is durable once the parent directory is.
  std::filesystem::path parent = target.parent_path();
  if (parent.empty()) parent = ".";
  const int fd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

void write_file_aside(const std::string& out,
                      const std::function<void(const std::string&)>& write) {
  require_absent(out);
  const std::string partial = make_partial_dir(out);
  try {
    const std::string file = partial + "/out";
    try {
      write(file);
    } catch (...) {
      rethrow_naming_output_if_error(file, out);
    }
    rename_no_replace(file, out);
    std::filesystem::remove(partial);
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove_all(partial, ec);
    throw;
  }
}

ExportResult export_store(const Reader& reader, const std::string& out,
                          const ExportOptions& options) {
  require_absent(out);
  refuse_output_inside(out, reader.path());
  // Its scan (every row checked when selecting: rows.h) reports progress, and can be stopped.
  const RowSelector selector(reader, options.selection, options.progress);
  if (options.format == ExportFormat::kNpy) {
    const std::string partial = make_partial_dir(out);
    try {
      try {
        export_npy(reader, selector, partial, options);
      } catch (...) {
        rethrow_naming_output_if_error(partial, out);
      }
      rename_no_replace(partial, out);  // Its message names both paths.
    } catch (...) {
      std::error_code ec;
      std::filesystem::remove_all(partial, ec);
      throw;
    }
  } else {
    write_file_aside(out, [&](const std::string& file) {
      if (options.format == ExportFormat::kHdf5) {
        export_hdf5(reader, selector, file, options);
      } else {
        export_csv(reader, selector, file, options);
      }
    });
  }
  ExportResult result;
  result.rows = selector.count();
  result.bytes = selector.count() * reader.dim() * dtype_size(reader.dtype());
  return result;
}

}  // namespace embstore::tools
