// writer_internals.h — Writer routes for the library's own callers (the Python binding's async
// queue), not part of the API: each relies on a promise that only in-tree code can keep.
#pragma once

#include <cstdint>
#include <span>

#include "embstore/writer.h"

namespace embstore::detail {

struct WriterInternals {
  // Writer::append of rows in memory that nothing changes until the call returns
  // (RowMemory::kPrivate, log/batch.h): packed rows are hashed and written where they are, with
  // no copy into the thread's staging buffer. `epochs`: one per row, or empty for `epoch`.
  // A caller whose rows change during the call stores rows whose checksums describe other bytes,
  // which verify() reports damaged and recovery cuts: only memory the caller alone writes, such
  // as the async queue's ring, may come here.
  static std::uint64_t append_private(Writer& writer, std::span<const std::uint64_t> keys,
                                      std::span<const std::uint64_t> epochs, std::uint64_t epoch,
                                      const ConstMatrix& rows);
  // True when the writer's next append of the caller's large packed rows will hash them before
  // the lock (HashAt::kStaged, log/batch.h), false when in the page cache after the write: the
  // rule is Writer::Impl::hash_at() in writer.cc. For tests.
  static bool hashes_before_lock(const Writer& writer);
  // The same for an append of the caller's `rows`: also true when HashAt does not decide for
  // them (hash_at_applies, log/batch.h). For tests.
  static bool hashes_before_lock(const Writer& writer, const ConstMatrix& rows);
  // Runs of the writer's indexer thread finished so far (index/background_indexer.h): appends
  // whose indexing was left to it. 0 for a store without a key index. For tests.
  static std::uint64_t background_index_runs(const Writer& writer);
  // Sets the smallest batch (bytes of rows) whose indexing the writer leaves to its indexer
  // thread while it looks alone (kIndexLaterMinBytes in writer.cc; 0: every batch), so that
  // tests with small batches run that path too. For tests.
  static void set_index_later_min_bytes(Writer& writer, std::uint64_t bytes);
};

}  // namespace embstore::detail
