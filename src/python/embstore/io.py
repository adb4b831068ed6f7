"""Moving rows in and out of a store: .npy and HDF5 export, .npy import, compaction.

The same operations as the command-line tool's ``export``, ``import`` and ``compact``, in pure
Python over :class:`embstore.Reader` and :class:`embstore.Writer`, with the same file layout,
so either side reads what the other wrote:

* an npy export is a directory of ``vectors.npy`` (rows x dim), ``keys.npy`` and ``epochs.npy``
  (uint64) and ``embstore.json`` naming the dtype (bfloat16 rows travel as uint16 bit patterns,
  numpy having no bfloat16), dim, rows, store id and metadata; every file opens with
  ``np.load(path, mmap_mode="r")``;
* an HDF5 export holds datasets ``/vectors``, ``/keys``, ``/epochs`` and root attributes
  ``dtype``, ``dim``, ``metadata``, ``store_id`` and ``embstore_format`` (needs h5py).

Outputs are written under a hidden sibling name and renamed into place when complete, so they
appear whole or not at all; an existing output raises FileExistsError. Rows are copied in
chunks of a few MiB (memory does not grow with the store, except one entry per key for
``latest``). Sources are only read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np

from . import (CorruptionError, Reader, Writer, _as_ints, _check_int_array, _check_u64, _dtype_name,
               _embstore, _metadata_text, _rounded_once, create)

__all__ = ["export_npy", "export_hdf5", "import_npy", "compact", "EXPORT_FORMAT"]

#: Value of the sidecar's and the HDF5 file's ``embstore_format`` field.
EXPORT_FORMAT = "embstore-export-1"
_CHUNK_BYTES = 4 << 20
_NPY_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int8": "|i1",
               "uint8": "|u1", "float64": "<f8"}


def _partial_dir(out: str) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    return tempfile.mkdtemp(prefix="." + os.path.basename(out.rstrip("/")) + ".partial-",
                            dir=parent)


def _require_absent(out: str) -> None:
    if os.path.lexists(out):
        raise FileExistsError(f"output {out} already exists")


def _publish(partial: str, out: str) -> None:
    # os.rename would replace an empty directory that appeared meanwhile; refuse instead.
    _require_absent(out)
    os.rename(partial, out)


def _selected_runs(reader: Reader, begin: int, end: Optional[int], epochs: Optional[Iterable[int]],
                   latest: bool) -> Tuple[int, Iterator[np.ndarray]]:
    """(count, iterator over arrays of selected row numbers, ascending, a chunk at a time)."""
    size = len(reader)
    end = size if end is None else int(end)
    begin = int(begin)
    if not 0 <= begin <= end:
        raise ValueError(f"begin {begin} is after end {end}")
    if end > size:
        raise ValueError(f"end {end} is past the end of {reader.path} ({size} rows)")
    wanted = None if epochs is None else np.array(sorted(set(int(e) for e in epochs)),
                                                   dtype=np.uint64)
    row_bytes = reader.dim * reader.rows(0, 0).dtype.itemsize
    step = max(1, _CHUNK_BYTES // max(1, row_bytes))

    def chunk_rows(lo: int, hi: int) -> np.ndarray:
        rows = np.arange(lo, hi, dtype=np.uint64)
        if wanted is not None:
            rows = rows[np.isin(reader.epochs[lo:hi], wanted)]
        return rows

    if wanted is not None:
        present = set()
        for lo in range(begin, end, step):
            present.update(np.unique(reader.epochs[lo:min(end, lo + step)]).tolist())
        missing = [int(e) for e in wanted if int(e) not in present]
        if missing:
            raise KeyError(f"epoch {', '.join(map(str, missing))} is not in rows "
                           f"[{begin}, {end}) of {reader.path}")
    if latest:
        last = {}
        for lo in range(begin, end, step):
            rows = chunk_rows(lo, min(end, lo + step))
            for key, row in zip(reader.keys[rows].tolist(), rows.tolist()):
                last[key] = row
        chosen = np.array(sorted(last.values()), dtype=np.uint64)

        def latest_chunks() -> Iterator[np.ndarray]:
            for i in range(0, len(chosen), step):
                yield chosen[i:i + step]
        return len(chosen), latest_chunks()
    count = sum(len(chunk_rows(lo, min(end, lo + step))) for lo in range(begin, end, step)) \
        if wanted is not None else end - begin

    def chunks() -> Iterator[np.ndarray]:
        for lo in range(begin, end, step):
            rows = chunk_rows(lo, min(end, lo + step))
            if len(rows):
                yield rows
    return count, chunks()


def _read_checked(reader: Reader, rows: np.ndarray) -> np.ndarray:
    """The vectors of ``rows`` (ascending row numbers) copied out of ``reader``, each checked
    against its checksum (CorruptionError naming the first that fails, its key and epoch): one
    ``Reader.read(check=True)`` per run of consecutive rows, or, for rows scattered close
    together (a selection by epoch or latest row), one of their whole span, picked from."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    first, end = int(rows[0]), int(rows[-1]) + 1
    if len(breaks) > 0 and end - first <= 4 * len(rows):
        # One call instead of one per row. It checks the rows between too: if one of those
        # fails, the runs below raise only for a row that was chosen.
        try:
            return reader.read(first, end, check=True)[rows - first]
        except CorruptionError:
            pass
    out = np.empty((len(rows), reader.dim), dtype=reader.rows(0, 0).dtype)
    for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)]):
        reader.read(int(rows[lo]), int(rows[hi - 1]) + 1, out=out[lo:hi], check=True)
    return out


