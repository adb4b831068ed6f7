// store_files.h — one open store: its validated header, shared state page, and the data and
// index files mapped inside their reservations. Shared by Writer and Reader.
//
// Lifetime: the mappings live as long as the StoreFiles object; Readers hold it in a shared_ptr
// so views can outlive the Reader. Not thread-safe for map_rows()/grow_to(); callers serialize
// them (the Writer under its mutex, the Reader by contract). All other members are read-only
// after open and safe from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "embstore/options.h"
#include "embstore/store.h"
#include "format/checksum.h"
#include "format/format.h"
#include "platform/mapping.h"
#include "platform/os.h"
#include "storage/state.h"

namespace embstore::detail {

// The address-space budget for a store's mappings: `requested`, or $EMBSTORE_MAP_BYTES, or
// kDefaultMapBytes. Throws kInvalidArgument for an unparsable environment value.
std::uint64_t resolve_map_bytes(std::uint64_t requested);

// `path` without trailing slashes ("/" stays "/"): the store's name in every message.
std::string strip_trailing_slashes(std::string path);

class StoreFiles {
 public:
  // Opens and validates `dir`. Maps nothing of the data files yet. Throws kNotFound for a path
  // that is not a store, kUnsupportedVersion, kCorruption naming the file and field.
  static std::unique_ptr<StoreFiles> open(const std::string& dir, os::Access access,
                                          std::uint64_t map_bytes);
  ~StoreFiles();
  StoreFiles(const StoreFiles&) = delete;
  StoreFiles& operator=(const StoreFiles&) = delete;

  const Layout& layout() const { return layout_; }
  const RowHashKey& hash_key() const { return hash_key_; }
  SharedState& state() { return state_; }
  const SharedState& state() const { return state_; }
  const std::string& dir() const { return dir_; }
  const std::string& data_path() const { return data_path_; }
  const std::string& index_path() const { return index_path_; }
  const std::string& header_path() const { return header_path_; }
  int data_fd() const { return data_fd_; }
  int index_fd() const { return index_fd_; }
  int header_fd() const { return header_fd_; }

  // Most rows the reserved address space can map.
  std::uint64_t reserved_rows() const { return index_->reserved_bytes() / kIndexEntryBytes; }
  // Rows the current mappings cover.
  std::uint64_t mapped_rows() const { return mapped_rows_; }
  // Maps both files far enough to cover `rows` rows. Checks the files really are that long
  // first (kCorruption naming the file otherwise), so no access can fault past EOF.
  void map_rows(std::uint64_t rows);
  // Writer only, writer lock held: allocates whole segments so at least `rows` rows fit, maps
  // them and publishes the new capacity. kFull on ENOSPC/EFBIG or past map_bytes; on failure no
  // counter changes.
  void grow_to(std::uint64_t rows);
  // Rows the files on disk can hold right now (from their sizes).
  std::uint64_t rows_files_hold() const;

  std::byte* row_ptr(std::uint64_t row) const { return data_->base() + row * layout_.record_bytes; }
  IndexEntry* entry_ptr(std::uint64_t row) const {
    return reinterpret_cast<IndexEntry*>(index_->base()) + row;
  }
  bool row_valid(std::uint64_t row) const;
  // The end of the longest run of whole, valid batches starting at `begin` (a batch boundary)
  // within [begin, end): a batch counts only if all its rows, up to the one flagged
  // kEntryBatchEnd, validate. Rows must be mapped.
  std::uint64_t valid_batch_prefix(std::uint64_t begin, std::uint64_t end) const;

  bool same_boot() const;  // The state's boot id is the machine's current boot id.
  StoreInfo info() const;

 private:
  StoreFiles() = default;

  std::string dir_, header_path_, data_path_, index_path_;
  os::Access access_ = os::Access::kReadOnly;
  Layout layout_{};
  RowHashKey hash_key_{0};  // From layout_.seed.
  int header_fd_ = -1, data_fd_ = -1, index_fd_ = -1;
  void* state_map_ = nullptr;
  SharedState state_;
  std::unique_ptr<ReservedMapping> data_, index_;
  std::uint64_t mapped_rows_ = 0;
};

}  // namespace embstore::detail
