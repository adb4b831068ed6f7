"""Functions run in child processes by the tests (importable by multiprocessing 'spawn').

Payloads are derived from the key, so any process can recompute and check a row.
"""
import logging
import multiprocessing.util
import os
import threading
import signal

import numpy as np

import embstore

DIM = 16


def payload(keys):
    """Row values derived from the keys: row i is key_i * 1000 + [0, 1, ..., DIM-1]."""
    keys = np.asarray(keys, dtype=np.float64)
    return (keys[:, None] * 1000.0 + np.arange(DIM)[None, :]).astype(np.float32)


def writer_process(path, writer_id, batches, batch_rows, ready, go):
    """Appends `batches` batches of keys writer_id * 10**6 + s; epoch = writer_id."""
    with embstore.Writer(path) as w:
        ready.set()
        go.wait()
        for b in range(batches):
            keys = writer_id * 10**6 + np.arange(b * batch_rows, (b + 1) * batch_rows)
            w.append(keys, payload(keys), writer_id)


def reader_process(path, total_rows, result_queue):
    """Follows the store until total_rows are committed, checking every row as it appears."""
    r = embstore.Reader(path)
    checked = 0
    bad = 0
    while checked < total_rows:
        if not r.wait(checked + 1, timeout=60):
            break
        n = len(r)
        keys = r.keys[checked:n]
        bad += int(np.count_nonzero(r.vectors[checked:n] != payload(keys)))
        checked = n
    result_queue.put((checked, bad, os.getpid()))


# A Writer held in a module global, as a multiprocessing child might keep one.
GLOBAL_WRITER = None


def append_through_global_writer(path, batches, batch_rows, opened, locked, appended):
    """Appends in a fork-started child and returns without closing: the child then leaves
    through os._exit, after multiprocessing's finalizers. The rows stay queued (the parent holds
    the store's lock) until those finalizers run."""
    global GLOBAL_WRITER
    GLOBAL_WRITER = embstore.Writer(path, async_queue_mb=64)
    opened.set()
    locked.wait()
    for b in range(batches):
        keys = np.arange(b * batch_rows, (b + 1) * batch_rows)
        GLOBAL_WRITER.append(keys, payload(keys), b)
    appended.set()


_pool_writer = None


def pool_open(path, marker_dir, in_thread=False):
    """A Pool initializer: opens this worker's async Writer (in a thread of the worker other than
    its main one, where Python cannot install a SIGTERM handler, with `in_thread`), then says so
    (a file named by its pid in marker_dir)."""
    def open_writer():
        global _pool_writer
        _pool_writer = embstore.Writer(path, async_queue_mb=16)
    if in_thread:
        thread = threading.Thread(target=open_writer)
        thread.start()
        thread.join()
    else:
        open_writer()
    open(os.path.join(marker_dir, str(os.getpid())), "w").close()


def queue_from_a_thread_then_wait(path, opened, locked):
    """A multiprocessing child whose Writer a thread other than the main one opened and
    appended 500 rows to (keys 0..499, queued: the parent holds the store's lock), while its
    main thread waits for good, as a worker waits for its next task."""
    def saver():
        writer = embstore.Writer(path, async_queue_mb=16)
        _kept.append(writer)
        opened.set()
        locked.wait()
        keys = np.arange(500)
        writer.append(keys, payload(keys), 0)
        appended.set()
    appended = threading.Event()
    threading.Thread(target=saver, daemon=True).start()
    appended.wait()
    threading.Event().wait()


def pool_task(task, rows):
    """A Pool task: appends `rows` rows (keys task * rows + i) through this worker's Writer,
    never closed by the task: queued when it returns."""
    keys = np.arange(task * rows, (task + 1) * rows)
    _pool_writer.append(keys, payload(keys), 0)
    return task


_sigterms_sent = 0


def _sigterm_self():
    """Sends this process SIGTERM, the first time it is called."""
    global _sigterms_sent
    if not _sigterms_sent:
        _sigterms_sent += 1
        os.kill(os.getpid(), signal.SIGTERM)


def _after(function, hook):
    """function, then hook()."""
    def call(*args, **kwargs):
        value = function(*args, **kwargs)
        hook()
        return value
    return call


def _before(hook, function):
    """hook(), then function."""
    def call(*args, **kwargs):
        hook()
        return function(*args, **kwargs)
    return call


class _SigtermInsideWriterExitFinalizer(logging.Handler):
    """multiprocessing logs 'finalizer calling <function _close_at_exit ...>' (at SUBDEBUG) once it
    has taken the Writer's exit finalizer off its list and before calling it: a SIGTERM sent here
    is handled inside that finalizer."""

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("finalizer calling") and "_close_at_exit" in message:
            _sigterm_self()


_kept = []


