#include "index/key_index.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <unordered_map>
#include <utility>
#include <vector>

#include "embstore/error.h"
#include "format/checksum.h"
#include "platform/testing.h"

namespace embstore::detail {
namespace {

constexpr std::uint64_t kNone = ~0ull;
constexpr std::uint64_t kPairGroupMask = 4096 / (8 * kPairSlotWords) - 1;  // 256 slots: a page.

std::uint64_t load(const std::uint64_t& word) {
  return std::atomic_ref<std::uint64_t>(const_cast<std::uint64_t&>(word))
      .load(std::memory_order_acquire);
}
std::uint64_t load_relaxed(const std::uint64_t& word) {
  return std::atomic_ref<std::uint64_t>(const_cast<std::uint64_t&>(word))
      .load(std::memory_order_relaxed);
}
void store(std::uint64_t& word, std::uint64_t value) {
  std::atomic_ref<std::uint64_t>(word).store(value, std::memory_order_release);
}
void store_relaxed(std::uint64_t& word, std::uint64_t value) {
  std::atomic_ref<std::uint64_t>(word).store(value, std::memory_order_relaxed);
}

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::kCorruption, path + ": " + what);
}

std::uint64_t key_hash(std::uint64_t key, std::uint64_t seed) { return key_index_mix(key ^ seed); }
// The pair slots of one key and 16 consecutive epochs (epoch >> 4 equal) start in one 256-slot
// group: a 4 KiB page of the pair table, so a key's history touches one or two pages (one
// address translation each) instead of one per epoch. Within the group the epoch spreads them.
std::uint64_t pair_hash(std::uint64_t key_hash_value, std::uint64_t epoch) {
  const std::uint64_t group =
      key_index_mix(key_hash_value + std::rotl((epoch >> 4) * 0x9e3779b97f4a7c15ull, 29));
  const std::uint64_t within =
      key_index_mix(key_hash_value ^ std::rotl(epoch * 0x9e3779b97f4a7c15ull, 17));
  return (group & ~kPairGroupMask) | (within & kPairGroupMask);
}
std::uint64_t epoch_hash(std::uint64_t epoch, std::uint64_t seed) {
  return key_index_mix(epoch ^ std::rotl(seed, 32) ^ 0x5851f42d4c957f2dull);
}

std::uint64_t slot_word(std::uint64_t hash, std::uint64_t row) {
  return (hash >> kSlotRowBits << kSlotRowBits) | (row + 1);
}
std::uint64_t slot_tag(std::uint64_t word) { return word >> kSlotRowBits; }
std::uint64_t slot_row(std::uint64_t word) { return (word & kSlotRowMask) - 1; }

// A pair slot's word1 (key_index_format.h): the epoch field and row + 1.
std::uint64_t pair_field(std::uint64_t epoch) { return std::min(epoch, kPairEpochLarge); }
std::uint64_t pair_word(std::uint64_t epoch, std::uint64_t row, bool repeated) {
  return (pair_field(epoch) << kPairEpochShift) | (repeated ? kPairRepeated : 0) | (row + 1);
}
std::uint64_t pair_epoch(std::uint64_t word) { return word >> kPairEpochShift; }
bool pair_repeated(std::uint64_t word) { return (word & kPairRepeated) != 0; }

std::uint64_t chain_word0(std::uint64_t prev_key, std::uint64_t ordinal) {
  return (prev_key == kNone ? 0 : prev_key + 1) | (ordinal << kSlotRowBits);
}
std::uint64_t chain_word1(std::uint64_t prev_epoch, std::uint64_t ordinal) {
  return (prev_epoch == kNone ? 0 : prev_epoch + 1) |
         ((ordinal >> kOrdinalLowBits) << kSlotRowBits);
}
std::uint64_t link(std::uint64_t word) {
  const std::uint64_t plus_one = word & kSlotRowMask;
  return plus_one == 0 ? kNone : plus_one - 1;
}

std::uint64_t tables_end(const KeyIndexSizes& sizes) {
  return round_up(kKeyIndexTablesOffset +
                      8 * (kPairSlotWords * sizes.pair_slots + sizes.key_slots + sizes.epoch_slots),
                  kPageBytes);
}

std::uint64_t reserve_for(std::uint64_t chain_offset, std::uint64_t max_rows) {
  return chain_offset + round_up(max_rows * kChainRecordBytes, kChainStepBytes);
}

// The address space to reserve for a mapping of the first `bytes` of the file: twice the chain
// it holds, rounded to a power of two (O(log n) remaps as the chain grows, and the mappings a
// file keeps add up to at most twice the newest), at most `cap_bytes`.
std::uint64_t reserve_in_proportion(std::uint64_t chain_offset, std::uint64_t bytes,
                                    std::uint64_t cap_bytes) {
  const std::uint64_t chain = bytes > chain_offset ? bytes - chain_offset : 0;
  return std::min(cap_bytes,
                  chain_offset + std::bit_ceil(std::max(chain, kChainStepBytes / 2)) * 2);
}

// Linear probing from `hash`: the slot holding a row for which match(row) holds, or the empty
// slot where the probe ended (row kNone). Bounded by the table size: a damaged table with no
// empty slot ends in kCorruption rather than a loop.
struct Probe {
  std::uint64_t slot;
  std::uint64_t row;
};
template <typename Match>
Probe probe(const std::uint64_t* table, std::uint64_t slots, std::uint64_t hash, Match&& match,
            const std::string& path) {
  const std::uint64_t mask = slots - 1;
  const std::uint64_t tag = hash >> kSlotRowBits;
  std::uint64_t i = hash & mask;
  for (std::uint64_t n = 0; n < slots; ++n, i = (i + 1) & mask) {
    const std::uint64_t word = load(table[i]);
    if (word == 0) return {i, kNone};
    if (slot_tag(word) == tag && match(slot_row(word))) return {i, slot_row(word)};
  }
  corrupt(path, "a table of " + std::to_string(slots) + " slots has no empty slot");
}

// Linear probing of the pair table from `hash` for (key, epoch): the slot holding it, or the
// empty slot where the probe ended (row kNone). The slot's own key and epoch field decide;
// `epoch_is(row)` is asked only for an epoch the field cannot hold (>= kPairEpochLarge).
template <typename EpochIs>
Probe probe_pair(const std::uint64_t* table, std::uint64_t slots, std::uint64_t hash,
                 std::uint64_t key, std::uint64_t epoch, EpochIs&& epoch_is,
                 const std::string& path) {
  const std::uint64_t mask = slots - 1;
  const std::uint64_t field = pair_field(epoch);
  std::uint64_t i = hash & mask;
  for (std::uint64_t n = 0; n < slots; ++n, i = (i + 1) & mask) {
    const std::uint64_t word = load(table[kPairSlotWords * i + 1]);
    if (word == 0) return {i, kNone};
    if (pair_epoch(word) == field && load_relaxed(table[kPairSlotWords * i]) == key &&
        (field != kPairEpochLarge || epoch_is(slot_row(word)))) {
      return {i, slot_row(word)};
    }
  }
  corrupt(path, "a table of " + std::to_string(slots) + " slots has no empty slot");
}

