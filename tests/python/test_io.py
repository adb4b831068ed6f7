"""embstore.io: export_npy / export_hdf5 / import_npy / compact, the Python side of the CLI's
export, import and compact (same files, same rules)."""

import errno
import hashlib
import json
import re
import os
import warnings

import numpy as np
import pytest

import embstore
from embstore.io import EXPORT_FORMAT

DTYPES = ["float32", "float16", "bfloat16", "int8", "uint8", "float64"]
NUMPY = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int8": "|i1", "uint8": "|u1",
         "float64": "<f8"}


def make(path, dtype="float16", dim=4, epochs=3, rows=10):
    embstore.create(path, dim=dim, dtype=dtype, segment_mb=1 / 16, metadata={"run": "t"})
    rng = np.random.default_rng(5)
    with embstore.Writer(path) as w:
        for e in range(epochs):
            if dtype in ("int8", "uint8"):
                v = rng.integers(0, 100, size=(rows, dim)).astype(dtype)
            elif dtype == "float64":
                v = rng.standard_normal((rows, dim))
            else:
                v = rng.standard_normal((rows, dim)).astype(np.float32)
            w.append(keys=np.arange(rows) + e, vectors=v, epoch=e)
    return str(path)


def arrays(path):
    r = embstore.Reader(path)
    return np.array(r.vectors), np.array(r.keys), np.array(r.epochs)


