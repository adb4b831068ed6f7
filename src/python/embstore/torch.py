"""PyTorch integration: train on stored embeddings, and record a module's outputs while training.

* ``EmbeddingDataset`` — a ``torch.utils.data.Dataset`` over the rows of a store.
* ``EmbeddingRecorder`` — saves the outputs of a named submodule (a forward hook) into a store,
  with sample ids taken from the batch, from every rank of a torch.distributed job.

Example (inside a DDP training loop)::

    recorder = EmbeddingRecorder(model, "encoder.fc2", "run.emb", dim=128)
    for epoch in range(epochs):
        for x, y, ids in loader:            # the loader yields each sample's id
            with recorder.batch(ids, epoch):   # the hook saves fc2's output for these ids
                loss = criterion(model(x), y)
            loss.backward(); opt.step()
    recorder.close()
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing.util as _mp_util
import operator
import os
import threading
import time
import weakref
from typing import Any, Callable, ContextManager, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data

from . import (Error, Reader, Writer, _BFLOAT16_OVERFLOW, _EXIT_CALLBACKS, _TERMINATION,
               _WRITER_EXIT_PRIORITY, _InterruptDeferred, _as_ints, _bfloat16_ready, _described, _dtype_name, _embstore,
               _log, _check_u64, _moved_away, _path_arg, shards)
from ._errors import ClosedError

__all__ = ["EmbeddingDataset", "EmbeddingRecorder"]

# This process's id, kept current in forked children: the recorder's hook runs every training
# step, and os.getpid() is a system call (microseconds on virtual machines).
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


class EmbeddingDataset(torch.utils.data.Dataset):
    """A map-style Dataset over the rows of a store: item ``i`` is
    ``(vector, key, epoch)`` — a torch tensor of shape (dim,) and two ints. Keys are sample ids
    in [0, 2**64): torch's default collate makes int64 tensors of them, which hold keys below
    2**63 only (a key of 2**63 or more, a hashed id, raises "Overflow when unpacking long"
    in the DataLoader); for such keys give the DataLoader a ``collate_fn`` that keeps them as
    a numpy uint64 array, e.g. ``lambda items: (torch.stack([i[0] for i in items]),
    np.array([i[1] for i in items], np.uint64), torch.tensor([i[2] for i in items]))``.

    The rows are those of the Reader's snapshot at construction (``refresh()`` takes a newer
    one), or the row numbers given in ``rows`` (e.g. selected with numpy over
    ``Reader(path).epochs``). Each item's vector is copied out of the read-only mapping, so the
    training code may modify it; bfloat16 rows come back as torch.bfloat16 unless ``dtype`` asks
    for another torch dtype (e.g. torch.float32).

    Works with DataLoader workers under fork (Readers are fork-safe) and spawn (it pickles as
    the path and reopens), persistent ones too: the main process's snapshot (generation and rows)
    sits in shared memory, and a worker whose snapshot differs (after ``refresh()`` in the main
    process, or after reopening the store) refreshes its Reader to it. Where the store no longer
    holds that snapshot's rows (truncated since, removed, or another store made at the path)
    the worker raises ``embstore.Error`` naming the store and what changed, at its first item
    (so the DataLoader raises it in the main process): never other rows under the same
    indices.

    Under DDP while the store is still being appended to, each rank's snapshot is taken when
    it makes its dataset, so ranks can see different lengths, run different numbers of steps
    and hang in a collective. Give every rank the same rows: e.g. rank 0 broadcasts
    ``len(embstore.Reader(path))`` and each rank passes ``rows=numpy.arange(n)``. ``refresh()``
    changes the length: make the DistributedSampler again after it, on every rank.

    Args:
        store: a path or an open ``embstore.Reader``.
        rows: optional 1-D array of row numbers to serve (default: every row of the snapshot).
        dtype: optional torch dtype to convert vectors to. A stored value it cannot hold (a
            finite one beyond float16's range, one outside an integer dtype's) raises ValueError
            naming its row and column; rounding is not reported.
        transform: optional callable applied to each vector tensor.
    """

    def __init__(self, store: Any, rows: Optional[Sequence[int]] = None,
                 dtype: Optional[torch.dtype] = None,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype == torch.bool):
            raise ValueError(f"{store}: dtype must be a numeric torch dtype such as "
                             f"torch.float32; got {dtype!r}")
        self._reader = store if isinstance(store, Reader) else Reader(store)
        self._path = self._reader.path
        self._dtype = dtype
        self._transform = transform
        self._size = len(self._reader)
        self._generation = self._reader.generation
        self._store_id = self._reader.info(key_stats=False)["store_id"]
        self._rows = None if rows is None else self._row_numbers(rows)
        self._stale: Optional[str] = None  # Why it serves no more rows (refresh()).
        # The main process's snapshot (generation, rows), shared with DataLoader workers (a
        # pickled shared tensor stays shared, and fork shares the memory): a persistent worker's
        # copy of the dataset is never pickled again, and must learn of a refresh() here.
        self._main = torch.tensor([self._generation, self._size]).share_memory_()
        self._main_view = self._main.numpy()

    def refresh(self) -> int:
        """Takes in rows committed since construction (when no explicit ``rows`` were given);
        returns the new length. Call it in the main process: DataLoader workers, persistent
        ones included, follow at their next item."""
        if self._rows is not None:
            # The rows given are numbers in this snapshot's generation: after a truncate they
            # name other rows, or none. Refused before the snapshot moves, so this dataset still
            # serves the rows it was given.
            now = self._opened().info(key_stats=False)["generation"]
            if now != self._generation:
                raise ValueError(f"{self._path}: truncated since this dataset's rows were chosen "
                                 f"(generation {self._generation} -> {now}); choose them again "
                                 "and make a new dataset")
        size = self._opened().refresh()
        if self._rows is not None and self._reader.generation != self._generation:
            # A truncate between the look above and the refresh: this process's snapshot moved
            # past the rows given. It serves nothing more (workers keep the old snapshot).
            self._stale = (f"{self._path}: truncated since this dataset's rows were chosen "
                           f"(generation {self._generation} -> {self._reader.generation}); "
                           "choose them again and make a new dataset")
            raise ValueError(self._stale)
        self._size = size
        self._generation = self._reader.generation
        self._main_view[:] = (self._generation, self._size)
        return len(self)

    def __len__(self) -> int:
        return self._size if self._rows is None else int(self._rows.size)

    def _row_numbers(self, rows: Any) -> np.ndarray:
        """``rows`` as int64 row numbers, checked: 1-D, integers (not floats or bools, which
        numpy would truncate or take as 0/1), inside the snapshot."""
        array = np.asarray(rows)
        if array.ndim != 1:
            raise ValueError(f"{self._path}: rows must be 1-D; got shape {array.shape}")
        if array.size and array.dtype.kind not in "iu":
            raise ValueError(f"{self._path}: rows must be integer row numbers; got dtype "
                             f"{array.dtype}")
        outside = np.flatnonzero((array < 0) | (array >= self._size)) if array.size else []
        if len(outside):
            raise ValueError(f"{self._path}: rows[{outside[0]}] is {array[outside[0]]}, outside "
                             f"the snapshot's rows [0, {self._size})")
        return array.astype(np.int64)

    def _row(self, index: Any) -> int:
        """The row of dataset index ``index``: an integer (a numpy or 0-d torch integer too,
        not a float, str or bool), negative counting from the end."""
        i = None
        if not isinstance(index, (bool, np.bool_)) and not (
                isinstance(index, torch.Tensor) and index.dtype == torch.bool):
            try:
                i = operator.index(index)
            except TypeError:
                pass
        if i is None:
            raise TypeError(f"{self._path}: dataset indices are integers; got "
                            f"{type(index).__name__} {index!r}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self._path}: index {i} out of range for {n} rows")
        if i < 0:
            i += n
        if self._stale is not None:
            raise ValueError(self._stale)
        return i if self._rows is None else int(self._rows[i])

    def _follow(self) -> None:
        """Takes the main process's snapshot (in a worker, or a copy unpickled): refreshes this
        process's Reader to it, or raises embstore.Error when the store no longer holds it."""
        generation, size = (int(v) for v in self._main_view)
        reader = self._opened()
        if reader.generation != generation or len(reader) < size:
            reader.refresh()
        store_id = reader.info(key_stats=False)["store_id"]
        if store_id != self._store_id:
            raise Error(f"{self._path}: another store is there now (store id {store_id}; "
                        f"this dataset's: {self._store_id}): its rows are gone; make a new "
                        "EmbeddingDataset (and DataLoader)")
        if reader.generation != generation:
            raise Error(f"{self._path}: the store was truncated since this dataset's snapshot "
                        f"of {size} rows (generation {generation}; the store is at generation "
                        f"{reader.generation} now, {len(reader)} rows): those rows are gone; "
                        "make a new EmbeddingDataset (and DataLoader)")
        self._generation, self._size = generation, size

    def __getitem__(self, index: int):
        main = self._main_view
        # The Reader too: one the caller passed in may have been refreshed by the caller, past
        # a truncate, under this dataset's snapshot.
        if (main[1] != self._size or main[0] != self._generation or self._reader is None
                or self._reader.generation != self._generation):
            self._follow()
        row = self._row(index)
        view = self._reader.rows(row, row + 1)[0]
        if self._reader.dtype == "bfloat16":
            vector = torch.from_numpy(view.view(np.int16).copy()).view(torch.bfloat16)
        else:
            vector = torch.from_numpy(view.copy())
        if self._dtype is not None and vector.dtype != self._dtype:
            vector = self._converted(vector, row)
        if self._transform is not None:
            vector = self._transform(vector)
        key = int(self._reader._native.keys(row, row + 1)[0])
        epoch = int(self._reader._native.epochs(row, row + 1)[0])
        return vector, key, epoch

    def _converted(self, vector: torch.Tensor, row: int) -> torch.Tensor:
        """``vector`` (row ``row``) in the dtype asked for; a stored value the conversion would
        change beyond rounding (a finite one become infinity, or one outside an integer dtype's
        range or not finite) raises ValueError naming it, as the store refuses such values on
        the way in, where torch would return infinity or wrapped integers without a word."""
        out = vector.to(self._dtype)
        if out.dtype.is_floating_point:
            changed = torch.isinf(out) & torch.isfinite(vector)
        elif out.dtype.is_complex:
            changed = torch.zeros(out.shape, dtype=torch.bool)
        else:
            info = torch.iinfo(out.dtype)
            wide = vector.double()
            # Bounds as Python floats (exact: powers of two): torch cannot compare a tensor with
            # the int 2**63 (int64's max + 1), "Overflow when unpacking long".
            changed = ~torch.isfinite(wide) | (wide < float(info.min)) | \
                (wide >= float(info.max + 1))
        if bool(changed.any()):
            column = int(torch.nonzero(changed)[0, 0])
            raise ValueError(
                f"{self._path}: row {row}, column {column}: the stored value "
                f"{float(vector[column])!r} is beyond {self._dtype}'s range and would be "
                f"returned as {out[column].item()!r}; ask for a wider dtype")
        return out

    @property
    def reader(self) -> Reader:
        """The underlying Reader (for keys/epochs/metadata)."""
        return self._opened()

    def _opened(self) -> Reader:
        """This process's Reader; an unpickled copy opens it here, at first use."""
        if self._reader is None:
            try:
                self._reader = Reader(self._path)
            except FileNotFoundError as error:
                raise Error(f"{self._path}: this dataset's store cannot be reopened ({error}); "
                            "its rows are gone: make a new EmbeddingDataset (and DataLoader)"
                            ) from error
        return self._reader

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_reader"] = state["_main_view"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        # Opened at the first item (the newest snapshot, checked there), not here: a spawned
        # DataLoader worker unpickles the dataset before it serves anything, and an error then
        # kills it with no message for the main process ("worker exited unexpectedly"); one
        # raised by an item is sent to the main process and raised there.
        self._reader = None
        self._main_view = self._main.numpy()
        self._generation = -1


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "float64": torch.float64}
# The exponent bits of a float type, all set in its infinities and NaNs: a converted value with
# them all set, whose source was finite, overflowed.
def _float64_rounded_once(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out`` as it should be stored in ``dtype``: a float64 tensor for a float16 or bfloat16
    store rounded once to nearest even, on the CPU (torch converts float64 to them through
    float32, rounding twice); a value beyond the range becomes infinity, for the caller's
    overflow check to refuse. Anything else is returned as it is (one rounding by torch)."""
    if out.dtype != torch.float64 or dtype not in (torch.float16, torch.bfloat16):
        return out
    values = out.detach().to("cpu").numpy()
    if dtype == torch.float16:
        with np.errstate(over="ignore"):
            return torch.from_numpy(values.astype(np.float16))  # numpy rounds once
    beyond = np.abs(values) >= _BFLOAT16_OVERFLOW
    # Below the limit: float32 that bfloat16's own rounding takes to the once-rounded value.
    ready = torch.from_numpy(_bfloat16_ready(np.where(beyond, 0.0, values))).to(torch.bfloat16)
    if beyond.any():
        ready[torch.from_numpy(beyond)] = torch.from_numpy(
            np.copysign(np.inf, values[beyond])).to(torch.bfloat16)
    return ready


_INFINITY_BITS = {torch.float16: 0x7c00, torch.bfloat16: 0x7f80, torch.float32: 0x7f800000}


def _group_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _env_int(name: str, default: int) -> int:
    """An integer torchrun (or another launcher) put in the environment, else `default`."""
    text = os.environ.get(name, "")
    try:
        return int(text) if text.strip() else default
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def _launcher_rank() -> Tuple[int, int]:
    """(RANK, WORLD_SIZE) a launcher (torchrun) put in the environment, both or neither (0, 1),
    checked against each other: a rank without a world size, or outside it, is a ValueError."""
    rank, world = _env_int("RANK", -1), _env_int("WORLD_SIZE", -1)
    if rank < 0 and world < 0:
        return 0, 1
    if not 0 <= rank < world:
        raise ValueError(f"environment variables RANK={os.environ.get('RANK')!r} and "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: a launcher sets both, "
                         f"with 0 <= RANK < WORLD_SIZE")
    return rank, world


def _rank() -> int:
    """The process group's rank; without one, the launcher's RANK (torchrun sets it for a job
    that never calls init_process_group, an inference-only extraction say), else 0."""
    if _group_initialized():
        return torch.distributed.get_rank()
    return _launcher_rank()[0]


def _world_size() -> int:
    if _group_initialized():
        return torch.distributed.get_world_size()
    return _launcher_rank()[1]


class _Staging:
    """One process's Writer and the rows staged for it. Kept apart from the recorder so that
    the exit finalizer can flush it without keeping the recorder alive.

    Threads: the rows are staged (EmbeddingRecorder._record), submitted and finished under
    ``lock``, so that a flush(), close() or end_epoch() on another thread than the one
    recording (a dashboard's timer, a checkpoint callback, the exit finalizer while a daemon
    thread records) takes whole batches only: without it a submit between a batch's copy and
    its ``filled`` appended rows of uninitialised memory, lost rows and raised TypeError. A
    reentrant lock: a signal handler on the recording thread (SIGTERM's writing, _Termination)
    may finish the staging in the middle of _record, which updates ``filled`` last, so the rows
    submitted then are whole. After ``finish()``, ``closed``: a batch staged later would never
    be written, so _record refuses it (ClosedError)."""

    def __init__(self, writer: Writer, buffer_rows: int) -> None:
        self.writer = writer
        self.buffer_rows = buffer_rows  # 0: every recorded batch is appended at once
        self.pid = _pid
        self.dtype = _TORCH_DTYPES[writer.dtype]  # of the buffer: the store's
        self.buffer: Optional[torch.Tensor] = None  # donated to the Writer when submitted
        self.keys = np.empty(buffer_rows, np.uint64)
        self.epoch = 0  # of every staged row: rows of another epoch are staged after a submit
        self.filled = 0
        self.lock = threading.RLock()
        self.closed = False

    def submit(self) -> None:
        """Hands the staged rows to the Writer as one append (queued in async mode)."""
        with self.lock:
            if not self.filled:
                return
            # A SIGTERM's writing (_TERMINATION) waits until the rows taken out are appended,
            # and so does a Ctrl-C's KeyboardInterrupt: raised between the two, it lost them
            # without a word.
            with _TERMINATION, _InterruptDeferred():
                n, self.filled = self.filled, 0
                buffer, self.buffer = self.buffer, None
                try:
                    # Donated (copy=False): the recorder never touches this buffer again.
                    self.writer.append(self.keys[:n], buffer[:n], self.epoch, copy=False)
                except BaseException:
                    # Not taken (a refused append queues nothing): the rows stay staged, so a
                    # later submit tries again and a loss at exit counts them.
                    self.filled, self.buffer = n, buffer
                    raise

    def finish(self, interruptible: bool = True) -> None:
        """Appends the staged rows and closes the Writer (raising a write error); Ctrl-C may end
        the close's wait for the queue only when ``interruptible`` (Writer._close)."""
        with self.lock:
            self.closed = True
            try:
                self.submit()
            finally:
                self.writer._close(interruptible)


# Above the Writers' own exit finalizers: a recorder's staged rows go into its Writer first.
_RECORDER_EXIT_PRIORITY = _WRITER_EXIT_PRIORITY + 10


def _finish_unclosed(staging: _Staging, path: str, module_name: str) -> None:
    """Exit finalizer (and garbage collection) of a recorder nobody closed."""
    if staging.pid != _pid:
        return
    staged = staging.filled
    # Nobody calls close() after this: not ended by Ctrl-C, nor reported as a loss for one. A
    # SIGINT meanwhile is acted on once it is over, and dropped with what is logged below: an
    # exit handler (or garbage collection) has no one to raise to.
    with contextlib.suppress(KeyboardInterrupt), _InterruptDeferred():
        try:
            staging.finish(interruptible=False)
        except BaseException as error:
            if _moved_away(error):
                _log.warning("%s: the EmbeddingRecorder of %r was not closed; its rows were "
                             "written, but into a store no longer at this path: %s", path,
                             module_name, error)
                return
            _log.error("%s: the EmbeddingRecorder of %r was not closed and failed to write its "
                       "rows (%d staged rows, %d queued rows lost): %s", path, module_name,
                       staged, staging.writer.stats().get("dropped_rows", 0), _described(error))


_EXIT_CALLBACKS.add(_finish_unclosed)


class _RecordingBlock:
    """The block of one ``EmbeddingRecorder.batch()``: its forward passes are recorded under
    these ids and this epoch. (A class, not a generator: it is entered every training step.)"""

    __slots__ = ("_recorder", "_ids", "_epoch")

    def __init__(self, recorder: "EmbeddingRecorder", ids: np.ndarray, epoch: int) -> None:
        self._recorder, self._ids, self._epoch = recorder, ids, epoch

    def __enter__(self) -> None:
        self._recorder._ids = self._ids
        self._recorder._epoch = self._epoch

    def __exit__(self, *exc: Any) -> None:
        self._recorder._ids = None


class _Hook:
    """An EmbeddingRecorder's forward hook: a weak reference to the recorder, so that the model
    does not keep a recorder nobody closed alive. A ``copy.deepcopy`` of the model (an EMA
    model, say) gets a hook that records nothing: the recorder records the module it was given
    (with the recorder itself as the hook, a deepcopy raised once the recorder had a Writer,
    and copied the recorder before). Pickled (a dataset holding the model and its recorder,
    sent to spawned DataLoader workers), the hook takes its live recorder along, as the bound
    method did: the worker's model records through the worker's recorder."""

    __slots__ = ("_recorder",)

    def __init__(self, recorder: Optional["EmbeddingRecorder"]) -> None:
        self._recorder = None if recorder is None else weakref.ref(recorder)

    def __call__(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        recorder = None if self._recorder is None else self._recorder()
        if recorder is not None:
            recorder._hook(module, inputs, output)

    def __deepcopy__(self, memo: dict) -> "_Hook":
        return _Hook(None)

    def __reduce__(self) -> tuple:
        return (_Hook, (None if self._recorder is None else self._recorder(),))


class EmbeddingRecorder:
    """Saves the outputs of one named submodule into a store, from inside a training loop.

    A forward hook on ``module_name`` (looked up in ``model.named_modules()``; a DDP wrapper's
    "module." prefix is handled) records the module's output for every forward pass that runs
    inside ``with recorder.batch(ids, epoch):``; forward passes outside it are not recorded.
    ``ids`` are the batch's sample ids (a tensor, array or list of integers >= 0, one per
    output row); they become the rows' keys.

    Rank-aware: each process (DDP rank) opens its own Writer on the shared store (created by
    whichever rank gets there first; all ranks may append at once), lazily on the first
    recorded batch, so a recorder made before ``fork``/``spawn`` works in the child. ``ranks``
    restricts recording to some ranks (default: every rank). A new store's metadata is
    ``{"module": module_name}`` unless ``metadata`` is given.

    Cost on the training step: the hook copies the output (detached; converted to the store's
    dtype, a finite value that would become infinity raising ValueError in the forward pass
    instead; moved to the CPU if needed) into a staging buffer of ``buffer_rows`` rows — a copy
    is needed anyway, because a later in-place op (e.g. ReLU(inplace=True) after this module)
    would otherwise change the values before they are written. A full buffer is donated to the
    Writer as one append (``copy=False``: queued without a second copy on the training
    thread; ``async_queue_mb``), so the store sees few, large batches. Rows reach the store
    when their buffer is full, when the epoch changes, on ``flush()`` and on ``close()``; call
    ``flush(wait=False)`` at the end of an epoch to make it visible to readers without
    waiting. A batch larger than ``buffer_rows`` is appended on its own. Write errors surface
    on a later batch, on ``flush()`` or on ``close()``.

    Threads: record (``batch()`` and the forward passes) on one thread; ``flush()``,
    ``end_epoch()``, ``stats()`` and ``close()`` may be called from any thread meanwhile, and
    take whole batches (a batch recorded after ``close()`` raises ClosedError in its forward
    pass).

    Not closed: staged and queued rows are still written when the interpreter exits, when a
    ``multiprocessing`` child ends (before its ``os._exit``) and when the recorder is
    garbage-collected (the model holds only a weak reference to it: a recorder dropped without
    ``close()``, a notebook cell run again say, is collected and its hook taken off); a failure
    then is logged on the ``embstore`` logger with the store's path and the rows lost. In a
    DataLoader or Pool worker, SIGTERM (which multiprocessing sends its daemon children at exit)
    runs those handlers before it ends the worker (``Writer``, "Exit"). A process killed
    otherwise, or leaving through ``os._exit`` outside multiprocessing, loses them: call
    ``close()``.

    DistributedSampler padding: unless ``drop_last=True``, torch's DistributedSampler pads each
    epoch to a multiple of the number of ranks by repeating samples, so a few samples pass
    through the model twice per epoch (on different ranks, or the same one) and the store gets
    duplicate (key, epoch) rows. Give ``sampler=`` (the DistributedSampler) or
    ``dataset_len=`` (the dataset's length; the rank and world size then come from
    torch.distributed) to skip the padding: the recorder counts this rank's rows of the epoch
    and drops those at the positions the sampler filled with repeats. This assumes every sample
    the sampler yields passes through the module once, in the sampler's order, inside
    ``batch()`` (a DataLoader over that sampler, ``drop_last=False``, in-order workers).

    Every forward pass of the module inside ``batch()`` is recorded, a recomputation too: with
    gradient checkpointing (``torch.utils.checkpoint``) over the module, ``backward()`` inside
    the block runs its forward again and every sample is stored twice. Call ``backward()``
    after the block.

    In a DataLoader worker (a recorder used by the dataset), each recorded batch is appended
    at once and synchronously: ``flush()`` and ``end_epoch()`` in the main process reach only
    that process's rows.

    Resuming from a checkpoint of epoch E: ``Writer(path).truncate(from_epoch=E)`` once before
    any recorder appends (under DDP on rank 0, then a barrier), or the crashed run's rows of
    epoch E stay beside the new ones: the recorder opens the store as it is.

    Args:
        model: the model (or DDP wrapper) holding the module.
        module_name: dotted name of the submodule whose output to save; the output must be a
            tensor of shape (batch, dim) (other shapes are flattened to (batch, -1)).
        store: path of the store (UTF-8 text, else ValueError naming it).
        dim: embedding size, to create the store when missing (with ``dtype``, default
            float32); without it the store must exist.
        dtype: the store's dtype: "float32", "float16" or "bfloat16" (half the bytes), or
            "float64"; another (int8, uint8) raises ValueError before anything is made, and so
            does an existing store of one, at the first recorded batch.
        ranks: ranks that record, or None for all.
        async_queue_mb: queue bound of each rank's async Writer (0: synchronous appends).
        buffer_rows: rows gathered per append (0: one append per recorded batch).
        sampler: a DistributedSampler whose padding is not recorded (see above).
        dataset_len: the length of the dataset a DistributedSampler (with this job's world
            size) draws from, when the sampler itself is not at hand.
        per_node: ``store`` is a directory; each node appends to its own store in it, named by
            ``embstore.shards.node_name()`` (torchrun's GROUP_RANK, else the host name) and
            meant for node-local disk, and ``end_epoch()`` keeps ``manifest.json`` there.
        expected_rows: the rows the store will hold when the run ends (samples recorded times
            epochs; with ``per_node``, one node's share), given to each rank's Writer
            (``Writer(expected_rows=)``): its key index is built for them at once instead of
            being rebuilt at every doubling. None: no guess.
    """

    def __init__(self, model: torch.nn.Module, module_name: str, store: Any, *,
                 dim: Optional[int] = None, dtype: Any = None, metadata: Any = None,
                 segment_mb: Optional[float] = None, ranks: Optional[Sequence[int]] = None,
                 async_queue_mb: float = 64, buffer_rows: int = 512, sampler: Any = None,
                 dataset_len: Optional[int] = None, per_node: bool = False,
                 expected_rows: Optional[int] = None) -> None:
        modules = dict(model.named_modules())
        module = modules.get(module_name, modules.get("module." + module_name))
        if module is None:
            raise ValueError(f"no submodule named {module_name!r}; some names: "
                             f"{', '.join(list(modules)[1:8])}")
        if sampler is not None and dataset_len is not None:
            raise ValueError("give sampler or dataset_len, not both")
        if sampler is not None and not all(
                hasattr(sampler, a) for a in ("num_replicas", "rank", "dataset", "drop_last")):
            raise TypeError(f"sampler must be a torch DistributedSampler; got "
                            f"{type(sampler).__name__}")
        if dataset_len is not None and int(dataset_len) < 0:
            raise ValueError(f"dataset_len must be >= 0; got {dataset_len}")
        if expected_rows is not None:
            expected_rows = _check_u64(expected_rows, "expected_rows")
            if expected_rows > 2**40:  # as the Writer would, but now, not at the first batch
                raise ValueError(f"expected_rows {expected_rows} exceeds the 2^40 rows a store "
                                 "can hold")
        self.module_name = module_name
        self.path = _path_arg(store, "store")
        self._per_node = per_node
        self._dim = dim
        self._dtype = None if dtype is None else _dtype_name(dtype)
        if self._dtype is not None and self._dtype not in _TORCH_DTYPES:
            # Refused now, before a store of it is made at the first batch.
            raise ValueError(f"{self.path}: dtype {self._dtype} asked for; the recorder saves "
                             f"float tensors: use one of {', '.join(_TORCH_DTYPES)}")
        self._metadata = {"module": module_name} if metadata is None else metadata
        self._segment_mb = segment_mb
        self._ranks = None if ranks is None else set(int(r) for r in ranks)
        self._async_queue_mb = async_queue_mb
        self._buffer_rows = max(0, int(buffer_rows))
        self._sampler = sampler
        self._dataset_len = None if dataset_len is None else int(dataset_len)
        self._expected_rows = expected_rows
        self._staging: Optional[_Staging] = None
        self._finalizer = None
        self._closed = False
        self._ids: Optional[np.ndarray] = None
        self._epoch = 0
        self._epoch_position = 0  # this rank's rows of the epoch so far, padding included
        self.rows_recorded = 0
        #: Rows not stored because they were a DistributedSampler's padding.
        self.padding_rows_skipped = 0
        #: Seconds of recording on the training thread: the checks of batch() and the forward
        #: hook (detach, copy, queueing the append), the time recording adds to this process's
        #: steps. The write itself happens on the Writer's background thread (see
        #: stats()["append_seconds"] and ["append_cpu_seconds"]).
        self.hook_seconds = 0.0
        # Through a weak reference: a bound method on the model kept a recorder nobody closed
        # alive as long as the model (a notebook cell run again leaked its Writer, threads and
        # descriptors, and its staged rows reached no reader until the interpreter exited). A
        # recorder collected writes what it holds (_finish_unclosed) and takes its hook off.
        self._handle = module.register_forward_hook(_Hook(self))
        # Not at exit: a thread still recording then (a daemon thread) must reach the hook, which
        # raises ClosedError once the exit finalizer has written the staged rows; without it,
        # its forward passes returned normally and recorded nothing, without a word.
        weakref.finalize(self, self._handle.remove).atexit = False

    @property
    def rank(self) -> int:
        """This process's torch.distributed rank; without a process group the launcher's
        ``RANK`` (torchrun's), else 0."""
        return _rank()

    @property
    def enabled(self) -> bool:
        """Whether this rank records."""
        return self._ranks is None or self.rank in self._ranks

    def batch(self, ids: Any, epoch: int) -> ContextManager[None]:
        """Records the forward passes in the block under these sample ids and this epoch.
        ClosedError after ``close()``: nothing more would be recorded."""
        if self._closed:
            raise ClosedError(f"{self.path}: the recorder of {self.module_name!r} is closed; it "
                              "records nothing more (make a new EmbeddingRecorder)")
        # Runs every training step: the cheap conversions first, and the checks in one call.
        start = time.perf_counter()
        if isinstance(ids, torch.Tensor):
            try:
                ids = ids.numpy()  # integer CPU tensors: no gradient, no copy
            except (RuntimeError, TypeError):
                ids = ids.detach().cpu().numpy()
        elif not isinstance(ids, np.ndarray):
            # A list as Writer.append takes it: [] is no ids (numpy makes float64 of it), and a
            # bool, float or int beyond uint64 is refused by value (numpy made 1 of True).
            ids = _as_ints(ids, "sample ids")
        # 1-D integers >= 0 (the error names the first that is not).
        try:
            _embstore.check_keys(ids, "sample ids")
        except ValueError as error:
            hint = ("; hashed int64 ids can be stored as their uint64 bit patterns "
                    "(ids.view(numpy.uint64))") if "must be >= 0" in str(error) else ""
            raise ValueError(f"{self.path}: {error}{hint}") from None
        if type(epoch) is not int or epoch != self._epoch:  # else: the last block's, checked
            # An integer in [0, 2**64), as Writer.append checks it: a larger one was staged
            # and dropped at the next submit, its error raised by a later, unrelated call.
            epoch = _check_u64(epoch, "epoch")
            if epoch != self._epoch:
                self._epoch_position = 0
                staging = self._local_staging()
                if staging is not None and staging.filled:
                    staging.submit()  # an epoch's rows reach the store as soon as the next starts
        self.hook_seconds += time.perf_counter() - start
        return _RecordingBlock(self, ids, epoch)

    def _local_staging(self) -> Optional[_Staging]:
        """This process's staging (None before its first recorded batch, and in a forked child
        until it records: the parent's Writer and rows are the parent's)."""
        staging = self._staging
        return staging if staging is not None and staging.pid == _pid else None

    def writer(self) -> Writer:
        """This process's Writer (opened on first use)."""
        staging = self._local_staging()
        if staging is None:
            path = self.store_path()
            if self._per_node:
                os.makedirs(self.path, exist_ok=True)
            # A DataLoader worker's rows are written as each batch is recorded (no staging, no
            # queue): end_epoch() and flush() run in the main process and reach only its own.
            in_worker = torch.utils.data.get_worker_info() is not None
            queue_mb = 0 if in_worker else self._async_queue_mb
            if self._dim:
                # The metadata and segment size are a new store's: a store there already (a
                # resumed run) is opened as it is. (One made by another rank between the look
                # and the open is checked against them: the same recorder's, normally.)
                new = not os.path.exists(os.path.join(path, "header"))
                writer = Writer(path, dim=self._dim, dtype=self._dtype or "float32",
                                metadata=self._metadata if new else None,
                                segment_mb=self._segment_mb if new else None,
                                async_queue_mb=queue_mb, expected_rows=self._expected_rows)
            else:
                writer = Writer(path, dtype=self._dtype, async_queue_mb=queue_mb,
                                expected_rows=self._expected_rows)
            if writer.dtype not in _TORCH_DTYPES:
                dtype = writer.dtype  # read before the close: a closed Writer raises ClosedError
                writer.close()
                raise ValueError(f"{path}: the recorder saves float tensors; the store "
                                 f"holds {dtype}")
            # A forked child starts with an empty buffer and its own Writer and finalizer.
            staging = self._staging = _Staging(writer, 0 if in_worker else self._buffer_rows)
            self._finalizer = _mp_util.Finalize(
                self, _finish_unclosed, args=(staging, self.path, self.module_name),
                exitpriority=_RECORDER_EXIT_PRIORITY)
        return staging.writer

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if self._ids is None or not self.enabled:
            return
        if self._closed:
            # Inside a batch() block entered before close() ran on another thread.
            raise ClosedError(f"{self.path}: the recorder of {self.module_name!r} was closed "
                              "during this batch() block; this batch was not recorded")
        start = time.perf_counter()
        try:
            self._record(output)
        finally:
            self.hook_seconds += time.perf_counter() - start

    def _padding_mask(self, n: int) -> Optional[np.ndarray]:
        """Which of the next n rows of this rank's epoch are real samples (None: all are)."""
        if self._sampler is not None:
            if self._sampler.drop_last:
                return None
            samples, replicas, rank = (len(self._sampler.dataset), self._sampler.num_replicas,
                                       self._sampler.rank)
        elif self._dataset_len is not None:
            samples, replicas, rank = self._dataset_len, _world_size(), _rank()
        else:
            return None
        per_rank = math.ceil(samples / replicas) if replicas else 0
        if per_rank == 0:
            return None
        # DistributedSampler appends the padding after the dataset's samples and deals the
        # list out round-robin: this rank's i-th sample sits at rank + i * replicas.
        local = (self._epoch_position + np.arange(n)) % per_rank
        keep = rank + local * replicas < samples
        return None if keep.all() else keep

    def _record(self, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{self.module_name} returned {type(output).__name__}; the "
                            "recorder needs a tensor")
        out = output.detach()
        name = self.module_name or "the model"
        if out.dim() == 0:
            raise ValueError(f"{self.path}: {name} returned a 0-d tensor (one value); the "
                             "recorder needs one row per id, shape (ids, dim) or (ids, ...)")
        if out.is_complex():
            # copy_() would keep its real part and drop the rest (torch's one-time warning
            # only); Writer.append refuses complex arrays too.
            raise TypeError(f"{self.path}: {name} returned a {out.dtype} tensor; the recorder "
                            "saves real values (float or integer outputs)")
        if out.dim() != 2:
            out = out.reshape(out.shape[0], -1)
        n = out.shape[0]
        if n != len(self._ids):
            raise ValueError(f"{self.path}: {self.module_name or 'the model'} produced {n} rows "
                             f"for {len(self._ids)} ids")
        staging = self._staging
        if staging is None or staging.pid != _pid:
            self.writer()
            staging = self._staging
        if out.shape[1] != staging.writer.dim:
            # Refused here: copy_ into the staged rows would broadcast a narrower output.
            raise ValueError(f"{self.module_name} produced an output of shape "
                             f"{tuple(output.shape)}, rows of {out.shape[1]} values; the store "
                             f"{staging.writer.path} has dim {staging.writer.dim}")
        ids = self._ids
        keep = self._padding_mask(n)
        kept = None if keep is None else np.flatnonzero(keep)
        self._epoch_position += n
        if keep is not None:
            out, ids = out[torch.from_numpy(keep).to(out.device)], ids[keep]
            self.padding_rows_skipped += n - len(ids)
            n = len(ids)
            if n == 0:
                return
        # What copy_() and to() convert: float64 rounded once here first (torch goes through
        # float32 to a 16-bit float: two roundings, which can move a value by one step, or onto
        # infinity), as Writer.append rounds it.
        narrowed = _float64_rounded_once(out, staging.dtype)
        # On the CPU before the staging's lock is taken: a device-to-host copy is where a
        # training thread blocks behind a hung collective (a dead peer), and holding the lock
        # there kept SIGTERM's writing (_Termination) from the batches staged before (a review).
        # A batch too big to stage: its private copy, converted; else the rows as they are on
        # the CPU (no copy when they are there), converted by the copy into the buffer.
        if n > staging.buffer_rows:
            rows = narrowed.to("cpu", staging.dtype, copy=True)
        else:
            rows = narrowed.to("cpu")
        with staging.lock:  # whole batches only, whichever thread submits (_Staging)
            if staging.closed:
                raise ClosedError(f"{self.path}: the recorder of {self.module_name!r} was "
                                  "closed (by close() on another thread, or at the "
                                  "interpreter's exit); this batch was not recorded")
            self._stage(rows, out, ids, kept, n, staging)
        self.rows_recorded += n

    def _stage(self, rows: torch.Tensor, out: torch.Tensor, ids: np.ndarray,
               kept: Optional[np.ndarray], n: int, staging: _Staging) -> None:
        """Stages (or appends, past buffer_rows) one batch's rows, on the CPU; under
        staging.lock."""
        if n > staging.buffer_rows:
            # Too big to stage: one append of its private copy.
            staging.submit()
            self._refuse_overflow(rows, out, staging, kept, ids)
            staging.writer.append(ids, rows, self._epoch, copy=False)
        else:
            if staging.filled and (staging.filled + n > staging.buffer_rows or
                                   staging.epoch != self._epoch):
                staging.submit()
            if staging.buffer is None:
                # Never an inference tensor (made under torch.inference_mode()): a later
                # forward outside it could not copy into it.
                with torch.inference_mode(False):
                    staging.buffer = torch.empty((staging.buffer_rows, out.shape[1]),
                                                 dtype=staging.dtype)
            begin, end = staging.filled, staging.filled + n
            staging.buffer[begin:end].copy_(rows)  # converts the dtype
            self._refuse_overflow(staging.buffer[begin:end], out, staging, kept, ids)
            staging.keys[begin:end] = ids
            staging.epoch = self._epoch
            staging.filled = end
            if end == staging.buffer_rows:
                staging.submit()

    def _refuse_overflow(self, rows: torch.Tensor, out: torch.Tensor, staging: _Staging,
                         kept: Optional[np.ndarray], ids: np.ndarray) -> None:
        """Raises ValueError when converting ``out`` (integers too) to the store's dtype made a
        finite value infinite in ``rows`` (torch does so without a word), before the rows count
        as staged. ``kept``: the module output's row of each of out's rows (None: the same);
        ``ids``: their sample ids.
        The common case costs one pass over the converted rows on the CPU (~45 us for
        512 x 768 float16), and nothing when no conversion narrows."""
        limit = _INFINITY_BITS.get(staging.dtype)
        if limit is None or out.dtype == staging.dtype:
            return
        if out.dtype in (torch.float16, torch.bfloat16) and staging.dtype != out.dtype and \
                staging.dtype in (torch.float32, torch.float64):
            return  # widening: exact
        width = torch.int16 if rows.element_size() == 2 else torch.int32
        bits = rows.contiguous().view(width).numpy().view(np.uint16 if width == torch.int16
                                                          else np.uint32)
        if bits.size == 0 or int(np.bitwise_and(bits, limit).max()) < limit:
            return  # no infinity (nor NaN) in the converted rows
        finite = torch.isfinite(out.detach().to("cpu", torch.float64))
        overflowed = (torch.isinf(rows.to(torch.float64)) & finite).nonzero()
        if len(overflowed):
            row, column = (int(i) for i in overflowed[0])
            value = out[row, column].item()
            module = f"{self.module_name}'s" if self.module_name else "the model's"
            output_row = row if kept is None else int(kept[row])
            raise ValueError(f"{module} output row {output_row} (sample id {int(ids[row])}), "
                             f"column {column}: "
                             f"{value!r} is beyond the store's {staging.writer.dtype} range "
                             "and would be stored as infinity; nothing of this batch was "
                             "recorded (scale or clip the output, or record into a store of "
                             "a wider dtype)")

    def flush(self, wait: bool = True) -> None:
        """Appends the staged rows; with ``wait``, also waits until everything recorded so far
        is written (visible to readers). Raises a pending write error."""
        staging = self._local_staging()
        if staging is None:
            return
        staging.submit()
        if wait:
            staging.writer.flush()

    def store_path(self) -> str:
        """The store this process appends to: ``store``, or with ``per_node`` its node's."""
        return os.path.join(self.path, shards.node_name()) if self._per_node else self.path

    def end_epoch(self, sync: bool = True) -> None:
        """Makes everything recorded so far in this process visible (and with ``sync`` durable)
        and, with ``per_node``, has rank 0 rewrite the manifest: every node's store id, rows and
        epochs. (Rows recorded in DataLoader workers are written as each batch is recorded.)

        Under torch.distributed this is a collective: every rank must call it (at the end of
        each epoch). Each node's lowest rank syncs and describes its store; rank 0 gathers them
        and replaces ``manifest.json`` atomically. A rank whose part fails (a pending write
        error, say) raises it, and every other rank raises RuntimeError naming that rank and
        its error, instead of waiting for it in the next collective.
        """
        distributed = _group_initialized()
        if self._per_node and not distributed and _world_size() > 1:
            # Rank 0 alone would write a manifest of its own node: the gathered run would read
            # as that node's rows only, the others' stores sitting beside it unlisted.
            self.flush(wait=True)
            staging = self._local_staging()
            if sync and staging is not None:
                staging.writer.sync()
            raise RuntimeError(
                f"end_epoch() with per_node=True: WORLD_SIZE={_world_size()} (rank "
                f"{self.rank}) but torch.distributed has no process group, so the nodes' shards "
                f"cannot be gathered into {os.path.join(self.path, shards.MANIFEST_NAME)}; call "
                f"torch.distributed.init_process_group() first, or read the node stores by "
                f"their paths (embstore.ShardSet([...])). This rank's rows are stored and synced.")
        world = torch.distributed.get_world_size() if distributed else 1

        def gathered(part: Callable[[], Any]) -> list:
            """part()'s result on every rank, in rank order; a rank whose part raised makes
            every rank raise (its own error there, RuntimeError naming it elsewhere)."""
            error, result = None, None
            try:
                result = part()
            except BaseException as e:  # KeyboardInterrupt too: the others must not wait
                error = e
            mine = (result, None if error is None else f"{type(error).__name__}: {error}")
            if distributed:
                every = [None] * world
                torch.distributed.all_gather_object(every, mine)
            else:
                every = [mine]
            if error is not None:
                raise error
            failed = [(rank, message) for rank, (_, message) in enumerate(every) if message]
            if failed:
                rank, message = failed[0]
                raise RuntimeError(f"{self.path}: end_epoch() failed on rank {rank}: {message}")
            return [result for result, _ in every]

        def flushed() -> tuple:
            self.flush(wait=True)
            return (shards.node_name(), self.rank)

        names = gathered(flushed)  # also: every rank has flushed
        mine = (shards.node_name(), self.rank)
        leader = min(rank for name, rank in names if name == mine[0]) == self.rank
        path = self.store_path()

        def described() -> Optional[dict]:
            if not (leader and os.path.exists(path)):
                return None
            staging = self._local_staging()
            if sync and staging is not None:
                staging.writer.sync()
            elif sync:  # this rank recorded nothing (``ranks``): sync the node's store anyway
                with Writer(path) as writer:
                    writer.sync()
            return self._describe(path)

        infos = gathered(described)
        if self._per_node and self.rank == 0:
            listed = sorted((i for i in infos if i), key=lambda i: i["shard"]["path"])
            if listed:
                shards.write_manifest(os.path.join(self.path, shards.MANIFEST_NAME), {
                    "dim": listed[0]["dim"], "dtype": listed[0]["dtype"],
                    "metadata": listed[0]["metadata"], "shards": [i["shard"] for i in listed]})

    def _describe(self, path: str) -> dict:
        """This node's store for the manifest; epochs found by scanning only the rows new since
        the last call, unless the store was truncated (another generation) or replaced since:
        then every row, since the epochs seen may be gone."""
        reader = Reader(path)
        info = reader.info(key_stats=False)
        snapshot = (info["store_id"], reader.generation)
        seen, rows, epochs = getattr(self, "_epochs_seen", (None, 0, set()))
        if seen != snapshot:
            rows, epochs = 0, set()
        epochs = epochs | set(np.unique(reader.epochs[rows:]).tolist())
        self._epochs_seen = (snapshot, len(reader), epochs)
        reader.close()
        return {"shard": {"path": os.path.basename(path), "store_id": info["store_id"],
                          "rows": self._epochs_seen[1], "epochs": sorted(epochs),
                          "generation": snapshot[1]},
                "dim": info["dim"], "dtype": info["dtype"], "metadata": info["metadata"]}

    def stats(self) -> dict:
        """This rank's Writer.stats() (empty before the first recorded batch)."""
        staging = self._local_staging()
        return {} if staging is None else staging.writer.stats()

    def close(self) -> None:
        """Appends the staged rows and closes this rank's Writer (raising a pending write error).
        Afterwards ``batch()`` raises ClosedError, and so does a forward pass inside a block
        another thread entered before; the hook records nothing more (it is taken off the
        module when the recorder is collected). Closing again does nothing, unless a Ctrl-C
        ended the Writer's close: then it finishes it."""
        staging = self._local_staging()
        # Closed, unless a Ctrl-C ended the Writer's close (it stays open, its queue written
        # on): then this call closes it.
        if self._closed and (staging is None or staging.writer.closed):
            return
        # The hook stays (taken off when the recorder is collected): a forward pass inside a
        # batch() block another thread entered before this close() raises ClosedError there,
        # where without the hook it returned normally having recorded nothing.
        self._closed = True
        try:
            if staging is not None:
                staging.finish()
        finally:
            # After the rows are written: a SIGTERM handled before that still finds them.
            if self._finalizer is not None and (staging is None or staging.writer.closed):
                self._finalizer.cancel()

    def __enter__(self) -> "EmbeddingRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
