// batch.h — a batch of rows prepared for the log: validated, converted to the store's dtype and
// hashed, all before the writer lock is taken (only what needs the row number waits for it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "embstore/writer.h"
#include "format/checksum.h"
#include "format/format.h"

namespace embstore::detail {

struct PreparedBatch {
  std::uint64_t rows = 0;
  std::span<const std::uint64_t> keys;
  const std::uint64_t* epochs = nullptr;  // One per row, or null: every row has single_epoch.
  std::uint64_t single_epoch = 0;
  const std::byte* source = nullptr;  // Row i at source + i * stride, in the store's dtype.
  std::uint64_t stride = 0;
  const std::uint64_t* hashes = nullptr;  // payload_hash of each row.

  std::uint64_t epoch(std::uint64_t i) const {
    return epochs != nullptr ? epochs[i] : single_epoch;
  }
};

// Checks `rows` against the store's layout (kInvalidArgument naming `where`), converts float32
// rows for float16/bfloat16 stores (dtype_accepts) and hashes every row with `key`. The batch
// points into `rows` and into buffers of the calling thread, valid until its next call.
PreparedBatch prepare_batch(const Layout& layout, const RowHashKey& key, const std::string& where,
                            std::span<const std::uint64_t> keys, const std::uint64_t* epochs,
                            std::uint64_t single_epoch, const ConstMatrix& rows);

}  // namespace embstore::detail
