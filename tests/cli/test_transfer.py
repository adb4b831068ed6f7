"""embstore export / import / compact: np.load and h5py round trips, import of an export gives
the same rows, keys and epochs, compaction, kill -9 during compact, and bad input."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

import embstore
from conftest import (CLI, SEGMENT_MB, bind_mounted, corrupt_row, hash_tree, kill_when,
                      make_store, partial_dirs, run)

DTYPES = ["float32", "float16", "bfloat16", "int8", "uint8", "float64"]
NUMPY = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int8": "|i1", "uint8": "|u1",
         "float64": "<f8"}


def store_arrays(path):
    r = embstore.Reader(path)
    return np.array(r.vectors), np.array(r.keys), np.array(r.epochs)


def one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def write_npy(path, header, data=b""):
    """A .npy file (format 1.0) with `header` as written, however hostile, and `data` after it."""
    h = header.encode()
    h += b" " * ((64 - (10 + len(h) + 1) % 64) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + data)


@pytest.fixture
def full_disk(small_tmpfs):
    """A 1 MiB tmpfs, too small for the exports written to it (conftest.small_tmpfs)."""
    return small_tmpfs("1m")


@pytest.mark.parametrize("dtype", DTYPES)
def test_npy_export_opens_with_np_load_mmap_and_matches_the_store(tmp_path, dtype):
    store = make_store(tmp_path / "s", dtype=dtype, dim=5)
    out = tmp_path / "out"
    r = run("export", store, out, "--quiet")
    assert r.code == 0, r
    vectors = np.load(out / "vectors.npy", mmap_mode="r")
    keys = np.load(out / "keys.npy", mmap_mode="r")
    epochs = np.load(out / "epochs.npy", mmap_mode="r")
    assert isinstance(vectors, np.memmap)
    assert vectors.dtype == np.dtype(NUMPY[dtype]) and vectors.shape == (30, 5)
    v, k, e = store_arrays(store)
    assert np.array_equal(vectors, v) and np.array_equal(keys, k) and np.array_equal(epochs, e)
    sidecar = json.loads((out / "embstore.json").read_text())
    reader = embstore.Reader(store)
    assert sidecar["dtype"] == dtype and sidecar["dim"] == 5 and sidecar["rows"] == 30
    assert sidecar["store_id"] == reader.info()["store_id"]
    assert sidecar["metadata"] == reader.metadata_text


@pytest.mark.parametrize("dtype", DTYPES)
def test_hdf5_export_reads_in_h5py_with_attributes(tmp_path, dtype):
    store = make_store(tmp_path / "s", dtype=dtype, dim=3)
    out = tmp_path / "x.h5"
    assert run("export", store, out, "--quiet").code == 0
    reader = embstore.Reader(store)
    with h5py.File(out, "r") as f:
        assert f.attrs["dtype"] == dtype and int(f.attrs["dim"]) == 3
        assert f.attrs["metadata"] == reader.metadata_text
        assert f.attrs["store_id"] == reader.info()["store_id"]
        assert f["vectors"].dtype == np.dtype(NUMPY[dtype])
        v, k, e = store_arrays(store)
        assert np.array_equal(f["vectors"][:], v)
        assert np.array_equal(f["keys"][:], k) and np.array_equal(f["epochs"][:], e)


def test_export_selects_by_epoch_latest_and_row_range(store, tmp_path):
    v, k, e = store_arrays(store)
    assert run("export", store, tmp_path / "e1", "--epoch", 1).code == 0
    assert np.array_equal(np.load(tmp_path / "e1" / "keys.npy"), k[e == 1])
    assert run("export", store, tmp_path / "e02", "--epoch", "0,2").code == 0
    assert np.array_equal(np.load(tmp_path / "e02" / "epochs.npy"), e[e != 1])
    assert run("export", store, tmp_path / "r", "--from", 5, "--to", 12).code == 0
    assert np.array_equal(np.load(tmp_path / "r" / "vectors.npy"), v[5:12])
    assert run("export", store, tmp_path / "latest", "--latest").code == 0
    latest = {}
    for row, key in enumerate(k):
        latest[key] = row
    rows = sorted(latest.values())
    assert np.array_equal(np.load(tmp_path / "latest" / "keys.npy"), k[rows])
    assert np.array_equal(np.load(tmp_path / "latest" / "vectors.npy"), v[rows])
    assert run("export", store, tmp_path / "le", "--latest", "--epoch", 0).code == 0
    assert len(np.load(tmp_path / "le" / "keys.npy")) == 10


def test_exported_compacted_and_imported_outputs_get_the_mode_of_a_new_directory(store, tmp_path):
    # Built in a private working directory, published with the mode mkdir gives (not 0700), so
    # that other users and services read them as they read the source store.
    old = os.umask(0o022)
    try:
        outputs = {"npy": tmp_path / "out.npy", "copy": tmp_path / "copy.emb",
                   "import": tmp_path / "imported.emb"}
        assert run("export", store, outputs["npy"]).code == 0
        assert run("compact", store, outputs["copy"]).code == 0
        assert run("import", outputs["import"], outputs["npy"]).code == 0
        os.mkdir(tmp_path / "plain")
        plain = os.stat(tmp_path / "plain").st_mode & 0o777
        assert plain == 0o755
        for name, path in outputs.items():
            assert os.stat(path).st_mode & 0o777 == plain, name
    finally:
        os.umask(old)


def test_csv_export_has_a_header_and_one_line_per_row(store, tmp_path):
    out = tmp_path / "x.csv"
    assert run("export", store, out, "--to", 4).code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "row,key,epoch,v0,v1,v2,v3"
    v, k, e = store_arrays(store)
    data = np.loadtxt(out, delimiter=",", skiprows=1)
    assert data.shape == (4, 7)
    assert np.array_equal(data[:, 1], k[:4]) and np.array_equal(data[:, 2], e[:4])
    assert np.array_equal(data[:, 3:].astype(np.float16), v[:4])


@pytest.mark.parametrize("fmt", ["npy", "hdf5"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_import_of_an_export_gives_identical_rows_keys_epochs_and_metadata(tmp_path, fmt, dtype):
    store = make_store(tmp_path / "s", dtype=dtype)
    out = tmp_path / ("out" if fmt == "npy" else "out.h5")
    assert run("export", store, out, "--format", fmt).code == 0
    r = run("import", tmp_path / "copy", out, "--json")
    assert r.code == 0, r
    summary = json.loads(r.out)
    assert summary["created"] and summary["rows"] == 30
    for a, b in zip(store_arrays(store), store_arrays(tmp_path / "copy")):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert embstore.Reader(tmp_path / "copy").metadata_text == embstore.Reader(store).metadata_text
    # --metadata '' asks for none: it was taken as not given, and the export's came instead.
    assert run("import", tmp_path / "bare", out, "--metadata", "", "--quiet").code == 0
    assert embstore.Reader(tmp_path / "bare").metadata_text == "" != embstore.Reader(
        store).metadata_text
    again = tmp_path / ("again" if fmt == "npy" else "again.h5")
    assert run("export", tmp_path / "copy", again, "--format", fmt).code == 0
    if fmt == "npy":
        for name in ("vectors.npy", "keys.npy", "epochs.npy"):
            assert (out / name).read_bytes() == (again / name).read_bytes()


def test_import_from_plain_npy_files_with_keys_and_epochs(tmp_path):
    vectors = np.random.default_rng(1).standard_normal((50, 6)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    np.save(tmp_path / "k.npy", np.arange(100, 150, dtype=np.int64))
    np.save(tmp_path / "e.npy", np.repeat(np.arange(5, dtype=np.uint64), 10))
    store = tmp_path / "s"
    r = run("import", store, tmp_path / "v.npy", "--keys", tmp_path / "k.npy", "--epochs",
            tmp_path / "e.npy", "--dtype", "float16", "--segment-mb", 1)
    assert r.code == 0, r
    v, k, e = store_arrays(store)
    assert v.dtype == np.float16 and np.array_equal(v, vectors.astype(np.float16))
    assert np.array_equal(k, np.arange(100, 150)) and np.array_equal(e, np.repeat(np.arange(5), 10))
    # Appending to the existing store: one epoch for all, default keys 0..n-1.
    assert run("import", store, tmp_path / "v.npy", "--epoch", 9).code == 0
    v, k, e = store_arrays(store)
    assert len(v) == 100 and np.array_equal(k[50:], np.arange(50)) and (e[50:] == 9).all()


def test_import_from_an_hdf5_dataset_by_name(tmp_path):
    data = np.random.default_rng(2).standard_normal((20, 3))
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["emb/x"] = data
        f["ids"] = np.arange(20, 40, dtype=np.uint64)
    store = tmp_path / "s"
    r = run("import", store, f"{tmp_path / 'd.h5'}:/emb/x", "--keys", f"{tmp_path / 'd.h5'}:/ids",
            "--epoch", 4)
    assert r.code == 0, r
    v, k, e = store_arrays(store)
    assert v.dtype == np.float64 and np.array_equal(v, data)
    assert np.array_equal(k, np.arange(20, 40)) and (e == 4).all()
    # A ':' naming nothing after it: said so (it was "no dataset  in d.h5", the name empty).
    for args in ([f"{tmp_path / 'd.h5'}:"], [f"{tmp_path / 'd.h5'}:/emb/x", "--keys",
                                             f"{tmp_path / 'd.h5'}:"]):
        r = run("import", tmp_path / "t", *args)
        assert r.code == 2 and not (tmp_path / "t").exists(), r
        assert f"{tmp_path / 'd.h5'}: names no dataset after its ':' (FILE.h5:/NAME names " \
            in r.err, r


def test_import_bad_input_gets_one_line_and_leaves_no_store(tmp_path, store):
    np.save(tmp_path / "v.npy", np.zeros((4, 4), np.float32))
    np.save(tmp_path / "v3.npy", np.zeros((4, 3), np.float32))
    np.save(tmp_path / "i64.npy", np.zeros((4, 4), np.int64))
    np.save(tmp_path / "k.npy", np.arange(5))
    np.save(tmp_path / "neg.npy", np.array([0, 1, -2, 3]))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    (tmp_path / "text.h5").write_text("not HDF5")
    (tmp_path / "emptydir").mkdir()
    with h5py.File(tmp_path / "good.h5", "w") as f:
        f["g/x"] = np.zeros((4, 4), np.float32)
        f["cube"] = np.zeros((2, 2, 2), np.float32)
        f["filler"] = np.arange(4096, dtype=np.float64)
    whole = (tmp_path / "good.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(whole[:len(whole) // 2])  # HDF5's signature, half a file
    cases = [
        # Inputs HDF5 cannot read, or a group named as the dataset: bad input (2), with the
        # reason, not an I/O error (17) saying only that HDF5's open failed.
        ([tmp_path / "new", f"{tmp_path / 'cut.h5'}:/g/x"], 2, "cut.h5: HDF5 cannot read it ("),
        ([tmp_path / "new", f"{tmp_path / 'good.h5'}:/g"], 2, "good.h5:/g is a group"),
        ([tmp_path / "new", f"{tmp_path / 'good.h5'}:/cube"], 2,
         "import reads vectors from a 2-D dataset"),
        ([tmp_path / "new", tmp_path / "text.h5"], 2, "text.h5 is not an HDF5 file"),
        ([tmp_path / "new", tmp_path / "missing.npy"], 12, "missing.npy"),
        ([tmp_path / "new", tmp_path / "junk.npy"], 2, "junk.npy"),
        ([tmp_path / "new", tmp_path / "i64.npy"], 2, "i64.npy"),
        ([tmp_path / "new", tmp_path / "v.npy", "--keys", tmp_path / "k.npy"], 2, "k.npy has 5"),
        ([tmp_path / "new", tmp_path / "v.npy", "--keys", tmp_path / "neg.npy"], 2, "negative"),
        ([tmp_path / "new", tmp_path / "v.npy", "--dtype", "nope"], 2, 'unknown dtype "nope"'),
        ([tmp_path / "new", tmp_path / "v.npy", "--epoch", "x"], 2, '"x"'),
        ([tmp_path / "new", tmp_path / "v.npy", "--epoch", 1, "--epochs", tmp_path / "k.npy"], 2,
         "excludes"),
        # Refused as into an existing store of that dtype (15), before anything is made.
        ([tmp_path / "new", tmp_path / "v.npy", "--dtype", "int8"], 15,
         "v.npy holds float32 rows but --dtype int8 was asked for"),
        # A directory given as a .npy file is named as one.
        ([tmp_path / "new", tmp_path / "v.npy", "--keys", tmp_path / "emptydir"], 2,
         f"{tmp_path / 'emptydir'} is a directory, not a .npy file"),
        ([tmp_path / "new", tmp_path / "v.npy", "--metadata", "{"], 2, "not valid JSON"),
        ([store, tmp_path / "v3.npy"], 15, "dim 4"),
        # An existing store's dtype is fixed: rows are not silently converted to it.
        ([store, tmp_path / "v.npy", "--dtype", "float32"], 15,
         "holds float16 rows but --dtype float32"),
        ([tmp_path / "new", f"{tmp_path / 'v.npy'}x"], 12, "no such file"),
    ]
    for args, code, message in cases:
        r = run("import", *args)
        assert r.code == code, (args, r)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r)
        assert not os.path.exists(tmp_path / "new"), args
        assert not [p for p in os.listdir(tmp_path) if ".partial-" in p], args
    assert len(embstore.Reader(store)) == 30


def test_export_bad_input(store, tmp_path):
    (tmp_path / "exists").mkdir()
    cases = [
        ([store, tmp_path / "exists"], 13, "already exists"),
        # Said before the store is opened: the output is the one mistake named.
        ([tmp_path / "nostore", tmp_path / "exists"], 13, "already exists"),
        ([store, tmp_path / "o", "--epoch", 7], 12, "epoch 7 is not in"),
        ([store, tmp_path / "o", "--from", 9, "--to", 3], 2, "--from 9 is after --to 3"),
        ([store, tmp_path / "o", "--to", 99], 2, "past the end"),
        ([store, tmp_path / "o", "--format", "parquet"], 2, "parquet"),
        ([store, tmp_path / "o", "--epoch", "-1"], 2, '"-1"'),
    ]
    for args, code, message in cases:
        r = run("export", *args)
        assert r.code == code, (args, r)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r)
        assert not os.path.exists(tmp_path / "o")


def test_export_of_a_corrupt_row_fails_naming_it_and_leaves_no_output(store, tmp_path):
    corrupt_row(store, 12, record_bytes=8)
    r = run("export", store, tmp_path / "o")
    assert r.code == 14
    assert "row 12 (key 3, epoch 1)" in r.err
    assert sorted(os.listdir(tmp_path)) == ["s"]


@pytest.mark.parametrize("field,command", [
    (0, ["compact", "--latest-per-key"]), (0, ["export", "--latest"]),
    (8, ["compact", "--epochs", "2"]), (8, ["export", "--epoch", "2"])])
def test_selection_refuses_a_store_whose_keys_or_epochs_fail_their_checksums(tmp_path, field,
                                                                            command):
    """From a review: one flipped bit in the key (or epoch) of a key's latest row made
    compact --latest-per-key and export --latest take an older version as the latest, and
    --epochs leave that row out; both exited 0 and the output verified clean. Only the rows
    taken were checked; every row's key and epoch decide what is taken."""
    store = make_store(tmp_path / "s", dim=4, dtype="float32", key_offset=False)
    # Row 25 is key 5's latest (epoch 2): its key 5 -> 4 (field 0) or its epoch 2 -> 3 (8).
    with open(f"{store}/index.1", "r+b") as f:
        f.seek(25 * 32 + field)
        value = f.read(1)[0]
        f.seek(25 * 32 + field)
        f.write(bytes([value ^ 1]))
    out = tmp_path / "out"
    r = run(command[0], store, out, *command[1:], "--quiet")
    assert r.code == 14, r
    assert f"{store}: row 25 fails its checksum" in r.err, r
    assert not out.exists() and not partial_dirs(tmp_path), r