def _sidecar(reader: Reader, rows: int) -> dict:
    info = reader.info()
    return {"embstore_format": EXPORT_FORMAT, "dtype": reader.dtype,
            "npy_dtype": _NPY_DTYPES[reader.dtype], "dim": reader.dim, "rows": rows,
            "store_id": info["store_id"], "metadata": reader.metadata_text,
            "source": reader.path,
            "files": {"vectors": "vectors.npy", "keys": "keys.npy", "epochs": "epochs.npy"}}


def export_npy(store: Any, out: Any, *, epochs: Optional[Sequence[int]] = None,
               latest: bool = False, begin: int = 0, end: Optional[int] = None) -> int:
    """Writes the selected rows of ``store`` (a path or an open Reader) to the new directory
    ``out``: vectors.npy, keys.npy, epochs.npy and embstore.json. Returns the rows written.

    Args:
        epochs: only rows of these epochs (KeyError if one is absent from the range).
        latest: only the latest row of each key (after the epoch filter).
        begin, end: the row range [begin, end) of the snapshot (default: all).

    Raises:
        FileExistsError: ``out`` exists.  CorruptionError: a row fails its checksum.
        ValueError: ``out`` lies inside the store (which is only read).
    """
    out = os.fspath(out)
    _require_absent(out)
    reader = store if isinstance(store, Reader) else Reader(store)
    _embstore._refuse_output_inside(out, reader.path)
    count, runs = _selected_runs(reader, begin, end, epochs, latest)
    partial = _partial_dir(out)
    try:
        vectors = np.lib.format.open_memmap(os.path.join(partial, "vectors.npy"), mode="w+",
                                            dtype=np.dtype(_NPY_DTYPES[reader.dtype]),
                                            shape=(count, reader.dim))
        keys = np.lib.format.open_memmap(os.path.join(partial, "keys.npy"), mode="w+",
                                         dtype="<u8", shape=(count,))
        epoch_out = np.lib.format.open_memmap(os.path.join(partial, "epochs.npy"), mode="w+",
                                              dtype="<u8", shape=(count,))
        _copy_runs(reader, runs, vectors, keys, epoch_out)
        for array in (vectors, keys, epoch_out):
            array.flush()
        del vectors, keys, epoch_out
        with open(os.path.join(partial, "embstore.json"), "w") as f:
            json.dump(_sidecar(reader, count), f, indent=2)
            f.write("\n")
        _publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return count


def _copy_runs(reader: Reader, runs, vectors, keys, epochs) -> None:
    """Copies the selected runs of rows, checksum-checked, into the output arrays (numpy memmaps
    or h5py datasets) one run at a time."""
    at = 0
    for rows in runs:
        n = len(rows)
        vectors[at:at + n] = _read_checked(reader, rows)
        keys[at:at + n] = reader.keys[rows]
        epochs[at:at + n] = reader.epochs[rows]
        at += n


