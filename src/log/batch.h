// batch.h — a batch of rows prepared for the log before the writer lock is taken: validated,
// converted to the store's dtype, copied and hashed.
//
// The checksum rule: a row's hash is computed over the bytes that are written, from memory only
// the appending thread can change — never over the caller's array, which another thread of the
// caller may rewrite during the call (a row stored under the checksum of other bytes is a damaged
// row, and recovery cuts it). So the rows are copied into a buffer of the thread and hashed there
// (converted rows where they were converted), and that buffer is what commit_batch() writes. A
// batch larger than kStageBytes that needs no conversion is not copied whole here:
// commit_batch() copies, hashes and writes it in pieces of that size, under the writer lock.
// (A converted batch is converted whole, at any size.) Rows in memory that only the appending
// thread can change (RowMemory::kPrivate: the Python binding's async queue, which copied them
// there itself) are already such a buffer: packed ones are hashed where they are and written from
// there, with no second copy.
//
// The other way to keep the rule (HashAt::kPageCache): packed caller's rows of at least one
// read-back piece (read_back_rows()), unconverted, are not copied here at all. commit_batch()
// writes them with pwrite straight from the caller's array, then reads the bytes back from the page
// cache (pread, kReadBackBytes at a time, into a buffer of the thread) and hashes them there:
// under the writer lock nothing else writes there, so the hash describes exactly what is stored,
// whatever the caller's threads do to their array meanwhile. That saves the copy before the
// write (bench/RESULTS.md, "Hashing what was written"), but the read and the hash then run under
// the lock, so a writer stages instead whenever the lock looks shared (the Writer picks:
// hash_at() in writer.cc).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "embstore/writer.h"
#include "format/checksum.h"
#include "format/format.h"

namespace embstore::detail {

// The most a thread keeps staged for a batch that needs no conversion: batches up to this size
// are copied whole before the lock.
inline constexpr std::uint64_t kStageBytes = 8 * 1024 * 1024;
// From this many bytes of rows (a page), a commit writes them with pwrite rather than through the
// mapping (log/commit.cc says why). Smaller batches touch at most two pages of the mapping.
inline constexpr std::uint64_t kRowsSyscallMinBytes = 4 * 1024;
// HashAt::kPageCache reads written rows back this many bytes at a time (at least one row): the
// piece stays in the second-level cache while it is hashed.
inline constexpr std::uint64_t kReadBackBytes = 256 * 1024;
// The rows of one read-back piece: what write_rows() (log/commit.cc) reads back per pread, and
// the fewest a batch needs for HashAt::kPageCache to apply. Reading back copies as many bytes as
// staging (the pread after the write instead of a copy before the lock), into a buffer small
// enough to stay in the cache; it costs two system calls staging does not make (the probe for
// waiting writers, hash_at() in writer.cc, and the pread), 1.5-2 us each on some VMs. Below one
// piece they cost more than the smaller buffer saves (bench/RESULTS.md, "Short batches are
// staged").
inline std::uint64_t read_back_rows(std::uint64_t record_bytes) {
  return kReadBackBytes >= record_bytes ? kReadBackBytes / record_bytes : 1;
}

// A buffer in `storage` (grown as needed, contents not kept) for `bytes` of rows to be written
// with pwrite to a file offset that is `file_offset` modulo kPageBytes: it starts at that same
// offset within a page. The kernel copies into the page cache, page by page, much slower when
// its source sits a few bytes off the destination's offset in the page: as a heap block does, 16
// bytes into its page (4 writers staging there ran at 0.67-0.88x one writer, against 0.90-1.02x
// from page-aligned buffers; bench/RESULTS.md, "Staging buffers start where the rows land").
// Valid until the next call with the same storage.
std::byte* staging_buffer(std::vector<std::byte>& storage, std::uint64_t bytes,
                          std::uint64_t file_offset);

// Sizes a buffer a thread reuses from batch to batch to `n` elements. One left more than twice
// as large as `n` and as `usual` (the size most batches need) by an unusually large batch is
// released first: a thread does not keep the largest batch's memory (a staged copy of it) for as
// long as it lives.
template <typename T>
void size_reused(std::vector<T>& buffer, std::uint64_t n, std::uint64_t usual) {
  if (buffer.capacity() > 2 * std::max(n, usual)) std::vector<T>().swap(buffer);
  buffer.resize(n);
}
// What size_reused() calls usual: the bytes of a staged piece (kStageBytes), as elements.
template <typename T>
inline constexpr std::uint64_t kUsualElements = kStageBytes / sizeof(T);

// Who may change the rows while the batch is prepared and committed (the rule above).
enum class RowMemory {
  kCallers,  // The caller's: another thread may rewrite them at any moment. Copied, then hashed.
  kPrivate,  // Changed by nothing until the append returns. Hashed in place when packed.
};

// Where a packed, unconverted batch of the caller's rows of read_back_rows() or more is
// hashed (the rules above). Other batches are staged or private whatever this says.
enum class HashAt {
  kStaged,     // Copied into a buffer of the thread and hashed there, before the lock.
  kPageCache,  // Written from the caller's array, then read back and hashed under the lock.
};

struct PreparedBatch {
  std::uint64_t rows = 0;
  std::span<const std::uint64_t> keys;
  const std::uint64_t* epochs = nullptr;  // One per row, or null: every row has single_epoch.
  std::uint64_t single_epoch = 0;
  const std::byte* source = nullptr;  // Row i at source + i * stride, in the store's dtype.
  std::uint64_t stride = 0;
  // The payload_hash of each row, computed over `source`: a packed buffer of the thread, or
  // the packed private rows of RowMemory::kPrivate. Null when `source` is the caller's memory:
  // commit_batch() hashes the rows as it reads them back (hash_written), or else copies and hashes
  // them piece by piece (an unconverted batch larger than kStageBytes).
  const std::uint64_t* hashes = nullptr;
  // HashAt::kPageCache applies: `source` is the caller's packed rows, to be written from there,
  // read back from the page cache and hashed.
  bool hash_written = false;

