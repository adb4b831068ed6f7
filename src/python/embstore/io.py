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
appear whole or not at all; an existing output raises FileExistsError. A call that fails (a full
disk, a bad row, Ctrl-C) leaves nothing at the output (an empty directory imported into is left
empty), and its error names the output (the hidden working name after it, in parentheses); an
import into an existing store that fails after appending rows says, in a note on the error, how
many stay there. Rows are copied in chunks of a few MiB (memory does not grow with the store,
except one entry per key for ``latest``). Sources are only read.
"""

from __future__ import annotations

import errno
import json
import os
import traceback
from typing import Any, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np

from . import (CorruptionError, Error, Reader, Writer, _as_ints, _as_vectors, _check_int_array,
               _check_integer, _check_u64, _dtype_name, _embstore, _InterruptDeferred,
               _is_torch_tensor, _metadata_text, _path_arg, _rounded_once, _same_metadata,
               _u64_array, create)

__all__ = ["export_npy", "export_hdf5", "import_npy", "compact", "EXPORT_FORMAT"]

#: Value of the sidecar's and the HDF5 file's ``embstore_format`` field.
EXPORT_FORMAT = "embstore-export-1"
_CHUNK_BYTES = 4 << 20
_MAX_ROWS = 2**40  # The most rows a store holds (more are refused at the append passing them).
_NPY_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int8": "|i1",
               "uint8": "|u1", "float64": "<f8"}


def _staged(out: str, shape: str = "directory") -> Any:
    """The new output ``out`` ("directory", "file", or "store_inside": a new store in the existing
    empty directory ``out``), built aside and published whole by the rule of every tool's output
    (embstore/staged_output.h): ``.path`` is where to build, ``publish()`` puts it at ``out``
    (FileExistsError, never replacing anything, if something appeared there), ``discard()``
    removes it. FileExistsError when something is at ``out`` already; an error naming ``out``
    and why when its directory takes no new entry."""
    return _embstore._StagedOutput(out, shape)


def _require_absent(out: str) -> None:
    """FileExistsError when something is at ``out`` (StagedOutput::require_absent): said before
    slower work (opening the store, scanning its rows), as the CLI says it."""
    _embstore._StagedOutput.require_absent(out)


def _taken_as_they_are(source: str, store: str) -> bool:
    """Whether rows of dtype ``source`` go into a ``store`` store without being asked to convert
    them: the same dtype, a float type widened exactly, or float32 into a 16-bit store (as every
    Writer takes them; tools/lib/import.cc, the same rule)."""
    half = source in ("float16", "bfloat16")
    return (source == store or (half and store in ("float32", "float64")) or
            (source == "float32" and store in ("float64", "float16", "bfloat16")))


def _load_npy(path: str) -> np.ndarray:
    """The .npy file at ``path``, mapped read-only; a file numpy cannot read as one raises
    ValueError naming it (a missing or unreadable one, its OSError)."""
    try:
        return np.load(path, mmap_mode="r")
    except OSError:
        raise
    except Exception as error:  # numpy's ValueError, pickle's UnpicklingError, EOFError...
        raise ValueError(f"{path}: not a readable .npy file: {error}") from None


def _add_note(error: BaseException, note: str) -> None:
    """Adds ``note`` to ``error`` as Python 3.11's add_note does (shown after its message); on
    older versions it goes at the end of the message instead (of a KeyboardInterrupt, which has
    none, it becomes the message)."""
    if hasattr(error, "add_note"):  # Python 3.11
        error.add_note(note)
    elif isinstance(error, OSError) and error.strerror is not None:
        error.strerror = f"{error.strerror}; {note}"
    elif len(error.args) == 1:
        error.args = (f"{error.args[0]}; {note}",)
    else:
        error.args = (*error.args, note)


def _naming_output(error: BaseException, staged: Any) -> BaseException:
    """``error`` of work done at ``staged.path`` as the caller should see it: one of the same
    type whose message names the output first, as every tool words it ("OUT: cannot write it:
    CAUSE (what failed, in the hidden working directory)": StagedOutput::naming_out).
    ``error`` itself when its message does not name the working directory, or its type is not
    one rebuilt here."""
    is_os = isinstance(error, OSError) and error.errno is not None and \
        error.strerror is not None
    if is_os:
        text = error.strerror if error.filename is None else \
            f"{os.fsdecode(error.filename)}: {error.strerror}"
    elif type(error) in (ValueError, RuntimeError, OSError) or isinstance(error, Error):
        text = str(error.args[0]) if len(error.args) == 1 else ""
    else:
        return error
    named = staged.naming_out(text, getattr(error, "errno", None) or 0)
    if named is None:
        return error
    renamed = OSError(error.errno, named) if is_os else type(error)(named)
    for name in ("code", "errno", "__notes__"):
        if name in vars(error):
            setattr(renamed, name, getattr(error, name))
    renamed.__cause__ = error.__cause__
    renamed.__context__ = error.__context__
    return renamed.with_traceback(error.__traceback__)


def _raise_naming_output(error: BaseException, staged: Any) -> None:
    """Raises ``error`` as :func:`_naming_output` names it (the one given, a KeyboardInterrupt
    say, if it is not rebuilt)."""
    renamed = _naming_output(error, staged)
    if renamed is error:
        raise error
    raise renamed from None


def _close_new_store(writer: Writer, staged: Any, rows: int) -> str:
    """Closes ``writer``, the new store built at ``staged.path`` with ``rows`` rows, all synced.
    A close that failed with every row committed and on the device before it left a whole
    store (only its key index, derived data the next Writer rebuilds, could not be kept): the
    store is kept, and why is returned, for :func:`_publish` to warn of once it is published,
    as the CLI's tools and salvage() do (StagedOutput::close_store). Any other failure is
    raised (the output is then discarded). "" when the close succeeded."""
    warning = staged.close_writer(writer._native, rows)
    writer.close()  # closed already: cancels the exit handler
    return warning


def _close_existing_store(writer: Writer) -> None:
    """Closes ``writer`` after an import into an existing store, every row appended committed
    and synced: the close can take none of them back. When all it failed at is the key index
    (derived data the next Writer rebuilds: its message says every row is stored), that is a
    RuntimeWarning, as for a new store, not an error, which sent callers to import the rows
    again, storing them twice. Any other failure is raised. As the CLI's import."""
    try:
        writer.close()
    except Exception as error:  # an OSError of the key index's cause, or any embstore.Error
        # An OSError's text without its "[Errno N] ", as the new store's warning reads.
        warning = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        # Told apart by its text alone, as the core's close_store does: any other failure (a
        # disk's EIO, a store gone from its path) stays an error.
        if isinstance(error, FileNotFoundError) or \
                ": the key index could not be maintained (" not in warning:
            raise
        import warnings
        warnings.warn(warning, RuntimeWarning, stacklevel=3)


def _publish(staged: Any, warning: str = "") -> None:
    """Publishes ``staged``; then warns (RuntimeWarning, from the caller of the io function)
    with ``warning``, a kept store's close error, if any."""
    staged.publish()
    if warning:
        import warnings
        warnings.warn(warning, RuntimeWarning, stacklevel=3)


def _close_after_error(writer: Writer, error: BaseException, afterwards: str) -> None:
    """Closes ``writer`` after ``error`` ended the work, before what it wrote is removed (or,
    into an existing store, kept): an error of the close (the disk still full, say) is noted on
    ``error``, never raised instead of it, so the clean-up after this call always runs.
    ``afterwards`` says what becomes of the store (a close's message speaks of its rows as
    stored)."""
    try:
        writer.close()
    except BaseException as close_error:  # a second Ctrl-C too: the clean-up still runs
        _add_note(error, f"closing the Writer failed too ({afterwards}): "
                         f"{type(close_error).__name__}: {close_error}")


def _selected_runs(reader: Reader, begin: int, end: Optional[int], epochs: Optional[Iterable[int]],
                   latest: bool) -> Tuple[int, Iterator[np.ndarray]]:
    """(count, iterator over arrays of selected row numbers, ascending, a chunk at a time).
    ``begin``, ``end`` and ``epochs`` are refused as Writer.append refuses keys and epochs
    (ValueError naming the value): int() truncated a float (epochs=[1.7] took epoch 1) and a
    negative epoch wrapped to a huge one."""
    size = len(reader)
    begin = _check_integer(begin, "begin", "an integer row number")
    end = size if end is None else _check_integer(end, "end", "an integer row number")
    if not 0 <= begin <= end:
        raise ValueError(f"begin {begin} is after end {end}")
    if end > size:
        raise ValueError(f"end {end} is past the end of {reader.path} ({size} rows)")
    wanted = None
    if epochs is not None:
        if (not isinstance(epochs, (list, tuple, np.ndarray, str, bytes)) and
                not _is_torch_tensor(epochs) and hasattr(epochs, "__iter__")):
            epochs = list(epochs)  # a set, range or generator: checked value by value
        wanted = _u64_array(epochs, "epochs")
        if wanted.ndim != 1:
            raise ValueError(f"epochs must be a 1-D list of epochs; got shape {wanted.shape}")
        if wanted.size == 0:
            # No row would be taken: an empty output that looks like a store with nothing of
            # those epochs. (None takes every epoch.)
            raise ValueError(f"epochs is empty, so no row of {reader.path} would be taken; "
                             "give None for every epoch")
        wanted = np.unique(wanted)
    if wanted is not None or latest:
        # Every row's key and epoch decide what is taken, not only those of the rows taken
        # (whose checksums the copy checks): one flipped bit would take an older version as a
        # key's latest, or leave a row out, unseen (tools/lib/rows.cc does the same).
        # In pieces, so that Ctrl-C ends it (each verify() releases the GIL for its piece).
        piece = max(1, (64 << 20) // max(1, reader.dim * reader.rows(0, 0).dtype.itemsize))
        for lo in range(begin, end, piece):
            report = reader.verify(lo, min(end, lo + piece))
            if report.bad_row_count:
                raise CorruptionError(
                    f"{reader.path}: row {report.bad_rows[0]} fails its checksum, so its key and "
                    f"epoch cannot be trusted to choose rows by "
                    f"{'latest per key' if latest else 'epoch'} (embstore verify and salvage "
                    f"name the damage)")
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


class _NpyFile:
    """A new .npy file of ``shape`` (rows first), written front to back with ordinary writes:
    np.lib.format.open_memmap writes through a mapping of a sparse file, where a full disk is
    SIGBUS (the process killed) instead of an error. A failed write raises OSError naming the
    file."""

    def __init__(self, path: str, dtype: str, shape: Tuple[int, ...]) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.shape = shape
        self.rows = 0
        try:
            self.file = open(path, "xb")
        except OSError as error:
            self._fail(error)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": shape}
        try:
            np.lib.format.write_array_header_1_0(self.file, header)
        except OSError as error:
            self.discard()
            self._fail(error)

    def _fail(self, error: OSError) -> None:
        raise OSError(error.errno, f"cannot write {self.path}: {error.strerror}") from error

    def write(self, rows: np.ndarray) -> None:
        """Appends ``rows`` (converted to the file's dtype as numpy assigns them)."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        try:
            self.file.write(data.data)  # a BufferedWriter: all of it, or an OSError
        except OSError as error:
            self._fail(error)
        self.rows += len(data)

    def finish(self) -> None:
        """Flushes, syncs and closes the file, which must hold every row of its shape."""
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: {self.rows} rows written, the shape says "
                               f"{self.shape[0]}")
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as error:
            self._fail(error)

    def discard(self) -> None:
        """Closes the file after an error (it is removed with its directory)."""
        try:
            self.file.close()
        except (OSError, AttributeError):
            pass


def _write_text(path: str, text: str) -> None:
    """Writes the new file ``path`` and syncs it; OSError naming it if that fails."""
    try:
        with open(path, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from error


def export_npy(store: Any, out: Any, *, epochs: Optional[Sequence[int]] = None,
               latest: bool = False, begin: int = 0, end: Optional[int] = None) -> int:
    """Writes the selected rows of ``store`` (a path or an open Reader) to the new directory
    ``out``: vectors.npy, keys.npy, epochs.npy and embstore.json. Returns the rows written.

    Args:
        epochs: only rows of these epochs (KeyError if one is absent from the range).
        latest: only the latest row of each key (after the epoch filter).
        begin, end: the row range [begin, end) of the snapshot (default: all).
        Epochs and row numbers are integers: a float, bool or negative one raises ValueError
        naming it (never truncated or wrapped), and nothing is written.

    Raises:
        FileExistsError: ``out`` exists.  CorruptionError: a row fails its checksum.
        ValueError: ``out`` lies inside the store (which is only read).
        OSError: a write failed (e.g. ENOSPC, the disk full); the message names ``out``
            first, then the cause and, in parentheses, what failed on which file of the hidden
            working directory, as the CLI says it; nothing is left at ``out``.
        ValueError: ``out`` (or the path ``store``) is not UTF-8 text; nothing is written.
    """
    out = _path_arg(out, "out")
    _require_absent(out)
    reader = store if isinstance(store, Reader) else Reader(store)
    _embstore._refuse_output_inside(out, reader.path)
    count, runs = _selected_runs(reader, begin, end, epochs, latest)
    staged = _staged(out)
    files = []
    try:
        try:
            for name, dtype, shape in (("vectors.npy", _NPY_DTYPES[reader.dtype],
                                        (count, reader.dim)),
                                       ("keys.npy", "<u8", (count,)),
                                       ("epochs.npy", "<u8", (count,))):
                files.append(_NpyFile(os.path.join(staged.path, name), dtype, shape))
            vectors, keys, epoch_out = files
            for rows in runs:
                vectors.write(_read_checked(reader, rows))
                keys.write(reader.keys[rows])
                epoch_out.write(reader.epochs[rows])
            for file in files:
                file.finish()
            _write_text(os.path.join(staged.path, "embstore.json"),
                        json.dumps(_sidecar(reader, count), indent=2) + "\n")
        except Exception as error:
            _raise_naming_output(error, staged)
        staged.publish()
    except BaseException:
        for file in files:
            file.discard()
        staged.discard()
        raise
    return count


class _GuardedFile:
    """The file export_hdf5's HDF5 file is written through (h5py's "fileobj" driver), so that no
    error ever reaches HDF5: after a failed write h5py 3.7 with HDF5 1.10 (Debian 12) cannot
    close the file ("Can't decrement id ref count") and the interpreter crashes (SIGSEGV) when
    its objects are freed later, whatever order they are dropped and closed in (tried). The
    first error (ENOSPC, EFBIG, EIO, or an exception raised in here) is kept in ``error``; the
    writes after it are skipped and reported done (the file is removed anyway), and
    :meth:`check`, called after each HDF5 call, raises it. HDF5 calls are made inside
    ``_InterruptDeferred``: a KeyboardInterrupt raised in here would reach HDF5 too."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.raw = open(path, "xb+", buffering=0)
        self.error: Optional[BaseException] = None

    def _failed(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        try:
            return self.raw.seek(offset, whence)
        except BaseException as error:
            self._failed(error)
            return offset

    def tell(self) -> int:
        try:
            return self.raw.tell()
        except BaseException as error:
            self._failed(error)
            return 0

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        try:
            while done < len(view):
                got = self.raw.readinto(view[done:])
                if not got:
                    break
                done += got
        except BaseException as error:
            self._failed(error)
        view[done:] = bytes(len(view) - done)  # past the end of the file: zeros
        return len(view)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(0, os.fstat(self.raw.fileno()).st_size - self.tell())
        buffer = bytearray(size)
        self.readinto(buffer)
        return bytes(buffer)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):  # unbuffered: a write may store only part
                    done += self.raw.write(view[done:])
            except BaseException as error:
                self._failed(error)
        return len(view)

    def truncate(self, size: Optional[int] = None) -> int:
        if self.error is None:
            try:
                return self.raw.truncate(size)
            except BaseException as error:
                self._failed(error)
        return self.tell() if size is None else size

    def flush(self) -> None:
        pass  # unbuffered

    def check(self) -> None:
        """Raises the first error a call made (OSError naming the file)."""
        error = self.error
        if isinstance(error, OSError) and error.errno is not None:
            raise OSError(error.errno, f"cannot write {self.path}: {error.strerror}") from error
        if error is not None:
            raise error

    def finish(self) -> None:
        """Syncs and closes the file, once HDF5 closed it."""
        self.check()
        try:
            os.fsync(self.raw.fileno())
        except OSError as error:
            self._failed(error)
        self.raw.close()
        self.check()


def export_hdf5(store: Any, out: Any, *, epochs: Optional[Sequence[int]] = None,
                latest: bool = False, begin: int = 0, end: Optional[int] = None) -> int:
    """As :func:`export_npy`, into the new HDF5 file ``out`` (datasets /vectors, /keys,
    /epochs; root attributes dtype, dim, metadata, store_id, embstore_format). Needs h5py."""
    import h5py
    out = _path_arg(out, "out")
    _require_absent(out)
    reader = store if isinstance(store, Reader) else Reader(store)
    _embstore._refuse_output_inside(out, reader.path)
    count, runs = _selected_runs(reader, begin, end, epochs, latest)
    staged = _staged(out, "file")
    path = staged.path
    file = h5 = datasets = None
    try:
        try:
            file = _GuardedFile(path)
            with _InterruptDeferred():
                h5 = h5py.File(file, "w-")
                info = reader.info()
                h5.attrs["embstore_format"] = EXPORT_FORMAT
                h5.attrs["dtype"] = reader.dtype
                h5.attrs["dim"] = np.uint32(reader.dim)
                h5.attrs["metadata"] = reader.metadata_text
                h5.attrs["store_id"] = info["store_id"]
                datasets = (h5.create_dataset("vectors", shape=(count, reader.dim),
                                              dtype=np.dtype(_NPY_DTYPES[reader.dtype])),
                            h5.create_dataset("keys", shape=(count,), dtype="<u8"),
                            h5.create_dataset("epochs", shape=(count,), dtype="<u8"))
            file.check()
            at = 0
            for rows in runs:
                n = len(rows)
                columns = (_read_checked(reader, rows), reader.keys[rows], reader.epochs[rows])
                with _InterruptDeferred():
                    for dataset, column in zip(datasets, columns):
                        dataset[at:at + n] = column
                file.check()
                at += n
            datasets = None  # the datasets before the file
            with _InterruptDeferred():
                h5.close()
            file.finish()
        except BaseException as error:
            datasets = dataset = None
            # Frames of the traceback may hold h5py objects too: dropped before the close.
            traceback.clear_frames(error.__traceback__)
            if h5 is not None:
                with _InterruptDeferred():
                    try:
                        h5.close()
                    except BaseException as close_error:
                        _add_note(error, f"closing the HDF5 file failed too ({path} is "
                                         f"removed): {type(close_error).__name__}: {close_error}")
            if file is not None:
                file.raw.close()
            _raise_naming_output(error, staged)
        staged.publish()
    except BaseException:
        staged.discard()
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
    numbers). bfloat16 bit patterns for a bfloat16 store stay as they are. A big-endian file's
    rows (a valid .npy, which numpy reads as it is) are put in native byte order first, as the
    CLI's import takes them."""
    if not chunk.dtype.isnative:
        chunk = chunk.astype(chunk.dtype.newbyteorder("="))
    if source == "bfloat16" and target != "bfloat16":
        chunk = (chunk.astype(np.uint32) << 16).view(np.float32)
    if target == "float64":
        with np.errstate(invalid="ignore"):  # a signalling NaN widened: a NaN, no warning
            return chunk if chunk.dtype == np.float64 else chunk.astype(np.float64)
    if target in ("float16", "bfloat16", "float32") and chunk.dtype.kind == "f" and \
            target != _dtype_name(chunk.dtype):
        return _rounded_once(chunk, target, rows)
    return chunk


