"""Times the async append call for a 512 x 768 float32 batch, in both modes.

Usage: PYTHONPATH=build/python /usr/bin/python3 tools/demo/async_append_time.py [DIR]

copy=False (the caller donates its array): the call only validates and queues the batch;
target <= 20 us. copy=True (the default): the call also copies the 1.5 MiB of rows into the
queue's memory, so it should run at memcpy speed (a plain numpy copy of the same batch into a
reused buffer is timed alongside as the baseline). The write itself happens on the Writer's
background thread. The queue is flushed every 16 calls (outside the timed region) so that it
never fills: this times the call, not back-pressure. The background thread writes meanwhile,
on the same 2 cores; the call is also timed with that thread held off (the store's lock held
by this process) after one lap of the queue has touched its pages: the call's own cost.
"""
import fcntl
import os
import shutil
import sys
import tempfile
import time

import numpy as np

import embstore


def measure(directory, calls=320, rows=512, dim=768, torch_tensor=False, copy=True):
    """Returns the per-call seconds of `calls` async appends of a (rows, dim) float32 batch
    (a numpy array, or a torch tensor with `torch_tensor`)."""
    path = os.path.join(directory, f"async_append_time{int(torch_tensor)}{int(copy)}.emb")
    batch = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    if torch_tensor:
        import torch
        batch = torch.from_numpy(batch)
    keys = np.arange(rows, dtype=np.uint64)
    times = []
    with embstore.Writer(path, dim=dim, async_queue_mb=64) as w:
        for i in range(calls):
            start = time.perf_counter()
            w.append(keys, batch, i, copy=copy)
            times.append(time.perf_counter() - start)
            if i % 16 == 15:
                w.flush()
        w.flush()
        assert w.committed_rows() == calls * rows
    return np.array(times)


