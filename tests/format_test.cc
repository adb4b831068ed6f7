// Header encoding/decoding (src/format/format.h) and the checksum rules of src/format/FORMAT.md.
#include "format/format.h"

#include <catch2/catch.hpp>
#include <cstring>

#include "embstore/error.h"
#include "format/checksum.h"

using namespace embstore;
using namespace embstore::detail;

namespace {

const std::uint8_t kStoreId[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

std::string valid_header(std::string_view metadata = "{\"model\":\"m\"}") {
  return encode_header(DType::kFloat16, 768, 1 << 20, kStoreId, 12345, metadata);
}

// Rewrites a field and fixes the checksum, so only the field's own check can reject it.
template <typename T>
std::string with_field(std::string bytes, std::size_t offset, T value) {
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
  FixedHeader h;
  std::memcpy(&h, bytes.data(), sizeof(h));
  // Hash only metadata that exists: a hostile metadata_bytes may point past the buffer.
  h.header_checksum =
      header_hash(&h, offsetof(FixedHeader, header_checksum), bytes.data() + kMetadataOffset,
                  std::min<std::uint64_t>(h.metadata_bytes, bytes.size() - kMetadataOffset));
  std::memcpy(bytes.data(), &h, sizeof(h));
  return bytes;
}

// Decodes `bytes` with the fixed header's copy wiped, so the primary's own checks decide (the
// copy is tested in corruption_test.cc).
ErrorCode decode_error(std::string bytes, std::string* message = nullptr) {
  if (bytes.size() >= kHeaderCopyOffset + sizeof(FixedHeader)) {
    std::memset(bytes.data() + kHeaderCopyOffset, 0, sizeof(FixedHeader));
  }
  try {
    decode_header(bytes, bytes.size(), "/s/header");
  } catch (const Error& e) {
    if (message) *message = e.what();
    return e.code();
  }
  FAIL("decode_header accepted a hostile header");
  return ErrorCode::kIO;
}

}  // namespace

TEST_CASE("A header decodes to exactly what was encoded", "[format]") {
  const std::string bytes = valid_header();
  const Layout layout = decode_header(bytes, bytes.size(), "/s/header");
  CHECK(layout.dtype == DType::kFloat16);
  CHECK(layout.dim == 768);
  CHECK(layout.record_bytes == 1536);
  CHECK(layout.segment_bytes == (1u << 20));
  CHECK(layout.created_unix_ns == 12345);
  CHECK(layout.metadata == "{\"model\":\"m\"}");
  CHECK(std::memcmp(layout.store_id, kStoreId, 16) == 0);
  CHECK(layout.format_major == 1);
  CHECK(bytes.size() % 4096 == 0);
}

TEST_CASE("Header fields sit at the offsets FORMAT.md gives", "[format]") {
  const std::string bytes = valid_header("");
  CHECK(bytes.substr(0, 8) == "EMBSTORE");
  std::uint16_t major;
  std::memcpy(&major, bytes.data() + 8, 2);
  CHECK(major == 1);
  CHECK(static_cast<std::uint8_t>(bytes[12]) == 2);  // dtype float16
  std::uint32_t dim;
  std::memcpy(&dim, bytes.data() + 16, 4);
  CHECK(dim == 768);
  std::uint64_t generation;
  std::memcpy(&generation, bytes.data() + 4096 + 256, 8);
  CHECK(generation == 1);
  std::uint16_t minor;
  std::memcpy(&minor, bytes.data() + 10, 2);
  CHECK(minor == 4);
  // 1.3: the latest commit's time at 4096 + 448, zero (unknown) in a new store.
  CHECK(offsetof(StatePage, last_commit_unix_ns) == 448);
  std::int64_t last_commit;
  std::memcpy(&last_commit, bytes.data() + 4096 + 448, 8);
  CHECK(last_commit == 0);
  // 1.4: the flags at 88, 0 by default (a store with a key index), in both copies.
  std::uint64_t flags = 1;
  std::memcpy(&flags, bytes.data() + 88, 8);
  CHECK(flags == 0);
  CHECK(decode_header(bytes, bytes.size(), "h").key_index);
}

TEST_CASE("The no-key-index flag sits at byte 88 of both fixed headers and is checksummed",
          "[format]") {
  const std::string bytes =
      encode_header(DType::kFloat32, 8, 1 << 20, kStoreId, 1, "", kFlagNoKeyIndex);
  for (const std::uint64_t at : {std::uint64_t{0}, kHeaderCopyOffset}) {
    std::uint64_t flags = 0;
    std::memcpy(&flags, bytes.data() + at + 88, 8);
    CHECK(flags == kFlagNoKeyIndex);
  }
  CHECK_FALSE(decode_header(bytes, bytes.size(), "h").key_index);
  // Part of header_checksum: a flipped flag fails the primary, and the copy is read instead.
  std::string flipped = bytes;
  flipped[88] = 0;
  const Layout layout = decode_header(flipped, flipped.size(), "h");
  CHECK(layout.from_copy);
  CHECK_FALSE(layout.key_index);
}

TEST_CASE("Reserved bytes and flag bits no minor defines are read past, not refused", "[format]") {
  // FORMAT.md: written 0 and ignored by readers, so a later 1.x minor may use them and every
  // 1.x reader still reads its stores (a checksummed header is not damage because they are set).
  for (const std::size_t offset :
       {std::size_t{13}, std::size_t{15}, std::size_t{96}, std::size_t{119}}) {
    const std::string bytes = with_field<std::uint8_t>(valid_header(), offset, 0xa5);
    std::string primary_only = bytes;
    std::memset(primary_only.data() + kHeaderCopyOffset, 0, sizeof(FixedHeader));
    const Layout layout = decode_header(primary_only, primary_only.size(), "h");
    CHECK_FALSE(layout.from_copy);
    CHECK(layout.dim == 768);
  }
  const std::string bytes =
      with_field<std::uint64_t>(valid_header(), 88, std::uint64_t{1} << 7 | 1u << 20);
  std::string primary_only = bytes;
  std::memset(primary_only.data() + kHeaderCopyOffset, 0, sizeof(FixedHeader));
  const Layout layout = decode_header(primary_only, primary_only.size(), "h");
  CHECK(layout.key_index);  // Bit 0 (no_key_index) is clear: the others say nothing.
  CHECK(layout.dtype == DType::kFloat16);
}

TEST_CASE("Hostile headers are refused with an error naming the field", "[format][corruption]") {
  std::string message;
  SECTION("bad magic is not a store") {
    std::string bytes = valid_header();
    bytes[0] = 'X';
    CHECK(decode_error(bytes, &message) == ErrorCode::kNotFound);
    CHECK_THAT(message, Catch::Contains("not an embstore header"));
  }
  SECTION("a newer major version") {
    CHECK(decode_error(with_field<std::uint16_t>(valid_header(), 8, 2), &message) ==
          ErrorCode::kUnsupportedVersion);
    CHECK_THAT(message, Catch::Contains("format_major 2"));
  }
  SECTION("version 0") {
    CHECK(decode_error(with_field<std::uint16_t>(valid_header(), 8, 0)) ==
          ErrorCode::kUnsupportedVersion);
  }
  SECTION("dim 0") {
    CHECK(decode_error(with_field<std::uint32_t>(valid_header(), 16, 0), &message) ==
          ErrorCode::kCorruption);
    CHECK_THAT(message, Catch::Contains("dim 0"));
  }
  SECTION("dim beyond the limit (dim * itemsize would overflow 32 bits)") {
    CHECK(decode_error(with_field<std::uint32_t>(valid_header(), 16, 0xffffffffu), &message) ==
          ErrorCode::kCorruption);
    CHECK_THAT(message, Catch::Contains("field dim"));
  }
  SECTION("unknown dtypes 0 and 7") {
    CHECK(decode_error(with_field<std::uint8_t>(valid_header(), 12, 0), &message) ==
          ErrorCode::kCorruption);
    CHECK_THAT(message, Catch::Contains("field dtype 0"));
    CHECK(decode_error(with_field<std::uint8_t>(valid_header(), 12, 7)) == ErrorCode::kCorruption);
  }
  SECTION("record_bytes that disagrees with dim x itemsize") {
    CHECK(decode_error(with_field<std::uint64_t>(valid_header(), 24, 4), &message) ==
          ErrorCode::kCorruption);
    CHECK_THAT(message, Catch::Contains("record_bytes"));
  }
  SECTION("segment_bytes not a page multiple, or smaller than a row") {
    CHECK(decode_error(with_field<std::uint64_t>(valid_header(), 32, 4097)) ==
          ErrorCode::kCorruption);
    CHECK(decode_error(with_field<std::uint64_t>(valid_header(), 32, 0)) == ErrorCode::kCorruption);
  }
  SECTION("metadata_bytes beyond the limit or the file") {
    CHECK(decode_error(with_field<std::uint64_t>(valid_header(), 64, ~0ull), &message) ==
          ErrorCode::kCorruption);
    CHECK_THAT(message, Catch::Contains("metadata_bytes"));
    CHECK(decode_error(with_field<std::uint64_t>(valid_header(""), 64, 60000)) ==
          ErrorCode::kCorruption);
  }
  SECTION("a flipped bit anywhere in the fixed header or metadata") {
    std::string bytes = valid_header();
    bytes[57] ^= 1;  // created_unix_ns
    CHECK(decode_error(bytes, &message) == ErrorCode::kCorruption);
    CHECK_THAT(message, Catch::Contains("header_checksum"));
    bytes = valid_header();
    bytes[kMetadataOffset + 2] ^= 1;
    CHECK(decode_error(bytes) == ErrorCode::kCorruption);
  }
  SECTION("truncated files: empty, one byte, the fixed header only") {
    CHECK(decode_error("") == ErrorCode::kNotFound);
    CHECK(decode_error("E") == ErrorCode::kNotFound);
    CHECK(decode_error(valid_header().substr(0, 128)) == ErrorCode::kCorruption);
  }
}

TEST_CASE("Creation parameters are checked before anything is written", "[format]") {
  CHECK_THROWS_AS(validate_create_params(DType::kFloat32, 0, 1 << 20, 0), Error);
  CHECK_THROWS_AS(validate_create_params(DType::kFloat32, kMaxDim + 1, 1 << 20, 0), Error);
  CHECK_THROWS_AS(validate_create_params(static_cast<DType>(0), 4, 1 << 20, 0), Error);
  CHECK_THROWS_AS(validate_create_params(DType::kFloat32, 4, 1000, 0), Error);
  CHECK_THROWS_AS(validate_create_params(DType::kFloat64, 1024, 4096, 0), Error);  // row > segment
  CHECK_THROWS_AS(validate_create_params(DType::kFloat32, 4, 4096, kMaxMetadataBytes + 1), Error);
  CHECK_NOTHROW(validate_create_params(DType::kFloat64, 512, 4096, kMaxMetadataBytes));
}

TEST_CASE("An all-zero index entry over a zero row never validates", "[format][checksum]") {
  const RowHashKey key(seed_from_store_id(kStoreId));
  const std::vector<std::byte> zero_row(64);
  IndexEntry zero{};
  for (std::uint64_t row : {0ull, 1ull, 1000ull}) {
    zero.row = row;
    CHECK_FALSE(entry_valid(zero, row, zero_row.data(), zero_row.size(), key));
  }
}

TEST_CASE("A checksum binds the row's bytes, key, epoch, position and store",
          "[format][checksum]") {
  const std::uint64_t seed = seed_from_store_id(kStoreId);
  const RowHashKey key(seed);
  std::vector<std::byte> row(64, std::byte{7});
  const std::uint64_t hash = payload_hash(row.data(), row.size(), key);
  IndexEntry entry{42, 3, 10, entry_checksum(hash, 42, 3, 10, seed)};
  CHECK(entry_valid(entry, 10, row.data(), row.size(), key));
  CHECK_FALSE(entry_valid(entry, 11, row.data(), row.size(), key));                   // moved
  CHECK_FALSE(entry_valid(entry, 10, row.data(), row.size(), RowHashKey(seed ^ 1)));  // elsewhere
  IndexEntry other_key = entry;
  other_key.key = 43;
  CHECK_FALSE(entry_valid(other_key, 10, row.data(), row.size(), key));
  IndexEntry other_epoch = entry;
  other_epoch.epoch = 4;
  CHECK_FALSE(entry_valid(other_epoch, 10, row.data(), row.size(), key));
  row[63] = std::byte{8};
  CHECK_FALSE(entry_valid(entry, 10, row.data(), row.size(), key));
}

TEST_CASE("The batch-end flag and the era are part of the checksum", "[format][checksum]") {
  const std::uint64_t seed = seed_from_store_id(kStoreId);
  const RowHashKey key(seed);
  std::vector<std::byte> row(64, std::byte{7});
  const std::uint64_t hash = payload_hash(row.data(), row.size(), key);
  const std::uint64_t flagged = 10 | kEntryBatchEnd;
  IndexEntry last{42, 3, flagged, entry_checksum(hash, 42, 3, flagged, seed)};
  CHECK(entry_valid(last, 10, row.data(), row.size(), key));
  IndexEntry unflagged = last;
  unflagged.row = 10;  // flag cleared without re-sealing: a torn entry
  CHECK_FALSE(entry_valid(unflagged, 10, row.data(), row.size(), key));
  const std::uint64_t era_5 = 10 | (5ull << kEntryEraShift);
  IndexEntry in_era{42, 3, era_5, entry_checksum(hash, 42, 3, era_5, seed)};
  CHECK(entry_valid(in_era, 10, row.data(), row.size(), key));
  CHECK(entry_era(in_era.row) == 5);
  IndexEntry moved_era = in_era;
  moved_era.row = 10 | (6ull << kEntryEraShift);  // era changed without re-sealing
  CHECK_FALSE(entry_valid(moved_era, 10, row.data(), row.size(), key));
}

TEST_CASE("Eras compare in 15-bit wrap-around arithmetic", "[format]") {
  CHECK(era_not_older(5, 5));
  CHECK(era_not_older(6, 5));
  CHECK_FALSE(era_not_older(4, 5));
  CHECK(era_not_older(0, kEntryEraMask));  // wrapped: 0 follows 32767
  CHECK_FALSE(era_not_older(kEntryEraMask, 0));
}

// payload_hash runs the AVX-512 or AVX2 build where the CPU has it, and every build hashes with
// the secret derived once per store: this holds each build the CPU can run to the definition,
// XXH3_64bits_withSeed.
TEST_CASE("The row hash gives the XXH3 withSeed value at every length and alignment",
          "[format][checksum]") {
  std::vector<std::byte> bytes(5000);
  std::uint64_t state = 99;
  for (auto& b : bytes) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    b = static_cast<std::byte>(state >> 56);
  }
  const std::uint64_t seeds[] = {0, 42, seed_from_store_id(kStoreId)};
  for (const std::uint64_t seed : seeds) {
    const RowHashKey key(seed);
    for (std::size_t length :
         {0u, 1u, 3u, 16u, 17u, 128u, 129u, 240u, 241u, 256u, 1024u, 3072u, 4999u}) {
      for (std::size_t offset : {0u, 1u}) {
        const std::uint64_t expected = payload_hash_reference(bytes.data() + offset, length, seed);
        REQUIRE(payload_hash(bytes.data() + offset, length, key) == expected);
        REQUIRE(payload_hash_portable(bytes.data() + offset, length, key) == expected);
#if defined(__x86_64__)
        if (__builtin_cpu_supports("avx2")) {
          REQUIRE(payload_hash_avx2(bytes.data() + offset, length, key) == expected);
        }
        if (__builtin_cpu_supports("avx512f")) {
          REQUIRE(payload_hash_avx512(bytes.data() + offset, length, key) == expected);
        }
#endif
      }
    }
  }
}

