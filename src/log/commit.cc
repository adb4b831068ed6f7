#include "log/commit.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "platform/os.h"
#include "platform/testing.h"

namespace embstore::detail {
namespace {

// Two ways to put rows and index entries into the page cache, each the faster one for its size
// (the figures behind both thresholds: bench/RESULTS.md, "write path"):
//   - memcpy through the writer's mapping: no system call, but the first write-touch of each
//     fresh page faults (page allocation, zeroing, page_mkwrite): faster for small batches.
//   - pwritev on the file: one system call, and the kernel allocates each page-cache page and
//     copies into it without zeroing or mapping it, into file space already allocated (no block
//     allocation either): faster from kRowsSyscallMinBytes of rows and kEntriesSyscallMinBytes
//     of index entries on.
// Readers cannot tell them apart: both write the one page cache their mappings show, before the
// release store of `committed` that publishes the rows.
constexpr std::uint64_t kRowsSyscallMinBytes = 32 * 1024;
constexpr std::uint64_t kEntriesSyscallMinBytes = 4 * 1024;
// Pieces per system call: strided rows (one iovec each) and index entries (32 KiB), so the
// buffers they are gathered in stay small whatever the batch size.
constexpr std::uint64_t kRowsPerWritev = 1024;
constexpr std::uint64_t kEntriesPerWrite = 1024;

struct WritePlan {
  bool rows_by_syscall;
  bool entries_by_syscall;
};

WritePlan plan_writes(const StoreFiles& files, std::uint64_t n) {
  // Test builds may impose a combination (testing.h, EMBSTORE_WRITE_PATH).
  if (const testing::WritePath forced = EMBSTORE_WRITE_PATH(); forced.forced) {
    return {forced.rows_by_syscall, forced.entries_by_syscall};
  }
  return {n * files.layout().record_bytes >= kRowsSyscallMinBytes,
          n * sizeof(IndexEntry) >= kEntriesSyscallMinBytes};
}

// Copies n rows, `stride` bytes apart at `source`, into the data file from row `first`.
void write_rows(StoreFiles& files, std::uint64_t first, const std::byte* source,
                std::uint64_t stride, std::uint64_t n, bool by_syscall) {
  const std::uint64_t record_bytes = files.layout().record_bytes;
  const bool packed = stride == record_bytes;
  if (!by_syscall) {
    std::byte* dest = files.row_ptr(first);
    if (packed) {
      std::memcpy(dest, source, n * record_bytes);
    } else {
      for (std::uint64_t i = 0; i < n; ++i) {
        std::memcpy(dest + i * record_bytes, source + i * stride, record_bytes);
      }
    }
    return;
  }
  if (packed) {
    const os::Chunk all{source, n * record_bytes};
    os::write_chunks(files.data_fd(), &all, 1, first * record_bytes, files.data_path());
    return;
  }
  os::Chunk window[kRowsPerWritev];
  for (std::uint64_t begin = 0; begin < n; begin += kRowsPerWritev) {
    const std::uint64_t count = std::min(kRowsPerWritev, n - begin);
    for (std::uint64_t i = 0; i < count; ++i) {
      window[i] = {source + (begin + i) * stride, record_bytes};
    }
    os::write_chunks(files.data_fd(), window, count, (first + begin) * record_bytes,
                     files.data_path());
  }
}

// The era this handle may write entries with at `first`, made durable first (FORMAT.md, "era").
std::uint64_t writable_era(StoreFiles& files, std::uint64_t first, std::uint64_t& synced_era,
                           const SyncFailure& on_sync_failure) {
  SharedState& state = files.state();
  std::uint64_t era = state.era();
  // Entries at `first` that carry the current era were left by a writer killed before it
  // published: a newer era makes them lose to this append's entries on any later recovery.
  IndexEntry at_first;
  std::memcpy(&at_first, files.entry_ptr(first), sizeof(at_first));
  const bool stale = (at_first.row != 0 || at_first.checksum != 0) &&
                     entry_era(at_first.row) == (era & kEntryEraMask);
  if (stale) {
    ++era;
    state.set_era(era);
  }
  // No entry may carry an era the header on disk does not cover yet (another writer may have
  // raised it and died before flushing): otherwise recovery could pick an era already used.
  if (era != synced_era) {
    try {
      os::datasync(files.header_fd(), files.header_path());
    } catch (const Error& error) {
      on_sync_failure(error);
      throw;
    }
    synced_era = era;
  }
  return era;
}

void write_entries(StoreFiles& files, const PreparedBatch& batch, std::uint64_t first,
                   std::uint64_t era, bool by_syscall) {
  const std::uint64_t n = batch.rows;
  const std::uint64_t era_bits = (era & kEntryEraMask) << kEntryEraShift;
  const std::uint64_t seed = files.layout().seed;
  auto entry = [&](std::uint64_t i) {
    const std::uint64_t row = first + i;
    const std::uint64_t epoch = batch.epoch(i);
    const std::uint64_t row_field = row | era_bits | (i + 1 == n ? kEntryBatchEnd : 0);
    return IndexEntry{batch.keys[i], epoch, row_field,
                      entry_checksum(batch.hashes[i], batch.keys[i], epoch, row_field, seed)};
  };
  if (!by_syscall) {  // In place through the mapping.
    IndexEntry* entries = files.entry_ptr(first);
    for (std::uint64_t i = 0; i < n; ++i) {
      const IndexEntry e = entry(i);
      std::memcpy(entries + i, &e, sizeof(e));
      if (i == n / 2) EMBSTORE_CRASH_POINT("mid-index-write");
    }
    return;
  }
  // In pieces built in a buffer, one pwrite each. Test builds end the first piece after entry
  // n/2, so a crash at mid-index-write leaves the same half written as through the mapping.
  const std::uint64_t per_write =
      testing::kEnabled ? std::min(kEntriesPerWrite, n / 2 + 1) : kEntriesPerWrite;
  thread_local std::vector<IndexEntry> buffer;
  buffer.resize(std::min(n, per_write));
  for (std::uint64_t begin = 0; begin < n; begin += per_write) {
    const std::uint64_t count = std::min(per_write, n - begin);
    for (std::uint64_t i = 0; i < count; ++i) buffer[i] = entry(begin + i);
    os::write_all(files.index_fd(), buffer.data(), count * sizeof(IndexEntry),
                  (first + begin) * sizeof(IndexEntry), files.index_path());
    if (begin <= n / 2 && n / 2 < begin + count) EMBSTORE_CRASH_POINT("mid-index-write");
  }
}

}  // namespace

std::uint64_t commit_batch(StoreFiles& files, const PreparedBatch& batch, std::uint64_t& synced_era,
                           const SyncFailure& on_sync_failure) {
  SharedState& state = files.state();
  const std::uint64_t n = batch.rows;
  const std::uint64_t first = state.committed();
  if (first + n > kMaxRows) {
    throw Error(ErrorCode::kFull, files.dir() + ": the store holds " + std::to_string(first) +
                                      " rows; " + std::to_string(n) + " more exceed 2^40");
  }
  // Another process may have grown the files since this handle last looked.
  files.grow_to(first + n);
  const std::uint64_t era = writable_era(files, first, synced_era, on_sync_failure);
  const WritePlan plan = plan_writes(files, n);
  write_rows(files, first, batch.source, batch.stride, n, plan.rows_by_syscall);
  EMBSTORE_CRASH_POINT("after-copy");
  write_entries(files, batch, first, era, plan.entries_by_syscall);
  EMBSTORE_CRASH_POINT("before-publish");
  // Before the rows it dates: a reader that sees them also sees a time no older than theirs.
  state.set_last_commit_unix_ns(os::unix_time_ns());
  state.publish_committed(first + n);
  EMBSTORE_CRASH_POINT("after-publish");
  return first;
}

}  // namespace embstore::detail
