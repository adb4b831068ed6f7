"""ShardSet, manifests and merge: lookups against a numpy oracle, zero-copy shard views, the
named errors, and the recorder's per-node directory mode in one process."""
import json
import os
import shutil

import numpy as np
import pytest

import embstore
from conftest import point_pair_slot_at
from embstore import shards as es


def make_shards(tmp_path, sizes, dim=6, seed=0, dtype="float32"):
    """Stores named s0, s1, ... with random keys (few distinct, so duplicates occur), epochs
    and vectors; returns their paths and the concatenated (keys, epochs, vectors) oracle."""
    rng = np.random.default_rng(seed)
    paths, keys, epochs, vectors = [], [], [], []
    for i, n in enumerate(sizes):
        path = str(tmp_path / f"s{i}")
        k = rng.integers(0, 50, n).astype(np.uint64)
        if n:
            k[0] = np.uint64(2**64 - 1)
        e = rng.integers(0, 4, n).astype(np.uint64)
        v = rng.standard_normal((n, dim)).astype(np.float32)
        with embstore.Writer(path, dim=dim, dtype=dtype, metadata={"run": 1}) as w:
            for b in range(0, n, 7):
                w.append(k[b:b + 7], v[b:b + 7], e[b:b + 7])
        paths.append(path)
        keys.append(k), epochs.append(e), vectors.append(v)
    return paths, np.concatenate(keys), np.concatenate(epochs), np.concatenate(vectors)


def oracle_find(keys, epochs, key, epoch=None):
    hit = keys == np.uint64(key)
    if epoch is not None:
        hit &= epochs == np.uint64(epoch)
    rows = np.flatnonzero(hit)
    return int(rows[-1]) if rows.size else None


def oracle_latest(offsets, keys, epochs, key):
    """ShardSet.find(key): of each shard's last row of the key, the one of the highest epoch
    (ties: the later shard)."""
    best = None
    for begin, end in zip(offsets[:-1], offsets[1:]):
        rows = np.flatnonzero(keys[begin:end] == np.uint64(key))
        if rows.size:
            row = int(begin + rows[-1])
            if best is None or epochs[row] >= epochs[best]:
                best = row
    return best


def manifest_for(directory, names):
    shard_list = []
    for name in names:
        info = embstore.info(os.path.join(directory, name))
        shard_list.append({"path": name, "store_id": info["store_id"],
                           "rows": info["committed_rows"], "epochs": []})
    info = embstore.info(os.path.join(directory, names[0]))
    return {"dim": info["dim"], "dtype": info["dtype"], "metadata": info["metadata"],
            "shards": shard_list}


def check_lookups(s, keys, epochs):
    assert len(s) == len(keys)
    assert np.array_equal(s.keys, keys) and np.array_equal(s.epochs, epochs)
    probe = np.array([0, 3, 17, 49, 50, 2**64 - 1], dtype=np.uint64)
    for key in probe:
        assert s.find(int(key)) == oracle_latest(s.offsets, keys, epochs, key)
        expected = [(int(r), int(epochs[r])) for r in np.flatnonzero(keys == key)]
        assert s.history(int(key)) == expected
        for epoch in range(5):
            assert s.find(int(key), epoch) == oracle_find(keys, epochs, key, epoch)
    qk = np.repeat(probe, 5)
    qe = np.tile(np.arange(5, dtype=np.uint64), len(probe))
    want = [oracle_find(keys, epochs, k, e) for k, e in zip(qk, qe)]
    assert s.find_many(qk, qe).tolist() == [-1 if w is None else w for w in want]
    want = [oracle_find(keys, epochs, k, 2) for k in probe]
    assert s.find_many(probe, 2).tolist() == [-1 if w is None else w for w in want]
    want = [oracle_latest(s.offsets, keys, epochs, k) for k in probe]
    assert s.find_many(probe).tolist() == [-1 if w is None else w for w in want]
    for epoch in range(5):
        assert np.array_equal(s.epoch_rows(epoch), np.flatnonzero(epochs == epoch))


def test_shardset_answers_like_the_concatenated_store(tmp_path):
    paths, keys, epochs, vectors = make_shards(tmp_path, [40, 0, 33, 61])
    s = embstore.ShardSet(paths)
    check_lookups(s, keys, epochs)
    assert s.metadata == {"run": 1} and s.dim == 6 and s.dtype == "float32"
    # Per-shard views are the mapping itself: read-only, no copy, same memory as the Reader's.
    view = s.shard_vectors(2)
    assert not view.flags.writeable
    assert np.shares_memory(view, s.shards[2].vectors)
    assert np.array_equal(view, vectors[40:73])
    for bad in (4, -1):  # a negative index took the last shard; past the end, a bare IndexError
        with pytest.raises(IndexError, match=f"shard {bad} outside \\[0, 4\\)"):
            s.shard_vectors(bad)
    inside = s.rows(45, 50)
    assert np.shares_memory(inside, s.shards[2].vectors)
    assert np.array_equal(s.rows(30, 80), vectors[30:80])  # spans shards: a copy
    rows = np.array([100, 0, 72, 40, 39])
    assert np.array_equal(s.gather(rows), vectors[rows])
    key = int(keys[50])
    latest = oracle_latest(s.offsets, keys, epochs, key)
    assert np.array_equal(s.get(key), vectors[latest])
    assert np.shares_memory(s.get(key), s.shards[s.locate(latest)[0]].vectors)
    assert s.locate(73) == (3, 0) and s.locate(39) == (0, 39)
    infos, states = s.info(), s.info(key_stats=False)
    assert [i["committed_rows"] for i in states] == [i["committed_rows"] for i in infos] == \
        [40, 0, 33, 61]
    assert [i["distinct_keys"] for i in states] == [0, 0, 0, 0]
    assert sum(i["distinct_keys"] for i in infos) > 0
    with pytest.raises(KeyError):
        s.get(12345)
    with pytest.raises(IndexError):
        s.locate(len(s))



def test_shardset_lookups_take_an_empty_list_and_refuse_what_a_reader_refuses(tmp_path):
    paths, keys, epochs, _ = make_shards(tmp_path, [5, 7])
    s, r = embstore.ShardSet(paths), embstore.Reader(paths[0])
    for lookup in (s, r):
        assert lookup.find_many([]).tolist() == [] and lookup.find_many([], 0).tolist() == []
        assert lookup.find_many(np.array([], np.uint64), []).tolist() == []
    for bad, message in [([1.5], r"keys\[0\] must be an integer"),
                         (np.array([-1]), r"keys\[0\] is negative \(-1\)"),
                         (np.array([True]), "keys must be integers .*bool")]:
        with pytest.raises(ValueError, match=message):
            s.find_many(bad)
    with pytest.raises(ValueError, match="epochs must be integers .*float64"):
        s.find_many([int(keys[0])], 0.5)