def _queue_rows(path, opened, locked, rows=500):
    """Opens an async Writer (kept), says `opened`, waits for `locked` (the parent holds the
    store's lock), then appends keys 0..rows-1: queued, not written. Returns the Writer."""
    writer = embstore.Writer(path, async_queue_mb=16)
    _kept.append(writer)
    opened.set()
    locked.wait()
    keys = np.arange(rows)
    writer.append(keys, payload(keys), 0)
    return writer


def sigterm_inside(path, where, opened, locked):
    """A multiprocessing child that queues 500 rows (keys 0..499) and is sent SIGTERM (by itself)
    at `where`, a point between taking rows over and writing them:
    - "exit": inside the exit function's finalizer of its Writer (left open);
    - "writer close": inside Writer.close(), where its exit finalizer is cancelled;
    - "recorder close": inside EmbeddingRecorder.close(), where its exit finalizer is cancelled;
    - "recorder submit": inside the append of the recorder's staged rows (its close()).
    The parent holds the store's lock from `opened` until a while after `locked`, so that every
    row is still queued when the signal comes. The Writer and recorder are kept in a global, as
    a worker keeps them: garbage collection does not close them."""
    rows = 500
    keys = np.arange(rows)
    if where.startswith("recorder"):
        import torch
        from embstore.torch import EmbeddingRecorder
        model = torch.nn.Sequential(torch.nn.Linear(DIM, DIM))
        recorder = EmbeddingRecorder(model, "0", path, async_queue_mb=16, buffer_rows=2 * rows)
        _kept.append(recorder)
        with torch.no_grad(), recorder.batch(keys, 0):  # opens the Writer: staged, not appended
            model(torch.ones(rows, DIM))
        opened.set()
        locked.wait()
        if where == "recorder close":
            recorder._finalizer.cancel = _after(recorder._finalizer.cancel, _sigterm_self)
        else:
            writer = recorder._staging.writer
            writer.append = _before(_sigterm_self, writer.append)
        recorder.close()
        return
    writer = _queue_rows(path, opened, locked)
    if where == "exit":
        logger = multiprocessing.util.get_logger()
        logger.setLevel(multiprocessing.util.SUBDEBUG)
        logger.addHandler(_SigtermInsideWriterExitFinalizer())
        return  # left open: multiprocessing's exit function closes it
    writer._at_exit.cancel = _after(writer._at_exit.cancel, _sigterm_self)
    writer.close()


def sigterm_to_another_thread(path, opened, locked):
    """A multiprocessing child that queues 500 rows (keys 0..499), then waits in its main thread
    on a lock nobody releases, while SIGTERM goes to another of its threads (the kernel hands a
    process's signal to any thread that does not block it; here the thread sends it to itself).
    Python records it there and runs the handler only in the main thread, whose wait the signal
    did not interrupt."""
    import threading
    import time
    _queue_rows(path, opened, locked)

    def sigterm_this_thread():
        time.sleep(0.2)  # the main thread waits by then
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    threading.Thread(target=sigterm_this_thread, daemon=True).start()
    never = threading.Lock()
    never.acquire()
    never.acquire()


def end_leaving_a_thread_running(path, opened, locked):
    """A multiprocessing child that queues 500 rows (keys 0..499) on a Writer it leaves open,
    starts a thread that never ends (not a daemon) and returns: its exit waits for that thread
    for good, until it is terminated."""
    import threading
    _queue_rows(path, opened, locked)
    threading.Thread(target=threading.Event().wait, name="never ends").start()


def recorder_append_failing_after_sigterm(path, opened, locked):
    """A multiprocessing child whose recorder's append of its 500 staged rows fails
    (ENOSPC, injected) after a SIGTERM came inside it. The embstore logger writes to
    `path`.log."""
    import errno
    import torch
    logging.getLogger("embstore").addHandler(logging.FileHandler(path + ".log"))
    from embstore.torch import EmbeddingRecorder
    model = torch.nn.Sequential(torch.nn.Linear(DIM, DIM))
    recorder = EmbeddingRecorder(model, "0", path, buffer_rows=1000)
    _kept.append(recorder)
    with torch.no_grad(), recorder.batch(np.arange(500), 0):
        model(torch.ones(500, DIM))
    opened.set()
    locked.wait()

    def failing_append(*args, **kwargs):
        _sigterm_self()
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    recorder._staging.writer.append = failing_append
    recorder.close()


def leave_two_writers_to_the_exit_function(second, first, ready):
    """Opens async Writers on `second`, then `first` (the exit function closes the later one
    first), queues keys 0..7 in each, keeps them in a global, waits for `ready` and returns."""
    for path in (second, first):
        writer = embstore.Writer(path, async_queue_mb=16)
        keys = np.arange(8)
        writer.append(keys, payload(keys), 0)
        _kept.append(writer)
    ready.wait()