  std::uint64_t epoch(std::uint64_t i) const {
    return epochs != nullptr ? epochs[i] : single_epoch;
  }
};

// Whether HashAt decides for `rows` (validated or not): the caller's (kCallers), in the store's
// dtype, packed, read_back_rows() or more. prepare_batch() applies `hash_at` only then; the
// Writer asks whether the lock is shared only then.
bool hash_at_applies(const Layout& layout, const ConstMatrix& rows, RowMemory memory);

// Checks `rows` against the store's layout (kInvalidArgument naming `where`), converts float32
// rows for float16/bfloat16 stores (dtype_accepts), and copies and hashes the rows (the rules
// above; `hash_at` for the caller's large packed batches). The batch points into `rows` and into
// buffers of the calling thread, valid until its next call.
PreparedBatch prepare_batch(const Layout& layout, const RowHashKey& key, const std::string& where,
                            std::span<const std::uint64_t> keys, const std::uint64_t* epochs,
                            std::uint64_t single_epoch, const ConstMatrix& rows,
                            RowMemory memory = RowMemory::kCallers,
                            HashAt hash_at = HashAt::kStaged);

// Converts float32 rows (any row stride) to `dtype` (float16 or bfloat16), packed at `dest`
// (rows.rows x rows.dim elements): prepare_batch()'s conversion, refusing the batch as it does
// (kInvalidArgument "<where>: append: row i of the batch, column j: <value> is beyond ...") at
// the first row holding a finite value that would be stored as infinity. For callers that
// convert rows before they append them (the Python binding's async queue converts as it copies,
// so such a batch is refused by the call that passed it, not by a later append).
void convert_rows(const ConstMatrix& rows, DType dtype, std::byte* dest, const std::string& where);

// Copies `count` rows, `stride` bytes apart at `source`, packed to `dest`, and sets hashes[i] to
// the payload_hash of row i as it is in `dest`.
void copy_and_hash(std::byte* dest, const std::byte* source, std::uint64_t stride,
                   std::uint64_t count, std::uint64_t record_bytes, const RowHashKey& key,
                   std::uint64_t* hashes);

}  // namespace embstore::detail