def measure_writer_held_off(directory, rows=512, dim=768):
    """Per-call seconds of copy=True appends while the background thread cannot write (this
    process holds the store's lock, which the writer's OFD lock conflicts with), into a queue
    whose pages one earlier lap has touched: the copy into the queue alone."""
    path = os.path.join(directory, "async_append_held_off.emb")
    batch = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    keys = np.arange(rows, dtype=np.uint64)
    queue_mb = 64
    fits = queue_mb * (1 << 20) // batch.nbytes
    times = []
    with embstore.Writer(path, dim=dim, async_queue_mb=queue_mb) as w:
        for i in range(fits):  # one lap: every page of the queue touched
            w.append(keys, batch, i)
        w.flush()
        fd = os.open(os.path.join(path, "lock"), os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            for i in range(fits - 1):  # the thread holds one batch, blocked on the lock
                start = time.perf_counter()
                w.append(keys, batch, fits + i)
                times.append(time.perf_counter() - start)
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        w.flush()
    return np.array(times)


def memcpy_baseline(calls=320, rows=512, dim=768, buffers=1):
    """Per-call seconds of copying the same batch with numpy into `buffers` buffers in turn
    (1: a reused, cache-hot buffer; 16: the span of the queue the timed appends use between
    flushes, as large as the cache or larger)."""
    batch = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    dests = [np.ones_like(batch) for _ in range(buffers)]  # touched: no page faults timed
    times = []
    for i in range(calls):
        start = time.perf_counter()
        np.copyto(dests[i % buffers], batch)
        times.append(time.perf_counter() - start)
    return np.array(times)


def training_step(scratch, seconds):
    """A stand-in for a training step between two appends: one pass of CPU work over `scratch`
    (the step's working set), repeated until `seconds` have passed. Two steps are timed:
    - STEPS["2 ms over 1 MiB"]: the caches past L2 keep what the other tenants of the host
      leave there (8 MiB of streaming for 2 ms took the memory bandwidth the background writer
      needs on the 2-core VMs, 3 ms a batch instead of 0.5);
    - STEPS["one pass over 48 MiB"]: more than the 32 MiB L3, so every cache is cold at the
      call, as after a real training step, whatever the neighbours do."""
    end = time.perf_counter() + seconds
    np.multiply(scratch, 1.0000001, out=scratch)
    while time.perf_counter() < end:
        np.multiply(scratch, 1.0000001, out=scratch)


# Steps measure_paced() puts between calls: name -> (working set in MiB, seconds at the least).
STEPS = {"2 ms over 1 MiB": (1, 0.002), "one pass over 48 MiB": (48, 0.0)}


# What measure_paced() times, and what each figure is for: its key and the label reports use.
PACED = {
    "copy=False": "target <= 20 us",
    "copy=True": "target: a numpy copy's time",
    "numpy copy": "baseline: into one reused buffer, hot in the cache",
    "numpy copy, queue-sized": "baseline: into buffers as large as the queue, in turn",
    "committed_rows()": "a call through pybind11 that does nothing",
}


def measure_paced(directory, calls=300, rows=512, dim=768, step="2 ms over 1 MiB", queue_mb=64):
    """Per-call seconds of the ways to hand a batch over, each called after a training step (a
    key of STEPS), as in a training loop (the keys of PACED): copy=False, copy=True (each into
    a Writer of its own); as baselines of the copying mode a numpy copy into one reused buffer
    and one into buffers spanning as much memory as the queue (where copy=True writes: a new
    range each call, not hot in the cache); and Writer.committed_rows(), a call into the module
    through pybind11's dispatcher that does nothing. They take turns call by call, so that
    each sees the same machine. Between two calls of a writer its background thread has
    written the previous batch (or not: that is part of what is measured). How cold a step
    leaves the caches depends on the other tenants of the host's shared cache when the step is
    small: the same build has measured 3-4 us and 15-25 us for copy=False an hour apart
    (bench/RESULTS.md). Returns {name: array of seconds}."""
    batch = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    keys = np.arange(rows, dtype=np.uint64)
    scratch_mb, step_seconds = STEPS[step]
    scratch = np.ones(scratch_mb << 18, np.float32)
    dest = np.ones_like(batch)
    queue_sized = [np.ones_like(batch) for _ in range(queue_mb * (1 << 20) // batch.nbytes)]
    names = list(PACED)
    times = {name: [] for name in names}
    with embstore.Writer(os.path.join(directory, "paced_donated.emb"), dim=dim,
                         async_queue_mb=queue_mb) as donated, \
            embstore.Writer(os.path.join(directory, "paced_copied.emb"), dim=dim,
                            async_queue_mb=queue_mb) as copied:
        for i in range(len(names) * calls):
            name = names[i % len(names)]
            training_step(scratch, step_seconds)
            start = time.perf_counter()
            if name == "numpy copy":
                np.copyto(dest, batch)
            elif name == "numpy copy, queue-sized":
                np.copyto(queue_sized[(i // len(names)) % len(queue_sized)], batch)
            elif name == "committed_rows()":
                donated.committed_rows()
            elif name == "copy=False":
                donated.append(keys, batch, i, copy=False)
            else:
                copied.append(keys, batch, i)
            times[name].append(time.perf_counter() - start)
    return {name: np.array(t) for name, t in times.items()}


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else None
    for step in STEPS:
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            paced = measure_paced(tmp, calls=300 if step == "2 ms over 1 MiB" else 150, step=step)
        for name, t in paced.items():
            print(report(t, f"{name}, each after a step ({step})", PACED[name]))
    for copy in (False, True):
        for torch_tensor in (False, True):
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                t = measure(tmp, torch_tensor=torch_tensor, copy=copy)
            what = "torch tensor" if torch_tensor else "numpy array"
            print(report(t, f"async append call of a {what}, copy={copy}",
                         "target <= 20 us" if not copy else "target: memcpy speed"))
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        print(report(measure_writer_held_off(tmp),
                     "copy=True, the writer thread held off", "target: memcpy speed"))
    for buffers in (1, 16):
        print(report(memcpy_baseline(buffers=buffers),
                     f"baseline: numpy copy into {buffers} buffer(s) in turn", "memcpy"))


def report(t, what, target):
    return (f"512 x 768 float32, {what}: median {1e6 * np.median(t):.1f} us, "
            f"p90 {1e6 * np.percentile(t, 90):.1f} us, max {1e6 * t.max():.0f} us over "
            f"{len(t)} calls ({target})")


if __name__ == "__main__":
    main()