// check()'s tables of what the offset index says, per key, per epoch and per (key, epoch):
// open addressing with linear probing in one array, grown to twice the size when 3/4 full. A
// slot is empty while its value's `last` (a row) is kNone. check() looks each row up in them
// several times; with std::unordered_map (a heap node per entry) `embstore verify` of a store of
// 4M rows took twice as long (12.6-15.8 s against 6.1-6.4 s), and reliability scenario 4, which
// verifies after every recovery, 48 s against 24.
template <typename Key, typename Value, typename Hash>
class FlatMap {
 public:
  // The value of `key`; if absent, a new one (Value{}, last kNone), whose `last` the caller
  // sets before it calls again.
  Value& operator[](const Key& key) {
    if (4 * (size_ + 1) > 3 * slots_.size()) grow();
    Slot& slot = slots_[position(key)];
    if (slot.value.last == kNone) {
      slot.key = key;
      ++size_;
    }
    return slot.value;
  }
  const Value* find(const Key& key) const {
    if (slots_.empty()) return nullptr;
    const Slot& slot = slots_[position(key)];
    return slot.value.last == kNone ? nullptr : &slot.value;
  }
  template <typename F>
  void for_each(F&& f) const {
    for (const Slot& slot : slots_) {
      if (slot.value.last != kNone) f(slot.key, slot.value);
    }
  }

 private:
  struct Slot {
    Key key{};
    Value value{};
  };
  // The slot holding `key`, else the empty slot where it goes (the table is never full).
  std::size_t position(const Key& key) const {
    const std::size_t mask = slots_.size() - 1;
    const std::size_t hash = Hash{}(key);
    for (std::size_t i = hash & mask;; i = (i + 1) & mask) {
      if (slots_[i].value.last == kNone || slots_[i].key == key) return i;
    }
  }
  void grow() {
    std::vector<Slot> old(std::max<std::size_t>(1024, 2 * slots_.size()));
    old.swap(slots_);
    for (const Slot& slot : old) {
      if (slot.value.last != kNone) slots_[position(slot.key)] = slot;
    }
  }
  std::vector<Slot> slots_;
  std::size_t size_ = 0;
};

}  // namespace

std::uint64_t key_index_mix(std::uint64_t x) noexcept {
  // A 64-bit finalizer (Pelle Evensen's rrmxmx): every input bit affects every output bit.
  x ^= std::rotr(x, 49) ^ std::rotr(x, 24);
  x *= 0x9fb21c651e98df25ull;
  x ^= x >> 28;
  x *= 0x9fb21c651e98df25ull;
  return x ^ (x >> 28);
}

std::uint64_t key_index_slots_for(std::uint64_t entries) {
  // The smallest power of two that keeps `entries` under kMaxLoadSixteenths / 16.
  const std::uint64_t wanted = std::max(kMinSlots, entries * 16 / kMaxLoadSixteenths + 1);
  return std::bit_ceil(wanted);
}

std::string key_index_file_name(std::uint64_t key_generation) {
  return "keys." + std::to_string(key_generation);
}

std::string key_index_build_file_name(int pid, std::uint64_t n) {
  return kKeyIndexBuildFilePrefix + std::to_string(pid) + "." + std::to_string(n);
}

// ---- KeyIndexFile ---------------------------------------------------------------------------

KeyIndexFile::~KeyIndexFile() {
  mappings_.clear();
  if (fd_ >= 0) os::close_fd(fd_);
  if (build_ == Build::kNamed) os::remove_file(path_);
}

KeyIndexHeader* KeyIndexFile::header() const { return reinterpret_cast<KeyIndexHeader*>(base_); }

std::uint64_t KeyIndexFile::indexed_rows() const { return load(header()->indexed_rows); }

std::uint64_t* KeyIndexFile::grow_claim_word() const { return &header()->grow_claim; }

bool KeyIndexFile::built_in_current_boot() const {
  std::uint64_t boot[2];
  if (!os::boot_id(boot)) return false;
  const KeyIndexHeader* h = header();
  return h->boot_id[0] == boot[0] && h->boot_id[1] == boot[1];
}

void KeyIndexFile::map_header_and_tables(int fd, std::uint64_t max_rows) {
  max_reserve_bytes_ = reserve_for(chain_offset_, max_rows);
  const std::uint64_t file_bytes = os::file_size(fd, path_);
  auto mapping = std::make_unique<ReservedMapping>(
      reserve_in_proportion(chain_offset_, file_bytes, max_reserve_bytes_), path_, access_);
  mapping->map_to(fd, std::min(file_bytes / kPageBytes * kPageBytes, mapping->reserved_bytes()));
  base_ = mapping->base();
  // The tables in 2 MiB pages: a lookup or an indexed row lands on a random page of tables far
  // larger than the TLB covers with 4 KiB pages, and under a virtual machine's nested paging
  // each miss is a long page walk. The chain, read in order, keeps small pages (it grows).
  os::advise_huge_pages(base_, std::min(chain_offset_, mapping->mapped_bytes()));
  slots_ = reinterpret_cast<std::uint64_t*>(base_ + kKeyIndexTablesOffset);
  chain_base_.store(base_, std::memory_order_release);
  chain_rows_mapped_.store((mapping->mapped_bytes() - chain_offset_) / kChainRecordBytes,
                           std::memory_order_release);
  mappings_.push_back(std::move(mapping));
}

std::shared_ptr<KeyIndexFile> KeyIndexFile::create(const std::string& dir, std::uint64_t generation,
                                                   const KeyIndexIdentity& identity,
                                                   const KeyIndexSizes& sizes, std::uint64_t rows) {
  EMBSTORE_CRASH_POINT("key-index-create");
  std::shared_ptr<KeyIndexFile> file(new KeyIndexFile());
  file->access_ = os::Access::kReadWrite;
  file->fd_ = os::create_unnamed_file(dir);
  if (file->fd_ >= 0) {
    file->build_ = Build::kUnnamed;
    file->path_ = dir + "/" + key_index_file_name(generation) + " (being built, not yet named)";
  } else {
    static std::atomic<std::uint64_t> builds{0};
    file->path_ = dir + "/" + key_index_build_file_name(os::current_pid(), ++builds);
    // A leftover of a process that had this pid before (and died while building).
    os::remove_file(file->path_);
    file->fd_ = os::create_file(file->path_);
    file->build_ = Build::kNamed;  // From here on, dropping `file` (an error below) removes it.
  }
  file->generation_ = generation;
  file->sizes_ = sizes;
  file->hash_seed_ = key_index_mix(identity.seed ^ 0x6b6579696e646578ull);  // "keyindex"
  file->chain_offset_ = tables_end(sizes);

  KeyIndexHeader h{};
  std::memcpy(h.magic, kKeyIndexMagic, sizeof(h.magic));
  h.version = kKeyIndexVersion;
  std::memcpy(h.store_id, identity.store_id, sizeof(h.store_id));
  h.store_generation = identity.store_generation;
  h.key_generation = generation;
  h.pair_slots = sizes.pair_slots;
  h.key_slots = sizes.key_slots;
  h.epoch_slots = sizes.epoch_slots;
  h.chain_offset = file->chain_offset_;
  h.hash_seed = file->hash_seed_;
  if (!os::boot_id(h.boot_id)) h.boot_id[0] = h.boot_id[1] = 0;
  h.header_checksum = header_hash(&h, kKeyIndexChecksummedBytes, nullptr, 0);
  // Chain space 1/8 ahead of `rows`, but none past what map_bytes lets a mapping reserve.
  const std::uint64_t bytes = std::min(
      file->chain_offset_ +
          round_up(std::max<std::uint64_t>(rows, 1) * kChainRecordBytes * 9 / 8, kPageBytes),
      std::max(reserve_for(file->chain_offset_, identity.max_rows),
               file->chain_offset_ + round_up(rows * kChainRecordBytes, kPageBytes)));
  os::allocate(file->fd_, 0, bytes, file->path_);
  file->map_header_and_tables(file->fd_, identity.max_rows);
  file->allocated_bytes_ = bytes;
  // Random keys touch every page of the tables soon: map them all in one call now (off the
  // append's path for a growth) rather than fault at a first store in each. Before the header
  // is written, so that the file's first 2 MiB can come as one page too.
  os::populate_write(file->base_, file->chain_offset_);
  os::write_all(file->fd_, &h, sizeof(h), 0, file->path_);
  return file;
}