def _append(writer: Writer, keys: np.ndarray, epochs: np.ndarray, vectors: np.ndarray,
            dtype: str) -> int:
    """Appends the rows; returns the row number of the first (a synchronous Writer)."""
    if dtype == "bfloat16" and vectors.dtype == np.uint16:
        # numpy has no bfloat16: hand the raw bit patterns over, named (as Writer does for torch).
        return writer._append(keys, epochs, vectors.view(np.int16), "bfloat16", True)
    return writer.append(keys, vectors, epoch=epochs)


def _imported_note(writer: Writer, store: str, n: int, appended: int, first_row: Optional[int],
                   end_row: Optional[int], contiguous: bool, rows_before: int) -> Optional[str]:
    """What an import into the existing ``store`` that failed (or was interrupted) leaves there,
    as the CLI's import says it: None when it appended nothing, else "R of N rows were imported
    into STORE before this (rows F..E) and stay there". ``appended`` rows were counted, from
    row ``first_row`` to ``end_row``; ``rows_before`` the store held before."""
    stored = writer.stats()["rows"]
    if not stored:
        return None
    if stored != appended:
        # An append returned and the error (a Ctrl-C, caught as the call returned) came before
        # its rows were counted. They are the rows after the counted ones when the store holds
        # just as many more: no other writer appended since.
        known_end = rows_before if end_row is None else end_row
        try:
            alone = writer.committed_rows() == known_end + stored - appended
        except Exception:
            alone = False
        first_row = (known_end if first_row is None else first_row) if alone else None
        end_row = known_end + stored - appended
    where = ""
    if first_row is not None:
        where = (" (rows " if contiguous else " (among other writers' rows, in rows ") + \
            f"{first_row}..{end_row})"
    return f"{stored} of {n} rows were imported into {store} before this{where} and stay there"


