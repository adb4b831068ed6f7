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
//     fresh page faults (page allocation, zeroing, page_mkwrite): for batches under a page, which
//     touch at most two. (From 24 KiB up it was 9% faster on a quiet VM, but 2.4-7x slower where
//     faults are costly or at their worst: bench/RESULTS.md, "Small batches".)
//   - pwrite on the file, one system call per batch (per kStageBytes of a larger unconverted
//     one): the kernel
//     allocates each page-cache page and copies into it without zeroing or mapping it, into file
//     space already allocated (no block allocation either): faster from kRowsSyscallMinBytes of
//     rows and kEntriesSyscallMinBytes of index entries on. Each system call also costs a fixed
//     part (the inode's times, dirty-page accounting): pieces much smaller than a batch cost
//     throughput (bench/RESULTS.md, "checksum over the bytes written").
// Readers cannot tell them apart: both write the one page cache their mappings show, before the
// release store of `committed` that publishes the rows.
//
// A writer that asked for 2 MiB pages (WriterOptions::huge_pages; rows_write_end()) makes them
// with its pwrites: a write that enters a 2 MiB block of the data file (starts at or before the
// block's start and ends inside it) carries zeros up to the block's end in the same system call.
// The kernel sizes a new page-cache page by the write from that page's start, so the block
// becomes one 2 MiB page, which later writes copy into and readers map in one step; a batch
// under 2 MiB makes none otherwise. The zeros lie past the rows being committed, where no
// committed row can be (appends are serialized by the writer lock and only move the end
// forward); the next appends overwrite them. Such a writer's batches under a page that enter a
// block are written this way too, not through the mapping, whose fault would make a 4 KiB page
// there. Not the default: on the VMs of bench/RESULTS.md ("2 MiB pages from the writes
// themselves") a fresh process's first scan ran ~8x faster, but appends ran slower, some runs 3x.
constexpr std::uint64_t kEntriesSyscallMinBytes = 4 * 1024;
// Index entries per system call (32 KiB), built in a buffer of the writing thread.
constexpr std::uint64_t kEntriesPerWrite = 1024;

struct WritePlan {
  bool rows_by_syscall;
  bool entries_by_syscall;
};

// Where a pwrite of the data file's bytes [offset, end) should end (the rule above): at `end`,
// or, for a huge-page writer's write that enters a 2 MiB block and ends inside it, at that
// block's end (at most the end of the file's allocated space, and only where there are zeros to
// copy from).
std::uint64_t rows_write_end(const StoreFiles& files, std::uint64_t offset, std::uint64_t end) {
  if (!files.huge_pages()) return end;
  const std::uint64_t block = (end - 1) / os::kHugePageBytes * os::kHugePageBytes;
  if (offset > block || os::zeros() == nullptr) return end;
  const std::uint64_t allocated = files.layout().data_bytes_for(files.state().capacity());
  return std::max(end, std::min(block + os::kHugePageBytes, allocated));
}

WritePlan plan_writes(const StoreFiles& files, std::uint64_t first, std::uint64_t n) {
  // Test builds may impose a combination (testing.h, EMBSTORE_WRITE_PATH).
  if (const testing::WritePath forced = EMBSTORE_WRITE_PATH(); forced.forced) {
    return {forced.rows_by_syscall, forced.entries_by_syscall};
  }
  const std::uint64_t begin = first * files.layout().record_bytes;
  const std::uint64_t end = (first + n) * files.layout().record_bytes;
  return {end - begin >= kRowsSyscallMinBytes || rows_write_end(files, begin, end) > end,
          n * sizeof(IndexEntry) >= kEntriesSyscallMinBytes};
}

// Writes `bytes` of rows at `offset` of the data file with one pwrite (more only if the kernel
// writes less), followed by the zeros rows_write_end() asks for.
void pwrite_rows(const StoreFiles& files, const std::byte* rows, std::uint64_t bytes,
                 std::uint64_t offset) {
  const std::uint64_t end = rows_write_end(files, offset, offset + bytes);
  const os::Chunk chunks[2] = {
      {rows, bytes}, {end > offset + bytes ? os::zeros() : nullptr, end - offset - bytes}};
  os::write_chunks(files.data_fd(), chunks, 2, offset, files.data_path());
}