std::shared_ptr<KeyIndexFile> KeyIndexFile::open(const std::string& dir, std::uint64_t generation,
                                                 const KeyIndexIdentity& identity,
                                                 os::Access access) {
  std::shared_ptr<KeyIndexFile> file(new KeyIndexFile());
  file->path_ = dir + "/" + key_index_file_name(generation);
  file->access_ = access;
  file->generation_ = generation;
  const std::string& path = file->path_;
  file->fd_ = os::open_file(path, access);
  const std::uint64_t file_bytes = os::file_size(file->fd_, path);
  KeyIndexHeader h;
  if (file_bytes < kPageBytes) {
    corrupt(path, "file is " + std::to_string(file_bytes) + " bytes, shorter than its header");
  }
  os::read_exact(file->fd_, &h, sizeof(h), 0, path);
  if (std::memcmp(h.magic, kKeyIndexMagic, sizeof(h.magic)) != 0) {
    corrupt(path, "magic bytes \"EMBSKEYS\" missing");
  }
  if (h.header_checksum != header_hash(&h, kKeyIndexChecksummedBytes, nullptr, 0)) {
    corrupt(path, "field header_checksum does not match the header");
  }
  if (h.version != kKeyIndexVersion) {
    // Derived data of another layout (an older library's): not damage, it is rebuilt.
    throw Error(ErrorCode::kUnsupportedVersion,
                path + ": field version " + std::to_string(h.version) + " is not " +
                    std::to_string(kKeyIndexVersion) + " (a key index of another layout)");
  }
  if (std::memcmp(h.store_id, identity.store_id, sizeof(h.store_id)) != 0 ||
      h.store_generation != identity.store_generation) {
    corrupt(path,
            "field store_id/store_generation: the file belongs to another store or "
            "generation");
  }
  if (h.key_generation != generation) {
    corrupt(path, "field key_generation " + std::to_string(h.key_generation) + " is not " +
                      std::to_string(generation));
  }
  for (const std::uint64_t slots : {h.pair_slots, h.key_slots, h.epoch_slots}) {
    if (slots < kMinSlots || slots > (kMaxRows << 2) || !std::has_single_bit(slots)) {
      corrupt(path, "a table size of " + std::to_string(slots) +
                        " slots is not a power of two in 2^10..2^42");
    }
  }
  file->sizes_ = {h.pair_slots, h.key_slots, h.epoch_slots};
  file->chain_offset_ = tables_end(file->sizes_);
  file->hash_seed_ = h.hash_seed;
  if (h.chain_offset != file->chain_offset_) {
    corrupt(path, "field chain_offset " + std::to_string(h.chain_offset) + " is not " +
                      std::to_string(file->chain_offset_));
  }
  if (file_bytes < file->chain_offset_) {
    corrupt(path, "file is " + std::to_string(file_bytes) + " bytes, too short for its " +
                      std::to_string(file->chain_offset_) + " bytes of tables");
  }
  // A writer stores through the mapping: a file copied or restored sparse must have its holes
  // allocated first, or a full disk turns those stores into SIGBUS (free when allocated).
  if (access == os::Access::kReadWrite) os::allocate(file->fd_, 0, file_bytes, path);
  file->map_header_and_tables(file->fd_, identity.max_rows);
  const std::uint64_t indexed = file->indexed_rows();
  // A writer may have grown the chain and indexed into it since the size was read. It allocates
  // before it publishes indexed_rows, so the size read after the count covers it unless the
  // file is damaged.
  const std::uint64_t chain_rows =
      (std::max(file_bytes, os::file_size(file->fd_, path)) - file->chain_offset_) /
      kChainRecordBytes;
  if (indexed > chain_rows) {
    corrupt(path, "field indexed_rows " + std::to_string(indexed) + " exceeds the chain's " +
                      std::to_string(chain_rows) + " rows");
  }
  file->file_id_ = os::file_id(file->fd_);
  if (access == os::Access::kReadOnly) {
    // A Reader keeps no descriptor (RLIMIT_NOFILE must not bound open Readers): it opens the
    // file by path again only to map more of its chain (reopen(): the same file only).
    os::close_fd(file->fd_);
    file->fd_ = -1;
  }
  return file;
}

std::uint64_t* KeyIndexFile::chain_words(std::uint64_t row) const {
  // Rows mapped first, then the base: a base at least as new as that count covers the row.
  if (row >= chain_rows_mapped_.load(std::memory_order_acquire)) map_chain(row);
  return reinterpret_cast<std::uint64_t*>(chain_base_.load(std::memory_order_acquire) +
                                          chain_offset_ + row * kChainRecordBytes);
}

int KeyIndexFile::reopen() const {
  // kNotFound when a newer generation replaced the file and it was removed.
  const int fd = os::open_file(path_, access_);
  // Another file under the same name: after a truncate, the new generation's (its numbering
  // starts over), whose header can match this one's field for field. This file's mapping keeps
  // it in existence, so no other file can have its identity meanwhile.
  // The same file has the same header (its first 128 bytes are written once).
  if (!file_id_ || os::file_id(fd) != file_id_) {
    os::close_fd(fd);
    throw Error(ErrorCode::kNotFound, path_ + ": the file was replaced since it was opened");
  }
  return fd;
}

void KeyIndexFile::map_chain(std::uint64_t row) const {
  std::lock_guard guard(map_mutex_);
  if (row < chain_rows_mapped_.load(std::memory_order_acquire)) return;
  const int fd = fd_ >= 0 ? fd_ : reopen();
  struct CloseAtExit {
    int fd;
    bool owned;
    ~CloseAtExit() {
      if (owned) os::close_fd(fd);
    }
  } close_at_exit{fd, fd_ < 0};
  // Another writer extended the file since the last mapping was made: map the rest of it.
  const std::uint64_t file_bytes = os::file_size(fd, path_);
  const std::uint64_t file_rows =
      file_bytes < chain_offset_ ? 0 : (file_bytes - chain_offset_) / kChainRecordBytes;
  if (row >= file_rows) {
    corrupt(path_, "row " + std::to_string(row) + " is referenced but the chain holds " +
                       std::to_string(file_rows) + " rows");
  }
  if (chain_offset_ + (row + 1) * kChainRecordBytes > max_reserve_bytes_) {
    // Not damage: the store's map_bytes leaves the chain no address space for this row.
    throw Error(ErrorCode::kFull, path_ + ": row " + std::to_string(row) +
                                      " is past the chain rows map_bytes leaves address space for");
  }
  const std::uint64_t bytes = std::min(file_bytes / kPageBytes * kPageBytes, max_reserve_bytes_);
  // A Reader's descriptor is a new one each time, and the kernel never merges pieces mapped from
  // different descriptors: it maps the rest of the reservation at once (map_ahead), past the
  // file's end too, so that following the chain's growths adds no mapping within a
  // reservation (reopen() made sure this is the same file). A Writer maps from its own
  // descriptor, whose pieces merge.
  const auto map = [&](ReservedMapping& m) {
    if (fd_ >= 0) {
      m.map_to(fd, bytes);
    } else {
      m.map_ahead(fd, bytes);
    }
  };
  ReservedMapping* mapping = mappings_.back().get();
  if (bytes > mapping->reserved_bytes()) {
    // Past this reservation: map the file again at a larger one. The older mappings stay (views
    // of lookups in flight point into them) until this object dies.
    auto larger = std::make_unique<ReservedMapping>(
        reserve_in_proportion(chain_offset_, bytes, max_reserve_bytes_), path_, access_);
    map(*larger);
    mapping = larger.get();
    mappings_.push_back(std::move(larger));
  } else {
    map(*mapping);
  }
  chain_base_.store(mapping->base(), std::memory_order_release);
  chain_rows_mapped_.store((mapping->mapped_bytes() - chain_offset_) / kChainRecordBytes,
                           std::memory_order_release);
}