def test_single_key_lookups_take_a_0d_array_or_tensor_and_name_what_they_refuse(tmp_path):
    # ids[0] of a DataLoader batch is a 0-d tensor, and numpy indexing can give 0-d arrays:
    # Reader.find/get/history refused them (append takes one as its epoch), ShardSet.find took
    # them, ShardSet.history did not, and ShardSet.find(-1) spoke of "keys[0]".
    torch = pytest.importorskip("torch")
    paths, keys, epochs, _ = make_shards(tmp_path, [5, 7])
    s, r = embstore.ShardSet(paths), embstore.Reader(paths[0])
    key, epoch = int(keys[1]), int(epochs[1])
    for lookup in (s, r):
        for k, e in [(np.array(key), np.array(epoch)), (torch.tensor(key), torch.tensor(epoch)),
                     (np.uint64(key), np.int32(epoch))]:
            assert lookup.find(k, e) == lookup.find(key, epoch) is not None
            assert lookup.find(k) == lookup.find(key)
            assert lookup.get(k, e).tolist() == lookup.get(key, epoch).tolist()
            assert lookup.history(k) == lookup.history(key)
            assert lookup.epoch_rows(e).tolist() == lookup.epoch_rows(epoch).tolist()
        for bad, message in [(-1, "find: key is -1; it must be in"),
                             (torch.tensor(-1), "find: key is -1; it must be in"),
                             (torch.tensor(1.0), "find: key must be an integer .*float"),
                             (np.array(True), "find: key must be an integer .*bool"),
                             (np.array([key]), "find: key must be an integer .*ndarray")]:
            with pytest.raises(ValueError, match=message):
                lookup.find(bad)
        with pytest.raises(ValueError, match="history: key must be an integer .*float"):
            lookup.history(torch.tensor(2.5))


@pytest.mark.parametrize("change", ["replaced", "truncated"])
def test_a_shard_changed_while_the_set_opens_is_checked_again(tmp_path, monkeypatch, change):
    # The core checked the shards against the manifest with Readers of its own, then the set
    # opened its own Readers unchecked: a shard replaced in between was taken as it was.
    paths, *_ = make_shards(tmp_path, [5, 7])
    es.write_manifest(tmp_path / es.MANIFEST_NAME, manifest_for(tmp_path, ["s0", "s1"]))
    resolve = es._embstore.resolve_shards
    calls = []

    def changed_after_the_first_check(*args):
        calls.append(args)
        answer = resolve(*args)
        if len(calls) == 1:
            if change == "replaced":
                shutil.rmtree(paths[0])
                with embstore.Writer(paths[0], dim=6) as w:
                    w.append([1], np.ones((1, 6), np.float32))
            else:
                with embstore.Writer(paths[0]) as w:
                    w.truncate(2)
        return answer

    monkeypatch.setattr(es._embstore, "resolve_shards", changed_after_the_first_check)
    error, message = {
        "replaced": (embstore.FormatMismatchError, "shard 's0' is store .*, not the store"),
        "truncated": (embstore.CorruptionError, "shard 's0' holds 2 rows, fewer than the 5"),
    }[change]
    with pytest.raises(error, match=message):
        embstore.ShardSet(tmp_path)
    assert len(calls) == 2


def test_shardset_gather_refuses_bools_and_floats_as_reader_gather_does(tmp_path):
    # It converted with np.asarray(rows, dtype=np.int64): 0.7 and True became rows 0 and 1.
    paths, _, _, vectors = make_shards(tmp_path, [5, 7])
    s = embstore.ShardSet(paths)
    # "(-1 for none)", as Reader.gather says: -1 gives a row of zeros there too.
    for rows, message in [([0.7], r"must be integer row numbers \(-1 for none\); got dtype "
                                  "float64"),
                          ([True, 2], r"must be integer row numbers \(-1 for none\); "
                                      r"rows\[0\] is bool"),
                          (np.array([1, 0], bool), r"must be integer row numbers "
                                                   r"\(-1 for none\); got dtype bool"),
                          (np.zeros((2, 2), np.int64), r"must be 1-D .* shape \(2, 2\)")]:
        with pytest.raises(ValueError, match="gather: rows " + message):
            s.gather(rows)
    assert np.array_equal(s.gather([7, 0]), vectors[[7, 0]])


def test_shardset_rows_and_locate_refuse_bools_and_floats_as_reader_rows_does(tmp_path):
    # They compared and searched with the value as given: rows(0.5, 2.5) returned rows [0, 2),
    # rows(True, 2) row 1, locate(1.5) (0, 1), shard_vectors(True) shard 1.
    paths, _, _, vectors = make_shards(tmp_path, [5, 7])
    s, r = embstore.ShardSet(paths), embstore.Reader(paths[0])
    for begin, end, bad in [(0.5, 2.5, "float 0.5"), (True, 2, "bool True"),
                            (0, 2.0, "float 2.0"), (np.float64(1), 3, "float64 1.0"),
                            ("1", 3, "str '1'"), (np.bool_(False), 1, "bool_? False")]:
        message = f"rows: row numbers are integers; got {bad}"
        for rows in (s.rows, r.rows):  # the same refusal as Reader.rows
            with pytest.raises(ValueError, match=message):
                rows(begin, end)
    for row, bad in [(1.5, "float 1.5"), (True, "bool True"), (np.float32(6), "float32 6.0")]:
        with pytest.raises(ValueError, match=f"locate: row numbers are integers; got {bad}"):
            s.locate(row)
    for shard in (True, np.bool_(False)):
        with pytest.raises(ValueError, match="shard_vectors: shard indices are integers; got "
                                             "bool"):
            s.shard_vectors(shard)
    # Integers of any kind still work; one outside the set is refused as before.
    np.testing.assert_array_equal(s.rows(np.int64(3), np.uint64(8)), vectors[3:8])
    assert s.locate(np.uint32(6)) == (1, 1) and s.locate(4) == (0, 4)
    assert np.array_equal(s.shard_vectors(np.int64(1)), vectors[5:])
    with pytest.raises(IndexError, match="row 12 out of range for 12 rows"):
        s.locate(12)
    with pytest.raises(ValueError, match=r"rows \[3, 13\) outside \[0, 12\)"):
        s.rows(3, 13)


def test_shardset_gather_gives_a_row_of_zeros_for_minus_one_as_reader_gather_does(tmp_path):
    # find_many's -1 (a missing key) was refused by gather with "rows must lie in [0, 12)",
    # naming no value; Reader.gather gives a row of zeros for it.
    paths, keys, _, vectors = make_shards(tmp_path, [5, 7])
    s, r = embstore.ShardSet(paths), embstore.Reader(paths[1])
    rows = s.find_many([int(keys[6]), 12345])
    assert rows.tolist() == [s.find(int(keys[6])), -1]
    np.testing.assert_array_equal(s.gather(rows), [vectors[rows[0]], np.zeros(6)])
    np.testing.assert_array_equal(r.gather([-1, 0]), s.gather([-1, 5]))
    for bad in (-2, 12):
        with pytest.raises(IndexError, match=rf"gather: row {bad} is outside the ShardSet's "
                                             "12 rows"):
            s.gather([0, -1, bad])

def test_refresh_takes_in_new_rows_and_renumbers(tmp_path):
    paths, keys, epochs, _ = make_shards(tmp_path, [20, 20])
    s = embstore.ShardSet(paths)
    assert s.find(int(keys[25])) is not None
    with embstore.Writer(paths[0]) as w:
        w.append([7, 7, 999], np.ones((3, 6), np.float32), [0, 1, 9])
    assert len(s) == 40 and s.find(999) is None
    assert s.refresh() == 43
    keys = np.concatenate([keys[:20], np.array([7, 7, 999], np.uint64), keys[20:]])
    epochs = np.concatenate([epochs[:20], np.array([0, 1, 9], np.uint64), epochs[20:]])
    check_lookups(s, keys, epochs)
    assert s.find(999, 9) == 22