// Writes the batch's rows into the data file from row `first`; returns the payload_hash of
// each, computed over the bytes written (batch.h): the batch's own for a staged batch; for the
// caller's rows, read back from the page cache after the write (hash_written) or from pieces
// copied into a buffer of this thread (or into the mapping) and hashed there.
const std::uint64_t* write_rows(StoreFiles& files, std::uint64_t first, const PreparedBatch& batch,
                                bool by_syscall) {
  const std::uint64_t record_bytes = files.layout().record_bytes;
  const std::uint64_t n = batch.rows;
  if (batch.hashes != nullptr) {  // Staged: packed, and only this thread changes it.
    if (by_syscall) {
      pwrite_rows(files, batch.source, n * record_bytes, first * record_bytes);
    } else {
      std::memcpy(files.row_ptr(first), batch.source, n * record_bytes);
    }
    return batch.hashes;
  }
  thread_local std::vector<std::uint64_t> hashes;
  size_reused(hashes, n, kUsualElements<std::uint64_t>);
  if (!by_syscall) {  // Imposed by a test build: the mapping is this writer's own memory too.
    copy_and_hash(files.row_ptr(first), batch.source, batch.stride, n, record_bytes,
                  files.hash_key(), hashes.data());
    return hashes.data();
  }
  thread_local std::vector<std::byte> storage;
  if (batch.hash_written) {
    // The caller's packed rows (batch.h, HashAt::kPageCache): written from where they are, then
    // read back from the page cache with pread a piece at a time into a buffer of this thread,
    // small enough to stay in the second-level cache, and hashed there. Under the writer lock
    // nothing else writes those rows, so the hash describes exactly what is stored. Read back
    // through the mapping instead, each fresh page cost a page fault: on some VMs 2.5x the
    // pwrite itself (bench/RESULTS.md, "Hashing what was written").
    pwrite_rows(files, batch.source, n * record_bytes, first * record_bytes);
    const std::uint64_t per_read = read_back_rows(record_bytes);
    for (std::uint64_t begin = 0; begin < n; begin += per_read) {
      const std::uint64_t count = std::min(per_read, n - begin);
      const std::uint64_t offset = (first + begin) * record_bytes;
      std::byte* const piece = staging_buffer(storage, count * record_bytes, offset);
      os::read_exact(files.data_fd(), piece, count * record_bytes, offset, files.data_path());
      for (std::uint64_t i = 0; i < count; ++i) {
        hashes[begin + i] = payload_hash(piece + i * record_bytes, record_bytes, files.hash_key());
      }
    }
    return hashes.data();
  }
  const std::uint64_t per_write = std::max<std::uint64_t>(1, kStageBytes / record_bytes);
  for (std::uint64_t begin = 0; begin < n; begin += per_write) {
    const std::uint64_t count = std::min(per_write, n - begin);
    const std::uint64_t offset = (first + begin) * record_bytes;
    std::byte* const piece = staging_buffer(storage, count * record_bytes, offset);
    copy_and_hash(piece, batch.source + begin * batch.stride, batch.stride, count, record_bytes,
                  files.hash_key(), hashes.data() + begin);
    pwrite_rows(files, piece, count * record_bytes, offset);
  }
  return hashes.data();
}

// The era this handle may write entries with at `first`, made durable first (FORMAT.md, "era").
// `by_syscall`: the entries will be written by pwrite, so the one at `first` is read the same
// way: through the mapping, its page (fresh, for every batch of a few hundred rows) would fault
// in for this one read, several microseconds here (bench/RESULTS.md, "write path").
// `over_tail` is set when an entry is already there at `first` (a dead writer's, or one a
// recovery cut off): see commit_batch.
std::uint64_t writable_era(StoreFiles& files, std::uint64_t first, std::uint64_t& synced_era,
                           const SyncFailure& on_sync_failure, bool by_syscall, bool& over_tail) {
  SharedState& state = files.state();
  std::uint64_t era = state.era();
  // Entries at `first` that carry the current era were left by a writer killed before it
  // published: a newer era makes them lose to this append's entries on any later recovery.
  IndexEntry at_first;
  if (by_syscall) {
    os::read_exact(files.index_fd(), &at_first, sizeof(at_first), first * sizeof(IndexEntry),
                   files.index_path());
  } else {
    std::memcpy(&at_first, files.entry_ptr(first), sizeof(at_first));
  }
  over_tail = at_first.row != 0 || at_first.checksum != 0;
  const bool stale = over_tail && entry_era(at_first.row) == (era & kEntryEraMask);
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

void write_entries(StoreFiles& files, const PreparedBatch& batch, const std::uint64_t* hashes,
                   std::uint64_t first, std::uint64_t era, bool by_syscall) {
  const std::uint64_t n = batch.rows;
  const std::uint64_t era_bits = (era & kEntryEraMask) << kEntryEraShift;
  const std::uint64_t seed = files.layout().seed;
  auto entry = [&](std::uint64_t i) {
    const std::uint64_t row = first + i;
    // Each read once from the caller's arrays: the entry and its checksum see the same values
    // even if another thread changes them meanwhile.
    const std::uint64_t key = batch.keys[i];
    const std::uint64_t epoch = batch.epoch(i);
    const std::uint64_t row_field = row | era_bits | (i + 1 == n ? kEntryBatchEnd : 0);
    return IndexEntry{key, epoch, row_field,
                      entry_checksum(hashes[i], key, epoch, row_field, seed)};
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
  const WritePlan plan = plan_writes(files, first, n);
  bool over_tail = false;
  const std::uint64_t era =
      writable_era(files, first, synced_era, on_sync_failure, plan.entries_by_syscall, over_tail);
  const std::uint64_t* hashes = write_rows(files, first, batch, plan.rows_by_syscall);
  EMBSTORE_CRASH_POINT("after-copy");
  write_entries(files, batch, hashes, first, era, plan.entries_by_syscall);
  if (over_tail) {
    // Over entries that may validate (FORMAT.md, "Append over an unpublished tail"): this
    // batch's rows and entries reach the disk before the counter that covers them can. Else a
    // power loss could keep the old page of its first rows and the new page of the rest, and a
    // whole old batch followed by the tail of this one, in a newer era, would pass recovery.
    try {
      os::datasync(files.data_fd(), files.data_path());
      os::datasync(files.index_fd(), files.index_path());
    } catch (const Error& error) {
      on_sync_failure(error);
      throw;
    }
  }
  EMBSTORE_CRASH_POINT("before-publish");
  // Before the rows it dates: a reader that sees them also sees a time no older than theirs.
  state.set_last_commit_unix_ns(os::unix_time_ns());
  state.publish_committed(first + n);
  EMBSTORE_CRASH_POINT("after-publish");
  return first;
}

}  // namespace embstore::detail
