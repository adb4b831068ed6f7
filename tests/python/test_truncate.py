"""Writer.truncate: rolling a store back (rows= or from_epoch=), with a live Reader, an async
queue and a Writer in another process."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import embstore


def rows_of(first, n, dim=4):
    return np.arange(first * dim, (first + n) * dim, dtype=np.float32).reshape(n, dim)


def fill(w, epochs, per_epoch=10):
    for epoch in range(epochs):
        first = epoch * per_epoch
        w.append(np.arange(first, first + per_epoch), rows_of(first, per_epoch), epoch)


def test_truncate_rows_keeps_a_prefix_and_a_reader_follows_on_refresh(store):
    with embstore.Writer(store, dim=4) as w:
        fill(w, 5)
        r = embstore.Reader(store)
        old = r.vectors
        before = old.copy()
        assert w.truncate(23) == 23
        assert w.committed_rows() == 23
        # The Reader's snapshot and arrays are untouched until refresh.
        assert len(r) == 50
        np.testing.assert_array_equal(old, before)
        assert r.find(45) == 45
        w.append([100, 101], rows_of(1000, 2), 9)
        assert r.refresh() == 25
        np.testing.assert_array_equal(old, before)
        assert r.find(45) is None
        assert r.find(100) == 23
        assert r.keys.tolist() == list(range(23)) + [100, 101]
        np.testing.assert_array_equal(r.vectors[:23], rows_of(0, 23))
        assert r.verify().ok
        assert w.info()["generation"] == 2


def test_truncate_from_epoch_drops_that_epoch_and_after(store):
    with embstore.Writer(store, dim=4) as w:
        fill(w, 4)
        assert w.truncate(from_epoch=2) == 20
        assert w.truncate(from_epoch=7) == 20  # no row of epoch >= 7: nothing changes
    r = embstore.Reader(store)
    assert len(r) == 20
    assert sorted(set(r.epochs.tolist())) == [0, 1]


def test_truncate_bad_arguments(store):
    with embstore.Writer(store, dim=4) as w:
        fill(w, 1)
        with pytest.raises(TypeError):
            w.truncate()
        with pytest.raises(TypeError):
            w.truncate(3, from_epoch=1)
        with pytest.raises(ValueError, match="11"):
            w.truncate(11)
        with pytest.raises(ValueError):
            w.truncate(-1)
        with pytest.raises(ValueError):
            w.truncate(from_epoch=1.5)
        assert w.truncate(10) == 10
        assert w.committed_rows() == 10


def test_truncate_of_a_damaged_store_raises_naming_the_row_and_changes_nothing(store):
    with embstore.Writer(store, dim=4) as w:
        fill(w, 3)
    # Row 12's index entry zeroed: a truncate that kept it lost every later row before.
    with open(f"{store}/index.1", "r+b") as f:
        f.seek(12 * 32)
        f.write(bytes(32))
    with embstore.Writer(store) as w:
        with pytest.raises(embstore.CorruptionError, match="row 12.*all zero.*at most 12 rows"):
            w.truncate(20)
        assert w.committed_rows() == 30
        assert w.info()["generation"] == 1
        assert w.truncate(12) == 12
    r = embstore.Reader(store)
    assert len(r) == 12 and r.verify().ok


def test_truncate_writes_the_async_queue_first(store):
    with embstore.Writer(store, dim=4, async_queue_mb=1) as w:
        fill(w, 3)
        # The queued batches are committed before the truncate counts rows.
        assert w.truncate(from_epoch=1) == 10
        w.append([500], rows_of(7, 1), 5)
        w.flush()
        assert w.committed_rows() == 11
    assert embstore.Reader(store).keys.tolist() == list(range(10)) + [500]


def test_writer_of_another_process_appends_after_the_kept_rows(store):
    with embstore.Writer(store, dim=4) as w:
        fill(w, 3)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import embstore
        w = embstore.Writer({store!r})
        print("open", flush=True)
        sys.stdin.readline()
        w.append([900, 901], np.ones((2, 4), np.float32), 8)
        w.close()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        with embstore.Writer(store) as w:
            assert w.truncate(12) == 12
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
    r = embstore.Reader(store)
    assert r.keys.tolist() == list(range(12)) + [900, 901]
    assert r.verify().ok


def deleted_store_files_mapped(store):
    """The files of `store` this process maps that have been unlinked (an older generation's)."""
    import os
    prefix = os.path.realpath(store) + "/"
    with open("/proc/self/maps") as maps:
        return sorted({line.split(None, 5)[5].strip()[len(prefix):] for line in maps
                       if line.rstrip().endswith("(deleted)") and prefix in line})


@pytest.mark.parametrize("follow", ["refresh", "wait"])
def test_a_reader_following_truncates_keeps_an_old_generation_mapped_only_for_its_arrays(
        store, follow):
    # A Reader that followed a store across truncates kept every older generation's files
    # mapped (unlinked, so their space on disk never came back) for as long as it lived: a
    # dashboard following a run that resumes from checkpoints held a copy of the store per
    # resume. Now the old files stay mapped only while arrays taken from them exist.
    import gc
    with embstore.Writer(store, dim=4) as w:
        fill(w, 5)
    r = embstore.Reader(store)
    kept = r.vectors[:3]
    before = kept.copy()
    for resume in range(3):
        with embstore.Writer(store) as w:
            w.truncate(10)
            w.append([7, 8], rows_of(500 + resume, 2), 6)
        if follow == "refresh":
            assert r.refresh() == 12
        else:
            assert r.wait(12, timeout=10)
        assert r.generation == 2 + resume and len(r) == 12
        assert r.get(8, 6).tolist() == rows_of(500 + resume, 2)[1].tolist()
        np.testing.assert_array_equal(kept, before)  # still readable, unchanged
        # Only the files `kept` holds are left unlinked and mapped: its generation's, and those
        # of the generation the Reader it came from refreshed to (mapped by that Reader before
        # it saw the truncate); never the later ones.
        held = ["index.1", "rows.1"] + (["index.2", "rows.2"] if resume else [])
        assert deleted_store_files_mapped(store) == sorted(f"{f} (deleted)" for f in held)
    del kept
    gc.collect()
    assert deleted_store_files_mapped(store) == []
    assert r.vectors[:10].tolist() == rows_of(0, 10).tolist()
