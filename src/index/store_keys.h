// store_keys.h — glue between an open store (StoreFiles) and its key index, shared by Writer
// and Reader so each needs only a few calls.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>

#include "embstore/error.h"
#include "embstore/store.h"
#include "index/key_index.h"
#include "index/key_index_handle.h"
#include "storage/store_files.h"

namespace embstore::detail {

KeyIndexIdentity key_index_identity(const StoreFiles& files);
std::unique_ptr<KeyIndexHandle> make_key_index_handle(const StoreFiles& files, os::Access access);

// Runs f(const KeyQuery&) for rows [0, snapshot) through `index` (may be null: a scan). If the
// index turns out inconsistent (kCorruption from the key index file), marks it damaged in
// `handle` and runs f again on a scan of the offset index, so callers always get a correct
// answer; if the file was replaced by a newer generation before this Reader mapped all it needs
// (kNotFound), f runs on a scan too, and the next refresh() takes the newer file; and so it does
// when a slot names a row appended after the snapshot whose chain record lies past the address
// space this handle's map_bytes leaves the chain (kFull): the snapshot is answered all the same.
// `index` is what the caller took from handle.current() (Readers keep it per snapshot).
template <typename F>
auto with_key_query(KeyIndexHandle& handle, const KeyIndexFile* index, const StoreFiles& files,
                    std::uint64_t snapshot, F&& f) {
  if (index != nullptr) {
    try {
      return f(KeyQuery(index, files.entry_ptr(0), snapshot));
    } catch (const Error& error) {
      if (error.code() == ErrorCode::kCorruption) {
        handle.mark_damaged(error.what());
      } else if (error.code() != ErrorCode::kNotFound && error.code() != ErrorCode::kFull) {
        throw;
      }
    }
  }
  return f(KeyQuery(nullptr, files.entry_ptr(0), snapshot));
}

template <typename F>
auto with_key_query(KeyIndexHandle& handle, const StoreFiles& files, std::uint64_t snapshot,
                    F&& f) {
  const auto index = handle.current();
  return with_key_query(handle, index.get(), files, snapshot, std::forward<F>(f));
}

// Fills info's key statistics for rows [0, snapshot).
void fill_key_info(KeyIndexHandle& handle, const StoreFiles& files, std::uint64_t snapshot,
                   StoreInfo& info);

}  // namespace embstore::detail
