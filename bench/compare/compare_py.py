"""The comparison workload through the Python choices: numpy open_memmap, h5py resizable dataset,
and embstore's own Python binding. Prints one JSON object per system, same fields as
compare_native. Every lookup's answer is checked; a wrong one fails the run (exit 1, no JSON).
Run by bench/compare/run.sh with /usr/bin/python3; tests/python/test_compare.py runs it tiny.

    compare_py.py --system numpy|h5py|embstore-py --dir DIR [--rows N] [--dim D] [--batch B]
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np


def warm_memory(nbytes, directory):
    """Touches and frees nbytes of memory right before a timed phase, then writes half of it (the
    payload) into a file of `directory` and removes it (see compare_native.cc's warm_memory: the
    VM host takes freed guest memory back, and the first touch of it costs up to ~10 us a page;
    the page cache's large folios are only warmed by page cache freed a moment ago)."""
    os.sync()  # The previous system's deletes and dirty pages are not flushed on this one's time.
    a = np.ones(nbytes, dtype=np.uint8)
    path = os.path.join(directory, "page-cache-warm-up")
    with open(path, "wb") as f:
        f.write(memoryview(a)[:nbytes // 2])
    wait_for_reporting_pass(nbytes // 2)
    os.unlink(path)
    del a


def wait_for_reporting_pass(nbytes):
    """Where the kernel reports free pages to the VM host and `nbytes` are as many as start a
    pass (max_waiting_mib), waits for the next pass (at most 4 s), so that the pages freed right
    after are the VM's own until the pass after it, ~2 s later: as `embstore bench` does
    (bench/RESULTS.md, "Phases that met a reporting pass")."""
    def parameter(name):
        try:
            with open(f"/sys/module/page_reporting/parameters/{name}") as f:
                return int(f.read())
        except (OSError, ValueError):
            return None
    threshold, before = parameter("max_waiting_mib"), parameter("passes")
    if threshold is None or before is None or nbytes < threshold << 20:
        return
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and parameter("passes") == before:
        time.sleep(0.002)


def sum_words(a):
    """The wrapping sum of the array's bytes as little-endian 64-bit words, whole words only (a
    tail of fewer than 8 bytes is left out), as compare_native's sum_words(): rows of any width,
    not only those that are a multiple of 8 bytes. Reads every byte once, copies nothing."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    words = flat[:flat.size // 8 * 8].view(np.uint64)
    return int(words.sum(dtype=np.uint64))


def expected_sum(pool, w):
    """sum_words() of the payload the run appended (pool batches in turn), computed batch by batch
    with the bytes of a word cut by a batch's end carried to the next: the scan is checked
    against it."""
    total, carry = 0, b""
    for first in range(0, w.rows, w.batch):
        n = min(w.batch, w.rows - first)
        data = carry + pool[(first // w.batch) % len(pool)][:n].tobytes()
        whole = len(data) // 8 * 8
        total += int(np.frombuffer(data[:whole], dtype=np.uint64).sum(dtype=np.uint64))
        carry = data[whole:]
    return total % 2**64


def disk_bytes(path):
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class Numpy:
    """np.lib.format.open_memmap: a .npy file of the final size, written through a mapping.
    The size must be known up front; two writer processes would need their own coordination."""
    two_writers = "unsafe"
    lookup_note = "by row index (no key index)"

    def create(self, path, w):
        self.mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                            shape=(w.rows, w.dim))

    def append(self, first, keys, batch):
        self.mm[first:first + len(batch)] = batch

    def sync(self):
        self.mm.flush()

    def close_writer(self):
        del self.mm

    def open_reader(self, path, w):
        self.mm = np.load(path, mmap_mode="r")
        _ = float(self.mm[0, 0])

    def lookup(self, row, key):
        return np.array(self.mm[row])

    def scan(self):
        return sum_words(self.mm), self.mm.nbytes

    def close_reader(self):
        del self.mm


class H5py:
    """h5py resizable dataset (chunked, maxshape None), resized per batch."""
    two_writers = "unsafe"
    lookup_note = "by row index (no key index)"

    def create(self, path, w):
        import h5py
        self.f = h5py.File(path, "w")
        self.ds = self.f.create_dataset("embeddings", shape=(0, w.dim), maxshape=(None, w.dim),
                                        dtype="f4", chunks=(w.batch, w.dim))

    def append(self, first, keys, batch):
        self.ds.resize(first + len(batch), axis=0)
        self.ds[first:first + len(batch)] = batch

    def sync(self):
        self.f.flush()
        os.fsync(self.f.id.get_vfd_handle())

    def close_writer(self):
        self.f.close()

    def open_reader(self, path, w):
        import h5py
        self.f = h5py.File(path, "r")
        self.ds = self.f["embeddings"]
        _ = self.ds[0]

    def lookup(self, row, key):
        return self.ds[row]

    def scan(self):
        a = self.ds[...]
        return sum_words(a), a.nbytes

    def close_reader(self):
        self.f.close()


class EmbstorePy:
    """embstore's Python binding: Writer.append per batch (synchronous), Reader.vectors view,
    Reader.get(key, epoch=0) for a lookup."""
    two_writers = "ok"
    lookup_note = "by (key, epoch) through the key index"

    def create(self, path, w):
        import embstore
        embstore.create(path, dim=w.dim, dtype="float32")
        self.open_writer(path)

    def open_writer(self, path):
        import embstore
        self.w = embstore.Writer(path)

    def append(self, first, keys, batch):
        self.w.append(keys=keys, vectors=batch, epoch=0)

    def sync(self):
        self.w.sync()

    def close_writer(self):
        self.w.close()

    def open_reader(self, path, w):
        import embstore
        self.r = embstore.Reader(path)
        _ = float(self.r.rows(0, 1)[0, 0])

    def lookup(self, row, key):
        return np.array(self.r.get(key, epoch=0))  # A copy, as numpy's and h5py's lookups make.

    def check_lookup(self, row, key):
        found = self.r.find(key, epoch=0)
        if found != row or int(self.r.keys[found]) != key or int(self.r.epochs[found]) != 0:
            raise SystemExit(f"compare_py.py: embstore find({key}, epoch=0) returned row {found}; "
                             f"expected row {row}")

    def scan(self):
        v = self.r.vectors
        return sum_words(v), v.nbytes

    def close_reader(self):
        self.r.close()


SYSTEMS = {"numpy": Numpy, "h5py": H5py, "embstore-py": EmbstorePy}


def two_writers(system_cls, path, w, keys, pool):
    """Two processes each append half the rows to one fresh store; returns MB/s: the payload over
    the time from the start signal to the last append's return (as the one-writer column, closing
    is not timed: embstore's default Writer syncs at close)."""
    s = system_cls()
    s.create(path, w)
    s.close_writer()
    half = w.rows // 2 // w.batch * w.batch
    r_go, w_go = os.pipe()
    r_ready, w_ready = os.pipe()
    r_end, w_end = os.pipe()  # each child's end, time.monotonic_ns() (one clock for all processes)
    pids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child = system_cls()
                child.open_writer(path)
                os.write(w_ready, b"x")
                os.read(r_go, 1)
                begin, end = (0, half) if i == 0 else (half, w.rows)
                for first in range(begin, end, w.batch):
                    n = min(w.batch, end - first)
                    child.append(first, keys[first:first + n],
                                 pool[(first // w.batch) % len(pool)][:n])
                os.write(w_end, time.monotonic_ns().to_bytes(8, "little"))
                child.close_writer()
            except BaseException as e:  # noqa: BLE001 - report and fail the child
                print(f"two-writer child: {e}", file=sys.stderr)
                code = 1
            os._exit(code)
        pids.append(pid)
    for _ in range(2):
        os.read(r_ready, 1)
    warm_memory(2 * w.rows * w.dim * 4, os.path.dirname(path))
    t = time.monotonic_ns()
    os.write(w_go, b"xx")
    ok = True
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        ok = ok and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    os.close(w_end)
    ends = []
    while len(ends) < 2 and (b := os.read(r_end, 8)):
        ends.append(int.from_bytes(b, "little"))
    os.close(r_end)
    if len(ends) < 2:
        return None
    secs = (max(ends) - t) / 1e9
    return w.rows * w.dim * 4 / secs / 1e6 if ok else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", required=True, choices=sorted(SYSTEMS))
    ap.add_argument("--dir", required=True)
    ap.add_argument("--rows", type=int, default=200000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lookups", type=int, default=20000)
    w = ap.parse_args()
    rng = np.random.default_rng(12345)
    keys = rng.integers(0, 2**63, size=w.rows, dtype=np.uint64)
    pool = [rng.uniform(-1, 1, size=(w.batch, w.dim)).astype(np.float32) for _ in range(8)]
    system_cls = SYSTEMS[w.system]
    path = os.path.join(w.dir, w.system + (".npy" if w.system == "numpy" else
                                           ".h5" if w.system == "h5py" else ".store"))
    s = system_cls()
    warm_memory(2 * w.rows * w.dim * 4, w.dir)
    t = time.perf_counter()
    s.create(path, w)
    for first in range(0, w.rows, w.batch):
        n = min(w.batch, w.rows - first)
        s.append(first, keys[first:first + n], pool[(first // w.batch) % len(pool)][:n])
    append_s = time.perf_counter() - t
    t = time.perf_counter()
    s.sync()
    sync_s = time.perf_counter() - t
    s.close_writer()
    on_disk = disk_bytes(path)

    t = time.perf_counter()
    s.open_reader(path, w)
    open_ms = (time.perf_counter() - t) * 1e3
    lat = []

    def check(row, got):
        """Every answer is checked, outside the timed part: a wrong one fails the run."""
        expected = pool[(row // w.batch) % len(pool)][row % w.batch]
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise SystemExit(f"compare_py.py: {w.system} lookup of row {row} (key {keys[row]}) "
                             "returned another row's payload")
        if hasattr(s, "check_lookup"):
            s.check_lookup(row, int(keys[row]))

    got = s.lookup(0, int(keys[0]))
    if got is not None:
        check(0, got)
        idx = rng.integers(0, w.rows, size=w.lookups + 1000)
        for row in idx[:1000]:
            check(int(row), s.lookup(int(row), int(keys[row])))
        for row in idx[1000:]:
            t0 = time.perf_counter()
            got = s.lookup(int(row), int(keys[row]))
            lat.append((time.perf_counter() - t0) * 1e6)
            check(int(row), got)
        lat.sort()
    s.scan()
    t = time.perf_counter()
    scanned, nbytes = s.scan()
    scan_mb_s = nbytes / (time.perf_counter() - t) / 1e6
    if nbytes != w.rows * w.dim * 4 or scanned != expected_sum(pool, w):
        raise SystemExit(f"compare_py.py: {w.system} scan of {nbytes} bytes summed to {scanned}, "
                         f"not {expected_sum(pool, w)} over {w.rows * w.dim * 4} bytes")
    s.close_reader()
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)

    if system_cls.two_writers == "ok":
        path2 = path + ".two"
        mb_s = two_writers(system_cls, path2, w, keys, pool)
        two = round(mb_s, 1) if mb_s is not None else "failed"
        shutil.rmtree(path2, ignore_errors=True)
    else:
        two = system_cls.two_writers
    print(json.dumps({
        "system": w.system, "rows": w.rows, "dim": w.dim, "batch": w.batch,
        "append_mb_s": round(w.rows * w.dim * 4 / append_s / 1e6, 1), "two_writer_mb_s": two,
        "sync_s": round(sync_s, 3),
        "lookup_p50_us": round(lat[len(lat) // 2], 2) if lat else None,
        "lookup_p99_us": round(lat[len(lat) * 99 // 100], 2) if lat else None,
        "lookup_note": system_cls.lookup_note, "scan_mb_s": round(scan_mb_s, 1),
        "open_ms": round(open_ms, 3), "bytes_on_disk": on_disk,
        "payload_bytes": w.rows * w.dim * 4}))


if __name__ == "__main__":
    main()
