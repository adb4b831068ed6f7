#include "format/format.h"

#include <algorithm>
#include <cstring>
#include <optional>

#include "embstore/error.h"
#include "format/checksum.h"

namespace embstore::detail {
namespace {

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::kCorruption, path + ": " + what);
}

}  // namespace

std::string data_file_name(std::uint64_t generation) {
  return "rows." + std::to_string(generation);
}

std::string index_file_name(std::uint64_t generation) {
  return "index." + std::to_string(generation);
}

std::uint64_t Layout::data_bytes_for(std::uint64_t rows) const {
  return round_up(rows * record_bytes, kPageBytes);
}

std::uint64_t Layout::index_bytes_for(std::uint64_t rows) {
  return round_up(rows * kIndexEntryBytes, kPageBytes);
}

void validate_create_params(DType dtype, std::uint32_t dim, std::uint64_t segment_bytes,
                            std::size_t metadata_bytes) {
  auto invalid = [](const std::string& what) { throw Error(ErrorCode::kInvalidArgument, what); };
  if (!is_valid_dtype(static_cast<std::uint8_t>(dtype))) {
    invalid("dtype " + std::to_string(static_cast<int>(dtype)) + " is not a known dtype");
  }
  if (dim == 0 || dim > kMaxDim) {
    invalid("dim " + std::to_string(dim) + " is outside 1.." + std::to_string(kMaxDim));
  }
  const std::uint64_t record_bytes = std::uint64_t{dim} * dtype_size(dtype);
  if (segment_bytes == 0 || segment_bytes % kPageBytes != 0 || segment_bytes > kMaxSegmentBytes) {
    invalid("segment_bytes " + std::to_string(segment_bytes) +
            " must be a multiple of 4096 and at most 2^40");
  }
  if (segment_bytes < record_bytes) {
    invalid("segment_bytes " + std::to_string(segment_bytes) + " is smaller than one row (" +
            std::to_string(record_bytes) + " bytes)");
  }
  if (metadata_bytes > kMaxMetadataBytes) {
    invalid("metadata is " + std::to_string(metadata_bytes) + " bytes; the limit is " +
            std::to_string(kMaxMetadataBytes));
  }
}

std::string encode_header(DType dtype, std::uint32_t dim, std::uint64_t segment_bytes,
                          const std::uint8_t store_id[16], std::int64_t created_unix_ns,
                          std::string_view metadata, std::uint64_t flags) {
  FixedHeader h;
  std::memset(&h, 0, sizeof(h));
  std::memcpy(h.magic, kMagic, sizeof(kMagic));
  h.format_major = kFormatMajor;
  h.format_minor = kFormatMinor;
  h.dtype = static_cast<std::uint8_t>(dtype);
  h.dim = dim;
  h.index_entry_bytes = kIndexEntryBytes;
  h.record_bytes = std::uint64_t{dim} * dtype_size(dtype);
  h.segment_bytes = segment_bytes;
  std::memcpy(h.store_id, store_id, 16);
  h.created_unix_ns = created_unix_ns;
  h.metadata_bytes = metadata.size();
  h.state_offset = kStateOffset;
  h.metadata_offset = kMetadataOffset;
  h.flags = flags;
  h.header_checksum =
      header_hash(&h, offsetof(FixedHeader, header_checksum), metadata.data(), metadata.size());

  const std::uint64_t copy_at = metadata_copy_offset(metadata.size());
  std::string bytes(copy_at + round_up(metadata.size(), kPageBytes), '\0');
  std::memcpy(bytes.data(), &h, sizeof(h));
  std::memcpy(bytes.data() + kHeaderCopyOffset, &h, sizeof(h));
  std::memcpy(bytes.data() + copy_at, metadata.data(), metadata.size());
  StatePage state;
  std::memset(&state, 0, sizeof(state));
  state.generation = 1;
  std::memcpy(bytes.data() + kStateOffset, &state, sizeof(state));
  std::memcpy(bytes.data() + kMetadataOffset, metadata.data(), metadata.size());
  return bytes;
}