void KeyIndexFile::ensure_chain_allocated(std::uint64_t rows) {
  const std::uint64_t needed = chain_offset_ + rows * kChainRecordBytes;
  // The file never shrinks: a size seen once still holds, and saves a system call per append.
  if (allocated_bytes_ >= needed) return;
  const std::uint64_t file_bytes = os::file_size(fd_, path_);
  allocated_bytes_ = file_bytes;
  if (file_bytes >= needed) return;
  if (needed > max_reserve_bytes_) {
    throw Error(ErrorCode::kFull, path_ + ": " + std::to_string(rows) +
                                      " rows exceed the address space map_bytes leaves the chain");
  }
  // A small chain doubles (a small store stays small on disk), a large one grows ~1/8 ahead and
  // at least a step, so growths stay rare either way (FORMAT.md "File sizes").
  const std::uint64_t chain = file_bytes > chain_offset_ ? file_bytes - chain_offset_ : 0;
  const std::uint64_t need = rows * kChainRecordBytes;
  const std::uint64_t ahead =
      std::max(need + need / 8, std::min(2 * chain, need + kChainStepBytes));
  const std::uint64_t target =
      std::min(max_reserve_bytes_, chain_offset_ + round_up(ahead, kPageBytes));
  os::allocate(fd_, file_bytes, target - file_bytes, path_);
  allocated_bytes_ = target;
}

void KeyIndexFile::populate_chain(std::uint64_t begin, std::uint64_t end) {
  if (end <= populated_rows_) return;
  // A step ahead at a time: a fresh page would otherwise fault at its first record (a page
  // allocation, zeroing and page_mkwrite each, microseconds on virtual machines: bench/RESULTS.md),
  // one call per 256.
  constexpr std::uint64_t kAheadRows = 1 << 16;
  const std::uint64_t from = std::max(populated_rows_, begin);
  // Within the file, and within what the reservation can map (map_bytes bounds it).
  const std::uint64_t allocated_rows =
      (std::min(allocated_bytes_, max_reserve_bytes_) - chain_offset_) / kChainRecordBytes;
  const std::uint64_t to = std::min(allocated_rows, std::max(end, from + kAheadRows));
  chain_words(to - 1);  // Maps through `to`, so the range lies in one mapping.
  os::populate_write(chain_words(from), (to - from) * kChainRecordBytes);
  populated_rows_ = to;
}

bool KeyIndexFile::epochs_overcounted() const {
  const std::uint64_t* slots = epoch_slots();
  std::uint64_t occupied = 0;
  for (std::uint64_t i = 0; i < sizes_.epoch_slots; ++i) occupied += load(slots[i]) != 0;
  return occupied != load(header()->epochs_used);
}

bool KeyIndexFile::wants_growth() const {
  const KeyIndexHeader* h = header();
  return rebuild_wanted_.load(std::memory_order_relaxed) ||
         load(h->pairs_used) * 16 > sizes_.pair_slots * kMaxLoadSixteenths ||
         load(h->keys_used) * 16 > sizes_.key_slots * kMaxLoadSixteenths ||
         load(h->epochs_used) * 16 > sizes_.epoch_slots * kMaxLoadSixteenths;
}

KeyIndexSizes KeyIndexFile::next_sizes(std::uint64_t rows) const {
  const KeyIndexHeader* h = header();
  const std::uint64_t indexed = indexed_rows();
  auto next = [&](std::uint64_t used, std::uint64_t slots) {
    // A full table doubles at least (so growth stays rare).
    const std::uint64_t at_least = used * 16 > slots * kMaxLoadSixteenths ? slots * 2 : slots;
    if (rows > indexed && indexed > 0) {
      // Entries come with rows as they came so far; a row adds at most one to a table.
      // (A size estimate: a double's precision is ample, and it cannot overflow.)
      const double expected =
          static_cast<double>(used) / static_cast<double>(indexed) * static_cast<double>(rows);
      used = expected >= static_cast<double>(rows) ? rows : static_cast<std::uint64_t>(expected);
    }
    // The expected entries under the most load a table may have (no more: the file's size bound
    // counts on it).
    return used * 16 > at_least * kMaxLoadSixteenths ? std::max(at_least, key_index_slots_for(used))
                                                     : at_least;
  };
  return {next(load(h->pairs_used), sizes_.pair_slots), next(load(h->keys_used), sizes_.key_slots),
          next(load(h->epochs_used), sizes_.epoch_slots)};
}