def _listed_files(files: Any, sidecar: str) -> dict:
    """An export sidecar's "files" (column -> file name in the export's directory; {} when it
    has none), each name checked: ValueError naming the sidecar, column and value otherwise. As
    the CLI's import reads them."""
    if not isinstance(files, dict):
        return {}
    for column in ("vectors", "keys", "epochs"):
        if column not in files:
            continue
        name = files[column]
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name:
            raise ValueError(f"{sidecar}: files.{column} must be the name of a file in the "
                             f"export's directory; got {json.dumps(name)}")
    return files


def _export_file(base: str, column: str, listed: dict, sidecar: str,
                 instead: str) -> Optional[str]:
    """The path of an npy export's keys or epochs file (``column``: the sidecar's "files" name
    it, else ``keys.npy`` or ``epochs.npy``) in ``base``, or None when it is not there and the
    sidecar does not list it (a directory of .npy files made by hand: keys are then
    0..rows-1, the epoch 0). One the sidecar lists but that is missing (a copy cut short)
    raises FileNotFoundError naming it: the rows would otherwise get made-up keys or epochs.
    ``instead`` names the arguments that make it unneeded."""
    path = os.path.join(base, listed.get(column, f"{column}.npy"))
    if os.path.exists(path):
        return path
    if column not in listed:
        return None
    raise FileNotFoundError(errno.ENOENT, f"{path} is missing, but {sidecar} lists it among the "
                            "export's files: the export is incomplete (a copy cut short?), and "
                            f"nothing was imported; restore the file, or give {instead} to "
                            f"choose the rows' {column}")


