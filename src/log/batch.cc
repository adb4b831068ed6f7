#include "log/batch.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "embstore/error.h"
#include "format/convert.h"
#include "format/convert_fast.h"

namespace embstore::detail {

std::byte* staging_buffer(std::vector<std::byte>& storage, std::uint64_t bytes,
                          std::uint64_t file_offset) {
  size_reused(storage, bytes + 2 * kPageBytes, kStageBytes + 2 * kPageBytes);
  const auto base = reinterpret_cast<std::uintptr_t>(storage.data());
  const std::uintptr_t page = (base + kPageBytes - 1) & ~std::uintptr_t{kPageBytes - 1};
  return reinterpret_cast<std::byte*>(page + file_offset % kPageBytes);
}

bool hash_at_applies(const Layout& layout, const ConstMatrix& rows, RowMemory memory) {
  const std::uint64_t record_bytes = layout.record_bytes;
  return memory == RowMemory::kCallers && rows.dtype == layout.dtype && rows.dim == layout.dim &&
         (rows.row_stride_bytes == 0 || rows.row_stride_bytes == record_bytes) &&
         rows.rows >= read_back_rows(record_bytes);
}

namespace {

// Refuses row i of a batch when a finite float32 value of it (`in`, dim of them) became an
// infinity converted to the store's float16 or bfloat16 (`out`): storing it would not store what
// the caller passed. Infinite input stays infinite, as any other value is stored as given.
template <typename Invalid>
void refuse_overflow(const Invalid& invalid, DType dtype, std::uint64_t i, const float* in,
                     const std::uint16_t* out, std::uint32_t dim) {
  const bool half = dtype == DType::kFloat16;
  const std::size_t column = first_overflow(in, out, dim, half ? kHalfInfinity : kBFloat16Infinity);
  if (column == dim) return;
  char value[32];
  std::snprintf(value, sizeof value, "%.9g", static_cast<double>(in[column]));
  invalid(std::string("row ") + std::to_string(i) + " of the batch, column " +
          std::to_string(column) + ": " + value + " is beyond " + std::string(dtype_name(dtype)) +
          "'s range (largest " + (half ? "65504" : "3.3895314e+38") +
          ") and would be stored as infinity; scale or clip it, or use a wider dtype");
}

// Converts row i of a batch (`row`, dim float32 values) to `dtype` (float16 or bfloat16) at
// `out`, refusing it as refuse_overflow() says. A ConstMatrix sets no alignment: a row that
// does not start on a float's boundary is copied to one first (the conversions load floats).
template <typename Invalid>
void convert_row(const Invalid& invalid, DType dtype, std::uint64_t i, const std::byte* row,
                 std::uint16_t* out, std::uint32_t dim) {
  const float* in = reinterpret_cast<const float*>(row);
  if (reinterpret_cast<std::uintptr_t>(row) % alignof(float) != 0) {
    thread_local std::vector<float> aligned;
    aligned.resize(dim);
    std::memcpy(aligned.data(), row, std::size_t{dim} * sizeof(float));
    in = aligned.data();
  }
  const bool infinite = dtype == DType::kFloat16 ? convert_to_half_fast(in, out, dim)
                                                 : convert_to_bfloat16_fast(in, out, dim);
  if (infinite) refuse_overflow(invalid, dtype, i, in, out, dim);
}

}  // namespace

void convert_rows(const ConstMatrix& rows, DType dtype, std::byte* dest, const std::string& where) {
  auto invalid = [&](const std::string& what) {
    throw Error(ErrorCode::kInvalidArgument, where + ": append: " + what);
  };
  const std::uint64_t input_row_bytes = std::uint64_t{rows.dim} * sizeof(float);
  const std::uint64_t stride = rows.row_stride_bytes == 0 ? input_row_bytes : rows.row_stride_bytes;
  const auto* source = static_cast<const std::byte*>(rows.data);
  for (std::uint64_t i = 0; i < rows.rows; ++i) {
    convert_row(invalid, dtype, i, source + i * stride,
                reinterpret_cast<std::uint16_t*>(dest + i * std::uint64_t{rows.dim} * 2), rows.dim);
  }
}

PreparedBatch prepare_batch(const Layout& layout, const RowHashKey& key, const std::string& where,
                            std::span<const std::uint64_t> keys, const std::uint64_t* epochs,
                            std::uint64_t single_epoch, const ConstMatrix& rows, RowMemory memory,
                            HashAt hash_at) {
  auto invalid = [&](const std::string& what) {
    throw Error(ErrorCode::kInvalidArgument, where + ": append: " + what);
  };
  const std::uint64_t n = rows.rows;
  if (keys.size() != n) {
    invalid(std::to_string(keys.size()) + " keys for " + std::to_string(n) + " rows");
  }
  PreparedBatch batch;
  // The dim and dtype are checked for an empty batch too: a caller whose first batch is empty
  // hears of a wrong one then, not at a later batch.
  if (!is_valid_dtype(static_cast<std::uint8_t>(rows.dtype))) {
    invalid("rows.dtype " + std::to_string(static_cast<int>(rows.dtype)) + " is not a known dtype");
  }
  if (rows.dim != layout.dim) {
    invalid("rows have dim " + std::to_string(rows.dim) + " but the store's dim is " +
            std::to_string(layout.dim));
  }
  if (!dtype_accepts(layout.dtype, rows.dtype)) {
    const bool takes_float32 = dtype_accepts(layout.dtype, DType::kFloat32);
    invalid("cannot append " + std::string(dtype_name(rows.dtype)) + " rows to a " +
            std::string(dtype_name(layout.dtype)) + " store (only " +
            std::string(dtype_name(layout.dtype)) +
            (takes_float32 && layout.dtype != DType::kFloat32 ? " or float32" : "") +
            " is accepted)");
  }
  if (n == 0) return batch;
  if (rows.data == nullptr) invalid("rows.data is null");
  const std::uint64_t input_row_bytes = std::uint64_t{rows.dim} * dtype_size(rows.dtype);
  const std::uint64_t stride = rows.row_stride_bytes == 0 ? input_row_bytes : rows.row_stride_bytes;
  if (stride < input_row_bytes) {
    invalid("row_stride_bytes " + std::to_string(stride) + " is less than a row's " +
            std::to_string(input_row_bytes) + " bytes");
  }
  if (n > kMaxRows) invalid(std::to_string(n) + " rows in one batch is beyond 2^40");
  const std::uint64_t record_bytes = layout.record_bytes;
  // 2^40 rows of up to 2^26 bytes may still be more than 2^64 bytes: n * record_bytes (the
  // staging buffer, the rows' place in the files) or n * stride (the caller's rows) would wrap,
  // so such a batch is refused before either sizes anything.
  constexpr std::uint64_t kMaxBytes = std::numeric_limits<std::uint64_t>::max();
  if (n > kMaxBytes / record_bytes || n > kMaxBytes / stride) {
    invalid(std::to_string(n) + " rows of " + std::to_string(record_bytes) + " bytes, " +
            std::to_string(stride) + " bytes apart in the input, are beyond 2^64 bytes");
  }
  thread_local std::vector<std::byte> staging;
  thread_local std::vector<std::uint64_t> hashes;
  batch.rows = n;
  batch.keys = keys;
  batch.epochs = epochs;
  batch.single_epoch = single_epoch;
  batch.source = static_cast<const std::byte*>(rows.data);
  batch.stride = stride;
  const bool convert = rows.dtype != layout.dtype;
  if (!convert && memory == RowMemory::kPrivate && stride == record_bytes) {
    size_reused(hashes, n, kUsualElements<std::uint64_t>);
    for (std::uint64_t i = 0; i < n; ++i) {
      hashes[i] = payload_hash(batch.source + i * record_bytes, record_bytes, key);
    }
    batch.hashes = hashes.data();
    return batch;
  }
  if (hash_at == HashAt::kPageCache && hash_at_applies(layout, rows, memory)) {
    batch.hash_written = true;  // Written from the caller's array, read back and hashed.
    return batch;
  }
  if (!convert && n * record_bytes > kStageBytes) return batch;  // Staged piece by piece.
  // Where the rows will land is known only under the lock: the staged rows start on a page,
  // as they land for every row size that is a multiple of 64 bytes (and most batches of others).
  std::byte* const staged = staging_buffer(staging, n * record_bytes, 0);
  size_reused(hashes, n, kUsualElements<std::uint64_t>);
  if (convert) {
    for (std::uint64_t i = 0; i < n; ++i) {
      std::byte* row = staged + i * record_bytes;
      convert_row(invalid, layout.dtype, i, batch.source + i * stride,
                  reinterpret_cast<std::uint16_t*>(row), rows.dim);
      hashes[i] = payload_hash(row, record_bytes, key);
    }
  } else {
    copy_and_hash(staged, batch.source, stride, n, record_bytes, key, hashes.data());
  }
  batch.source = staged;
  batch.stride = record_bytes;
  batch.hashes = hashes.data();
  return batch;
}

void copy_and_hash(std::byte* dest, const std::byte* source, std::uint64_t stride,
                   std::uint64_t count, std::uint64_t record_bytes, const RowHashKey& key,
                   std::uint64_t* hashes) {
  // Row by row, so each is hashed while it is still in the first-level cache.
  for (std::uint64_t i = 0; i < count; ++i) {
    std::byte* row = dest + i * record_bytes;
    std::memcpy(row, source + i * stride, record_bytes);
    hashes[i] = payload_hash(row, record_bytes, key);
  }
}

}  // namespace embstore::detail