bool KeyIndexFile::index_rows(const IndexEntry* entries, std::uint64_t end) {
  KeyIndexHeader* h = header();
  std::uint64_t row = indexed_rows();
  if (row >= end) return true;
  ensure_chain_allocated(end);
  populate_chain(row, end);
  const std::uint64_t pair_hard = sizes_.pair_slots * kHardLoadSixteenths / 16;
  const std::uint64_t key_hard = sizes_.key_slots * kHardLoadSixteenths / 16;
  const std::uint64_t epoch_hard = sizes_.epoch_slots * kHardLoadSixteenths / 16;
  std::uint64_t pairs_used = load(h->pairs_used);
  std::uint64_t keys_used = load(h->keys_used);
  std::uint64_t epochs_used = load(h->epochs_used);
  std::uint64_t* pairs = pair_slots();
  std::uint64_t* keys = key_slots();
  std::uint64_t* epochs = epoch_slots();
  auto full = [&] {
    return pairs_used >= pair_hard || keys_used >= key_hard || epochs_used >= epoch_hard;
  };
  // Slots only name committed rows (those of a writer that died indexing them included), all
  // below `end`: anything else is damage, and reading its entry could fault past the mapping.
  auto checked = [&](std::uint64_t r) {
    if (r >= end) {
      corrupt(path_, "a slot names row " + std::to_string(r) + ", past the " + std::to_string(end) +
                         " committed rows");
    }
    return r;
  };
  auto probe_epoch = [&](std::uint64_t hash, std::uint64_t epoch) {
    return probe(
        epochs, sizes_.epoch_slots, hash,
        [&](std::uint64_t s) { return entries[checked(s)].epoch == epoch; }, path_);
  };

  // Rows go in blocks: hash the whole block and prefetch its slots first, so the cache misses
  // of a block overlap instead of following one another.
  constexpr std::uint64_t kBlock = 16;
  std::uint64_t kh[kBlock], eh[kBlock], ph[kBlock];
  bool stopped = false;
  bool counted_epoch = false;
  while (row < end && !stopped) {
    const std::uint64_t count = std::min(kBlock, end - row);
    for (std::uint64_t j = 0; j < count; ++j) {
      const IndexEntry& e = entries[row + j];
      kh[j] = key_hash(e.key, hash_seed_);
      eh[j] = epoch_hash(e.epoch, hash_seed_);
      ph[j] = pair_hash(kh[j], e.epoch);
      __builtin_prefetch(keys + (kh[j] & (sizes_.key_slots - 1)), 1);
      __builtin_prefetch(pairs + kPairSlotWords * (ph[j] & (sizes_.pair_slots - 1)), 1);
    }
    for (std::uint64_t j = 0; j < count; ++j, ++row) {
      if (full()) {
        stopped = true;
        break;
      }
      const IndexEntry& e = entries[row];
      const std::uint64_t key = e.key, epoch = e.epoch;
      const std::uint64_t r = row;
      // A run of rows of one epoch (a batch is one) links each row to the one before it without
      // a probe, and stores the epoch's slot once, at its last row: the slot only has to be
      // right before the watermark passes the run.
      const bool follows_run = r > 0 && entries[r - 1].epoch == epoch;
      const Probe kp = probe(
          keys, sizes_.key_slots, kh[j],
          [&](std::uint64_t s) { return entries[checked(s)].key == key; }, path_);
      const bool key_done = kp.row != kNone && kp.row >= r;
      redo_seen_ = redo_seen_ || key_done;
      // Writes go chain record, pair slot, key slot, epoch slot: a redo finds each slot either
      // at r or past it already (skip it) or before r (redo it), and a key slot at r means the
      // record is complete. So a record is rewritten only while the epoch slot is below r, and
      // the record of r - 1 is complete when r is indexed (rows go in order).
      bool new_epoch = false;
      if (!key_done) {
        std::uint64_t prev_row = r - 1;
        if (!follows_run) {
          const Probe ep = probe_epoch(eh[j], epoch);
          prev_row = ep.row;
          new_epoch = ep.row == kNone;
        }
        std::uint64_t ordinal = 1;
        if (prev_row != kNone) {
          const std::uint64_t* prev = chain_words(prev_row);
          ordinal = 1 + ((load_relaxed(prev[0]) >> kSlotRowBits) |
                         ((load_relaxed(prev[1]) >> kSlotRowBits) << kOrdinalLowBits));
        }
        std::uint64_t* record = chain_words(r);
        store_relaxed(record[0], chain_word0(kp.row, ordinal));
        store_relaxed(record[1], chain_word1(prev_row, ordinal));
      }
      const Probe pp = probe_pair(
          pairs, sizes_.pair_slots, ph[j], key, epoch,
          [&](std::uint64_t s) { return entries[checked(s)].epoch == epoch; }, path_);
      if (pp.row == kNone) {
        store(h->pairs_used, ++pairs_used);  // Before the slot: never under.
        // The key first, then the word that makes the slot non-empty (release).
        store_relaxed(pairs[kPairSlotWords * pp.slot], key);
        store(pairs[kPairSlotWords * pp.slot + 1], pair_word(epoch, r, false));
      } else if (checked(pp.row) < r) {
        store(pairs[kPairSlotWords * pp.slot + 1], pair_word(epoch, r, true));
      }
      if (!key_done) {
        if (kp.row == kNone) store(h->keys_used, ++keys_used);
        store(keys[kp.slot], slot_word(kh[j], r));
      }
      if (r == end - 1 || (r & 1023) == 0) EMBSTORE_CRASH_POINT("mid-key-index");
      // A new epoch's slot is made at once (the table's count stays exact for full()).
      const bool run_ends = r + 1 == end || entries[r + 1].epoch != epoch || full();
      if (run_ends || new_epoch) {
        const Probe ep = probe_epoch(eh[j], epoch);
        if (ep.row == kNone || ep.row < r) {
          if (ep.row == kNone) {
            store(h->epochs_used, ++epochs_used);
            counted_epoch = true;
          }
          store(epochs[ep.slot], slot_word(eh[j], r));
        }
      }
    }
  }
  store(h->indexed_rows, row);
  // A writer killed between raising epochs_used for a new epoch and storing its slot had
  // stored the key slot of that row (writes go in the order above), so the redo that counts the
  // epoch again meets that row first (redo_seen_). Only then are the slots counted, which
  // finds such a count: not at every new epoch, since the count reads the whole epoch table and
  // a store whose epoch is the global step has a new one every append.
  if (counted_epoch && redo_seen_) {
    redo_seen_ = false;
    if (epochs_overcounted()) rebuild_wanted_.store(true, std::memory_order_relaxed);
  }
  return !stopped;
}

void KeyIndexFile::publish_as_current(const std::string& dir) {
  EMBSTORE_CRASH_POINT("key-index-publish");
  const std::string target = dir + "/" + key_index_file_name(generation_);
  if (build_ == Build::kUnnamed) {
    os::remove_file(target);  // linkat does not replace; the key index lock is held.
    os::name_file(fd_, target, path_);
  } else if (const int err = os::rename_path(path_, target); err != 0) {
    throw Error(ErrorCode::kIO, "rename " + path_ + " to " + target + ": " + std::strerror(err),
                err);
  }
  path_ = target;
  build_ = Build::kNone;
}

std::uint64_t KeyIndexFile::check(const IndexEntry* entries, std::uint64_t rows,
                                  std::string* first_problem) const {
  std::uint64_t problems = 0;
  auto problem = [&](const std::string& what) {
    if (problems++ == 0 && first_problem != nullptr) *first_problem = path_ + ": " + what;
  };
  rows = std::min(rows, indexed_rows());
  struct Mix {
    std::size_t operator()(std::uint64_t x) const { return key_index_mix(x); }
  };
  struct PairHash {
    std::size_t operator()(const std::pair<std::uint64_t, std::uint64_t>& p) const {
      return key_index_mix(p.first ^ std::rotl(p.second, 32));
    }
  };
  struct KeyState {
    std::uint64_t last = kNone;
  };
  FlatMap<std::uint64_t, KeyState, Mix> key_state;
  struct EpochState {
    std::uint64_t last = kNone;
    std::uint64_t count = 0;
  };
  FlatMap<std::uint64_t, EpochState, Mix> epoch_state;
  // Per (key, epoch): its latest row, and whether it has earlier ones (its slot says "repeated").
  struct PairState {
    std::uint64_t last = kNone;
    bool repeated = false;
  };
  FlatMap<std::pair<std::uint64_t, std::uint64_t>, PairState, PairHash> pair_state;
  const KeyQuery query(this, entries, rows);
  for (std::uint64_t r = 0; r < rows; ++r) {
    const IndexEntry& e = entries[r];
    PairState& ps = pair_state[{e.key, e.epoch}];
    ps.repeated = ps.last != kNone;
    ps.last = r;
    KeyState& ks = key_state[e.key];
    EpochState& es = epoch_state[e.epoch];
    const std::uint64_t* record = chain_words(r);
    const std::uint64_t w0 = load_relaxed(record[0]), w1 = load_relaxed(record[1]);
    const std::uint64_t ordinal =
        (w0 >> kSlotRowBits) |
        ((w1 >> kSlotRowBits & ((1ull << kOrdinalHighBits) - 1)) << kOrdinalLowBits);
    if (link(w0) != ks.last || link(w1) != es.last || ordinal != es.count + 1 ||
        (w1 >> (kSlotRowBits + kOrdinalHighBits)) != 0) {
      problem("chain record of row " + std::to_string(r) + " (key " + std::to_string(e.key) +
              ", epoch " + std::to_string(e.epoch) + ") does not match the offset index");
    }
    ks.last = r;
    es.last = r;
    ++es.count;
  }
  for (std::uint64_t r = 0; r < rows; ++r) {
    const IndexEntry& e = entries[r];
    // Each slot must hold the latest row of its (key, epoch), key and epoch; a stale or lost
    // slot shows as a lookup that ends before row r.
    const auto pair = query.find(e.key, e.epoch);
    const auto latest = query.find_latest(e.key);
    const PairState& ps = *pair_state.find({e.key, e.epoch});  // Every row's pair is there.
    if (!pair || *pair != ps.last || !latest || *latest != key_state.find(e.key)->last) {
      problem("lookup of row " + std::to_string(r) + " (key " + std::to_string(e.key) + ", epoch " +
              std::to_string(e.epoch) + ") through the tables fails");
    } else if (*pair == r) {
      // The pair's slot names its latest row, r: marked repeated exactly when an earlier row
      // has the pair (a mark lost would make a history from the slots leave rows out).
      const Probe p = probe_pair(
          pair_slots(), sizes_.pair_slots, pair_hash(key_hash(e.key, hash_seed_), e.epoch), e.key,
          e.epoch, [&](std::uint64_t s) { return s < rows && entries[s].epoch == e.epoch; }, path_);
      const bool marked =
          p.row == r && pair_repeated(load(pair_slots()[kPairSlotWords * p.slot + 1]));
      // A slot naming a later row (indexed past `rows`) cannot be judged here.
      if ((p.row != r && p.row < rows) || (p.row == r && marked != ps.repeated)) {
        problem("the pair slot of row " + std::to_string(r) + " (key " + std::to_string(e.key) +
                ", epoch " + std::to_string(e.epoch) + ") is " +
                (p.row != r ? "not found"
                 : marked   ? "marked repeated"
                            : "not marked repeated") +
                ", but the pair has " + (ps.repeated ? "" : "no ") + "earlier rows");
      }
    }
  }
  // Every occupied pair slot, found by a lookup or not: it must name the latest row of the key
  // and epoch it holds (a slot left by damage would otherwise answer for a pair with no row, or
  // with another key's row). Rows indexed past `rows` cannot be judged here.
  const std::uint64_t* pairs = pair_slots();
  for (std::uint64_t i = 0; i < sizes_.pair_slots; ++i) {
    const std::uint64_t word = load(pairs[kPairSlotWords * i + 1]);
    if (word == 0 || slot_row(word) >= rows) continue;
    const std::uint64_t r = slot_row(word);
    const IndexEntry& e = entries[r];
    const PairState* ps = pair_state.find({e.key, e.epoch});
    if (load_relaxed(pairs[kPairSlotWords * i]) != e.key ||
        pair_epoch(word) != pair_field(e.epoch) || ps == nullptr || ps->last != r) {
      problem("pair slot " + std::to_string(i) + " names row " + std::to_string(r) + " (key " +
              std::to_string(e.key) + ", epoch " + std::to_string(e.epoch) +
              "), which is not the latest row of the key and epoch the slot holds");
    }
  }
  epoch_state.for_each([&](std::uint64_t epoch, const EpochState& es) {
    const auto listed = query.epoch_rows(epoch);
    if (listed.size() != es.count || (!listed.empty() && listed.back() != es.last)) {
      problem("epoch " + std::to_string(epoch) + " lists " + std::to_string(listed.size()) +
              " rows through the tables, not " + std::to_string(es.count));
    }
  });
  return problems;
}