TEST_CASE("One table of dtype names, one conversion rule, one table of error names", "[rules]") {
  CHECK(parse_dtype("float32") == DType::kFloat32);
  CHECK(parse_dtype("BF16") == DType::kBFloat16);  // ASCII case is ignored, as in Python
  CHECK(parse_dtype("half") == DType::kFloat16);
  // Ambiguous: C's float is 32 bits, numpy's "float" 64 bits.
  CHECK_FALSE(parse_dtype("float").has_value());
  CHECK_FALSE(parse_dtype("double").has_value());
  for (const DTypeAlias& alias : dtype_aliases()) {
    INFO(alias.name);
    CHECK(parse_dtype(alias.name) == alias.dtype);
    CHECK(parse_dtype(dtype_name(alias.dtype)) == alias.dtype);
  }
  CHECK(dtype_accepts(DType::kFloat16, DType::kFloat32));
  CHECK(dtype_accepts(DType::kBFloat16, DType::kFloat32));
  CHECK(dtype_accepts(DType::kInt8, DType::kInt8));
  CHECK_FALSE(dtype_accepts(DType::kFloat32, DType::kFloat16));
  CHECK_FALSE(dtype_accepts(DType::kFloat64, DType::kFloat32));
  CHECK(std::string(error_code_name(ErrorCode::kInvalidArgument)) == "invalid_argument");
  CHECK(std::string(error_code_name(ErrorCode::kForkedChild)) == "forked_child");
  // The library's one format major is the header's.
  CHECK(detail::kFormatMajor == kFormatVersionMajor);
}
