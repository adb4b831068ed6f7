"""embstore — a memory-mapped, append-only store of embedding rows, for Python.

Many processes append rows (a key, an epoch and a vector each) to one store at once while other
processes read every committed row zero-copy. The full concurrency and durability contract is at
the top of the C++ header ``include/embstore/embstore.h``; in short:

* ``append`` is atomic: a reader sees all rows of a batch or none of them.
* Any number of Writers in any number of processes may append to one store concurrently.
* Readers take no lock, never block writers, and need only read permission.
* ``sync()`` makes committed rows durable (they survive power loss); without it rows survive any
  process crash but not a power loss. By default (``sync="interval"``) a Writer also syncs in
  the background every ``DEFAULT_SYNC_INTERVAL`` seconds and at ``close``; ``sync="none"`` opts out.
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

Exceptions (see ``embstore._errors``): ValueError for bad shapes/dtypes/arguments (including
a float, bool or str where an integer is needed, e.g. an epoch); OSError with errno for files
(FileNotFoundError, FileExistsError, ENOSPC, EROFS, ...); ``embstore.Error`` subclasses for a
path that is not a store, corruption, format mismatch, unsupported version, poisoned writer,
forked child and closed objects.

Nothing appended is dropped silently: Writers (and ``embstore.torch.EmbeddingRecorder``) still
open when the interpreter exits, when a ``multiprocessing`` child ends (it leaves through
``os._exit``; multiprocessing's finalizers run first) or when they are garbage-collected write
what they hold and close. Rows that cannot be written then are reported on the ``embstore``
logger (printed to stderr when logging is not configured), naming the store and the row count.

PyTorch helpers (a Dataset over a store and a forward-hook recorder) are in ``embstore.torch``.
"""

from __future__ import annotations

import atexit
import collections.abc
import errno
import json
import logging
import math
import multiprocessing.util as _mp_util
import os
import reprlib
import signal
import stat
import sys
import threading
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np

from . import _embstore
from ._errors import (
    ClosedError,
    CorruptionError,
    Error,
    ForkedChildError,
    FormatMismatchError,
    NotAStoreError,
    PoisonedError,
    UnsupportedVersionError,
)

__all__ = [
    "create",
    "info",
    "salvage",
    "Writer",
    "Reader",
    "VerifyReport",
    "Record",
    "Error",
    "NotAStoreError",
    "CorruptionError",
    "FormatMismatchError",
    "UnsupportedVersionError",
    "PoisonedError",
    "ForkedChildError",
    "ClosedError",
    "DTYPES",
    "__version__",
    "FORMAT_VERSION",
    "DEFAULT_SYNC_INTERVAL",
]

__version__: str = _embstore.library_version
FORMAT_VERSION: str = _embstore.format_version
#: Seconds between a Writer's background syncs under the default sync="interval".
DEFAULT_SYNC_INTERVAL: float = _embstore.default_sync_interval
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
        try:
            return bytes(metadata).decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"metadata must be UTF-8 text; the bytes given are not: "
                             f"{error}") from None
    if isinstance(metadata, str):
        return metadata
    try:
        return json.dumps(metadata, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be text, UTF-8 bytes or JSON-serializable; "
                         f"{error}") from None


def _number(value: Any, what: str, unit: str) -> float:
    """A real number (not a bool or str) as a float; NaN refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number of {unit}; got {type(value).__name__} "
                         f"{value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    if math.isnan(number):
        raise ValueError(f"{what} is nan; it must be a number of {unit}")
    return number


def _dim_arg(dim: Any) -> int:
    dim = _check_integer(dim, "dim")
    if not 1 <= dim <= _embstore.max_dim:
        raise ValueError(f"dim {dim} is outside 1..{_embstore.max_dim}")
    return dim


def _same_metadata(given: str, stored: str) -> bool:
    """True when metadata ``given`` for a store is what it has: the same text or the same JSON
    value (as the CLI's import compares them: ``same_metadata`` in tools/lib/import.cc)."""
    if given == stored:
        return True
    try:
        # Re-serialized rather than compared with ==, which takes true for 1.
        return (json.dumps(json.loads(given), sort_keys=True) ==
                json.dumps(json.loads(stored), sort_keys=True))
    except ValueError:  # either is not JSON, and the texts differ
        return False


def _segment_bytes(segment_mb: Optional[float]) -> Optional[int]:
    if segment_mb is None:
        return None
    mb = _number(segment_mb, "segment_mb", "MiB")
    if not mb > 0:
        raise ValueError(f"segment_mb is {segment_mb!r}; it must be a positive number of MiB")
    if not mb < _U64_LIMIT / (1 << 20):
        raise ValueError(f"segment_mb is {segment_mb!r}: too large for a segment")
    segment_bytes = int(mb * (1 << 20))  # the store checks the rest (at least a row, ...)
    if segment_bytes % 4096:
        raise ValueError(f"segment_mb is {segment_mb!r}: {segment_bytes} bytes, not a whole "
                         "number of 4 KiB pages (a multiple of 1/256 MiB)")
    return segment_bytes


def _path_arg(path: Any, what: str = "path") -> str:
    """A store's (or an output's) path, given as str, bytes or os.PathLike, as str; checked
    before anything is opened or created. Every public function and class taking one passes it
    through here.

    The store hands its paths back as UTF-8 text (``Reader.path``, ``info``, error messages,
    the exit handlers that name a Writer's store), so a path that is not UTF-8 text is refused
    with ValueError naming it (``what`` and its repr): bytes that do not decode as UTF-8, a str
    holding lone surrogates (``os.fsdecode``'s and ``os.listdir``'s spelling of such bytes), or
    a relative path in a working directory whose own path is not UTF-8 (a store is known by
    its absolute path). UTF-8 bytes are decoded. os.fspath's TypeError for anything else."""
    given = path
    path = os.fspath(path)
    try:
        text = path.decode("utf-8") if isinstance(path, bytes) else path
        text.encode("utf-8")
    except UnicodeError:
        raise ValueError(f"{what} {given!r} is not UTF-8 text; embstore paths must be UTF-8 "
                         "(rename it, or choose another path)") from None
    if not os.path.isabs(text):
        try:
            cwd = os.getcwd()
        except OSError:  # no working directory: opening the path says so
            return text
        try:
            cwd.encode("utf-8")
        except UnicodeError:
            raise ValueError(f"{what} {given!r} is relative to the working directory {cwd!r}, "
                             "which is not UTF-8 text; embstore paths must be UTF-8 (give an "
                             "absolute path, or change directory)") from None
    return text


def create(path: PathLike, dim: int, dtype: Any = "float32", metadata: Any = None,
           segment_mb: Optional[float] = None, key_index: bool = True) -> None:
    """Creates an empty store at ``path`` (which must not exist, or be an empty directory).

    Args:
        path: directory to create; the store appears whole or not at all.
        dim: elements per row, 1 .. 2**24.
        dtype: "float32", "float16", "bfloat16", "int8", "uint8" or "float64" (numpy and torch
            dtypes are accepted too). float16/bfloat16 stores also accept float32 input.
        metadata: free-form text stored in the header; a dict/list is stored as JSON and comes
            back as a dict from ``Reader.metadata``. At most 64 KiB.
        segment_mb: growth step of the files in MiB (default 64); a multiple of 4 KiB.
        key_index: True (the default): writers keep a key index, so ``find``/``get``/
            ``history`` answer in constant time, at up to 112 bytes per row on disk. False: no
            key index; lookups scan every row's key (O(rows) each). For stores of short rows
            that must stay small. Fixed for the store's life.

    Raises:
        FileExistsError: a store (or a non-empty directory) is already there.
        ValueError: a bad dim, dtype, segment size or metadata, or a path that is not UTF-8
            text (as every function and class of embstore taking a store path refuses it), or
            a path on a network or FUSE file system, where every Writer would refuse the store
            (unless EMBSTORE_ALLOW_REMOTE_FS=1: README, "Several machines").
    """
    if not isinstance(key_index, bool):
        raise ValueError(f"key_index must be True or False; got {key_index!r}")
    _embstore.create_store(_path_arg(path), _dim_arg(dim), _dtype_name(dtype),
                           _metadata_text(metadata), _segment_bytes(segment_mb), key_index)


def info(path: PathLike) -> dict:
    """The store's header and counters as a dict, read without any lock (like `embstore info`).

    The keys are the field names of the C++ ``StoreInfo`` (include/embstore/store.h), which the
    CLI's ``info --json`` uses too: path, format_major, format_minor (ints; the format version
    is "{format_major}.{format_minor}"), dtype (name), dim, record_bytes, segment_bytes,
    keeps_key_index (``create``'s key_index), store_id (32 hex digits), created_unix_ns,
    metadata (text), generation, committed_rows, durable_rows, rows_to_cut (after a reboot
    no Writer has recovered the store from yet: rows the header counts as committed that did
    not survive it whole, which no Reader shows and the next Writer's open cuts;
    committed_rows and durable_rows leave them out), capacity_rows, last_commit_unix_ns
    (wall-clock ns of the latest commit as its writer recorded it; 0 when unknown: no commit
    yet, or only commits by libraries older than format 1.3), data_file_bytes,
    index_file_bytes; from the key index: distinct_keys, epochs ({epoch: rows}), key_index
    (its state, or why lookups scan) and key_index_used (True when these come from the key
    index, False when from a scan).

    Raises:
        FileNotFoundError: nothing at ``path``.
        NotAStoreError: ``path`` exists but is not a store.
        ValueError: ``path`` is not UTF-8 text.
    """
    path = _path_arg(path)
    with _not_a_store_check(path):
        return _embstore.read_info(path)


def salvage(store: PathLike, out: PathLike) -> dict:
    """Copies every row of a damaged store whose checksum verifies into a new store ``out``.

    For stores too damaged to open: trusts a fixed header copy whose checksum holds and each
    row's own checksum; the counters only where they keep their rules (committed_rows tells
    which rows were committed, durable_rows which were synced: committed rows past the end of
    files cut short are reported lost), and the files' sizes bound what is read. Copies the
    committed rows that verify, and past them whole batches that verify whose era does not go
    back (as recovery after a reboot keeps them). Rows keep their order, keys and epochs; ``out``
    gets the same dtype, dim and metadata and must not exist. Writes nothing to ``store``.

    Returns a dict: header_source ("primary" or "copy"), rows_scanned, rows_copied, rows_lost,
    lost_ranges (a list of (begin, end) row ranges of the damaged store that did not verify) and
    warning (empty, or why ``out``'s key index could not be kept, also given as a
    RuntimeWarning: every row is in ``out``, lookups scan until its next Writer builds the index)
    and damage (a list of messages, each naming the file and field: why the store does not open,
    such as a damaged counter or a ``generation`` field naming files that do not exist; a
    damaged second header copy; rows copied past the committed counter, or that verify past the
    rows scanned and were not copied; files cut short below the committed counter, whose rows
    past their end are lost; empty when the store is sound) and writer_active (True when a
    writer held the store's lock while it was read, or its committed counter moved: the rows
    committed when salvage read the counter were scanned, the writer's later rows are neither
    copied nor damage).

    ``out`` is built in a hidden directory ``.<name>.partial-<hex>`` beside it and renamed into
    place only when complete: on an error (a full disk, say) nothing is left at ``out``. A
    process killed meanwhile leaves that directory, which is not the salvaged store.

    Raises:
        CorruptionError: neither copy of the header verifies, or the ``generation`` field is
            damaged and the directory does not hold exactly one rows.X/index.X pair.
        FileExistsError: ``out`` exists.
    """
    store, out = _path_arg(store, "store"), _path_arg(out, "out")
    with _not_a_store_check(store):
        report = _embstore.salvage(store, out)
    if report["warning"]:
        # Every row is in ``out``; only its key index could not be kept (derived data: the next
        # Writer builds it, lookups scan meanwhile).
        import warnings
        warnings.warn(report["warning"], RuntimeWarning, stacklevel=2)
    return report


class _not_a_store_check:
    """Turns the FileNotFoundError of opening a path that exists but holds no store (no
    header) into NotAStoreError naming the path; a missing path stays FileNotFoundError. (A
    store that has its header but misses rows.G or index.G is damage: CorruptionError naming
    the file, from the core.) With ``creates`` (a Writer, which can create a store), the error
    says where one can be created; a read-only opener (Reader, info, salvage, ShardSet, and so
    ``embstore serve``) creates none, and gets no such advice."""

    def __init__(self, path: str, creates: bool = False) -> None:
        self.path = path
        self.creates = creates

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or not issubclass(exc_type, (FileNotFoundError, NotADirectoryError)):
            return False
        advice = "; to create a store, give a new path or an empty directory" if self.creates \
            else ""
        # One look at the path: with two (isdir, then lexists) a store another process renamed
        # into place between them was called a file.
        try:
            is_dir = stat.S_ISDIR(os.stat(self.path).st_mode)
        except FileNotFoundError:
            if not os.path.islink(self.path):
                return False  # nothing there (yet): the error stands
            is_dir = False  # a symbolic link to nothing, as before
        except OSError as error:
            if error.errno != errno.ELOOP:
                return False  # a parent that is a file (ENOTDIR), say: the core's error stands
            is_dir = False  # a looping symbolic link: something is there
        if is_dir:
            if os.path.lexists(os.path.join(self.path, "header")):
                return False  # a store that lost another file: the error names that file
            if not os.listdir(self.path):
                what = "is an empty directory, not an embstore store"
                if self.creates:
                    advice = " (a Writer given dim= creates one in it)"
            else:
                what = "is a directory but not an embstore store (it has no 'header' file)"
        else:
            what = "is a file, not an embstore store (a store is a directory)"
        error = NotAStoreError(f"{self.path}: {what}{advice}")
        error.errno = errno.ENOTDIR if what.startswith("is a file") else exc.errno or 0
        raise error from exc


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


# What Python sequences (lists, tuples: no dtype of their own) are converted to, by store dtype.
# numpy has no bfloat16: float32 rows are converted by the store (round to nearest even).
_SEQUENCE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32,
                    "float64": np.float64, "int8": np.int8, "uint8": np.uint8}


