// embstore — a memory-mapped, append-only store of fixed-size embedding rows.
//
// THE CONTRACT (read this before using the library; every other header refers back here)
//
// A store is a directory: a header, a data file of fixed-size rows, an index file with one
// entry per row (key, epoch, row, checksum) and a lock file. The byte layout is
// src/format/FORMAT.md.
//
// Writers
//   Any number of processes and threads may append at once. Each append takes the store's
//   writer lock (an OFD lock on the dedicated lock file, plus an in-process mutex), writes its
//   rows and index entries (by pwritev for large batches, by memcpy through the mapping for
//   small ones; the thresholds: bench/RESULTS.md, "write path"), then publishes the commit
//   counter with one release store. Both ways land in the one page cache every reader maps.
//   The lock is held only for the writes and the publish: validation, dtype conversion, the
//   copy every row's checksum is computed over, and row hashing happen before it is taken
//   (for an unconverted batch over 8 MiB the copy and hash run under it, piece by piece:
//   src/log/batch.h).
//   A writer killed at any instant (kill -9) loses only its unfinished batch and blocks no one:
//   the kernel drops its lock and the next writer writes over the unpublished tail.
//
// Readers
//   Take no lock, write nothing, need only read permission (a read-only mount works) and never
//   block writers. A reader sees the rows [0, committed) as of open() or its last refresh();
//   every row it sees is whole: an append's n rows become visible all together or not at all.
//   All committed rows of a snapshot form ONE contiguous span. Both files are mapped inside an
//   address range reserved in proportion to the store (about twice what the files hold, capped
//   by map_bytes); a store that outgrows it is mapped again at a larger range, which new
//   snapshots use while every view already taken keeps pointing at the old range, kept mapped.
//   Views stay valid while the Reader or an owner() copy lives.
//
// Durability
//   committed — visible to readers; survives any process crash (the page cache holds it).
//   durable   — rows flushed to the device by a completed sync(); survives power loss.
//   Under SyncPolicy::kInterval (the default) a background thread syncs every few seconds
//   (WriterOptions::sync_interval, 5 s) when rows were committed since, and close() syncs, so a
//   power loss costs at most the last interval's rows and a reboot re-checks at most those.
//   Under SyncPolicy::kNone nothing is flushed unless sync() is called.
//   A failed flush poisons the Writer (kPoisoned) until the store is reopened; it is never
//   retried, because the kernel may already have dropped the dirty pages it failed to write.
//
// Recovery
//   Needs no manual step. The header records the boot id of the machine's current boot. When a
//   Writer opens a store last written in an earlier boot (a power loss or reboot may have torn
//   any unsynced page), it re-checks rows [durable, committed) by checksum under the writer lock
//   and cuts the commit counter back to the longest valid prefix; this is idempotent. A Reader
//   that finds such a store before any Writer has recovered it verifies the same range itself
//   (read-only) and clamps its snapshot to the valid prefix; its info() counts those rows, and
//   StoreInfo::rows_to_cut (and verify(), which then fails) the ones the next Writer cuts. After
//   a mere process crash (same boot) opening is O(1): the page cache never lost anything. Both
//   run one loader with one set of checks: counters that contradict each other (capacity 0,
//   committed above capacity, durable above committed) or, in the same boot, the file sizes, are
//   kCorruption naming the field, for Reader::open (and so verify) exactly as for Writer::open.
//
// Lookups by key
//   Reader::find/history/epoch_rows/epochs/find_many answer for the reader's snapshot through the
//   key index (src/format/FORMAT.md, "keys.K"): derived data that readers use without a lock and
//   that each append brings up to date before it returns: after publishing, a writer releases
//   the writer lock and indexes every row committed so far under a lock of the key index's own
//   (byte 2 of the lock file), so its indexing overlaps the next writer's commit. A lookup never
//   returns a row at or past the snapshot. The index is never the only copy of anything: rows it
//   has not covered yet (an append still indexing, a writer that died before indexing) are found
//   by a short scan; a missing,
//   damaged or pre-reboot index makes lookups scan the whole offset index (info().key_index says
//   so) until the next Writer opens and rebuilds it (about a second per 10M rows, under the lock).
//   A store created without a key index (CreateOptions::key_index false) never has one: every
//   lookup scans the offset index.
//
// Errors
//   Every failure throws embstore::Error (error.h) whose message names the file, field or value.
//   A full disk is an error (kFull) from append(), never SIGBUS: every growth of the files is
//   posix_fallocate'd before its first byte is touched. Rows already stored are never lost.
//
// Caveats
//   - Writers need a local file system. Writers coordinate through shared mappings of the
//     store's files, a futex on the commit counter and OFD locks; on NFS, SMB/CIFS, FUSE, 9p,
//     Lustre, GPFS, CephFS and the like another machine (or the FUSE daemon) sees none of them
//     coherently, so two writers could interleave and readers could see torn rows. A Writer
//     therefore refuses such a file system (statfs f_type; kInvalidArgument) unless
//     WriterOptions::allow_remote_filesystem or EMBSTORE_ALLOW_REMOTE_FS=1 forces it. Readers
//     open anything: a quiescent store (no writer anywhere) reads correctly over any file system.
//     Across machines, give each node its own store on local disk and read them together with
//     ShardSet or merge them (shard_set.h).
//   - The file system must support posix_fallocate and overwrite allocated blocks in place
//     (ext4, xfs without reflinked files, tmpfs). On copy-on-write file systems (btrfs, reflinked
//     xfs) an overwrite needs new space, so a full disk there can still raise SIGBUS.
//   - Under RLIMIT_FSIZE the process must ignore SIGXFSZ to get kFull instead of being killed.
//   - A forked child must open its own Writer; Readers may be used across fork.
//   - Rows are never rewritten or shrunk in place; files only grow. Truncating a store's files
//     from outside (truncate(1), a copy over them) while readers hold views raises SIGBUS in
//     those readers: an access past the end of a mapped file is a signal, inherent to mmap.
//   - Stores open per process: each open Reader or Writer holds about five memory mappings (two
//     more once a Reader has looked a key up, two more each time a Reader following a growing
//     store sees it double: it maps its whole reservation at once, so growths within it add
//     none), so the kernel's vm.max_map_count (65530 by
//     default) allows roughly 10,000 open stores; raise it for more. A Writer holds six file
//     descriptors (five without a key index) (RLIMIT_NOFILE), a Reader none: it reopens its files
//     by path when they grew past its mapping, so a store moved or deleted under an open Reader
//     fails that refresh (kNotFound or kIO) while its views stay valid.
//   - A store deleted, moved or replaced at its path under an open Writer: the Writer keeps
//     appending to the files it opened (gone with the deleted directory, or at the new path).
//     Whatever it would change by name in the directory (a truncate, another process's truncate
//     it follows, the key index's builds) fails with kNotFound instead of touching the store now
//     at the path; a key index failure is reported by close(), as every one is. An explicit
//     sync() and close() throw kNotFound too: the rows are where the store went, or gone with
//     it, never silently.
//   - A file the process may not read is kPermissionDenied (EACCES/EPERM); kReadOnly is a
//     write refused by a read-only file or file system.
//   - A failed flush (an I/O error writing back the page cache) poisons the Writer whose sync
//     saw it. The kernel reports such an error once, to the descriptors open when it happened,
//     and may drop the pages: another Writer (another process, or one opened later) whose sync
//     comes after can succeed and count rows durable that are not on the device. A reboot then
//     re-checks only rows past durable_rows. After an I/O error, stop the writers and verify
//     the store (embstore verify) rather than append on.
#pragma once

#include "embstore/dtype.h"
#include "embstore/error.h"
#include "embstore/options.h"
#include "embstore/reader.h"
#include "embstore/salvage.h"
#include "embstore/shard_set.h"
#include "embstore/staged_output.h"
#include "embstore/store.h"
#include "embstore/version.h"
#include "embstore/writer.h"