def test_compact_keeps_latest_per_key_or_epochs_and_converts_dtype(store, tmp_path):
    before = hash_tree(store)
    v, k, e = store_arrays(store)
    r = run("compact", store, tmp_path / "latest", "--latest-per-key", "--json")
    assert r.code == 0, r
    assert json.loads(r.out)["rows"] == 12
    lv, lk, le = store_arrays(tmp_path / "latest")
    latest = {}
    for row, key in enumerate(k):
        latest[key] = row
    rows = sorted(latest.values())
    assert np.array_equal(lv, v[rows]) and np.array_equal(lk, k[rows]) and np.array_equal(le, e[rows])
    assert run("compact", store, tmp_path / "e2", "--epochs", "2", "--dtype", "float32").code == 0
    cv, ck, ce = store_arrays(tmp_path / "e2")
    assert cv.dtype == np.float32 and np.array_equal(cv, v[e == 2].astype(np.float32))
    assert (ce == 2).all() and run("verify", tmp_path / "e2").code == 0
    src = embstore.Reader(store)
    new = embstore.Reader(tmp_path / "e2")
    assert new.metadata_text == src.metadata_text
    assert new.info()["store_id"] != src.info()["store_id"]
    assert hash_tree(store) == before


def test_compact_bad_input(store, tmp_path):
    (tmp_path / "exists").mkdir()
    int_store = make_store(tmp_path / "i8", dtype="int8")
    cases = [
        ([store, tmp_path / "exists"], 13, "already exists"),
        ([store, tmp_path / "o", "--epochs", "1,8"], 12, "epoch 8 is not in"),
        ([store, tmp_path / "o", "--epochs", "1,x"], 2, '"x"'),
        ([store, tmp_path / "o", "--dtype", "f7"], 2, 'unknown dtype "f7"'),
        ([int_store, tmp_path / "o", "--dtype", "float16"], 15,
         f"{int_store} holds int8 rows but --dtype float16 was asked for"),
    ]
    for args, code, message in cases:
        r = run("compact", *args)
        assert r.code == code, (args, r)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r)
        assert not os.path.exists(tmp_path / "o")
        assert not [p for p in os.listdir(tmp_path) if ".partial-" in p], args


