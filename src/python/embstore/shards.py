"""Several stores read as one: ``ShardSet``, manifests, ``merge``, and node identity.

Under torch.distributed each node writes its own store on node-local disk (a Writer refuses
network file systems); ``embstore.torch.EmbeddingRecorder(..., per_node=True)`` does this and
keeps a manifest (``manifest.json``) listing the shards. Afterwards (or while the stores are
quiescent) copy the node directories next to the manifest and read them as one::

    s = embstore.ShardSet("/data/run17")          # a manifest, its directory, or store paths
    len(s); s.find(key, epoch); s.history(key); s.epoch_rows(3); s.find_many(ids, epochs=3)
    s.shard_vectors(0)                            # zero-copy view of one shard's rows
    embstore.merge("/data/run17-merged.emb", "/data/run17")   # one store, checksums verified

The manifest format, its checks and the merge are the C++ core's (include/embstore/shard_set.h).
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import socket
import threading
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import (Error, FormatMismatchError, Reader, _check_1d, _check_u64, _dim_arg, _dtype_name,
               _embstore, _metadata_text, _not_a_store_check, _path_arg, _row_array,
               _u64_array)

__all__ = ["ShardSet", "merge", "read_manifest", "write_manifest", "node_name",
           "MANIFEST_NAME"]

#: File name of the manifest inside a directory of shards.
MANIFEST_NAME = "manifest.json"

PathLike = Union[str, "os.PathLike[str]"]


def _inputs(manifest_or_paths: Any) -> List[str]:
    """A manifest, its directory or store paths as a list of paths, each refused as
    ``_path_arg`` refuses it when it is not UTF-8 text."""
    if isinstance(manifest_or_paths, (str, bytes, os.PathLike)):
        return [_path_arg(manifest_or_paths)]
    paths = [_path_arg(p, f"path {i}") for i, p in enumerate(manifest_or_paths)]
    if not paths:
        raise ValueError("no manifest and no store given")
    return paths


@contextlib.contextmanager
def _stores_checked(inputs: List[str]):
    """Turns the core's FileNotFoundError (NotADirectoryError for a file) for a store path of
    ``inputs`` that exists but holds no store into NotAStoreError naming it, as Reader raises
    it. A single manifest input (the core's ``manifest_file`` rule) is left alone: its shards'
    errors name the manifest."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError) as error:
        if not (len(inputs) == 1 and _embstore.manifest_file(inputs[0]) is not None):
            # The core opens the paths in order and stops at the first it cannot: a missing
            # one keeps its error (which names it), one there but no store is NotAStoreError.
            for path in inputs:
                if not os.path.lexists(path):
                    break
                with contextlib.suppress(FileNotFoundError, NotADirectoryError), \
                        _not_a_store_check(path):
                    raise error  # NotAStoreError when this path exists but is no store
        raise


def _file_stamp(path: Optional[str]) -> Optional[Tuple[int, int, int, int]]:
    """(device, inode, size, modification ns) of the file at ``path`` now, the core's
    ``FileStamp``: a manifest replaced or rewritten stamps differently. None without one."""
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_manifest(path: PathLike) -> dict:
    """The manifest at ``path`` as a dict: dim, dtype, metadata (text) and shards (each a dict of
    path, store_id, rows, epochs, generation: the shard's then, 0 when not recorded). A shard of
    a newer generation now was truncated since, and is taken with fewer rows; of an older one,
    it is a stale copy. metadata "" (or none in the file): the manifest gives none, and a
    ShardSet's is its shards'. Raises ValueError for a shard path that is absolute or goes
    through ``..``, CorruptionError for a file that is not a manifest (naming the field: one
    given twice in an object, epochs not ascending, ...)."""
    return _embstore.read_manifest(_path_arg(path))


_MANIFEST_FIELDS = {"dim", "dtype", "metadata", "shards"}
_SHARD_FIELDS = {"path", "store_id", "rows", "epochs", "generation"}


def _manifest_fields(manifest: Any) -> dict:
    """``manifest`` checked field by field, as ``read_manifest`` returns one: dim, dtype and
    shards required, metadata optional (text, or a dict/list stored as JSON, as
    ``Writer(metadata=)`` takes it); each shard a dict of path and store_id (text), rows and,
    optionally, epochs (integers in [0, 2**64)). ValueError naming the field otherwise."""
    def fields_of(value: Any, what: str, allowed: set, required: Sequence[str]) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"{what} must be a dict; got {type(value).__name__}")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise ValueError(f"{what} has no field {unknown[0]!r} (its fields: "
                             f"{', '.join(sorted(allowed))})")
        for name in required:
            if name not in value:
                raise ValueError(f"{what} lacks the field {name!r}")

    def text(value: Any, what: str) -> str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"{what} must be text; got {type(value).__name__} {value!r}")
        try:
            value.encode("utf-8")
        except UnicodeError:  # lone surrogates: os.fsdecode's spelling of non-UTF-8 bytes
            raise ValueError(f"{what} {value!r} is not UTF-8 text; a manifest holds UTF-8 "
                             "(embstore paths must be UTF-8)") from None
        return value

    fields_of(manifest, "manifest", _MANIFEST_FIELDS, ("dim", "dtype", "shards"))
    shards = manifest["shards"]
    if not isinstance(shards, (list, tuple)):
        raise ValueError(f"manifest field 'shards' must be a list; got {type(shards).__name__}")
    out = []
    for i, shard in enumerate(shards):
        what = f"manifest shards[{i}]"
        fields_of(shard, what, _SHARD_FIELDS, ("path", "store_id", "rows"))
        epochs = shard.get("epochs", [])
        if isinstance(epochs, (str, bytes)) or not hasattr(epochs, "__iter__"):
            raise ValueError(f"{what}['epochs'] must be a list of integers; got "
                             f"{type(epochs).__name__} {epochs!r}")
        out.append({"path": text(shard["path"], f"{what}['path']"),
                    "store_id": text(shard["store_id"], f"{what}['store_id']"),
                    "rows": _check_u64(shard["rows"], f"{what}['rows']"),
                    "epochs": [_check_u64(e, f"{what}['epochs'][{j}]")
                               for j, e in enumerate(epochs)],
                    "generation": _check_u64(shard.get("generation", 0),
                                             f"{what}['generation']")})
    try:
        dim = _dim_arg(manifest["dim"])
        dtype = _dtype_name(manifest["dtype"])
        metadata = _metadata_text(manifest.get("metadata"))
    except ValueError as error:
        raise ValueError(f"manifest: {error}") from None
    return {"dim": dim, "dtype": dtype, "metadata": metadata, "shards": out}


