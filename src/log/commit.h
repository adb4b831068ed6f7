// commit.h — committing a prepared batch to the log, writer lock held: grow the files, pick the
// era, write the rows and their index entries, publish the commit counter.
#pragma once

#include <cstdint>
#include <functional>

#include "embstore/error.h"
#include "log/batch.h"
#include "storage/store_files.h"

namespace embstore::detail {

// Called when a flush the commit needs fails; must throw (the Writer poisons itself).
using SyncFailure = std::function<void(const Error&)>;

// Appends `batch` at the current commit counter and publishes it; returns its first row. The
// caller holds the writer lock and `synced_era` (the highest era this handle has seen durable).
// kFull past 2^40 rows or when the files cannot grow. A failed write leaves committed where it
// was: the rows stay unpublished and the next append writes over them.
std::uint64_t commit_batch(StoreFiles& files, const PreparedBatch& batch, std::uint64_t& synced_era,
                           const SyncFailure& on_sync_failure);

}  // namespace embstore::detail