def test_a_refresh_that_fails_part_way_leaves_lookups_that_agree_with_the_rows(tmp_path):
    # Shard 0 grows; shard 1 is rolled back and its new data file is gone: its refresh raises,
    # after shard 0's took in the new rows. Global numbers must follow what the Readers hold.
    def make(path, keys, value):
        with embstore.Writer(path, dim=4) as w:
            w.append(np.array(keys, np.uint64), np.full((len(keys), 4), value, np.float32), 0)
    make(tmp_path / "a", [1, 2], 0.0)
    make(tmp_path / "b", [10, 11], 1000.0)
    s = embstore.ShardSet([tmp_path / "a", tmp_path / "b"])
    make(tmp_path / "a", [3, 4], 500.0)
    with embstore.Writer(tmp_path / "b") as w:
        w.truncate(rows=1)
    os.remove(tmp_path / "b" / "rows.2")
    with pytest.raises(FileNotFoundError, match="rows.2"):
        s.refresh()
    assert [len(r) for r in s.shards] == [4, 2]
    assert len(s) == 6 and s.offsets.tolist() == [0, 4, 6]
    assert s.keys.tolist() == [1, 2, 3, 4, 10, 11]
    for key, value in ((3, 500.0), (4, 500.0), (10, 1000.0), (11, 1000.0), (1, 0.0)):
        row = s.find(key)
        assert s.keys[row] == key
        assert (s.gather([row]) == value).all() and (s.get(key) == value).all()
        assert s.locate(row) == ((0, row) if key < 10 else (1, row - 4))
    assert s.epoch_rows(0).tolist() == list(range(6))


def test_manifest_directory_and_pickling(tmp_path):
    import pickle
    _, keys, epochs, _ = make_shards(tmp_path, [10, 15])
    es.write_manifest(tmp_path / es.MANIFEST_NAME, manifest_for(str(tmp_path), ["s0", "s1"]))
    for where in (tmp_path, tmp_path / es.MANIFEST_NAME):
        s = embstore.ShardSet(where)
        check_lookups(s, keys, epochs)
    again = pickle.loads(pickle.dumps(s))
    assert len(again) == 25 and again.paths == s.paths
    again = pickle.loads(pickle.dumps(s))
    # Its repr opens nothing: a shard truncated since makes the first use raise, not the repr
    # (dask logs a failed task's arguments by their repr).
    with embstore.Writer(tmp_path / "s0") as w:
        w.truncate(3)
    assert repr(again) == "<embstore.ShardSet 2 shards rows=25 (not open)>"
    with pytest.raises(embstore.Error, match="generation 2"):
        len(again)
    assert repr(s) == "<embstore.ShardSet 2 shards rows=25 dim=6 dtype=float32>"
    text = json.loads((tmp_path / es.MANIFEST_NAME).read_text())
    assert [shard["path"] for shard in text["shards"]] == ["s0", "s1"]
    assert es.read_manifest(tmp_path / es.MANIFEST_NAME)["shards"][1]["rows"] == 15


def test_a_directory_that_is_not_a_store_raises_not_a_store_error_naming_it(tmp_path):
    # ShardSet (and so embstore.dask.from_store) and merge raised FileNotFoundError for a path
    # that exists, where Reader raises NotAStoreError: `except embstore.NotAStoreError` missed it.
    paths = make_shards(tmp_path, [5])[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for bad, why in [(tmp_path / "empty", "is an empty directory, not an embstore store"),
                     (tmp_path / "file", "is a file, not an embstore store")]:
        for given in (bad, [bad], [paths[0], bad]):
            with pytest.raises(embstore.NotAStoreError, match=f"^{bad}: {why}"):
                embstore.ShardSet(given)
        with pytest.raises(embstore.NotAStoreError, match=f"^{bad}: {why}"):
            embstore.merge(tmp_path / "out", [paths[0], bad])
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no store here"):  # missing: as Reader says
        embstore.ShardSet([paths[0], tmp_path / "missing"])
    # The path the core stopped at is named, not a later one that is no store either (the
    # NotAStoreError of "empty" replaced the error of "missing", before it).
    for call in (embstore.ShardSet,
                 lambda given: embstore.merge(tmp_path / "out", given)):
        with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}: no store here"):
            call([paths[0], tmp_path / "missing", tmp_path / "empty"])
    # A manifest's shard that is not a store keeps the manifest's error, naming both.
    es.write_manifest(tmp_path / es.MANIFEST_NAME, manifest_for(str(tmp_path), ["s0"]))
    shutil.rmtree(paths[0])
    os.mkdir(paths[0])
    with pytest.raises(FileNotFoundError,
                       match=f"{es.MANIFEST_NAME}: shard 's0' is not a store \\(.*s0: not an "):
        embstore.ShardSet(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"rows": -1}, "manifest shards[0]['rows'] is -1; it must be in [0, 2**64)"),
    ({"rows": "5"}, "manifest shards[0]['rows'] must be an integer in [0, 2**64); got str '5'"),
    ({"rows": 5.0}, "manifest shards[0]['rows'] must be an integer"),
    ({"epochs": [0, -1]}, "manifest shards[0]['epochs'][1] is -1"),
    ({"epochs": 3}, "manifest shards[0]['epochs'] must be a list of integers; got int 3"),
    ({"store_id": 7}, "manifest shards[0]['store_id'] must be text; got int 7"),
    ({"row": 5}, "manifest shards[0] has no field 'row'"),
    ({"dim": 2**32 + 6}, "manifest: dim 4294967302 is outside 1..")],
    ids=["negative rows", "rows text", "rows float", "negative epoch", "epochs int",
         "store id int", "misspelt field", "dim past 32 bits"])
def test_write_manifest_names_the_field_of_a_bad_value(tmp_path, change, message):
    make_shards(tmp_path, [5])
    manifest = manifest_for(str(tmp_path), ["s0"])
    if "dim" in change:
        manifest.update(change)
    else:
        manifest["shards"][0].update(change)
    with pytest.raises(ValueError) as error:
        es.write_manifest(tmp_path / es.MANIFEST_NAME, manifest)
    assert message in str(error.value)
    assert not (tmp_path / es.MANIFEST_NAME).exists()


def test_write_manifest_takes_what_read_manifest_leaves_optional(tmp_path):
    # Metadata (a dict stored as JSON, as Writer(metadata=) takes it) and epochs may be omitted.
    make_shards(tmp_path, [5])
    manifest = manifest_for(str(tmp_path), ["s0"])
    del manifest["shards"][0]["epochs"]
    manifest["metadata"] = {"model": "resnet", "run": 17}
    es.write_manifest(tmp_path / es.MANIFEST_NAME, manifest)
    back = es.read_manifest(tmp_path / es.MANIFEST_NAME)
    assert back["shards"][0]["epochs"] == [] and back["shards"][0]["rows"] == 5
    assert json.loads(back["metadata"]) == {"model": "resnet", "run": 17}
    del manifest["metadata"]
    es.write_manifest(tmp_path / es.MANIFEST_NAME, manifest)
    assert es.read_manifest(tmp_path / es.MANIFEST_NAME)["metadata"] == ""
    es.write_manifest(tmp_path / es.MANIFEST_NAME, es.read_manifest(tmp_path / es.MANIFEST_NAME))


