"""The server's read-only view of a store: a follower thread, snapshots and lookups by key.

A ``Follower`` owns two Readers on the store: one sleeps in ``wait()`` (woken by commits of any
writer process), the other is refreshed when rows arrive and answers lookups. After every refresh
it publishes an immutable ``Snapshot`` (row count, zero-copy views of keys / epochs / vectors, row
count per epoch); request handlers only ever read the current snapshot, so a request sees one
consistent set of rows however fast writers append. A refresh copies no rows and reads only the
epochs of the rows each store or shard gained since the last one (``EpochTally``): its cost
follows the new rows, not the store's.

Lookups (``history``, ``find``, ``epoch_rows``) use the Reader's persistent key index when the
embstore build has one (``Reader.history`` / ``Reader.epoch_rows``) and otherwise scan the
snapshot's keys / epochs with numpy (correct, O(rows)). Either way they answer for the snapshot:
rows at or past its size are dropped. A shard set is looked up shard by shard, each through its
shard Reader's key index while that Reader holds the snapshot's generation of the shard (a shard
truncated since, or without a key index, is scanned), its rows mapped to the snapshot's numbering.

Damage: before rows are touched, ``check()`` compares the sizes of the store's data and index
files with what the snapshot needs (a file shrunk under a mapping would raise SIGBUS on access)
and reports a missing store directory, or another store at its path (deleted and created again:
a 503 naming both store ids until the server is restarted); a Reader error on refresh is kept as
the store's error until a refresh succeeds. A shard set gets the same checks for each of its
shards (``StoreFiles``), including shards its refresh added.

Truncates: a lookup Reader is refreshed only within the generation it was opened at: once its
store (or shard) has moved to another generation, the follower opens a new Reader
(``_renew_readers``) and the old one lives on only in the snapshots that hold it
(``Snapshot.readers``), freed with the last of them. So a snapshot's Reader still reads the
snapshot's rows when a request checks their checksums, and the deleted files (rows.G, index.G)
of an old generation stay mapped only while a request still reads it.

Checksums: ``failing_rows`` checks rows of a snapshot against their checksums (``Reader.record``
through the snapshot's own Reader); the zero-copy views do not.
"""
from __future__ import annotations

import collections
import errno
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import embstore
from embstore import _embstore

# Bytes per index entry (FORMAT.md: "entry r at byte r * 32").
kIndexEntryBytes = 32
# The file of a store's header (FORMAT.md), whose identity tells the store opened from another
# created at the same path.
kHeaderName = "header"
# rows/s is measured over the commits seen in this many seconds.
kRateWindowSeconds = 5.0
# The follower wakes at least this often (to sample rows/s and check the files).
kFollowSliceSeconds = 0.25
# ... and at most this often: a writer committing thousands of batches a second must not make
# the server refresh (and take a core) thousands of times a second.
kMinRefreshSeconds = 0.25


class StoreError(Exception):
    """The store cannot be served right now (damaged, gone, unreadable); the message says why."""


class Snapshot:
    """Rows [0, rows) of the store as seen at one refresh; never changes once published."""

    def __init__(self, rows: int, keys, epochs, vectors,
                 epoch_counts: Dict[int, int], generation: Any,
                 parts: Sequence[Tuple[int, int]] = (), readers: Sequence[Any] = ()) -> None:
        self.rows = rows
        # Arrays (zero-copy views) of a store's rows; a shard set's are ``ShardRows``.
        self.keys = keys
        self.epochs = epochs
        self.vectors = vectors
        self.epoch_counts = epoch_counts  # epoch -> rows of that epoch in [0, rows)
        # The store's generation (int), or a shard set's tuple of its shards' generations.
        self.generation = generation
        # (rows, generation) the snapshot maps of each store: the store, or each shard in order.
        self.parts = list(parts)
        # The Reader of each part whose views the snapshot holds (kept alive with it); refreshed
        # since within its generation only (see the module doc), so its rows below the part's
        # are the snapshot's.
        self.readers = list(readers)
        self._epoch_array: Optional[np.ndarray] = None

    def sorted_epochs(self) -> list:
        return sorted(self.epoch_counts)

    def epoch_array(self) -> np.ndarray:
        """The epochs present, ascending, as uint64 (computed once per snapshot)."""
        if self._epoch_array is None:
            self._epoch_array = np.array(self.sorted_epochs(), np.uint64)
        return self._epoch_array

    def offsets(self) -> np.ndarray:
        """The global row of each part's row 0 (the store's, or each shard's), then ``rows``."""
        return np.concatenate([[0], np.cumsum([rows for rows, _ in self.parts], dtype=np.int64)]
                              ).astype(np.int64)

    def renumbered(self, rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """``rows`` of an earlier snapshot of the same generations, whose ``offsets()`` were
        ``offsets``, as this snapshot numbers them: a shard set's refresh moves the rows of
        every shard after one that grew (a store's rows never move)."""
        rows = np.asarray(rows, np.int64)
        part = np.searchsorted(offsets, rows, side="right") - 1
        return rows - offsets[part] + self.offsets()[part]


def _as_rows(result) -> np.ndarray:
    """Row numbers out of what a key-index method returns: an array of rows, a (rows, epochs)
    pair, a structured array with a 'row' field, (row, epoch) pairs, or None."""
    if result is None:
        return np.zeros(0, np.int64)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], np.ndarray):
        result = result[0]
    array = np.asarray(result)
    if array.dtype.names:
        array = array["row" if "row" in array.dtype.names else array.dtype.names[0]]
    if array.ndim == 2:
        array = array[:, 0]
    return array.astype(np.int64).reshape(-1)


