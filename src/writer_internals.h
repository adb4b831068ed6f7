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
};

}  // namespace embstore::detail