def test_compact_to_a_dtype_the_rows_may_not_convert_to_exits_15_as_import_does(store, tmp_path):
    # compact --dtype int8 of a float store exited 2 (usage), import of the same rows 15.
    before = hash_tree(store)
    assert run("export", store, tmp_path / "npy").code == 0
    out = tmp_path / "o"
    r = run("import", out, tmp_path / "npy", "--dtype", "int8")
    assert r.code == 15, r
    for dtype in ("int8", "uint8"):
        r = run("compact", store, out, "--dtype", dtype)
        assert r.code == 15, (dtype, r)
        lines = r.err.strip().splitlines()
        assert lines == [f"embstore compact: {store} holds float16 rows but --dtype {dtype} was "
                         "asked for (compact converts rows between float types only, never to "
                         f"or from int8 or uint8); no store was made at {out}"], (dtype, r)
        assert not out.exists() and not partial_dirs(tmp_path), r
    assert hash_tree(store) == before


def test_kill_9_during_compact_leaves_the_source_intact_and_no_store_at_the_output(tmp_path):
    # Big enough that compaction takes a while: 40k rows x 256 float32 = 40 MiB.
    src = tmp_path / "big"
    embstore.create(src, dim=256, dtype="float32", segment_mb=16)
    with embstore.Writer(src) as w:
        block = np.random.default_rng(3).standard_normal((4000, 256)).astype(np.float32)
        for i in range(10):
            w.append(keys=np.arange(4000) + i * 4000, vectors=block, epoch=i)
        w.sync()
    before = hash_tree(src)
    killed_mid_way = 0
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen([CLI, "compact", str(src), str(out), "--quiet"])
        # Wait for the working directory to appear, then kill at once.
        if kill_when(proc, lambda: any(name.startswith(f".out{attempt}.partial-")
                                       for name in os.listdir(tmp_path)), 30):
            killed_mid_way += 1
            # Nothing at the output name: no half store can be mistaken for the result.
            assert not os.path.exists(out)
            r = run("info", out)
            assert r.code == 12
        else:
            assert proc.returncode == 0 and run("verify", out).code == 0
        assert hash_tree(src) == before
        assert run("verify", src).code == 0
    assert killed_mid_way >= 1
    # The leftover working directories are hidden and do not block a new compaction.
    assert run("compact", src, tmp_path / "final", "--epochs", 9).code == 0
    assert len(embstore.Reader(tmp_path / "final")) == 4000


def test_python_and_cli_read_each_others_exports(store, tmp_path):
    assert run("export", store, tmp_path / "cli_out").code == 0
    embstore.import_npy(tmp_path / "py_copy", tmp_path / "cli_out")
    embstore.export_npy(store, tmp_path / "py_out")
    assert run("import", tmp_path / "cli_copy", tmp_path / "py_out").code == 0
    for copy in ("py_copy", "cli_copy"):
        for a, b in zip(store_arrays(store), store_arrays(tmp_path / copy)):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_import_refused_for_a_negative_key_or_epoch_stores_nothing_in_an_existing_store(tmp_path):
    # Two batches of rows (4 MiB each): the bad value is in the second, after the first was read.
    store = make_store(tmp_path / "s", dim=256, dtype="float32")
    before = store_arrays(store)
    n = 4100
    np.save(tmp_path / "v.npy", np.ones((n, 256), np.float32))
    good = np.arange(n, dtype=np.int64)
    bad = good.copy()
    bad[-1] = -5
    np.save(tmp_path / "good.npy", good)
    np.save(tmp_path / "bad.npy", bad)
    for column in ("--keys", "--epochs"):
        other = "--epochs" if column == "--keys" else "--keys"
        r = run("import", store, tmp_path / "v.npy", column, tmp_path / "bad.npy",
                other, tmp_path / "good.npy", "--quiet")
        assert r.code == 2, (column, r)
        assert f"bad.npy holds a negative value at position {n - 1}" in one_line(r.err), column
        after = store_arrays(store)
        assert len(after[0]) == 30, column
        assert all(np.array_equal(a, b) for a, b in zip(before, after)), column


def test_import_failing_part_way_into_an_existing_store_says_which_rows_it_committed(tmp_path):
    # The writer may reserve 8 MiB of address space: batches of 4096 rows of 1 KiB fit, then the
    # store is full (18) with the 10,000 rows half imported.
    store = make_store(tmp_path / "s", dim=256, dtype="float32")
    vectors = np.random.default_rng(4).standard_normal((10000, 256)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    np.save(tmp_path / "k.npy", np.arange(1000, 11000, dtype=np.uint64))
    env = dict(os.environ, EMBSTORE_MAP_BYTES=str(8 << 20))
    r = run("import", store, tmp_path / "v.npy", "--keys", tmp_path / "k.npy", "--epoch", 5,
            "--quiet", env=env)
    assert r.code == 18, r
    line = one_line(r.err)
    found = re.search(r"; (\d+) of 10000 rows were imported into (.+) before this "
                      r"\(rows 30\.\.(\d+)\) and stay there$", line)
    assert found and found.group(2) == str(store), line
    imported, end = int(found.group(1)), int(found.group(3))
    assert 0 < imported < 10000 and end == 30 + imported
    # What the message says is what the store holds.
    v, k, e = store_arrays(store)
    assert len(v) == end
    assert np.array_equal(v[30:], vectors[:imported])
    assert np.array_equal(k[30:], np.arange(1000, 1000 + imported)) and (e[30:] == 5).all()


def test_hdf5_keys_and_epochs_must_be_integers_and_never_negative(tmp_path):
    h5 = tmp_path / "d.h5"
    with h5py.File(h5, "w") as f:
        f["vectors"] = np.ones((4, 4), np.float32)
        f["keys"] = np.array([5, -1, -7, 9], np.int64)
        f["epochs"] = np.array([1.9, 2.5, -3.0, 1e30], np.float64)
        f["signed_keys"] = np.array([5, 1, 7, 9], np.int32)
        f["small_epochs"] = np.array([1, 2, 3, 255], np.uint8)
    store = make_store(tmp_path / "s", dim=4, dtype="float32")
    before = hash_tree(store)
    cases = [
        ([store, h5], f"{h5}:/keys holds a negative value at position 1"),
        ([store, h5, "--keys", f"{h5}:/signed_keys"],
         f"{h5}:/epochs holds float64 elements; keys and epochs must be integers"),
        ([tmp_path / "new", h5, "--keys", f"{h5}:/signed_keys"], f"{h5}:/epochs holds float64"),
    ]
    for args, message in cases:
        r = run("import", *args)
        assert r.code == 2, (args, r)
        assert message in one_line(r.err), (args, r)
    assert hash_tree(store) == before
    assert not os.path.exists(tmp_path / "new")
    # Signed and narrow integers that hold no negative value are taken as they are.
    r = run("import", tmp_path / "new", h5, "--keys", f"{h5}:/signed_keys", "--epochs",
            f"{h5}:/small_epochs")
    assert r.code == 0, r
    _, k, e = store_arrays(tmp_path / "new")
    assert list(k) == [5, 1, 7, 9] and list(e) == [1, 2, 3, 255]


def test_import_refuses_an_npy_whose_shape_is_negative_or_overflows(tmp_path):
    data = np.arange(16, dtype=np.float32).tobytes()
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': %s, }"
    write_npy(tmp_path / "ovf.npy", header % "(2, 4611686018427387912)", data)
    write_npy(tmp_path / "wide.npy", header % "(0, 4294967304)")
    write_npy(tmp_path / "neg.npy", header % "(-1, 8)", data)
    store = make_store(tmp_path / "s", dim=8, dtype="float32")
    before = hash_tree(store)
    cases = [
        ("ovf.npy", "ovf.npy is not a .npy file embstore can read: "
                    "shape (2, 4611686018427387912) of '<f4' elements is too large"),
        ("wide.npy", "wide.npy has 4294967304 columns; a store's dim is 1..16777216"),
        ("neg.npy", "neg.npy is not a .npy file embstore can read: "
                    "negative extent in shape (-1, 8)"),
    ]
    for name, message in cases:
        # Into a new store and into an existing one of dim 8, the dim the sizes wrapped to.
        for target in (tmp_path / "new", store):
            r = run("import", target, tmp_path / name)
            assert r.code == 2, (name, target, r)
            assert message in one_line(r.err), (name, target, r)
        assert not os.path.exists(tmp_path / "new")
        assert not [p for p in os.listdir(tmp_path) if ".partial-" in p], name
    assert hash_tree(store) == before


def test_import_names_the_file_and_value_of_an_unparsable_npy_dtype(tmp_path):
    data = np.arange(16, dtype=np.float32).tobytes()
    write_npy(tmp_path / "bad.npy", "{'descr': '<fx', 'fortran_order': False, 'shape': (2, 8), }",
              data)
    r = run("import", tmp_path / "new", tmp_path / "bad.npy")
    assert r.code == 2, r
    assert one_line(r.err) == (f"embstore import: {tmp_path / 'bad.npy'} is not a .npy file "
                               "embstore can read: unsupported dtype '<fx'")
    assert not os.path.exists(tmp_path / "new")


def test_an_output_path_ending_in_a_slash_names_that_directory(store, tmp_path, monkeypatch):
    # The README's example: embstore export run.emb out/ --epoch 9.
    monkeypatch.chdir(tmp_path)
    r = run("export", store, "out/", "--epoch", 1)
    assert r.code == 0, r
    v, k, e = store_arrays(store)
    assert np.array_equal(np.load(tmp_path / "out" / "keys.npy"), k[e == 1])
    r = run("export", store, f"{tmp_path}/abs//")
    assert r.code == 0, r
    assert np.array_equal(np.load(tmp_path / "abs" / "vectors.npy"), v)
    r = run("compact", store, "small/", "--epochs", 2)
    assert r.code == 0, r
    assert np.array_equal(store_arrays(tmp_path / "small")[1], k[e == 2])
    r = run("import", "copy/", "out/")
    assert r.code == 0, r
    assert np.array_equal(store_arrays(tmp_path / "copy")[1], k[e == 1])
    r = run("import", "copy/", "out/")  # into the now existing store
    assert r.code == 0, r
    assert len(embstore.Reader(tmp_path / "copy")) == 20
    # Outputs that exist are still refused, with or without the slash.
    for args in (["export", store, "out/"], ["compact", store, "small/"]):
        r = run(*args)
        assert r.code == 13 and "already exists" in one_line(r.err), (args, r)
    assert sorted(os.listdir(tmp_path)) == ["abs", "copy", "out", "s", "small"]


def test_an_output_whose_directory_is_missing_is_named_with_the_cause(store, tmp_path,
                                                                      monkeypatch):
    # It said "cannot create a working directory in nodir: No such file or directory", naming
    # neither the output asked for nor what to do about it.
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "v.npy", np.ones((2, 4), np.float32))
    (tmp_path / "afile").write_text("")
    for args, out in ((["get", store, 3, "--npy", "nodir/x.npy"], "nodir/x.npy"),
                      (["export", store, "nodir/out"], "nodir/out"),
                      (["export", store, "nodir/out.h5"], "nodir/out.h5"),
                      (["export", store, "nodir/out.csv"], "nodir/out.csv"),
                      (["compact", store, "nodir/small/"], "nodir/small"),
                      (["import", "nodir/new", "v.npy"], "nodir/new")):
        r = run(*args)
        assert r.code == 12, (args, r)
        assert one_line(r.err) == (f"embstore {args[0]}: {out}: cannot write it: its directory "
                                   "nodir does not exist"), (args, r)
    r = run("get", store, 3, "--npy", "afile/x.npy")
    assert one_line(r.err) == "embstore get: afile/x.npy: cannot write it: afile is not a directory"
    assert sorted(os.listdir(tmp_path)) == ["afile", "s", "v.npy"]