def hashes(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def latest_rows(keys):
    last = {}
    for row, key in enumerate(keys):
        last[key] = row
    return sorted(last.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_export_npy_writes_mmap_loadable_files_and_a_sidecar(tmp_path, dtype):
    src = make(tmp_path / "s", dtype)
    out = tmp_path / "out"
    assert embstore.export_npy(src, out) == 30
    v, k, e = arrays(src)
    vectors = np.load(out / "vectors.npy", mmap_mode="r")
    assert vectors.dtype == np.dtype(NUMPY[dtype]) and np.array_equal(vectors, v)
    assert np.array_equal(np.load(out / "keys.npy", mmap_mode="r"), k)
    assert np.array_equal(np.load(out / "epochs.npy", mmap_mode="r"), e)
    side = json.loads((out / "embstore.json").read_text())
    assert side["embstore_format"] == EXPORT_FORMAT and side["dtype"] == dtype
    assert side["metadata"] == embstore.Reader(src).metadata_text
    assert side["store_id"] == embstore.info(src)["store_id"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_hdf5_has_datasets_and_attributes(tmp_path, dtype):
    h5py = pytest.importorskip("h5py")
    src = make(tmp_path / "s", dtype)
    assert embstore.export_hdf5(src, tmp_path / "x.h5", epochs=[1]) == 10
    v, k, e = arrays(src)
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert f.attrs["dtype"] == dtype and int(f.attrs["dim"]) == 4
        assert f.attrs["store_id"] == embstore.info(src)["store_id"]
        assert np.array_equal(f["vectors"][:], v[e == 1])
        assert np.array_equal(f["keys"][:], k[e == 1]) and (f["epochs"][:] == 1).all()


def test_export_selections(tmp_path):
    src = make(tmp_path / "s")
    v, k, e = arrays(src)
    assert embstore.export_npy(src, tmp_path / "a", latest=True) == 12
    assert np.array_equal(np.load(tmp_path / "a" / "vectors.npy"), v[latest_rows(k)])
    assert embstore.export_npy(src, tmp_path / "b", begin=3, end=17) == 14
    assert np.array_equal(np.load(tmp_path / "b" / "keys.npy"), k[3:17])
    assert embstore.export_npy(embstore.Reader(src), tmp_path / "c", epochs=[0, 2]) == 20
    with pytest.raises(KeyError, match="epoch 5"):
        embstore.export_npy(src, tmp_path / "d", epochs=[5])
    with pytest.raises(FileExistsError):
        embstore.export_npy(src, tmp_path / "a")
    with pytest.raises(ValueError, match="past the end"):
        embstore.export_npy(src, tmp_path / "e", end=31)
    assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "e")
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


@pytest.mark.parametrize("dtype", DTYPES)
def test_import_of_an_export_gives_identical_rows_keys_epochs(tmp_path, dtype):
    src = make(tmp_path / "s", dtype)
    embstore.export_npy(src, tmp_path / "out")
    assert embstore.import_npy(tmp_path / "copy", tmp_path / "out") == 30
    for a, b in zip(arrays(src), arrays(tmp_path / "copy")):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    copy = embstore.Reader(tmp_path / "copy")
    assert copy.dtype == dtype and copy.metadata_text == embstore.Reader(src).metadata_text


def test_import_arrays_with_keys_epochs_and_conversion(tmp_path):
    data = np.random.default_rng(9).standard_normal((40, 8)).astype(np.float32)
    store = tmp_path / "s"
    n = embstore.import_npy(store, data, keys=np.arange(100, 140), epochs=np.repeat([0, 1], 20),
                            dtype="bfloat16")
    assert n == 40
    r = embstore.Reader(store)
    assert r.dtype == "bfloat16" and np.array_equal(r.keys, np.arange(100, 140))
    back = (np.array(r.vectors).astype(np.uint32) << 16).view(np.float32)
    assert np.allclose(back, data, rtol=1 / 128)
    np.save(tmp_path / "more.npy", data[:5])
    assert embstore.import_npy(store, tmp_path / "more.npy", epoch=3) == 5
    r = embstore.Reader(store)
    assert len(r) == 45 and (np.array(r.epochs[40:]) == 3).all()
    assert np.array_equal(r.keys[40:], np.arange(5))


def test_import_bad_input(tmp_path):
    src = make(tmp_path / "s")
    with pytest.raises(ValueError, match="keys has shape"):
        embstore.import_npy(tmp_path / "n", np.zeros((3, 4), np.float32), keys=[1, 2])
    with pytest.raises(ValueError, match="negative"):
        embstore.import_npy(tmp_path / "n", np.zeros((3, 4), np.float32), keys=[1, -2, 3])
    with pytest.raises(ValueError, match="2-D"):
        embstore.import_npy(tmp_path / "n", np.zeros(3, np.float32))
    with pytest.raises(embstore.FormatMismatchError, match="dim 4"):
        embstore.import_npy(src, np.zeros((3, 5), np.float32))
    # Refused when the new store is created: no hidden partial directory is left behind.
    with pytest.raises(ValueError, match="dim 0 is outside"):
        embstore.import_npy(tmp_path / "n", np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match="metadata is 100000 bytes"):
        embstore.import_npy(tmp_path / "n", np.zeros((3, 2), np.float32), metadata="x" * 100000)
    assert sorted(os.listdir(tmp_path)) == ["s"] and len(embstore.Reader(src)) == 30


def test_import_into_an_existing_store_of_another_dtype_than_asked_is_refused(tmp_path):
    # dtype= was ignored there: float16 was asked for, float32 rows were stored.
    store = str(tmp_path / "f32")
    embstore.create(store, dim=2, dtype="float32")
    rows = np.array([[1.0, 2.0], [3.0, 4.0]])
    for asked in ("float16", np.float64, "int8"):
        with pytest.raises(embstore.FormatMismatchError,
                           match=f"{store} holds float32 rows but dtype='{np.dtype(asked).name}' "
                                 "was asked for"):
            embstore.import_npy(store, rows, dtype=asked)
    assert len(embstore.Reader(store)) == 0
    assert embstore.import_npy(store, rows, dtype="float32") == 2  # the store's: as asked
    assert embstore.import_npy(store, rows.astype(np.float16)) == 2  # none asked: converted
    assert embstore.Reader(store).vectors.tolist() == rows.tolist() * 2


def test_signalling_nans_are_converted_to_nans_without_numpy_warnings(tmp_path):
    # NaNs whose payload sits in low mantissa bits: numpy's casts raise its "invalid" flag for
    # them, and import_npy, compact and append printed "RuntimeWarning: invalid value
    # encountered in cast" from embstore's own lines. The values stored were and are NaNs.
    sources = {
        "float64": np.array([[0x7FF0000000000001, 0xFFF0000000000001, 0x7FF0000000100000,
                              0x7FF8000000000000]], np.uint64).view(np.float64),
        "float32": np.array([[0x7F800001, 0xFF800001, 0x7F800100, 0x7FC00000]],
                            np.uint32).view(np.float32),
        "float16": np.array([[0x7C01, 0xFC01, 0x7C10, 0x7E00]], np.uint16).view(np.float16),
    }

    def all_nan(path):
        r = embstore.Reader(path)
        v = np.asarray(r.vectors)
        if r.dtype == "bfloat16":  # bit patterns: a NaN has every exponent bit and a mantissa
            bits = v.view(np.uint16)
            return bool(((bits & 0x7F80) == 0x7F80).all() and ((bits & 0x7F) != 0).all())
        return bool(np.isnan(v).all())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for source, rows in sources.items():
            embstore.import_npy(tmp_path / f"src-{source}", rows)
            for target in ("float64", "float32", "float16", "bfloat16"):
                imported = tmp_path / f"i-{source}-{target}"
                compacted = tmp_path / f"c-{source}-{target}"
                embstore.import_npy(imported, rows, dtype=target)
                embstore.compact(tmp_path / f"src-{source}", compacted, dtype=target)
                assert all_nan(imported) and all_nan(compacted), (source, target)
        for target in ("float16", "bfloat16"):
            with embstore.Writer(tmp_path / f"w-{target}", dim=4, dtype=target) as w:
                w.append([0], sources["float32"])
            assert all_nan(tmp_path / f"w-{target}"), target


def test_an_import_refused_by_an_existing_store_leaves_its_files_as_they_were(tmp_path):
    # Refused for its dim, dtype or metadata, it had opened a Writer first: the store (one no
    # Writer had opened yet) got a key index file and a rewritten header. As the CLI's import.
    store = str(tmp_path / "s")
    embstore.create(store, dim=2, dtype="float32", metadata={"run": 1})
    before = hashes(store)
    rows = np.ones((5000, 2), np.float32)
    for kwargs, says in [(dict(source=np.ones((5000, 3), np.float32)), "has dim 2"),
                         (dict(source=rows.astype(np.float64)), "holds float32 rows but"),
                         (dict(source=rows, dtype="float16"), "dtype='float16' was asked for"),
                         (dict(source=rows, metadata={"run": 2}), "other metadata")]:
        with pytest.raises(embstore.FormatMismatchError, match=says):
            embstore.import_npy(store, **kwargs)
        assert hashes(store) == before, kwargs
    # Refused for a value that would become infinite in the store's dtype: checked before the
    # Writer opens the store too (it was checked after).
    half = str(tmp_path / "half")
    embstore.create(half, dim=2, dtype="float16")
    before = hashes(half)
    big = np.ones((5000, 2), np.float32)
    big[4000, 1] = 1e6
    with pytest.raises(ValueError, match="row 4000"):
        embstore.import_npy(half, big, dtype="float16")
    assert hashes(half) == before


def test_import_into_an_empty_directory_makes_the_store_there(tmp_path, monkeypatch):
    # Refused with NotAStoreError telling the user to give "a new path or an empty directory",
    # which it was; create() and Writer(dim=) take an empty directory.
    import embstore.io as eio
    store = tmp_path / "empty"
    store.mkdir()
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert embstore.import_npy(store, rows, metadata={"model": "a"}, epoch=2) == 3
    r = embstore.Reader(store)
    assert r.vectors.tolist() == rows.tolist() and r.keys.tolist() == [0, 1, 2]
    assert r.epochs.tolist() == [2, 2, 2] and r.metadata == {"model": "a"}
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # no hidden directory beside it
    # Refused after rows were appended (chunks of one row): the directory is left empty.
    monkeypatch.setattr(eio, "_CHUNK_BYTES", 2 * 8)
    (tmp_path / "again").mkdir()
    bad = np.ones((3, 2))
    bad[2, 1] = 1e6  # beyond float16
    with pytest.raises(ValueError, match="row 2, column 1: .* beyond float16's range"):
        embstore.import_npy(tmp_path / "again", bad, dtype="float16")
    assert os.listdir(tmp_path / "again") == []


def test_import_into_an_existing_store_refuses_other_metadata_as_the_cli_does(tmp_path):
    # metadata= for an existing store was ignored and the rows appended; `embstore import
    # --metadata` refuses it (exit 15) and appends nothing. The same metadata is taken.
    store = str(tmp_path / "s")
    embstore.create(store, dim=2, metadata={"model": "a", "run": 1})
    rows = np.ones((3, 2), np.float32)
    for other in ({"model": "b", "run": 1}, '{"model": "a"}', {"model": "a", "run": True}, ""):
        with pytest.raises(embstore.FormatMismatchError,
                           match=f"^{store} exists, with other metadata than metadata= gives; "
                                 "metadata is for a new store"):
            embstore.import_npy(store, rows, metadata=other)
    assert len(embstore.Reader(store)) == 0
    for same in ({"run": 1, "model": "a"}, '{"model":"a",  "run":1}'):  # as text or as JSON
        assert embstore.import_npy(store, rows, metadata=same) == 3
    assert embstore.import_npy(store, rows) == 3  # none given: the store's
    r = embstore.Reader(store)
    assert len(r) == 9 and r.metadata == {"model": "a", "run": 1}


def test_compact_latest_epochs_dtype_and_the_source_untouched(tmp_path):
    src = make(tmp_path / "s")
    before = hashes(src)
    v, k, e = arrays(src)
    assert embstore.compact(src, tmp_path / "latest", latest_per_key=True) == 12
    lv, lk, le = arrays(tmp_path / "latest")
    rows = latest_rows(k)
    assert np.array_equal(lv, v[rows]) and np.array_equal(lk, k[rows]) and np.array_equal(le, e[rows])
    assert embstore.compact(src, tmp_path / "f32", epochs=[2], dtype="float32") == 10
    r = embstore.Reader(tmp_path / "f32")
    assert r.dtype == "float32" and np.array_equal(r.vectors, v[e == 2].astype(np.float32))
    assert r.verify().ok and r.metadata_text == embstore.Reader(src).metadata_text
    with pytest.raises(FileExistsError):
        embstore.compact(src, tmp_path / "f32")
    with pytest.raises(KeyError, match="epoch 4"):
        embstore.compact(src, tmp_path / "x", epochs=[4])
    with pytest.raises(embstore.FormatMismatchError,
                       match=r"/i: holds int8 rows but dtype='float16' was asked for .*x$"):
        embstore.compact(make(tmp_path / "i", "int8"), tmp_path / "x", dtype="float16")
    assert not os.path.exists(tmp_path / "x")
    assert hashes(src) == before


def test_import_and_compact_build_the_key_index_once_for_their_rows(tmp_path):
    """As the CLI's: the rows the new store will hold are known, so its key index is built for
    them (keys.1), not grown on the way (keys.2 and later before); an import into an existing
    store grows straight to tables for the rows it brings."""
    rng = np.random.default_rng(4)
    n = 30000
    keys = rng.choice(2**40, size=n, replace=False).astype(np.uint64)
    vectors = rng.standard_normal((n, 8)).astype(np.float32)

    def key_files(store):
        with embstore.Reader(store) as r:
            assert r.find(int(keys[-1])) == len(r) - 1
            assert f"{len(r)} rows indexed" in r.info()["key_index"]
        return sorted(f for f in os.listdir(store) if f.startswith("keys."))

    embstore.io.import_npy(tmp_path / "imported", vectors, keys=keys)
    assert key_files(tmp_path / "imported") == ["keys.1"]
    assert embstore.compact(tmp_path / "imported", tmp_path / "compacted") == n
    assert key_files(tmp_path / "compacted") == ["keys.1"]
    with embstore.Writer(tmp_path / "existing", dim=8) as w:
        w.append([2**41], np.zeros((1, 8), np.float32))
    embstore.io.import_npy(tmp_path / "existing", vectors, keys=keys)
    assert key_files(tmp_path / "existing") == ["keys.2"]


def test_a_corrupt_row_stops_export_and_compact_naming_it(tmp_path):
    src = make(tmp_path / "s")
    with open(os.path.join(src, "rows.1"), "r+b") as f:
        f.seek(12 * 8 + 1)
        f.write(b"\x7f")
    with pytest.raises(embstore.CorruptionError, match=r"row 12 \(key 3, epoch 1\)"):
        embstore.export_npy(src, tmp_path / "o")
    with pytest.raises(embstore.CorruptionError, match="row 12"):
        embstore.compact(src, tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_a_selection_refuses_bad_rows_anywhere_in_its_range_and_a_copy_names_its_own(tmp_path):
    # A row that fails its checksum may have a damaged key or epoch: a selection by epoch or
    # latest per key refuses any in its range (from a review: one flipped bit took an older
    # version as a key's latest, or left a row out, unseen). A plain copy checks every row it
    # copies itself, not against verify()'s list of the first 1000.
    src = str(tmp_path / "s")
    n = 3000
    with embstore.Writer(src, dim=2, dtype="float32") as w:
        # key row // 2 at epoch row % 2: epoch 1 rows are every key's latest.
        w.append(np.arange(n) // 2, np.ones((n, 2), np.float32), epoch=np.arange(n) % 2)
    with open(os.path.join(src, "rows.1"), "r+b") as f:
        for row in [*range(0, 2400, 2), 2501]:  # 1200 bad epoch-0 rows, one bad epoch-1 row
            f.seek(row * 8)
            f.write(np.float32(7).tobytes())
    assert embstore.Reader(src).verify().bad_row_count == 1201
    chosen_by = r"row 0 fails its checksum, so its key and epoch cannot be trusted to choose"
    with pytest.raises(embstore.CorruptionError, match=chosen_by + " rows by epoch"):
        embstore.export_npy(src, tmp_path / "a", epochs=[1])
    with pytest.raises(embstore.CorruptionError, match=chosen_by + " rows by latest per key"):
        embstore.export_npy(src, tmp_path / "b", latest=True)
    with pytest.raises(embstore.CorruptionError, match=chosen_by):
        embstore.compact(src, tmp_path / "c", epochs=[1])
    with pytest.raises(embstore.CorruptionError, match=chosen_by):
        embstore.compact(src, tmp_path / "d", latest_per_key=True)
    # A copy of rows [2401, 3000) meets row 2501 after 1000 and more bad rows before the range.
    with pytest.raises(embstore.CorruptionError, match=r"row 2501 \(key 1250, epoch 1\)"):
        embstore.export_npy(src, tmp_path / "e", begin=2401)
    assert sorted(os.listdir(tmp_path)) == ["s"]
    # A range without bad rows is selected from and copied exactly.
    assert embstore.export_npy(src, tmp_path / "f", epochs=[1], begin=2400, end=2500) == 50
    assert np.array_equal(np.load(tmp_path / "f" / "keys.npy"), np.arange(1200, 1250))
    assert (np.load(tmp_path / "f" / "vectors.npy") == 1).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(keys=np.array([1.5, 2.7, -3.2])), "keys must be integers .*float64, first value 1.5"),
    (dict(keys=np.array([True, False, True])), "keys must be integers .*bool"),
    (dict(keys=np.array([2**64 - 1, 1, 2], dtype=object)), "keys must be integers .*object"),
    (dict(keys=[1, 2.5, 3]), r"keys\[1\] must be an integer .*float 2.5"),
    (dict(keys=np.array([4, 5, -6])), r"keys\[2\] is negative \(-6\)"),
    (dict(epochs=np.array([0.9, 1.9, 2.5])), "epochs must be integers .*float64"),
    (dict(epochs=[0, True, 1]), r"epochs\[1\] must be an integer .*bool True"),
    (dict(epoch=1.7), "epoch must be an integer .*float 1.7"),
    (dict(epoch=-1), "epoch is -1"),
    (dict(epoch=True), "epoch must be an integer .*bool True"),
    # One was ignored without a word: epoch=9 with epochs given stored the epochs' values.
    (dict(epochs=[0, 1, 2], epoch=9), "give epochs .* or epoch .*, not both; got epoch=9"),
    (dict(epochs=np.array([0, 1, 2]), epoch=0), "not both; got epoch=0"),
])
def test_import_refuses_the_keys_and_epochs_append_refuses(tmp_path, kwargs, message):
    v = np.arange(6, dtype=np.float32).reshape(3, 2)
    with pytest.raises(ValueError, match=message):
        embstore.import_npy(tmp_path / "new", v, **kwargs)
    src = make(tmp_path / "s", dim=2)
    with pytest.raises(ValueError, match=message):
        embstore.import_npy(src, v, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["s"] and len(embstore.Reader(src)) == 30


@pytest.mark.parametrize("export, kwargs, message", [
    # int() truncated them: epochs=[1.7] exported epoch 1, begin=1.9, end=3.2 rows 1..2.
    ("npy", dict(epochs=[1.7]), r"epochs\[0\] must be an integer .*got float 1.7"),
    ("npy", dict(epochs=[0, True]), r"epochs\[1\] must be an integer .*got bool True"),
    ("npy", dict(epochs=np.array([1.0, 2.0])), "epochs must be integers .*float64, first value"),
    ("npy", dict(begin=1.9, end=3.2), "begin must be an integer row number; got float 1.9"),
    ("npy", dict(end=3.2), "end must be an integer row number; got float 3.2"),
    ("npy", dict(begin=True), "begin must be an integer row number; got bool True"),
    ("npy", dict(epochs=[[1, 2]]), r"epochs must be a 1-D list of epochs; got shape \(1, 2\)"),
    # A negative epoch wrapped: KeyError "epoch 18446744073709551615 is not in rows".
    ("npy", dict(epochs=[-1]), r"epochs\[0\] is negative \(-1\)"),
    ("npy", dict(epochs=[2**64]), r"epochs\[0\] is 18446744073709551616"),
    ("hdf5", dict(epochs=[2.5]), r"epochs\[0\] must be an integer .*got float 2.5"),
    ("hdf5", dict(begin=0.5), "begin must be an integer row number; got float 0.5"),
    ("compact", dict(epochs=[0.9]), r"epochs\[0\] must be an integer .*got float 0.9"),
    ("compact", dict(epochs={1, -1}), r"epochs\[\d\] is negative \(-1\)"),
])
def test_exports_and_compact_refuse_float_bool_and_negative_epochs_and_rows(
        tmp_path, export, kwargs, message):
    if export == "hdf5":
        pytest.importorskip("h5py")
    src = make(tmp_path / "s")
    call = {"npy": embstore.export_npy, "hdf5": embstore.export_hdf5,
            "compact": embstore.compact}[export]
    with pytest.raises(ValueError, match=message):
        call(src, tmp_path / "out", **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["s"]  # nothing at out, no hidden working copy


def test_exports_and_compact_take_epochs_as_any_collection_of_integers(tmp_path):
    src = make(tmp_path / "s")
    _, _, e = arrays(src)
    for i, epochs in enumerate(([2, 0], (0, 2), {0, 2}, (x for x in (2, 0, 2)),
                                np.array([0, 2], np.uint64), [np.int64(0), np.uint8(2)])):
        assert embstore.export_npy(src, tmp_path / f"npy{i}", epochs=epochs) == 20
        np.testing.assert_array_equal(np.load(tmp_path / f"npy{i}" / "epochs.npy"),
                                      e[e != 1])
    assert embstore.compact(src, tmp_path / "c", epochs=range(2)) == 20
    assert embstore.export_npy(src, tmp_path / "r", begin=np.int64(3), end=np.uint32(5)) == 2
    with pytest.raises(ValueError, match="epochs is empty"):
        embstore.export_npy(src, tmp_path / "none", epochs=[])


def test_import_names_the_key_file_it_refuses(tmp_path):
    np.save(tmp_path / "keys.npy", np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"keys \(.*keys\.npy\) must be integers"):
        embstore.import_npy(tmp_path / "new", np.zeros((3, 2), np.float32),
                            keys=tmp_path / "keys.npy")
    assert not os.path.exists(tmp_path / "new")


def test_uint16_input_is_bfloat16_only_when_the_sidecar_or_dtype_says_so(tmp_path):
    bits = np.array([[16256, 16384, 300], [1000, 40000, 65535]], dtype=np.uint16)
    np.save(tmp_path / "bits.npy", bits)
    embstore.create(tmp_path / "f32", dim=3, dtype="float32")
    for store, source in [(tmp_path / "new", bits), (tmp_path / "f32", bits),
                          (tmp_path / "new", tmp_path / "bits.npy")]:
        with pytest.raises(ValueError, match="uint16 vectors are read as bfloat16 bit patterns "
                                             "only with dtype='bfloat16'"):
            embstore.import_npy(store, source)
    with pytest.raises(ValueError, match=r"bits\.npy: uint16"):
        embstore.import_npy(tmp_path / "new", tmp_path / "bits.npy")
    assert not os.path.exists(tmp_path / "new") and len(embstore.Reader(tmp_path / "f32")) == 0
    assert embstore.import_npy(tmp_path / "new", bits, dtype="bfloat16") == 2
    r = embstore.Reader(tmp_path / "new")
    assert r.dtype == "bfloat16" and np.array_equal(r.vectors, bits)
    assert embstore.import_npy(tmp_path / "f32", bits[:1], dtype="bfloat16") == 1
    assert embstore.Reader(tmp_path / "f32").vectors[0, :2].tolist() == [1.0, 2.0]


def test_float64_rows_are_rounded_once_to_float16_and_bfloat16(tmp_path):
    # Each value lies just off a tie of the narrow type; through float32 it lands on the tie
    # and rounds to even: the wrong neighbour.
    tiny = 2.0**-40
    x16 = np.array([[1 + 2**-11 + tiny, 1 + 2**-11 - tiny, 1 + 3 * 2**-11, -1 - 2**-11 - tiny]])
    want16 = [1 + 2**-10, 1.0, 1 + 2**-9, -1 - 2**-10]
    assert x16.astype(np.float16).tolist() == [want16]
    # Just below the smallest value that rounds to infinity: float32 rounds it up onto that tie
    # (so it would become infinity); once, it is bfloat16's largest value.
    below_infinity = (2 - 2.0**-8) * 2.0**127 - 2.0**98
    x_bf = np.array([[1 + 2**-8 + tiny, 1 + 2**-8 - tiny, 1 + 2**-8, 1 + 3 * 2**-8,
                      below_infinity, -1 - 2**-8 - tiny, 1e-300]])
    want_bf = [0x3F81, 0x3F80, 0x3F80, 0x3F82, 0x7F7F, 0xBF81, 0]  # bit patterns
    for x, dtype, want in [(x16, "float16", want16), (x_bf, "bfloat16", want_bf)]:
        src = tmp_path / f"f64-{dtype}"
        with embstore.Writer(src, dim=x.shape[1], dtype="float64") as w:
            w.append([0], x)
        embstore.compact(src, tmp_path / f"compact-{dtype}", dtype=dtype)
        embstore.import_npy(tmp_path / f"import-{dtype}", x, dtype=dtype)
        embstore.create(tmp_path / f"existing-{dtype}", dim=x.shape[1], dtype=dtype)
        embstore.import_npy(tmp_path / f"existing-{dtype}", x, dtype=dtype)
        for out in ("compact", "import", "existing"):
            stored = embstore.Reader(tmp_path / f"{out}-{dtype}").vectors
            assert stored.tolist() == [want], (out, dtype)


@pytest.mark.parametrize("dtype, too_large", [("float16", 65520.0), ("bfloat16", 3.4e38),
                                              ("float32", 3.5e38)])
def test_import_and_compact_refuse_values_that_would_become_infinite(tmp_path, dtype, too_large):
    # Rounded to the narrower float type these values become infinity: refused, naming the row
    # of the source, never stored as infinity; a new store is not left behind and an existing
    # one keeps exactly what it had.
    x = np.ones((5, 3))
    x[3, 1] = -too_large
    x[1, 0] = np.inf  # infinite already: not an overflow
    pattern = rf"row 3, column 1: .* beyond {dtype}'s range"
    with pytest.raises(ValueError, match=pattern):
        embstore.import_npy(tmp_path / "new", x, dtype=dtype)
    assert not (tmp_path / "new").exists()
    embstore.create(tmp_path / "existing", dim=3, dtype=dtype)
    with pytest.raises(ValueError, match=pattern):
        embstore.import_npy(tmp_path / "existing", x, dtype=dtype)
    assert len(embstore.Reader(tmp_path / "existing")) == 0
    src = tmp_path / "f64"
    with embstore.Writer(src, dim=3, dtype="float64") as w:
        w.append(np.arange(5), x)
    with pytest.raises(ValueError, match=pattern):
        embstore.compact(src, tmp_path / "compact", dtype=dtype)
    assert not (tmp_path / "compact").exists()
    # Selected rows are named by their row in the source.
    with embstore.Writer(src) as w:
        w.append(np.arange(5, 10), np.ones((5, 3)), epoch=1)
        w.append(np.arange(10, 15), x, epoch=2)
    with pytest.raises(ValueError, match=rf"row 13, column 1: .* beyond {dtype}'s range"):
        embstore.compact(src, tmp_path / "compact", dtype=dtype, epochs=[2])
    if dtype != "float32":  # a float32 source into a 16-bit store: the same refusal
        src32 = tmp_path / "f32"
        with embstore.Writer(src32, dim=3, dtype="float32") as w:
            w.append(np.arange(5), x.astype(np.float32))
        with pytest.raises(ValueError, match=pattern):
            embstore.compact(src32, tmp_path / "compact32", dtype=dtype)
        with pytest.raises(ValueError, match=pattern):
            embstore.import_npy(tmp_path / "import32", x.astype(np.float32), dtype=dtype)


def test_a_refused_import_into_an_existing_store_appends_nothing(tmp_path, monkeypatch):
    # Checked chunk by chunk while appending, the chunks before the bad value were stored (and
    # synced) although the import raised. bfloat16 source rows were checked by the store only,
    # naming the row inside the chunk (and, for a new store, its hidden directory).
    import embstore.io as eio
    monkeypatch.setattr(eio, "_CHUNK_BYTES", 3 * 4 * 4)  # chunks of 3 float32 rows of 4
    x = np.ones((10, 4), np.float32)
    x[7, 2] = 7e4  # beyond float16, not bfloat16 (69632 there)
    with embstore.Writer(tmp_path / "bf16", dim=4, dtype="bfloat16") as w:
        w.append(np.arange(10), x)
    embstore.export_npy(tmp_path / "bf16", tmp_path / "bf16-export")
    pattern = r"^vectors: row 7, column 2: .* beyond float16's range"
    for i, source in enumerate([x, x.astype(np.float64), tmp_path / "bf16-export"]):
        store = tmp_path / f"existing-{i}"
        with embstore.Writer(store, dim=4, dtype="float16") as w:
            w.append([99], np.zeros((1, 4), np.float32))
        with pytest.raises(ValueError, match=pattern):
            embstore.import_npy(store, source, dtype="float16")  # rounding asked for
        r = embstore.Reader(store)
        assert len(r) == 1 and r.keys.tolist() == [99], i
    with pytest.raises(ValueError, match=pattern):
        embstore.import_npy(tmp_path / "new", tmp_path / "bf16-export", dtype="float16")
    assert not (tmp_path / "new").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("what", ["export_npy", "export_hdf5", "compact"])
def test_an_output_inside_the_store_read_is_refused(tmp_path, what):
    """export_npy, export_hdf5 and compact wrote into the store they read (``s/rows.7``), and the
    next Writer removed that file as stale without a word; the CLI refused such outputs."""
    if what == "export_hdf5":
        pytest.importorskip("h5py")
    store = str(tmp_path / "s")
    with embstore.Writer(store, dim=2) as w:
        w.append([1, 2], np.ones((2, 2), np.float32), 0)
    before = sorted(os.listdir(store))
    with pytest.raises(ValueError, match=f"{store}/rows.7: inside the store {store}, which is "
                                         "only read"):
        getattr(embstore, what)(store, os.path.join(store, "rows.7"))
    assert sorted(os.listdir(store)) == before


def test_compact_into_a_wider_dtype_keeps_rows_per_segment(tmp_path):
    """A float16 store of 4 KiB segments (dim 2048: one row a segment) compacted to float32 kept
    the 4 KiB segment, smaller than one float32 row, and was refused."""
    store = str(tmp_path / "h")
    with embstore.Writer(store, dim=2048, dtype="float16", segment_mb=4096 / (1 << 20)) as w:
        w.append([1, 2], np.ones((2, 2048), np.float16), 0)
    assert embstore.compact(store, tmp_path / "wide", dtype="float32") == 2
    r = embstore.Reader(tmp_path / "wide")
    assert r.dtype == "float32" and r.info()["segment_bytes"] == 8192
    assert np.array_equal(r.vectors, np.ones((2, 2048), np.float32))


def test_an_import_into_an_empty_directory_killed_midway_leaves_no_store_there(tmp_path):
    """The store was made in the directory itself and its rows appended there, so an import
    killed half-way left a store of part of the rows that verified clean, as if finished (the
    CLI's import did the same). It is built in a hidden directory inside and moved up."""
    import signal
    import subprocess
    import sys
    import time
    np.save(tmp_path / "v.npy", np.ones((400_000, 16), np.float32))
    store = tmp_path / "volume"
    store.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import sys, embstore.io as io; "
                              "io.import_npy(sys.argv[1], sys.argv[2])", str(store),
                              str(tmp_path / "v.npy")], env={**os.environ})
    deadline = time.monotonic() + 60
    killed = False
    while time.monotonic() < deadline and child.poll() is None:
        hidden = [name for name in os.listdir(store) if ".partial-" in name]
        try:
            if hidden and embstore.info(store / hidden[0])["committed_rows"] > 0:
                child.send_signal(signal.SIGKILL)
                killed = True
                break
        except (OSError, embstore.Error):
            pass
        time.sleep(0.001)
    child.wait()
    assert killed, "the import ended before it could be killed"
    assert "header" not in os.listdir(store)
    with pytest.raises((FileNotFoundError, embstore.Error)):
        embstore.Reader(store)
    assert [name.startswith(".store.partial-") for name in os.listdir(store)] == [True]
    other = tmp_path / "volume2"
    other.mkdir()
    assert embstore.io.import_npy(other, tmp_path / "v.npy") == 400_000
    assert len(embstore.Reader(other)) == 400_000 and not [
        name for name in os.listdir(other) if name.startswith(".")]


def test_import_takes_the_rows_dtype_from_their_file_and_refuses_a_sidecar_saying_otherwise(
        tmp_path):
    # vectors.npy of a bfloat16 export replaced with float32 values (numpy has no bfloat16): the
    # sidecar's "bfloat16" had the float32 values taken as bit patterns, stored as other numbers.
    src = str(tmp_path / "src")
    make(src, dtype="bfloat16", rows=3)
    out = str(tmp_path / "out")
    embstore.io.export_npy(src, out)
    np.save(os.path.join(out, "vectors.npy"), np.full((9, 4), 1.5, np.float32))
    with pytest.raises(ValueError, match=re.escape(
            f"{out}/embstore.json says dtype 'bfloat16' but {out}/vectors.npy holds float32")):
        embstore.io.import_npy(str(tmp_path / "new"), out)
    assert not os.path.exists(tmp_path / "new")


def test_import_names_the_file_it_cannot_read(tmp_path):
    out = str(tmp_path / "out")
    make(str(tmp_path / "src"), rows=2)
    embstore.io.export_npy(str(tmp_path / "src"), out)
    with open(os.path.join(out, "embstore.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{out}/embstore.json: not an export's")):
        embstore.io.import_npy(str(tmp_path / "a"), out)
    os.remove(os.path.join(out, "embstore.json"))
    with open(os.path.join(out, "vectors.npy"), "wb") as f:
        f.write(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=re.escape(f"{out}/vectors.npy: not a readable .npy")):
        embstore.io.import_npy(str(tmp_path / "b"), out)
    np.save(os.path.join(out, "vectors.npy"), np.ones(4, np.float32))
    with pytest.raises(ValueError, match=re.escape(f"{out}/vectors.npy must be 2-D")):
        embstore.io.import_npy(str(tmp_path / "c"), out)
    assert not any(os.path.exists(tmp_path / name) for name in "abc")


def test_import_into_an_existing_store_rounds_rows_only_when_asked_as_the_cli_does(tmp_path):
    store = str(tmp_path / "s")
    embstore.create(store, dim=2)  # float32
    rows = np.array([[0.1, 1e-50]], np.float64)
    with pytest.raises(embstore.FormatMismatchError,
                       match=r"holds float32 rows but vectors holds float64; give "
                       r"dtype='float32' to convert them"):
        embstore.io.import_npy(store, rows)
    assert len(embstore.Reader(store)) == 0
    embstore.io.import_npy(store, rows, dtype="float32")  # asked: rounded
    embstore.io.import_npy(store, np.ones((1, 2), np.float16))  # widened exactly: taken
    half = str(tmp_path / "half")
    embstore.create(half, dim=2, dtype="float16")
    embstore.io.import_npy(half, np.ones((1, 2), np.float32))  # as every Writer takes them
    assert embstore.Reader(store).vectors.tolist() == [[np.float32(0.1), 0.0], [1.0, 1.0]]
    assert len(embstore.Reader(half)) == 1


def test_an_npy_export_gets_the_mode_a_directory_gets_and_empty_epochs_are_refused(tmp_path):
    src = str(tmp_path / "src")
    make(src, rows=3)
    umask = os.umask(0o022)
    try:
        embstore.io.export_npy(src, str(tmp_path / "out"))
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    for call in (embstore.io.export_npy, embstore.io.compact):
        with pytest.raises(ValueError, match="epochs is empty, so no row of .* would be taken"):
            call(src, str(tmp_path / f"none-{call.__name__}"), epochs=[])
        assert not os.path.exists(tmp_path / f"none-{call.__name__}")


def test_an_existing_output_is_named_before_the_store_is_opened(tmp_path):
    # As the CLI's export and compact: the output that exists is the mistake named, whatever
    # else is wrong (a store path that is no store), and nothing is made anywhere.
    import embstore.io as eio
    (tmp_path / "exists").mkdir()
    out = str(tmp_path / "exists")
    for call in (eio.export_npy, eio.export_hdf5, eio.compact):
        with pytest.raises(FileExistsError, match=re.escape(f"{out}: already exists")):
            call(str(tmp_path / "nostore"), out)
    with pytest.raises(FileExistsError):
        eio.compact(str(tmp_path / "nostore"), out, dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_an_output_made_while_an_export_ran_is_never_replaced(tmp_path, monkeypatch):
    # The last look for the output and the rename were two steps: os.rename replaced a file, or
    # an empty directory, made in between. Another process makes one right before the publish.
    import embstore.io as eio
    src = make(str(tmp_path / "src"), rows=3)
    real_staged = eio._staged
    published = []

    class MadeMeanwhile:
        def __init__(self, out, shape="directory"):
            self.real = real_staged(out, shape)

        def __getattr__(self, name):
            return getattr(self.real, name)

        def publish(self):
            out = self.real.out
            if out.endswith(".h5"):
                with open(out, "w") as f:
                    f.write("someone else's")
            else:
                os.mkdir(out)
            published.append(out)
            self.real.publish()

    monkeypatch.setattr(eio, "_staged", MadeMeanwhile)
    for name, call in (("out", eio.export_npy), ("out.h5", eio.export_hdf5),
                       ("compacted", eio.compact), ("imported", eio.import_npy)):
        out = str(tmp_path / name)
        args = (out, np.ones((2, 4), np.float32)) if call is eio.import_npy else (src, out)
        with pytest.raises(FileExistsError,
                           match=re.escape(f"{out}: already exists (the new output was removed)")):
            call(*args)
        if name.endswith(".h5"):
            assert open(out).read() == "someone else's"
        else:
            assert os.listdir(out) == []  # the empty directory made meanwhile, as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compacted", "imported", "out",
                                                          "out.h5", "src"]
    assert len(published) == 4


def test_an_export_sidecar_names_its_files_and_a_bad_name_is_refused(tmp_path):
    # The files embstore.json lists under "files" are the ones read: a sidecar naming ids.npy
    # for the keys had keys.npy read, or, with none, was told keys.npy was listed. As the CLI.
    src = str(tmp_path / "src")
    with embstore.Writer(src, dim=3, dtype="float32") as w:
        w.append([1001, 1002], np.ones((2, 3), np.float32), epoch=4)
    out = str(tmp_path / "out")
    embstore.export_npy(src, out)
    os.rename(os.path.join(out, "keys.npy"), os.path.join(out, "ids.npy"))
    np.save(os.path.join(out, "keys.npy"), np.array([5, 6], np.uint64))  # not the export's
    with open(os.path.join(out, "embstore.json")) as f:
        side = json.load(f)
    side["files"]["keys"] = "ids.npy"

    def write_sidecar():
        with open(os.path.join(out, "embstore.json"), "w") as f:
            json.dump(side, f)
    write_sidecar()
    assert embstore.import_npy(tmp_path / "a", out) == 2
    assert embstore.Reader(tmp_path / "a").keys.tolist() == [1001, 1002]
    os.remove(os.path.join(out, "ids.npy"))
    with pytest.raises(FileNotFoundError) as missing:
        embstore.import_npy(tmp_path / "b", out)
    assert missing.value.strerror.startswith(f"{out}/ids.npy is missing, but "
                                             f"{out}/embstore.json lists it")
    for bad in ["../src/keys.npy", "", 7]:
        side["files"]["keys"] = bad
        write_sidecar()
        with pytest.raises(ValueError) as error:
            embstore.import_npy(tmp_path / "c", out)
        assert str(error.value) == (f"{out}/embstore.json: files.keys must be the name of a "
                                    f"file in the export's directory; got {json.dumps(bad)}")
    assert not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "c")


