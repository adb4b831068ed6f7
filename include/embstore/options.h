// embstore/options.h — what a caller can choose when creating or opening a store.
#pragma once

#include <chrono>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "embstore/dtype.h"

namespace embstore {

inline constexpr std::uint64_t kDefaultSegmentBytes = 64ull << 20;  // 64 MiB
inline constexpr std::uint64_t kMaxMetadataBytes = 64ull << 10;     // 64 KiB
inline constexpr std::uint64_t kDefaultMapBytes = 1ull << 40;       // 1 TiB of address space
inline constexpr std::uint32_t kMaxDim = 1u << 24;                  // Elements per row

// Fixed at creation, stored in the header, never changed afterwards.
struct CreateOptions {
  std::uint32_t dim = 0;          // Elements per row; 1 .. kMaxDim, a row within one segment.
  DType dtype = DType::kFloat32;  // Element type of every row.
  // The growth step: the data and index files together double from 64 KiB up to this many bytes,
  // then grow by about this much at a time (posix_fallocate'd before first touch; FORMAT.md
  // "File sizes"). A multiple of 4096 and at least one row.
  std::uint64_t segment_bytes = kDefaultSegmentBytes;
  // Free-form user text (JSON by convention: model name, run config), at most kMaxMetadataBytes.
  std::string metadata;
  // Whether writers keep a key index (keys.K: lookups by key and epoch in constant time, at up to
  // 112 bytes per row on disk; FORMAT.md "File sizes"). false: no writer builds one and lookups
  // scan the offset index (O(rows) each), for stores of short rows that must stay small.
  bool key_index = true;
};

// How often the default policy's background thread syncs.
inline constexpr std::chrono::milliseconds kDefaultSyncInterval{5000};

enum class SyncPolicy : std::uint8_t {
  // sync() only when asked; close() flushes nothing. Committed rows survive any process crash,
  // but the first open after a reboot re-checks every row committed since the last sync.
  kNone = 0,
  kEveryAppend = 1,  // Every append() returns only after its rows are durable; close() syncs.
  // The default. A background thread syncs every sync_interval if rows were committed since
  // the last sync (by any writer), and close() syncs: after a reboot the first open re-checks
  // at most the rows of the last interval, none after a clean close.
  kInterval = 2,
};

struct WriterOptions {
  // SyncPolicy::kNone opts out of the background thread and of the sync at close.
  SyncPolicy sync = SyncPolicy::kInterval;
  // Positive with kInterval; longer than a century counts as a century.
  std::chrono::milliseconds sync_interval = kDefaultSyncInterval;
  // The most address space a store's mappings may reserve, for the data and index files
  // together: the store can grow to about this many bytes (rows plus their 32-byte index
  // entries), rounded up to a whole segment of rows (CreateOptions::segment_bytes, 64 MiB by
  // default) and their entries: a cap under one segment is one segment. Reservations start at
  // about twice the store's size and double as it grows, so this is a cap, not a cost. Address
  // space counts against ulimit -v, not memory. 0 means the environment variable
  // EMBSTORE_MAP_BYTES if set, else kDefaultMapBytes.
  std::uint64_t map_bytes = 0;
  // When set, open() fails with kFormatMismatch unless the store has this dim / dtype, and
  // create() with kInvalidArgument (before making anything) unless CreateOptions agree.
  std::optional<std::uint32_t> expect_dim;
  std::optional<DType> expect_dtype;
  // Writers refuse a store on a network or FUSE file system (NFS, SMB/CIFS, FUSE, 9p, Lustre,
  // GPFS, CephFS, ...: see "Caveats" in embstore.h for why) with kInvalidArgument. true — or
  // the environment variable EMBSTORE_ALLOW_REMOTE_FS=1 — opens it anyway, at the caller's risk.
  bool allow_remote_filesystem = false;
  // Keep the rows in 2 MiB page-cache pages, which every process that maps them later (a
  // Reader) maps in one step instead of 512: each write that enters a 2 MiB block of the data
  // file carries zeros up to the block's end (past the rows it commits, which the next appends
  // overwrite), so the kernel makes the block one 2 MiB page (src/log/commit.cc). On the VM of
  // bench/RESULTS.md ("2 MiB pages from the writes themselves") a new process's first scan of
  // 600 MB ran ~8x faster, and one writer appended at 0.7-0.9x of a plain writer's MB/s at the
  // median, some repeats at a quarter to a half of it (fresh 2 MiB pages are costly there),
  // which is why it is off by default. The zeros of the block
  // being filled reach the disk at a sync, at most 2 MiB past the last row. Advisory: where the
  // kernel or file system makes no such pages it makes small ones, and the rows are stored the
  // same either way.
  bool huge_pages = false;
  // How many rows the caller expects the store to hold (0: no guess). A key index this writer
  // builds from nothing (when it creates the store, or rebuilds a missing or damaged one) is
  // built with tables for at least this many rows, and a growth it makes grows them to at least
  // that size: a store that reaches it was indexed once instead of rebuilt at every doubling
  // (each growth indexes every row again: 7 growths on the way to 200,000 rows, about a third of
  // a writer's CPU at 768 floats a row; bench/RESULTS.md, "Where the key index's cost goes").
  // The tables take their full size on disk at once: 35 to 70 bytes per expected row (FORMAT.md
  // "File sizes"), sized as if every row had a new key. Rows past the guess grow the tables as
  // usual. At most 2^40 (kInvalidArgument beyond); a guess past the rows map_bytes lets the
  // store hold counts as that many. A disk without room for the tables fails the key index as
  // any full disk does (appends succeed, lookups scan, close() reports kFull), its message
  // naming the guess. No effect on a store without a key index, or on the data
  // and index files, which grow as they always do.
  std::uint64_t expected_rows = 0;
};

struct ReaderOptions {
  // As WriterOptions::map_bytes (rounded up to a whole segment the same way). A reader of a
  // larger store gets kFull from open()/refresh().
  std::uint64_t map_bytes = 0;
  // open() takes a snapshot of at most this many rows: the first max_rows rows when that many
  // are committed, else every committed row (size() says which). For a process that must see
  // the very rows another one saw, whose row numbers it was given (with the store id and
  // generation that say they are the same rows). refresh() and wait() take every committed row
  // as usual.
  std::uint64_t max_rows = std::numeric_limits<std::uint64_t>::max();
};

}  // namespace embstore
