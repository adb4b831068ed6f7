"""embstore — a memory-mapped, append-only store of embedding rows, for Python.

Many processes append rows (a key, an epoch and a vector each) to one store at once while other
processes read every committed row zero-copy. The full concurrency and durability contract is at
the top of the C++ header ``include/embstore/embstore.h``; in short:

* ``append`` is atomic: a reader sees all rows of a batch or none of them.
* Any number of Writers in any number of processes may append to one store concurrently.
* Readers take no lock, never block writers, and need only read permission.
* ``sync()`` makes committed rows durable (they survive power loss); without it rows survive any
  process crash but not a power loss.
* A forked child must open its own Writer (using the parent's raises ForkedChildError);
  a Reader may be used across fork.

Quick start::

    import numpy as np, embstore
    embstore.create("run.emb", dim=768, dtype="float16", metadata={"model": "resnet"})
    with embstore.Writer("run.emb") as w:
        w.append(keys=np.arange(512), vectors=np.random.rand(512, 768).astype("f4"), epoch=0)
    r = embstore.Reader("run.emb")
    r.vectors          # (512, 768) float16 numpy view of the mapping, no copy
    r.keys, r.epochs   # uint64 views (strided: they live inside 32-byte index entries)

Exceptions (see ``embstore._errors``): ValueError for bad shapes/dtypes/arguments; OSError with
errno for files (FileNotFoundError, FileExistsError, ENOSPC, EROFS, ...); ``embstore.Error``
subclasses for corruption, format mismatch, unsupported version, poisoned writer, forked child
and closed objects.

PyTorch helpers (a Dataset over a store and a forward-hook recorder) are in ``embstore.torch``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

import numpy as np

from . import _embstore
from ._errors import (
    ClosedError,
    CorruptionError,
    Error,
    ForkedChildError,
    FormatMismatchError,
    PoisonedError,
    UnsupportedVersionError,
)

__all__ = [
    "create",
    "info",
    "Writer",
    "Reader",
    "VerifyReport",
    "Error",
    "CorruptionError",
    "FormatMismatchError",
    "UnsupportedVersionError",
    "PoisonedError",
    "ForkedChildError",
    "ClosedError",
    "DTYPES",
    "__version__",
    "FORMAT_VERSION",
]

__version__: str = _embstore.library_version
FORMAT_VERSION: str = _embstore.format_version
#: Element types a store can hold, by their canonical names.
DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "float64")

PathLike = Union[str, "os.PathLike[str]"]

# The C++ table of accepted spellings (embstore/dtype.h), so Python, C++ and the CLI agree.
_DTYPE_ALIASES = _embstore.dtype_aliases()


def _dtype_name(dtype: Any) -> str:
    """Canonical dtype name from a string, a numpy dtype/type or a torch dtype."""
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__module__ == "torch":  # torch.float16, torch.bfloat16, ...
        name = str(dtype).replace("torch.", "")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None
    canonical = _DTYPE_ALIASES.get(name.lower())
    if canonical is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return canonical


def _metadata_text(metadata: Any) -> str:
    if metadata is None:
        return ""
    if isinstance(metadata, (bytes, bytearray)):
        return bytes(metadata).decode("utf-8")
    if isinstance(metadata, str):
        return metadata
    return json.dumps(metadata, sort_keys=True)


def _segment_bytes(segment_mb: Optional[float]) -> Optional[int]:
    if segment_mb is None:
        return None
    return int(segment_mb * (1 << 20))


def create(path: PathLike, dim: int, dtype: Any = "float32", metadata: Any = None,
           segment_mb: Optional[float] = None) -> None:
    """Creates an empty store at ``path`` (which must not exist, or be an empty directory).

    Args:
        path: directory to create; the store appears whole or not at all.
        dim: elements per row, 1 .. 2**24.
        dtype: "float32", "float16", "bfloat16", "int8", "uint8" or "float64" (numpy and torch
            dtypes are accepted too). float16/bfloat16 stores also accept float32 input.
        metadata: free-form text stored in the header; a dict/list is stored as JSON and comes
            back as a dict from ``Reader.metadata``. At most 64 KiB.
        segment_mb: growth step of the data file in MiB (default 64); a multiple of 4 KiB.

    Raises:
        FileExistsError: a store (or a non-empty directory) is already there.
        ValueError: a bad dim, dtype, segment size or metadata.
    """
    _embstore.create_store(os.fspath(path), int(dim), _dtype_name(dtype),
                           _metadata_text(metadata), _segment_bytes(segment_mb))


def info(path: PathLike) -> dict:
    """The store's header and counters as a dict, read without any lock (like `embstore info`).

    Keys: path, format_version, dtype, dim, record_bytes, segment_bytes, store_id,
    created_unix_ns, metadata, generation, committed_rows, durable_rows, capacity_rows,
    data_file_bytes, index_file_bytes.
    """
    return _embstore.read_info(os.fspath(path))


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


def _as_vectors(vectors: Any):
    """(numpy array sharing the input's memory when possible, dtype override or None)."""
    if type(vectors) is np.ndarray:
        return vectors, None
    if _is_torch_tensor(vectors):
        if vectors.device.type != "cpu":
            raise ValueError(f"vectors are on {vectors.device}; move them to the CPU first "
                             "(tensor.cpu()), embstore reads host memory")
        t = vectors.detach()
        if str(t.dtype) == "torch.bfloat16":
            import torch
            # numpy has no bfloat16: hand over the raw 16-bit patterns (same memory, no copy).
            return t.view(torch.int16).numpy(), "bfloat16"
        return t.numpy(), None
    return np.asarray(vectors), None


def _as_ints(values: Any) -> np.ndarray:
    if type(values) is np.ndarray:
        return values
    if _is_torch_tensor(values):
        return values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == object or array.size == 0:
        array = np.asarray(values, dtype=np.uint64)
    return array


class _Handle:
    """What Writer and Reader both describe: the store they are open on (``_native``)."""

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._native is None or self._native.closed

    @property
    def dim(self) -> int:
        """Elements per row."""
        return self._native.dim

    @property
    def dtype(self) -> str:
        """Element type name: "float32", "float16", "bfloat16", "int8", "uint8" or "float64"."""
        return self._native.dtype

    @property
    def path(self) -> str:
        """The store directory."""
        return self._native.path


class Writer(_Handle):
    """Appends rows to a store; a context manager that closes on exit.

    ``Writer(path)`` opens an existing store. With ``dim`` given it creates the store when it is
    missing, else checks that it has this dim (and dtype): safe when several processes race to
    open the same path, which is how DDP ranks and data-loader workers should share a store.

    Synchronous mode (default): ``append`` returns the first row number after the rows are
    committed (visible to readers).

    Async mode (``async_queue_mb > 0``): ``append`` validates its arguments, queues the batch and
    returns None at once; a C++ background thread writes batches in order. The caller's array
    is *referenced, not copied* until it is written — do not modify it before ``flush()`` (the
    recorder in embstore.torch copies into a staging buffer for this reason). The queue is bounded: when the batches
    not yet written would exceed ``async_queue_mb``, ``append`` blocks (with the GIL released)
    until there is room; a single batch larger than the whole queue is accepted when the queue is
    empty. If a background append fails, that batch and all batches queued behind it are not
    written and the error is raised by the next ``append``/``flush``/``sync`` and by ``close``;
    it is never dropped silently.

    Input (``vectors``): a 2-D numpy array or CPU torch tensor of the store's dtype, or float32
    for a float16/bfloat16 store (converted, round to nearest even). torch bfloat16 tensors are
    accepted as is. Cost of layouts:

    * C-contiguous rows: no copy.
    * Rows with contiguous elements but a gap between them (e.g. ``x[::2]``, ``x[:, :d]`` of a
      wider array): no copy either — passed with their row stride.
    * Anything else (transposed, element-strided, negative or zero row strides): one contiguous
      copy first (counted in ``stats()["copied_batches"]``).

    ``keys`` and a per-row ``epoch`` are any 1-D integer arrays/lists/tensors of values >= 0;
    they are always copied (8 bytes per row).

    Thread-safety: one Writer may be used from several threads (calls are serialized). The GIL
    is released while rows are copied into the store, while waiting for queue room and in
    ``sync``/``flush``/``close``.

    Fork: a Writer belongs to the process that opened it; in a forked child every call raises
    ForkedChildError. Open a new Writer in the child.

    Args:
        path: the store directory.
        dim, dtype, metadata, segment_mb: create the store when missing (see ``create``); with
            ``dim`` given an existing store must match (FormatMismatchError otherwise). ``dtype``
            alone (no ``dim``) only checks an existing store's dtype.
        async_queue_mb: 0 for synchronous appends, else the queue bound in MiB.
        sync: "none" (sync only when asked), "every_append" (each append returns after its rows
            are durable) or "interval" (a background thread syncs every ``sync_interval`` s).
        map_bytes: address space reserved for the data file; the store can grow to this size
            (default 1 TiB). Appends beyond it fail with OSError(ENOSPC).
    """

    def __init__(self, path: PathLike, *, dim: Optional[int] = None, dtype: Any = None,
                 metadata: Any = None, segment_mb: Optional[float] = None,
                 async_queue_mb: float = 0, sync: str = "none", sync_interval: float = 1.0,
                 map_bytes: Optional[int] = None) -> None:
        self._native = None
        if async_queue_mb < 0:
            raise ValueError(f"async_queue_mb must be >= 0; got {async_queue_mb}")
        self._native = _embstore.NativeWriter(
            os.fspath(path), None if dim is None else int(dim),
            None if dtype is None else _dtype_name(dtype), _metadata_text(metadata),
            _segment_bytes(segment_mb), sync, float(sync_interval), map_bytes,
            int(async_queue_mb * (1 << 20)), False)

    def append(self, keys: Any, vectors: Any, epoch: Any = 0) -> Optional[int]:
        """Appends ``len(keys)`` rows atomically: readers see all of them or none.

        Args:
            keys: one sample id per row (integers >= 0).
            vectors: (rows, dim) numpy array or CPU torch tensor (see the class doc for dtypes
                and which layouts are copied).
            epoch: one int for every row, or one per row.

        Returns:
            The row number of the first appended row (synchronous mode), or None (async mode:
            rows get their numbers when the background thread writes them).

        Raises:
            ValueError: wrong shape, dim, dtype, lengths or negative keys; nothing is written.
            OSError: the disk is full (ENOSPC) or another I/O failure; nothing of this batch is
                written. In async mode also the error of an earlier background append.
            ForkedChildError, ClosedError, PoisonedError.
        """
        array, as_dtype = _as_vectors(vectors)
        if not isinstance(epoch, int):
            if isinstance(epoch, np.integer):
                epoch = int(epoch)
            else:
                epoch = _as_ints(epoch)
                if epoch.ndim == 0:  # a 0-d array or scalar tensor
                    epoch = int(epoch)
        return self._native.append(_as_ints(keys), epoch, array, as_dtype)

    def flush(self) -> None:
        """Waits until every batch appended so far is written (committed, visible to readers).

        A no-op in synchronous mode. Raises the error of a failed background append.
        """
        self._native.flush()

    def sync(self) -> None:
        """Flushes, then makes every committed row durable (survives power loss).

        A failed sync poisons the Writer: later calls raise PoisonedError until reopened.
        """
        self._native.sync()

    def close(self) -> None:
        """Writes what is queued, stops the background thread and releases the store.

        Idempotent. Raises the error of a failed background append (once), or of the final
        sync under sync="interval"/"every_append".
        """
        if self._native is not None:
            self._native.close()

    def stats(self) -> dict:
        """What this Writer wrote: batches, rows, bytes (as stored), append_seconds (time spent
        inside the C++ append — the write work itself), copied_batches (inputs that needed a
        contiguous copy), and for async mode queued_bytes, blocked_appends (append calls
        waiting for room right now) and dropped_batches (not written after an error)."""
        return self._native.stats()

    def committed_rows(self) -> int:
        """Rows visible to readers right now, written by any writer."""
        return self._native.committed_rows()

    def durable_rows(self) -> int:
        """Rows known to be on the device (a sync completed over them)."""
        return self._native.durable_rows()

    def info(self) -> dict:
        """As ``embstore.info(path)``."""
        return self._native.info()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:  # The body's exception is the one to report.
                pass

    def __del__(self) -> None:
        # An unclosed Writer is closed here; an error (e.g. of a background append) then goes
        # to sys.unraisablehook ("Exception ignored in ...") rather than vanishing.
        if getattr(self, "_native", None) is not None and not self._native.closed:
            self._native.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<embstore.Writer (closed)>"
        mode = "async" if self._native.is_async else "sync"
        return f"<embstore.Writer {self.path!r} dim={self.dim} dtype={self.dtype} {mode}>"


class VerifyReport:
    """Result of Reader.verify(): ``ok``, ``rows_checked``, ``bad_row_count``, ``bad_rows``
    (the first 1000 bad row numbers), ``begin_row``, ``end_row``. Truthy when ok."""

    def __init__(self, fields: dict) -> None:
        self.begin_row: int = fields["begin_row"]
        self.end_row: int = fields["end_row"]
        self.rows_checked: int = fields["rows_checked"]
        self.bad_row_count: int = fields["bad_row_count"]
        self.bad_rows: list = list(fields["bad_rows"])

    @property
    def ok(self) -> bool:
        return self.bad_row_count == 0

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return (f"VerifyReport(rows {self.begin_row}..{self.end_row}, checked="
                f"{self.rows_checked}, bad={self.bad_row_count}, bad_rows={self.bad_rows[:10]})")


class Reader(_Handle):
    """Reads a store zero-copy, without any lock and without writing a byte.

    A Reader sees the snapshot of rows committed at open or at its last ``refresh()``/``wait()``;
    rows in a snapshot never change. Every array it returns is a read-only numpy view straight
    into the store's mapping (no copy), whose ``.base`` chain ends in an object that keeps the
    mapping alive: a view stays valid after the Reader is closed or garbage-collected and while
    writers grow the store (the mapping never moves). A view covers the snapshot it was made
    from; take a new one after ``refresh()``.

    bfloat16 stores: numpy has no bfloat16, so ``vectors`` is a ``uint16`` array of the raw bit
    patterns (the upper 16 bits of a float32: ``(v.astype(np.uint32) << 16).view(np.float32)``
    converts). ``tensor()`` returns a torch.bfloat16 tensor over the same memory.

    Thread-safety: calls are serialized by an internal lock; views may be used from any thread.
    Fork: a Reader may be used in a forked child.
    """

    def __init__(self, path: PathLike, *, map_bytes: Optional[int] = None) -> None:
        """Opens the store at ``path``. Raises FileNotFoundError if it is not a store,
        CorruptionError / UnsupportedVersionError for a damaged or newer store."""
        self._native = None
        self._native = _embstore.NativeReader(os.fspath(path), map_bytes)
        self._metadata_cache = None

    def __len__(self) -> int:
        """Rows in the snapshot."""
        return self._native.size()

    def refresh(self) -> int:
        """Takes a new snapshot of the committed rows; returns its size (never smaller)."""
        return self._native.refresh()

    def wait(self, n: int, timeout: Optional[float] = None) -> bool:
        """Refreshes until the snapshot holds at least ``n`` rows or ``timeout`` seconds pass
        (None: no limit). Returns True when reached. Sleeps on the store's commit counter
        (woken by commits from any process), with the GIL released; Ctrl-C interrupts it."""
        return self._native.wait(int(n), timeout)

    @property
    def vectors(self) -> np.ndarray:
        """All rows of the snapshot, shape (len(self), dim), read-only, zero-copy
        (bfloat16: uint16 bit patterns, see the class doc)."""
        return self._native.vectors(0, None)

    def rows(self, begin: int, end: Optional[int] = None) -> np.ndarray:
        """Rows [begin, end) of the snapshot as a zero-copy view (ValueError outside it)."""
        return self._native.vectors(int(begin), None if end is None else int(end))

    @property
    def keys(self) -> np.ndarray:
        """Each row's key, uint64, zero-copy: a strided view (strides=(32,)) into the index."""
        return self._native.keys(0, None)

    @property
    def epochs(self) -> np.ndarray:
        """Each row's epoch, uint64, zero-copy, strided like ``keys``."""
        return self._native.epochs(0, None)

    def tensor(self, begin: int = 0, end: Optional[int] = None):
        """Rows [begin, end) as a torch tensor sharing the mapping (no copy): float32/float16/
        ... as stored, bfloat16 as torch.bfloat16. The tensor must not be written to (the
        mapping is read-only: a write would crash the process); clone it to modify."""
        import torch
        import warnings
        view = self.rows(begin, end)
        with warnings.catch_warnings():
            # torch warns that the array is not writable; that is the point of a read-only view.
            warnings.simplefilter("ignore", UserWarning)
            if self.dtype == "bfloat16":
                return torch.from_numpy(view.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(view)

    def verify(self, begin: int = 0, end: Optional[int] = None) -> VerifyReport:
        """Recomputes the checksums of rows [begin, end) of the snapshot (GIL released)."""
        return VerifyReport(self._native.verify(int(begin), None if end is None else int(end)))

    @property
    def metadata(self) -> Union[dict, list, str]:
        """The store's metadata: parsed JSON (a dict, usually) when it is JSON, else the text."""
        if self._metadata_cache is None:
            text = self._native.metadata.decode("utf-8", errors="replace")
            try:
                self._metadata_cache = (json.loads(text),) if text.strip() else (text,)
            except ValueError:
                self._metadata_cache = (text,)
        return self._metadata_cache[0]

    @property
    def metadata_text(self) -> str:
        """The store's metadata exactly as stored."""
        return self._native.metadata.decode("utf-8", errors="replace")

    def info(self) -> dict:
        """As ``embstore.info(path)`` (header plus the counters as they are now)."""
        return self._native.info()

    def close(self) -> None:
        """Drops this Reader's hold on the mappings. Views already made stay valid; further
        calls raise ClosedError. Idempotent."""
        if self._native is not None:
            self._native.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<embstore.Reader (closed)>"
        return f"<embstore.Reader {self.path!r} rows={len(self)} dim={self.dim} dtype={self.dtype}>"