// ---- KeyQuery -------------------------------------------------------------------------------

KeyQuery::KeyQuery(const KeyIndexFile* index, const IndexEntry* entries, std::uint64_t snapshot)
    : index_(index),
      entries_(entries),
      snapshot_(snapshot),
      limit_(index == nullptr ? 0 : std::min(snapshot, index->indexed_rows())) {}

std::uint64_t KeyQuery::prev(std::uint64_t row, bool by_epoch) const {
  const std::uint64_t previous = link(load_relaxed(index_->chain_words(row)[by_epoch ? 1 : 0]));
  if (previous != kNone && previous >= row) {
    corrupt(index_->path(), "chain record of row " + std::to_string(row) + " links forward to " +
                                std::to_string(previous));
  }
  return previous;
}

std::uint64_t KeyQuery::ordinal(std::uint64_t row) const {
  const std::uint64_t* record = index_->chain_words(row);
  return (load_relaxed(record[0]) >> kSlotRowBits) |
         ((load_relaxed(record[1]) >> kSlotRowBits & ((1ull << kOrdinalHighBits) - 1))
          << kOrdinalLowBits);
}

std::uint64_t KeyQuery::below_limit(std::uint64_t row, bool by_epoch) const {
  while (row != kNone && row >= limit_) row = prev(row, by_epoch);
  return row;
}

// A slot naming a row below limit_ is checked against that row's entry. A slot naming a later
// row (written after this snapshot, or not yet covered by it) is followed down its key chain to
// the first row below limit_: that row's entry tells whose chain it is. Every row of a key is on
// its chain, so once that row has our key the answer below is complete.
std::uint64_t KeyQuery::table_find(std::uint64_t key, std::uint64_t epoch) const {
  if (limit_ == 0) return kNone;
  const std::uint64_t ph = pair_hash(key_hash(key, index_->hash_seed_), epoch);
  // The latest row of the pair below limit_, from a slot naming `row` (of this key).
  auto below = [&](std::uint64_t row) {
    if (row < limit_) return row;
    std::uint64_t r = below_limit(row, false);
    for (; r != kNone; r = prev(r, false)) {
      if (entries_[r].key != key) return kNone;  // Not this key's chain: a damaged record.
      if (entries_[r].epoch == epoch) break;
    }
    return r;
  };
  const Probe p = probe_pair(
      index_->pair_slots(), index_->sizes_.pair_slots, ph, key, epoch,
      [&](std::uint64_t row) {
        // An epoch too large for the slot's field: the row's entry (or, past the limit, the
        // first row of the chain below it with this epoch) tells.
        if (row < limit_) return entries_[row].epoch == epoch && entries_[row].key == key;
        return below(row) != kNone;
      },
      index_->path());
  return p.row == kNone ? kNone : below(p.row);
}

std::uint64_t KeyQuery::table_find_latest(std::uint64_t key) const {
  if (limit_ == 0) return kNone;
  std::uint64_t result = kNone;
  probe(
      index_->key_slots(), index_->sizes_.key_slots, key_hash(key, index_->hash_seed_),
      [&](std::uint64_t row) {
        const std::uint64_t r = below_limit(row, false);
        if (r == kNone || entries_[r].key != key) return false;
        result = r;
        return true;
      },
      index_->path());
  return result;
}

std::uint64_t KeyQuery::table_epoch_latest(std::uint64_t epoch) const {
  if (limit_ == 0) return kNone;
  std::uint64_t result = kNone;
  probe(
      index_->epoch_slots(), index_->sizes_.epoch_slots, epoch_hash(epoch, index_->hash_seed_),
      [&](std::uint64_t row) {
        const std::uint64_t r = below_limit(row, true);
        if (r == kNone || entries_[r].epoch != epoch) return false;
        result = r;
        return true;
      },
      index_->path());
  return result;
}

std::optional<std::uint64_t> KeyQuery::find(std::uint64_t key, std::uint64_t epoch) const {
  // Rows past the index are later than any row in it: the latest match there wins.
  for (std::uint64_t r = snapshot_; r-- > limit_;) {
    if (entries_[r].key == key && entries_[r].epoch == epoch) return r;
  }
  const std::uint64_t row = table_find(key, epoch);
  if (row == kNone) return std::nullopt;
  return row;
}

std::optional<std::uint64_t> KeyQuery::find_latest(std::uint64_t key) const {
  for (std::uint64_t r = snapshot_; r-- > limit_;) {
    if (entries_[r].key == key) return r;
  }
  const std::uint64_t row = table_find_latest(key);
  if (row == kNone) return std::nullopt;
  return row;
}

std::shared_ptr<const KeyIndexFile::EpochHint> KeyQuery::epoch_hint() const {
  const std::uint64_t used = load(index_->header()->epochs_used);
  {
    std::lock_guard guard(index_->hint_mutex_);
    const auto& hint = index_->epoch_hint_;
    if (hint && hint->epochs_used == used && (!hint->skipped || hint->limit >= limit_)) {
      return hint;
    }
  }
  auto made = std::make_shared<KeyIndexFile::EpochHint>();
  made->epochs_used = used;  // Read before the slots: a slot stored meanwhile makes it stale.
  made->limit = limit_;
  const std::uint64_t* slots = index_->epoch_slots();
  std::uint64_t seen = 0;
  for (std::uint64_t i = 0; i < index_->sizes_.epoch_slots; ++i) {
    const std::uint64_t word = load(slots[i]);
    if (word == 0) continue;
    ++seen;
    const std::uint64_t r = below_limit(slot_row(word), true);
    if (r == kNone) {
      made->skipped = true;
      continue;
    }
    made->epochs.push_back(entries_[r].epoch);
  }
  std::sort(made->epochs.begin(), made->epochs.end());
  made->epochs.erase(std::unique(made->epochs.begin(), made->epochs.end()), made->epochs.end());
  made->complete = seen == used;
  std::lock_guard guard(index_->hint_mutex_);
  index_->epoch_hint_ = made;
  return made;
}

