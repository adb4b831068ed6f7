#include "npy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <limits>

#include "embstore/error.h"

namespace embstore::tools {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr std::size_t kMagicBytes = 6;
constexpr std::size_t kPreambleBytes = 10;  // magic, version 1.0, uint16 header length.
constexpr std::size_t kAlignment = 64;      // numpy aligns the data to 64 bytes.

std::string shape_text(const std::vector<std::uint64_t>& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(shape[i]);
  }
  if (shape.size() == 1) text += ",";
  return text + ")";
}

[[noreturn]] void bad_header(const std::string& path, const std::string& why) {
  throw Error(ErrorCode::kInvalidArgument, path + " is not a .npy file embstore can read: " + why);
}

// The element size of a descr such as "<f4": the digits after the byte order and kind (trailing
// text such as "[ns]" is left to the dtype check, which names the type).
std::uint64_t element_bytes(const std::string& descr, const std::string& path) {
  std::uint64_t bytes = 0;
  const char* digits = descr.data() + std::min<std::size_t>(2, descr.size());
  const auto [end, ec] = std::from_chars(digits, descr.data() + descr.size(), bytes);
  if (descr.size() < 3 || ec != std::errc()) {
    bad_header(path, "unsupported dtype '" + descr + "'");
  }
  return bytes;
}

}  // namespace

std::string npy_descr(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "<f4";
    case DType::kFloat16:
      return "<f2";
    case DType::kBFloat16:
      return "<u2";
    case DType::kInt8:
      return "|i1";
    case DType::kUInt8:
      return "|u1";
    case DType::kFloat64:
      return "<f8";
  }
  throw Error(ErrorCode::kInvalidArgument, "no .npy type for this dtype");
}

DType dtype_of_npy_descr(const std::string& descr, bool u2_is_bfloat16, const std::string& what) {
  if (descr == "<f4") return DType::kFloat32;
  if (descr == "<f2") return DType::kFloat16;
  if (descr == "<f8") return DType::kFloat64;
  if (descr == "|i1" || descr == "<i1") return DType::kInt8;
  if (descr == "|u1" || descr == "<u1") return DType::kUInt8;
  if (descr == "<u2" && u2_is_bfloat16) return DType::kBFloat16;
  throw Error(ErrorCode::kInvalidArgument,
              what + " holds '" + descr +
                  "' elements; a store takes float32, float16, bfloat16 (as uint16 with a "
                  "sidecar or --dtype bfloat16), int8, uint8 or float64");
}

NpyWriter::NpyWriter(const std::string& path, const std::string& descr,
                     std::vector<std::uint64_t> shape)
    : path_(path) {
  file_ = std::fopen(path.c_str(), "wbx");
  if (file_ == nullptr) {
    const int err = errno;
    throw Error(err == EEXIST ? ErrorCode::kAlreadyExists : error_code_for_write_errno(err),
                "cannot create " + path + ": " + std::strerror(err), err);
  }
  expected_bytes_ = element_bytes(descr, path);
  for (std::uint64_t extent : shape) expected_bytes_ *= extent;
  std::string dict =
      "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape_text(shape) + ", }";
  const std::size_t unpadded = kPreambleBytes + dict.size() + 1;
  dict.append((kAlignment - unpadded % kAlignment) % kAlignment, ' ');
  dict += '\n';
  std::string header(kMagic, kMagicBytes);
  header += '\x01';
  header += '\x00';
  header += static_cast<char>(dict.size() & 0xff);
  header += static_cast<char>(dict.size() >> 8);
  header += dict;
  write(header.data(), header.size());
  written_bytes_ = 0;
}

NpyWriter::~NpyWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

void NpyWriter::write(const void* data, std::size_t bytes) {
  if (bytes == 0) return;
  if (std::fwrite(data, 1, bytes, file_) != bytes) {
    const int err = errno;
    throw Error(error_code_for_write_errno(err),
                "cannot write " + path_ + ": " + std::strerror(err), err);
  }
  written_bytes_ += bytes;
}

void NpyWriter::finish() {
  std::FILE* file = file_;
  file_ = nullptr;
  const bool flushed = std::fflush(file) == 0 && ::fsync(::fileno(file)) == 0;
  const int err = errno;
  const bool closed = std::fclose(file) == 0;
  if (!flushed || !closed) {
    throw Error(error_code_for_write_errno(err),
                "cannot write " + path_ + ": " + std::strerror(err), err);
  }
  if (written_bytes_ != expected_bytes_) {
    throw Error(ErrorCode::kIO, path_ + ": wrote " + std::to_string(written_bytes_) +
                                    " bytes of data, the shape needs " +
                                    std::to_string(expected_bytes_));
  }
}

