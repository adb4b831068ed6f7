"""Dask arrays over a store or a set of shards, read zero-copy where each task runs.

    import embstore.dask
    a = embstore.dask.from_store("/data/run17")    # a manifest, its directory, store path(s)
    a.vectors, a.keys, a.epochs                     # dask arrays; chunks align with rows
    u = embstore.dask.from_store("/data/run17", unique=True)   # one row per (key, epoch)
    mask = (a.epochs == 3)[:, None]
    mean3 = ((a.vectors * mask).sum(0, dtype="float64") / mask.sum()).compute()
    # Sum in float64: in a float16 store's own dtype a sum stops growing at 2048 (ones added
    # to it round away) and overflows to inf past 65504.

The task graph holds only paths, store ids, generations and row ranges (with ``unique``, the
ranges of the rows kept): a task reads through its process's Reader of that shard (one for
every task of the shard: a view keeps the mappings of the Reader it came from, so a Reader per
task left each persisted chunk holding a whole Reader's) and returns a read-only view of the
mapping (no copy on that worker; dask copies only what it moves between workers; a chunk of
several ranges is a copy). A process keeps the Readers of the last 64 shard
snapshots it read (``_READERS_KEPT``), the least recently used dropped first. The arrays
describe the shards' snapshots when ``from_store`` was called; rows appended later are not in
them. A task whose shard was truncated since (another generation: its rows may now be other
rows) or replaced raises instead of reading, and arrays built after a truncate never share a
task name with those built before it. The workers must see the shard paths: run them where the
stores are (or on a copy of them), never a Writer on a network file system (see the README,
"Several machines").
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

import dask.array as da
from dask.base import tokenize

from . import FormatMismatchError, Reader, _check_integer, _number
from .shards import ShardSet

__all__ = ["from_store", "StoreArrays"]

class StoreArrays(NamedTuple):
    """The dask arrays of ``from_store``: vectors (rows, dim; bfloat16 as uint16 bit patterns,
    as ``Reader.vectors``), keys and epochs (rows,) uint64, with the same row chunks."""
    vectors: da.Array
    keys: da.Array
    epochs: da.Array


# This process's Readers, by (path, store id, generation), most recently used last.
_READERS_KEPT = 64
_readers: "OrderedDict[tuple, Reader]" = OrderedDict()
_readers_lock = threading.Lock()
# A child forked while another thread held the lock would wait on it forever.
os.register_at_fork(after_in_child=lambda: globals().update(_readers_lock=threading.Lock()))


def _open(path: str, store_id: str, generation: int, end: int) -> Reader:
    """This process's Reader of the shard snapshot a task reads, checked as the graph needs it:
    the store and generation it was built for, at least `end` rows."""
    key = (path, store_id, generation)
    with _readers_lock:
        reader = _readers.get(key)
        if reader is not None:
            _readers.move_to_end(key)
    if reader is not None:
        try:
            # Sees a truncate or a store gone from its path (looked up at most every 50 ms).
            reader.refresh()
        except FileNotFoundError:
            reader = None  # opened again below, to say what is at the path now
    if reader is None or reader.generation != generation or len(reader) < end:
        with _readers_lock:
            _readers.pop(key, None)
        reader = _opened(path, store_id, generation, end)
        with _readers_lock:
            _readers[key] = reader
            while len(_readers) > _READERS_KEPT:
                _readers.popitem(last=False)
    return reader


def _opened(path: str, store_id: str, generation: int, end: int) -> Reader:
    reader = Reader(path)
    actual = reader.info(key_stats=False)["store_id"]
    if actual != store_id:
        raise FormatMismatchError(
            f"{path}: this worker sees store {actual}, not the store {store_id} the graph was "
            "built for (replaced since the graph was built, or another machine's disk at the "
            "same path)")
    if reader.generation > generation:
        raise _truncated_since(path, reader.generation, generation)
    if reader.generation < generation:
        raise FormatMismatchError(
            f"{path}: this worker sees generation {reader.generation} of the store, older than "
            f"generation {generation} the graph was built for: a copy taken before a truncate "
            "(copy the store again)")
    if len(reader) < end:
        raise FormatMismatchError(
            f"{path}: this worker sees {len(reader)} rows, not the {end} the graph was built "
            "for")
    return reader


def _truncated_since(path: str, seen: int, generation: int) -> FormatMismatchError:
    # A truncate keeps a prefix of the rows, but which one this snapshot cannot tell: rows past
    # it are new rows under the numbers the graph was built with.
    return FormatMismatchError(
        f"{path}: this worker sees generation {seen} of the store, not generation "
        f"{generation} the graph was built for: it was truncated since from_store, so these "
        "rows may be other rows now; call from_store again")


def _read(path: str, store_id: str, generation: int, end: int,
          read: Callable[[Reader], np.ndarray]) -> np.ndarray:
    """What `read` reads from this process's Reader of the shard snapshot (_open), read from
    that snapshot's generation. The Reader is shared by the tasks this process runs: another
    thread's task may refresh it across a truncate between this task's checks and its read,
    which then read the new generation's rows under the graph's row numbers, without a word.
    Its generation after the read says which one the read saw (a read and a refresh each hold
    the Reader's lock; generations only grow)."""
    reader = _open(path, store_id, generation, end)
    rows = read(reader)
    if reader.generation != generation:
        raise _truncated_since(path, reader.generation, generation)
    return rows


def _read_ranges(path: str, store_id: str, generation: int, ranges: tuple,
                 read: Callable[[Reader, int, int], np.ndarray]) -> np.ndarray:
    """`read` of each of the shard's row ranges ``ranges`` ((begin, end) pairs, ascending), as
    _read reads: one range is a view of the mapping; several (the rows ``unique`` keeps) are
    copied into one array."""
    def rows(reader: Reader) -> np.ndarray:
        parts = [read(reader, begin, end) for begin, end in ranges]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return _read(path, store_id, generation, ranges[-1][1], rows)


# The tasks (module functions: dask.distributed pickles them by name).
def _read_vectors(path: str, store_id: str, generation: int, ranges: tuple) -> np.ndarray:
    return _read_ranges(path, store_id, generation, ranges, lambda r, b, e: r.rows(b, e))


def _read_keys(path: str, store_id: str, generation: int, ranges: tuple) -> np.ndarray:
    return _read_ranges(path, store_id, generation, ranges, lambda r, b, e: r._native.keys(b, e))


def _read_epochs(path: str, store_id: str, generation: int, ranges: tuple) -> np.ndarray:
    return _read_ranges(path, store_id, generation, ranges,
                        lambda r, b, e: r._native.epochs(b, e))


def _empty(shape: tuple, dtype: str) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def _unique_ranges(shards: ShardSet) -> list:
    """The rows ``from_store(unique=True)`` keeps, as each shard's ascending (begin, end)
    ranges: each row but those whose (key, epoch) is stored again at a higher global row (the
    one ``ShardSet.find`` answers). From the rows' own keys and epochs, one stable sort of the
    whole set by (key, epoch): the cost does not grow with the number of shards, and neither a
    key index (a store without one, or one a slot of which is damaged) nor its state matters.
    Memory: the set's keys, epochs and the sort's order, about 32 bytes a row at its peak."""
    keys, epochs = shards.keys, shards.epochs  # copies, in global row order
    order = np.lexsort((epochs, keys))  # stable: the rows of one (key, epoch) stay ascending
    twin_after = np.zeros(len(order), dtype=bool)  # order[i + 1] holds order[i]'s pair
    if len(order) > 1:
        sorted_keys = keys[order]
        del keys  # (each column freed once sorted: the peak stays at about 32 bytes a row)
        twin_after[:-1] = sorted_keys[1:] == sorted_keys[:-1]
        del sorted_keys
        sorted_epochs = epochs[order]
        del epochs
        twin_after[:-1] &= sorted_epochs[1:] == sorted_epochs[:-1]
        del sorted_epochs
    keep = np.ones(len(order), dtype=bool)
    keep[order[twin_after]] = False
    del order, twin_after
    out = []
    for i in range(len(shards.shards)):
        mine = keep[int(shards.offsets[i]):int(shards.offsets[i + 1])]
        # Runs of kept rows: where keep changes, the shard's ends counted as not kept.
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mine.view(np.int8), [0]))))
        out.append([(int(b), int(e)) for b, e in zip(edges[0::2], edges[1::2])])
    return out