def has_key_index(reader) -> bool:
    """True when this embstore build gives Readers a persistent key index and the store keeps
    one (a store created with ``key_index=False`` does not: its Reader's lookups scan the offset
    index in C++ holding the GIL, where the numpy scans of the snapshot let the server's other
    threads run). A shard set: whether the build has one (each shard is asked on its own)."""
    if not (callable(getattr(reader, "history", None)) and
            callable(getattr(reader, "epoch_rows", None))):
        return False
    if isinstance(reader, embstore.Reader):
        return bool(reader.info(key_stats=False).get("keeps_key_index", True))
    return True


# What KeyLookup._indexed returns when the key index cannot answer for the snapshot.
_STALE = object()


class KeyLookup:
    """find / history / epoch_rows for a snapshot: the key index of the lookup Reader (of each
    shard's Reader for a shard set) when present, else numpy scans of the snapshot
    (``use_index=False`` forces the scans).

    Thread-safe: the follower thread refreshes the lookup Reader (or ShardSet) while requests
    query it. Each Reader serializes its calls, and a key index's answer is kept only when the
    Reader's generation read before and after it is the snapshot's (``_indexed``); a shard
    set's shards are only ever appended, so shard i stays the snapshot's shard i."""

    def __init__(self, reader, use_index: Optional[bool] = None) -> None:
        self.reader = reader
        self.use_index = has_key_index(reader) if use_index is None else use_index
        self._shard_keeps: List[bool] = []  # A shard set's: has_key_index() of shard i.
        self._keeps_lock = threading.Lock()

    def _indexed(self, reader, generation: Any, query):
        """query(reader) through the Reader's key index, or _STALE when there is none (reader
        None) or the Reader does not hold the snapshot's ``generation`` (the follower refreshes
        it before it publishes a snapshot, so after a truncate its rows below the snapshot's may
        be other rows): read before and after the query, since generations only go up, equal
        readings mean it answered for them."""
        if not self.use_index or reader is None or \
                getattr(reader, "generation", 0) != generation:
            return _STALE
        result = query(reader)
        return result if getattr(reader, "generation", 0) == generation else _STALE

    def history(self, snap: Snapshot, key: int) -> np.ndarray:
        """Rows of ``key`` in the snapshot, in commit (row) order."""
        return self._rows_of(snap, snap.keys, key, lambda r: r.history(key))

    def epoch_rows(self, snap: Snapshot, epoch: int) -> np.ndarray:
        """Rows of ``epoch`` in the snapshot, in commit order."""
        return self._rows_of(snap, snap.epochs, epoch, lambda r: r.epoch_rows(epoch))

    def find(self, snap: Snapshot, key: int, epoch: int) -> Optional[int]:
        """The row of (key, epoch) in the snapshot (the later one if appended twice; of a shard
        set, ShardSet.find's rule: the highest global row, so the last shard holding it), or
        None."""
        readers, offsets = self._readers(), snap.offsets()
        for part in reversed(range(len(snap.parts))):
            rows, generation = snap.parts[part]
            if not rows:
                continue
            reader = readers[part] if part < len(readers) else None
            if callable(getattr(reader, "find", None)):
                row = self._indexed(reader, generation, lambda r: r.find(key, epoch))
                if row is not _STALE and row is None:
                    continue  # The index holds the part's snapshot rows: none is of the pair.
                if row is not _STALE and row < rows:
                    return int(row + offsets[part])
                # The Reader may be refreshed past the snapshot: a newer row hides whether an
                # older one is in it (the part's history decides).
            found = self._in_part(snap, offsets, readers, part, snap.keys, key,
                                  lambda r: r.history(key))
            found = found[snap.epochs[found] == np.uint64(epoch)]
            if len(found):
                return int(found[-1])
        return None

    def find_each_epoch(self, snap: Snapshot, key: int, epochs: np.ndarray) -> np.ndarray:
        """``find(snap, key, e)`` for each e of ``epochs`` (uint64) at once, -1 where absent
        (int64): one vectorised ``find_many`` per part through its key index, so the work
        follows the epochs asked, not the key's versions; a part whose index cannot answer for
        the snapshot (as in ``find``) is scanned."""
        epochs = np.asarray(epochs, np.uint64)
        out = np.full(len(epochs), -1, np.int64)
        left = np.ones(len(epochs), bool)  # Not decided yet: a part before may hold it.
        readers, offsets = self._readers(), snap.offsets()
        for part in reversed(range(len(snap.parts))):
            rows, generation = snap.parts[part]
            want = np.flatnonzero(left)
            if not rows or not len(want):
                continue
            reader = readers[part] if part < len(readers) else None
            found = _STALE
            if callable(getattr(reader, "find_many", None)):
                found = self._indexed(reader, generation, lambda r: np.asarray(
                    r.find_many(np.full(len(want), key, np.uint64), epochs[want]), np.int64))
            if found is not _STALE:
                hit = (found >= 0) & (found < rows)
                out[want[hit]] = found[hit] + offsets[part]
                left[want[hit]] = False
                # Past the snapshot: a newer row hides whether an older one is in it.
                want = want[found >= rows]
                if not len(want):
                    continue
            mine = part_rows_equal(snap.keys, part, key)  # A scan, ascending rows.
            if not len(mine):
                continue
            mine_epochs = np.asarray(snap.epochs[mine], np.uint64)
            order = np.lexsort((mine, mine_epochs))  # By epoch, then row: each epoch's last.
            mine, mine_epochs = mine[order], mine_epochs[order]
            last = np.searchsorted(mine_epochs, epochs[want], side="right") - 1
            hit = (last >= 0) & (mine_epochs[np.maximum(last, 0)] == epochs[want])
            out[want[hit]] = mine[last[hit]]
            left[want[hit]] = False
        return out

    def uses_index(self) -> bool:
        """Whether lookups go through a key index: the store's, or every shard's."""
        return self.use_index and all(reader is not None for reader in self._readers())

    # ---- the snapshot's parts: the store, or each shard of a set ---------------------------

    def _readers(self) -> list:
        """The Reader now answering for each part (the store's, or each shard's), None for one
        without a key index; empty with ``use_index`` off. A shard set's list is a copy (a
        refresh may append to it) and may hold more shards than the snapshot."""
        if not self.use_index:
            return []
        if not hasattr(self.reader, "shards"):
            return [self.reader]
        shards = list(self.reader.shards)
        with self._keeps_lock:  # Requests run on several threads.
            for shard in shards[len(self._shard_keeps):]:  # Fixed at creation: asked once.
                self._shard_keeps.append(has_key_index(shard))
            keeps = list(self._shard_keeps)
        return [shard if kept else None for shard, kept in zip(shards, keeps)]

    def _in_part(self, snap: Snapshot, offsets: np.ndarray, readers: list, part: int,
                 column, value: int, query) -> np.ndarray:
        """The snapshot's rows (ascending) of part ``part`` whose ``column`` (the snapshot's
        keys or epochs) holds ``value``: query(its Reader) through the part's key index, or a
        scan of the part's rows in the snapshot when that index cannot answer for them (none,
        another generation since a truncate, a shard the lookup set does not hold)."""
        rows, generation = snap.parts[part]
        found = self._indexed(readers[part] if part < len(readers) else None, generation, query)
        if found is _STALE:
            return part_rows_equal(column, part, value)
        local = _as_rows(found)
        # Rows at or past the part's were committed after the snapshot.
        return np.sort(local[local < rows]) + offsets[part]

    def _rows_of(self, snap: Snapshot, column, value: int, query) -> np.ndarray:
        readers, offsets = self._readers(), snap.offsets()
        found = [self._in_part(snap, offsets, readers, part, column, value, query)
                 for part, (rows, _) in enumerate(snap.parts) if rows]
        return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)


