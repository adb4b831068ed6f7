// embstore/writer.h — appending rows to a store.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "embstore/dtype.h"
#include "embstore/options.h"
#include "embstore/store.h"

namespace embstore {

// A batch of `rows` rows of `dim` elements of `dtype`, each row contiguous, rows
// `row_stride_bytes` apart (0 means packed: dim * dtype_size(dtype)). Does not own the memory.
struct ConstMatrix {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  std::uint64_t rows = 0;
  std::uint32_t dim = 0;
  std::uint64_t row_stride_bytes = 0;
};

// Appends rows to one store. Any number of Writers — in this process, in other threads, in
// other processes — may append to the same store at once; their batches are serialized by the
// store's writer lock and each lands contiguously.
//
// Thread-safety: a Writer is thread-safe; concurrent calls on one Writer are serialized.
// Fork: a Writer belongs to the process that opened it. In a forked child every call except
// close(), the destructor and path() (which reads nothing of the store) throws kForkedChild;
// the child must open its own Writer. There close() does nothing (a child that closes what it
// inherited, as Python's exit handlers do, neither fails nor flushes the parent's work), and
// the destructor releases nothing of it (the state is leaked: the parent's threads held its
// mutexes at the fork, so running its destructors could deadlock), and so never the parent's
// lock; the child's exit unmaps and closes its copies.
// Moved from (by the move constructor or move assignment), a Writer holds nothing: every call
// throws kClosed saying so, except close() and the destructor, which do nothing; assigning
// another Writer to it makes it usable again.
class Writer;

namespace detail {
struct WriterInternals;  // src/writer_internals.h: routes for the library's own callers.
}

// The calling process's id as embstore sees it (cached; a pthread_atfork handler refreshes it in
// a forked child). The one fork test: Writer, its lock and the Python binding compare it with
// the id they were opened in.
int current_process_id() noexcept;

class Writer {
 public:
  // Creates a new store (as create_store) and opens it for appending. If the store is made but
  // opening it fails (out of descriptors, say), the error says so: the new store stays, empty
  // (another process may have opened it meanwhile), for open() or open_or_create() to retry.
  static Writer create(const std::string& path, const CreateOptions& create_options,
                       const WriterOptions& options = {});
  // Opens an existing store for appending. Recovers it first if the previous writer died or the
  // machine rebooted since (see embstore.h, "Recovery"). Needs read-write access to its files.
  // A store of a later format minor than this library's is read (Reader) but not written:
  // kUnsupportedVersion, nothing changed.
  static Writer open(const std::string& path, const WriterOptions& options = {});
  // open() if a store exists at `path` (checking its dim and dtype against create_options),
  // else create(). Safe when several processes race to call it on the same path. An
  // expect_dim/expect_dtype in `options` other than create_options' is kInvalidArgument. Of an
  // existing store only dim and dtype are checked: its metadata, key_index and segment_bytes
  // stay as they were created, whatever create_options says (info() shows them).
  static Writer open_or_create(const std::string& path, const CreateOptions& create_options,
                               const WriterOptions& options = {});
  // Throws what open() and create() throw, before anything else, for a store at `path` on a
  // network or FUSE file system (kInvalidArgument naming it and how to force it) unless
  // options.allow_remote_filesystem or EMBSTORE_ALLOW_REMOTE_FS=1 allows writers there; else
  // does nothing. For a caller that makes a store with create_store() for writers to open later
  // (embstore create): refused where they would refuse it.
  static void check_filesystem(const std::string& path, const WriterOptions& options = {});

  Writer(Writer&&) noexcept;
  Writer& operator=(Writer&&) noexcept;
  ~Writer();  // Closes (with close()'s sync); never throws: call close() to see a sync's error.

  // Appends rows.rows rows with keys[i] and one epoch (or epochs[i]) atomically: readers see all
  // of them or none. Input of the store's dtype is copied as is; float32 input is converted to
  // a float16 or bfloat16 store (round to nearest even; NaN and infinities stay what they are).
  // Anything else — another dtype, a wrong dim, keys/epochs of another length, a finite float32
  // value beyond the store's float16/bfloat16 range (it would become infinity) — throws
  // kInvalidArgument naming it and writes nothing.
  // Returns the row number of the first appended row (rows are numbered from 0 in append order).
  // A batch of 0 rows is valid and returns the current committed count.
  // The rows are read during the call. Another thread that changes them meanwhile decides which
  // values are stored, never whether they match their checksums: each row is hashed from the
  // copy that is written (src/log/batch.h), so verify() and recovery never find it damaged.
  // Under SyncPolicy::kEveryAppend the rows are published before they are flushed: if the flush
  // fails, append() throws kPoisoned although the batch is committed (visible, not durable) —
  // do not retry it blindly; reopen and check committed_rows().
  std::uint64_t append(std::span<const std::uint64_t> keys, std::uint64_t epoch,
                       const ConstMatrix& rows);
  std::uint64_t append(std::span<const std::uint64_t> keys, std::span<const std::uint64_t> epochs,
                       const ConstMatrix& rows);
  // Convenience for packed float32 input: values.size() must be keys.size() * dim().
  std::uint64_t append(std::span<const std::uint64_t> keys, std::uint64_t epoch,
                       std::span<const float> values);