def import_npy(store: Any, source: Any, *, keys: Any = None, epochs: Any = None,
               epoch: Optional[int] = None, dtype: Any = None, metadata: Any = None) -> int:
    """Appends rows from ``source`` to ``store``, creating the store when it does not exist (it
    then appears whole when the import finishes) or is an empty directory (built in a hidden
    ``.store.partial-*`` directory inside it, whose files are moved up when the import finishes,
    the header last; after an error the directory is left empty, and a killed import leaves no
    store there, only that hidden directory). A new store whose key index alone could not be
    kept at its close holds every row: it is kept, and a RuntimeWarning says why; so does an
    existing store whose close failed only at its key index after every row was appended and
    synced (the rows are there: importing them again would store them twice). Returns the rows
    appended. Into an
    existing store, the rows appended before an error (a
    KeyboardInterrupt too) stay there, and a note on the error says so: "R of N rows were
    imported into STORE before this (rows F..E) and stay there".

    Args:
        source: an npy export directory (keys, epochs, dtype and metadata come with it), a 2-D
            .npy path, or a 2-D array or CPU torch tensor (a bfloat16 one too).
        keys: a .npy path or array of one key per row (default: the export's, else 0..rows-1).
            An export directory's files are those its sidecar's "files" names (vectors.npy,
            keys.npy, epochs.npy when it names none); a keys or epochs file it lists that is
            missing raises FileNotFoundError naming it (nothing imported), unless keys=
            (epochs= or epoch=) makes it unneeded.
        epochs: a .npy path or array of one epoch per row; or ``epoch`` for all rows (default 0).
            Giving both raises ValueError (an export's own epochs.npy gives way to ``epoch``).
        dtype: the new store's dtype (default: the source's); "bfloat16" also reads uint16
            input as bfloat16 bit patterns (without it or a sidecar saying so, uint16 input is
            refused). Float rows are converted to a float store's dtype. For an existing store,
            a dtype other than the store's raises FormatMismatchError and appends nothing
            (except "bfloat16" naming uint16 input as bit patterns); rows that would be rounded
            (float64 into a float32 store, say; not float32 into a 16-bit store, as every
            Writer takes them) need ``dtype`` naming the store's dtype, else
            FormatMismatchError, as the CLI's import refuses them.
        metadata: the new store's metadata (default: the export's). For an existing store,
            metadata other than the store's (as text, or as JSON) raises FormatMismatchError
            and appends nothing: a store's metadata is fixed when it is created.

    Two imports creating the same store at once both store their rows: the one that finds the
    other's store there when its own is complete appends to it instead (its own is removed),
    as into any existing store, as the CLI's import does.
    """
    store = _path_arg(store, "store")

    def nothing_at_store() -> bool:
        return not os.path.exists(store) or (os.path.isdir(store) and not os.listdir(store))

    was_new = nothing_at_store()
    again = dict(keys=keys, epochs=epochs, epoch=epoch, dtype=dtype, metadata=metadata)
    try:
        return _import_once(store, source, **again)
    except FileExistsError:
        if not was_new or nothing_at_store():
            raise
    return _import_once(store, source, **again)


