// format.h — the on-disk layout of src/format/FORMAT.md as constants and checked structs.
//
// Structs here are plain bytes with every offset pinned by static_assert; embstore only runs on
// little-endian hosts, so they are read and written with memcpy. Validation of bytes read from
// disk lives in format.cc and never trusts a field before checking it.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "embstore/dtype.h"
#include "embstore/options.h"
#include "embstore/version.h"

namespace embstore::detail {

static_assert(std::endian::native == std::endian::little, "embstore needs a little-endian host");

inline constexpr char kMagic[8] = {'E', 'M', 'B', 'S', 'T', 'O', 'R', 'E'};
// The public version.h and options.h own these (and kMaxDim); the header fields are 16-bit.
inline constexpr std::uint16_t kFormatMajor = kFormatVersionMajor;
inline constexpr std::uint16_t kFormatMinor = kFormatVersionMinor;

inline constexpr std::uint64_t kPageBytes = 4096;
inline constexpr std::uint64_t kStateOffset = 4096;
inline constexpr std::uint64_t kMetadataOffset = 8192;
// Format 1.2 on: the second copy of the fixed header, and after the metadata its second copy.
inline constexpr std::uint64_t kHeaderCopyOffset = 2048;
// Bytes of the header file a reader reads: both copies of the largest metadata.
inline constexpr std::uint64_t kMaxHeaderReadBytes = kMetadataOffset + 2 * kMaxMetadataBytes;
inline constexpr std::uint32_t kIndexEntryBytes = 32;
inline constexpr std::uint64_t kMaxSegmentBytes = 1ull << 40;
// Largest row count any store may claim; bounds the index reservation and every multiplication.
inline constexpr std::uint64_t kMaxRows = 1ull << 40;
// Largest address-space budget (map_bytes) accepted: x86-64 user space is 2^47 bytes.
inline constexpr std::uint64_t kMaxMapBytes = 1ull << 47;

inline constexpr const char* kHeaderFileName = "header";
inline constexpr const char* kLockFileName = "lock";
std::string data_file_name(std::uint64_t generation);   // "rows.<G>"
std::string index_file_name(std::uint64_t generation);  // "index.<G>"

struct FixedHeader {
  char magic[8];
  std::uint16_t format_major;
  std::uint16_t format_minor;
  std::uint8_t dtype;
  std::uint8_t reserved0[3];
  std::uint32_t dim;
  std::uint32_t index_entry_bytes;
  std::uint64_t record_bytes;
  std::uint64_t segment_bytes;
  std::uint8_t store_id[16];
  std::int64_t created_unix_ns;
  std::uint64_t metadata_bytes;
  std::uint64_t state_offset;
  std::uint64_t metadata_offset;
  std::uint64_t flags;  // Format 1.4: kFlag* bits; 0 in older stores.
  std::uint8_t reserved1[24];
  std::uint64_t header_checksum;
};
static_assert(sizeof(FixedHeader) == 128);
static_assert(offsetof(FixedHeader, format_major) == 8);
static_assert(offsetof(FixedHeader, format_minor) == 10);
static_assert(offsetof(FixedHeader, dtype) == 12);
static_assert(offsetof(FixedHeader, dim) == 16);
static_assert(offsetof(FixedHeader, index_entry_bytes) == 20);
static_assert(offsetof(FixedHeader, record_bytes) == 24);
static_assert(offsetof(FixedHeader, segment_bytes) == 32);
static_assert(offsetof(FixedHeader, store_id) == 40);
static_assert(offsetof(FixedHeader, created_unix_ns) == 56);
static_assert(offsetof(FixedHeader, metadata_bytes) == 64);
static_assert(offsetof(FixedHeader, state_offset) == 72);
static_assert(offsetof(FixedHeader, metadata_offset) == 80);
static_assert(offsetof(FixedHeader, flags) == 88);
static_assert(offsetof(FixedHeader, header_checksum) == 120);

// FixedHeader::flags. Bits not named here are 0 and ignored by readers.
inline constexpr std::uint64_t kFlagNoKeyIndex = 1;  // Writers keep no key index.

// The mutable shared page. Only ever accessed through std::atomic_ref (see state.h).
struct StatePage {
  alignas(64) std::uint64_t committed_rows;
  alignas(64) std::uint64_t durable_rows;
  alignas(64) std::uint64_t capacity_rows;
  alignas(64) std::uint64_t boot_id[2];
  alignas(64) std::uint64_t generation;
  alignas(64) std::uint64_t era;
  alignas(64) std::uint64_t key_generation;  // Current keys.K; 0: none (every 1.0 store).
  // 1.3: signed wall-clock ns of the latest commit; 0: unknown (older writers, no commit yet).
  alignas(64) std::uint64_t last_commit_unix_ns;
};
static_assert(offsetof(StatePage, committed_rows) == 0);
static_assert(offsetof(StatePage, durable_rows) == 64);
static_assert(offsetof(StatePage, capacity_rows) == 128);
static_assert(offsetof(StatePage, boot_id) == 192);
static_assert(offsetof(StatePage, generation) == 256);
static_assert(offsetof(StatePage, era) == 320);
static_assert(offsetof(StatePage, key_generation) == 384);
static_assert(offsetof(StatePage, last_commit_unix_ns) == 448);
static_assert(sizeof(StatePage) <= 512, "counters must share one 512-byte sector");
// Bit 63 of StatePage::generation: a truncate is switching the store from generation G (the
// word's low bits) to G+1, whose files are complete and durable (FORMAT.md, "Truncate").
inline constexpr std::uint64_t kGenerationSwitching = 1ull << 63;
// The generation whose files hold the store, from the word: G, or G+1 while switching.
inline constexpr std::uint64_t store_generation_of(std::uint64_t word) {
  return (word & ~kGenerationSwitching) + ((word & kGenerationSwitching) != 0 ? 1 : 0);
}

struct IndexEntry {
  std::uint64_t key;
  std::uint64_t epoch;
  std::uint64_t row;  // Row number (bits 0..47), era (48..62), batch-end flag (63).
  std::uint64_t checksum;
};
inline constexpr std::uint64_t kEntryRowMask = (1ull << 48) - 1;
// Set on the last row of every append: after a power loss recovery keeps only whole batches.
inline constexpr std::uint64_t kEntryBatchEnd = 1ull << 63;
// The era (StatePage::era, 15 bits) the entry was written in: raised whenever entries past the
// commit point may still validate, so that such stale entries can never follow newer ones.
inline constexpr int kEntryEraShift = 48;
inline constexpr std::uint64_t kEntryEraMask = 0x7fff;
inline std::uint64_t entry_era(std::uint64_t row_field) {
  return (row_field >> kEntryEraShift) & kEntryEraMask;
}
// True when era `later` is not older than `earlier`, in 15-bit wrap-around arithmetic.
inline bool era_not_older(std::uint64_t later, std::uint64_t earlier) {
  return ((later - earlier) & kEntryEraMask) < (kEntryEraMask + 1) / 2;
}
static_assert(kMaxRows <= kEntryRowMask);
static_assert(sizeof(IndexEntry) == kIndexEntryBytes);
static_assert(offsetof(IndexEntry, key) == 0);
static_assert(offsetof(IndexEntry, epoch) == 8);
static_assert(offsetof(IndexEntry, row) == 16);
static_assert(offsetof(IndexEntry, checksum) == 24);

// `value` rounded up to a multiple of `multiple` (> 0).
constexpr std::uint64_t round_up(std::uint64_t value, std::uint64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Where the second copy of `metadata_bytes` bytes of metadata sits (format 1.2 on).
constexpr std::uint64_t metadata_copy_offset(std::uint64_t metadata_bytes) {
  return kMetadataOffset + round_up(metadata_bytes, kPageBytes);
}

// The validated, host-side description of a store's fixed header.
struct Layout {
  DType dtype;
  std::uint32_t dim;
  std::uint64_t record_bytes;
  std::uint64_t segment_bytes;
  std::uint8_t store_id[16];
  std::uint64_t seed;  // Checksum seed derived from store_id.
  std::int64_t created_unix_ns;
  std::uint16_t format_major;
  std::uint16_t format_minor;
  std::string metadata;
  bool key_index = true;   // kFlagNoKeyIndex clear: writers keep a key index.
  bool from_copy = false;  // The primary fixed header failed its checks; the copy held.
  // What decode_header() found wrong with the header's two copies (from format 1.2 on): the
  // primary failing its checks (from_copy), or the copy failing its checks or differing from
  // the primary. "" when both hold (or the format has no copy). A writer repairs either
  // (StoreFiles::upgrade_header()); verify reports it.
  std::string copy_problem;

  // Data file bytes for a capacity of `rows` rows, rounded up to whole pages.
  std::uint64_t data_bytes_for(std::uint64_t rows) const;
  // Index file bytes needed for `rows` entries, rounded up to whole pages.
  static std::uint64_t index_bytes_for(std::uint64_t rows);
};

// Checks creation parameters; throws kInvalidArgument naming the offending value.
void validate_create_params(DType dtype, std::uint32_t dim, std::uint64_t segment_bytes,
                            std::size_t metadata_bytes);

// Builds the header file's bytes (fixed header and its copy, zeroed state page with
// generation 1, metadata and its copy).
std::string encode_header(DType dtype, std::uint32_t dim, std::uint64_t segment_bytes,
                          const std::uint8_t store_id[16], std::int64_t created_unix_ns,
                          std::string_view metadata, std::uint64_t flags = 0);

// Parses and validates header bytes read from `path` (used in messages): the primary fixed
// header, or if that fails its checks, the copy (Layout::from_copy). `file_bytes` is the header
// file's size. Throws the primary's error — kNotFound (bad magic), kUnsupportedVersion, or
// kCorruption naming the field — when neither copy holds; never reads outside `bytes`.
Layout decode_header(std::string_view bytes, std::uint64_t file_bytes, const std::string& path);

// The 128 bytes of a verified fixed header (either copy, from `bytes` as decode_header() read
// them) raised to the current format minor, its checksum recomputed: what a writer upgrading a
// store, or repairing its primary, writes to both places.
std::string current_fixed_header(std::string_view bytes, const Layout& layout);

std::uint64_t seed_from_store_id(const std::uint8_t store_id[16]);
std::string store_id_hex(const std::uint8_t store_id[16]);

}  // namespace embstore::detail
