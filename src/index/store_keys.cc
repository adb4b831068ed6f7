#include "index/store_keys.h"

#include <cstring>

namespace embstore::detail {

KeyIndexIdentity key_index_identity(const StoreFiles& files) {
  KeyIndexIdentity id;
  std::memcpy(id.store_id, files.layout().store_id, sizeof(id.store_id));
  id.store_generation = files.file_generation();
  id.seed = files.layout().seed;
  id.max_rows = files.budget_rows();
  return id;
}

std::unique_ptr<KeyIndexHandle> make_key_index_handle(const StoreFiles& files, os::Access access) {
  const bool writer = access == os::Access::kReadWrite;
  // The handle lives no longer than `files` (the Writer releases it first).
  return std::make_unique<KeyIndexHandle>(
      files.dir(), key_index_identity(files), files.state().key_generation_word(), access,
      writer ? nullptr : files.state().store_generation_word(),
      writer ? std::function<void()>([&files] { files.check_at_path(); })
             : std::function<void()>());
}

void fill_key_info(KeyIndexHandle& handle, const StoreFiles& files, std::uint64_t snapshot,
                   StoreInfo& info) {
  with_key_query(handle, files, snapshot, [&](const KeyQuery& query) {
    info.distinct_keys = query.distinct_keys();
    info.epochs.clear();
    for (const EpochCount& e : query.epochs()) info.epochs.push_back({e.epoch, e.rows});
    const std::uint64_t scanned = snapshot - query.indexed_limit();
    info.key_index = files.layout().key_index || handle.has_current()
                         ? handle.status()
                         : "none: the store was created without a key index";
    info.key_index_used = handle.has_current();
    if (scanned > 0) {
      info.key_index += "; " + std::to_string(scanned) + " of " + std::to_string(snapshot) +
                        " rows answered by scan";
    }
    return 0;
  });
}

}  // namespace embstore::detail
