"""Functions run in child processes by the tests (importable by multiprocessing 'spawn').

Payloads are derived from the key, so any process can recompute and check a row.
"""
import os

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


def pool_open(path, marker_dir):
    """A Pool initializer: opens this worker's async Writer, then says so (a file named by its
    pid in marker_dir)."""
    global _pool_writer
    _pool_writer = embstore.Writer(path, async_queue_mb=16)
    open(os.path.join(marker_dir, str(os.getpid())), "w").close()


def pool_task(task, rows):
    """A Pool task: appends `rows` rows (keys task * rows + i) through this worker's Writer,
    never closed by the task: queued when it returns."""
    keys = np.arange(task * rows, (task + 1) * rows)
    _pool_writer.append(keys, payload(keys), 0)
    return task