def last_commit_unix(info) -> Optional[float]:
    """Seconds since the Unix epoch of the latest commit the store recorded, from ``info()``
    (a dict, or a list of them for a shard set: the newest), or None when it records none (no
    commit yet, or only commits by libraries older than format 1.3)."""
    infos = info if isinstance(info, list) else [info]
    ns = max((int(i.get("last_commit_unix_ns", 0)) for i in infos), default=0)
    return ns / 1e9 if ns != 0 else None


class ShardRows:
    """One column of a ShardSet's global rows [0, rows) as of one snapshot (its keys, epochs or
    vectors), indexed like an array (an int, a slice, or an array of rows) and gathered on
    demand from each shard's zero-copy view: a refresh copies nothing, and the row numbers stay
    those of the snapshot after the set is refreshed (a refresh renumbers the rows of every
    shard after one that grew)."""

    def __init__(self, views: Sequence[np.ndarray], offsets: np.ndarray) -> None:
        """``views``: each shard's rows in the snapshot; ``offsets``: the global row of each
        shard's row 0, then the snapshot's rows (``ShardSet.offsets`` then)."""
        self._views = list(views)
        self._offsets = np.asarray(offsets, np.int64).copy()
        self.rows = int(self._offsets[-1])
        self.dtype = self._views[0].dtype
        self.shape = (self.rows,) + self._views[0].shape[1:]

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = np.arange(*index.indices(self.rows))
        rows = np.asarray(index, np.int64)
        scalar = rows.ndim == 0
        rows = rows.reshape(-1)
        rows = np.where(rows < 0, rows + self.rows, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"rows must lie in [0, {self.rows})")
        out = np.empty((rows.size,) + self.shape[1:], self.dtype)
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        for i, view in enumerate(self._views):
            mine = shard == i
            if mine.any():
                out[mine] = view[rows[mine] - self._offsets[i]]
        return out[0] if scalar else out

    def shard_rows_equal(self, shard: int, value: int) -> np.ndarray:
        """Global rows (int64, ascending) of shard ``shard`` whose value is ``value``: a scan of
        the shard's rows in the snapshot."""
        return (np.flatnonzero(self._views[shard] == np.uint64(value)) +
                self._offsets[shard]).astype(np.int64)