def _sequence_rows(vectors: Any, store_dtype: str) -> np.ndarray:
    """A list of rows (or another sequence without a dtype of its own: not a buffer or an
    object with ``__array__``, see ``_has_dtype``) as an array of the store's dtype."""
    target = np.dtype(_SEQUENCE_DTYPES[store_dtype])
    if isinstance(vectors, (list, tuple)) and any(_is_torch_tensor(row) for row in vectors):
        # Rows as tensors ([model(x) for x in xs]): each as the numpy row it holds, then as a list
        # of numpy rows (numpy reads a list of tensors as objects, and calls equal shapes ragged).
        vectors = [_tensor_row(row, i) if _is_torch_tensor(row) else row
                   for i, row in enumerate(vectors)]
    try:
        values = np.asarray(vectors)
    except ValueError:  # numpy's words for a ragged list
        def shape(row):
            try:
                return str(np.shape(row))
            except ValueError:
                return "ragged"
        shapes = sorted({shape(row) for row in vectors}, key=lambda text: (len(text), text))
        raise ValueError(f"vectors: rows of different shapes ({', '.join(shapes)}); every row "
                         "must be dim numbers") from None
    if values.dtype.kind not in "iuf":  # bools too: refused as numpy and torch bool arrays are
        raise ValueError(f"vectors: a {type(vectors).__name__} of {values.dtype} values; "
                        "rows must hold numbers")
    if target.kind in "iu":
        with np.errstate(invalid="ignore"):
            converted = values.astype(target)
        if values.dtype != target and not np.array_equal(converted, values):
            limits = np.iinfo(target)
            where = tuple(int(i) for i in np.argwhere(converted != values)[0])
            at = f"row {where[0]}, column {where[1]}" if len(where) == 2 else f"index {where}"
            raise ValueError(f"vectors: {values[where]!r} at {at} is not an integer in "
                             f"[{limits.min}, {limits.max}], so it cannot be stored in a "
                             f"{store_dtype} store; nothing was appended")
        return converted
    return _rounded_once(values, store_dtype)


def _tensor_row(row: Any, i: int) -> np.ndarray:
    """Row ``i`` of a list of rows, a torch tensor, as a numpy array of its values (a copy is made
    of the whole list afterwards): bfloat16 as float32, which holds each value exactly."""
    if row.device.type != "cpu":
        raise ValueError(f"vectors: row {i} is on {row.device}; move the rows to the CPU first "
                         "(torch.stack(rows).cpu()), embstore reads host memory")
    row = row.detach()
    return (row.float() if str(row.dtype) == "torch.bfloat16" else row).numpy()


def _rounded_once(values: np.ndarray, store_dtype: str,
                  rows: Optional[Sequence[int]] = None) -> np.ndarray:
    """Numbers for a float store (float16, bfloat16, float32 or float64), each rounded once to
    nearest even (never twice through float32; bfloat16 as float32 the store rounds exactly).
    A finite value that would become infinite raises ValueError naming its row (``rows[i]``),
    here, before anything is appended or queued."""
    if store_dtype == "bfloat16":
        return _bfloat16_ready(values, rows)
    # A signalling NaN raises numpy's "invalid" flag as it is converted (to a NaN: nothing is
    # wrong with the value), and an overflow is refused below: no warning for either.
    with np.errstate(over="ignore", invalid="ignore"):
        converted = values.astype(_SEQUENCE_DTYPES[store_dtype])
    _refuse_overflow(values, converted, store_dtype, rows)
    return converted


def _bfloat16_ready(values: np.ndarray, rows: Optional[Sequence[int]] = None) -> np.ndarray:
    """Numbers (float64, float32, float16 or integers) as float32 that the store rounds to
    bfloat16 as rounding each value once would (numpy has no bfloat16). Through float32 with
    rounding to nearest, a value could land on a tie and round again (to infinity, or the
    wrong neighbour); so float64 is rounded to odd instead (toward zero, the last bit set when
    inexact): with float32's 16 more bits, the store's rounding of that is the value's own.
    A value that would become infinite raises ValueError naming its row (``rows[i]``)."""
    if values.dtype.kind in "iu":
        values = values.astype(np.float64)  # exact below 2^53; beyond, rounded once here
    _refuse_overflow(values, np.where(np.abs(values) >= _BFLOAT16_OVERFLOW, np.inf, 0.0),
                     "bfloat16", rows)
    # A signalling NaN raises numpy's "invalid" flag as it is converted or compared (it stays
    # a NaN: nothing is wrong with the value): no warning.
    with np.errstate(invalid="ignore"):
        if values.dtype != np.float64:
            return values.astype(np.float32)  # exact
        near = values.astype(np.float32)  # below the limit, so finite
        cut = np.where(np.abs(near) > np.abs(values), np.nextafter(near, np.float32(0)), near)
        return (cut.view(np.uint32) | (cut != values)).view(np.float32)


# The smallest magnitude that rounds to infinity in bfloat16: halfway between its largest finite
# value, (2 - 2^-7) * 2^127, and 2^128 (the tie goes to the even neighbour, infinity).
_BFLOAT16_OVERFLOW = (2 - 2.0 ** -8) * 2.0 ** 127
_FLOAT_LARGEST = {"float16": " (largest 65504)", "bfloat16": " (largest 3.3895314e+38)",
                  "float32": " (largest 3.4028235e+38)"}


def _refuse_overflow(values: np.ndarray, converted: np.ndarray, store_dtype: str,
                     rows: Optional[Sequence[int]] = None) -> None:
    """Raises ValueError when a finite value of ``values`` became infinite in ``converted``
    (beyond the range of the float type it was converted to), naming its row (``rows[i]`` for
    row i of ``values`` when given) and column: storing it would not store what was passed."""
    overflowed = np.isinf(converted) & np.isfinite(values)
    if overflowed.any():
        at = np.unravel_index(int(np.flatnonzero(overflowed)[0]), overflowed.shape)
        row, column = (at[0], at[1]) if len(at) == 2 else (0, at[0])
        row = int(row) if rows is None else int(rows[int(row)])
        largest = _FLOAT_LARGEST.get(store_dtype, "")
        raise ValueError(f"vectors: row {row}, column {int(column)}: {values[at]!r} is beyond "
                         f"{store_dtype}'s range{largest} and would be stored as infinity; "
                         "scale or clip it, or use a wider dtype")