def test_bad_manifests_and_mismatched_shards_are_named_errors(tmp_path):
    make_shards(tmp_path, [5])
    good = manifest_for(str(tmp_path), ["s0"])
    for bad in ("../s0", "x/../../s0", "/etc/passwd"):
        manifest = dict(good, shards=[dict(good["shards"][0], path=bad)])
        with pytest.raises(ValueError, match=f"'{bad}'"):
            es.write_manifest(tmp_path / "m.json", manifest)
        text = dict(manifest, embstore_manifest=1)
        (tmp_path / "bad.json").write_text(json.dumps(text))
        with pytest.raises(ValueError, match=f"'{bad}'"):
            embstore.ShardSet(tmp_path / "bad.json")
        with pytest.raises(ValueError, match=f"'{bad}'"):
            embstore.merge(tmp_path / "out", tmp_path / "bad.json")
    missing = dict(good, shards=good["shards"] + [dict(good["shards"][0], path="node-7",
                                                        store_id="7" * 32)])
    es.write_manifest(tmp_path / "missing.json", missing)
    with pytest.raises(FileNotFoundError, match="'node-7' is missing"):
        embstore.ShardSet(tmp_path / "missing.json")
    other_id = dict(good, shards=[dict(good["shards"][0], store_id="f" * 32)])
    es.write_manifest(tmp_path / "id.json", other_id)
    with pytest.raises(embstore.FormatMismatchError, match="f" * 32):
        embstore.ShardSet(tmp_path / "id.json")
    embstore.create(tmp_path / "wide", dim=7)
    embstore.create(tmp_path / "half", dim=6, dtype="float16")
    with pytest.raises(embstore.FormatMismatchError, match="wide"):
        embstore.ShardSet([tmp_path / "s0", tmp_path / "wide"])
    with pytest.raises(embstore.FormatMismatchError, match="half"):
        embstore.merge(tmp_path / "out", [tmp_path / "s0", tmp_path / "half"])
    assert not os.path.exists(tmp_path / "out")
    wrong_dim = dict(good, dim=9)
    es.write_manifest(tmp_path / "dim.json", wrong_dim)
    with pytest.raises(embstore.FormatMismatchError, match="dim 9"):
        embstore.ShardSet(tmp_path / "dim.json")


@pytest.mark.filterwarnings("ignore:.*its epochs go down")  # random epochs
def test_merge_verifies_and_keeps_order(tmp_path):
    paths, keys, epochs, vectors = make_shards(tmp_path, [30, 0, 45], dtype="float16")
    calls = []
    info = embstore.merge(tmp_path / "merged", paths,
                          progress=lambda done, total, shard: calls.append((done, total, shard)))
    assert info["committed_rows"] == info["durable_rows"] == 75
    assert calls[-1][:2] == (75, 75) and {c[2] for c in calls} <= set(paths)
    r = embstore.Reader(tmp_path / "merged")
    assert np.array_equal(r.vectors, vectors.astype(np.float16))
    assert np.array_equal(r.keys, keys) and np.array_equal(r.epochs, epochs)
    assert r.metadata == {"run": 1} and r.verify().ok
    with pytest.raises(FileExistsError):
        embstore.merge(tmp_path / "merged", paths)
    # A damaged row stops the merge with its shard and row named; nothing is left behind.
    with open(os.path.join(paths[2], "rows.1"), "r+b") as f:
        f.seek(11 * 12)
        byte = f.read(1)
        f.seek(11 * 12)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(embstore.CorruptionError, match=r"s2/rows.1: row 11 \(key \d+, epoch \d+\) fails its checksum"):
        embstore.merge(tmp_path / "again", paths)
    assert not os.path.exists(tmp_path / "again")
    # Built aside (.again.partial-*) and removed on the error: nothing of it is left either.
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".again.")]


@pytest.mark.filterwarnings("ignore:.*its epochs go down")  # random epochs
def test_merge_builds_the_store_aside_and_renames_it_into_place(tmp_path):
    paths = make_shards(tmp_path, [20, 30])[0]
    seen = []

    def progress(done, total, shard):
        # While rows are copied, nothing is at the output; a hidden working directory is.
        seen.append((os.path.exists(tmp_path / "merged"),
                     sorted(n for n in os.listdir(tmp_path) if n.startswith(".merged."))))

    embstore.merge(tmp_path / "merged", paths, progress=progress)
    assert seen and all(not exists for exists, _ in seen)
    assert all(len(names) == 1 and names[0].startswith(".merged.partial-") for _, names in seen)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".merged.")]
    with embstore.Reader(tmp_path / "merged") as r:
        assert len(r) == 50 and r.verify().ok


def test_node_name_follows_torchrun_then_the_host(monkeypatch):
    monkeypatch.setenv("GROUP_RANK", "3")
    assert es.node_name() == "node-3"
    monkeypatch.delenv("GROUP_RANK")
    monkeypatch.delenv("NODE_RANK", raising=False)
    import socket
    assert es.node_name() == "host-" + socket.gethostname().replace("/", "_")