def part_rows_equal(column, part: int, value: int) -> np.ndarray:
    """Rows (int64, ascending) of part ``part`` of a snapshot's keys or epochs (a store's array,
    whose one part is the store, or a set's ``ShardRows``) that hold ``value``: a scan."""
    if isinstance(column, ShardRows):
        return column.shard_rows_equal(part, value)
    return np.flatnonzero(column == np.uint64(value)).astype(np.int64)


class EpochTally:
    """Rows per epoch of the rows a follower took in, kept per part (the store, or each shard
    of a set in order) so that a refresh reads only the epochs of the rows a part gained since
    the last: a part is counted again from its row 0 only when a truncate moved it to another
    generation or it holds fewer rows than were counted (a shard set only ever adds parts, at
    the end). ``rows_read`` counts every epoch read (tests count a refresh's work with it).

    Not thread-safe: the follower's thread alone calls ``take``; the dicts it returns are never
    changed afterwards."""

    def __init__(self) -> None:
        self._parts: List[Tuple[int, int, Dict[int, int]]] = []  # (generation, rows, counts)
        self._total: Dict[int, int] = {}
        self.rows_read = 0

    def take(self, parts: Sequence[Tuple[np.ndarray, int, int]]) -> Dict[int, int]:
        """Takes in each part's (epochs view, rows, generation) of a new snapshot; returns the
        rows per epoch of them all (a new dict)."""
        read = []  # per part: (counted again from row 0, epochs of its rows read now)
        for i, (epochs, rows, generation) in enumerate(parts):
            held = self._parts[i] if i < len(self._parts) else None
            again = held is None or held[0] != generation or rows < held[1]
            start = 0 if again else held[1]
            values, n = np.unique(epochs[start:rows], return_counts=True)
            read.append((again, rows - start, dict(zip(values.tolist(), n.tolist()))))
        # Applied once every part is read: an error above leaves the tally as it was.
        total = dict(self._total)
        for i in range(len(parts), len(self._parts)):
            self._subtract(total, self._parts[i][2])
        kept = []
        for i, ((_, rows, generation), (again, taken, added)) in enumerate(zip(parts, read)):
            if again:
                if i < len(self._parts):
                    self._subtract(total, self._parts[i][2])
                counts = {}
            else:
                counts = self._parts[i][2]
            for epoch, n in added.items():
                counts[epoch] = counts.get(epoch, 0) + n
                total[epoch] = total.get(epoch, 0) + n
            kept.append((generation, rows, counts))
            self.rows_read += taken
        self._parts, self._total = kept, total
        return total

    @staticmethod
    def _subtract(total: Dict[int, int], counts: Dict[int, int]) -> None:
        for epoch, n in counts.items():
            left = total[epoch] - n
            if left:
                total[epoch] = left
            else:
                del total[epoch]