def _as_vectors(vectors: Any, store_dtype: str):
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
    if isinstance(vectors, np.ndarray):  # a subclass (np.matrix, memmap): as given
        return np.asarray(vectors), None
    if _has_dtype(vectors):  # refused as an array of its dtype would be, never converted
        return np.asarray(vectors), None
    return _sequence_rows(vectors, store_dtype), None


def _has_dtype(obj: Any) -> bool:
    """True for an object numpy reads as an array of a dtype of its own, not a list of Python
    numbers: one with ``__array__``, ``__array_interface__`` or ``__array_struct__``, or a
    buffer (memoryview, array.array, bytearray). Lists, tuples, str and bytes are not."""
    if isinstance(obj, (list, tuple, str, bytes)):
        return False
    if any(hasattr(obj, name) for name in ("__array__", "__array_interface__",
                                           "__array_struct__")):
        return True
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


_U64_LIMIT = 1 << 64


def _check_integer(value: Any, what: str, expected: str = "an integer") -> int:
    """`value` as an int: a Python or numpy integer, never a bool (numpy's too), float or
    string, which int() would turn into one. The error says "{what} must be {expected}"."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be {expected}; got {type(value).__name__} {value!r}")
    return int(value)


def _check_u64(value: Any, what: str) -> int:
    """`value` as an int in [0, 2**64): rejects bools, floats, strings and out-of-range ints.
    A 0-d numpy array or torch tensor (``ids[0]`` of a DataLoader batch) counts as its value,
    as append takes one for an epoch."""
    if (isinstance(value, np.ndarray) or _is_torch_tensor(value)) and value.ndim == 0:
        value = value.item()
    value = _check_integer(value, what, "an integer in [0, 2**64)")
    if not 0 <= value < _U64_LIMIT:
        raise ValueError(f"{what} is {value}; it must be in [0, 2**64)")
    return value


def _first_bool(values: Any) -> Optional[int]:
    """The index of the first bool (or numpy bool) in a list or tuple, else None: numpy reads
    [True, 2] as the integers [1, 2], and a bool is never a key, epoch or row number."""
    if isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            if isinstance(value, (bool, np.bool_)):
                return i
    return None


def _as_ints(values: Any, what: str) -> np.ndarray:
    """Keys or per-row epochs as a 1-D integer array (range and sign are checked by the caller
    for Python ints here, for arrays by the C++ module)."""
    if type(values) is np.ndarray:
        return values
    if _is_torch_tensor(values):
        return values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        return np.asarray(values)
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{what} must be integers; got {type(values).__name__} {values!r}")
    array = np.asarray(values)
    if array.dtype.kind in "iu" and _first_bool(values) is None:
        return array
    if array.ndim == 0 and array.dtype == object:
        # numpy makes one object of what is no sequence (a set, a generator, None), which the
        # C++ module would call "0 dims": say what it is.
        given = f"{type(values).__name__} {reprlib.repr(values)}"
        if isinstance(values, (set, frozenset)):
            given += ", which has no order: which row would get which value?"
        elif isinstance(values, collections.abc.Iterator):
            given = f"{type(values).__name__}, which is no sequence: pass list(...) of it"
        raise ValueError(f"{what} must be integers, one per row (a list, tuple, range, array "
                         f"or tensor); got {given}")
    if array.ndim != 1 or array.dtype.kind not in "bifO":
        return array  # the C++ module names the wrong shape or dtype
    # Checked one by one: numpy made floats of [-1, 2**63], an object array of [2**64], and 1
    # of True; none of these is a valid key.
    items = values if isinstance(values, (list, tuple)) else array.tolist()
    return np.fromiter((_check_u64(v, f"{what}[{i}]") for i, v in enumerate(items)),
                       dtype=np.uint64, count=array.size)


def _u64_arg(value: Any, what: str) -> int:
    """A key, epoch or count as an int in [0, 2**64), refused as ``_check_u64`` refuses it."""
    if type(value) is int and 0 <= value < _U64_LIMIT:  # the common case, checked cheaply
        return value
    return _check_u64(value, what)


def _check_int_array(array: np.ndarray, what: str) -> None:
    """Refuses, as append does, an array of keys or epochs whose dtype is not an integer one
    (bool, float, object) or that holds a negative value; the error names the first."""
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers in [0, 2**64); got dtype {array.dtype}, "
                         f"first value {array.reshape(-1)[0]!r}")
    if array.dtype.kind == "i" and array.size and int(array.min()) < 0:
        flat = np.asarray(array).reshape(-1)
        i = int(np.argmax(flat < 0))
        raise ValueError(f"{what}[{i}] is negative ({int(flat[i])}); keys and epochs are "
                         "integers in [0, 2**64)")


def _check_1d(array: np.ndarray, what: str) -> None:
    """Refuses keys, epochs or row numbers for a lookup that are not one 1-D array: a lookup
    answers one row per item, and read flat a 2-D array (or a scalar) would get answers in a
    shape the caller did not ask for."""
    if array.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one per lookup); got shape {array.shape}")


def _u64_array(values: Any, what: str) -> np.ndarray:
    """Keys or epochs (an array, list or tensor) as a uint64 array, checked as append checks
    them: never truncated (floats) or wrapped (negative values)."""
    array = _as_ints(values, what)
    _check_int_array(array, what)
    return np.asarray(array, dtype=np.uint64)


def _row_array(rows: Any, caller: str, hint: str = " (-1 for none)") -> np.ndarray:
    """Row numbers (a list, array or tensor) as a 1-D int64 array: never a bool or float read
    as a row, never a uint64 wrapped to a negative one. Errors name ``caller``; ``hint``
    follows "rows must be integer row numbers" in them."""
    bad = _first_bool(rows)
    if bad is not None:
        raise ValueError(f"{caller}: rows must be integer row numbers{hint}; "
                         f"rows[{bad}] is {type(rows[bad]).__name__} {rows[bad]!r}")
    array = np.asarray(rows.detach().cpu().numpy() if _is_torch_tensor(rows) else rows)
    _check_1d(array, f"{caller}: rows")
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{caller}: rows must be integer row numbers{hint}; got "
                         f"dtype {array.dtype}, first value {array.reshape(-1)[0]!r}")
    if array.dtype.kind == "u" and array.size and int(array.max()) >= 1 << 63:
        raise ValueError(f"{caller}: row {int(array.max())} is beyond any store")
    return np.asarray(array, dtype=np.int64)


def _epoch_arg(epoch: Any) -> Any:
    """An epoch for every row (an int in [0, 2**64)) or per-row epochs (a 1-D array)."""
    if type(epoch) is int and 0 <= epoch < _U64_LIMIT:  # the common case, checked cheaply
        return epoch
    if epoch is None:  # not "no epoch": numpy would make it an object, "0 dims" of epochs
        raise ValueError("epoch must be an integer in [0, 2**64) for every row, or one per row; "
                         "got None")
    if isinstance(epoch, (int, np.integer, bool, np.bool_, float, np.floating, str, bytes)):
        return _check_u64(epoch, "epoch")
    if isinstance(epoch, np.ndarray) or _is_torch_tensor(epoch):
        array = _as_ints(epoch, "epoch")
        if array.ndim == 0:  # a 0-d array or a scalar tensor: one epoch for every row
            return _check_u64(array.item(), "epoch")
        return array
    return _as_ints(epoch, "epoch")


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

    def __copy__(self) -> None:
        """Refused (TypeError), as pickling is: a copy would share this object's open native
        Writer or Reader, and closing either (``close()``, or a Writer's ``__del__`` when the
        copy is garbage-collected) would close the other under its user."""
        kind = type(self).__name__
        raise TypeError(f"a {kind} cannot be copied: the copy would share its open store, and "
                        f"closing one would close the other; share the {kind} object itself, "
                        f"or open another {kind}(path)")

    def __deepcopy__(self, memo: dict) -> None:
        self.__copy__()

    def __reduce__(self) -> None:
        """Refused (TypeError) naming the store: its mappings and open files are this process's.
        What to send another process (a multiprocessing or dask worker) instead is its path."""
        kind = type(self).__name__
        where = "a closed store" if self.closed else self.path
        hint = " or an embstore.ShardSet of it (which pickles as its snapshot)" \
            if kind == "Reader" else ""
        raise TypeError(f"a {kind} of {where} cannot be pickled: its mappings and open files are "
                        f"this process's; send the store's path{hint}, and open a {kind} there")


class Writer(_Handle):
    """Appends rows to a store; a context manager that closes on exit.

    ``Writer(path)`` opens an existing store. With ``dim`` given it creates the store when it is
    missing, else checks that it has this dim (and dtype): safe when several processes race to
    open the same path, which is how DDP ranks and data-loader workers should share a store.

    Synchronous mode (default): ``append`` returns the first row number after the rows are
    committed (visible to readers).

    Async mode (``async_queue_mb > 0``): ``append`` validates its arguments, queues the batch and
    returns None; a C++ background thread writes batches in order. The queue is a buffer of
    ``async_queue_mb`` MiB, allocated once and reused (its pages are touched only as batches
    fill them; 2 MiB pages where the system gives them, so filling it takes few page faults);
    every batch is written from it, never from the caller's memory. While batches come at a
    steady pace, the thread naps until the next one is due and takes it then (at most about
    one interval between batches later), so that ``append`` need not wake it; ``flush()``
    always wakes it, and after two intervals without a batch it sleeps until the next append:

    * ``append(..., copy=True)`` (the default) copies the rows into the queue before it
      returns (at memcpy speed; float32 rows for a float16/bfloat16 store are converted as they
      are copied, so a value beyond the store's range raises ValueError from this call and
      nothing is queued), so the caller may reuse or change its array or tensor at once:
      what is stored is what it held at the call.
    * ``append(..., copy=False)`` donates the array: the call only takes a reference and
      returns at once; the background thread copies the rows into the queue just before it
      writes them. You promise not to modify the array (or anything sharing its memory) until
      ``flush()`` returns; if you do, which values are stored is undefined — but each stored
      row still matches its checksum, because rows are hashed from the copy that is written.
      Rows to be converted are converted then too, so a value beyond a float16/bfloat16
      store's range fails the background append (below), not this call.

    When the rows not yet written would overflow the queue, ``append`` blocks (with the GIL
    released) until there is room. A single batch larger than the whole queue is written by
    the calling thread instead, after everything queued before it (so ``append`` then returns
    when it is committed, like a synchronous append). If a background append fails, that batch
    and all batches queued behind it are not written and the error is raised by the next
    ``append``/``flush``/``sync`` and by ``close``; it is never dropped silently. The Writer
    then takes no more rows until the store is opened again: later calls raise
    ``PoisonedError`` naming the failure (not the failure again: space freed since does not
    make the Writer take rows). A batch the background append refused (a donated array's value
    beyond the store's dtype) is raised as ``PoisonedError`` naming it from the first, not
    ValueError: the later call's own input was fine.

    Synchronous mode and batches larger than the queue are read from the caller's memory
    while ``append`` runs: another thread that modifies the array during the call decides which
    values are stored (as with any function reading it), but never makes a stored row fail its
    checksum: each row is hashed from the copy that is written.

    Input (``vectors``): a 2-D numpy array or CPU torch tensor of the store's dtype, or float32
    for a float16/bfloat16 store (converted, round to nearest even; a finite value beyond the
    store's range raises ValueError naming its row and column instead of being stored as
    infinity, and nothing of the batch is written). torch bfloat16 tensors are
    accepted as is. Arrays and tensors of other dtypes are refused, never converted silently
    (a float64 array for a float32 store is usually a mistake; pass ``x.astype(np.float32)`` or
    ``t.float()``); so are other objects that carry a dtype (a memoryview or other buffer, an
    ``array.array``, an object with ``__array__`` or ``__array_interface__``), taken as the
    array numpy reads from them. Python lists (and tuples) of rows have no dtype of their own
    and are converted to the store's dtype (float32 for a bfloat16 store, then rounded by the store;
    values of an int8/uint8 store must be integers in range, those of a float store finite
    in it unless infinite already), whatever each row is: numbers, numpy rows or CPU tensors
    alike (a list of float64 or int32 tensor rows is stored rounded where the stacked tensor
    would be refused: stack it to have its dtype checked). Cost of layouts:

    * C-contiguous rows: no copy.
    * Rows with contiguous elements but a gap between them (e.g. ``x[::2]``, ``x[:, :d]`` of a
      wider array): no copy either — passed with their row stride.
    * Anything else (transposed, element-strided, negative or zero row strides): one contiguous
      copy first (counted in ``stats()["copied_batches"]``).

    ``keys`` and a per-row ``epoch`` are any 1-D integer arrays/lists/tensors of values in
    [0, 2**64); they are always copied (8 bytes per row). bools, floats, strings, negative and
    too large values are refused (ValueError).

    Exit: a Writer still open when the interpreter exits (atexit), when a ``multiprocessing``
    child ends, or when it is garbage-collected is flushed and closed then. A failure then
    (e.g. a full disk) is logged on the ``embstore`` logger with the store's path and the number
    of rows lost (when ``__del__`` closes it, the error also goes to ``sys.unraisablehook``).
    So is a failed close at the end of a ``with`` block whose body raised: the body's exception
    is raised, with that failure added to it as a note.
    In a ``multiprocessing`` child (a Pool or DataLoader worker) whose SIGTERM has its default
    action, opening a Writer has SIGTERM run these exit handlers and then end the child with
    exit status 0: multiprocessing sends it in ordinary shutdowns (``Pool.terminate()``, which
    ``with Pool() as pool:`` calls, and the parent's exit for daemon children).
    Nothing can run when a process is killed otherwise (SIGKILL, or SIGTERM outside such a
    child) or leaves through ``os._exit`` outside multiprocessing: queued rows are then lost,
    so call ``close()`` or ``flush()``.

    Thread-safety: one Writer may be used from several threads (calls are serialized). The GIL
    is released while rows are copied into the store, while waiting for queue room and in
    ``sync``/``flush``/``close``.

    Fork: a Writer belongs to the process that opened it; in a forked child every call raises
    ForkedChildError, except ``close()`` (and a ``with`` block's end), which does nothing there:
    the parent's rows and lock stay the parent's. Open a new Writer in the child.

    Args:
        path: the store directory (UTF-8 text: str, bytes or os.PathLike; else ValueError).
        dim, dtype, metadata, segment_mb, key_index: create the store when missing (see
            ``create``; ``dtype`` float32 unless given, ``key_index`` True unless given). An
            existing store must have the ``dim`` and ``dtype`` (float32 when ``dim`` is given
            without one) and each of ``metadata``, ``segment_mb`` and ``key_index`` given (with
            ``dim`` or not): FormatMismatchError naming the field otherwise, the Writer closed
            again and nothing appended (metadata compares as text, or as the same JSON value).
            ``dtype`` alone (no ``dim``) only checks an existing store's dtype.
        async_queue_mb: 0 for synchronous appends, else the queue bound in MiB (rounded up to
            whole bytes).
        sync: "interval" (the default: a background thread syncs every ``sync_interval``
            seconds when rows were committed since, and ``close`` syncs, so a reboot re-checks
            at most the last interval's rows), "every_append" (each append returns after its
            rows are durable) or "none" (sync only when asked; ``close`` flushes nothing).
        sync_interval: seconds between background syncs, > 0 and at most 1e9, rounded up to
            whole milliseconds; None is the library's default
            (``embstore.DEFAULT_SYNC_INTERVAL``, 5 s).
        map_bytes: address space reserved for the data and index files together, rounded up to
            whole segments; the store can grow to that size (default 1 TiB). Appends beyond it
            fail with OSError(ENOSPC).
        huge_pages: keep the rows in 2 MiB page-cache pages, which every later reader maps in
            one step: each write that enters a 2 MiB block of the data file carries zeros to
            the block's end, past the rows it commits (a new process's first scan ~8x faster on
            the benchmark VM, appends at 0.7-0.9x of a plain writer's there at the median, some
            runs far slower) (WriterOptions::huge_pages; bench/RESULTS.md, "2 MiB pages from
            the writes themselves").
        expected_rows: how many rows you expect the store to hold (None: no guess). A key
            index this writer builds (creating the store) or grows gets tables for at least
            that many rows at once, so the store's rows are indexed once instead of again at
            every doubling of the tables (about a third of a writer's CPU at 768 floats a row
            on the benchmark VM). The tables take 35-70 bytes per expected row on disk from
            the start; rows past the guess grow them as usual (WriterOptions::expected_rows).
    """

    def __init__(self, path: PathLike, *, dim: Optional[int] = None, dtype: Any = None,
                 metadata: Any = None, segment_mb: Optional[float] = None,
                 async_queue_mb: float = 0, sync: str = "interval",
                 sync_interval: Optional[float] = None,
                 map_bytes: Optional[int] = None, key_index: Optional[bool] = None,
                 huge_pages: bool = False, expected_rows: Optional[int] = None) -> None:
        self._native = None
        self._at_exit = None
        queue_mb = _number(async_queue_mb, "async_queue_mb", "MiB")
        if not 0 <= queue_mb < _U64_LIMIT / (1 << 20):
            raise ValueError(f"async_queue_mb is {async_queue_mb!r}; use 0 for synchronous "
                             "appends, else the queue's size in MiB")
        # Rounded up: a queue asked for is at least a byte, never a silently synchronous Writer.
        queue_bytes = math.ceil(queue_mb * (1 << 20))
        if sync_interval is not None:
            sync_interval = _number(sync_interval, "sync_interval", "seconds")  # range: native
        if map_bytes is not None:
            map_bytes = _check_u64(map_bytes, "map_bytes")
        if key_index is not None and not isinstance(key_index, bool):
            raise ValueError(f"key_index must be True or False; got {key_index!r}")
        if not isinstance(huge_pages, bool):
            raise ValueError(f"huge_pages must be True or False; got {huge_pages!r}")
        expected = 0 if expected_rows is None else _check_u64(expected_rows, "expected_rows")
        path = _path_arg(path)
        metadata_text = _metadata_text(metadata)
        segment_bytes = _segment_bytes(segment_mb)
        try:
            with _not_a_store_check(path, creates=True):
                self._native = _embstore.NativeWriter(
                    path, None if dim is None else _dim_arg(dim),
                    None if dtype is None else _dtype_name(dtype), metadata_text, segment_bytes,
                    sync, sync_interval, map_bytes, queue_bytes, False,
                    True if key_index is None else key_index, huge_pages, expected)
        except FormatMismatchError as error:
            if dim is None or dtype is not None or "dtype" not in str(error):
                raise
            raise FormatMismatchError(
                f"{error} (float32 is what a Writer given dim= without dtype= creates, and so "
                "expects of a store that exists: pass the store's dtype=)") from None
        if metadata is not None or segment_mb is not None or key_index is not None:
            self._refuse_other_creation(metadata_text if metadata is not None else None,
                                        segment_bytes, key_index)
        self._dtype_name = self._native.dtype
        self._append = self._native.appender()  # the native append, called without a dispatcher
        # Runs at interpreter exit and in multiprocessing children before their os._exit
        # (multiprocessing.util._exit_function); holds the native writer, not this object, so
        # garbage collection still reaches __del__.
        self._at_exit = _mp_util.Finalize(self, _close_at_exit, args=(self._native,),
                                          exitpriority=_WRITER_EXIT_PRIORITY)
        _leave_cleanly_on_sigterm()

    def _refuse_other_creation(self, metadata_text: Optional[str],
                               segment_bytes: Optional[int], key_index: Optional[bool]) -> None:
        """FormatMismatchError (the native Writer closed) when the store opened was created with
        other metadata, segment size or key-index choice than those given (None: not given)."""
        header = self._native.info(False)
        mismatch = None
        if metadata_text is not None and not _same_metadata(metadata_text, header["metadata"]):
            mismatch = f"metadata {header['metadata']!r}, not metadata={metadata_text!r}"
        elif segment_bytes is not None and segment_bytes != header["segment_bytes"]:
            mismatch = (f"segments of {header['segment_bytes'] / (1 << 20):g} MiB, not "
                        f"segment_mb={segment_bytes / (1 << 20):g}")
        elif key_index is not None and key_index != header["keeps_key_index"]:
            mismatch = (f"key_index={header['keeps_key_index']}, not key_index={key_index}")
        if mismatch is None:
            return
        path = self._native.path
        self._native.close()
        raise FormatMismatchError(
            f"{path}: the store exists, created with {mismatch}; these are fixed when a store "
            "is created (leave them out to open it as it is)")

    def append(self, keys: Any, vectors: Any, epoch: Any = 0, *,
               copy: bool = True) -> Optional[int]:
        """Appends ``len(keys)`` rows atomically: readers see all of them or none.

        Args:
            keys: one sample id per row (integers in [0, 2**64)).
            vectors: (rows, dim) numpy array or CPU torch tensor, or a list of rows (of
                numbers, numpy arrays or CPU tensors; see the class doc for dtypes and which
                layouts are copied).
            epoch: one int for every row, or one per row.
            copy: async mode only. True (default): the rows are copied before the call returns;
                the caller may change its array at once. False: the array is donated; do not
                modify it until ``flush()`` (see the class doc).

        Returns:
            The row number of the first appended row (synchronous mode), or None (async mode:
            rows get their numbers when the background thread writes them).

        Raises:
            ValueError: wrong shape, dim, dtype, lengths, or a key or epoch that is not an
                integer in [0, 2**64) (bool, float, str, negative, too large); nothing is
                written.
            OSError: the disk is full (ENOSPC) or another I/O failure; nothing of this batch is
                written. In async mode also the error of an earlier background append.
            ForkedChildError, ClosedError, PoisonedError.
        """
        if type(keys) is np.ndarray and type(vectors) is np.ndarray and type(epoch) is int \
                and 0 <= epoch < _U64_LIMIT:
            # The first case of each helper below, inline: in a training loop this call comes
            # after a step that left the caches cold, where each Python call costs microseconds.
            return self._append(keys, epoch, vectors, None, copy)
        if isinstance(vectors, (list, tuple)) and not vectors:  # no rows: of any dim, so ours
            vectors = np.empty((0, self.dim), np.dtype(_SEQUENCE_DTYPES[self._dtype_name]))
        try:
            array, as_dtype = _as_vectors(vectors, self._dtype_name)
            keys, epoch = _as_ints(keys, "keys"), _epoch_arg(epoch)
        except ValueError as error:
            if type(error) is not ValueError:
                raise
            # Named as the C++ module names what it refuses: the store, then the call.
            raise ValueError(f"{self.path}: append: {error}") from None
        return self._append(keys, epoch, array, as_dtype, copy)

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

    def rebuild_key_index(self) -> None:
        """Rebuilds the key index from the offset index, for one ``Reader.verify()`` reports
        damaged (a writer rebuilds a missing or unreadable one by itself when it opens; damage
        inside its tables only verify finds). Takes the writer lock: about a second per 10M rows.
        ValueError for a store created without a key index."""
        self._native.rebuild_key_index()

    def truncate(self, rows: Optional[int] = None, *, from_epoch: Optional[int] = None) -> int:
        """Rolls the store back, for training that resumes from a checkpoint; returns the rows kept.

        Exactly one of:
            rows: keep rows [0, rows) and drop every later row (rows == committed_rows() changes
                nothing; more raises ValueError).
            from_epoch: drop the first row whose epoch is >= from_epoch and every row after it
                (rows of earlier epochs appended after it too: a store keeps a prefix). Nothing
                changes when no row has such an epoch.

        Writes what is queued first (async mode). Killed at any instant the store is the old one
        or the new one. Readers keep their views and snapshot until ``refresh()``, after which
        ``len(reader)`` may be smaller; Writers of other processes append after the kept rows.
        In a damaged store, raises CorruptionError naming the row, store unchanged, rather than
        keep an index entry that is all zero or end on a row that fails its checksum and does not
        end its batch (one that ends its batch is kept as it is; verify still names it).
        """
        if (rows is None) == (from_epoch is None):
            raise TypeError("truncate() takes exactly one of rows= or from_epoch=")
        if rows is not None:
            return self._native.truncate(_check_u64(rows, "rows"), False)
        return self._native.truncate(_check_u64(from_epoch, "from_epoch"), True)

    def close(self) -> None:
        """Writes what is queued, stops the background thread and releases the store.

        A key index growth in progress is finished first (one build of the index, at the size
        the rows stored want), and rows that appends left unindexed because another writer was
        indexing at the time are indexed (waiting for that writer's key index lock), so readers
        find every row indexed. Idempotent. Raises the error
        of a failed background append (once), or of the final sync under
        sync="interval"/"every_append". Ctrl-C while it waits for the queue to be written
        raises KeyboardInterrupt and leaves the Writer open, the queue written on: close()
        again, or the exit handlers, finish it.
        """
        self._close(interruptible=True)

    def _close(self, interruptible: bool) -> None:
        """close(); with ``interruptible`` False (the exit handlers, garbage collection) Ctrl-C
        does not end the wait for the queue: nobody would call close() again."""
        # Closed before the exit finalizer is cancelled: a SIGTERM handled in between
        # (_write_then_terminate) still finds this Writer to close. And cancelled only once the
        # native Writer is closed (or failed closing, which it reported): a KeyboardInterrupt
        # before its close began leaves the queued rows to the exit finalizer, not to chance.
        try:
            if self._native is not None:
                self._native.close(interruptible=interruptible)
        finally:
            if self._at_exit is not None and (self._native is None or self._native.closed):
                self._at_exit.cancel()

    def stats(self) -> dict:
        """What this Writer wrote: batches, rows, bytes (as stored), append_seconds (time spent
        inside the C++ append — the write work itself), append_cpu_seconds (the CPU time of
        that work, without waits for the lock or for a core; in async mode it includes copying
        donated arrays into the queue), copied_batches (inputs that needed a
        contiguous copy), and for async mode queued_bytes, blocked_appends (append calls
        waiting for room right now), dropped_batches and dropped_rows (not written after an
        error), appends_woke_writer and writer_naps (while batches come at a steady pace the
        background thread naps until the next one is due instead of being woken by the append:
        waking it costs the caller 10-50 us on virtual machines)."""
        return self._native.stats()

    def committed_rows(self) -> int:
        """Rows visible to readers right now, written by any writer."""
        return self._native.committed_rows()

    def durable_rows(self) -> int:
        """Rows known to be on the device (a sync completed over them)."""
        return self._native.durable_rows()

    def info(self, key_stats: bool = True) -> dict:
        """As ``embstore.info(path)``; ``key_stats=False`` leaves the key statistics
        (``distinct_keys``, ``epochs``, ``key_index``) empty and takes constant time."""
        return self._native.info(key_stats)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or self.closed:
            self.close()
            return
        path = self.path
        try:
            self.close()
        except Exception as error:
            # The body's exception is the one raised; this one is reported, not dropped: logged
            # as at exit, and noted on the body's exception.
            message = (f"{path}: closing the Writer after an exception in its with-block "
                       f"failed; {self._native.stats().get('dropped_rows', 0)} appended rows "
                       f"were not written: {error}")
            _log.error("%s", message)
            if hasattr(exc, "add_note"):  # Python 3.11
                exc.add_note(message)

    def __del__(self) -> None:
        # An unclosed Writer is closed here; an error (e.g. of a background append) is logged
        # and goes to sys.unraisablehook ("Exception ignored in ...") rather than vanishing.
        native = getattr(self, "_native", None)
        try:
            if native is not None and not native.closed:
                _close_reporting_loss(native, "garbage-collected")
        finally:
            if getattr(self, "_at_exit", None) is not None:
                self._at_exit.cancel()

    def __repr__(self) -> str:
        if self.closed:
            return "<embstore.Writer (closed)>"
        mode = "async" if self._native.is_async else "sync"
        return f"<embstore.Writer {self.path!r} dim={self.dim} dtype={self.dtype} {mode}>"


_log = logging.getLogger("embstore")
# Exit finalizers run highest priority first: recorders (which append) before Writers.
_WRITER_EXIT_PRIORITY = 10
# A SIGINT this soon after the exit began is the Ctrl-C that ended the program, delivered again.
_EXIT_SIGINT_GRACE = 5.0


def _guard_exit_from_sigint() -> None:
    """atexit (registered after multiprocessing's exit function, so run before it): while that
    function runs the exit finalizers of this process's recorders and Writers, which write what
    they hold, a SIGINT within _EXIT_SIGINT_GRACE of the exit's start is ignored, and a later
    one raises KeyboardInterrupt as Python's default handler does. A Ctrl-C in a terminal
    reaches every process of the foreground group, and torchrun's agent then forwards its own
    to each worker: that second one landed inside the exit function (inside a finalizer taken
    off its list, before it could defer SIGINT) and ended it, the recorder's staged rows and the
    rest of the finalizers with it, with no word of what was lost. Only where SIGINT has
    Python's default handler and a finalizer of ours is waiting; the default handler is back
    once they have run."""
    import time
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler or not any(
            getattr(finalizer, "_callback", None) in _EXIT_CALLBACKS
            for finalizer in list(_mp_util._finalizer_registry.values())):
        return  # None of ours (a Pool's or a Queue's finalizers are not): Ctrl-C as ever.
    began = time.monotonic()

    def during_exit(signum: int, frame: Any) -> None:
        if time.monotonic() - began >= _EXIT_SIGINT_GRACE:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, during_exit)
    _mp_util.Finalize(None, signal.signal, args=(signal.SIGINT, signal.default_int_handler),
                      exitpriority=_WRITER_EXIT_PRIORITY - 1)


atexit.register(_guard_exit_from_sigint)


class _Termination:
    """What a SIGTERM in a multiprocessing child (_leave_cleanly_on_sigterm) has to do, and when.

    It writes what this process's recorders and Writers hold (their exit finalizers, priority
    _WRITER_EXIT_PRIORITY and up), then ends the child, as the signal asks: by SystemExit, so
    the program's ``finally`` blocks and multiprocessing's exit function run, which ends the
    process with os._exit once those finalizers are done (the epilogue, _after_writers, priority
    _WRITER_EXIT_PRIORITY - 1), not waiting for the program's other threads or children as a
    normal exit would (default SIGTERM would not have waited either).

    Not everywhere at once. Python runs a signal handler between any two bytecodes, and one that
    closed the Writers between taking rows out of a buffer and the append that takes them
    (_Staging.submit in embstore.torch) would drop those rows without a word: inside
    ``with _TERMINATION:`` in the main thread (the handler's: other threads are not cut by it)
    the handler only notes the signal, and the outermost block's end acts on it. Nor inside
    multiprocessing's exit function, which runs the same finalizers and may be inside one (a
    Writer taken off the list, not yet closed): the epilogue ends the process after them."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False  # a SIGTERM noted inside a deferred stretch
        self.ending = False  # a SIGTERM asked this process to end: the epilogue ends it
        self.exit_code = 0
        self.writers_done = False  # the epilogue has run (every exit finalizer of ours has)
        self.epilogue_pid = 0  # the process whose epilogue is registered
        # Not a multiprocessing child (a torchrun worker): the process ends as the signal would
        # have ended it, at once after the writing, with status 128 + SIGTERM (_end_now).
        self.as_signal = False
        # Which of SIGTERM's Python handler ("handler") and the relay thread ("relay": the main
        # thread did not come back to Python in time, _write_if_main_thread_stuck) acts on the
        # signal: the first to take `deciding`. The other leaves it to that one.
        self.deciding = threading.Lock()
        self.claimed_by: Optional[str] = None

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.depth += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.depth -= 1
        if self.depth == 0 and self.pending:
            self.pending = False
            if exc is not None:
                # The stretch failed (its append raised): its rows are lost, and the signal still
                # ends the child. Said here, and by the exit status.
                _log.error("SIGTERM came while rows were being appended, and the append failed; "
                           "those rows were not written: %r", exc)
                _write_and_exit(1)
            _write_and_exit(0)

    def register_epilogue(self) -> None:
        if self.epilogue_pid != os.getpid():
            self.epilogue_pid = os.getpid()
            self.writers_done = self.ending = False
            _mp_util.Finalize(None, _after_writers, exitpriority=_WRITER_EXIT_PRIORITY - 1)


_TERMINATION = _Termination()
# A child forked by another thread while the main thread was inside a stretch starts outside.
os.register_at_fork(after_in_child=_TERMINATION.__init__)


def _write_then_terminate(signum, frame) -> None:
    """SIGTERM in a multiprocessing child (_leave_cleanly_on_sigterm; what it does and when:
    _Termination). Another SIGTERM within a few seconds is the same request delivered twice (a
    process group's, then torchrun's agent forwarding its own) and is ignored; a later one kills
    at once, saying so on stderr (_embstore._ignore_repeated_sigterm: sigterm_relay.h)."""
    # Python's own table first: a child forked from now on (in a finally block, say) sees the
    # default action, and gets a handler of its own when it opens a Writer; it read this one as
    # installed and took none, and its rows were lost at its SIGTERM.
    signal.signal(signum, signal.SIG_DFL)
    _embstore._ignore_repeated_sigterm()
    with _TERMINATION.deciding:
        if _TERMINATION.claimed_by is None:
            _TERMINATION.claimed_by = "handler"
    if _TERMINATION.claimed_by == "relay":
        _wait_for_the_end()
    if _mp_util._exiting:
        # Already in multiprocessing's exit function: it writes; the epilogue ends the process
        # after that, or it has already run and the process waits for something else.
        _TERMINATION.ending = True
        if _TERMINATION.writers_done:
            _end_now()
        return
    if _TERMINATION.depth:
        _TERMINATION.pending = True
        return
    _write_and_exit(0)


def _write_and_exit(code: int) -> None:
    """Runs the exit finalizers of this process's recorders and Writers (they write what they
    hold and close), then ends the child with SystemExit(code) (0: a clean exit, as one asked to
    terminate does; not by the signal again: a DataLoader's parent reports a worker killed by a
    signal as a RuntimeError, which cut its own exit handlers short)."""
    _mp_util._run_finalizers(_WRITER_EXIT_PRIORITY)
    _TERMINATION.ending = True
    _TERMINATION.exit_code = code
    if _TERMINATION.as_signal:
        # Not a multiprocessing child: nobody reads an exit status of 0 as "terminated", and
        # a torchrun agent would take it for a worker that finished. End as the signal would
        # have (no ``finally`` blocks, no waiting for the program's threads).
        _end_now()
    raise SystemExit(code)


def _after_writers() -> None:
    """The epilogue (an exit finalizer just below the Writers'): ends a process a SIGTERM asked
    to end, now that everything of ours is written."""
    _TERMINATION.writers_done = True
    if _TERMINATION.ending:
        _end_now()


def _end_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    code = _TERMINATION.exit_code
    if _TERMINATION.as_signal and code == 0:
        code = 128 + 15  # SIGTERM, as a shell reports a process it ended
    os._exit(code)


def _wait_for_the_end() -> None:
    """Another thread writes and ends the process (_write_if_main_thread_stuck): wait for it
    (its deadline ends the process if the writing never finishes, sigterm_relay.h)."""
    import time
    while True:
        time.sleep(3600)


def _write_off_main_thread() -> None:
    """SIGTERM in a multiprocessing child whose Writers were opened in threads other than its
    main one (no Python handler: _leave_cleanly_on_sigterm). Runs in the library's relay
    thread: writes what this process's recorders and Writers hold (their exit finalizers), then
    ends the child at once with exit status 0, as _write_then_terminate does, without the
    program's ``finally`` blocks (the default action, which this replaces, ran none either).
    When the main thread is in multiprocessing's exit function, which runs the same finalizers
    and may be inside one (a Writer taken off the list, not yet closed), the epilogue ends the
    process after them instead (_Termination)."""
    _TERMINATION.ending = True
    if not _mp_util._exiting:
        try:
            _mp_util._run_finalizers(_WRITER_EXIT_PRIORITY)
        except BaseException as error:  # a Writer that failed to close logged what it lost
            _log.error("SIGTERM: writing what this process's Writers hold failed: %r", error)
            _TERMINATION.exit_code = 1
    if not _mp_util._exiting or _TERMINATION.writers_done:
        _end_now()
    return True


def _write_if_main_thread_stuck() -> bool:
    """SIGTERM's Python handler (_write_then_terminate) was not run: the main thread did not
    come back to Python within the relay thread's nudges (sigterm_relay.h), as when it waits in
    a collective of torch.distributed for a slow or dead peer (gloo and NCCL retry on EINTR),
    which kept the process alive until that wait's timeout, 30 minutes by default. Called by the
    relay thread with the GIL: writes what this process's Writers and recorders hold and ends
    the process, as _write_off_main_thread does, and returns True; returns False, leaving it to
    the handler, when the handler ran meanwhile or was replaced, or the main thread is inside a
    stretch the handler must wait for (_Termination: rows taken over, not yet appended), or in
    multiprocessing's exit function, which runs those finalizers itself (one may be waiting,
    say for the store's lock) and after which the handler's epilogue ends the process (once
    that function has run them, the process is ended from here)."""
    import signal
    with _TERMINATION.deciding:
        if _TERMINATION.claimed_by is not None or _TERMINATION.depth or _TERMINATION.ending or \
                (_mp_util._exiting and not _TERMINATION.writers_done) or \
                signal.getsignal(signal.SIGTERM) is not _write_then_terminate:
            return False
        _TERMINATION.claimed_by = "relay"
    return _write_off_main_thread()


def _launched_by_torchrun() -> bool:
    """A worker process of torchrun (torch.distributed.run), whose agent ends the workers with
    SIGTERM when one of them fails or the job is stopped."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _leave_cleanly_on_sigterm() -> None:
    """In a ``multiprocessing`` child (a Pool worker, a DataLoader worker) or a torchrun worker
    whose SIGTERM still has its default action, has SIGTERM write what this process's Writers
    and recorders hold before it ends the process (_write_then_terminate). multiprocessing
    itself sends SIGTERM in an ordinary shutdown (``with Pool() as pool:`` ends in
    ``terminate()``; daemon children are terminated at the parent's exit), torchrun's agent when
    another worker failed, and the default action dropped those rows without a word. A torchrun
    worker then ends with status 128 + SIGTERM (_Termination.as_signal), a multiprocessing child
    with 0.
    From the child's main thread, a Python handler; from another thread, where Python cannot
    install one, a C handler whose relay thread writes (_write_off_main_thread). A handler of
    the program's own is left alone."""
    import multiprocessing
    import signal
    if multiprocessing.parent_process() is None:
        if not _launched_by_torchrun():
            return
        _TERMINATION.as_signal = True
    if threading.current_thread() is not threading.main_thread():
        # Python cannot install a handler from here: a C one has the library's relay thread
        # write (_write_off_main_thread), unless SIGTERM has a handler already. Once the main
        # thread opens a Writer, Python's handler replaces it.
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and \
                    _embstore._write_on_sigterm(_write_off_main_thread):
                _TERMINATION.register_epilogue()
        except (ValueError, OSError):
            pass
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _write_then_terminate)
        if signal.getsignal(signal.SIGTERM) is _write_then_terminate:
            _TERMINATION.register_epilogue()
            # Python acts on a signal only in the main thread, and not while it is blocked in a
            # wait the signal did not interrupt (src/python/sigterm_relay.h).
            _embstore._relay_sigterm(_write_if_main_thread_stuck)
    except (ValueError, OSError):  # not the main interpreter, or no signals here
        pass


def _described(error: BaseException) -> str:
    """An error for a log line: its text, or its type where the text is empty (a
    KeyboardInterrupt's is)."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _InterruptDeferred:
    """Inside it, in the main thread, a SIGINT is noted, not acted on; at its end the handler
    that was installed (Python's default raises KeyboardInterrupt) gets it. For stretches that
    must not stop half-way: rows taken out of a buffer and not yet appended would be lost
    without a word (embstore.torch, _Staging.submit). Elsewhere, or where SIGINT has no Python
    handler (ignored, or the default action), it does nothing."""

    __slots__ = ("previous", "noted")

    def __enter__(self) -> None:
        self.previous = self.noted = None
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if callable(previous):
            self.previous = previous
            signal.signal(signal.SIGINT, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.noted = (signum, frame)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is None:
            return
        signal.signal(signal.SIGINT, self.previous)
        if self.noted is not None:
            self.previous(*self.noted)


def _moved_away(error: BaseException) -> bool:
    """The error of a close or sync that finished, its store no longer at its path (deleted,
    moved away or replaced: Writer::sync() in include/embstore/writer.h), or of the key index
    work that found so (StoreFiles::check_at_path(), reported by close())."""
    return isinstance(error, FileNotFoundError) and "is no longer at this path" in str(error)


def _close_reporting_loss(native, when: str) -> None:
    """Closes a Writer nobody closed; logs what was lost if that fails, then re-raises. A store
    no longer at its path is logged as such (its rows were written to its files), not raised:
    nobody called close() to hear it."""
    if native.closed:
        return
    path = native.path
    # Not ended by Ctrl-C, nor reported as a loss for one: nobody would call close() again to
    # write what is queued. A SIGINT meanwhile is acted on once the close is over.
    with _InterruptDeferred():
        try:
            native.close(interruptible=False)
        except BaseException as error:
            if _moved_away(error):
                _log.warning("%s: a Writer %s without close() wrote its rows, but into a store "
                             "no longer at this path: %s", path, when, error)
                return
            _log.error("%s: a Writer %s without close() failed to close; %d appended rows were "
                       "not written: %s", path, when, native.stats().get("dropped_rows", 0),
                       _described(error))
            raise


def _close_at_exit(native) -> None:
    try:
        _close_reporting_loss(native, "still open at exit")
    except BaseException:  # logged; an exit handler has no one to raise to
        pass


# The exit finalizers that write what this package's objects hold (embstore.torch adds the
# recorder's): those _guard_exit_from_sigint keeps a Ctrl-C from cutting short.
_EXIT_CALLBACKS = {_close_at_exit}


class Record(NamedTuple):
    """One row read by ``Reader.record`` after its checksum was checked."""

    row: int
    key: int
    epoch: int
    vector: np.ndarray


class VerifyReport:
    """Result of Reader.verify(): ``ok``, ``rows_checked``, ``bad_row_count``, ``bad_rows``
    (the first 1000 bad row numbers), ``begin_row``, ``end_row``; for a whole-snapshot verify
    also ``key_index_checked``, ``key_index_problems`` and ``key_index_problem`` (the key index
    against the offset index), ``header_problem`` ("" when both copies of the header hold;
    else what is wrong: nothing is lost, and a Writer opening the store repairs it) and
    ``rows_to_cut`` (after a reboot no Writer has recovered the store from yet: rows the header
    counts as committed that did not survive it whole, which no Reader shows and the next
    Writer's open cuts; 0 otherwise). Truthy when ok (the C++ VerifyReport::ok())."""

    def __init__(self, fields: dict) -> None:
        self.begin_row: int = fields["begin_row"]
        self.end_row: int = fields["end_row"]
        self.rows_checked: int = fields["rows_checked"]
        self.bad_row_count: int = fields["bad_row_count"]
        self.bad_rows: list = list(fields["bad_rows"])
        self.key_index_checked: bool = fields["key_index_checked"]
        self.key_index_problems: int = fields["key_index_problems"]
        self.key_index_problem: str = fields["key_index_problem"]
        self.header_problem: str = fields["header_problem"]
        self.rows_to_cut: int = fields["rows_to_cut"]
        self._ok: bool = fields["ok"]

    @property
    def ok(self) -> bool:
        return self._ok

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return (f"VerifyReport(ok={self.ok}, rows {self.begin_row}..{self.end_row}, checked="
                f"{self.rows_checked}, bad={self.bad_row_count}, bad_rows={self.bad_rows[:10]}"
                + (f", rows_to_cut={self.rows_to_cut}" if self.rows_to_cut else "")
                + (f", key_index_problems={self.key_index_problems} "
                   f"({self.key_index_problem!r})" if self.key_index_problems else "")
                + (f", header_problem={self.header_problem!r}" if self.header_problem else "")
                + ")")


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
    Reads, verifies and lookups (find, get, history, epoch_rows, find_many, get_many) run with
    the GIL released, so that a lookup that scans (a store without a key index) does not stall
    the program's other threads. A ``wait()`` in one thread holds the lock in slices of at most
    20 ms, so another thread's call on the same Reader waits at most about that long.
    Fork: a Reader may be used in a forked child, also one forked while another thread was in a
    call on it (that thread's lock is not the child's).
    """

    def __init__(self, path: PathLike, *, map_bytes: Optional[int] = None,
                 max_rows: Optional[int] = None) -> None:
        """Opens the store at ``path``. Raises FileNotFoundError if nothing is there,
        NotAStoreError for a file or directory that is not a store, CorruptionError /
        UnsupportedVersionError for a damaged or newer store, ValueError for a path that is
        not UTF-8 text.

        ``max_rows``: the snapshot taken holds at most this many rows (the first ones; fewer
        when fewer are committed: compare ``len``), so that a process sees the very rows
        another one saw (check ``generation`` and ``info()["store_id"]`` too). ``refresh()``
        and ``wait()`` then take every committed row as usual."""
        self._native = None
        path = _path_arg(path)
        if map_bytes is not None:
            map_bytes = _check_u64(map_bytes, "map_bytes")
        if max_rows is not None:
            max_rows = _check_u64(max_rows, "max_rows")
        with _not_a_store_check(path):
            self._native = _embstore.NativeReader(path, map_bytes, max_rows)
        self._metadata_cache = None

    @classmethod
    def _of_native(cls, native: Any) -> "Reader":
        """A Reader around a NativeReader the core opened itself (a shard it opened and checked
        against its manifest entry: ``_embstore.open_listed_shard``)."""
        reader = cls.__new__(cls)
        reader._native = native
        reader._metadata_cache = None
        return reader

    def __len__(self) -> int:
        """Rows in the snapshot."""
        return self._native.size()

    def refresh(self) -> int:
        """Takes a new snapshot of the committed rows; returns its size: never smaller, except
        after a ``Writer.truncate()``, when it is the truncated store's size. Arrays taken
        before stay valid and unchanged either way. After a truncate the older generation's
        files (unlinked) stay mapped only while arrays taken before exist (with those of the
        generation this refresh found, which the same mappings hold), not for the Reader's
        lifetime: their space on disk comes back once those arrays are gone.

        Raises:
            FileNotFoundError: the store is no longer at its path (deleted, moved away, or
                another store created or moved there: a run started over); open the path
                again. Looked up at most every 50 ms; the snapshot and its arrays stay.
        """
        return self._native.refresh()

    @property
    def generation(self) -> int:
        """The generation whose files hold the snapshot's rows (as of open or the last
        ``refresh()``/``wait()``). ``info()["generation"]`` is the store's generation now: newer
        after a ``Writer.truncate()`` this Reader has not refreshed past."""
        return self._native.generation

    def wait(self, n: int, timeout: Optional[float] = None) -> bool:
        """Refreshes until the snapshot holds at least ``n`` rows or ``timeout`` seconds pass
        (None or ``float("inf")``: no limit; so is any timeout too long for the clock, about
        292 years). Returns True when reached. Sleeps on the store's commit counter (woken by
        commits from any process), with the GIL released; Ctrl-C interrupts it.

        Raises:
            ValueError: a negative or NaN timeout, one that is not a number (a bool or str
                too), or ``n`` outside [0, 2**64).
            FileNotFoundError: as ``refresh()``, within a fraction of a second of the store
                leaving its path (a wait would otherwise sleep on a counter nobody raises).
        """
        n = _check_u64(n, "wait: n")
        if timeout is not None:
            if not (isinstance(timeout, (float, np.floating)) and math.isnan(timeout)):
                timeout = _number(timeout, "wait: timeout", "seconds")  # not bool, str, ...
            if math.isnan(timeout) or timeout < 0:
                raise ValueError(f"wait: timeout is {timeout}; use seconds >= 0, or None or "
                                 "float('inf') to wait without a limit")
        return self._native.wait(int(n), timeout)

    @property
    def vectors(self) -> np.ndarray:
        """All rows of the snapshot, shape (len(self), dim), read-only, zero-copy
        (bfloat16: uint16 bit patterns, see the class doc)."""
        return self._native.vectors(0, None)

    def rows(self, begin: int, end: Optional[int] = None) -> np.ndarray:
        """Rows [begin, end) of the snapshot as a zero-copy view. Row numbers count from 0;
        negative ones are refused (``r.vectors[-5:]`` gives the last rows). ValueError unless
        0 <= begin <= end <= len(self)."""
        begin, end = self._range("rows", begin, end)
        return self._native.vectors(begin, end)

    def read(self, begin: int = 0, end: Optional[int] = None,
             out: Optional[np.ndarray] = None, check: bool = False) -> np.ndarray:
        """Rows [begin, end) of the snapshot copied into ``out`` (C-contiguous, writeable, the
        store's dtype, shape (end - begin, dim)), or into a new array; returns it. The same bytes
        ``rows`` shows, GIL released. For one pass over many rows in a process that has not
        touched them yet, read pieces of a few MiB into one ``out``: the kernel copies them from
        the page cache, where a first pass through the zero-copy view pays a page-table entry
        per 4 KiB page (on some VMs ~7x the copy). ``out`` has the dtype of ``vectors`` (bfloat16:
        uint16, or int16 as ``tensor()`` views it). ``out`` may also be a CPU torch tensor of the
        store's dtype (bfloat16 as torch.bfloat16), pinned memory included, so rows go to a GPU
        with one more copy (``out.to(device, non_blocking=True)``); it is returned. ValueError
        for a range outside the snapshot or an unfit ``out``, TypeError for an ``out`` that is
        neither a numpy array nor a torch tensor.

        ``check=True`` checks each row copied against its checksum (as ``record`` and
        ``verify`` do, over the copy) and raises CorruptionError naming the first row that fails,
        its key and epoch; ``out`` then holds the rows as stored, the bad ones included. The
        default copies the bytes as stored without a check (``verify`` finds bad rows)."""
        if not isinstance(check, bool):
            raise ValueError(f"read: check must be True or False; got {check!r}")
        begin, end = self._range("read", begin, end)
        if out is None or isinstance(out, np.ndarray):
            return self._native.read(begin, end, out, check)
        if not _is_torch_tensor(out):
            raise TypeError(f"read: out must be a numpy array or a torch tensor; got "
                            f"{type(out).__name__}")
        if out.device.type != "cpu":
            raise ValueError(f"{self.path}: read: out is on {out.device}; rows are copied into "
                             "CPU memory (pinned or not), then to the device with out.to()")
        if out.requires_grad:
            raise ValueError(f"{self.path}: read: out requires grad; autograd would not see the "
                             "copy (pass a tensor that does not, or out.detach())")
        if str(out.layout) != "torch.strided":
            raise ValueError(f"{self.path}: read: out is a {out.layout} tensor; rows are copied "
                             "into a dense (torch.strided), C-contiguous one")
        store_bf16 = self.dtype == "bfloat16"
        if (str(out.dtype) == "torch.bfloat16") != store_bf16:
            wanted = f"torch.{self.dtype}"  # Every store dtype has a torch dtype of its name.
            raise ValueError(f"{self.path}: read: out is a {out.dtype} tensor; this store's rows "
                             f"are {self.dtype}: pass a {wanted} tensor")
        if store_bf16:
            import torch
            self._native.read(begin, end, out.view(torch.int16).numpy(), check)  # Same memory.
        else:
            self._native.read(begin, end, out.numpy(), check)  # Its dtype and shape checked there.
        return out

    def record(self, row: int) -> "Record":
        """Row ``row`` after checking its checksum: a Record (row, key, epoch, vector), vector
        being a read-only zero-copy view of the row (bfloat16: uint16 bit patterns).

        Unlike ``rows``/``vectors``, which hand out the mapping as it is, this reads one row
        the way ``verify`` checks it. Raises CorruptionError naming the row, key and epoch when
        its bytes do not match its checksum, ValueError when ``row`` is outside the snapshot."""
        row = self._row_number("record", row)
        key, epoch, vector = self._native.record(row)
        return Record(row, key, epoch, vector)

    @staticmethod
    def _row_number(what: str, row: Any) -> int:
        if isinstance(row, (bool, np.bool_)) or not isinstance(row, (int, np.integer)):
            raise ValueError(f"{what}: row numbers are integers; got {type(row).__name__} "
                             f"{row!r}")
        row = int(row)
        if row < 0:
            raise ValueError(f"{what}: row {row} is negative; rows are numbered from 0 "
                             "(use r.vectors[-k:] for the last k rows)")
        if row >= _U64_LIMIT:
            raise ValueError(f"{what}: row {row} is beyond any store")
        return row

    def _range(self, what: str, begin: Any, end: Any):
        begin = self._row_number(what, begin)
        end = None if end is None else self._row_number(what, end)
        if end is not None and end < begin:
            raise ValueError(f"{what}: end {end} is before begin {begin}")
        return begin, end

    @property
    def keys(self) -> np.ndarray:
        """Each row's key, uint64, zero-copy: a strided view (strides=(32,)) into the index."""
        return self._native.keys(0, None)

    @property
    def epochs(self) -> np.ndarray:
        """Each row's epoch, uint64, zero-copy, strided like ``keys``."""
        return self._native.epochs(0, None)

    def tensor(self, begin: int = 0, end: Optional[int] = None):
        """Rows [begin, end) as a torch tensor over the store's pages, not a copy: float32/
        float16/... as stored, bfloat16 as torch.bfloat16. Torch has no read-only tensors, so
        the tensor is a private, copy-on-write mapping of the store's data file: it may be
        written to (``t /= t.norm(dim=1, keepdim=True)``, ``read(out=t)``), a page written
        becomes this process's own copy, and nothing written reaches the store or its other
        readers. (A tensor made with ``torch.from_numpy(r.vectors)`` shares the read-only
        mapping instead, as torch's warning says: writing to it crashes the process.) Where
        the store's data file cannot be mapped again (a truncate removed it since this
        snapshot), the rows are copied. Valid after the Reader is closed."""
        import torch
        begin, end = self._range("tensor", begin, end)
        rows = len(self)  # Checked here, so the error names this method, not the native one.
        if begin > rows or (end is not None and end > rows):
            raise ValueError(f"{self.path}: tensor({begin}, {rows if end is None else end}) is "
                             f"outside the snapshot of {rows} rows")
        array = self._native.private_rows(begin, end)
        if self.dtype == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)

    def verify(self, begin: int = 0, end: Optional[int] = None) -> VerifyReport:
        """Recomputes the checksums of rows [begin, end) of the snapshot (GIL released)."""
        begin, end = self._range("verify", begin, end)
        return VerifyReport(self._native.verify(begin, end))

    # Lookups by key (sample id) and epoch, for this snapshot, through the store's key index (a
    # scan where there is none; see info()["key_index"]). A (key, epoch) appended twice: the
    # later row wins in find/get, history lists both. Row numbers index ``r.vectors[i]``.
    # Keys and epochs are checked as append checks them: a bool, float, str, negative or too
    # large value (or array dtype) raises ValueError naming the argument, never another key.

    def get(self, key: int, epoch: Optional[int] = None) -> np.ndarray:
        """The vector of ``key`` at ``epoch`` (None: its latest), a zero-copy read-only view;
        KeyError if there is none."""
        return self._native.get(_u64_arg(key, "get: key"),
                                None if epoch is None else _u64_arg(epoch, "get: epoch"))

    def find(self, key: int, epoch: Optional[int] = None) -> Optional[int]:
        """The row of ``key`` at ``epoch`` (None: its latest row), or None."""
        row = self._native.find(_u64_arg(key, "find: key"),
                                None if epoch is None else _u64_arg(epoch, "find: epoch"))
        return None if row < 0 else row

    def find_many(self, keys, epochs=None) -> np.ndarray:
        """Rows (int64, -1 where missing) of ``keys`` at ``epochs`` (an array as long as
        ``keys``, one int for all, or None: the latest). Vectorised, GIL released. Answers from
        the key index's slots, as ``find`` does (README, "Lookups by sample id and epoch": a slot damaged inside
        the tables can name another key's row; ``get_many`` confirms).

        ``keys`` (and an array of ``epochs``) must be 1-D: the result is 1-D, one row per key;
        other shapes raise ValueError naming the argument and its shape (flatten them first,
        and reshape the result)."""
        return self._native.find_many(*self._find_many_args(keys, epochs, "find_many"))

    def _find_many_args(self, keys, epochs, method):
        """``keys`` and ``epochs`` of find_many or get_many (``method``, which errors name) as
        the uint64 arrays the core takes (epochs: None, one for every key, or one per key),
        checked."""
        keys = _u64_array(keys, f"{method}: keys")
        _check_1d(keys, f"{method}: keys")
        if epochs is not None and np.ndim(epochs) == 0:  # one epoch for every key
            if isinstance(epochs, np.ndarray) or _is_torch_tensor(epochs):
                epochs = epochs.item()
            epochs = np.array([_check_u64(epochs, f"{method}: epochs")], dtype=np.uint64)
        elif epochs is not None:
            epochs = _u64_array(epochs, f"{method}: epochs")
            _check_1d(epochs, f"{method}: epochs")
            if len(epochs) == 0:
                return keys, None  # none: the latest, as the core takes an empty array
            if len(epochs) not in (1, len(keys)):
                raise ValueError(f"{self.path}: {method}: {len(keys)} keys and {len(epochs)} "
                                 "epochs: give one epoch per key, one for every key, or none "
                                 "(the latest)")
        return keys, epochs

    def gather(self, rows) -> np.ndarray:
        """Copies ``rows`` (integers as from find_many; -1 gives a row of zeros) into one dense
        (len(rows), dim) array, GIL released. ``rows`` must be 1-D, as in find_many."""
        return self._native.gather(_row_array(rows, "gather"))

    def get_many(self, keys, epochs=None) -> np.ndarray:
        """The vectors of ``keys`` (at ``epochs``, as in find_many: 1-D) as one dense
        (len(keys), dim) matrix; KeyError naming the first missing key. Every row found is
        confirmed to be of its key (and epoch), as ``get`` does: where a damaged key index slot
        named another key's row, the index is marked damaged (``info()["key_index"]`` says so)
        and the rows are found again by a scan. And every row is checked against its checksum,
        as ``get`` checks it: CorruptionError naming the first row that fails."""
        keys, epochs = self._find_many_args(keys, epochs, "get_many")
        # Four calls of the core, each on the snapshot of its moment: a refresh() by another
        # thread between two of them changes rows only by adding some, unless it crosses a
        # truncate (a new generation), where row numbers name other rows. Then all is redone.
        while True:
            generation = self._native.generation
            try:
                vectors = self._get_many_once(keys, epochs)
            except Exception:
                if self._native.generation != generation:
                    continue
                raise
            if self._native.generation == generation:
                return vectors

    def _get_many_once(self, keys, epochs) -> np.ndarray:
        """get_many() of checked arguments, in one generation unless a refresh() moved it."""
        rows = self._native.find_many(keys, epochs)
        hit = np.flatnonzero(rows >= 0)
        wrong = self._native.keys(0, None)[rows[hit]] != keys[hit]
        if epochs is not None:
            wrong |= self._native.epochs(0, None)[rows[hit]] != (
                epochs if epochs.size == 1 else epochs[hit])
        if wrong.any():
            i = int(hit[np.flatnonzero(wrong)[0]])
            # get() confirms the row and, finding another key's, stops this Reader's use of the
            # key index: the lookups below scan.
            try:
                self._native.get(int(keys[i]), None if epochs is None else
                                 int(epochs[i if epochs.size > 1 else 0]))
            except KeyError:
                pass
            rows = self._native.find_many(keys, epochs)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            first = int(missing[0])
            at = "" if epochs is None else \
                f" at epoch {int(epochs[first] if epochs.size > 1 else epochs[0])}"
            raise KeyError(f"key {int(keys[first])}{at} is not in {self.path} "
                           f"({missing.size} of {rows.size} keys missing)")
        return self._native.gather(rows, check=True)

    def history(self, key: int) -> list:
        """Every version of ``key`` in commit order, as (row, epoch) tuples."""
        return self._native.history(_u64_arg(key, "history: key"))

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The rows of ``epoch`` in commit order (int64)."""
        return self._native.epoch_rows(_u64_arg(epoch, "epoch_rows: epoch"))

    def epoch_counts(self) -> dict:
        """The epochs present, {epoch: row count}, ascending."""
        return self._native.epoch_counts()

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

    def info(self, key_stats: bool = True) -> dict:
        """As ``embstore.info(path)`` (header plus the counters as they are now), with the key
        statistics of this snapshot (``distinct_keys``, ``epochs``, ``key_index``): a pass over
        the key table, milliseconds per million keys. ``key_stats=False`` leaves those empty and
        takes constant time (for callers that poll). Its ``generation`` is the store's now;
        ``generation`` (the property) is the snapshot's."""
        return self._native.info(key_stats)

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


from .io import compact, export_hdf5, export_npy, import_npy  # noqa: E402 (needs Reader, Writer)
from .shards import ShardSet, merge  # noqa: E402,F401  (several stores as one: embstore.shards)