def test_hdf5_export_to_a_full_disk_exits_18_with_one_line_and_leaves_nothing(full_disk, tmp_path):
    store = make_store(tmp_path / "s", dim=64, dtype="float32", rows_per_epoch=3000)  # 2.3 MB
    r = run("export", store, full_disk / "o.h5", "--quiet")
    assert r.code == 18, r  # was a crash (139) in HDF5's exit handler
    assert "No space left on device" in one_line(r.err)
    assert os.listdir(full_disk) == []
    # The disk is usable again: a smaller export fits.
    r = run("export", store, full_disk / "small.h5", "--to", 100, "--quiet")
    assert r.code == 0, r
    with h5py.File(full_disk / "small.h5", "r") as f:
        assert np.array_equal(f["vectors"][:], store_arrays(store)[0][:100])


def test_compact_and_import_errors_name_the_output_asked_for(full_disk, tmp_path):
    store = make_store(tmp_path / "s", dim=64, dtype="float32", rows_per_epoch=3000)
    np.save(tmp_path / "v.npy", np.ones((9000, 64), np.float32))
    for args, out in ((["compact", store], full_disk / "c"),
                      (["import"], full_disk / "i")):
        extra = [tmp_path / "v.npy"] if args[0] == "import" else []
        r = run(*args, out, *extra, "--quiet")
        assert r.code == 18, (args, r)
        line = one_line(r.err)
        # The output and the cause first; the working path only in parentheses after them.
        assert line.startswith(f"embstore {args[0]}: {out}: cannot "), line
        hidden = rf"{re.escape(str(full_disk))}/\.{out.name}\.partial-\w+"
        assert re.search(rf": No space left on device \(\S+ \S*{hidden}", line), line
        assert f"{out}/" not in line, line  # no file of an output that does not exist
        assert os.listdir(full_disk) == []


def test_export_errors_name_the_output_asked_for_not_its_working_path(full_disk, tmp_path):
    store = make_store(tmp_path / "s", dim=64, dtype="float32", rows_per_epoch=3000)
    for out in (full_disk / "o", full_disk / "o.csv", full_disk / "o.h5"):
        r = run("export", store, out, "--quiet")
        assert r.code == 18, (out, r)
        line = one_line(r.err)
        # The output and the cause first; the working path only in parentheses after them.
        assert re.match(rf"embstore export: {re.escape(str(out))}: cannot write it: No space left "
                        rf"on device \(.* {re.escape(str(full_disk))}/\.{re.escape(out.name)}"
                        rf"\.partial-\w+", line), (out, line)
        assert os.listdir(full_disk) == []


def test_a_value_that_would_become_infinite_is_refused_naming_row_element_and_value(tmp_path):
    """Rows converted to a narrower float type: a finite value beyond its range became
    infinite without a word (float32 70000 into a float16 store, float64 1e300 into float32),
    in import and in compact --dtype. Refused naming the file, row, element and value; an
    existing store keeps what it had, and a new output is not left behind."""
    vectors = np.array([[1.0, 2.0, 3.0, 4.0], [0.1, 70000.0, 3.0, 4.0]], np.float32)
    np.save(tmp_path / "f32.npy", vectors)
    store = make_store(tmp_path / "s16", dtype="float16", epochs=1)
    r = run("import", store, tmp_path / "f32.npy", "--quiet")
    assert r.code == 2 and one_line(r.err).endswith(
        f"{tmp_path / 'f32.npy'}: row 1, element 1: the float32 value 70000 does not fit in "
        "float16 (it would become infinite); nothing of its batch was stored"), r
    assert len(embstore.Reader(store)) == 10
    r = run("import", tmp_path / "new16", tmp_path / "f32.npy", "--dtype", "float16", "--quiet")
    assert r.code == 2 and one_line(r.err).endswith(
        f"70000 does not fit in float16 (it would become infinite); no store was made at "
        f"{tmp_path / 'new16'}"), r
    assert not (tmp_path / "new16").exists()
    # 65519 rounds to 65504, the largest float16: stored; the same for bfloat16's range.
    np.save(tmp_path / "edge.npy", np.array([[65519.0, -65519.0, 1.0, 2.0]], np.float32))
    r = run("import", tmp_path / "edge16", tmp_path / "edge.npy", "--dtype", "float16", "-q")
    assert r.code == 0, r
    assert embstore.Reader(tmp_path / "edge16").vectors[0, :2].tolist() == [65504.0, -65504.0]
    # bfloat16's largest value is 3.3895e38: 3.39e38 rounds to it, 3.4e38 to infinity.
    np.save(tmp_path / "big.npy", np.array([[3.39e38, 1.0, 2.0, 3.0], [3.4e38, 0, 0, 0]],
                                           np.float32))
    r = run("import", tmp_path / "bf", tmp_path / "big.npy", "--dtype", "bfloat16", "-q")
    assert r.code == 2 and "row 1, element 0: the float32 value 3.4e+38 does not fit in " \
        "bfloat16" in r.err, r
    # float64 beyond float32's range, with the conversion asked for.
    np.save(tmp_path / "f64.npy", np.array([[1.0, 2.0, 1e300, 4.0]]))
    r = run("import", tmp_path / "new32", tmp_path / "f64.npy", "--dtype", "float32", "-q")
    assert r.code == 2 and "row 0, element 2: the float64 value 1e+300 does not fit" in r.err, r
    # compact --dtype float16 of a float32 store holding 70000.
    src = tmp_path / "s32"
    embstore.create(src, dim=4, dtype="float32")
    with embstore.Writer(src) as w:
        w.append([7, 8], vectors, 0)
    r = run("compact", src, tmp_path / "c16", "--dtype", "float16", "--quiet")
    assert r.code == 2 and f"{src}: row 1, element 1: the float32 value 70000" in r.err, r
    # No store is made at the output at all (it said "nothing of its batch was stored").
    assert one_line(r.err).endswith(
        f"(it would become infinite); no store was made at {tmp_path / 'c16'}"), r
    assert not (tmp_path / "c16").exists()
    # NaN and infinities of the input stay what they are.
    np.save(tmp_path / "nonfinite.npy", np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32))
    r = run("import", tmp_path / "nf16", tmp_path / "nonfinite.npy", "--dtype", "float16", "-q")
    assert r.code == 0, r
    got = embstore.Reader(tmp_path / "nf16").vectors[0].astype(np.float32)
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf


def test_import_into_an_existing_store_of_a_narrower_dtype_asks_for_dtype(tmp_path):
    """A float64 file imported into a float32 store was rounded without a word (the Python
    Writer refuses float64 rows for a float32 store). Refused unless --dtype names the store's
    dtype; wider types (float16 into float32) and float32 into a 16-bit store, which every
    Writer takes, are converted as before."""
    store = tmp_path / "s32"
    embstore.create(store, dim=4, dtype="float32")
    values = np.array([[1e-8, 0.1, 3.0, 4.0]])
    np.save(tmp_path / "f64.npy", values)
    r = run("import", store, tmp_path / "f64.npy", "--quiet")
    assert r.code == 15 and one_line(r.err).endswith(
        f"{store} holds float32 rows but {tmp_path / 'f64.npy'} holds float64; give --dtype "
        "float32 to convert them (rounded to the nearest float32)"), r
    assert len(embstore.Reader(store)) == 0
    r = run("import", store, tmp_path / "f64.npy", "--dtype", "float32", "--quiet")
    assert r.code == 0, r
    assert embstore.Reader(store).vectors[0].tolist() == values.astype(np.float32)[0].tolist()
    np.save(tmp_path / "f16.npy", np.array([[0.5, 1.5, 2.5, 65504.0]], np.float16))
    r = run("import", store, tmp_path / "f16.npy", "--quiet")
    assert r.code == 0, r
    assert embstore.Reader(store).vectors[1].tolist() == [0.5, 1.5, 2.5, 65504.0]


def test_an_import_refused_by_an_existing_store_leaves_its_files_as_they_were(tmp_path):
    """An import refused for its rows' dim, dtype or metadata opened a Writer first: the store
    it refused had a new key index file (sized for the rows not imported) and a rewritten
    header. It is checked on a Reader now and the store's files stay byte for byte."""
    store = tmp_path / "s"
    # A store no Writer has opened yet: the first one makes its key index.
    embstore.create(store, dim=4, dtype="float32", metadata={"run": 1})
    n = 5000
    np.save(tmp_path / "dim8.npy", np.ones((n, 8), np.float32))
    np.save(tmp_path / "f64.npy", np.ones((n, 4), np.float64))
    np.save(tmp_path / "f32.npy", np.ones((n, 4), np.float32))
    before = hash_tree(store)
    for args, says in [(["dim8.npy"], "has dim 4"),
                       (["f64.npy"], "holds float32 rows but"),
                       (["f32.npy", "--dtype", "float16"], "--dtype float16 was asked for"),
                       (["f32.npy", "--metadata", '{"run": 2}'], "other metadata")]:
        r = run("import", store, tmp_path / args[0], *args[1:], "--quiet")
        assert r.code == 15 and says in r.err, (args, r)
        assert hash_tree(store) == before, args
    # Refused for a value that would become infinite in the store's dtype: checked before the
    # Writer opens the store too (it was checked after).
    half = tmp_path / "half"
    embstore.create(half, dim=4, dtype="float16")
    before = hash_tree(half)
    rows = np.ones((n, 4), np.float32)
    rows[4000, 1] = 1e6
    np.save(tmp_path / "big.npy", rows)
    r = run("import", half, tmp_path / "big.npy", "--dtype", "float16", "--quiet")
    assert r.code == 2 and "row 4000" in r.err and "infinite" in r.err, r
    assert hash_tree(half) == before


def test_bfloat16_bits_named_by_dtype_have_a_way_into_a_float16_store(tmp_path):
    """bfloat16 bit patterns (--dtype bfloat16) into a float16 store were told to give --dtype
    float16, which then read them as uint16, "not one a store holds" (exit 2): no way in. The
    hint names the one there is, and it works. (A type no store holds is bad input: 2.)"""
    store = tmp_path / "f16"
    embstore.create(store, dim=3, dtype="float16")
    np.save(tmp_path / "i64.npy", np.ones((4, 3), np.int64))
    r = run("import", store, tmp_path / "i64.npy", "--dtype", "float16", "--quiet")
    assert r.code == 2 and "element type '<i8' is not one a store holds" in r.err, r
    np.save(tmp_path / "bits.npy", np.full((4, 3), 0x3F80, np.uint16))  # bfloat16 1.0
    r = run("import", store, tmp_path / "bits.npy", "--dtype", "bfloat16", "--quiet")
    assert r.code == 15, r
    assert one_line(r.err).endswith(
        "to round them to float16, import an export whose embstore.json says bfloat16, with "
        "--dtype float16"), r
    export = tmp_path / "bf"
    export.mkdir()
    os.rename(tmp_path / "bits.npy", export / "vectors.npy")
    (export / "embstore.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert run("import", store, export, "--dtype", "float16", "--quiet").code == 0
    assert embstore.Reader(store).vectors.tolist() == [[1.0, 1.0, 1.0]] * 4
    assert len(embstore.Reader(store)) == 4


def test_hdf5_floats_of_a_non_ieee_layout_are_refused_and_uint16_reads_as_bfloat16(tmp_path):
    """A 2-byte HDF5 float of bfloat16's layout (8 exponent bits) was read as IEEE half, its
    values overflowing to infinity; it is refused, naming the layout. uint16 data with
    --dtype bfloat16 reads as bfloat16 bit patterns, as --help says (it was refused)."""
    t = h5py.h5t.IEEE_F32LE.copy()
    t.set_fields(15, 7, 8, 0, 7)
    t.set_size(2)
    t.set_ebias(127)
    bits = (np.array([[1e6, 3.0e38, 0.1, -70000.0]], np.float32).view(np.uint32) >> 16)
    bits = bits.astype(np.uint16)
    with h5py.File(tmp_path / "bf.h5", "w") as f:
        dataset = h5py.h5d.create(f.id, b"vectors", t, h5py.h5s.create_simple((1, 4)))
        dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, bits, mtype=t)
        f.create_dataset("u16", data=bits)
    r = run("import", tmp_path / "st", tmp_path / "bf.h5", "--quiet")
    assert r.code == 2 and "float16 of a layout other than IEEE binary16/32/64" in r.err, r
    assert not (tmp_path / "st").exists()
    r = run("import", tmp_path / "bf16", f"{tmp_path / 'bf.h5'}:u16", "--dtype", "bfloat16", "-q")
    assert r.code == 0, r
    reader = embstore.Reader(tmp_path / "bf16")
    assert reader.dtype == "bfloat16" and reader.vectors[0].tolist() == bits[0].tolist()


@pytest.mark.parametrize("command", [["export", "--format", "csv"], ["export", "--format", "npy"],
                                     ["compact"]])
def test_an_output_inside_the_store_read_is_refused(store, tmp_path, monkeypatch, command):
    """export and compact wrote into the store they read (merge and salvage refused): a
    Writer of the store later removed the file (rows.7 looks like another generation's)."""
    before = hash_tree(store)
    for out in [os.path.join(store, "rows.7"), os.path.join(store, "sub", "..", "x"), "inside"]:
        if out == "inside":
            monkeypatch.chdir(store)  # a bare relative name, from a directory inside the store
        r = run(command[0], store, out, *command[1:], "--quiet")
        assert r.code == 2 and "inside the store" in r.err and "only read" in r.err, (out, r)
    assert hash_tree(store) == before


