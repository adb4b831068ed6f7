"""Lookups by key and epoch from Python: get/find/find_many/gather/history/epoch_rows, checked
against a dict oracle (Hypothesis drives random appends, refreshes and lookups)."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embstore
from conftest import point_pair_slot_at

MAX_KEY = 2**64 - 1


def vec(key, epoch, dim=4):
    return np.full(dim, (key * 31 + epoch * 7) % 10007, dtype=np.float32)


def append(w, pairs, dim=4):
    keys = [k for k, _ in pairs]
    epochs = [e for _, e in pairs]
    w.append(np.array(keys, dtype=np.uint64), np.stack([vec(k, e, dim) for k, e in pairs]),
             np.array(epochs, dtype=np.uint64))


def test_a_store_created_without_a_key_index_keeps_none_and_still_answers(store, tmp_path):
    with pytest.raises(ValueError, match="key_index must be True or False"):
        embstore.create(store, dim=4, key_index="no")
    with embstore.Writer(store, dim=4, key_index=False) as w:  # created here, without one
        append(w, [(k, k % 3) for k in range(2000)])
        append(w, [(5, 1)])
    with embstore.Writer(store) as w:  # a later writer builds none either
        append(w, [(7, 9)])
    assert not [f for f in os.listdir(store) if f.startswith("keys.")]
    info = embstore.info(store)
    assert info["keeps_key_index"] is False and info["key_index_used"] is False
    r = embstore.Reader(store)
    assert r.find(5, 2) == 5 and r.find(5, 1) == 2000 and r.find(7) == 2001
    assert r.history(5) == [(5, 2), (2000, 1)]
    assert r.get(1999).tolist() == vec(1999, 1999 % 3).tolist()
    assert r.find_many(np.array([5, 6, 10**6], np.uint64), 2).tolist() == [5, -1, -1]
    # A compacted copy keeps the choice.
    out = str(tmp_path / "compacted")
    embstore.compact(store, out)
    assert embstore.info(out)["keeps_key_index"] is False
    assert embstore.Reader(out).find(7) == 2001
    # The default keeps one.
    other = str(tmp_path / "default")
    embstore.create(other, dim=4)
    assert embstore.info(other)["keeps_key_index"] is True


def test_expected_rows_builds_the_key_index_once_for_them(tmp_path):
    rows = np.ones((500, 8), dtype=np.float32)

    def key_files(path, **options):
        with embstore.Writer(path, dim=8, **options) as w:
            for first in range(0, 20000, 500):
                w.append(np.arange(first, first + 500, dtype=np.uint64), rows)
        with embstore.Reader(path) as r:
            assert r.find(19999) == 19999
            assert "20000 rows indexed" in r.info()["key_index"]
        return sorted(name for name in os.listdir(path) if name.startswith("keys."))

    assert key_files(tmp_path / "expected", expected_rows=20000) == ["keys.1"]
    grown = key_files(tmp_path / "grown")  # the control: the tables grew on the way
    assert len(grown) == 1 and grown != ["keys.1"]
    for bad, message in [(-1, "expected_rows is -1"), (True, "expected_rows"),
                         (2.5, "expected_rows"),
                         (2**40 + 1, "expected_rows 1099511627777 exceeds the 2\\^40 rows")]:
        with pytest.raises(ValueError, match=message):
            embstore.Writer(tmp_path / "bad", dim=8, expected_rows=bad)
        assert not (tmp_path / "bad").exists()


def test_get_find_history_and_batches(store):
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        append(w, [(0, 0), (MAX_KEY, 0), (5, 1), (5, 2)])
        append(w, [(5, 1), (0, 3)])  # (5, 1) twice: the later row wins
    r = embstore.Reader(store)
    v = r.get(5, 1)
    assert v.tolist() == vec(5, 1).tolist() and not v.flags.writeable
    assert np.shares_memory(v, r.vectors)  # zero-copy
    assert r.find(5, 1) == 4 and r.find(5) == 4 and r.find(0) == 5
    assert r.get(MAX_KEY).tolist() == vec(MAX_KEY, 0).tolist()
    with pytest.raises(KeyError, match="key 5 at epoch 9"):
        r.get(5, 9)
    with pytest.raises(KeyError):
        r.get(77)
    assert r.find(77) is None
    assert r.history(5) == [(2, 1), (3, 2), (4, 1)]
    assert r.epoch_rows(0).tolist() == [0, 1]
    assert r.epoch_counts() == {0: 2, 1: 2, 2: 1, 3: 1}
    rows = r.find_many([5, 77, 0, MAX_KEY], [1, 1, 3, 0])
    assert rows.dtype == np.int64 and rows.tolist() == [4, -1, 5, 1]
    assert r.find_many([5, 0, 77]).tolist() == [4, 5, -1]
    assert r.find_many([5, 0], 1).tolist() == [4, -1]
    m = r.gather(rows)
    assert m.shape == (4, 4) and m[1].tolist() == [0, 0, 0, 0]
    assert m[0].tolist() == vec(5, 1).tolist()
    assert r.get_many([5, 0], [2, 3]).tolist() == [vec(5, 2).tolist(), vec(0, 3).tolist()]
    with pytest.raises(KeyError, match="key 77"):
        r.get_many([5, 77])
    info = r.info()
    assert info["distinct_keys"] == 3 and info["epochs"] == {0: 2, 1: 2, 2: 1, 3: 1}
    assert info["key_index"].startswith("keys.1") and info["key_index_used"] is True
    assert embstore.info(store)["distinct_keys"] == 3
    state = r.info(key_stats=False)  # constant time: no key statistics
    assert state["distinct_keys"] == 0 and state["epochs"] == {} and state["key_index"] == ""
    assert state["committed_rows"] == info["committed_rows"] == 6
    assert state["last_commit_unix_ns"] == info["last_commit_unix_ns"] > 0
    report = r.verify()
    assert report.ok and report.key_index_checked and report.key_index_problems == 0


def test_a_missing_key_index_file_is_answered_by_scan_and_reported(store):
    import os
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        append(w, [(1, 0), (2, 0), (1, 1)])
    os.remove(os.path.join(store, "keys.1"))
    r = embstore.Reader(store)
    info = r.info()
    assert info["key_index_used"] is False and info["key_index"].startswith("damaged (")
    assert info["distinct_keys"] == 2 and info["epochs"] == {0: 2, 1: 1}  # by scan
    assert r.find(1) == 2 and r.history(1) == [(0, 0), (2, 1)]
    report = r.verify()
    assert not report.ok and report.bad_row_count == 0
    assert report.key_index_problems == 1 and "keys.1" in report.key_index_problem
    # Its repr says so too (a report that is not ok never reads as clean).
    assert "ok=False" in repr(report) and "key_index_problems=1" in repr(report)
    assert "keys.1" in repr(report)
    with embstore.Writer(store) as w:  # the next writer rebuilds it
        append(w, [(3, 1)])
    r.refresh()
    assert r.info()["key_index_used"] is True and r.verify().ok


def test_get_many_of_keys_not_in_the_store_is_a_key_error_even_when_it_is_empty(store):
    embstore.create(store, dim=4)
    r = embstore.Reader(store)
    with pytest.raises(KeyError, match="key 1 is not in .* \\(2 of 2 keys missing\\)"):
        r.get_many([1, 2])
    with embstore.Writer(store) as w:
        w.append([7], np.ones((1, 4), np.float32), epoch=3)
    r.refresh()
    with pytest.raises(KeyError, match="key 1 at epoch 3 is not in .* \\(1 of 2 keys missing\\)"):
        r.get_many([7, 1], epochs=3)
    # A key that is in the store, at another epoch: the message names the epoch asked for.
    with pytest.raises(KeyError, match="key 7 at epoch 5 is not in"):
        r.get_many([7], epochs=[5])
    np.testing.assert_array_equal(r.get_many([7], epochs=[3]), np.ones((1, 4), np.float32))


def test_get_never_returns_another_keys_row_when_a_key_index_slot_is_damaged(store):
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append(np.arange(10), np.arange(40, dtype=np.float32).reshape(10, 4), epoch=2)
    # The pair slot of (key 3, epoch 2) made to name row 1 (key 1): key and epoch still match.
    point_pair_slot_at(store, key=3, row=1)
    r = embstore.Reader(store)
    np.testing.assert_array_equal(r.get(3, epoch=2), [12, 13, 14, 15])  # not row 1's
    assert r.info()["key_index"].startswith("damaged (a lookup of key 3 epoch 2 was answered "
                                            "with row 1 (key 1, epoch 2))")
    assert r.find(3, epoch=2) == 3  # lookups scan from then on
    assert not r.verify().ok
    # get_many confirms as get does, with one epoch for all keys or one per key.
    for epochs in (2, [2, 2, 2]):
        fresh = embstore.Reader(store)
        assert fresh.find_many([0, 3, 9], epochs)[1] == 1  # the slot alone, as documented
        np.testing.assert_array_equal(fresh.get_many([0, 3, 9], epochs=epochs)[:, 0], [0, 12, 36])
        assert fresh.info()["key_index"].startswith("damaged (a lookup of key 3 epoch 2 ")
        assert list(fresh.find_many([0, 3, 9], epochs)) == [0, 3, 9]
    # The latest rows come from the key slots, sound here.
    np.testing.assert_array_equal(embstore.Reader(store).get_many([3, 9])[:, 0], [12, 36])


def test_damage_inside_the_tables_found_by_verify_makes_lookups_scan_until_rebuilt(store):
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append(np.arange(50), np.ones((50, 4), np.float32), epoch=1)
    path = os.path.join(store, "keys.1")
    with open(path, "r+b") as f:  # every pair slot zeroed: the header still opens well
        f.seek(48)
        pair_slots = int.from_bytes(f.read(8), "little")
        f.seek(4096)
        f.write(bytes(16 * pair_slots))
    r = embstore.Reader(store)
    assert r.find(7, epoch=1) is None  # Not seen at open (checking every slot is O(n)).
    report = r.verify()
    assert not report.ok and report.key_index_problems > 0
    assert r.info()["key_index"].startswith("damaged (verify found ")
    assert r.find(7, epoch=1) == 7  # This Reader scans from then on.
    with embstore.Writer(store) as w:
        w.rebuild_key_index()
    fresh = embstore.Reader(store)
    assert fresh.verify().ok and fresh.find(7, epoch=1) == 7
    embstore.create(os.path.join(store, "..", "plain"), dim=4, key_index=False)
    with embstore.Writer(os.path.join(store, "..", "plain")) as w, pytest.raises(ValueError):
        w.rebuild_key_index()


def test_lookups_never_see_past_the_snapshot(store):
    embstore.create(store, dim=4)
    w = embstore.Writer(store)
    append(w, [(1, 0)])
    r = embstore.Reader(store)
    append(w, [(1, 1), (2, 0)])
    assert r.find(1) == 0 and r.find(2) is None and r.history(1) == [(0, 0)]
    assert r.find_many([1, 2], 0).tolist() == [0, -1]
    r.refresh()
    assert r.find(1) == 1 and r.find(2, 0) == 2
    w.close()


pair = st.tuples(st.sampled_from([0, 1, 2, 3, 1000, MAX_KEY]), st.integers(0, 3))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(st.lists(pair, min_size=1, max_size=20), st.just("refresh")),
                      max_size=12))
def test_model_against_a_dict(tmp_path_factory, steps):
    path = str(tmp_path_factory.mktemp("s") / "store")
    embstore.create(path, dim=4)
    w = embstore.Writer(path)
    r = embstore.Reader(path)
    committed = []  # (key, epoch) per row
    seen = 0  # rows in r's snapshot
    for step in steps:
        if step == "refresh":
            r.refresh()
            seen = len(committed)
        else:
            append(w, step)
            committed.extend(step)
        snap = committed[:seen]
        for key in (0, 1, 3, 1000, MAX_KEY, 55):
            rows = [i for i, (k, _) in enumerate(snap) if k == key]
            assert r.history(key) == [(i, snap[i][1]) for i in rows]
            assert r.find(key) == (rows[-1] if rows else None)
            for epoch in range(4):
                want = [i for i in rows if snap[i][1] == epoch]
                assert r.find(key, epoch) == (want[-1] if want else None)
        keys = np.array([k for k, _ in snap] + [55], dtype=np.uint64)
        epochs = np.array([e for _, e in snap] + [0], dtype=np.uint64)
        latest = {}
        for i, p in enumerate(snap):
            latest[p] = i
        assert r.find_many(keys, epochs).tolist() == [latest[p] for p in snap] + [-1]
        for epoch in range(4):
            assert r.epoch_rows(epoch).tolist() == [i for i, p in enumerate(snap) if p[1] == epoch]
    w.close()


def test_lookups_refuse_keys_epochs_and_rows_that_are_not_integers_in_range(store):
    with embstore.Writer(store, dim=1) as w:
        w.append([1, 2**64 - 1], np.array([[10.0], [99.0]], np.float32), epoch=[0, 5])
    r = embstore.Reader(store)
    # What append refuses, a lookup refuses: never truncated, wrapped or read as 0/1.
    for bad in (1.7, 0.99, True, np.bool_(True), -1, 2**64, "1", np.float64(1.0)):
        for name in ("find", "get", "history"):
            with pytest.raises(ValueError, match=f"{name}: key"):
                getattr(r, name)(bad)
        for name in ("find", "get"):
            with pytest.raises(ValueError, match=f"{name}: epoch"):
                getattr(r, name)(1, bad)
        with pytest.raises(ValueError, match="epoch_rows: epoch"):
            r.epoch_rows(bad)
        with pytest.raises(ValueError, match="find_many: epochs"):
            r.find_many([1], bad)
    for keys, message in [([1.9], r"keys\[0\] must be an integer .*float 1.9"),
                          ([True], r"keys\[0\] must be an integer .*bool True"),
                          (np.array([1.0]), "keys must be integers .*float64, first value 1.0"),
                          (np.array([True]), "keys must be integers .*bool"),
                          (np.array([3, -1]), r"keys\[1\] is negative \(-1\)")]:
        with pytest.raises(ValueError, match="find_many: " + message):
            r.find_many(keys)
        with pytest.raises(ValueError, match="get_many: " + message):  # the method called
            r.get_many(keys, 5)
    with pytest.raises(ValueError, match=r"find_many: epochs\[0\] is negative"):
        r.find_many([1], np.array([-1]))
    for rows, message in [([0.99], "rows must be integer row numbers .*float64"),
                          ([True], "rows must be integer row numbers .*bool"),
                          (np.array([2**64 - 1], np.uint64), "row 18446744073709551615 is beyond")]:
        with pytest.raises(ValueError, match="gather: " + message):
            r.gather(rows)
    # Integers of any kind still work, and so do empty lists.
    assert r.find(np.uint64(2**64 - 1)) == 1 and r.find(1, np.int8(0)) == 0
    assert r.history(1) == [(0, 0)] and r.epoch_rows(np.uint32(5)).tolist() == [1]
    assert r.find_many(np.array([1, 2**64 - 1], np.uint64), 5).tolist() == [-1, 1]
    assert r.find_many([1, 2**64 - 1], np.array(0)).tolist() == [0, -1]
    assert r.find_many([]).tolist() == [] and r.gather([]).shape == (0, 1)
    assert r.gather([-1, 1]).tolist() == [[0.0], [99.0]]
    assert r.gather(np.array([0], np.uint64)).tolist() == [[10.0]]


def test_lookups_refuse_a_bool_in_a_list_that_numpy_would_read_as_an_integer(store):
    # np.asarray([True, 1]) is the int64 array [1, 1]: without a look at the items, a bool
    # would silently be row, key or epoch 1 (or 0).
    with embstore.Writer(store, dim=1) as w:
        w.append([0, 1], np.array([[10.0], [11.0]], np.float32), epoch=0)
    r = embstore.Reader(store)
    for rows, message in [([True, 1], r"rows\[0\] is bool True"),
                          ((0, False), r"rows\[1\] is bool False"),
                          ([1, np.True_], r"rows\[1\] is bool_ True")]:
        with pytest.raises(ValueError, match="gather: rows must be integer row numbers .*"
                                             + message):
            r.gather(rows)
    for call, message in [(lambda: r.find_many([np.True_, 1]), r"find_many: keys\[0\] .*bool_"),
                          (lambda: r.find_many([0, 1], [0, np.False_]),
                           r"find_many: epochs\[1\] .*bool_"),
                          (lambda: r.get_many([1, np.True_]), r"get_many: keys\[1\] .*bool_")]:
        with pytest.raises(ValueError, match=message):
            call()
    assert r.gather([1, -1]).tolist() == [[11.0], [0.0]]
    assert r.find_many([1, 0]).tolist() == [1, 0]


def test_lookups_refuse_keys_epochs_and_rows_that_are_not_1d_naming_the_shape(store):
    # Read flat, a (2, 2) array of keys gave 4 rows (and get_many a (4, dim) matrix): answers
    # in a shape the caller did not ask for.
    with embstore.Writer(store, dim=1) as w:
        w.append([0, 1, 2], np.array([[10.0], [11.0], [12.0]], np.float32), epoch=0)
    r, s = embstore.Reader(store), embstore.ShardSet([store])
    square = np.array([[0, 1], [2, 0]], np.uint64)
    for call, message in [(lambda: r.find_many(square), r"find_many: keys .* shape \(2, 2\)"),
                          (lambda: r.find_many(5), r"find_many: keys .* shape \(\)"),
                          (lambda: r.find_many([0, 1], [[0, 0]]),
                           r"find_many: epochs .* shape \(1, 2\)"),
                          (lambda: r.get_many(square), r"get_many: keys .* shape \(2, 2\)"),
                          (lambda: r.gather(square), r"gather: rows .* shape \(2, 2\)"),
                          (lambda: r.gather(1), r"gather: rows .* shape \(\)"),
                          (lambda: s.find_many(square), r"keys .* shape \(2, 2\)"),
                          (lambda: s.find_many([0, 1], np.zeros((1, 2), np.uint64)),
                           r"epochs .* shape \(1, 2\)")]:
        with pytest.raises(ValueError, match=r"must be 1-D \(one per lookup\); got shape"):
            call()
        with pytest.raises(ValueError, match=message):
            call()
    assert r.find_many(square.reshape(-1)).reshape(square.shape).tolist() == [[0, 1], [2, 0]]
    assert s.find_many([0, 2], 0).tolist() == [0, 2] and r.gather([2]).tolist() == [[12.0]]


def test_get_many_checks_every_row_against_its_checksum_as_get_does(store):
    # A row whose bytes no longer match its checksum (bit rot on disk): get() refused it, while
    # get_many (find_many + gather) returned the damaged vector without a word.
    with embstore.Writer(store, dim=4) as w:
        w.append(np.arange(10), np.ones((10, 4), np.float32), 1)
    with open(os.path.join(store, "rows.1"), "r+b") as f:
        f.seek(5 * 16 + 4)
        f.write(np.float32(9).tobytes())
    r = embstore.Reader(store)
    with pytest.raises(embstore.CorruptionError, match=r"row 5 \(key 5, epoch 1\) fails its checksum"):
        r.get(5)
    with pytest.raises(embstore.CorruptionError, match=r"row 5 \(key 5, epoch 1\) fails its checksum"):
        r.get_many([3, 5, 7])
    assert r.get_many([3, 7], epochs=1).tolist() == [[1.0] * 4] * 2  # the others are whole
    assert r.gather([5])[0, 1] == 9  # gather copies rows as stored, unchecked (documented)


@pytest.mark.parametrize("between, kept", [("gather", 2000), ("keys", 100)])
def test_get_many_is_of_one_generation_when_another_thread_refreshes_across_a_truncate(
        store, between, kept):
    # get_many is several calls of the core, each on the snapshot of its moment. Another thread's
    # refresh() between two of them, after a truncate rewrote the rows in another order, gave
    # other keys' vectors (rows found in one generation, read in the next), or an IndexError
    # where the new generation was shorter than a row found. The refresh is placed there
    # through the Reader's core object: its `between` call first truncates (a real Writer) and
    # refreshes, as another thread scheduled at that instant would.
    keys = np.arange(2000, dtype=np.uint64)
    with embstore.Writer(store, dim=4) as w:
        append(w, [(int(k), 0) for k in keys])
    r = embstore.Reader(store)
    native = r._native
    refreshed = []

    class RefreshedOnce:
        def __getattr__(self, name):
            call = getattr(native, name)
            if name != between or refreshed:
                return call
            def truncated_and_refreshed_first(*args, **kwargs):
                with embstore.Writer(store) as w:
                    w.truncate(rows=0)
                    append(w, [(int(k), 0) for k in keys[:kept][::-1]])  # key k at kept - 1 - k
                refreshed.append(native.refresh())
                return call(*args, **kwargs)
            return truncated_and_refreshed_first

    r._native = RefreshedOnce()
    asked = keys[[3, 50, 99]]
    if kept == 2000:
        want = np.stack([vec(int(k), 0) for k in asked])
        assert r.get_many(asked, epochs=0).tolist() == want.tolist()
    else:
        with pytest.raises(KeyError, match="key 1999 at epoch 0 is not in"):
            r.get_many(np.append(asked, keys[1999]), epochs=0)
    assert refreshed and r.generation == 2 and len(r) == kept


@pytest.mark.parametrize("lookup", ["find", "find_at_epoch", "get", "history", "epoch_rows"])
def test_a_lookup_that_scans_lets_other_threads_run(tmp_path, lookup):
    # A store without a key index answers every lookup by scanning the snapshot's offset index
    # (key 0 of 2M rows: milliseconds). Another Python thread must run meanwhile: the lookup runs
    # with the GIL released. With a switch interval of 100 s no thread gives up the GIL unless it
    # blocks, so the main thread, woken by `started` while the lookup thread goes on into the
    # lookup, gets the GIL before that lookup returns only if the lookup releases it. Holding it,
    # every attempt fails; releasing it, an attempt can still miss if the main thread is not
    # scheduled within the scan's milliseconds (a busy 2-core CI VM can miss 5 in a row), hence
    # attempts until the first that shows it, up to 200 attempts or 20 s.
    import sys
    import threading
    import time

    path = str(tmp_path / "plain")
    rows = 2_000_000
    with embstore.Writer(path, dim=1, key_index=False) as w:
        for first in range(0, rows, 500_000):
            w.append(np.arange(first, first + 500_000, dtype=np.uint64),
                     np.zeros((500_000, 1), np.float32), first // 500_000)
    r = embstore.Reader(path)
    call = {"find": lambda: r.find(0),
            "find_at_epoch": lambda: r.find(0, 0),
            "get": lambda: r.get(0).tolist(),
            "history": lambda: r.history(0),
            "epoch_rows": lambda: r.epoch_rows(0)[-3:].tolist()}[lookup]
    expected = {"find": 0, "find_at_epoch": 0, "get": [0.0], "history": [(0, 0)],
                "epoch_rows": [499_997, 499_998, 499_999]}[lookup]
    ran_during_the_lookup = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    deadline = time.monotonic() + 20
    try:
        while len(ran_during_the_lookup) < 200 and time.monotonic() < deadline:
            started, done = threading.Event(), threading.Event()
            answers = []

            def look_up():
                started.set()
                answers.append(call())
                done.set()

            thread = threading.Thread(target=look_up)
            thread.start()
            started.wait()
            ran_during_the_lookup.append(not done.is_set())
            thread.join()
            assert answers == [expected]
            if ran_during_the_lookup[-1]:
                break
    finally:
        sys.setswitchinterval(interval)
    assert any(ran_during_the_lookup), \
        f"{lookup} held the GIL while it scanned ({len(ran_during_the_lookup)} attempts)"