std::optional<std::vector<std::uint64_t>> KeyQuery::history_by_epochs(
    std::uint64_t key, std::vector<std::uint64_t>* epochs, bool* from_slots) const {
  if (epochs != nullptr) epochs->clear();
  if (from_slots != nullptr) *from_slots = false;
  if (limit_ == 0) return std::vector<std::uint64_t>{};
  const auto hint = epoch_hint();
  const std::size_t n = hint->epochs.size();
  if (n == 0 || n > kHistoryEpochProbes) return std::nullopt;
  const std::uint64_t* pairs = index_->pair_slots();
  const std::uint64_t mask = index_->sizes_.pair_slots - 1;
  const std::uint64_t kh = key_hash(key, index_->hash_seed_);
  // One round of independent loads, the first slot of every (key, epoch) and the key's slot,
  // answers when it proves itself: every epoch of the index was looked up (a complete hint), and
  // each slot found holds the only row of its pair (not repeated), below the limit, so these
  // rows are all the key's rows. The key's slot, naming the latest of them, cross-checks it.
  // Otherwise two more rounds: the chain record of every candidate row and the entry of the
  // latest row, then the proof against the chain. A candidate is the row of the slot holding
  // the key and epoch; its entry is not needed, neither for the proof, which rejects any row
  // that is not on the key's chain, nor for its epoch, which is the one it was looked up in.
  constexpr std::uint64_t kAbsent = kNone - 1;
  // Slots looked at per pair before the full probe: 8 cache lines in a row, which the loads of
  // a linear probe stream through (a run that long is rare below the most load a table has).
  constexpr std::uint64_t kMaxSteps = 32;
  std::uint64_t hash[kHistoryEpochProbes], row[kHistoryEpochProbes];
  const std::uint64_t* key_table = index_->key_slots();
  const std::uint64_t key_mask = index_->sizes_.key_slots - 1;
  for (std::size_t i = 0; i < n; ++i) {
    hash[i] = pair_hash(kh, hint->epochs[i]);
    __builtin_prefetch(pairs + kPairSlotWords * (hash[i] & mask));
  }
  __builtin_prefetch(key_table + (kh & key_mask));
  bool proven = hint->complete;
  std::uint64_t newest = kNone;  // The latest row found, if proven.
  for (std::size_t i = 0; i < n; ++i) {
    row[i] = kNone;  // Not settled here: the full probe decides.
    const std::uint64_t field = pair_field(hint->epochs[i]);
    for (std::uint64_t step = 0, j = hash[i] & mask; step < kMaxSteps; ++step, j = (j + 1) & mask) {
      const std::uint64_t word = load(pairs[kPairSlotWords * j + 1]);
      if (word == 0) {
        row[i] = kAbsent;
        break;
      }
      if (pair_epoch(word) != field || load_relaxed(pairs[kPairSlotWords * j]) != key) continue;
      if (slot_row(word) < limit_ && field != kPairEpochLarge) {
        row[i] = slot_row(word);
        if (pair_repeated(word)) proven = false;
        if (newest == kNone || row[i] > newest) newest = row[i];
      }
      break;
    }
    if (row[i] == kNone) proven = false;
  }
  if (proven && newest != kNone) {
    // The key's slot names its latest row: the newest found, unless appends since the snapshot
    // moved it on (or the index is damaged); then the full proof decides.
    const std::uint64_t want = slot_word(kh, newest);
    bool matches = false;
    for (std::uint64_t step = 0, j = kh & key_mask; step < kMaxSteps;
         ++step, j = (j + 1) & key_mask) {
      const std::uint64_t word = load(key_table[j]);
      if (word == 0 || word == want) {
        matches = word == want;
        break;
      }
    }
    if (matches) {
      std::pair<std::uint64_t, std::uint64_t> found[kHistoryEpochProbes];  // (row, epoch)
      std::size_t count = 0;
      for (std::size_t i = 0; i < n; ++i) {
        if (row[i] != kAbsent) found[count++] = {row[i], hint->epochs[i]};
      }
      std::sort(found, found + count);
      std::vector<std::uint64_t> rows;
      rows.reserve(count);
      if (epochs != nullptr) epochs->reserve(count);
      for (std::size_t i = 0; i < count; ++i) {
        rows.push_back(found[i].first);
        if (epochs != nullptr) epochs->push_back(found[i].second);
      }
      if (from_slots != nullptr) *from_slots = true;
      return rows;
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (row[i] != kNone && row[i] != kAbsent) __builtin_prefetch(index_->chain_words(row[i]));
  }
  const std::uint64_t latest = table_find_latest(key);
  std::vector<std::uint64_t> rows;
  if (latest == kNone) return rows;
  std::pair<std::uint64_t, std::uint64_t> found[kHistoryEpochProbes];  // (row, epoch)
  std::size_t count = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint64_t r = row[i];
    if (r == kAbsent) continue;
    if (r == kNone) {
      r = table_find(key, hint->epochs[i]);
      if (r == kNone) continue;
    }
    found[count++] = {r, hint->epochs[i]};
  }
  std::sort(found, found + count);
  rows.reserve(count);
  for (std::size_t i = 0; i < count; ++i) rows.push_back(found[i].first);
  // Complete only if these rows are the whole chain of the key: it ends at the key table's
  // latest row (whose entry table_find_latest checked) and every link joins two of them. A
  // (key, epoch) appended twice, an epoch missing from the hint or a candidate of another key
  // leaves the set different from the chain, and fails here.
  if (rows.empty() || rows.back() != latest) return std::nullopt;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (prev(rows[i], false) != (i == 0 ? kNone : rows[i - 1])) return std::nullopt;
  }
  if (epochs != nullptr) {
    epochs->reserve(count);
    for (std::size_t i = 0; i < count; ++i) epochs->push_back(found[i].second);
  }
  return rows;
}

std::vector<std::uint64_t> KeyQuery::history(std::uint64_t key,
                                             std::vector<std::uint64_t>* epochs) const {
  std::vector<std::uint64_t> rows;
  if (auto by_epochs = history_by_epochs(key, epochs)) {
    rows = std::move(*by_epochs);
  } else {
    for (std::uint64_t r = table_find_latest(key); r != kNone; r = prev(r, false)) {
      rows.push_back(r);
    }
    std::reverse(rows.begin(), rows.end());
    if (epochs != nullptr) {
      epochs->clear();
      for (const std::uint64_t r : rows) __builtin_prefetch(entries_ + r);  // Loads overlap.
      for (const std::uint64_t r : rows) epochs->push_back(entries_[r].epoch);
    }
  }
  for (std::uint64_t r = limit_; r < snapshot_; ++r) {
    if (entries_[r].key != key) continue;
    rows.push_back(r);
    if (epochs != nullptr) epochs->push_back(entries_[r].epoch);
  }
  return rows;
}