def test_two_imports_creating_the_same_store_both_store_their_rows(tmp_path):
    """import creates the store if needed: of two imports that both found no store and built
    one, the second to publish failed "already exists" (exit 13) and imported nothing. It now
    appends to the store the first made, as into any existing store."""
    data = tmp_path / "v.npy"
    np.save(data, np.random.default_rng(3).standard_normal((200_000, 64)).astype(np.float32))
    store = tmp_path / "race"
    procs = [subprocess.Popen([CLI, "import", str(store), str(data), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    assert sum("new store" in out for _, out, _ in results) == 1, results
    reader = embstore.Reader(store)
    assert len(reader) == 400_000 and reader.verify().ok
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_import_beside_another_writer_reports_the_rows_it_took(tmp_path):
    """Another process appending while an import runs: the summary said 'rows a..a+n' where
    other writers' rows lay inside that range and the import's last rows beyond it. The
    summary (text and --json) says what the store holds: a range whose rows are all the
    import's, or the range the import's rows lie in, among other writers' rows."""
    store = tmp_path / "s"
    embstore.create(store, dim=64)
    n = 200_000
    np.save(tmp_path / "v.npy", np.ones((n, 64), np.float32))
    np.save(tmp_path / "k.npy", np.arange(n, dtype=np.uint64) + 10**9)
    appender = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, numpy as np, embstore
        with embstore.Writer(sys.argv[1]) as w:
            for i in range(10**9):  # 50 rows at a time until killed
                w.append(np.arange(50), np.zeros((50, 64), np.float32), 0)
                if i == 0:
                    print("appending", flush=True)
        """), str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert appender.stdout.readline() == "appending\n"
        r = run("import", store, tmp_path / "v.npy", "--keys", tmp_path / "k.npy", "--json",
                "--quiet")
    finally:
        appender.kill()
        appender.wait()
    assert r.code == 0, r
    report = json.loads(r.out)
    keys = embstore.Reader(store).keys
    first, end = report["first_row"], report["end_row"]
    mine = np.flatnonzero(keys >= 10**9)
    assert report["rows"] == n == len(mine) and mine[0] == first and mine[-1] == end - 1
    assert report["contiguous"] == (end - first == n)


def test_conversions_round_once_and_refused_values_leave_an_existing_store_as_it_was(tmp_path):
    """From a review of the conversion checks: a value refused in the last batch of an import
    into an existing store left the earlier batches there (a retry stored them twice); bfloat16
    bit patterns named by --dtype bfloat16 were rounded into a float16 store without a word
    (1e-10 became 0); float64 went to 16-bit types through float32 rounded to nearest, rounding
    twice (1 + 2^-11 + 2^-40 became 1.0, 65519.99999999 was refused as beyond float16)."""
    store = make_store(tmp_path / "s16", dtype="float16", epochs=1)
    rows = np.zeros((300_000, 4), np.float32)
    rows[-1, 3] = 70000.0
    np.save(tmp_path / "big.npy", rows)
    r = run("import", store, tmp_path / "big.npy", "--quiet")
    assert r.code == 2 and "row 299999, element 3: the float32 value 70000" in r.err, r
    assert "were imported" not in r.err and len(embstore.Reader(store)) == 10
    bits = np.array([[0x3F81, 0x2EDB, 0, 0]], np.uint16)  # bfloat16 1.0078125 and ~1e-10
    np.save(tmp_path / "bf16.npy", bits)
    r = run("import", store, tmp_path / "bf16.npy", "--dtype", "bfloat16", "--quiet")
    assert r.code == 15 and "holds float16 rows but" in r.err and "holds bfloat16" in r.err, r
    assert len(embstore.Reader(store)) == 10
    values = np.array([[1 + 2**-11 + 2**-40, 65519.99999999, -(1 + 2**-11 + 2**-40), 0.5]])
    np.save(tmp_path / "f64.npy", values)
    r = run("import", tmp_path / "n16", tmp_path / "f64.npy", "--dtype", "float16", "--quiet")
    assert r.code == 0, r
    got = embstore.Reader(tmp_path / "n16").vectors[0]
    assert got.tolist() == values[0].astype(np.float16).tolist()  # numpy rounds once
    assert got.tolist() == [1.0009765625, 65504.0, -1.0009765625, 0.5]


def test_an_output_inside_the_store_under_a_bind_mount_is_refused(store, tmp_path):
    """The store's directory under another name (a bind mount): export wrote into the store,
    and its next Writer removed the file."""
    with bind_mounted(store, tmp_path / "alias") as alias:
        before = hash_tree(store)
        for command in (["export", store, alias / "rows.7", "--format", "csv"],
                        ["compact", store, alias / "c"]):
            r = run(*command, "--quiet")
            assert r.code == 2 and "inside the store" in r.err, (command, r)
        assert hash_tree(store) == before


def test_options_of_a_new_store_given_for_an_existing_one_are_refused_not_ignored(tmp_path):
    """import --metadata / --segment-mb into an existing store exited 0 and ignored them (from
    a review). Refused when they differ from what the store has; nothing is appended."""
    store = make_store(tmp_path / "s", dtype="float32", epochs=1, metadata={"model": "A"})
    np.save(tmp_path / "v.npy", np.ones((3, 4), np.float32))
    r = run("import", store, tmp_path / "v.npy", "--metadata", '{"model": "B"}', "--quiet")
    assert r.code == 15 and "--metadata is for a new store" in r.err, r
    r = run("import", store, tmp_path / "v.npy", "--segment-mb", 3, "--quiet")
    assert r.code == 15 and "--segment-mb is for a new store" in r.err, r
    assert len(embstore.Reader(store)) == 10
    segment_mb = embstore.info(store)["segment_bytes"] / 2**20
    r = run("import", store, tmp_path / "v.npy", "--metadata", '{"model":"A"}', "--segment-mb",
            segment_mb, "--quiet")  # the same JSON, spaced otherwise
    assert r.code == 0 and len(embstore.Reader(store)) == 13, r


def test_import_of_a_npy_file_with_a_dataset_suffix_is_refused_naming_it(tmp_path):
    # "v.npy:/foo" imported v.npy whole: the suffix, meaningful for HDF5 only, was dropped.
    np.save(tmp_path / "v.npy", np.ones((3, 4), np.float32))
    np.save(tmp_path / "k.npy", np.arange(3, dtype=np.uint64))
    for args in ([f"{tmp_path / 'v.npy'}:/foo"],
                 [tmp_path / "v.npy", "--keys", f"{tmp_path / 'k.npy'}:/ids"]):
        r = run("import", tmp_path / "new", *args, "-q")
        assert r.code == 2, (args, r)
        spec = str(args[-1])
        file = spec.rsplit(":", 1)[0]
        assert one_line(r.err) == (f"embstore import: {spec}: {file} is not an HDF5 file, and "
                                   f"only an HDF5 file has datasets (\"{spec[len(file):]}\"); "
                                   "give the .npy file alone"), r
        assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("source", ["int8", "uint8"])
def test_integer_rows_into_a_float_store_get_no_hint_that_does_not_work(tmp_path, source):
    # The refusal said "give --dtype float32 to convert them", and --dtype float32 then said
    # "cannot convert int8 rows to float32", naming no file.
    store = tmp_path / "f32"
    embstore.create(store, dim=3, dtype="float32")
    npy = tmp_path / "i.npy"
    np.save(npy, np.array([[1, 2, 3]], source))
    r = run("import", store, npy, "-q")
    assert r.code == 15, r
    assert one_line(r.err) == (f"embstore import: {store} holds float32 rows but {npy} holds "
                               f"{source} (import converts rows between float types only)")
    # The same refusal into a new store exits as into an existing one (15, not 2).
    r = run("import", tmp_path / "new", npy, "--dtype", "float32", "-q")
    assert r.code == 15, r
    assert one_line(r.err) == (f"embstore import: {npy} holds {source} rows but --dtype float32 "
                               "was asked for (import converts rows between float types only; "
                               "int8 and uint8 rows go only into a store of their own dtype)")
    r = run("import", store, npy, "--dtype", "float32", "-q")
    assert r.code == 15, r
    assert len(embstore.Reader(str(store))) == 0 and not os.path.exists(tmp_path / "new")
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_compact_into_a_wider_dtype_keeps_rows_per_segment(tmp_path):
    """A float16 store of 4 KiB segments (dim 2048: one row a segment) compacted to float32 kept
    the 4 KiB segment, smaller than one float32 row, and was refused (exit 2)."""
    source = str(tmp_path / "h")
    with embstore.Writer(source, dim=2048, dtype="float16", segment_mb=4096 / (1 << 20)) as w:
        w.append([1, 2], np.ones((2, 2048), np.float16), 0)
    r = run("compact", source, tmp_path / "wide", "--dtype", "float32")
    assert r.code == 0, r
    wide = embstore.Reader(tmp_path / "wide")
    assert wide.dtype == "float32" and wide.info()["segment_bytes"] == 8192
    assert np.array_equal(wide.vectors, np.ones((2, 2048), np.float32))


def test_import_of_rows_larger_than_the_default_segment_into_a_new_store(tmp_path):
    """A 2-D .npy of float64 rows of dim 2^24 (128 MiB each) into a new store: the default 64 MiB
    segment refused them ("segment_bytes 67108864 is smaller than one row"), naming an option
    never given. The new store gets segments of one row."""
    dim = 1 << 24
    source = tmp_path / "big.npy"
    np.save(source, np.full((1, dim), 0.25))
    np.save(tmp_path / "keys.npy", np.array([9], np.uint64))
    r = run("import", tmp_path / "s", source, "--keys", tmp_path / "keys.npy", "--epoch", "1")
    assert r.code == 0, r
    s = embstore.Reader(tmp_path / "s")
    assert s.info()["segment_bytes"] == 128 << 20 and s.keys.tolist() == [9]
    assert s.vectors[0, ::1 << 20].tolist() == [0.25] * 16


def test_import_into_an_empty_directory_makes_the_store_there_and_empties_it_on_failure(
        tmp_path):
    # An empty directory (a mounted volume, say) was refused as "not an embstore store", where
    # create and the Python import_npy make the store in it.
    vectors = np.random.default_rng(2).standard_normal((30, 4)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    store = tmp_path / "empty"
    store.mkdir()
    r = run("import", store, tmp_path / "v.npy", "--epoch", 2, "--quiet")
    assert r.code == 0, r
    v, k, e = store_arrays(store)
    assert np.array_equal(v, vectors) and np.array_equal(k, np.arange(30)) and (e == 2).all()
    # Failing after the store was made (a value float16 cannot hold), the store it made is
    # removed: the directory is empty again, as before the import.
    vectors[29, 1] = 1e6
    np.save(tmp_path / "v.npy", vectors)
    again = tmp_path / "again"
    again.mkdir()
    r = run("import", again, tmp_path / "v.npy", "--dtype", "float16", "--quiet")
    assert r.code != 0 and "does not fit in float16" in r.err, r
    assert os.listdir(again) == []


def test_an_import_into_an_empty_directory_killed_midway_leaves_no_store_there(tmp_path):
    """From a review: the store was built in the directory itself, its rows appended there, so
    an import killed half-way left a store of part of the rows that verified clean, as if
    finished. It is built in a hidden directory inside and moved up, the header last."""
    n = 300_000
    np.save(tmp_path / "v.npy", np.ones((n, 16), np.float32))
    killed_mid_way = 0
    # The import takes ~100 ms, and a busy machine may not run the poller in time: several
    # attempts, as the compact and merge tests make, of which at least one must be killed.
    for attempt in range(5):
        store = tmp_path / f"volume{attempt}"
        store.mkdir()
        proc = subprocess.Popen([CLI, "import", str(store), str(tmp_path / "v.npy"), "--quiet"])

        def rows_in_progress():
            for name in os.listdir(store):
                if ".partial-" in name:
                    try:
                        return embstore.info(store / name)["committed_rows"] > 0
                    except (OSError, embstore.Error):
                        return False
            return False

        if kill_when(proc, rows_in_progress, 60):
            killed_mid_way += 1
            # No store at the path: only the hidden working directory, to delete.
            assert "header" not in os.listdir(store), os.listdir(store)
            with pytest.raises((FileNotFoundError, embstore.Error)):
                embstore.Reader(store)
            assert [name.startswith(".store.partial-") for name in os.listdir(store)] == [True]
        else:
            assert proc.returncode == 0 and len(embstore.Reader(store)) == n
    assert killed_mid_way >= 1, "every import ended before it could be killed"
    # Finished, the store is there whole, with nothing else in the directory.
    other = tmp_path / "finished"
    other.mkdir()
    r = run("import", other, tmp_path / "v.npy", "--quiet")
    assert r.code == 0, r
    assert len(embstore.Reader(other)) == n and not partial_dirs(other)
    assert not [name for name in os.listdir(other) if name.startswith(".")]


@pytest.mark.parametrize("command,sig", [("import", signal.SIGINT), ("export", signal.SIGTERM),
                                         ("compact", signal.SIGINT), ("merge", signal.SIGINT),
                                         ("salvage", signal.SIGTERM)])
def test_a_stop_signal_cleans_up_says_so_and_exits_as_a_shell_reports_it(tmp_path, command, sig):
    """From a review: Ctrl-C or SIGTERM killed a long command outright: no word on stderr, its
    hidden .partial-* directory left behind, and an import into an existing store kept the rows
    it had appended without saying so (a retry stores them twice)."""
    n = 1_500_000
    src = tmp_path / "src"
    embstore.create(src, dim=8, segment_mb=SEGMENT_MB)
    with embstore.Writer(src) as w:
        for first in range(0, n, 100_000):
            w.append(np.arange(first, first + 100_000), np.ones((100_000, 8), np.float32), 0)
    if command == "import":  # long enough for a signal to come in the middle
        np.save(tmp_path / "v.npy", np.ones((4 * n, 8), np.float32))
    out = tmp_path / "out"
    args = {"import": [src, tmp_path / "v.npy", "--epoch", 1],
            "export": [src, out, "--format", "csv"], "compact": [src, out, "--epochs", 0],
            "merge": [out, src], "salvage": [src, out]}[command]
    proc = subprocess.Popen([CLI, command, *map(str, args), "--quiet"], stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if command == "import":
            started = embstore.info(src)["committed_rows"] > n
        else:
            started = any(".partial-" in name for name in os.listdir(tmp_path))
        if started:
            break
        time.sleep(0.001)
    if command != "import":  # the others: past the hidden directory's creation
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate()[1]
    if proc.returncode == 0:
        pytest.skip(f"{command} finished before the signal came")
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert f"embstore {command}: interrupted by {name}" in err, err
    assert not partial_dirs(tmp_path) and not out.exists(), os.listdir(tmp_path)
    if command == "import":
        stayed = embstore.info(src)["committed_rows"] - n
        assert f"{stayed} of {4 * n} rows were imported into {src}" in err, err
        assert "stay there" in err, err
    assert embstore.Reader(src).verify().ok


@pytest.mark.parametrize("command", ["export", "compact", "import"])
def test_an_empty_output_path_is_refused_before_any_work(tmp_path, command):
    # "" passed every check (a path "that does not exist"): export and compact did the whole
    # job, then failed to rename it to "" (exit 12, "No such file or directory"); import made
    # a new store to fail the same way.
    store = make_store(tmp_path / "s.emb")
    np.save(tmp_path / "x.npy", np.ones((10, 4), np.float32))
    args = {"export": ["export", store, ""], "compact": ["compact", store, ""],
            "import": ["import", "", tmp_path / "x.npy"]}[command]
    r = run(*args)
    assert r.code == 2, r
    assert "path is empty" in r.err, r
    assert not [n for n in os.listdir(".") if ".partial-" in n]


def test_import_compact_and_merge_build_the_key_index_once_for_their_rows(tmp_path):
    """They know the rows the new store will hold: its key index is built for them at once
    (keys.1), not grown on the way (each growth indexes every row again: keys.2 here before, and
    one more generation at each doubling of larger stores). An import into an existing store
    grows straight to tables for its rows."""
    rng = np.random.default_rng(3)
    n = 30000  # a key index of 1,024 slots would grow 5 times on the way
    keys = rng.choice(2**40, size=n, replace=False).astype(np.uint64)
    np.save(tmp_path / "v.npy", rng.standard_normal((n, 8)).astype(np.float32))
    np.save(tmp_path / "k.npy", keys)

    def key_files(store):
        with embstore.Reader(store) as r:
            assert r.find(int(keys[-1])) == len(r) - 1
            assert f"{len(r)} rows indexed" in r.info()["key_index"]
        return sorted(f for f in os.listdir(store) if f.startswith("keys."))

    imported = tmp_path / "imported"
    assert run("import", imported, tmp_path / "v.npy", "--keys", tmp_path / "k.npy", "-q").code == 0
    assert key_files(imported) == ["keys.1"]
    compacted = tmp_path / "compacted"
    assert run("compact", imported, compacted, "-q").code == 0
    assert key_files(compacted) == ["keys.1"]
    merged = tmp_path / "merged"
    assert run("merge", merged, imported, compacted, "-q").code == 0
    assert key_files(merged) == ["keys.1"]
    # Into an existing store of a few rows: one growth, to tables for the rows imported.
    existing = tmp_path / "existing"
    with embstore.Writer(existing, dim=8) as w:
        w.append([2**41], np.zeros((1, 8), np.float32))
    assert run("import", existing, tmp_path / "v.npy", "--keys", tmp_path / "k.npy", "-q").code == 0
    assert key_files(existing) == ["keys.2"]


def test_an_export_sidecar_names_its_files_and_a_bad_name_is_refused(tmp_path):
    """The files an npy export's embstore.json lists under "files" are the ones read: a sidecar
    naming ids.npy for the keys had its keys.npy read, or, with none, was told that keys.npy
    was listed. A name that is no file of the export's directory is refused, naming it."""
    src = tmp_path / "src"
    with embstore.Writer(src, dim=3, dtype="float32") as w:
        w.append([1001, 1002], np.ones((2, 3), np.float32), epoch=4)
    out = tmp_path / "out"
    assert run("export", src, out, "--quiet").code == 0
    os.rename(out / "keys.npy", out / "ids.npy")
    np.save(out / "keys.npy", np.array([5, 6], np.uint64))  # not the export's: not read
    side = json.loads((out / "embstore.json").read_text())
    side["files"]["keys"] = "ids.npy"
    (out / "embstore.json").write_text(json.dumps(side))
    assert run("import", tmp_path / "a", out, "--quiet").code == 0
    assert store_arrays(tmp_path / "a")[1].tolist() == [1001, 1002]
    os.remove(out / "ids.npy")
    r = run("import", tmp_path / "b", out, "--quiet")
    assert r.code == 12 and one_line(r.err).startswith(
        f"embstore import: {out}/ids.npy is missing, but {out}/embstore.json lists it"), r
    for bad in ["../src/keys.npy", "", 7]:
        side["files"]["keys"] = bad
        (out / "embstore.json").write_text(json.dumps(side))
        r = run("import", tmp_path / "c", out, "--quiet")
        assert r.code == 2 and one_line(r.err) == (
            f"embstore import: {out}/embstore.json: files.keys must be the name of a file in "
            f"the export's directory; got {json.dumps(bad)}"), (bad, r)
    assert not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "c")


@pytest.mark.parametrize("fmt", ["npy", "hdf5"])
@pytest.mark.parametrize("lost", ["keys", "epochs"])
def test_an_export_missing_its_keys_or_epochs_is_refused_naming_them(tmp_path, fmt, lost):
    # The rows were imported with keys 0..n-1 (or epoch 0), exit 0 and no word: lookups by the
    # real sample ids then missed, or found another sample (key 1 held sample 1002).
    src = tmp_path / "src"
    with embstore.Writer(src, dim=3, dtype="float32") as w:
        w.append([1001, 1002], np.ones((2, 3), np.float32), epoch=4)
    out = tmp_path / ("out" if fmt == "npy" else "out.h5")
    assert run("export", src, out, "--quiet").code == 0
    if fmt == "npy":
        os.remove(out / f"{lost}.npy")
        missing, because, what = (f"{out}/{lost}.npy", f"{out}/embstore.json lists it among "
                                  "the export's files", "file")
    else:
        with h5py.File(out, "a") as f:
            del f[lost]
        missing, because, what = (f"{out}:/{lost}", f"{out} is an embstore export (root "
                                  "attribute embstore_format), which holds it", "dataset")
    instead = "--keys" if lost == "keys" else "--epochs or --epoch"
    message = (f"embstore import: {missing} is missing, but {because}: the export is incomplete "
               "(a copy cut short?), and nothing was imported; restore the " + what +
               f", or give {instead} to choose the rows' {lost}")
    existing = make_store(tmp_path / "existing", dim=3, dtype="float32")
    before = hash_tree(existing)
    for store in (tmp_path / "new", existing):
        r = run("import", store, out)
        assert r.code == 12 and one_line(r.err) == message, r  # as a missing vectors.npy
    assert not os.path.exists(tmp_path / "new") and hash_tree(existing) == before
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    # Naming the column makes what is missing unneeded; the rest comes from the export.
    np.save(tmp_path / "k.npy", np.array([5, 6], np.uint64))
    given = ["--keys", tmp_path / "k.npy"] if lost == "keys" else ["--epoch", 9]
    assert run("import", tmp_path / "new", out, *given, "--quiet").code == 0
    _, k, e = store_arrays(tmp_path / "new")
    assert k.tolist() == ([5, 6] if lost == "keys" else [1001, 1002])
    assert e.tolist() == ([4, 4] if lost == "keys" else [9, 9])
    # Without an export's word (a directory of .npy files with no sidecar, an HDF5 file without
    # embstore_format), keys are still the rows' positions and the epoch 0.
    if fmt == "npy":
        os.remove(out / "embstore.json")
    else:
        with h5py.File(out, "a") as f:
            del f.attrs["embstore_format"]
    assert run("import", tmp_path / "plain", out, "--quiet").code == 0
    _, k, e = store_arrays(tmp_path / "plain")
    assert k.tolist() == ([0, 1] if lost == "keys" else [1001, 1002])
    assert e.tolist() == ([4, 4] if lost == "keys" else [0, 0])


def test_keys_or_epochs_of_another_shape_are_named_by_their_shape(tmp_path):
    # A (4, 1) keys file was "must be a 1-D integer array, not '<u8'" (the dtype, which is
    # right), a (1, 4), (2, 2) or 0-d one "has 1 (2) entries but v.npy has 4 rows".
    np.save(tmp_path / "v.npy", np.zeros((4, 3), np.float32))
    cases = {"k41": np.arange(4, dtype=np.uint64).reshape(4, 1),
             "k14": np.arange(4, dtype=np.uint64).reshape(1, 4),
             "k22": np.arange(4, dtype=np.int64).reshape(2, 2),
             "k0d": np.array(7, np.uint64)}
    for name, array in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["vectors"] = np.zeros((4, 3), np.float32)
        f["keys"] = np.arange(4, dtype=np.uint64).reshape(1, 4)
    existing = make_store(tmp_path / "existing", dim=3, dtype="float32")
    before = hash_tree(existing)
    expected = []
    for name, array in cases.items():
        expected.append((["--keys", tmp_path / f"{name}.npy"], tmp_path / "v.npy",
                         f"{tmp_path / name}.npy has shape {array.shape}; expected (4,): one "
                         f"key per row of {tmp_path / 'v.npy'}"))
    expected.append((["--epochs", tmp_path / "k41.npy"], tmp_path / "v.npy",
                     f"{tmp_path / 'k41'}.npy has shape (4, 1); expected (4,): one epoch per row "
                     f"of {tmp_path / 'v.npy'}"))
    expected.append(([], tmp_path / "d.h5", f"{tmp_path / 'd.h5'}:/keys has shape (1, 4); "
                     f"expected (4,): one key per row of {tmp_path / 'd.h5'}:/vectors"))
    for options, source, message in expected:
        for store in (tmp_path / "new", existing):
            r = run("import", store, source, *options)
            assert r.code == 2 and one_line(r.err) == f"embstore import: {message}", r
    assert not os.path.exists(tmp_path / "new") and hash_tree(existing) == before


def test_the_keys_an_hdf5_dataset_takes_by_default_are_named_as_such_when_they_do_not_fit(
        tmp_path):
    # FILE.h5:/other4 took the file's /keys (written for /vectors) without being asked, and
    # their length was blamed on /keys, with no word of --keys.
    h5 = tmp_path / "two.h5"
    with h5py.File(h5, "w") as f:
        f["vectors"] = np.ones((3, 2), np.float32)
        f["keys"] = np.array([100, 101, 102], np.uint64)
        f["epochs"] = np.array([9, 9, 9], np.uint64)
        f["other4"] = np.full((4, 2), 5, np.float32)
    r = run("import", tmp_path / "new", f"{h5}:/other4")
    assert r.code == 2 and one_line(r.err) == (
        f"embstore import: {h5}:/keys has 3 entries but {h5}:/other4 has 4 rows; {h5}:/keys was "
        f"taken as the keys of {h5}:/other4 by default, being the source's own: give --keys to "
        "choose others"), r
    np.save(tmp_path / "k.npy", np.arange(4, dtype=np.uint64))
    r = run("import", tmp_path / "new", f"{h5}:/other4", "--keys", tmp_path / "k.npy")
    assert r.code == 2 and one_line(r.err).endswith(
        f"{h5}:/epochs was taken as the epochs of {h5}:/other4 by default, being the source's "
        "own: give --epochs or --epoch to choose others"), r
    # Keys named by an option are not said to be a default.
    r = run("import", tmp_path / "new", f"{h5}:/other4", "--keys", f"{h5}:/keys", "--epoch", 1)
    assert r.code == 2 and one_line(r.err) == (
        f"embstore import: {h5}:/keys has 3 entries but {h5}:/other4 has 4 rows"), r
    assert not os.path.exists(tmp_path / "new")
    assert run("import", tmp_path / "new", f"{h5}:/other4", "--keys", tmp_path / "k.npy",
               "--epoch", 1, "--quiet").code == 0


def test_counts_of_one_row_are_singular_in_every_report(tmp_path):
    # "imported 1 rows", and so on in every report that counts rows.
    np.save(tmp_path / "v.npy", np.ones((1, 4), np.float32))
    store, out = tmp_path / "s", tmp_path / "out"
    r = run("import", store, tmp_path / "v.npy")
    assert r.code == 0, r
    assert r.out.startswith(f"imported 1 row from {tmp_path / 'v.npy'} into new store {store} ")
    r = run("export", store, out)
    assert r.code == 0 and r.out.startswith("exported 1 row (16 bytes of float32) from "), r
    r = run("compact", store, tmp_path / "small")
    assert r.code == 0 and re.match(rf"compacted {store} \(1 row, \d+ bytes\) into "
                                    rf"{tmp_path / 'small'} \(1 row, \d+ bytes\)\n$", r.out), r
    r = run("merge", tmp_path / "merged", store)
    assert r.code == 0 and r.out == f"merged 1 shard, 1 row, into {tmp_path / 'merged'}\n", r
    r = run("get", store, 5)
    assert r.code == 12 and r.err.endswith(f"key 5 is not in {store} (1 row)\n"), r
    r = run("export", store, tmp_path / "late", "--from", 2)
    assert r.code == 2 and "(1 row)" in r.err, r
    r = run("truncate", store, "--rows", 1, "--yes")
    assert r.code == 0 and r.out == f"{store}: nothing to drop (1 row kept)\n", r
    r = run("truncate", store, "--rows", 2, "--yes")
    assert r.code == 2 and "--rows 2 is more than the 1 row the store holds" in r.err, r
    np.save(tmp_path / "keys.npy", np.arange(2, dtype=np.uint64))
    r = run("import", store, tmp_path / "v.npy", "--keys", tmp_path / "keys.npy")
    assert r.code == 2 and "has 2 entries but" in r.err and "has 1 row" in r.err, r


def test_export_takes_its_format_from_the_suffix_in_any_case(tmp_path):
    # OUT.H5 was written as an npy directory named OUT.H5.
    store = make_store(tmp_path / "s")
    for name, format in (("OUT.H5", "hdf5"), ("out.Hdf5", "hdf5"), ("ROWS.CSV", "csv"),
                         ("out.h5", "hdf5"), ("dir.H5x", "npy")):
        r = run("export", store, tmp_path / name, "--json")
        assert r.code == 0, (name, r)
        assert json.loads(r.out)["format"] == format, name
        assert os.path.isdir(tmp_path / name) == (format == "npy"), name
    with h5py.File(tmp_path / "OUT.H5", "r") as f:
        assert f["vectors"].shape == (30, 4)
    assert open(tmp_path / "ROWS.CSV").readline().startswith("row,key,epoch,v0")