  // Makes every row committed so far durable (data and index flushed to the device, then the
  // durable counter advanced and the header flushed), by any writer: after another handle's
  // truncate this handle first takes the new generation's files (and lets the old ones go). A
  // failure poisons the Writer: every later call throws kPoisoned until the store is reopened;
  // the failed sync is never retried. When only the header's flush failed, durable_rows()
  // already counts the rows (their data and index are on the device) while the header on the
  // device may not: after a power loss the next Writer's recovery checks them, as it checks rows
  // past any header's durable count. Then kNotFound (the Writer still usable) when the store is
  // no longer at the path it was opened at (deleted, moved away or replaced by another): the
  // rows are durable in its files, which that path no longer reaches (embstore.h, "Caveats").
  void sync();
  // Rebuilds the key index from the offset index (for one that Reader::verify() reports
  // damaged; a writer already rebuilds a missing, stale or unreadable one when it opens). Takes
  // the writer lock for the rebuild: about a second per 10M rows. kInvalidArgument for a store
  // created without a key index (CreateOptions::key_index false).
  void rebuild_key_index();

  // Rolls the store back: keeps rows [0, rows) and drops every later row, for training that
  // resumes from a checkpoint. Returns the rows kept. rows == committed_rows() changes nothing;
  // rows > committed_rows() throws kInvalidArgument naming both. Takes the writer lock: every
  // append of every Writer waits for it. It copies the kept rows into new files (the store's
  // next generation, FORMAT.md "Truncate"), flushes them, then switches the store to them in one
  // step: killed at any instant (or on a power loss), the store is the old one or the new one,
  // never a mix, and the next writer or reader finishes a switch that was decided. The time and
  // the disk space needed are those of copying the rows kept; the old files are removed after.
  // `rows` may fall inside a batch: its rows before `rows` are kept as a batch of their own
  // (the last one's entry gets the batch-end flag), so recovery keeps them too.
  // In a damaged store it throws kCorruption naming the row, store unchanged, rather than keep
  // an index entry that is all zero or end on a row that fails its checksum and does not end
  // its batch (a bad row that ends one is kept as it is: recovery and verify() still name it).
  //   - Readers: views taken before stay valid and unchanged (the old files stay mapped), and a
  //     Reader keeps its snapshot until refresh(); after that it sees the new generation, and
  //     its size() may go down to `rows`. Lookups answer from the snapshot: a Reader that has
  //     not refreshed still finds the rows its snapshot holds, dropped or not; one that has
  //     never finds a dropped row.
  //   - Other Writers (in any process) take the new files at their next append, before
  //     writing. Rows they appended before the truncate took the lock are dropped like any
  //     other row at or past `rows`.
  //   - The key index is rebuilt for the rows kept (a second or so per 10M rows).
  // Processes running a library version without truncate must not have the store open: they
  // would not follow the switch (FORMAT.md, "Truncate").
  std::uint64_t truncate(std::uint64_t rows);
  // Truncates before the first row whose epoch is at least `epoch` ("resume from the checkpoint
  // of epoch `epoch`": that epoch's rows and everything appended after them are dropped; rows
  // of earlier epochs appended after it are dropped too, since a truncate keeps a prefix).
  // Returns the rows kept; when no row has such an epoch, nothing changes. Scans the offset
  // index (32 bytes per row) under the writer lock.
  std::uint64_t truncate_from_epoch(std::uint64_t epoch);

  // Releases the lock file, mappings and background thread. Idempotent. Unless the policy is
  // SyncPolicy::kNone (the default kInterval included), syncs first (throwing if that fails):
  // a store closed this way has nothing to re-check after a reboot. A key index growth in
  // progress is finished first, at the size the rows stored by then want, so that readers and
  // the next writer find every row indexed: one build of the index (21-72 ms for 400,000 rows
  // on a 2-core VM, bench/RESULTS.md). Rows that appends left unindexed because another
  // thread or writer held the key index lock then are indexed too (waiting for that lock).
  // Throws if this handle could not maintain the key index
  // (every row is stored; lookups scan the rows it did not index until a writer indexes them),
  // and kNotFound, once closed, when the store is no longer at the path it was opened at (as
  // sync() does). An append another thread makes on this Writer while close() runs either
  // finishes before the store is closed (its rows stored, as close() leaves them) or throws
  // kClosed, storing nothing.
  void close();

  std::uint64_t committed_rows() const;  // Rows visible to readers right now (all writers).
  std::uint64_t durable_rows() const;
  std::uint32_t dim() const;
  DType dtype() const;
  const std::string& path() const;
  // The header and counters, and with kFull the key statistics (InfoDetail, store.h).
  StoreInfo info(InfoDetail detail = InfoDetail::kFull) const;

  class Impl;

 private:
  friend struct detail::WriterInternals;
  explicit Writer(std::unique_ptr<Impl> impl);
  Impl& impl() const;  // *impl_; kClosed when moved from.
  std::unique_ptr<Impl> impl_;
};

}  // namespace embstore
