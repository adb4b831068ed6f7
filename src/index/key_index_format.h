// key_index_format.h — the on-disk layout of the key index (src/format/FORMAT.md, "keys.K") as
// constants and checked structs. Same conventions as format.h: fixed-width little-endian fields,
// offsets pinned by static_assert, zero never valid.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "format/format.h"

namespace embstore::detail {

inline constexpr char kKeyIndexMagic[8] = {'E', 'M', 'B', 'S', 'K', 'E', 'Y', 'S'};
// 3: the layout of 2, indexed under the key index lock (byte 2 of the lock file) instead of the
// writer lock, so that a writer of a version-2 library, which indexes under the writer lock
// alone, never indexes the same file at the same time; 2: pair slots of 16 bytes holding the key
// and the epoch; 1: 8-byte slots holding a hash tag. A file of another version is not used:
// readers scan, the next writer rebuilds it.
inline constexpr std::uint16_t kKeyIndexVersion = 3;
// Minor format version that introduced the key index; stores of an older minor have none until
// a writer builds it.
inline constexpr std::uint16_t kKeyIndexSinceMinor = 1;
std::string key_index_file_name(std::uint64_t key_generation);  // "keys.<K>"
// A growth or rebuild builds keys.<K> in a file of its own with no name, named only when
// published. Where the file system cannot make a file without a name, its name is
// "keys.build.<pid>.<n>" (the builder's pid, and a number its process uses once); a
// writer opening the store removes those of pids no longer running.
std::string key_index_build_file_name(int pid, std::uint64_t n);
inline constexpr const char* kKeyIndexBuildFilePrefix = "keys.build.";
// Libraries before unnamed builds built every generation under this one name, shared by all
// builders (two at once could publish each other's file). Never read; a writer opening the
// store removes a leftover when no live growth claim could still be writing it.
inline constexpr const char* kKeyIndexLegacyBuildFileName = "keys.next";

// Page 0 of keys.K. Bytes 0..127 are written once, when the file is built; the cache lines after
// them are mutable and accessed only through std::atomic_ref.
struct KeyIndexHeader {
  char magic[8];
  std::uint16_t version;
  std::uint16_t reserved0;
  std::uint32_t reserved1;
  std::uint8_t store_id[16];
  std::uint64_t store_generation;  // The rows.G / index.G this file indexes.
  std::uint64_t key_generation;    // K, equal to the number in the file name.
  std::uint64_t pair_slots;        // Power of two.
  std::uint64_t key_slots;         // Power of two.
  std::uint64_t epoch_slots;       // Power of two.
  std::uint64_t chain_offset;      // Byte offset of chain record 0; a multiple of 4096.
  std::uint64_t hash_seed;
  std::uint64_t boot_id[2];  // The boot in which the file was built: trusted only in that boot.
  std::uint8_t reserved2[16];
  std::uint64_t header_checksum;           // XXH3-64 (seed 0) of bytes 0..119.
  alignas(64) std::uint64_t indexed_rows;  // Watermark: rows [0, indexed_rows) are indexed.
  alignas(64) std::uint64_t pairs_used;    // Occupied slots (may overcount after a crash).
  alignas(64) std::uint64_t keys_used;
  alignas(64) std::uint64_t epochs_used;
  alignas(64) std::uint64_t grow_claim;  // Pid of the writer building the next generation, or 0.
};
static_assert(offsetof(KeyIndexHeader, version) == 8);
static_assert(offsetof(KeyIndexHeader, store_id) == 16);
static_assert(offsetof(KeyIndexHeader, store_generation) == 32);
static_assert(offsetof(KeyIndexHeader, key_generation) == 40);
static_assert(offsetof(KeyIndexHeader, pair_slots) == 48);
static_assert(offsetof(KeyIndexHeader, key_slots) == 56);
static_assert(offsetof(KeyIndexHeader, epoch_slots) == 64);
static_assert(offsetof(KeyIndexHeader, chain_offset) == 72);
static_assert(offsetof(KeyIndexHeader, hash_seed) == 80);
static_assert(offsetof(KeyIndexHeader, boot_id) == 88);
static_assert(offsetof(KeyIndexHeader, header_checksum) == 120);
static_assert(offsetof(KeyIndexHeader, indexed_rows) == 128);
static_assert(offsetof(KeyIndexHeader, pairs_used) == 192);
static_assert(offsetof(KeyIndexHeader, keys_used) == 256);
static_assert(offsetof(KeyIndexHeader, epochs_used) == 320);
static_assert(offsetof(KeyIndexHeader, grow_claim) == 384);
static_assert(sizeof(KeyIndexHeader) <= kPageBytes);
inline constexpr std::uint64_t kKeyIndexChecksummedBytes = 120;
inline constexpr std::uint64_t kKeyIndexTablesOffset = kPageBytes;

// A key or epoch slot: one 64-bit word, 0 when empty. Bits 0..40 hold row + 1 (rows are
// < 2^40), bits 41..63 the top 23 bits of the hash (a tag that skips most non-matching slots
// without reading the offset index). The slot holds the latest row of its key or epoch.
inline constexpr int kSlotRowBits = 41;
inline constexpr std::uint64_t kSlotRowMask = (1ull << kSlotRowBits) - 1;
static_assert(kMaxRows + 1 <= kSlotRowMask);

// A pair slot: two 64-bit words, 16-byte aligned, holding the latest row of one (key, epoch).
//   word0: the key (meaningful only while word1 is not 0)
//   word1: 0 when empty; bits 0..40 row + 1; bit 41 "repeated": an earlier row has the same key
//          and epoch; bits 42..63 min(epoch, kPairEpochLarge)
// A lookup matches the key and the epoch field in the slot itself: one load from memory, no
// read of the offset index. Only an epoch >= kPairEpochLarge is confirmed against the row's
// entry. A writer stores word0 before it release-stores word1, and changes word0 only while
// word1 is 0, so a reader that acquire-loads a non-zero word1 reads the key that belongs to it.
// A slot without the repeated bit names the only row of its pair, which lets a key's history be
// proven from its pair slots alone (FORMAT.md "keys.K").
inline constexpr std::uint64_t kPairSlotWords = 2;
inline constexpr std::uint64_t kPairRepeated = 1ull << kSlotRowBits;
inline constexpr int kPairEpochShift = kSlotRowBits + 1;
inline constexpr std::uint64_t kPairEpochLarge = (1ull << (64 - kPairEpochShift)) - 1;

// A chain record: 16 bytes per row r, at chain_offset + 16 r.
//   word0: bits 0..40 previous row with the same key, + 1 (0: none); bits 41..63 ordinal bits 0..22
//   word1: bits 0..40 previous row with the same epoch, + 1 (0: none); bits 41..57 ordinal bits
//          23..39; bits 58..63 zero
// ordinal: 1 + the number of earlier rows with the same epoch (>= 1, so a zero record is invalid).
inline constexpr std::uint64_t kChainRecordBytes = 16;
inline constexpr int kOrdinalLowBits = 64 - kSlotRowBits;  // 23
inline constexpr int kOrdinalHighBits = 17;
static_assert(kOrdinalLowBits + kOrdinalHighBits == 40);

// Growth: a table is rebuilt at double size once its occupied slots pass this fraction (x/16). A
// table built for n entries gets the fewest slots (a power of two) that keep n under it, so a
// table never has more than 2 * 16/11 slots for each entry it was built for: the 112 B a row that
// FORMAT.md bounds a keys.K file by counts on that.
inline constexpr std::uint64_t kMaxLoadSixteenths = 11;  // 0.6875
inline constexpr std::uint64_t kMinSlots = 1024;
// A writer stops indexing into a table this full (the readers' scan covers the rest) until the
// larger one is in place.
inline constexpr std::uint64_t kHardLoadSixteenths = 14;
// Chain space is allocated in multiples of this many bytes, 1/8 ahead of what is needed (small
// stores stay small; large ones extend the file rarely).
inline constexpr std::uint64_t kChainStepBytes = 64ull << 10;

}  // namespace embstore::detail