NpyReader::NpyReader(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    const int err = errno;
    throw Error(err == ENOENT ? ErrorCode::kNotFound : ErrorCode::kIO,
                "cannot open " + path + ": " + std::strerror(err), err);
  }
  // open(2) takes a directory for reading; its first read would fail as "no NUMPY magic".
  struct stat st;
  if (::fstat(fd_, &st) == 0 && S_ISDIR(st.st_mode)) {
    ::close(fd_);
    fd_ = -1;
    throw Error(ErrorCode::kInvalidArgument, path + " is a directory, not a .npy file");
  }
  char preamble[12];
  if (::pread(fd_, preamble, sizeof(preamble), 0) != static_cast<ssize_t>(sizeof(preamble)) ||
      std::memcmp(preamble, kMagic, kMagicBytes) != 0) {
    bad_header(path, "no NUMPY magic");
  }
  const int major = static_cast<unsigned char>(preamble[6]);
  std::uint64_t header_bytes;
  if (major == 1) {
    header_bytes = static_cast<unsigned char>(preamble[8]) |
                   (static_cast<unsigned>(static_cast<unsigned char>(preamble[9])) << 8);
    data_offset_ = 10 + header_bytes;
  } else if (major == 2 || major == 3) {
    header_bytes = 0;
    for (int i = 0; i < 4; ++i) {
      header_bytes |= std::uint64_t{static_cast<unsigned char>(preamble[8 + i])} << (8 * i);
    }
    data_offset_ = 12 + header_bytes;
  } else {
    bad_header(path, "format version " + std::to_string(major));
  }
  if (header_bytes > (1 << 20)) bad_header(path, "header too long");
  std::string dict(header_bytes, '\0');
  if (::pread(fd_, dict.data(), dict.size(), static_cast<off_t>(data_offset_ - header_bytes)) !=
      static_cast<ssize_t>(dict.size())) {
    bad_header(path, "truncated header");
  }
  auto value_after = [&](const std::string& key) {
    const std::size_t at = dict.find("'" + key + "'");
    if (at == std::string::npos) bad_header(path, "no '" + key + "' in the header");
    std::size_t pos = dict.find(':', at);
    if (pos == std::string::npos) bad_header(path, "no value for '" + key + "'");
    ++pos;
    while (pos < dict.size() && dict[pos] == ' ') ++pos;
    return pos;
  };
  std::size_t pos = value_after("descr");
  if (pos >= dict.size() || (dict[pos] != '\'' && dict[pos] != '"')) {
    bad_header(path, "a structured dtype");
  }
  const std::size_t descr_end = dict.find(dict[pos], pos + 1);
  if (descr_end == std::string::npos) bad_header(path, "unterminated descr");
  descr_ = dict.substr(pos + 1, descr_end - pos - 1);
  pos = value_after("fortran_order");
  if (dict.compare(pos, 4, "True") == 0) bad_header(path, "Fortran order (save it C-contiguous)");
  pos = value_after("shape");
  if (pos >= dict.size() || dict[pos] != '(') bad_header(path, "no shape tuple");
  const std::size_t shape_end = dict.find(')', pos);
  if (shape_end == std::string::npos) bad_header(path, "unterminated shape");
  const std::string shape = dict.substr(pos + 1, shape_end - pos - 1);
  std::size_t i = 0;
  while (i < shape.size()) {
    while (i < shape.size() && (shape[i] == ' ' || shape[i] == ',')) ++i;
    if (i >= shape.size()) break;
    // from_chars, unlike stoull, takes no sign: "-1" must not wrap to 2^64 - 1.
    std::uint64_t extent = 0;
    const auto [end, ec] = std::from_chars(shape.data() + i, shape.data() + shape.size(), extent);
    if (shape[i] == '-') bad_header(path, "negative extent in shape (" + shape + ")");
    if (ec != std::errc()) bad_header(path, "bad shape (" + shape + ")");
    shape_.push_back(extent);
    i = static_cast<std::size_t>(end - shape.data());
  }
  if (descr_.size() >= 1 && descr_[0] == '>') bad_header(path, "big-endian data");
  // A hostile shape must not wrap the sizes around to ones the file happens to satisfy.
  std::uint64_t row_bytes = element_bytes(descr_, path);
  std::uint64_t data_bytes = 0;
  bool overflow = false;
  for (std::size_t d = 1; d < shape_.size(); ++d) {
    overflow |= __builtin_mul_overflow(row_bytes, shape_[d], &row_bytes);
  }
  overflow |= __builtin_mul_overflow(rows(), row_bytes, &data_bytes);
  if (overflow || data_bytes > std::numeric_limits<std::uint64_t>::max() - data_offset_) {
    bad_header(path, "shape (" + shape + ") of '" + descr_ + "' elements is too large");
  }
  row_bytes_ = row_bytes;
  if (::fstat(fd_, &st) != 0 ||
      static_cast<std::uint64_t>(st.st_size) < data_offset_ + data_bytes) {
    bad_header(path, "the file is shorter than its shape says");
  }
}

NpyReader::~NpyReader() {
  if (fd_ >= 0) ::close(fd_);
}

void NpyReader::read_rows(std::uint64_t first, std::uint64_t n, void* out) const {
  auto* dst = static_cast<char*>(out);
  std::uint64_t left = n * row_bytes_;
  std::uint64_t offset = data_offset_ + first * row_bytes_;
  while (left > 0) {
    const ssize_t got = ::pread(fd_, dst, left, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      const int err = got < 0 ? errno : 0;
      throw Error(
          ErrorCode::kIO,
          "cannot read " + path_ + ": " + (got < 0 ? std::strerror(err) : "unexpected end of file"),
          err);
    }
    dst += got;
    left -= static_cast<std::uint64_t>(got);
    offset += static_cast<std::uint64_t>(got);
  }
}

}  // namespace embstore::tools