def export_hdf5(store: Any, out: Any, *, epochs: Optional[Sequence[int]] = None,
                latest: bool = False, begin: int = 0, end: Optional[int] = None) -> int:
    """As :func:`export_npy`, into the new HDF5 file ``out`` (datasets /vectors, /keys,
    /epochs; root attributes dtype, dim, metadata, store_id, embstore_format). Needs h5py."""
    import h5py
    out = os.fspath(out)
    _require_absent(out)
    reader = store if isinstance(store, Reader) else Reader(store)
    _embstore._refuse_output_inside(out, reader.path)
    count, runs = _selected_runs(reader, begin, end, epochs, latest)
    partial = _partial_dir(out)
    path = os.path.join(partial, "out")
    try:
        with h5py.File(path, "w-") as f:
            info = reader.info()
            f.attrs["embstore_format"] = EXPORT_FORMAT
            f.attrs["dtype"] = reader.dtype
            f.attrs["dim"] = np.uint32(reader.dim)
            f.attrs["metadata"] = reader.metadata_text
            f.attrs["store_id"] = info["store_id"]
            vectors = f.create_dataset("vectors", shape=(count, reader.dim),
                                       dtype=np.dtype(_NPY_DTYPES[reader.dtype]))
            keys = f.create_dataset("keys", shape=(count,), dtype="<u8")
            epoch_out = f.create_dataset("epochs", shape=(count,), dtype="<u8")
            _copy_runs(reader, runs, vectors, keys, epoch_out)
        if os.path.lexists(out):
            raise FileExistsError(f"output {out} already exists")
        os.rename(path, out)
        os.rmdir(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return count


# Float types by range: converting into a type of lower rank can make a finite value infinite.
_RANGE_RANK = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}


def _may_overflow(source: str, target: str) -> bool:
    return _RANGE_RANK.get(target, 9) < _RANGE_RANK.get(source, -1)


def _as_store_rows(chunk: np.ndarray, source: str, target: str,
                   rows: Sequence[int]) -> np.ndarray:
    """A chunk of rows of dtype ``source`` (bfloat16 as uint16 bit patterns) as a ``target``
    store takes them: bfloat16 widened exactly to float32 first, then float64 for a float64
    store, or rounded once to a narrower float type (``_rounded_once``: a value that would
    become infinite raises ValueError naming its row, ``rows`` holding the chunk's row
    numbers). bfloat16 bit patterns for a bfloat16 store stay as they are."""
    if source == "bfloat16" and target != "bfloat16":
        chunk = (chunk.astype(np.uint32) << 16).view(np.float32)
    if target == "float64":
        return chunk if chunk.dtype == np.float64 else chunk.astype(np.float64)
    if target in ("float16", "bfloat16", "float32") and chunk.dtype.kind == "f" and \
            target != _dtype_name(chunk.dtype):
        return _rounded_once(chunk, target, rows)
    return chunk


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


