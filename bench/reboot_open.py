"""First Writer open after a simulated reboot of a large store, before and after sync at close.

The reboot: the boot id in the state page changed and the store's pages dropped from the page
cache. "Before": the store was last closed unsynced (sync="none"), so recovery re-verifies every
unsynced row. "After": last closed by a default Writer (sync at close), so nothing is re-checked.

Usage: PYTHONPATH=build/python /usr/bin/python3 bench/reboot_open.py [GB] [DIR]
       (default 10 GB in the system temp directory; the store is deleted at the end)
"""
import os, shutil, sys, tempfile, time
import numpy as np
import embstore

GB = float(sys.argv[1]) if len(sys.argv) > 1 else 10
DIM, BATCH = 1024, 256  # 4 KiB rows, 1 MiB per append
base = tempfile.mkdtemp(prefix="embstore-reboot-", dir=sys.argv[2] if len(sys.argv) > 2 else None)
path = os.path.join(base, "s")

def drop_cache_and_reboot():
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDWR)
        os.fdatasync(fd)  # clean pages can be dropped; the store's durable counter is untouched
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    with open(os.path.join(path, "header"), "r+b") as f:  # state page + 192: boot id
        f.seek(4096 + 192)
        f.write(os.urandom(16))
    fd = os.open(os.path.join(path, "header"), os.O_RDWR); os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)

try:
    rows = int(GB * 1e9 / (DIM * 4)) // BATCH * BATCH
    vec = np.random.default_rng(1).standard_normal((BATCH, DIM)).astype(np.float32)
    t0 = time.monotonic()
    with embstore.Writer(path, dim=DIM, sync="none") as w:
        for i in range(0, rows, BATCH):
            w.append(np.arange(i, i + BATCH, dtype=np.uint64), vec, 0)
    print(f"wrote {rows} rows ({rows*DIM*4/1e9:.1f} GB) unsynced in {time.monotonic()-t0:.0f} s", flush=True)
    info = embstore.info(path)
    print("before: committed", info["committed_rows"], "durable", info["durable_rows"], flush=True)
    drop_cache_and_reboot()
    c0, t0 = time.process_time(), time.monotonic()
    w = embstore.Writer(path, sync="none")
    t1, c1 = time.monotonic(), time.process_time()
    print(f"BEFORE (last closed with sync='none'): first Writer open after reboot {t1-t0:.2f} s wall, "
          f"{c1-c0:.2f} s CPU; committed {w.committed_rows()}", flush=True)
    w.close()
    # After: a default Writer appends one batch and closes (sync at close).
    with embstore.Writer(path) as w:
        w.append(np.arange(rows, rows + BATCH, dtype=np.uint64), vec, 0)
    info = embstore.info(path)
    print("after close: committed", info["committed_rows"], "durable", info["durable_rows"], flush=True)
    drop_cache_and_reboot()
    c0, t0 = time.process_time(), time.monotonic()
    w = embstore.Writer(path)
    t1, c1 = time.monotonic(), time.process_time()
    print(f"AFTER (last closed by a default Writer): first Writer open after reboot {t1-t0:.4f} s wall, "
          f"{c1-c0:.4f} s CPU; committed {w.committed_rows()}", flush=True)
    w.close()
finally:
    shutil.rmtree(base, ignore_errors=True)
