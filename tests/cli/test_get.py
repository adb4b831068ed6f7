"""embstore get: a sample's vector by key (latest, at an epoch, every version) as a table, JSON or
.npy, through the key index; missing keys and epochs, bad numbers; the store left as it was."""

import json
import os

import numpy as np
import pytest

import embstore
from conftest import hash_tree, make_store, run

NOT_FOUND, ALREADY_EXISTS, USAGE, FULL = 12, 13, 2, 18


def one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def store(tmp_path):
    """Epoch e holds keys e..e+9 (make_store); then key 5 again in epoch 1, which wins."""
    path = make_store(tmp_path / "s", dim=4, dtype="float32")
    with embstore.Writer(path) as w:
        w.append(keys=np.array([5], dtype=np.uint64),
                 vectors=np.full((1, 4), 7.5, dtype=np.float32), epoch=1)
    return path


def test_get_latest_and_at_an_epoch_print_the_row_and_its_vector(store):
    r = embstore.Reader(store)
    latest = run("get", store, 5)
    assert latest.code == 0, latest
    lines = latest.out.splitlines()
    assert lines[0].split() == ["row", "key", "epoch", "vector"]
    # The latest row of key 5 is the duplicate appended last (row 30, epoch 1).
    assert lines[1].split()[:3] == ["30", "5", "1"]
    assert "[7.5 7.5 7.5 7.5]" in lines[1]
    at0 = run("get", store, 5, "--epoch", 0)
    assert at0.code == 0, at0
    fields = at0.out.splitlines()[1].split()
    assert fields[:3] == ["5", "5", "0"]
    values = [float(v.strip("[]")) for v in fields[3:]]
    assert np.allclose(values, r.vectors[5])
    assert latest.err == "" and at0.err == ""


def test_get_help_names_the_options_and_the_exit_codes():
    r = run("get", "--help")
    assert r.code == 0, r
    assert "Usage: embstore get" in r.out
    for option in ("--epoch", "--history", "--json", "--npy"):
        assert option in r.out
    assert "12" in r.out and r.err == ""
    assert "  get " in run("--help").out


def test_get_json_later_row_wins_and_history_lists_every_version(store):
    r = embstore.Reader(store)
    one = run("get", store, 5, "--epoch", 1, "--json")
    assert one.code == 0, one
    row = json.loads(one.out)
    assert (row["row"], row["key"], row["epoch"]) == (30, 5, 1)  # Not row 14: the later row.
    assert row["vector"] == [7.5] * 4
    hist = run("get", store, 5, "--history", "--json")
    assert hist.code == 0, hist
    doc = json.loads(hist.out)
    assert doc["key"] == 5
    assert [(v["row"], v["epoch"]) for v in doc["versions"]] == [(5, 0), (14, 1), (23, 2), (30, 1)]
    assert [(h[0], h[1]) for h in r.history(5)] == [(5, 0), (14, 1), (23, 2), (30, 1)]
    for v in doc["versions"]:
        assert np.allclose(v["vector"], r.vectors[v["row"]])
    # --history with --epoch: both rows of (5, 1), in commit order.
    both = json.loads(run("get", store, 5, "--epoch", 1, "--history", "--json").out)
    assert [v["row"] for v in both["versions"]] == [14, 30]


def test_get_npy_reads_back_with_numpy(store, tmp_path):
    r = embstore.Reader(store)
    out = tmp_path / "v.npy"
    res = run("get", store, 7, "--epoch", 2, "--npy", out)
    assert res.code == 0, res
    v = np.load(out)
    assert v.shape == (4,) and v.dtype == np.float32
    assert np.array_equal(v, r.vectors[r.find(7, 2)])
    hist = tmp_path / "h.npy"
    assert run("get", store, 7, "--history", "--npy", hist).code == 0
    m = np.load(hist, mmap_mode="r")
    rows = [row for row, _ in r.history(7)]
    assert m.shape == (len(rows), 4) and np.array_equal(m, r.vectors[rows])
    # An existing output is refused, not overwritten.
    again = run("get", store, 7, "--npy", out)
    assert again.code == ALREADY_EXISTS, again
    assert str(out) in one_line(again.err)
    assert np.array_equal(np.load(out), v)
    # --npy and --json do not go together.
    assert run("get", store, 7, "--npy", tmp_path / "x.npy", "--json").code == USAGE
    assert not os.path.exists(tmp_path / "x.npy")


def test_get_bfloat16_npy_is_the_bit_patterns(tmp_path):
    path = make_store(tmp_path / "b", dim=4, dtype="bfloat16")
    r = embstore.Reader(path)
    out = tmp_path / "b.npy"
    res = run("get", path, 3, "--epoch", 1, "--npy", out)
    assert res.code == 0, res
    assert "uint16" in res.out
    v = np.load(out)
    assert v.dtype == np.uint16 and np.array_equal(v, r.vectors[r.find(3, 1)])