def test_recorder_directory_mode_in_one_process(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from embstore.torch import EmbeddingRecorder
    monkeypatch.setenv("GROUP_RANK", "0")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    recorder = EmbeddingRecorder(model, "0", tmp_path / "run", dim=3, per_node=True,
                                 buffer_rows=4, async_queue_mb=0)
    x = torch.randn(10, 4)
    for epoch in range(3):
        with torch.no_grad(), recorder.batch(torch.arange(10), epoch):
            model(x)
        recorder.end_epoch()
        manifest = es.read_manifest(tmp_path / "run" / es.MANIFEST_NAME)
        assert [s["path"] for s in manifest["shards"]] == ["node-0"]
        assert manifest["shards"][0]["rows"] == 10 * (epoch + 1)
        assert manifest["shards"][0]["epochs"] == list(range(epoch + 1))
    recorder.close()
    # A rank that records nothing still describes (and syncs) its node's store.
    idle = EmbeddingRecorder(model, "0", tmp_path / "run", per_node=True, ranks=[])
    os.remove(tmp_path / "run" / es.MANIFEST_NAME)
    idle.end_epoch()
    idle.close()
    assert es.read_manifest(tmp_path / "run" / es.MANIFEST_NAME)["shards"][0]["rows"] == 30
    s = embstore.ShardSet(tmp_path / "run")
    assert len(s) == 30 and s.find(4, 2) == 24
    assert s.metadata == {"module": "0"}
    assert embstore.info(tmp_path / "run" / "node-0")["durable_rows"] == 30


def test_recorder_manifest_after_a_truncate_lists_the_epochs_the_store_holds(tmp_path,
                                                                            monkeypatch):
    # A resume from a checkpoint in the same process: epochs 1 and 2 are dropped, epoch 9
    # follows. The manifest's epochs must be the store's, not those seen before the truncate.
    torch = pytest.importorskip("torch")
    from embstore.torch import EmbeddingRecorder
    monkeypatch.setenv("GROUP_RANK", "0")
    model = torch.nn.Sequential(torch.nn.Linear(4, 6))
    recorder = EmbeddingRecorder(model, "0", tmp_path / "run", dim=6, per_node=True,
                                 async_queue_mb=1)
    manifest = tmp_path / "run" / es.MANIFEST_NAME
    for epoch in range(3):
        with torch.no_grad(), recorder.batch(torch.arange(10), epoch):
            model(torch.randn(10, 4))
        recorder.end_epoch()
    assert [(s["rows"], s["epochs"]) for s in es.read_manifest(manifest)["shards"]] == \
        [(30, [0, 1, 2])]
    recorder.writer().truncate(from_epoch=1)
    with torch.no_grad(), recorder.batch(torch.arange(3), 9):
        model(torch.randn(3, 4))
    recorder.end_epoch()
    assert embstore.Reader(tmp_path / "run" / "node-0").epoch_counts() == {0: 10, 9: 3}
    assert [(s["rows"], s["epochs"]) for s in es.read_manifest(manifest)["shards"]] == \
        [(13, [0, 9])]
    with torch.no_grad(), recorder.batch(torch.arange(2), 10):
        model(torch.randn(2, 4))
    recorder.end_epoch()
    assert [(s["rows"], s["epochs"]) for s in es.read_manifest(manifest)["shards"]] == \
        [(15, [0, 9, 10])]
    recorder.close()


def test_shardset_get_confirms_the_key_as_reader_get_does(tmp_path):
    """A pair slot of a shard's key index damaged to name another key's row (its key and epoch
    still match): ShardSet.get answers with the key's own row, as Reader.get does."""
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    for n, path in enumerate(paths):
        embstore.create(path, dim=4)
        with embstore.Writer(path) as w:
            w.append(np.arange(10), np.arange(40, dtype=np.float32).reshape(10, 4) + 100 * n,
                     epoch=2)
    point_pair_slot_at(paths[1], key=3, row=1)  # (key 3, epoch 2) made to name row 1 (key 1)
    s = embstore.ShardSet(paths)
    assert s.find(3, 2) == 10 + 1  # the slot alone, as documented for find
    np.testing.assert_array_equal(s.get(3, 2), [112, 113, 114, 115])
    np.testing.assert_array_equal(s.get(3), [112, 113, 114, 115])
    with pytest.raises(KeyError):
        s.get(3, 5)


def test_a_pickled_shardset_reopens_at_the_same_snapshots_in_another_process(tmp_path):
    # Another process (spawned: it unpickles) must answer the original's global row numbers
    # with the same rows while shard 0 grows; before, it took new snapshots, so global row 20
    # (shard 1's row 10) named shard 1's row 5 there, without a word.
    import multiprocessing
    import operator
    import pickle
    paths, keys, epochs, vectors = make_shards(tmp_path, [10, 15])
    s = embstore.ShardSet(paths)
    state = pickle.dumps(s)
    late_key = int(keys[3])  # stored again in shard 0 after the pickle
    with embstore.Writer(paths[0]) as w:
        w.append([late_key] * 5, np.full((5, 6), 9.0, np.float32), epoch=0)
    calls = [len, operator.methodcaller("gather", [3, 20, 24]), operator.methodcaller(
        "find", late_key), operator.methodcaller("rows", 8, 12)]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        answers = [pool.apply(call, (s,)) for call in calls]
    assert answers[0] == 25
    np.testing.assert_array_equal(answers[1], vectors[[3, 20, 24]])
    assert answers[2] == oracle_find(keys, epochs, late_key)
    np.testing.assert_array_equal(answers[3], vectors[8:12])
    again = pickle.loads(state)
    assert len(again) == 25 and again.find(late_key) == answers[2]
    assert again.refresh() == 30 and again.locate(again.find(late_key)) == (0, 14)
    again.close()
    # Truncated since: the copy cannot be those rows; it says so, naming the shard.
    with embstore.Writer(paths[1]) as w:
        w.truncate(12)
    with pytest.raises(embstore.Error, match=rf"{paths[1]}: this process sees store .*, "
                                             r"generation 2, 12 rows; the pickled ShardSet"):
        len(pickle.loads(state))  # raised by the first call, not by unpickling
    s.close()


def test_a_shardset_opened_by_relative_paths_holds_and_pickles_absolute_ones(tmp_path,
                                                                             monkeypatch):
    # It kept the paths as given: unpickled by a process with another working directory (a
    # Pool or dask worker that changed it), it opened no store, or another one of that name.
    import pickle
    import subprocess
    import sys
    (tmp_path / "run").mkdir()
    paths, _, _, vectors = make_shards(tmp_path / "run", [5, 7])
    es.write_manifest(tmp_path / "run" / es.MANIFEST_NAME,
                      manifest_for(str(tmp_path / "run"), ["s0", "s1"]))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    for given in (["run/s0", "run/s1"], os.path.join("run", es.MANIFEST_NAME), "run"):
        s = embstore.ShardSet(given)
        assert s.paths == paths, given
        child = subprocess.run(
            [sys.executable, "-c", "import pickle, sys; s = pickle.load(sys.stdin.buffer); "
             "sys.stdout.buffer.write(pickle.dumps((s.paths, s.rows(0, len(s)))))"],
            input=pickle.dumps(s), capture_output=True, cwd=tmp_path / "elsewhere", timeout=120)
        assert child.returncode == 0, child.stderr.decode()
        child_paths, rows = pickle.loads(child.stdout)
        assert child_paths == paths
        np.testing.assert_array_equal(rows, vectors)
        s.close()


def test_a_reader_opened_with_max_rows_sees_only_those_rows(tmp_path):
    with embstore.Writer(tmp_path / "s", dim=2) as w:
        w.append([1, 2, 3], np.ones((3, 2), np.float32))
        w.append([2, 4], np.full((2, 2), 5.0, np.float32))
    r = embstore.Reader(tmp_path / "s", max_rows=3)
    assert len(r) == 3 and r.find(2) == 1 and r.find(4) is None
    assert r.keys.tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        r.rows(0, 4)
    assert r.refresh() == 5 and r.find(2) == 3
    assert len(embstore.Reader(tmp_path / "s", max_rows=99)) == 5
    with pytest.raises(ValueError, match="max_rows is -1"):
        embstore.Reader(tmp_path / "s", max_rows=-1)


def test_a_pickled_shardset_that_cannot_reopen_raises_in_the_parent_not_in_the_worker(tmp_path):
    # Raised while a Pool worker unpickled its task, the error killed the worker and lost the
    # task: map() waited forever. Raised by the first call, it reaches the caller.
    import multiprocessing
    import pickle
    paths, _, _, _ = make_shards(tmp_path, [10, 15])
    s = embstore.ShardSet(paths)
    with embstore.Writer(paths[1]) as w:
        w.truncate(12)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.map_async(len, [s])
        with pytest.raises(embstore.Error, match=rf"{paths[1]}: this process sees store"):
            result.get(timeout=60)
    again = pickle.loads(pickle.dumps(s))
    assert again.paths == paths
    for call in (len, lambda x: x.rows(0, 1), lambda x: x.find(1), lambda x: x.refresh()):
        with pytest.raises(embstore.Error, match="the pickled ShardSet holds a snapshot"):
            call(again)
    again.close()  # nothing was opened: nothing to close, no error
    s.close()


def test_a_closed_shardset_still_pickles_and_its_copy_reopens(tmp_path):
    import pickle
    paths, _, _, vectors = make_shards(tmp_path, [4, 6])
    with embstore.ShardSet(paths) as s:
        pass
    again = pickle.loads(pickle.dumps(s))  # raised ClosedError
    assert len(again) == 10
    np.testing.assert_array_equal(again.rows(0, 10), vectors)
    again.close()


def test_an_unpickled_shardset_opens_its_shards_once_when_threads_race_to_it(tmp_path,
                                                                             monkeypatch):
    import pickle
    import threading
    import time
    paths, _, _, _ = make_shards(tmp_path, [4, 6])
    with embstore.ShardSet(paths) as s:
        state = pickle.dumps(s)
    opened = []

    class SlowReader(embstore.Reader):  # widens the window between the check and the open
        def __init__(self, *args, **kwargs):
            time.sleep(0.05)
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(es, "Reader", SlowReader)
    again = pickle.loads(state)
    lengths = []
    threads = [threading.Thread(target=lambda: lengths.append(len(again))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lengths == [10] * 4
    assert len(opened) == 2 and all(r in again.shards for r in opened)
    again.close()


def test_the_latest_row_of_a_key_is_of_its_highest_epoch_in_the_set_and_once_merged(tmp_path):
    """Per-node shards (a shuffled DistributedSampler): sample 10 went to node 0 in epochs 1 and
    2, to node 1 in epoch 0. find(10), get(10) and find_many([10]) gave node 1's epoch-0 row (the
    highest global row), and so did the merged store and compact(latest_per_key=True) of it."""
    rows = {"node-0": ([10, 11, 12, 10, 11], [1, 1, 1, 2, 3]),
            "node-1": ([10, 13, 11], [0, 0, 3])}
    for name, (keys, epochs) in rows.items():
        with embstore.Writer(tmp_path / name, dim=2) as w:
            values = np.array([[k, e] for k, e in zip(keys, epochs)], np.float32)
            w.append(keys, values, epochs)
    s = embstore.ShardSet([tmp_path / "node-0", tmp_path / "node-1"])
    assert s.find(10) == 3 and s.find(11) == 7 and s.find(12) == 2 and s.find(13) == 6
    assert s.find(14) is None
    assert s.find_many([10, 11, 12, 13, 14]).tolist() == [3, 7, 2, 6, -1]
    assert s.get(10).tolist() == [10, 2] and s.get(11).tolist() == [11, 3]
    assert s.find(10, 0) == 5 and s.get(10, 0).tolist() == [10, 0]
    with pytest.raises(KeyError):
        s.get(14)
    embstore.merge(tmp_path / "merged", [tmp_path / "node-0", tmp_path / "node-1"])
    merged = embstore.Reader(tmp_path / "merged")
    assert list(zip(merged.keys.tolist(), merged.epochs.tolist())) == [
        (10, 0), (13, 0), (10, 1), (11, 1), (12, 1), (10, 2), (11, 3), (11, 3)]
    assert merged.get(10).tolist() == [10, 2] and merged.get(11).tolist() == [11, 3]
    embstore.compact(tmp_path / "merged", tmp_path / "latest", latest_per_key=True)
    latest = embstore.Reader(tmp_path / "latest")
    assert sorted(zip(latest.keys.tolist(), latest.epochs.tolist())) == [
        (10, 2), (11, 3), (12, 1), (13, 0)]


def test_a_run_resumed_from_a_checkpoint_reads_before_its_next_end_epoch(tmp_path, monkeypatch):
    """README's resume: truncate(from_epoch=2) of a node's shard, then epoch 2 again. Until that
    epoch's end_epoch() rewrote the manifest, ShardSet(run_dir), dask.from_store and merge
    raised "holds 80 rows, fewer than the 96 the manifest recorded" (and for good if the
    resumed run died first). The manifest records each shard's generation: a shard truncated
    since is read as it is; a stale copy (fewer rows, same generation) is still refused."""
    torch = pytest.importorskip("torch")
    import embstore.dask
    from embstore.torch import EmbeddingRecorder
    monkeypatch.setenv("GROUP_RANK", "0")
    model = torch.nn.Linear(4, 4)

    def train(recorder, epochs, end=True, batches=4):
        for epoch in epochs:
            for b in range(batches):
                with recorder.batch(torch.arange(b * 8, b * 8 + 8), epoch):
                    model(torch.randn(8, 4))
            if end:
                recorder.end_epoch()

    recorder = EmbeddingRecorder(model, "", tmp_path, dim=4, per_node=True, buffer_rows=8)
    train(recorder, range(3))
    recorder.close()
    entry = es.read_manifest(tmp_path / es.MANIFEST_NAME)["shards"][0]
    assert (entry["rows"], entry["generation"]) == (96, 1)
    with embstore.Writer(tmp_path / "node-0") as w:
        assert w.truncate(from_epoch=2) == 64
    recorder = EmbeddingRecorder(model, "", tmp_path, dim=4, per_node=True, buffer_rows=8)
    train(recorder, [2], end=False, batches=2)
    recorder.flush()
    s = embstore.ShardSet(tmp_path)
    assert len(s) == 80 and s.epochs.tolist() == [0] * 32 + [1] * 32 + [2] * 16
    assert embstore.dask.from_store(tmp_path).vectors.shape == (80, 4)
    assert embstore.merge(tmp_path / "merged", tmp_path)["committed_rows"] == 80
    recorder.end_epoch()
    recorder.close()
    entry = es.read_manifest(tmp_path / es.MANIFEST_NAME)["shards"][0]
    assert (entry["rows"], entry["generation"]) == (80, 2)
    # A stale copy: the manifest's generation, fewer rows.
    shutil.copytree(tmp_path / "node-0", tmp_path / "copy")
    with embstore.Writer(tmp_path / "node-0") as w:
        w.append(np.arange(5), np.ones((5, 4), np.float32), 3)
    manifest = es.read_manifest(tmp_path / es.MANIFEST_NAME)
    manifest["shards"][0]["rows"] = 85
    es.write_manifest(tmp_path / es.MANIFEST_NAME, manifest)
    shutil.rmtree(tmp_path / "node-0")
    os.rename(tmp_path / "copy", tmp_path / "node-0")
    with pytest.raises(embstore.CorruptionError, match="fewer than the 85 the manifest recorded "
                       "in generation 2, the shard's too"):
        embstore.ShardSet(tmp_path)


def test_merge_of_shards_whose_rows_exceed_the_default_segment(tmp_path):
    """A float64 store of dim 2^24 (128 MiB rows, created with 128 MiB segments): merge gave the
    merged store the default 64 MiB segment, smaller than one row, and failed with
    "segment_bytes 67108864 is smaller than one row", an option the caller never gave."""
    dim = 1 << 24
    store = tmp_path / "big"
    with embstore.Writer(store, dim=dim, dtype="float64", segment_mb=128) as w:
        w.append([7], np.full((1, dim), 0.5), 0)
    info = embstore.merge(tmp_path / "merged", [store])
    assert info["committed_rows"] == 1 and info["segment_bytes"] == 128 << 20
    merged = embstore.Reader(tmp_path / "merged")
    assert merged.keys.tolist() == [7] and merged.vectors[0, ::1 << 20].tolist() == [0.5] * 16


def test_merge_warns_naming_a_shard_whose_epochs_go_down(tmp_path):
    # Within a shard the later row is a key's latest (ShardSet.find keeps it), while merge
    # writes rows by epoch: where a shard's epochs go down (a run resumed without a truncate),
    # the merged store's latest row of a key may be another, and merge says so.
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with embstore.Writer(a, dim=2) as w:
        w.append([1], np.full((1, 2), 7, np.float32), epoch=7)
        w.append([1], np.full((1, 2), 3, np.float32), epoch=3)
    with embstore.Writer(b, dim=2) as w:
        w.append([1], np.full((1, 2), 5, np.float32), epoch=5)
    with pytest.warns(UserWarning, match=r"/a: its epochs go down at row 1 \(3 after 7\)"):
        embstore.merge(str(tmp_path / "m"), [a, b])
    assert embstore.Reader(str(tmp_path / "m")).epochs.tolist() == [5, 7, 3]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shards in epoch order: no warning
        embstore.merge(str(tmp_path / "m2"), [b])


def test_refresh_adds_the_shards_a_manifest_lists_since_after_those_held(tmp_path):
    """A live reader (serve, a notebook) opened its ShardSet before every node's first
    end_epoch(): shards the manifest listed later never appeared, however often it refreshed.
    They are added after the shards held, so (shard, row) pairs stay valid; a pickled copy
    follows the manifest too."""
    import pickle
    _, keys, epochs, _ = make_shards(tmp_path, [10, 15, 4])
    manifest = tmp_path / es.MANIFEST_NAME
    es.write_manifest(manifest, manifest_for(str(tmp_path), ["s1"]))
    s = embstore.ShardSet(tmp_path)
    copy = pickle.loads(pickle.dumps(s))
    assert s.refresh() == 15 and len(s.shards) == 1
    # Listed sorted by path, as the recorder's rank 0 does: s0 comes first in the manifest.
    es.write_manifest(manifest, manifest_for(str(tmp_path), ["s0", "s1"]))
    assert s.refresh() == 25
    assert [os.path.basename(p) for p in s.paths] == ["s1", "s0"]
    held = np.concatenate([keys[10:25], keys[:10]])
    assert np.array_equal(s.keys, held)
    assert s.find(int(keys[3]), int(epochs[3])) == \
        oracle_find(held, np.concatenate([epochs[10:25], epochs[:10]]), keys[3], epochs[3])
    assert copy.refresh() == 25 and copy.paths == s.paths
    # A shard listed before it was copied beside the manifest: named, the set stays as it was,
    # and the next refresh adds it.
    os.rename(tmp_path / "s2", tmp_path / "away")
    es.write_manifest(manifest, {**manifest_for(str(tmp_path), ["s0", "s1"]),
                                 "shards": es.read_manifest(manifest)["shards"] + [
                                     {"path": "s2", "store_id": embstore.info(
                                         tmp_path / "away")["store_id"], "rows": 4,
                                      "epochs": []}]})
    with pytest.raises(FileNotFoundError, match="shard 's2' is missing"):
        s.refresh()
    assert len(s) == 25 and len(s.shards) == 2
    os.rename(tmp_path / "away", tmp_path / "s2")
    assert s.refresh() == 29 and len(s.shards) == 3
    assert np.array_equal(s.shard_vectors(2), embstore.Reader(tmp_path / "s2").vectors)
    # A manifest removed since lists nothing new.
    os.remove(manifest)
    assert s.refresh() == 29


@pytest.mark.parametrize("call", ["merge", "salvage"])
def test_ctrl_c_ends_a_merge_or_salvage_without_a_callback_leaving_nothing(tmp_path, call):
    """From a review: without a progress callback, merge and salvage ignored Ctrl-C until they
    had published the whole new store, then raised KeyboardInterrupt, as if they had failed (a
    retry met FileExistsError)."""
    import subprocess
    import sys
    import textwrap
    src = str(tmp_path / "src")
    with embstore.Writer(src, dim=64) as w:
        for first in range(0, 400_000, 50_000):
            w.append(np.arange(first, first + 50_000), np.ones((50_000, 64), np.float32), 0)
    out = tmp_path / "out"
    script = textwrap.dedent("""
        import os, signal, sys, threading, time, embstore, embstore.shards as sh
        call, src, out = sys.argv[1:]
        start = time.monotonic()
        def interrupt():  # once the work has begun: its hidden directory is there
            while not any(".partial-" in n for n in os.listdir(os.path.dirname(out))):
                time.sleep(0.0005)
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=interrupt, daemon=True).start()
        try:
            sh.merge(out, [src]) if call == "merge" else embstore.salvage(src, out)
            print("finished")
        except KeyboardInterrupt:
            print("interrupted", os.path.exists(out))
    """)
    r = subprocess.run([sys.executable, "-c", script, call, src, str(out)], capture_output=True,
                       text=True, timeout=120)
    if r.stdout.strip() == "finished":
        pytest.skip(f"{call} finished before the interrupt")
    assert r.stdout.strip() == "interrupted False", (r.stdout, r.stderr)
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_a_shardset_follows_its_manifest_from_another_directory_and_refuses_a_store_made_again(
        tmp_path, monkeypatch):
    """From a review: the manifest was read again by the relative path the set was opened with
    (after a chdir, or in a pickled copy elsewhere, another run's manifest or none), and a store
    made again at a shard's path was added beside the deleted one's rows."""
    import pickle
    make_shards(tmp_path, [10, 15])
    manifest = tmp_path / es.MANIFEST_NAME
    es.write_manifest(manifest, manifest_for(str(tmp_path), ["s0"]))
    monkeypatch.chdir(tmp_path)
    s = embstore.ShardSet(es.MANIFEST_NAME)
    copy = pickle.dumps(s)
    monkeypatch.chdir("/")
    es.write_manifest(manifest, manifest_for(str(tmp_path), ["s0", "s1"]))
    assert s.refresh() == 25
    assert pickle.loads(copy).refresh() == 25
    # A run started over: s0 deleted and made again, and listed. (follow_manifest(): a
    # refresh() may first find the held s0's Reader deleted, FileNotFoundError.)
    shutil.rmtree(tmp_path / "s0")
    with embstore.Writer(tmp_path / "s0", dim=6, metadata={"run": 1}) as w:
        w.append([1], np.ones((1, 6), np.float32), 0)
    es.write_manifest(manifest, manifest_for(str(tmp_path), ["s0", "s1"]))
    with pytest.raises(embstore.FormatMismatchError, match="s0 is now listed as store"):
        s.follow_manifest()
    assert len(s) == 25 and len(s.shards) == 2


def test_follow_manifest_adds_the_shards_before_one_not_copied_yet_and_it_later(tmp_path):
    """From a review: follow_manifest() (serve's follower, refresh()) opened every shard the
    manifest listed, those held too, before adding any: one listed before it was copied beside
    the manifest kept the set from ever adding the others. C++ ShardSet::refresh adds them and
    then raises for it, keeping what it added; so does follow_manifest now."""
    make_shards(tmp_path, [10, 7, 5])  # s0 (held), s1 (new), s2 (new, not copied yet)
    manifest = tmp_path / es.MANIFEST_NAME
    es.write_manifest(manifest, manifest_for(str(tmp_path), ["s0"]))
    s = embstore.ShardSet(tmp_path)
    listed = manifest_for(str(tmp_path), ["s0", "s1", "s2"])
    os.rename(tmp_path / "s2", tmp_path / "away")
    es.write_manifest(manifest, listed)

    def found_in(shard, path):
        reader = embstore.Reader(path)
        for row in range(len(reader)):
            key, epoch = int(reader.keys[row]), int(reader.epochs[row])
            assert s.find(key, epoch) == s.offsets[shard] + reader.find(key, epoch)
        assert np.array_equal(s.shard_vectors(shard), reader.vectors)

    for call in (s.follow_manifest, s.follow_manifest, s.refresh):
        with pytest.raises(FileNotFoundError, match=f"{es.MANIFEST_NAME}: shard 's2' is missing"):
            call()
        assert [os.path.basename(p) for p in s.paths] == ["s0", "s1"]
        assert len(s) == 17 and s.offsets.tolist() == [0, 10, 17]
        found_in(1, tmp_path / "s1")
    # Copied now: the same manifest (its stamp unchanged) is read again, and s2 added.
    os.rename(tmp_path / "away", tmp_path / "s2")
    assert s.follow_manifest() == 1
    assert [os.path.basename(p) for p in s.paths] == ["s0", "s1", "s2"] and len(s) == 22
    found_in(2, tmp_path / "s2")
    assert s.follow_manifest() == 0 and s.refresh() == 22
    # And when the manifest is written again meanwhile (its stamp changes).
    (tmp_path / "more").mkdir()
    make_shards(tmp_path / "more", [3], seed=1)
    os.rename(tmp_path / "more" / "s0", tmp_path / "s3")
    es.write_manifest(manifest, manifest_for(str(tmp_path), ["s0", "s1", "s2", "s3"]))
    assert s.follow_manifest() == 1 and len(s) == 25
    found_in(3, tmp_path / "s3")


def test_a_shard_held_that_would_fail_its_entry_now_does_not_block_a_new_one(tmp_path):
    """From a review: follow_manifest() checked the shards held against the manifest again, so
    one moved away or whose entry now records more rows than the set's copy holds kept every new
    shard out. The shards held are not opened again (C++ ShardSet::refresh skips them by store
    id): they are refreshed by refresh(), not re-admitted."""
    make_shards(tmp_path, [10, 15, 4])
    manifest = tmp_path / es.MANIFEST_NAME
    es.write_manifest(manifest, manifest_for(str(tmp_path), ["s0", "s1"]))
    s = embstore.ShardSet(tmp_path)
    listed = manifest_for(str(tmp_path), ["s0", "s1", "s2"])
    listed["shards"][0]["rows"] = 1000  # more than s0 holds: a stale copy, were it new
    os.rename(tmp_path / "s1", tmp_path / "away")  # held, now missing at its path
    es.write_manifest(manifest, listed)
    assert s.follow_manifest() == 1
    assert [os.path.basename(p) for p in s.paths] == ["s0", "s1", "s2"] and len(s) == 29
    s2 = embstore.Reader(tmp_path / "s2")
    assert np.array_equal(s.shard_vectors(2), s2.vectors)
    assert s.find(int(s2.keys[3]), int(s2.epochs[3])) == 25 + s2.find(int(s2.keys[3]),
                                                                       int(s2.epochs[3]))


def test_follow_manifest_checks_each_new_shard_as_the_constructor_does(tmp_path):
    """Each new entry gets the core's checks (ShardSet::open's), in the manifest's order, the
    shards before a failing one staying added; a manifest now of another dim is refused whole."""
    make_shards(tmp_path, [10, 7, 5, 3])
    manifest = tmp_path / es.MANIFEST_NAME
    es.write_manifest(manifest, manifest_for(str(tmp_path), ["s0"]))
    s = embstore.ShardSet(tmp_path)
    listed = manifest_for(str(tmp_path), ["s0", "s1", "s2", "s3"])
    listed["shards"][2]["store_id"] = "f" * 32
    es.write_manifest(manifest, listed)
    with pytest.raises(embstore.FormatMismatchError,
                       match=f"shard 's2' is store .*, not the store {'f' * 32}"):
        s.follow_manifest()
    assert [os.path.basename(p) for p in s.paths] == ["s0", "s1"] and len(s) == 17
    listed = manifest_for(str(tmp_path), ["s0", "s1", "s2", "s3"])
    listed["shards"][3]["rows"] = 4  # s3 holds 3
    es.write_manifest(manifest, listed)
    with pytest.raises(embstore.CorruptionError,
                       match="shard 's3' holds 3 rows, fewer than the 4 the manifest recorded"):
        s.follow_manifest()
    assert [os.path.basename(p) for p in s.paths] == ["s0", "s1", "s2"] and len(s) == 22
    es.write_manifest(manifest, dict(manifest_for(str(tmp_path), ["s0", "s1", "s2", "s3"]),
                                     dim=9))
    with pytest.raises(embstore.FormatMismatchError, match="the manifest now says dim 9"):
        s.follow_manifest()
    assert len(s.shards) == 3
    es.write_manifest(manifest, manifest_for(str(tmp_path), ["s0", "s1", "s2", "s3"]))
    assert s.follow_manifest() == 1 and len(s) == 25


def test_a_manifest_without_metadata_gives_the_shards_own_to_the_set_and_the_merge(tmp_path):
    """write_manifest without metadata wrote "metadata": "", which a merge gave the merged store:
    the shards' metadata was dropped without a word."""
    for name in ("s0", "s1"):
        with embstore.Writer(tmp_path / name, dim=4, metadata={"model": "resnet", "lr": 0.1}) as w:
            w.append([1, 2], np.ones((2, 4), np.float32), epoch=0)
    manifest = manifest_for(str(tmp_path), ["s0", "s1"])
    del manifest["metadata"]
    es.write_manifest(tmp_path / es.MANIFEST_NAME, manifest)
    assert es.read_manifest(tmp_path / es.MANIFEST_NAME)["metadata"] == ""
    with embstore.ShardSet(tmp_path) as s:
        assert s.metadata == {"model": "resnet", "lr": 0.1}
    embstore.merge(tmp_path / "merged", tmp_path)
    assert embstore.Reader(tmp_path / "merged").metadata == {"model": "resnet", "lr": 0.1}
    # Shards that disagree are refused, as without a manifest; a manifest's metadata settles it,
    # with a warning naming each shard whose own it replaces.
    with embstore.Writer(tmp_path / "s2", dim=4, metadata={"model": "vit"}):
        pass
    manifest = manifest_for(str(tmp_path), ["s0", "s2"])
    del manifest["metadata"]
    es.write_manifest(tmp_path / "m.json", manifest)
    with pytest.raises(embstore.FormatMismatchError, match="have different metadata"):
        embstore.merge(tmp_path / "merged2", tmp_path / "m.json")
    assert not (tmp_path / "merged2").exists()
    es.write_manifest(tmp_path / "m.json", dict(manifest, metadata={"model": "vit"}))
    with pytest.warns(UserWarning) as caught:
        embstore.merge(tmp_path / "merged2", tmp_path / "m.json")
    assert [str(w.message).split(":")[0] for w in caught] == [str(tmp_path / "s0")]
    assert "is not the manifest's" in str(caught[0].message)
    assert caught[0].filename == __file__
    assert embstore.Reader(tmp_path / "merged2").metadata == {"model": "vit"}


def test_a_manifest_field_given_twice_is_refused_naming_it(tmp_path):
    """The parser kept the last of two "shards" lists: a merge took one node's shard of two."""
    make_shards(tmp_path, [5, 7])
    good = manifest_for(str(tmp_path), ["s0", "s1"])
    first, second = (json.dumps([shard]) for shard in good["shards"])
    (tmp_path / "m.json").write_text(
        '{"embstore_manifest": 1, "dim": 6, "dtype": "float32", '
        f'"shards": {first}, "shards": {second}}}')
    for call in (es.read_manifest, embstore.ShardSet,
                 lambda path: embstore.merge(tmp_path / "out", path)):
        with pytest.raises(embstore.CorruptionError, match="field 'shards' is given twice"):
            call(tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_write_manifest_refuses_what_shardset_refuses_and_epochs_out_of_order(tmp_path):
    make_shards(tmp_path, [5, 7])
    good = manifest_for(str(tmp_path), ["s0", "s1"])
    path = tmp_path / es.MANIFEST_NAME
    with pytest.raises(ValueError, match="the manifest lists no shards"):
        es.write_manifest(path, dict(good, shards=[]))
    with pytest.raises(ValueError, match=r"shards\[2\] lists store .* again \(shards\[0\] does\)"):
        es.write_manifest(path, dict(good, shards=good["shards"] + good["shards"][:1]))
    with pytest.raises(ValueError, match=r"path './s0' names the shard of shards\[0\]"):
        es.write_manifest(path, dict(good, shards=[good["shards"][0],
                                                   dict(good["shards"][1], path="./s0")]))
    with pytest.raises(ValueError, match=r"shards\[0\]: epochs\[1\] is 1 after 3"):
        es.write_manifest(path, dict(good, shards=[dict(good["shards"][0], epochs=[3, 1])]))
    assert not path.exists()


def test_a_manifest_with_other_paths_or_an_empty_path_is_refused(tmp_path):
    make_shards(tmp_path, [5, 7])
    es.write_manifest(tmp_path / es.MANIFEST_NAME, manifest_for(str(tmp_path), ["s1"]))
    with pytest.raises(ValueError, match="a manifest must be the only input"):
        embstore.ShardSet([tmp_path / "s0", tmp_path / es.MANIFEST_NAME])
    with pytest.raises(ValueError, match="path 1 of 2 is empty"):
        embstore.merge(tmp_path / "out", [tmp_path / "s0", ""])
    assert not (tmp_path / "out").exists()
