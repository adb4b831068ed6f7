"""Async writer: input copied at the call (or donated), bounded queue with back-pressure, errors
surfacing."""
import contextlib
import dis
import errno
import fcntl
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

import embstore


def _wait_until(predicate, timeout=60, what="condition"):
    """Polls a condition the code under test exposes no event for (stats of a C++ queue)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.001)


class StoreLock:
    """Holds the store's writer lock from this process (a POSIX record lock over the whole file
    conflicts with the OFD locks the writer takes: the writer lock, byte 0, and the key index
    lock, byte 2), so the background thread blocks inside its append."""

    def __init__(self, path):
        self.fd = os.open(os.path.join(path, "lock"), os.O_RDWR)
        st = os.fstat(self.fd)
        # How /proc/locks names the file: "MAJOR:MINOR:INODE" (hex, hex, decimal).
        self.file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"

    def has_a_waiter(self):
        """Whether a request for the lock file is blocked (behind this lock): a "->" line on the
        file in /proc/locks. A thread there is inside fcntl, not about to call it."""
        with open("/proc/locks") as f:
            return any(fields[1] == "->" and self.file_id in fields
                       for fields in map(str.split, f) if len(fields) > 1)

    def wait_for_a_waiter(self, timeout=60):
        _wait_until(self.has_a_waiter, timeout, "a request blocked on the store's lock")

    def __enter__(self):
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        return self

    def release(self):
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def __exit__(self, *exc):
        self.release()
        os.close(self.fd)


def inside_the_call_of(function, thread=None):
    """Whether `thread` (the main one by default) is inside the native call that `function`, a
    Python method of the package (Writer.flush), makes: its innermost frame is that function's,
    at a CALL instruction. Seen from another thread, which holds the GIL meanwhile, it is then in
    C++ with the GIL released, where a signal only trips a flag that the call's wait checks: no
    Python code runs before the call returns."""
    thread = thread or threading.main_thread()
    frame = sys._current_frames().get(thread.ident)
    if frame is None or frame.f_code is not function.__code__:
        return False
    return any(i.offset == frame.f_lasti and i.opname.startswith("CALL")
               for i in dis.get_instructions(frame.f_code))


@contextlib.contextmanager
def sigint_once(ready, what, timeout=60):
    """Sends this process SIGINT from another thread once ready() holds: the call in the block is
    observably waiting. On a timer (0.3 s) it could come before that on a busy machine: into
    Python code, where its KeyboardInterrupt ends the whole pytest run if not yet inside
    pytest.raises, or, for a lock, before the fcntl blocks, which it then does not interrupt.
    Fails the test, naming `what`, if the block ends without raising and no SIGINT was sent
    (ready() did not hold within `timeout` s, or before the call returned)."""
    sent, failure = threading.Event(), []
    ended = threading.Event()

    def interrupt():
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if ended.is_set() or time.monotonic() > deadline:
                    failure.append(f"{what}: not seen within {timeout} s, nor before the call "
                                   "returned; no SIGINT was sent")
                    return
                time.sleep(0.001)
        except Exception as error:  # noqa: BLE001 (reported by the test's thread, below)
            failure.append(f"{what}: {error!r}; no SIGINT was sent")
            return
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    try:
        yield
    finally:
        ended.set()
        thread.join()
    assert sent.is_set(), failure[0]


def test_async_append_returns_before_writing_and_flush_commits(store):
    embstore.create(store, dim=8)
    w = embstore.Writer(store, async_queue_mb=16)
    r = embstore.Reader(store)
    batch = np.ones((512, 8), np.float32)
    with StoreLock(store) as lock:
        assert w.append(range(512), batch, 1) is None  # returns while the writer is blocked
        assert r.refresh() == 0
        lock.release()
        w.flush()
    assert r.refresh() == 512
    np.testing.assert_array_equal(r.vectors, batch)
    w.close()


@pytest.mark.parametrize("call", ["flush", "sync"])
def test_flush_waits_for_the_batches_before_it_not_for_those_another_thread_adds(store, call):
    """A training thread keeps the queue from ever emptying (a batch per step, each synced):
    flush() (and sync(), which flushes) must return once the batches appended before it are
    written. It waited for an empty queue, so it returned only when that thread stopped."""
    w = embstore.Writer(store, dim=8, async_queue_mb=0.01, sync="every_append")
    stop = threading.Event()
    returned = [0]  # rows whose append has returned

    def training_loop():
        row = np.ones((1, 8), np.float32)
        while not stop.is_set():
            w.append([returned[0]], row, 0)
            returned[0] += 1

    trainer = threading.Thread(target=training_loop)
    trainer.start()
    try:
        _wait_until(lambda: returned[0] >= 50)
        before = returned[0]
        done = threading.Event()
        flusher = threading.Thread(target=lambda: (getattr(w, call)(), done.set()))
        flusher.start()
        flushed = done.wait(30)
        committed = len(embstore.Reader(store))
        still_appending = trainer.is_alive() and not stop.is_set()
    finally:
        stop.set()
        trainer.join()
        flusher.join()
    assert flushed, f"{call}() did not return while another thread kept appending"
    assert still_appending
    assert committed >= before
    w.close()
    assert sorted(embstore.Reader(store).keys.tolist()) == list(range(returned[0]))


def test_async_append_copies_the_rows_so_the_caller_may_change_its_array_at_once(store):
    embstore.create(store, dim=4)
    w = embstore.Writer(store, async_queue_mb=16)
    batch = np.zeros((3, 4), np.float32)
    refs = sys.getrefcount(batch)
    with StoreLock(store) as lock:
        w.append([1, 2, 3], batch)  # queued: the writer thread is blocked on the store's lock
        assert sys.getrefcount(batch) == refs  # the queue holds a copy, not the array
        batch[:] = 9  # changed before the write: the store still gets the values of the call
        lock.release()
        w.flush()
    np.testing.assert_array_equal(embstore.Reader(store).rows(0, 3), 0)
    w.close()


def test_the_reused_buffer_training_loop_stores_what_each_call_passed(store):
    # The loop of a user who reuses one buffer: each batch must hold its own i, and verify
    # must find every checksum right (rows hashed and written from one stable copy).
    buf = np.empty((512, 768), np.float32)
    with embstore.Writer(store, dim=768, async_queue_mb=64) as w:
        for i in range(50):
            buf[:] = i
            w.append(keys=np.arange(512) + 512 * i, vectors=buf, epoch=i)
    r = embstore.Reader(store)
    assert len(r) == 50 * 512
    np.testing.assert_array_equal(r.vectors[:, 0], np.repeat(np.arange(50), 512))
    assert (r.vectors == r.vectors[:, :1]).all()
    report = r.verify()
    assert report.ok, report


def test_a_reused_torch_tensor_is_copied_at_the_call(store):
    torch = pytest.importorskip("torch")
    buf = torch.empty((256, 64))
    with embstore.Writer(store, dim=64, async_queue_mb=4) as w:
        with StoreLock(store) as lock:
            for i in range(8):
                buf.fill_(i)
                w.append(torch.arange(256) + 256 * i, buf, i)  # all queued behind the lock
            lock.release()
            w.flush()
    r = embstore.Reader(store)
    np.testing.assert_array_equal(r.vectors[:, 0], np.repeat(np.arange(8), 256))
    assert r.verify().ok


def test_donated_array_is_referenced_until_the_writer_thread_copied_it(store):
    embstore.create(store, dim=4)
    w = embstore.Writer(store, async_queue_mb=16)
    batch = np.zeros((3, 4), np.float32)
    refs = sys.getrefcount(batch)
    with StoreLock(store) as lock:
        w.append([1, 2, 3], batch, copy=False)
        assert sys.getrefcount(batch) in (refs, refs + 1)  # +1 until the thread copied it
        lock.release()
        w.flush()
    w.append([4], np.zeros((1, 4), np.float32))  # any later call releases copied arrays
    w.flush()
    assert sys.getrefcount(batch) == refs
    np.testing.assert_array_equal(embstore.Reader(store).rows(0, 3), 0)
    w.close()


def test_a_donated_array_changed_while_queued_still_stores_rows_matching_their_checksums(store):
    # Breaking the copy=False promise leaves which values are stored undefined, but each row
    # is hashed and written from the writer thread's private copy: verify finds no bad row.
    buf = np.zeros((512, 256), np.float32)
    stop = threading.Event()

    def scribble():
        value = 0.0
        while not stop.is_set():
            value += 1
            buf[:] = value  # numpy releases the GIL for large assignments

    t = threading.Thread(target=scribble)
    t.start()
    try:
        with embstore.Writer(store, dim=256, async_queue_mb=4) as w:
            for i in range(60):
                w.append(np.arange(512) + 512 * i, buf, i, copy=False)
    finally:
        stop.set()
        t.join()
    r = embstore.Reader(store)
    assert len(r) == 60 * 512
    report = r.verify()
    assert report.ok, report


@pytest.mark.parametrize("dim", [256, 4], ids=["written-by-syscall", "written-through-the-map"])
def test_a_synchronous_append_of_an_array_another_thread_rewrites_stores_matching_checksums(
        store, dim):
    # Without an async queue the rows are taken from the caller's array during the call, with the
    # GIL released; another thread rewriting it meanwhile decides which values are stored, but
    # each row's checksum is computed over the bytes written (not over the caller's array, which
    # may change between hashing and writing): verify finds no bad row.
    rows = 512 if dim == 256 else 64  # 512 KiB, over the size written by system call; 1 KiB
    # On a page, as the rows land in the file: a writer alone then writes them from here and
    # hashes them in the page cache (a numpy array's own memory, 16 bytes into a page, is staged).
    import mmap
    buf = np.frombuffer(mmap.mmap(-1, rows * dim * 4), np.float32).reshape(rows, dim)
    stop = threading.Event()

    def scribble():
        value = 0.0
        while not stop.is_set():
            value += 1
            buf[:] = value

    t = threading.Thread(target=scribble)
    t.start()
    try:
        with embstore.Writer(store, dim=dim) as w:
            for i in range(300):
                w.append(np.arange(rows) + rows * i, buf, i)
    finally:
        stop.set()
        t.join()
    r = embstore.Reader(store)
    assert len(r) == 300 * rows
    report = r.verify()
    assert report.ok, report


def test_a_batch_larger_than_the_queue_is_written_by_the_caller_in_order(store):
    with embstore.Writer(store, dim=1024, async_queue_mb=1) as w:
        small = np.full((64, 1024), 1, np.float32)
        big = np.full((512, 1024), 2, np.float32)  # 2 MiB: larger than the whole queue
        with StoreLock(store) as lock:
            w.append(range(64), small, 1)  # queued behind the lock
            done = threading.Event()

            def append_big():
                w.append(range(512), big, 2)
                done.set()

            t = threading.Thread(target=append_big)
            t.start()  # its append waits for the queued batch, which waits for the lock
            lock.release()
            t.join(60)
        assert done.is_set()
        big[:] = 3  # after the call: not stored
        assert w.stats()["batches"] == 2 and w.stats()["rows"] == 576
    r = embstore.Reader(store)
    assert r.epochs.tolist() == [1] * 64 + [2] * 512
    np.testing.assert_array_equal(r.vectors[64:], 2)
    assert r.verify().ok


def test_full_queue_blocks_append_until_the_writer_catches_up(store):
    embstore.create(store, dim=1024)
    w = embstore.Writer(store, async_queue_mb=1)  # room for two 512 KiB batches
    half = [np.full((128, 1024), i, np.float32) for i in range(3)]
    returned = threading.Event()

    def third_append():
        w.append(range(128), half[2], 2)
        returned.set()

    with StoreLock(store) as lock:
        w.append(range(128), half[0], 0)  # taken by the writer thread, blocked on the lock
        w.append(range(128), half[1], 1)  # queued: the queue is now full
        t = threading.Thread(target=third_append)
        t.start()
        _wait_until(lambda: w.stats()["blocked_appends"] == 1)
        assert not returned.is_set()
        assert w.stats()["queued_bytes"] == 1 << 20
        assert len(embstore.Reader(store)) == 0
        lock.release()
        t.join(timeout=60)
        assert returned.is_set()
    w.flush()
    r = embstore.Reader(store)
    assert len(r) == 3 * 128
    assert r.epochs.tolist() == [0] * 128 + [1] * 128 + [2] * 128  # in append order
    assert w.stats()["blocked_appends"] == 0 and w.stats()["batches"] == 3
    w.close()


def test_background_error_surfaces_on_next_call_and_on_close(store):
    embstore.create(store, dim=1024, segment_mb=1)
    w = embstore.Writer(store, async_queue_mb=64, map_bytes=1 << 20)  # room for 256 rows
    rows = np.zeros((200, 1024), np.float32)
    w.append(range(200), rows)
    w.append(range(200), rows)  # fails in the background: beyond map_bytes
    with pytest.raises(OSError) as first:
        w.flush()
    assert first.value.errno == errno.ENOSPC and "not written" in str(first.value)
    # Sticky, as what the Writer is: it takes no more rows. Not "No space" again: a user who
    # freed space since was told the disk was still full (a resource-limit review).
    with pytest.raises(embstore.PoisonedError,
                       match=r"takes no more rows since a background append failed \(.*map_bytes"):
        w.append(range(1), rows[:1])
    with pytest.raises(embstore.PoisonedError, match="open the store again"):
        w.sync()
    with pytest.raises(OSError, match="map_bytes"):
        w.close()
    w.close()  # closed now; the error was reported
    assert len(embstore.Reader(store)) == 200


def test_background_error_drops_the_batches_queued_behind_it(store):
    embstore.create(store, dim=1024, segment_mb=1)
    w = embstore.Writer(store, async_queue_mb=64, map_bytes=1 << 20)
    rows = np.zeros((200, 1024), np.float32)
    with StoreLock(store) as lock:
        w.append(range(200), rows)
        w.append(range(200), rows)  # will fail
        w.append(range(10), rows[:10])  # queued behind the failure: dropped
        lock.release()
        with pytest.raises(OSError, match=r"1 queued behind it \(210 rows\)"):
            w.flush()
    assert w.stats()["dropped_batches"] == 2
    with pytest.raises(OSError):
        w.close()
    assert len(embstore.Reader(store)) == 200


def test_unclosed_async_writer_reports_its_error_when_collected(store):
    import gc
    embstore.create(store, dim=1024, segment_mb=1)
    w = embstore.Writer(store, async_queue_mb=64, map_bytes=1 << 20)
    w.append(range(300), np.zeros((300, 1024), np.float32))
    seen = []
    old = sys.unraisablehook
    sys.unraisablehook = lambda info: seen.append(info.exc_value)
    try:
        del w
        gc.collect()
    finally:
        sys.unraisablehook = old
    assert len(seen) == 1 and isinstance(seen[0], OSError)


def test_async_validates_dim_and_dtype_in_the_call(store):
    with embstore.Writer(store, dim=4, async_queue_mb=1) as w:
        with pytest.raises(ValueError, match="dim 3"):
            w.append([1], np.zeros((1, 3), np.float32))
        with pytest.raises(ValueError, match="float64"):
            w.append([1], np.zeros((1, 4), np.float64))
        w.append([1], np.zeros((1, 4), np.float32))
    assert len(embstore.Reader(store)) == 1


@pytest.mark.parametrize("dtype, beyond", [("float16", 1e6), ("bfloat16", 3.4e38)])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_async_refuses_a_value_beyond_a_narrow_store_in_the_call_and_keeps_writing(
        store, dtype, beyond, layout):
    # The copy into the queue converts float32 rows to the store's dtype and checks them: the
    # call that passes an overflowing value raises, nothing of it is queued, and the writer goes
    # on (it used to queue the batch, fail in the background, drop the good batches queued
    # behind it and refuse every later call). A strided array is made contiguous by the
    # binding first; that copy is converted in the call too.
    rng = np.random.default_rng(5)
    good = [rng.standard_normal((64, 16)).astype(np.float32) for _ in range(3)]
    bad = rng.standard_normal((64, 16)).astype(np.float32)
    bad[17, 5] = beyond

    def passed(a):
        return np.asfortranarray(a) if layout == "strided" else a

    with embstore.Writer(store, dim=16, dtype=dtype, async_queue_mb=1) as w:
        with StoreLock(store):  # the good batch waits in the queue while the bad one is passed
            w.append(range(64), passed(good[0]), 0)
            with pytest.raises(ValueError, match=r"row 17 of the batch, column 5: .* is beyond "
                               + dtype + "'s range"):
                w.append(range(64, 128), passed(bad), 0)
            assert w.stats()["queued_bytes"] == 64 * 16 * 2  # converted rows: 2 bytes each
        w.append(range(128, 192), passed(good[1]), 1)
        w.flush()
        w.append(range(192, 256), passed(good[2]), 2)
    r = embstore.Reader(store)
    assert len(r) == 192 and r.verify().ok
    with embstore.Writer(str(store) + "-sync", dim=16, dtype=dtype) as sync:
        for epoch, rows in enumerate(good):
            sync.append(range(64), rows, epoch)
    expected = embstore.Reader(str(store) + "-sync").vectors
    assert np.asarray(r.vectors).view(np.uint16).tolist() == \
        np.asarray(expected).view(np.uint16).tolist()  # converted exactly as a sync append does
    assert r.keys.tolist() == list(range(64)) + list(range(128, 256))


def test_a_donated_batch_beyond_a_narrow_store_fails_in_the_background_and_says_so(store):
    # A donated array is not read by the call: its conversion, and so the refusal, happen in the
    # background thread, which reports it by the next call as any failed background append.
    bad = np.ones((8, 4), np.float32)
    bad[3, 2] = 1e6
    w = embstore.Writer(store, dim=4, dtype="float16", async_queue_mb=1)
    w.append(range(8), np.ones((8, 4), np.float32), copy=False)
    w.append(range(8, 16), bad, copy=False)
    # Not a ValueError, which says the raising call's own input was bad (a loop skipping such
    # batches would drop every later one without knowing): the Writer's state.
    with pytest.raises(embstore.PoisonedError, match=r"row 3 of the batch, column 2: 1000000 is "
                       r"beyond float16's range.*this batch and the 0 queued behind it \(8 rows\) "
                       "were not written") as raised:
        w.flush()
    assert not isinstance(raised.value, ValueError)
    with pytest.raises(embstore.PoisonedError):
        w.append(range(16, 24), np.ones((8, 4), np.float32))  # fine rows: the Writer refuses
    with pytest.raises(embstore.PoisonedError):
        w.close()
    assert len(embstore.Reader(store)) == 8


def test_async_writes_match_sync_writes_across_many_batches(store, tmp_path):
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((int(rng.integers(1, 300)), 32)).astype(np.float32)
               for _ in range(50)]
    with embstore.Writer(store, dim=32, async_queue_mb=0.25) as w:
        for i, b in enumerate(batches):
            w.append(np.arange(len(b)) + 1000 * i, b, i)
    r = embstore.Reader(store)
    np.testing.assert_array_equal(r.vectors, np.concatenate(batches))
    assert r.epochs.tolist() == sum(([i] * len(b) for i, b in enumerate(batches)), [])


def test_keys_are_stored_exactly_when_key_buffers_of_written_batches_are_reused(store):
    # The queue hands the key buffers of written batches back for later appends: batches of
    # other sizes, and keys of other dtypes (uint64 copied whole, int64 checked one by one),
    # must each store their own keys, not a reused buffer's leftovers.
    rng = np.random.default_rng(5)
    sizes = [int(rng.integers(1, 400)) for _ in range(60)] + [70000, 3]  # one too large to keep
    expected = []
    with embstore.Writer(store, dim=4, async_queue_mb=4) as w:
        for i, n in enumerate(sizes):
            keys = rng.integers(0, 2**62, size=n, dtype=np.int64)
            expected.append(keys.astype(np.uint64))
            w.append(keys.astype(np.uint64) if i % 2 else keys, np.full((n, 4), i, np.float32), i)
            if i % 3 == 2:
                w.flush()  # the batches so far are written: their buffers come back
    r = embstore.Reader(store)
    np.testing.assert_array_equal(r.keys, np.concatenate(expected))
    assert r.epochs.tolist() == sum(([i] * n for i, n in enumerate(sizes)), [])
    assert r.verify().bad_row_count == 0


def test_writer_thread_runs_sched_batch_so_waking_it_never_preempts_the_caller(store):
    def batch_threads():
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        return [t for t in tids if _policy(t) == os.SCHED_BATCH]

    def _policy(tid):
        try:
            return os.sched_getscheduler(tid)
        except OSError:  # the thread exited meanwhile
            return None

    before = len(batch_threads())
    with embstore.Writer(store, dim=2, async_queue_mb=1) as w:
        w.append([1], np.ones((1, 2), np.float32))
        w.flush()
        assert len(batch_threads()) == before + 1
    assert len(batch_threads()) == before  # joined on close


def test_batches_at_a_steady_pace_are_written_by_a_napping_thread_without_waking_it(store):
    # The writer thread naps until the next batch is due, so an append at a steady pace need
    # not wake it; the batch is taken when the nap ends, with no flush() needed.
    rows = np.ones((1, 2), np.float32)
    pushes = 50
    with embstore.Writer(store, dim=2, async_queue_mb=1) as w:
        for i in range(pushes):
            w.append([i], rows * i, i)
            time.sleep(0.005)
        r = embstore.Reader(store)
        _wait_until(lambda: (r.refresh(), len(r))[1] == pushes)  # no flush(), no wake
        s = w.stats()
        # Pushes 5 ms apart with writes of microseconds: the thread napped between them (only
        # a stall of two intervals on every push would make it sleep for good every time).
        assert s["writer_naps"] > 0
        assert s["appends_woke_writer"] < pushes
        np.testing.assert_array_equal(r.vectors[:, 0], np.arange(pushes))

        # Idle: within two intervals of the last batch it stops napping and sleeps until woken.
        time.sleep(1.0)
        naps = w.stats()["writer_naps"]
        time.sleep(0.5)
        assert w.stats()["writer_naps"] == naps
        woke = w.stats()["appends_woke_writer"]
        w.append([pushes], rows * pushes, pushes)
        assert w.stats()["appends_woke_writer"] == woke + 1
        _wait_until(lambda: (r.refresh(), len(r))[1] == pushes + 1)
        r.close()


def test_flush_and_a_full_queue_do_not_wait_for_a_nap_to_end(store):
    # Pushes 150 ms apart: the thread naps up to 150 ms between them. flush() wakes it, and so
    # does an append that finds the queue full; both are also correct without the wake (the nap
    # ends by itself), so this checks the rows, not the time.
    rows = np.ones((4096, 16), np.float32)  # 256 KiB: four fill the 1 MiB queue
    with embstore.Writer(store, dim=16, async_queue_mb=1) as w:
        for i in range(4):
            w.append(np.arange(4096) + 4096 * i, rows * i, i)
            w.flush()
            time.sleep(0.15)
        for i in range(4, 16):  # back to back: the queue fills while the thread may nap
            w.append(np.arange(4096) + 4096 * i, rows * i, i)
        w.flush()
        assert w.committed_rows() == 16 * 4096
    r = embstore.Reader(store)
    np.testing.assert_array_equal(r.vectors[::4096, 0], np.arange(16))


def test_sync_append_releases_the_gil_while_waiting_for_the_store(store):
    embstore.create(store, dim=4)
    w = embstore.Writer(store)
    entered = threading.Event()

    def append():
        entered.set()
        w.append([1], np.ones((1, 4), np.float32))

    with StoreLock(store) as lock:
        t = threading.Thread(target=append)
        t.start()
        entered.wait()
        # Were the GIL held inside append (blocked on the store's lock), this thread could not
        # run this Python code and the test would hang until the faulthandler timeout.
        total = sum(range(100_000))
        assert total and t.is_alive() and len(embstore.Reader(store)) == 0
        lock.release()
        t.join(60)
    assert not t.is_alive() and len(embstore.Reader(store)) == 1
    w.close()


@pytest.mark.parametrize("async_queue_mb", [0, 4])
def test_stats_count_the_cpu_time_of_the_write_work_apart_from_its_waits(store, async_queue_mb):
    rows = np.ones((256, 8), np.float32)
    with embstore.Writer(store, dim=8, async_queue_mb=async_queue_mb) as w:
        for epoch in range(4):
            w.append(np.arange(256) + 256 * epoch, rows, epoch, copy=epoch % 2 == 0)
        w.flush()
        s = w.stats()
    assert s["batches"] == 4
    assert s["append_cpu_seconds"] > 0
    # Measured inside the wall-time window of the same work, on the same thread, and capped at it
    # where the two clocks disagree (WorkClock in src/python/async_writer.h; one CI run without
    # the cap counted 3.4 ms of CPU inside 1.0 ms).
    assert s["append_cpu_seconds"] <= s["append_seconds"]
    with embstore.Writer(store, async_queue_mb=async_queue_mb) as w, StoreLock(store) as lock:
        # An append that waits 0.3 s for the lock: wall time, not CPU time. The 0.3 s count from
        # the moment its request is blocked on the lock, not from the thread's start: starting
        # it, handing it the GIL and waking the writer thread (SCHED_BATCH) can take more than
        # the 50 ms of slack on a busy machine.
        t = threading.Thread(target=lambda: (w.append([9999], rows[:1], 9), w.flush()))
        t.start()
        lock.wait_for_a_waiter()
        time.sleep(0.3)
        lock.release()
        t.join(60)
        s = w.stats()
    assert s["batches"] == 1 and s["append_seconds"] >= 0.25
    assert s["append_cpu_seconds"] < 0.2


def test_a_queue_that_cannot_be_mapped_is_an_os_error_naming_the_store_and_option(store):
    # 2**50 bytes of queue: beyond a process's address space (without a hint, mmap stays in the
    # low 128 TiB even with 5-level paging), so refused (ENOMEM) whatever the overcommit policy.
    with pytest.raises(OSError, match=r"async writer: cannot map its queue of \d+ bytes "
                                      r"\(async_queue_mb\)") as info:
        embstore.Writer(store, dim=8, async_queue_mb=2**30)
    assert store in str(info.value)
    with embstore.Writer(store) as w:  # the store itself is usable
        w.append([1], np.ones((1, 8), np.float32), 0)
    assert len(embstore.Reader(store)) == 1


@pytest.mark.parametrize("call", ["append", "truncate"])
def test_ctrl_c_ends_a_call_waiting_for_the_writer_lock_and_nothing_is_written(store, call):
    # Another process holds the writer lock for long (a truncate of a large store, or a writer
    # stopped by Ctrl-Z or a debugger): a Ctrl-C here was ignored until it let go. The wait now
    # ends with the KeyboardInterrupt, before anything is written, and the Writer goes on.
    ones = np.ones((1, 4), np.float32)
    with embstore.Writer(store, dim=4) as w:
        w.append([1], ones)
        with StoreLock(store) as lock:
            # Should the wait ignore the signal, the lock goes at 10 s (no hang): then the call
            # runs, and the rows below say so.
            let_go = threading.Timer(10, lock.release)
            let_go.start()
            # The SIGINT once the call's request is blocked on the lock: one that came before
            # its fcntl blocked would be left unseen (the wait checks for it on EINTR).
            with pytest.raises(KeyboardInterrupt), \
                    sigint_once(lock.has_a_waiter, f"{call} waiting for the store's lock"):
                if call == "append":
                    w.append([2], ones)
                else:
                    w.truncate(rows=0)
            let_go.cancel()
        w.append([3], ones)
    assert embstore.Reader(store).keys.tolist() == [1, 3]


def test_ctrl_c_ends_an_async_append_waiting_for_room_and_a_flush_and_loses_nothing_queued(
        store):
    # The queue full behind a writer lock another process holds: append waited for room and
    # flush for the queue, both ignoring Ctrl-C. Now each ends with the KeyboardInterrupt: the
    # batch that waited for room is not queued (the exception says so), the queued ones are
    # written once the lock is free.
    embstore.create(store, dim=1024)
    w = embstore.Writer(store, async_queue_mb=1)  # room for two 512 KiB batches
    half = [np.full((128, 1024), i, np.float32) for i in range(4)]
    with StoreLock(store) as lock:
        let_go = threading.Timer(20, lock.release)  # should a wait ignore the signal: no hang
        let_go.start()
        w.append(range(128), half[0], 0)  # taken by the writer thread, blocked on the lock
        w.append(range(128), half[1], 1)  # queued: the queue is now full
        # The SIGINT once each call waits: the append counted as blocked, the flush inside its
        # native call (it exposes no count).
        waiting = {"append": lambda: w.stats()["blocked_appends"] == 1,
                   "flush": lambda: inside_the_call_of(embstore.Writer.flush)}
        for call in ("append", "flush"):
            with pytest.raises(KeyboardInterrupt), \
                    sigint_once(waiting[call], f"{call} waiting for the queue"):
                if call == "append":
                    w.append(range(128), half[2], 2)
                else:
                    w.flush()
        assert w.stats()["blocked_appends"] == 0
        let_go.cancel()
    w.append(range(128), half[3], 3)
    w.close()
    assert embstore.Reader(store).epochs.tolist() == [0] * 128 + [1] * 128 + [3] * 128


def test_ctrl_c_ends_a_close_waiting_for_its_queue_and_the_rows_are_written_later(store):
    # close() joined the writer thread, which waited for a writer lock another process held:
    # Ctrl-C did nothing until the lock was free. Now it ends close() with the KeyboardInterrupt;
    # the Writer stays open with its rows queued, and the next close() (or the exit finalizer)
    # writes them.
    embstore.create(store, dim=1024)
    w = embstore.Writer(store, async_queue_mb=1)
    with StoreLock(store) as lock:
        let_go = threading.Timer(20, lock.release)  # should close() ignore the signal: no hang
        let_go.start()
        for epoch in range(2):
            w.append(range(128), np.full((128, 1024), epoch, np.float32), epoch)
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt), \
                sigint_once(lambda: inside_the_call_of(embstore.Writer._close),
                            "close() waiting for its queue"):
            w.close()
        assert time.monotonic() - started < 10
        let_go.cancel()
        assert not w.closed and w._at_exit.still_active()
    w.close()
    assert not w._at_exit.still_active()
    assert embstore.Reader(store).epochs.tolist() == [0] * 128 + [1] * 128


def test_a_close_interrupted_before_it_began_leaves_the_rows_to_the_exit_finalizer(store):
    # close() cancelled the exit finalizer in its finally: a KeyboardInterrupt before the native
    # close began left the queued rows to garbage collection, if it came.
    w = embstore.Writer(store, dim=4, async_queue_mb=1)
    w.append(range(3), np.ones((3, 4), np.float32))
    native = w._native

    class InterruptedFirst:
        closed = False

        def close(self, interruptible=True):
            raise KeyboardInterrupt

    w._native = InterruptedFirst()
    with pytest.raises(KeyboardInterrupt):
        w.close()
    w._native = native
    assert w._at_exit.still_active()  # the finalizer still writes them at exit
    w._at_exit()  # what the interpreter's exit runs
    assert len(embstore.Reader(store)) == 3


def test_a_sigint_handler_of_the_programs_own_lets_the_wait_go_on_and_runs_after_it(store):
    # Only Python's default handler (KeyboardInterrupt) ends a wait. A handler of the program's
    # own that returns (a stop flag; embstore.torch's deferral while a recorder hands its rows
    # over, where an ended wait lost the batch taken out) asks for no call to be cut short: the
    # flush waits on and writes everything, and the handler runs once the call has let go of
    # the Writer's locks, not inside the wait (where closing this Writer from it deadlocked).
    embstore.create(store, dim=1024)
    w = embstore.Writer(store, async_queue_mb=1)
    calls = []

    def handler(signum, frame):
        calls.append(w.stats()["queued_bytes"])  # the Writer is usable from the handler

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with StoreLock(store) as lock:
            for epoch in range(2):
                w.append(range(128), np.full((128, 1024), epoch, np.float32), epoch)
            sent = threading.Event()

            def waiting():
                if not inside_the_call_of(embstore.Writer.flush):
                    return False
                sent.set()
                return True

            def let_go_after_the_signal():
                sent.wait(60)
                time.sleep(0.5)  # the signal has come while the flush waits for the lock
                lock.release()

            releaser = threading.Thread(target=let_go_after_the_signal, daemon=True)
            releaser.start()
            with sigint_once(waiting, "flush() waiting for its queue"):
                w.flush()  # returns normally, once the lock is let go
            releaser.join(60)
            assert sent.is_set() and calls == [0]  # the handler ran after the flush
    finally:
        signal.signal(signal.SIGINT, previous)
    w.close()
    assert embstore.Reader(store).epochs.tolist() == [0] * 128 + [1] * 128