def test_get_missing_key_is_one_line_and_exit_12(store):
    r = run("get", store, 999)
    assert r.code == NOT_FOUND, r
    assert one_line(r.err) == f"embstore get: key 999 is not in {store} (31 rows)"
    assert r.out == ""
    # The largest key is a key like any other; one more is not a key (never saturated to it).
    assert run("get", store, 2**64 - 1).code == NOT_FOUND
    r = run("get", store, 2**64)
    assert r.code == USAGE and "beyond 2^64 - 1" in one_line(r.err)


def test_get_missing_epoch_names_the_epochs_the_key_has(store):
    r = run("get", store, 0, "--epoch", 2)
    assert r.code == NOT_FOUND, r
    assert one_line(r.err) == (
        f"embstore get: key 0 has no row in epoch 2 of {store} (its epochs: 0)")
    r = run("get", store, 5, "--epoch", 9, "--history")
    assert r.code == NOT_FOUND, r
    assert one_line(r.err) == (
        f"embstore get: key 5 has no row in epoch 9 of {store} (its epochs: 0, 1, 2)")


@pytest.mark.parametrize("args", [["abc"], ["-1"], ["1e3"], ["5", "--epoch", "x"],
                                  ["5", "--epoch", "-2"], ["18446744073709551616"]])
def test_get_key_or_epoch_that_is_not_a_number_is_a_usage_error(store, args):
    r = run("get", store, *args)
    assert r.code == USAGE, r
    line = one_line(r.err)
    assert line.startswith("embstore get: ")
    assert "Usage" not in r.err and r.out == ""


def test_get_on_a_path_that_is_not_a_store(tmp_path):
    r = run("get", tmp_path / "nothing", 1)
    assert r.code == NOT_FOUND, r
    assert "nothing" in one_line(r.err)


def test_get_leaves_every_byte_of_the_store_as_it_was(store, tmp_path):
    before = hash_tree(store)
    for args in (["5"], ["5", "--epoch", "1", "--json"], ["5", "--history"], ["999"],
                 ["5", "--history", "--npy", tmp_path / "h.npy"]):
        run("get", store, *args)
    assert hash_tree(store) == before


def test_get_npy_on_a_full_disk_leaves_no_file_and_a_rerun_writes_it(tmp_path, small_tmpfs):
    # Key 0 has 8 versions of 16 KiB: its history (128 KiB) does not fit on 64 KiB, one row does.
    store = make_store(tmp_path / "s", dim=4096, dtype="float32", epochs=8, rows_per_epoch=2,
                       key_offset=False)
    disk = small_tmpfs("64k")
    out = disk / "h.npy"
    r = run("get", store, 0, "--history", "--npy", out)
    assert r.code == FULL, r
    assert str(out) in one_line(r.err) and "No space left on device" in r.err
    assert not os.path.exists(out)
    assert os.listdir(disk) == []  # the hidden working file is gone too
    # The same output name works at once (it used to fail: "File exists").
    r = run("get", store, 0, "--epoch", 3, "--npy", out)
    assert r.code == 0, r
    with embstore.Reader(store) as reader:
        np.testing.assert_array_equal(np.load(out), reader.vectors[reader.find(0, 3)])


def test_get_npy_inside_the_store_is_refused_and_leaves_it_as_it_was(store, tmp_path):
    # It wrote the file (and a hidden working directory) into the store it only reads; the
    # store's next writer then removed it without a word.
    before, names = hash_tree(store), sorted(os.listdir(store))
    os.symlink(store, tmp_path / "link")
    for out in (os.path.join(store, "rows.7"), os.path.join(store, "v.npy"),
                str(tmp_path / "link" / "v.npy")):
        r = run("get", store, 5, "--npy", out)
        assert r.code == USAGE, (out, r)
        assert one_line(r.err) == (f"embstore get: {out}: inside the store {store}, which is "
                                   "only read: give an output outside it")
    assert hash_tree(store) == before and sorted(os.listdir(store)) == names


def test_get_refuses_an_empty_npy_path_instead_of_ignoring_it(tmp_path):
    # `--npy ""` read as "not given": the table was printed and the exit was 0.
    store = make_store(tmp_path / "s.emb")
    r = run("get", store, 3, "--npy", "")
    assert r.code == 2, r
    assert "--npy" in r.err and "path is empty" in r.err, r


def test_get_npy_reports_the_shape_of_the_file_it_wrote(store, tmp_path):
    # One row is written as a vector of shape (4,), which the report called "(1 x 4 float32)".
    one, history = tmp_path / "v.npy", tmp_path / "h.npy"
    r = run("get", store, 7, "--npy", one)
    assert r.code == 0, r
    assert np.load(one).shape == (4,)
    assert one_line(r.out) == f"{one}: 1 row of key 7 (float32, shape (4,))"
    r = run("get", store, 7, "--history", "--npy", history)
    assert r.code == 0, r
    assert np.load(history).shape == (3, 4)
    assert one_line(r.out) == f"{history}: 3 rows of key 7 (float32, shape (3, 4))"