def _empty_out(directory: str) -> None:
    """Removes what ``directory`` holds (the store an import made in it), leaving it empty;
    errors are ignored, as ``shutil.rmtree(ignore_errors=True)`` ignores them."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:
            pass


def _append(writer: Writer, keys: np.ndarray, epochs: np.ndarray, vectors: np.ndarray,
            dtype: str) -> None:
    if dtype == "bfloat16" and vectors.dtype == np.uint16:
        # numpy has no bfloat16: hand the raw bit patterns over, named (as Writer does for torch).
        writer._append(keys, epochs, vectors.view(np.int16), "bfloat16", True)
    else:
        writer.append(keys, vectors, epoch=epochs)


def import_npy(store: Any, source: Any, *, keys: Any = None, epochs: Any = None,
               epoch: Optional[int] = None, dtype: Any = None, metadata: Any = None) -> int:
    """Appends rows from ``source`` to ``store``, creating the store when it does not exist (it
    then appears whole when the import finishes) or is an empty directory (made in it, as
    ``create`` makes one, so its rows appear as they are appended; after an error the directory
    is left empty). Returns the rows appended.

    Args:
        source: an npy export directory (keys, epochs, dtype and metadata come with it), a 2-D
            .npy path, or a 2-D array.
        keys: a .npy path or array of one key per row (default: the export's, else 0..rows-1).
        epochs: a .npy path or array of one epoch per row; or ``epoch`` for all rows (default 0).
        dtype: the new store's dtype (default: the source's); "bfloat16" also reads uint16
            input as bfloat16 bit patterns (without it or a sidecar saying so, uint16 input is
            refused). Float rows are converted to a float store's dtype. For an existing store,
            a dtype other than the store's raises FormatMismatchError and appends nothing
            (except "bfloat16" naming uint16 input as bit patterns).
        metadata: the new store's metadata (default: the export's). For an existing store,
            metadata other than the store's (as text, or as JSON) raises FormatMismatchError
            and appends nothing: a store's metadata is fixed when it is created.
    """
    store = os.fspath(store)
    side = {}
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        base = os.fspath(source)
        vectors = np.load(os.path.join(base, "vectors.npy"), mmap_mode="r")
        sidecar = os.path.join(base, "embstore.json")
        if os.path.exists(sidecar):
            with open(sidecar) as f:
                side = json.load(f)
        if keys is None and os.path.exists(os.path.join(base, "keys.npy")):
            keys = os.path.join(base, "keys.npy")
        if epochs is None and epoch is None and os.path.exists(os.path.join(base, "epochs.npy")):
            epochs = os.path.join(base, "epochs.npy")
    elif isinstance(source, (str, os.PathLike)):
        vectors = np.load(os.fspath(source), mmap_mode="r")
    else:
        vectors = np.asarray(source)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-D (rows, dim); got shape {vectors.shape}")
    n, dim = vectors.shape

    def column(value: Any, name: str) -> Optional[np.ndarray]:
        """One key or epoch per row, refused as Writer.append refuses them: bools, floats,
        objects and negative values (never truncated or wrapped)."""
        if value is None:
            return None
        if isinstance(value, (str, os.PathLike)):
            what = f"{name} ({os.fspath(value)})"
            array = np.load(os.fspath(value), mmap_mode="r")
        else:
            what = name
            array = _as_ints(value, name)  # a list: value by value, as append checks it
        if array.shape != (n,):
            raise ValueError(f"{what} has shape {array.shape}; expected ({n},) for {n} rows")
        _check_int_array(array, what)
        return array

    key_array = column(keys, "keys")
    epoch_array = column(epochs, "epochs")
    epoch = 0 if epoch is None else _check_u64(epoch, "epoch")
    source_dtype = side.get("dtype")
    if vectors.dtype == np.uint16:
        # numpy has no bfloat16: uint16 rows are its bit patterns when an export's sidecar says
        # so, or (no sidecar) the caller does with dtype="bfloat16"; no store holds uint16.
        said = source_dtype or (_dtype_name(dtype) if dtype is not None else None)
        if said != "bfloat16":
            where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "source"
            raise ValueError(f"{where}: uint16 vectors are read as bfloat16 bit patterns only "
                             "with dtype='bfloat16' or an export's sidecar saying so; got "
                             f"{'sidecar dtype' if source_dtype else 'dtype'} {said!r}")
        source_dtype = "bfloat16"
    elif source_dtype is None:
        source_dtype = _dtype_name(vectors.dtype)
    store_dtype = _dtype_name(dtype) if dtype is not None else source_dtype
    partial = None  # where a new store is made: a hidden sibling of ``store``, or ``store``
    in_place = os.path.isdir(store) and not os.listdir(store)
    if os.path.exists(store) and not in_place:
        given_metadata = None if metadata is None else _metadata_text(metadata)
        writer = Writer(store)
        mismatch = None
        if writer.dim != dim:
            mismatch = f"{store} has dim {writer.dim} but the source has {dim} columns"
        elif given_metadata is not None and not _same_metadata(given_metadata,
                                                                writer.info()["metadata"]):
            mismatch = (f"{store} exists, with other metadata than metadata= gives; metadata "
                        "is for a new store (an existing store's metadata is fixed)")
        elif dtype is not None and store_dtype != writer.dtype and not (
                vectors.dtype == np.uint16 and store_dtype == "bfloat16"):
            # Rows converted to the store's dtype anyway would not be what was asked for. With
            # uint16 rows, dtype="bfloat16" only says what the input is (bit patterns).
            mismatch = (f"{store} holds {writer.dtype} rows but dtype={store_dtype!r} was "
                        "asked for; a store's dtype is fixed when it is created")
        if mismatch is not None:
            writer.close()
            from ._errors import FormatMismatchError
            raise FormatMismatchError(mismatch)
    else:
        meta = metadata if metadata is not None else side.get("metadata")
        if in_place:
            # create() refuses a directory that is no longer empty (another store made there
            # meanwhile): nothing in it is the import's to remove.
            create(store, dim=dim, dtype=store_dtype, metadata=meta)
            partial = store
            try:
                writer = Writer(store)
            except BaseException:
                _empty_out(store)
                raise
        else:
            partial = _partial_dir(store)
            try:
                writer = Writer(partial, dim=dim, dtype=store_dtype, metadata=meta)
            except BaseException:  # e.g. a bad dim or metadata: leave no hidden directory
                shutil.rmtree(partial, ignore_errors=True)
                raise
    try:
        step = max(1, _CHUNK_BYTES // max(1, dim * vectors.dtype.itemsize))
        if partial is None and _may_overflow(source_dtype, writer.dtype):
            # Into an existing store: every value is checked before the first row is appended,
            # so a refused import leaves the store as it was (a new one is simply not made).
            for lo in range(0, n, step):
                _as_store_rows(np.ascontiguousarray(vectors[lo:lo + step]), source_dtype,
                               writer.dtype, range(lo, min(n, lo + step)))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            chunk = _as_store_rows(np.ascontiguousarray(vectors[lo:hi]), source_dtype,
                                   writer.dtype, range(lo, hi))
            k = (np.arange(lo, hi, dtype=np.uint64) if key_array is None
                 else np.asarray(key_array[lo:hi], dtype=np.uint64))
            e = (np.full(hi - lo, epoch, dtype=np.uint64)
                 if epoch_array is None else np.asarray(epoch_array[lo:hi], dtype=np.uint64))
            _append(writer, k, e, chunk, source_dtype if chunk.dtype == np.uint16 else "")
        writer.sync()
        writer.close()
        if partial is not None and not in_place:
            _publish(partial, store)
    except BaseException:
        writer.close()
        if in_place:
            _empty_out(store)
        elif partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return n


def compact(store: Any, out: Any, *, latest_per_key: bool = False,
            epochs: Optional[Sequence[int]] = None, dtype: Any = None) -> int:
    """Writes the kept rows of ``store`` into a new store at ``out`` (same dim, rows per segment,
    metadata and key-index choice; a new store id), built under a hidden name and renamed into
    place when complete. The source is only read. Returns the rows kept.

    Args:
        latest_per_key: keep only the latest row of each key.
        epochs: keep only rows of these epochs (KeyError if one is absent).
        dtype: convert rows to this dtype (float types only).
    """
    out = os.fspath(out)
    _require_absent(out)
    reader = store if isinstance(store, Reader) else Reader(store)
    _embstore._refuse_output_inside(out, reader.path)
    target = _dtype_name(dtype) if dtype is not None else reader.dtype
    floats = ("float32", "float16", "bfloat16", "float64")
    if target != reader.dtype and not (target in floats and reader.dtype in floats):
        raise ValueError(f"cannot convert {reader.dtype} rows to {target} (only between float "
                         "types)")
    count, runs = _selected_runs(reader, 0, None, epochs, latest_per_key)
    info = reader.info()
    # As many rows per segment as the source: a wider dtype's rows would not fit its segment.
    sizes = [np.dtype(_NPY_DTYPES[t]).itemsize for t in (target, reader.dtype)]
    widen = max(1, sizes[0] // sizes[1])
    partial = _partial_dir(out)
    try:
        with Writer(partial, dim=reader.dim, dtype=target, metadata=reader.metadata_text,
                    segment_mb=info["segment_bytes"] * widen / (1 << 20),
                    key_index=info["keeps_key_index"]) as writer:
            for rows in runs:
                chunk = _as_store_rows(_read_checked(reader, rows), reader.dtype, target, rows)
                _append(writer, np.asarray(reader.keys[rows]), np.asarray(reader.epochs[rows]),
                        chunk, target if chunk.dtype == np.uint16 else "")
            writer.sync()
        _publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return count