def _file_id(path: str):
    """(device, inode) of a file; OSError if it cannot be stat'ed."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


class StoreFiles:
    """The files of one store the server maps (the store served, or one shard of a set), checked
    before rows are touched: a store deleted and created again at its path has another header
    file (the deleted one's inode stays in use while a Reader maps it)."""

    def __init__(self, path: str, reader) -> None:
        self.path = path
        info = reader.info(key_stats=False)
        self.record_bytes = info["record_bytes"]
        self.store_id = info["store_id"]  # of the store opened
        self.header_id = _file_id(os.path.join(path, kHeaderName))

    def check_path(self) -> None:
        """Raises StoreError when the store opened is no longer at its path."""
        if not os.path.isdir(self.path):
            raise StoreError(f"the store directory {self.path} is gone (deleted or renamed)")
        self.check_same_store()

    def check(self, rows: int, generation: int) -> None:
        """Raises StoreError unless the files of ``generation`` hold ``rows`` committed rows
        (after ``check_path()``)."""
        if store_generation(self.path) not in (None, generation):
            # A truncate moved the store to new files and removed these: the snapshot's mappings
            # stay valid, and the next refresh takes the new generation.
            return
        for name, need in ((f"rows.{generation}", rows * self.record_bytes),
                           (f"index.{generation}", rows * kIndexEntryBytes)):
            file = os.path.join(self.path, name)
            try:
                size = os.stat(file).st_size
            except OSError as e:
                if e.errno == errno.ENOENT and \
                        store_generation(self.path) not in (None, generation):
                    return  # Removed by a truncate since the generation was read above.
                raise StoreError(f"{file}: {e.strerror}") from None
            if size < need:
                raise StoreError(f"{file} was truncated under the server: {size} bytes, the "
                                 f"{rows} committed rows need {need}; the store is damaged")

    def check_same_store(self) -> None:
        """Raises StoreError when another store is at the path than the one the Reader opened:
        it would go on showing the deleted store. Not reopened: the new store may have another
        dim or dtype, and a page showing one store must not turn into another; restart."""
        header = os.path.join(self.path, kHeaderName)
        try:
            if _file_id(header) == self.header_id:
                return
        except OSError as e:
            raise StoreError(f"{header}: {e.strerror}") from None
        try:
            now = f"store id {embstore.info(self.path)['store_id']}"
        except (OSError, ValueError, embstore.Error) as e:
            now = f"not readable yet: {e}"
        raise StoreError(f"the store at {self.path} was replaced by another store ({now}; this "
                         f"server opened store id {self.store_id}): its rows are not served; "
                         "restart embstore serve to serve the new store")


def store_generation(path: str) -> Optional[int]:
    """The generation of the store's files now (the core's read_generation: one open and one
    mapped page of its header), or None when the header cannot be read."""
    try:
        return _embstore.read_generation(path)
    except (OSError, embstore.Error):
        return None


def is_manifest(path: str) -> bool:
    """A manifest of several shards (a *.json file, or a directory holding manifest.json: the
    rule of ``ShardSet``), not a store directory."""
    return _embstore.manifest_file(path) is not None


def open_source(path: str):
    """Opens what ``embstore serve`` was given: a store directory (a Reader) or, when this
    build has ``embstore.ShardSet``, a manifest of shards. Raises StoreError with a message."""
    if is_manifest(path):
        shard_set = getattr(embstore, "ShardSet", None)
        if shard_set is None:
            raise StoreError(f"{path} is a file, not a store directory: manifests of several "
                             "shards are not supported yet by this embstore build; give one "
                             "store directory")
        return shard_set(path)
    try:
        return embstore.Reader(path)
    except FileNotFoundError:
        raise StoreError(f"no embstore store at {path} (expected a directory holding "
                         "header, lock, rows.G and index.G)") from None
    except (embstore.Error, OSError, ValueError) as e:
        raise StoreError(f"cannot open the store {path}: {e}") from None


class Follower:
    """Follows a store as writers append and publishes snapshots (see the module doc).

    Thread-safety: ``snapshot``, ``stats()``, ``check()`` and the lookups may be called from any
    thread; one background thread (``start``/``stop``) refreshes.
    """

    def __init__(self, path: str, use_index: Optional[bool] = None) -> None:
        self.path = path
        self.reader = open_source(path)
        self.single_store = isinstance(self.reader, embstore.Reader)
        # Sleeps in wait(), which holds its Reader's lock: lookups must not queue behind it.
        # (A wait() that crosses a truncate opens the store again by itself and drops the old
        # generation's mappings: the waiter holds no arrays.)
        self._waiter = open_source(path) if hasattr(self.reader, "wait") else None
        # A ShardSet renumbers its global rows at each refresh, so a shard set is looked up
        # shard by shard, through each shard Reader's key index, in the snapshot's numbering.
        self.lookup = KeyLookup(self.reader, use_index)
        self.dim = self.reader.dim
        # The files checked before rows are touched: the store's, or each shard's (a shard set is
        # checked as a single store is, shard by shard; _advance adds the shards a refresh adds).
        self._stores: List[StoreFiles] = [StoreFiles(path, self.reader)] if self.single_store \
            else [StoreFiles(shard.path, shard) for shard in self.reader.shards]
        # The generation each lookup Reader (the store's, or each shard's) was opened at: it is
        # refreshed only while its store keeps that one (see the module doc).
        self._opened: List[int] = [self.reader.generation] if self.single_store \
            else [shard.generation for shard in self.reader.shards]
        self.dtype = self.reader.dtype
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._tally = EpochTally()
        self._rate = collections.deque()  # (monotonic seconds, rows)
        self._error: Optional[str] = None
        self._manifest_problem: Optional[str] = None  # A shard set: a shard it cannot add yet.
        self.last_commit_unix: Optional[float] = None
        self.refreshes = 0
        self.snapshot = Snapshot(0, np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                                 np.zeros((0, self.dim), np.float32), {}, 0, [])
        self._advance()

    # ---- following -------------------------------------------------------------------------

    def _advance(self) -> None:
        """Refreshes the lookup Reader and publishes a snapshot if rows arrived."""
        try:
            # A store truncated since: a new Reader, not a refresh across the truncate. And a
            # Reader the refresh took across one (a truncate in between) is replaced at once;
            # a store truncated just after its refresh is taken at the next.
            self._renew_readers(store_too=True)
            rows = self.reader.refresh() if self.single_store else \
                self.reader.refresh(follow_manifest=False)
            if self._renew_readers(store_too=False) and self.single_store:
                rows = len(self.reader)
        except FileNotFoundError:
            # The store is no longer at its path (the core's check): say how, as _check_files does.
            self._check_path()
            raise
        if not self.single_store:
            # Shards the manifest lists since: one it cannot add yet (listed before it was
            # copied beside the manifest, say) is said once, and the shards held stay served.
            try:
                self.reader.follow_manifest()
                self._manifest_problem = None
            except (OSError, ValueError, embstore.Error) as e:
                if str(e) != self._manifest_problem:
                    print(f"embstore serve: manifest: {e} (the shards held are served)",
                          file=sys.stderr, flush=True)
                self._manifest_problem = str(e)
            # With the shards it added, also those added before an entry it could not add.
            rows = len(self.reader)
        # The generation of the rows refresh() saw: info()'s is the store's now, newer if a
        # truncate came in between (its files would not hold this snapshot's rows). A shard
        # set's: every shard's, so that a truncated shard's rows are counted afresh.
        if self.single_store:
            generation = self.reader.generation
            parts = [(rows, generation)]
        else:
            shards = self.reader.shards
            for shard in shards[len(self._stores):]:  # added by this refresh (a manifest grew)
                self._stores.append(StoreFiles(shard.path, shard))
                self._opened.append(shard.generation)
            generation = tuple(shard.generation for shard in shards)
            parts = list(zip(np.diff(self.reader.offsets).tolist(), generation))
        old = self.snapshot
        if rows < old.rows or generation != old.generation:
            # A truncate: the rows before it tell no rate (rows went down, or were dropped and
            # appended again).
            self._rate.clear()
        self._rate.append((time.monotonic(), rows))
        while len(self._rate) > 2 and self._rate[1][0] < time.monotonic() - kRateWindowSeconds:
            self._rate.popleft()
        if rows == old.rows and generation == old.generation and self.refreshes:
            return
        # Without key statistics: a pass over the key table at every refresh took most of a
        # core from the writers on a large store.
        info = self.reader.info(key_stats=False) if hasattr(self.reader, "info") else {}
        self._check_files(parts)
        # Zero-copy views, and only the epochs of rows new since the last refresh are read (a
        # shard set's whole-set keys / epochs are copies: a refresh took O(rows) of CPU).
        if self.single_store:
            keys, epochs = self.reader.keys[:rows], self.reader.epochs[:rows]
            vectors = self.reader.vectors[:rows]
            counts = self._tally.take([(epochs, rows, generation)])
        else:
            offsets = self.reader.offsets
            keys, epochs, vectors = (ShardRows([getattr(shard, column) for shard in shards],
                                               offsets)
                                     for column in ("keys", "epochs", "vectors"))
            counts = self._tally.take([(shard.epochs, shard_rows, shard_generation)
                                       for shard, (shard_rows, shard_generation)
                                       in zip(shards, parts)])
        with self._lock:
            # Read after the refresh, so never older than the commit of the snapshot's last row.
            self.last_commit_unix = last_commit_unix(info)
            self.snapshot = Snapshot(rows, keys, epochs, vectors, counts, generation, parts,
                                     [self.reader] if self.single_store else list(shards))
        self.refreshes += 1

    def _renew_readers(self, store_too: bool) -> bool:
        """Opens a new Reader for the store, or each shard, whose Reader was refreshed past the
        generation it was opened at (or, ``store_too``, whose store has moved to another
        generation since: read from its header); the
        old one is not closed (a request may still read its snapshot): it is freed with the
        last snapshot holding it. Returns whether it opened one. Raises StoreError when
        another store is at the path now."""
        renewed = False
        if self.single_store:
            if self._stale(self.reader, self._opened[0], store_too):
                self.reader = self._reopen(self.reader, self._stores[0])
                self.lookup.reader = self.reader
                self._opened[0] = self.reader.generation
                renewed = True
            return renewed
        shard_set = self.reader
        shards = shard_set.shards
        for i, shard in enumerate(shards[:len(self._opened)]):
            if self._stale(shard, self._opened[i], store_too):
                # ShardSet has no call that reopens one shard: its list of shard Readers takes
                # the new one at the same place (the same path and store id, checked), and
                # _renumber() recomputes its offsets and snapshots from the list.
                shards[i] = self._reopen(shard, self._stores[i],
                                         getattr(shard_set, "_map_bytes", None))
                self._opened[i] = shards[i].generation
                renewed = True
        if renewed:
            shard_set._renumber()
        return renewed

    @staticmethod
    def _stale(reader, opened: int, store_too: bool) -> bool:
        """Whether ``reader`` (opened at generation ``opened``) must not be refreshed again."""
        return reader.generation != opened or \
            (store_too and store_generation(reader.path) not in (None, opened))

    @staticmethod
    def _reopen(reader, files: "StoreFiles", map_bytes: Optional[int] = None):
        """A new Reader on the store ``reader`` reads, refused (StoreError) when it is another
        store than ``files`` names."""
        try:
            new = embstore.Reader(reader.path, map_bytes=map_bytes)
        except FileNotFoundError:
            files.check_path()
            raise
        except (embstore.Error, OSError, ValueError) as e:
            raise StoreError(f"cannot open the store {reader.path} again: {e}") from None
        if new.info(key_stats=False)["store_id"] != files.store_id:
            new.close()
            files.check_same_store()
            raise StoreError(f"the store at {reader.path} is another store than the one this "
                             f"server opened (store id {files.store_id}); restart embstore "
                             "serve to serve it")
        return new

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._waiter is not None:
                    try:
                        self._waiter.wait(self.snapshot.rows + 1, timeout=kFollowSliceSeconds)
                    except FileNotFoundError:
                        self._check_path()  # The store left its path: StoreError saying how.
                        raise
                else:
                    self._stop.wait(kFollowSliceSeconds)
                if self._error is not None and not self._recheck():
                    continue
                before = self.snapshot.rows
                self._advance()
                # Cleared only once a refresh succeeds: a Reader error (a shard replaced at its
                # path, say) comes back at every refresh, and clearing it between the two served
                # the old rows to requests in between.
                self._error = None
                if self.snapshot.rows != before:
                    self._stop.wait(kMinRefreshSeconds)
            except StoreError as e:
                self._set_error(str(e))
                self._stop.wait(kFollowSliceSeconds)
            except Exception as e:  # A damaged store must not end the server: report it.
                self._set_error(f"{type(e).__name__}: {e}")
                self._stop.wait(kFollowSliceSeconds)

    def _recheck(self) -> bool:
        """After an error: True once the store's files look servable again (the error stays
        until a refresh succeeds)."""
        try:
            self._check_files(self.snapshot.parts)
        except StoreError as e:
            self._set_error(str(e))
            return False
        return True

    def _set_error(self, message: str) -> None:
        if message != self._error:
            print(f"embstore serve: store problem: {message}", file=sys.stderr, flush=True)
        self._error = message

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="embstore-follow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    # ---- health ----------------------------------------------------------------------------

    def _check_path(self) -> None:
        """Raises StoreError when the store, or a shard of the set, opened is no longer at its
        path."""
        for files in self._stores:
            files.check_path()

    def _check_files(self, parts: Sequence[Tuple[int, int]]) -> None:
        """Raises StoreError unless each store's files hold its (rows, generation) of ``parts``
        (a snapshot's)."""
        self._check_path()  # Every shard, also one with no rows in the snapshot yet.
        for files, (rows, generation) in zip(self._stores, parts):
            files.check(rows, generation)

    def check(self) -> Snapshot:
        """The current snapshot, after checking the store can be read; raises StoreError."""
        if self._error is not None:
            raise StoreError(self._error)
        snap = self.snapshot
        try:
            self._check_files(snap.parts)
        except StoreError as e:
            self._set_error(str(e))
            raise
        return snap

    @property
    def error(self) -> Optional[str]:
        return self._error

    def failing_rows(self, snap: Snapshot, rows) -> Dict[int, str]:
        """Of the snapshot's ``rows``, those whose bytes fail their checksum: {row: message
        naming the file, row, key and epoch}. Each is read through the snapshot's Reader of its
        part (``Reader.record``: ~1 us a row). Raises StoreError when that Reader has been taken
        past the snapshot's generation (a truncate met during a refresh): the rows cannot be
        checked; asking again answers from the new snapshot."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        offsets = snap.offsets()
        part_of = np.searchsorted(offsets, rows, side="right") - 1
        failed: Dict[int, str] = {}
        for part in np.unique(part_of).tolist():
            reader, (_, generation) = snap.readers[part], snap.parts[part]
            if reader.generation != generation:
                raise StoreError(f"{reader.path} was truncated while this answer was computed; "
                                 "ask again")
            for row in rows[part_of == part].tolist():
                try:
                    reader.record(row - int(offsets[part]))
                except embstore.CorruptionError as e:
                    where = f" (row {row} of the {len(snap.parts)} shards)" \
                        if not self.single_store else ""
                    failed[row] = f"{e}{where}"
            if reader.generation != generation:  # Read before and after, as KeyLookup does.
                raise StoreError(f"{reader.path} was truncated while this answer was computed; "
                                 "ask again")
        return failed

    # ---- figures ---------------------------------------------------------------------------

    def rows_per_second(self) -> float:
        samples = list(self._rate)
        if len(samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def bytes_on_disk(self) -> Optional[int]:
        """Bytes allocated to the store's files (st_blocks), a shard set's shards' together, or
        None if unknown."""
        total = 0
        try:
            for files in list(self._stores):
                with os.scandir(files.path) as entries:
                    for entry in entries:
                        if entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            return None
        return total