namespace {

// Validates the fixed header at `fixed_at` with its metadata, which sits at kMetadataOffset for
// the primary and at metadata_copy_offset() for the copy.
Layout decode_fixed(std::string_view bytes, std::uint64_t fixed_at, bool is_copy,
                    std::uint64_t file_bytes, const std::string& path) {
  const bool magic =
      bytes.size() >= fixed_at + 8 && std::memcmp(bytes.data() + fixed_at, kMagic, 8) == 0;
  if (magic && bytes.size() < fixed_at + sizeof(FixedHeader)) {
    // A store is made beside its path and renamed there whole: a header cut short is damage.
    throw Error(ErrorCode::kCorruption, path + ": " + std::to_string(file_bytes) +
                                            " bytes, cut short: the fixed header" +
                                            (is_copy ? "'s copy" : "") + " ends at byte " +
                                            std::to_string(fixed_at + sizeof(FixedHeader)));
  }
  if (!magic) {
    throw Error(ErrorCode::kNotFound,
                path + ": not an embstore header (magic bytes \"EMBSTORE\" missing)");
  }
  FixedHeader h;
  std::memcpy(&h, bytes.data() + fixed_at, sizeof(h));
  if (h.format_major == 0 || h.format_major > kFormatMajor) {
    throw Error(ErrorCode::kUnsupportedVersion,
                path + ": format_major " + std::to_string(h.format_major) +
                    " is not supported (this library reads every format 1.x and writes 1." +
                    std::to_string(kFormatMinor) + " and older minors)");
  }
  if (h.metadata_bytes > kMaxMetadataBytes) {
    corrupt(path, "field metadata_bytes " + std::to_string(h.metadata_bytes) + " exceeds " +
                      std::to_string(kMaxMetadataBytes));
  }
  if (h.state_offset != kStateOffset || h.metadata_offset != kMetadataOffset) {
    corrupt(path, "field state_offset/metadata_offset (" + std::to_string(h.state_offset) + "/" +
                      std::to_string(h.metadata_offset) + ") differs from 4096/8192");
  }
  const std::uint64_t metadata_at =
      is_copy ? metadata_copy_offset(h.metadata_bytes) : kMetadataOffset;
  if (file_bytes < metadata_at + h.metadata_bytes ||
      bytes.size() < metadata_at + h.metadata_bytes) {
    corrupt(path, "file is " + std::to_string(file_bytes) +
                      " bytes, too short for the header and " + std::to_string(h.metadata_bytes) +
                      " bytes of metadata");
  }
  const char* metadata = bytes.data() + metadata_at;
  const std::uint64_t expected = header_hash(
      bytes.data() + fixed_at, offsetof(FixedHeader, header_checksum), metadata, h.metadata_bytes);
  if (expected != h.header_checksum) {
    corrupt(path, "field header_checksum does not match the header bytes");
  }
  if (!is_valid_dtype(h.dtype)) {
    corrupt(path, "field dtype " + std::to_string(h.dtype) + " is not a known dtype");
  }
  const auto dtype = static_cast<DType>(h.dtype);
  if (h.dim == 0 || h.dim > kMaxDim) {
    corrupt(path,
            "field dim " + std::to_string(h.dim) + " is outside 1.." + std::to_string(kMaxDim));
  }
  if (h.record_bytes != std::uint64_t{h.dim} * dtype_size(dtype)) {
    corrupt(path, "field record_bytes " + std::to_string(h.record_bytes) + " is not dim " +
                      std::to_string(h.dim) + " x " + std::to_string(dtype_size(dtype)));
  }
  if (h.index_entry_bytes != kIndexEntryBytes) {
    corrupt(path, "field index_entry_bytes " + std::to_string(h.index_entry_bytes) + " is not 32");
  }
  if (h.segment_bytes == 0 || h.segment_bytes % kPageBytes != 0 ||
      h.segment_bytes > kMaxSegmentBytes || h.segment_bytes < h.record_bytes) {
    corrupt(path, "field segment_bytes " + std::to_string(h.segment_bytes) +
                      " is not a multiple of 4096 between one row and 2^40");
  }
  Layout layout;
  layout.dtype = dtype;
  layout.dim = h.dim;
  layout.record_bytes = h.record_bytes;
  layout.segment_bytes = h.segment_bytes;
  std::memcpy(layout.store_id, h.store_id, 16);
  layout.seed = seed_from_store_id(h.store_id);
  layout.created_unix_ns = h.created_unix_ns;
  layout.format_major = h.format_major;
  layout.format_minor = h.format_minor;
  layout.metadata.assign(metadata, h.metadata_bytes);
  layout.key_index = (h.flags & kFlagNoKeyIndex) == 0;
  layout.from_copy = is_copy;
  return layout;
}

}  // namespace

Layout decode_header(std::string_view bytes, std::uint64_t file_bytes, const std::string& path) {
  Layout layout;
  try {
    layout = decode_fixed(bytes, 0, false, file_bytes, path);
  } catch (const Error& primary) {
    // Write-once and checksummed: a copy that verifies holds exactly what the primary held.
    // Stores older than format 1.2 have zeros there, which never pass the magic check.
    std::optional<Layout> copy;
    try {
      copy = decode_fixed(bytes, kHeaderCopyOffset, true, file_bytes, path);
    } catch (const Error&) {
    }
    if (!copy) throw;  // The primary's error.
    copy->copy_problem =
        std::string("the primary fixed header or its metadata fails its checks (") +
        primary.what() + "); the store is read from its copy at byte " +
        std::to_string(kHeaderCopyOffset);
    return *copy;
  }
  // One copy damaged unseen would leave the store one more flipped bit from unreadable.
  if (layout.format_minor >= kFormatMinorHeaderCopy) {
    try {
      decode_fixed(bytes, kHeaderCopyOffset, true, file_bytes, path);
      if (std::memcmp(bytes.data(), bytes.data() + kHeaderCopyOffset, sizeof(FixedHeader)) != 0) {
        layout.copy_problem = "the fixed header copy at byte " + std::to_string(kHeaderCopyOffset) +
                              " differs from the primary";
      }
    } catch (const Error& copy) {
      layout.copy_problem = "the fixed header copy at byte " + std::to_string(kHeaderCopyOffset) +
                            " fails its checks (" + copy.what() + ")";
    }
  }
  return layout;
}

std::string current_fixed_header(std::string_view bytes, const Layout& layout) {
  FixedHeader h;
  std::memcpy(&h, bytes.data() + (layout.from_copy ? kHeaderCopyOffset : 0), sizeof(h));
  h.format_minor = std::max<std::uint16_t>(h.format_minor, kFormatMinor);
  h.header_checksum = header_hash(&h, offsetof(FixedHeader, header_checksum),
                                  layout.metadata.data(), layout.metadata.size());
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

std::uint64_t seed_from_store_id(const std::uint8_t store_id[16]) {
  std::uint64_t lo, hi;
  std::memcpy(&lo, store_id, 8);
  std::memcpy(&hi, store_id + 8, 8);
  return lo ^ hi;
}

std::string store_id_hex(const std::uint8_t store_id[16]) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (int i = 0; i < 16; ++i) {
    out += kHex[store_id[i] >> 4];
    out += kHex[store_id[i] & 15];
  }
  return out;
}

}  // namespace embstore::detail