@pytest.mark.parametrize("lost", ["keys.npy", "epochs.npy"])
def test_an_export_missing_a_file_its_sidecar_lists_is_refused_not_given_made_up_keys(tmp_path,
                                                                                      lost):
    # The rows were imported with keys 0..n-1 (or epoch 0) without a word: a lookup by a real
    # sample id then missed, or found another sample. The CLI's import refuses it alike
    # (tests/cli/test_transfer.py).
    src = str(tmp_path / "src")
    with embstore.Writer(src, dim=3, dtype="float32") as w:
        w.append([1001, 1002], np.ones((2, 3), np.float32), epoch=4)
    out = str(tmp_path / "out")
    embstore.export_npy(src, out)
    os.remove(os.path.join(out, lost))
    existing = str(tmp_path / "existing")
    with embstore.Writer(existing, dim=3, dtype="float32") as w:
        w.append([7], np.zeros((1, 3), np.float32))
    before = hashes(existing)
    instead = "keys=" if lost == "keys.npy" else "epochs= or epoch="
    message = (f"{out}/{lost} is missing, but {out}/embstore.json lists it among the export's "
               "files: the export is incomplete (a copy cut short?), and nothing was imported; "
               f"restore the file, or give {instead} to choose the rows' {lost[:-4]}")
    for store in (str(tmp_path / "new"), existing):
        with pytest.raises(FileNotFoundError) as error:
            embstore.import_npy(store, out)
        assert error.value.errno == errno.ENOENT and error.value.strerror == message, store
    assert not os.path.exists(tmp_path / "new") and hashes(existing) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    # Naming the column makes the missing file unneeded.
    given = {"keys": [5, 6]} if lost == "keys.npy" else {"epoch": 9}
    assert embstore.import_npy(tmp_path / "new", out, **given) == 2
    r = embstore.Reader(tmp_path / "new")
    assert r.keys.tolist() == ([5, 6] if lost == "keys.npy" else [1001, 1002])
    assert r.epochs.tolist() == ([4, 4] if lost == "keys.npy" else [9, 9])
    # A directory of .npy files no sidecar lists them in (made by hand) keeps the defaults.
    os.remove(os.path.join(out, "embstore.json"))
    assert embstore.import_npy(tmp_path / "plain", out) == 2
    r = embstore.Reader(tmp_path / "plain")
    assert r.keys.tolist() == ([0, 1] if lost == "keys.npy" else [1001, 1002])
    assert r.epochs.tolist() == ([4, 4] if lost == "keys.npy" else [0, 0])