def write_manifest(path: PathLike, manifest: dict) -> None:
    """Writes a manifest atomically (temporary file, fsync, rename, fsync of the directory).
    ``manifest`` is what ``read_manifest`` returns; metadata and each shard's epochs and
    generation may be left out, and metadata may be a dict or list (stored as JSON). Metadata
    left out (or "") gives none: a ShardSet's and a merged store's is then the shards' own, and
    a merge refuses shards that disagree on it. Raises ValueError naming the field of a value
    that is missing, of the wrong type or out of range, for a shard path that is absolute or
    goes through ``..``, for epochs not ascending, and for what ShardSet refuses to open: no
    shards, or a store id or path listed twice."""
    _embstore.write_manifest(_path_arg(path), _manifest_fields(manifest))


def merge(out: PathLike, manifest_or_paths: Any,
          progress: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """Consolidates the shards (a manifest, its directory, or store paths) into a new store at
    ``out``, keys and epochs kept, rows in epoch order: the shards merged as sorted sequences
    by (epoch, shard), each shard's own order kept, so that the merged store's latest row of a
    key (its last) is the one ``ShardSet.find(key)`` gives, not the last shard's (shards are
    written side by side), wherever each shard's epochs never go down; a shard whose epochs go
    down somewhere (a run resumed without a truncate) gets a warning naming it and the row,
    since within a shard the later row is a key's latest. Row numbers are not the ShardSet's. Every row's checksum is verified
    on the way: a bad row raises CorruptionError naming the shard and row, and nothing is left
    at ``out``. ``out`` is built in a hidden directory ``.<name>.partial-<hex>`` beside it and
    renamed into place only when complete: after any error nothing is left at ``out``, and a process
    killed meanwhile leaves only that directory, which is not the merged store. Shards that
    disagree on dim or dtype are refused (FormatMismatchError naming them), and unless a
    manifest gives the merged store's metadata, so are shards of different metadata; a shard
    whose metadata the manifest's replaces gets a warning naming it.
    ``progress(rows_done, rows_total, shard_path)`` is called after each chunk. Returns the new
    store's info (synced: durable). A store path that exists but holds no store raises
    NotAStoreError naming it, as ``Reader`` does."""
    out, inputs = _path_arg(out, "out"), _inputs(manifest_or_paths)

    def warn_epoch_drop(path: str, row: int, epoch: int, previous: int) -> None:
        warnings.warn(
            f"{path}: its epochs go down at row {row} ({epoch} after {previous}); rows are "
            "merged by epoch, so for a key stored there on both sides of that row, the merged "
            "store's latest row may be another than ShardSet.find gives (which keeps the "
            "shard's later row)", stacklevel=3)  # the frame that called merge()

    def warn_metadata_replaced(path: str, metadata: bytes, given: bytes) -> None:
        text, given_text = (m.decode("utf-8", errors="replace") for m in (metadata, given))
        warnings.warn(f"{path}: its metadata {_clip(text)} is not the manifest's "
                      f"{_clip(given_text)}; the merged store gets the manifest's",
                      stacklevel=3)  # the frame that called merge()

    with _stores_checked(inputs):
        info = _embstore.merge_stores(out, inputs, progress, warn_epoch_drop,
                                      warn_metadata_replaced)
    # Every row is in ``out``; only its key index could not be kept (derived data: the next
    # Writer builds it, lookups scan meanwhile).
    warning = info.pop("warning")
    if warning:
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    return info


def _clip(text: str) -> str:
    """Metadata text for a message: quoted, at most 80 characters of it."""
    return "'" + (text if len(text) <= 80 else text[:77] + "...") + "'"


def node_name() -> str:
    """This node's shard name: ``node-<GROUP_RANK>`` under torchrun (``NODE_RANK`` for other
    launchers), else ``host-<host name>``. Every local rank of a node gets the same name."""
    for variable in ("GROUP_RANK", "NODE_RANK"):
        value = os.environ.get(variable)
        if value is not None and value.strip().isdigit():
            return f"node-{int(value)}"
    return "host-" + re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


def _u64(values: Any, what: str) -> np.ndarray:
    """Keys or epochs checked as Reader.find_many checks them (an empty list is no keys)."""
    array = _u64_array(values, what)
    _check_1d(array, what)
    return np.ascontiguousarray(array)


def _row_number(what: str, row: Any) -> int:
    """Global row number ``row`` as an int, refused as Reader refuses one when it is a bool,
    float or str (ValueError "WHAT: row numbers are integers; got float 0.5"), which a
    comparison and numpy's searchsorted took as a row. An int outside the set is the caller's to
    refuse, naming the set's rows."""
    if isinstance(row, (bool, np.bool_)) or not isinstance(row, (int, np.integer)):
        Reader._row_number(what, row)  # raises, naming the value
    return int(row)


class ShardSet:
    """Several stores (shards) read as one logical store.

    Rows are numbered globally in shard order (shard 0's rows, then shard 1's, ...), each shard
    contributing its Reader's snapshot. ``refresh()`` takes new snapshots; it moves the global
    numbers of the rows of every shard after one that grew, so keep (shard, row) pairs across a
    refresh. A (key, epoch) stored more than once resolves to its highest global row (within a
    shard the later row, across shards the later shard); ``history`` shows every copy.

    Per-shard data is zero-copy (``shard_vectors``, ``shards[i].vectors``); ``rows``/``get``
    return a view when the rows lie in one shard, ``gather`` and the whole-set ``keys``/``epochs``
    copy. A ShardSet pickles as its shards and their snapshots (path, store id, generation,
    rows): the copy another process unpickles reopens each shard at the same snapshot, so its
    global row numbers, lengths and lookups are the original's, and it raises ``Error``
    naming the shard when it cannot be (truncated or replaced since, or fewer rows committed
    there). Its ``refresh()`` then takes new snapshots as usual.

    ``paths`` holds each shard's absolute path, as ``Reader.path`` does: a relative one is taken
    relative to the working directory at construction, so a copy unpickled in a process with
    another working directory opens the same stores.

    Args:
        manifest_or_paths: a manifest file, a directory holding ``manifest.json``, a store
            directory, or a list of store directories.

    Raises:
        FileNotFoundError: a shard listed in the manifest, or a store path given, is missing
            (named).
        NotAStoreError: a store path given exists but is not a store (named).
        FormatMismatchError: shards disagree with each other or the manifest on dim or dtype, or
            a shard's store id differs from its manifest entry (named).
        ValueError: a manifest shard path is absolute or goes through ``..``, or a path given
            is not UTF-8 text (named; nothing is opened).
    """

    def __init__(self, manifest_or_paths: Any, *, map_bytes: Optional[int] = None) -> None:
        self._inputs = _inputs(manifest_or_paths)
        self._map_bytes = map_bytes
        with _stores_checked(self._inputs):
            # The core's checks. The manifest's stamp first: one replaced meanwhile is read again
            # at the next refresh().
            self._manifest = _embstore.manifest_file(self._inputs[0]) \
                if len(self._inputs) == 1 else None
            if self._manifest is not None:
                # Absolute, so that refresh() reads the same file from any working directory
                # (and a pickled copy in another one); joined, not normalised (as Reader.path).
                self._manifest = os.path.join(os.getcwd(), self._manifest)
            self._manifest_stamp = _file_stamp(self._manifest)
            # The core checks the shards (against the manifest, and each other) with Readers of
            # its own; the set's are opened after, so a shard replaced or truncated in between
            # would be taken unchecked: then the core checks again.
            for _ in range(3):
                paths, metadata, store_ids, generations = _embstore.resolve_shards(
                    self._inputs, map_bytes)
                readers = [Reader(p, map_bytes=map_bytes) for p in paths]
                if [r.info(key_stats=False)["store_id"] for r in readers] == store_ids and \
                        [r.generation for r in readers] == generations:
                    break
                for r in readers:
                    r.close()
            else:
                raise Error(f"{self._inputs[0]}: its shards were replaced or truncated each of "
                            "the 3 times the set was opened; open it again once they are not")
        self.metadata_text: str = metadata.decode("utf-8", errors="replace")
        self._shards: Optional[List[Reader]] = readers
        # Each Reader's path, made absolute by the core at open: joined to the working directory,
        # not normalised (os.path.abspath would take "link/.." lexically, to another directory
        # than the kernel's). What a pickled copy reopens.
        self.paths: List[str] = [r.path for r in self._shards]
        self._store_ids = list(store_ids)
        self._renumber()

    @property
    def shards(self) -> List[Reader]:
        """Each shard's Reader, in shard order."""
        if self._shards is None:
            self._reopen()
        return self._shards

    @property
    def offsets(self) -> np.ndarray:
        """Global row number of each shard's row 0, then the set's length."""
        if self._shards is None:
            self._reopen()
        return self._offsets

    def _renumber(self) -> None:
        sizes = np.array([len(r) for r in self._shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # Each shard's snapshot (path, store id, generation, rows): what a pickled copy reopens
        # (also once the set is closed).
        self._snapshots = [(path, store_id, r.generation, len(r)) for path, store_id, r in
                           zip(self.paths, self._store_ids, self._shards)]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def refresh(self, follow_manifest: bool = True) -> int:
        """New snapshots of every shard; then (unless ``follow_manifest`` is False: the shards
        held only; a live view calls follow_manifest() apart, so that a shard listed before it
        is there does not stop it showing the others), for a set opened from a manifest whose file has
        changed since it was last read (replaced by ``write_manifest`` or a recorder's
        ``end_epoch()``, or rewritten), reads it again and adds the shards it now lists that the
        set does not hold (by store id: a node's first ``end_epoch()`` lists its shard), checked
        as the constructor checks them, after the shards held, in the manifest's order: shard
        numbers and (shard, row) pairs stay valid. A shard the manifest no longer lists stays,
        and a manifest removed since is not read. Returns the new length.

        When a shard's refresh, the manifest or a new shard raises (a shard listed before it
        was copied next to the manifest, say; FormatMismatchError for a manifest now of another
        dim or dtype), the set is renumbered for what it then holds (the shards refreshed and
        added before the error with their new snapshots, the rest as they were) before the
        error propagates: its length, rows and lookups agree with each other, as C++
        ``ShardSet::refresh`` promises, and the next refresh() tries again."""
        shards = self.shards
        try:
            for reader in shards:
                reader.refresh()
            if follow_manifest:
                self.follow_manifest()
        finally:
            self._renumber()
        return len(self)

    def follow_manifest(self) -> int:
        """For a set opened from a manifest: reads it again if its file changed since it was
        last read and adds the shards it lists that the set does not hold, as ``refresh()`` does
        (raising what it raises), without refreshing the shards held. Returns how many shards
        it added. Another store id listed at the path of a shard held (a run started over) is
        FormatMismatchError: open a new ShardSet.

        The core's rules, as C++ ``ShardSet::refresh`` applies them: the manifest must keep the
        set's dim and dtype; entries whose store id the set holds are skipped (neither opened
        nor checked again); each other one, in the manifest's order, is opened and checked as
        the constructor checks it (missing, not a store, another store id, fewer rows than
        recorded or a stale generation, another dim or dtype: named errors). When one fails,
        the shards added before it stay (the set renumbered), its error is raised, and the next
        call reads the manifest again: it counts as read only once every entry was handled."""
        if self._manifest is None:
            return 0
        if self._shards is None:
            self._reopen()
        stamp = _file_stamp(self._manifest)
        if stamp is None or stamp == self._manifest_stamp:
            return 0
        # Stamped before the read: a manifest replaced again meanwhile is read at the next call.
        manifest = _embstore.read_manifest(self._manifest)
        _embstore.check_manifest_unchanged(self._manifest, manifest, self.dim, self.dtype)
        added = 0
        try:
            for entry in manifest["shards"]:
                if entry["store_id"] in self._store_ids:
                    continue
                path = _embstore.listed_shard_path(self._manifest, entry)
                self._refuse_another_store_at_a_held_path(path, entry["store_id"])
                reader = Reader._of_native(_embstore.open_listed_shard(
                    self._manifest, entry, path, self.dim, self.dtype, self._map_bytes,
                    self._store_ids, self.paths))
                self._shards.append(reader)
                self.paths.append(reader.path)
                self._store_ids.append(entry["store_id"])
                added += 1
        finally:
            if added:
                self._renumber()
        self._manifest_stamp = stamp
        return added

    def _refuse_another_store_at_a_held_path(self, path: str, store_id: str) -> None:
        """FormatMismatchError when ``path`` (of a manifest entry whose store ``store_id`` the
        set does not hold) is where a shard held is: a store deleted and made again, not one to
        add beside the old one, whose Reader still maps the deleted files. Paths compared
        without "." parts (those held may be relative, "./s0")."""
        held_at = [os.path.normpath(p) for p in self.paths]
        if os.path.normpath(path) in held_at:
            held = self._store_ids[held_at.index(os.path.normpath(path))]
            raise FormatMismatchError(
                f"{self._manifest}: shard {path} is now listed as store {store_id}, not the "
                f"store {held} this set holds there (deleted and made again?): open a new "
                "ShardSet")

    @property
    def dim(self) -> int:
        return self.shards[0].dim

    @property
    def dtype(self) -> str:
        return self.shards[0].dtype

    def locate(self, row: int) -> Tuple[int, int]:
        """(shard index, row inside the shard) of global row ``row`` (an integer: ValueError
        for a bool, float or str; IndexError outside the set)."""
        row = _row_number("locate", row)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        shard = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return shard, int(row - self.offsets[shard])

    def shard_vectors(self, shard: int) -> np.ndarray:
        """Every row of one shard's snapshot, zero-copy."""
        if isinstance(shard, (bool, np.bool_)):  # operator.index takes True as shard 1
            raise ValueError(f"shard_vectors: shard indices are integers; got "
                             f"{type(shard).__name__} {shard!r}")
        shard = operator.index(shard)
        if not 0 <= shard < len(self.shards):
            raise IndexError(f"shard {shard} outside [0, {len(self.shards)}): the set has "
                             f"{len(self.shards)} shard(s)")
        return self.shards[shard].vectors

    def rows(self, begin: int, end: int) -> np.ndarray:
        """Global rows [begin, end): a zero-copy view when they lie in one shard, else a copy.
        Row numbers are integers, refused as Reader.rows refuses them (a float was truncated:
        rows(0.5, 2.5) gave rows [0, 2)); ValueError unless 0 <= begin <= end <= len(self)."""
        begin, end = _row_number("rows", begin), _row_number("rows", end)
        if not 0 <= begin <= end <= len(self):
            raise ValueError(f"rows [{begin}, {end}) outside [0, {len(self)})")
        parts = []
        for i, reader in enumerate(self.shards):
            lo, hi = max(begin, self.offsets[i]), min(end, self.offsets[i + 1])
            if lo < hi:
                parts.append(reader.rows(int(lo - self.offsets[i]), int(hi - self.offsets[i])))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return self.shards[0].rows(0, 0)
        return np.concatenate(parts)

    def gather(self, rows: Any) -> np.ndarray:
        """The vectors of global rows ``rows`` (any order; 1-D integers as from find_many,
        checked as Reader.gather checks them; -1 gives a row of zeros) as one new
        (len(rows), dim) array. IndexError naming the first other row outside the set."""
        rows = _row_array(rows, "gather")
        outside = np.flatnonzero((rows < -1) | (rows >= len(self)))
        if outside.size:
            raise IndexError(f"gather: row {int(rows[outside[0]])} is outside the ShardSet's "
                             f"{len(self)} rows (-1 gives a row of zeros)")
        out = np.empty((rows.size, self.dim), dtype=self.shards[0].vectors.dtype)
        out[rows == -1] = 0
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for i, reader in enumerate(self.shards):
            mine = shard == i
            if mine.any():
                out[mine] = reader.vectors[rows[mine] - self.offsets[i]]
        return out

    @property
    def keys(self) -> np.ndarray:
        """Every row's key in global order (a copy: the shards' keys are not contiguous)."""
        return np.concatenate([r.keys for r in self.shards]).astype(np.uint64, copy=False)

    @property
    def epochs(self) -> np.ndarray:
        """Every row's epoch in global order (a copy)."""
        return np.concatenate([r.epochs for r in self.shards]).astype(np.uint64, copy=False)

    def find_many(self, keys: Any, epochs: Any = None) -> np.ndarray:
        """Global rows (int64, -1 where absent) of (keys[i], epochs[i]); ``epochs`` may be one
        int for all keys, or None for each key's latest row (``find``). 1-D arrays, as
        Reader.find_many."""
        keys = _u64(keys, "keys")
        if epochs is not None and np.ndim(epochs) == 0:  # one epoch for every key
            epochs = _u64(np.broadcast_to(np.asarray(epochs), keys.shape), "epochs")
        elif epochs is not None:
            epochs = _u64(epochs, "epochs")
        out = np.full(len(keys), -1, dtype=np.int64)
        # Without epochs: of each shard's latest row, the one of the highest epoch.
        best = np.zeros(len(keys), dtype=np.uint64)
        for i, reader in enumerate(self.shards):
            found = np.asarray(reader.find_many(keys, epochs), dtype=np.int64)
            hit = np.flatnonzero(found >= 0)
            if epochs is None and len(hit):
                epoch = np.asarray(reader.epochs)[found[hit]].astype(np.uint64)
                newer = (out[hit] < 0) | (epoch >= best[hit])
                hit = hit[newer]
                best[hit] = epoch[newer]
            out[hit] = found[hit] + self.offsets[i]  # later shards win ties: the higher row
        return out

    def find(self, key: int, epoch: Optional[int] = None) -> Optional[int]:
        """Global row of (key, epoch) (the higher one if stored twice), or of the latest row of
        ``key``: of each shard's latest row of it, the one of the highest epoch, and of several
        of that epoch the higher global row. (Shards are written side by side, so their order
        says nothing of time: the last shard's row of a key may be of an earlier epoch than
        another's.) None when absent."""
        key = _check_u64(key, "find: key")
        epoch = None if epoch is None else _check_u64(epoch, "find: epoch")
        row = int(self.find_many([key], None if epoch is None else [epoch])[0])
        return None if row < 0 else row

    def get(self, key: int, epoch: Optional[int] = None) -> np.ndarray:
        """The vector of ``find(key, epoch)`` as a zero-copy view, confirmed to be of ``key``
        (and ``epoch``) as ``Reader.get`` does; KeyError when absent."""
        if epoch is None:
            row = self.find(key)
            if row is None:
                raise KeyError(key)
            shard, local = self.locate(row)
            return self.shards[shard].get(key, int(self.shards[shard].epochs[local]))
        for reader in reversed(self.shards):  # The highest global row: the last shard's.
            try:
                return reader.get(key, epoch)
            except KeyError:
                continue
        raise KeyError((key, epoch))

    def history(self, key: int) -> List[Tuple[int, int]]:
        """Every (global row, epoch) of ``key``, in global row order."""
        out = []
        for i, reader in enumerate(self.shards):
            out.extend((row + int(self.offsets[i]), epoch) for row, epoch in reader.history(key))
        return out

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Global rows of ``epoch``, ascending (int64)."""
        return np.concatenate([r.epoch_rows(epoch) + self.offsets[i]
                               for i, r in enumerate(self.shards)]).astype(np.int64)

    @property
    def metadata(self) -> Any:
        """The manifest's metadata when it gives one (not ""), else shard 0's, parsed as JSON
        when it is JSON."""
        import json
        try:
            return json.loads(self.metadata_text) if self.metadata_text.strip() else ""
        except ValueError:
            return self.metadata_text

    def info(self, key_stats: bool = True) -> List[dict]:
        """``info(key_stats)`` of every shard."""
        return [r.info(key_stats) for r in self.shards]

    def verify(self) -> bool:
        """True when every shard's ``Reader.verify()`` is ok: every row passes its checksum,
        each shard's key index agrees with its offset index (a damaged key index makes it False
        though lookups still answer, by scanning), both copies of its header hold, and no rows
        wait to be cut after a reboot (``VerifyReport.rows_to_cut``). ``[r.verify() for r in
        shards]`` says which shard and why."""
        return all(r.verify().ok for r in self.shards)

    def close(self) -> None:
        for reader in self._shards or []:
            reader.close()

    def __enter__(self) -> "ShardSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        return {"inputs": self._inputs, "map_bytes": self._map_bytes, "paths": self.paths,
                "metadata_text": self.metadata_text, "snapshots": self._snapshots,
                "manifest": self._manifest, "manifest_stamp": self._manifest_stamp}

    def __setstate__(self, state):
        # The shards pickled, at their snapshots: the inputs (a manifest) may list others by now.
        # Opened at first use, not here: an error raised while a multiprocessing Pool or
        # DataLoader worker unpickles its task kills the worker and loses the task (the parent
        # waits forever or hears "exited unexpectedly"); raised by a call, it reaches the parent.
        self._inputs, self._map_bytes = state["inputs"], state["map_bytes"]
        self.paths, self.metadata_text = list(state["paths"]), state["metadata_text"]
        self._snapshots, self._shards = state["snapshots"], None
        self._store_ids = [store_id for _, store_id, _, _ in self._snapshots]
        self._manifest = state.get("manifest")
        self._manifest_stamp = state.get("manifest_stamp")
        self._open_lock = threading.Lock()

    def _reopen(self) -> None:
        """Opens an unpickled copy's shards at their pickled snapshots, or raises Error naming
        the first that cannot be (and stays unopened: every call raises it again). Once, when
        several threads make the first call."""
        with self._open_lock:
            if self._shards is None:
                self._open_snapshots()

    def _open_snapshots(self) -> None:
        shards: List[Reader] = []
        try:
            for path, store_id, generation, rows in self._snapshots:
                reader = Reader(path, map_bytes=self._map_bytes, max_rows=rows)
                shards.append(reader)
                seen = (reader.info(key_stats=False)["store_id"], reader.generation, len(reader))
                if seen != (store_id, generation, rows):
                    raise Error(f"{path}: this process sees store {seen[0]}, generation "
                                f"{seen[1]}, {seen[2]} rows; the pickled ShardSet holds a "
                                f"snapshot of store {store_id}, generation {generation}, "
                                f"{rows} rows (truncated, replaced or cut since), so its row "
                                "numbers would name other rows here; make a new ShardSet")
        except BaseException:
            for reader in shards:
                reader.close()
            raise
        self._shards = shards
        self._renumber()

    def __repr__(self) -> str:
        # From the snapshots alone: a set unpickled (or closed) opens its shards at first use,
        # which may raise (a shard truncated since), and dask logs the repr of a failed task's
        # arguments.
        rows = sum(rows for *_, rows in self._snapshots)
        if self._shards is None:
            return f"<embstore.ShardSet {len(self._snapshots)} shards rows={rows} (not open)>"
        return (f"<embstore.ShardSet {len(self._shards)} shards rows={rows} dim={self.dim} "
                f"dtype={self.dtype}>")