std::vector<std::uint64_t> KeyQuery::epoch_rows(std::uint64_t epoch) const {
  std::vector<std::uint64_t> rows;
  const std::uint64_t latest = table_epoch_latest(epoch);
  if (latest != kNone) {
    const std::uint64_t count = ordinal(latest);
    if (count == 0 || count > latest + 1) {
      corrupt(index_->path(), "chain record of row " + std::to_string(latest) + " claims " +
                                  std::to_string(count) + " rows of its epoch");
    }
    rows.resize(count);
    std::uint64_t r = latest;
    for (std::uint64_t i = rows.size(); i-- > 0;) {
      if (r == kNone)
        corrupt(index_->path(),
                "the chain of epoch " + std::to_string(epoch) + " is shorter than its ordinal");
      rows[i] = r;
      r = prev(r, true);
    }
    if (r != kNone) {
      corrupt(index_->path(),
              "the chain of epoch " + std::to_string(epoch) + " is longer than its ordinal");
    }
  }
  for (std::uint64_t r = limit_; r < snapshot_; ++r) {
    if (entries_[r].epoch == epoch) rows.push_back(r);
  }
  return rows;
}

std::vector<EpochCount> KeyQuery::epochs() const {
  std::unordered_map<std::uint64_t, std::uint64_t> counts;
  std::uint64_t indexed = 0;  // Rows of [0, limit_) the chains count.
  if (limit_ > 0) {
    const std::uint64_t* slots = index_->epoch_slots();
    for (std::uint64_t i = 0; i < index_->sizes_.epoch_slots; ++i) {
      const std::uint64_t word = load(slots[i]);
      if (word == 0) continue;
      const std::uint64_t r = below_limit(slot_row(word), true);
      if (r == kNone) continue;
      const std::uint64_t count = ordinal(r);
      if (count == 0 || count > r + 1) {
        corrupt(index_->path(), "chain record of row " + std::to_string(r) + " claims " +
                                    std::to_string(count) + " rows of its epoch");
      }
      counts[entries_[r].epoch] += count;
      indexed += count;
    }
  }
  // Every indexed row is in one epoch's chain: tables lost or zeroed under an intact header
  // count fewer (a review: info said "epochs 0" of a 300-row store). Checked here, as the
  // callers fall back to a scan on kCorruption (store_keys.h, with_key_query).
  if (indexed != limit_) {
    corrupt(index_->path(), "its epochs' chains count " + std::to_string(indexed) +
                                " rows of the " + std::to_string(limit_) + " it indexes");
  }
  for (std::uint64_t r = limit_; r < snapshot_; ++r) ++counts[entries_[r].epoch];
  std::vector<EpochCount> out;
  out.reserve(counts.size());
  for (const auto& [epoch, rows] : counts) out.push_back({epoch, rows});
  std::sort(out.begin(), out.end(),
            [](const EpochCount& a, const EpochCount& b) { return a.epoch < b.epoch; });
  return out;
}

std::uint64_t KeyQuery::distinct_keys() const {
  std::uint64_t count = 0;
  if (limit_ > 0) {
    const std::uint64_t* slots = index_->key_slots();
    for (std::uint64_t i = 0; i < index_->sizes_.key_slots; ++i) {
      const std::uint64_t word = load(slots[i]);
      if (word != 0 && below_limit(slot_row(word), false) != kNone) ++count;
    }
    if (count == 0) {  // Indexed rows have at least one key: a lost or zeroed table.
      corrupt(index_->path(),
              "its key table holds no key of the " + std::to_string(limit_) + " rows it indexes");
    }
  }
  std::unordered_map<std::uint64_t, bool> seen;
  for (std::uint64_t r = limit_; r < snapshot_; ++r) {
    const std::uint64_t key = entries_[r].key;
    if (seen.try_emplace(key, true).second && table_find_latest(key) == kNone) ++count;
  }
  return count;
}

void KeyQuery::find_many(std::span<const std::uint64_t> keys, std::span<const std::uint64_t> epochs,
                         std::int64_t* out) const {
  const bool by_pair = !epochs.empty();
  const bool one_epoch = epochs.size() == 1 && keys.size() != 1;
  auto epoch_of = [&](std::size_t i) { return one_epoch ? epochs[0] : epochs[i]; };
  const std::size_t n = keys.size();
  if (limit_ > 0) {
    const std::uint64_t* table = by_pair ? index_->pair_slots() : index_->key_slots();
    const std::uint64_t mask = (by_pair ? index_->sizes_.pair_slots : index_->sizes_.key_slots) - 1;
    const std::uint64_t words = by_pair ? kPairSlotWords : 1;  // Per slot.
    constexpr std::size_t kBlock = 32;
    constexpr std::uint64_t kDone = kNone - 1;  // Settled by the first slot: out[i] is set.
    std::uint64_t hash[kBlock], candidate[kBlock];
    for (std::size_t begin = 0; begin < n; begin += kBlock) {
      const std::size_t count = std::min(kBlock, n - begin);
      // Stage 1: hash the block and prefetch each first slot.
      for (std::size_t j = 0; j < count; ++j) {
        const std::uint64_t kh = key_hash(keys[begin + j], index_->hash_seed_);
        hash[j] = by_pair ? pair_hash(kh, epoch_of(begin + j)) : kh;
        __builtin_prefetch(table + words * (hash[j] & mask));
      }
      // Stage 2: read the first slots. A pair slot settles its lookup by itself (a hit below
      // the limit, or empty: none); a key slot's row is a candidate whose entry is prefetched.
      for (std::size_t j = 0; j < count; ++j) {
        const std::size_t i = begin + j;
        candidate[j] = kNone;
        if (by_pair) {
          const std::uint64_t* slot = table + kPairSlotWords * (hash[j] & mask);
          const std::uint64_t word = load(slot[1]);
          if (word == 0) {
            out[i] = -1;
            candidate[j] = kDone;
          } else if (pair_epoch(word) == pair_field(epoch_of(i)) &&
                     pair_epoch(word) != kPairEpochLarge && load_relaxed(slot[0]) == keys[i] &&
                     slot_row(word) < limit_) {
            out[i] = static_cast<std::int64_t>(slot_row(word));
            candidate[j] = kDone;
          }
          continue;
        }
        const std::uint64_t word = load(table[hash[j] & mask]);
        if (word != 0 && slot_tag(word) == hash[j] >> kSlotRowBits && slot_row(word) < limit_) {
          candidate[j] = slot_row(word);
          __builtin_prefetch(entries_ + candidate[j]);
        }
      }
      // Stage 3: resolve; anything not settled by its first slot takes the full path.
      for (std::size_t j = 0; j < count; ++j) {
        const std::size_t i = begin + j;
        const std::uint64_t c = candidate[j];
        if (c == kDone) continue;
        if (c != kNone && !by_pair && entries_[c].key == keys[i]) {
          out[i] = static_cast<std::int64_t>(c);
          continue;
        }
        const std::uint64_t row =
            by_pair ? table_find(keys[i], epoch_of(i)) : table_find_latest(keys[i]);
        out[i] = row == kNone ? -1 : static_cast<std::int64_t>(row);
      }
    }
  } else {
    std::fill(out, out + n, -1);
  }
  if (snapshot_ <= limit_) return;
  // Rows past the index: one pass over them builds a map, so the batch costs O(gap + n).
  auto pair_id = [](std::uint64_t key, std::uint64_t epoch) {
    return key_index_mix(key) ^ std::rotl(epoch * 0x9e3779b97f4a7c15ull, 17);
  };
  std::unordered_multimap<std::uint64_t, std::uint64_t> latest;  // hash -> rows, any order
  for (std::uint64_t r = limit_; r < snapshot_; ++r) {
    const IndexEntry& e = entries_[r];
    latest.emplace(by_pair ? pair_id(e.key, e.epoch) : e.key, r);
  }
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t id = by_pair ? pair_id(keys[i], epoch_of(i)) : keys[i];
    auto [it, end] = latest.equal_range(id);
    for (; it != end; ++it) {
      const IndexEntry& e = entries_[it->second];
      if (e.key != keys[i] || (by_pair && e.epoch != epoch_of(i))) continue;
      if (static_cast<std::int64_t>(it->second) > out[i]) out[i] = it->second;
    }
  }
}

}  // namespace embstore::detail