def _chunked(ranges: list, step: int) -> list:
    """``ranges`` cut into chunks of ``step`` rows (the last fewer): tuples of ranges."""
    chunks, current, size = [], [], 0
    for begin, end in ranges:
        while begin < end:
            take = min(end - begin, step - size)
            current.append((begin, begin + take))
            begin, size = begin + take, size + take
            if size == step:
                chunks.append(tuple(current))
                current, size = [], 0
    if current:
        chunks.append(tuple(current))
    return chunks


def from_store(path_or_manifest: Any, chunk_mb: float = 64,
               chunk_rows: Optional[int] = None, *, unique: bool = False) -> StoreArrays:
    """Dask arrays of every row of a store or of a set of shards (global row order, as
    ``embstore.ShardSet``), with no vector data in the graph.

    Args:
        path_or_manifest: a store directory, a manifest file, a directory with a manifest, or a
            list of store directories (as ``embstore.ShardSet``). Relative paths are resolved
            here, so the workers get absolute ones.
        chunk_mb: target chunk size of ``vectors`` in MiB (a positive number); chunks never
            span two shards.
        chunk_rows: rows per chunk (a positive integer), overriding ``chunk_mb``.
        unique: one row per (key, epoch): of rows stored twice (a Dask task run again, a run
            resumed without a truncate: README, "Writing from Dask tasks is at least once"),
            only the later, the one lookups answer (``ShardSet.find``); in row order. Worked
            out here from every row's key and epoch by one sort of the whole set (a few
            seconds and about 32 bytes a row in this process per 10 million rows, however
            many shards), and held in the graph as row ranges (a few when duplicates are
            few). A chunk of several ranges is a copy; a chunk of one is a view, as without
            ``unique``.

    Raises:
        ValueError: a chunk size that is not positive.

    Computing a task raises FormatMismatchError (an ``embstore.Error`` and a ValueError, as
    ``ShardSet`` raises it) naming the shard when the worker finds another store at its path,
    another generation of it (truncated since, or a copy older than the graph) or fewer rows
    than the graph's snapshot.
    """
    if chunk_rows is not None:
        chunk_rows = _check_integer(chunk_rows, "chunk_rows", "a positive integer")
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be a positive integer; got {chunk_rows}")
    else:
        chunk_mb = _number(chunk_mb, "chunk_mb", "MiB")
        if not 0 < chunk_mb < math.inf:
            raise ValueError(f"chunk_mb must be a positive number of MiB; got {chunk_mb}")
    # ShardSet.paths are absolute (each Reader's path: the working directory joined, not
    # normalised, as the kernel resolves "link/.." through the link).
    shards = ShardSet(path_or_manifest)
    try:
        dim, dtype = shards.dim, shards.shards[0].rows(0, 0).dtype.name  # as Reader.vectors
        row_bytes = dim * np.dtype(dtype).itemsize
        step = chunk_rows if chunk_rows is not None else max(
            1, int(chunk_mb * (1 << 20)) // row_bytes)
        # (path, store id, generation, row ranges) of every chunk, in row order.
        pieces = []
        kept = _unique_ranges(shards) if unique else None
        for i, (path, reader) in enumerate(zip(shards.paths, shards.shards)):
            store_id, rows = reader.info(key_stats=False)["store_id"], len(reader)
            generation = reader.generation
            ranges = kept[i] if unique else [(0, rows)] if rows else []
            pieces += [(path, store_id, generation, chunk) for chunk in _chunked(ranges, step)]
    finally:
        shards.close()

    token = tokenize(pieces, dim, dtype)
    row_chunks = tuple(sum(end - begin for begin, end in piece[3])
                       for piece in pieces) or (0,)

    def array(kind: str, read, shape_tail: tuple, np_dtype: str) -> da.Array:
        name = f"embstore-{kind}-{token}"
        index = (0,) * len(shape_tail)
        if pieces:
            graph = {(name, i) + index: (read, *piece) for i, piece in enumerate(pieces)}
        else:
            graph = {(name, 0) + index: (_empty, (0,) + shape_tail, np_dtype)}
        chunks = (row_chunks,) + tuple((n,) for n in shape_tail)
        return da.Array(graph, name, chunks, dtype=np_dtype)

    return StoreArrays(array("vectors", _read_vectors, (dim,), dtype),
                       array("keys", _read_keys, (), "uint64"),
                       array("epochs", _read_epochs, (), "uint64"))