def _import_once(store: str, source: Any, *, keys: Any, epochs: Any, epoch: Optional[int],
                 dtype: Any, metadata: Any) -> int:
    """import_npy(), once."""
    if epochs is not None and epoch is not None:
        # One would be ignored without a word: the rows stored under other epochs than asked.
        raise ValueError(f"import into {store}: give epochs (one per row) or epoch (one for "
                         f"every row), not both; got epoch={epoch!r} and epochs too")
    side = {}
    vectors_name = "vectors"  # what errors call the vectors: their file when there is one
    sidecar = None
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        base = os.fspath(source)
        sidecar = os.path.join(base, "embstore.json")
        if os.path.exists(sidecar):
            with open(sidecar) as f:
                try:
                    side = json.load(f)
                except ValueError as error:
                    raise ValueError(f"{sidecar}: not an export's sidecar (JSON): {error}") \
                        from None
            if not isinstance(side, dict):
                raise ValueError(f"{sidecar}: not an export's sidecar (a JSON object); got "
                                 f"{type(side).__name__}")
        listed = _listed_files(side.get("files"), sidecar)
        vectors_name = os.path.join(base, listed.get("vectors", "vectors.npy"))
        vectors = _load_npy(vectors_name)
        if keys is None:
            keys = _export_file(base, "keys", listed, sidecar, "keys=")
        if epochs is None and epoch is None:
            epochs = _export_file(base, "epochs", listed, sidecar, "epochs= or epoch=")
    elif isinstance(source, (str, os.PathLike)):
        vectors_name = os.fspath(source)
        vectors = _load_npy(vectors_name)
    elif _is_torch_tensor(source):
        # As Writer.append takes a tensor (CPU only); numpy has no bfloat16, so its rows come
        # as their bit patterns (uint16), which the sidecar's dtype says are bfloat16.
        vectors, as_dtype = _as_vectors(source, "float32")
        if as_dtype == "bfloat16":
            vectors = vectors.view(np.uint16)
            side = {"dtype": "bfloat16"}
    else:
        vectors = np.asarray(source)
    if vectors.ndim != 2:
        raise ValueError(f"{vectors_name} must be 2-D (rows, dim); got shape {vectors.shape}")
    n, dim = vectors.shape

    def column(value: Any, name: str) -> Optional[np.ndarray]:
        """One key or epoch per row, refused as Writer.append refuses them: bools, floats,
        objects and negative values (never truncated or wrapped)."""
        if value is None:
            return None
        if isinstance(value, (str, os.PathLike)):
            what = f"{name} ({os.fspath(value)})"
            array = _load_npy(os.fspath(value))
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
    if source_dtype is not None and vectors.dtype != np.uint16 and \
            source_dtype != _dtype_name(vectors.dtype):
        # The rows are what their file holds: a sidecar saying otherwise (vectors.npy replaced
        # after the export, say) would have them taken as another type's values or bits.
        raise ValueError(f"{sidecar} says dtype {source_dtype!r} but {vectors_name} holds "
                         f"{_dtype_name(vectors.dtype)} values; fix or remove the sidecar")
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
    step = max(1, _CHUNK_BYTES // max(1, dim * vectors.dtype.itemsize))  # rows a chunk
    staged = None  # where a new store is made: a hidden sibling of ``store``, or inside it
    in_place = os.path.isdir(store) and not os.listdir(store)
    if os.path.exists(store) and not in_place:
        given_metadata = None if metadata is None else _metadata_text(metadata)

        def mismatch_of(handle: Any) -> Optional[str]:
            """Why the rows do not go into the store ``handle`` (a Reader or Writer) opened."""
            have = handle.dtype
            if handle.dim != dim:
                return f"{store} has dim {handle.dim} but the source has {dim} columns"
            if given_metadata is not None and not _same_metadata(
                    given_metadata, handle.info(key_stats=False)["metadata"]):
                return (f"{store} exists, with other metadata than metadata= gives; metadata "
                        "is for a new store (an existing store's metadata is fixed)")
            if dtype is not None and store_dtype != have and not (
                    vectors.dtype == np.uint16 and store_dtype == "bfloat16"):
                # Rows converted to the store's dtype anyway would not be what was asked for.
                # With uint16 rows, dtype="bfloat16" only says what the input is (bit patterns).
                return (f"{store} holds {have} rows but dtype={store_dtype!r} was asked for; a "
                        "store's dtype is fixed when it is created")
            if (dtype is None or _dtype_name(dtype) != have) and \
                    not _taken_as_they_are(source_dtype, have):
                # As the CLI's import: rows are converted where nothing is lost, or where the
                # Writer takes them (float32 into a 16-bit store), or where dtype= names the
                # store's dtype, asking for the rounding (float64 rounded into a float32 store
                # without a word is the mistake Writer.append refuses).
                floats = {source_dtype, have} <= {"float16", "bfloat16", "float32", "float64"}
                hint = (f"; give dtype={have!r} to convert them (rounded to the nearest {have})"
                        if floats else " (rows are converted between float types only)")
                return f"{store} holds {have} rows but {vectors_name} holds {source_dtype}{hint}"
            return None

        # Checked first on a Reader, which changes nothing: a refused import leaves the store
        # as it was (a Writer's open may recover it, make its key index, rewrite its header).
        # Checked again on the Writer, should the store have been replaced in between.
        with Reader(store) as reader:
            mismatch = mismatch_of(reader)
            if mismatch is None and _may_overflow(source_dtype, reader.dtype):
                # Every value is checked before the first row is appended, and before a Writer
                # opens the store: a refused import leaves the store as it was.
                for lo in range(0, n, step):
                    _as_store_rows(np.ascontiguousarray(vectors[lo:lo + step]), source_dtype,
                                   reader.dtype, range(lo, min(n, lo + step)))
        if mismatch is None:
            # The key index built for the rows imported (a growth goes straight to tables for
            # them), not grown through every size on the way; as the CLI's import.
            writer = Writer(store, expected_rows=min(n, _MAX_ROWS))
            mismatch = mismatch_of(writer)
            if mismatch is not None:
                writer.close()
        if mismatch is not None:
            from ._errors import FormatMismatchError
            raise FormatMismatchError(mismatch)
    else:
        meta = metadata if metadata is not None else side.get("metadata")
        # Into an empty directory (a mounted volume: it cannot be replaced, and beside it is
        # another file system) the store is built in a hidden directory inside it and its files
        # moved up when complete (the core's move_store_into), as the CLI's import does: a
        # killed import leaves no store there that looks whole.
        staged = _staged(store, "store_inside" if in_place else "directory")
        try:
            writer = Writer(staged.path, dim=dim, dtype=store_dtype, metadata=meta,
                            expected_rows=min(n, _MAX_ROWS))
        except BaseException as error:  # e.g. a bad dim or metadata: no hidden directory
            staged.discard()
            _raise_naming_output(error, staged)
    # The rows this import appended, as the CLI's import reports them (tools/lib/import.cc):
    # rows first_row..end_row, contiguous unless another writer appended in between.
    appended = 0
    first_row = end_row = None
    contiguous = True
    rows_before = writer.committed_rows() if staged is None else 0
    try:
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            chunk = _as_store_rows(np.ascontiguousarray(vectors[lo:hi]), source_dtype,
                                   writer.dtype, range(lo, hi))
            k = (np.arange(lo, hi, dtype=np.uint64) if key_array is None
                 else np.asarray(key_array[lo:hi], dtype=np.uint64))
            e = (np.full(hi - lo, epoch, dtype=np.uint64)
                 if epoch_array is None else np.asarray(epoch_array[lo:hi], dtype=np.uint64))
            row = _append(writer, k, e, chunk, source_dtype if chunk.dtype == np.uint16 else "")
            contiguous = contiguous and (first_row is None or row == end_row)
            first_row = row if first_row is None else first_row
            end_row = row + hi - lo
            appended += hi - lo
        writer.sync()
        if staged is None:
            _close_existing_store(writer)
        else:
            _publish(staged, _close_new_store(writer, staged, appended))
    except BaseException as error:
        # Whatever the error (a KeyboardInterrupt too), and whatever the close raises after it:
        # a new store is removed, and rows appended to an existing one are said to stay there
        # (a retry would append them again).
        if staged is None:
            note = _imported_note(writer, store, n, appended, first_row, end_row, contiguous,
                                  rows_before)
            if note is not None:
                _add_note(error, note)
            _close_after_error(writer, error, f"the rows appended to {store} stay there")
            raise
        _close_after_error(writer, error,
                           f"the store made in {store} is removed, leaving it empty" if in_place
                           else f"{staged.path} is removed; nothing is made at {store}")
        staged.discard()
        _raise_naming_output(error, staged)
    return n


def compact(store: Any, out: Any, *, latest_per_key: bool = False,
            epochs: Optional[Sequence[int]] = None, dtype: Any = None) -> int:
    """Writes the kept rows of ``store`` into a new store at ``out`` (same dim, rows per segment,
    metadata and key-index choice; a new store id), built under a hidden name and renamed into
    place when complete. The source is only read. Returns the rows kept. When only the new
    store's key index could not be kept at its close (out of open files or memory), every row
    is in ``out``: the store is kept and a RuntimeWarning says why (lookups scan until its next
    Writer builds the index), as the CLI's compact does.

    Args:
        latest_per_key: keep only the latest row of each key.
        epochs: keep only rows of these epochs (KeyError if one is absent; ValueError, naming
            it, for a float, bool or negative one).
        dtype: convert rows to this dtype (float types only).

    ``out`` and a path ``store`` must be UTF-8 text (ValueError naming it otherwise).
    """
    out = _path_arg(out, "out")
    _require_absent(out)
    reader = store if isinstance(store, Reader) else Reader(store)
    _embstore._refuse_output_inside(out, reader.path)
    target = _dtype_name(dtype) if dtype is not None else reader.dtype
    floats = ("float32", "float16", "bfloat16", "float64")
    if target != reader.dtype and not (target in floats and reader.dtype in floats):
        from ._errors import FormatMismatchError
        raise FormatMismatchError(
            f"{reader.path}: holds {reader.dtype} rows but dtype={target!r} was asked for "
            "(compact converts rows between float types only, never to or from int8 or uint8); "
            f"nothing was made at {out}")
    count, runs = _selected_runs(reader, 0, None, epochs, latest_per_key)
    info = reader.info()
    # As many rows per segment as the source: a wider dtype's rows would not fit its segment.
    sizes = [np.dtype(_NPY_DTYPES[t]).itemsize for t in (target, reader.dtype)]
    widen = max(1, sizes[0] // sizes[1])
    staged = _staged(out)
    writer = warning = None
    try:
        try:
            writer = Writer(staged.path, dim=reader.dim, dtype=target,
                            metadata=reader.metadata_text,
                            segment_mb=info["segment_bytes"] * widen / (1 << 20),
                            key_index=info["keeps_key_index"], expected_rows=count)
            for rows in runs:
                chunk = _as_store_rows(_read_checked(reader, rows), reader.dtype, target, rows)
                _append(writer, np.asarray(reader.keys[rows]), np.asarray(reader.epochs[rows]),
                        chunk, target if chunk.dtype == np.uint16 else "")
            writer.sync()
            warning = _close_new_store(writer, staged, count)
        except BaseException as error:
            # Not Writer's with-block: it logs a failed close as rows lost from a store, and
            # this one is removed.
            if writer is not None:
                _close_after_error(writer, error,
                                   f"{staged.path} is removed; nothing is made at {out}")
            _raise_naming_output(error, staged)
        _publish(staged, warning)
    except BaseException:
        staged.discard()
        raise
    return count