@pytest.mark.parametrize("store_dtype", [None, "bfloat16", "float32", "float16"])
def test_import_takes_a_bfloat16_tensor_as_writer_append_does(tmp_path, store_dtype):
    # It failed with torch's own "TypeError: Got unsupported ScalarType BFloat16", naming
    # neither the argument nor a way out.
    import torch
    values = torch.tensor([[1.0, -2.0, 3.5], [0.15625, 6e4, -7e-3]])
    rows = values.bfloat16()
    kwargs = {} if store_dtype is None else {"dtype": store_dtype}
    assert embstore.import_npy(tmp_path / "new", rows, keys=[3, 4], epoch=2, **kwargs) == 2
    r = embstore.Reader(tmp_path / "new")
    assert r.dtype == (store_dtype or "bfloat16")
    expected = rows.float() if store_dtype in (None, "bfloat16", "float32") else rows.half()
    assert torch.equal(r.tensor().float(), expected.float())
    assert r.keys.tolist() == [3, 4] and r.epochs.tolist() == [2, 2] and r.verify().ok
    # Into an existing store of another float dtype, as an export of bfloat16 rows goes.
    embstore.create(tmp_path / "f32", dim=3, dtype="float32")
    assert embstore.import_npy(tmp_path / "f32", rows) == 2
    assert torch.equal(embstore.Reader(tmp_path / "f32").tensor(), rows.float())


def test_import_of_big_endian_npy_files_stores_their_values(tmp_path):
    """A big-endian .npy is a valid file numpy reads as it is: import_npy refused it with
    "append: vectors are big-endian", naming neither the file nor the import (a review); the
    CLI's import takes it."""
    vectors = np.arange(24, dtype=">f4").reshape(6, 4)
    np.save(tmp_path / "v.npy", vectors)
    np.save(tmp_path / "k.npy", np.arange(10, 16, dtype=">u8"))
    np.save(tmp_path / "e.npy", np.array([1, 1, 2, 2, 3, 3], dtype=">u8"))
    store = str(tmp_path / "s.emb")
    assert embstore.import_npy(store, tmp_path / "v.npy", keys=tmp_path / "k.npy",
                               epochs=tmp_path / "e.npy") == 6
    with embstore.Reader(store) as r:
        np.testing.assert_array_equal(r.vectors, vectors.astype("<f4"))
        assert r.keys.tolist() == list(range(10, 16)) and r.epochs.tolist() == [1, 1, 2, 2, 3, 3]
