"""embstore salvage: the rows that verify, out of a store too damaged to open, into a new store;
what was lost (and any damaged field worked around) is reported and the damaged store is left as
it was; a salvage that fails leaves no store at the output."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

import embstore
import pytest

from conftest import corrupt_row, hash_tree, make_store, run

ALREADY_EXISTS, NOT_FOUND, CORRUPTION, FULL, USAGE = 13, 12, 14, 18, 2
HEADER_COPY_OFFSET = 2048  # src/format/FORMAT.md: the second copy of the fixed header
COMMITTED_ROWS_OFFSET = 4096  # the state page's committed_rows
DURABLE_ROWS_OFFSET = 4160  # the state page's durable_rows
GENERATION_OFFSET = 4352  # the state page's generation
RECORD_BYTES = 4 * 2  # make_store's default: dim 4, float16


def _flip_header_byte(store, offset):
    with open(os.path.join(store, "header"), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def _damaged_store(tmp_path):
    """30 rows; the primary fixed header, the committed counter and rows 5, 6 and 20 damaged.
    Returns the store and its rows as they were before the damage."""
    store = make_store(tmp_path / "s")
    with embstore.Reader(store) as r:
        before = r.vectors.copy(), r.keys.copy(), r.epochs.copy()
    _flip_header_byte(store, 16)  # dim, in the primary copy only
    with open(os.path.join(store, "header"), "r+b") as f:
        f.seek(COMMITTED_ROWS_OFFSET)
        f.write((10**9).to_bytes(8, "little"))
    for row in (5, 6, 20):
        corrupt_row(store, row, RECORD_BYTES)
    return store, before


def test_salvage_copies_the_rows_that_verify_and_reports_the_lost_ones_as_json(tmp_path):
    store, (vectors, keys, epochs) = _damaged_store(tmp_path)
    assert run("verify", store).code != 0  # the store does not open
    damaged = hash_tree(store)
    out = tmp_path / "out"
    r = run("salvage", store, out, "--json")
    assert r.code == 1, r  # damage found
    report = json.loads(r.out)
    assert report["header_source"] == "copy"
    assert report["rows_scanned"] == 30 and report["rows_copied"] == 27
    assert report["rows_lost"] == 3 and report["lost_ranges"] == [[5, 7], [20, 21]]
    assert hash_tree(store) == damaged
    kept = np.delete(np.arange(30), [5, 6, 20])
    with embstore.Reader(out) as salvaged:
        assert salvaged.verify().ok and salvaged.dim == 4
        assert np.array_equal(salvaged.vectors, vectors[kept])
        assert np.array_equal(salvaged.keys, keys[kept])
        assert np.array_equal(salvaged.epochs, epochs[kept])


def test_salvage_text_output_names_the_lost_ranges(tmp_path):
    store, _ = _damaged_store(tmp_path)
    r = run("salvage", store, tmp_path / "out")
    assert r.code == 1, r
    assert "copied 27 of 30 rows" in r.out and "(header: second copy)\n" in r.out
    assert "lost 3 rows:" in r.out
    lines = [line.split() for line in r.out.splitlines()]
    assert ["5", "7", "2"] in lines and ["20", "21", "1"] in lines
    assert r.err == ""  # no progress bar when stderr is not a terminal


def test_salvage_of_an_intact_store_loses_nothing_and_exits_0(tmp_path):
    store = make_store(tmp_path / "s")
    r = run("salvage", store, tmp_path / "out", "--json")
    assert r.code == 0, r
    report = json.loads(r.out)
    assert report["header_source"] == "primary" and report["rows_lost"] == 0
    assert report["rows_copied"] == 30 and report["lost_ranges"] == []
    r = run("salvage", store, tmp_path / "out2")
    assert r.code == 0 and "no row lost" in r.out, r


def test_salvage_into_an_existing_path_is_a_clear_error_that_changes_nothing(tmp_path):
    store = make_store(tmp_path / "s")
    existing = make_store(tmp_path / "existing")
    before = hash_tree(existing)
    r = run("salvage", store, existing)
    assert r.code == ALREADY_EXISTS, r
    assert str(existing) in r.err and len(r.err.strip().splitlines()) == 1
    assert hash_tree(existing) == before
    r = run("salvage", tmp_path / "missing", tmp_path / "out")
    assert r.code == NOT_FOUND, r
    assert "missing" in r.err and not os.path.exists(tmp_path / "out")


def test_salvage_and_merge_into_the_store_they_read_are_refused_and_change_nothing(tmp_path):
    store = make_store(tmp_path / "s")
    (tmp_path / "link").symlink_to(store)
    inside = os.path.join(store, "inside")
    before, names = hash_tree(store), sorted(os.listdir(store))
    make_store(tmp_path / "other")
    for args in (["salvage", store, inside],
                 ["salvage", store, tmp_path / "link" / "deep" / "er"],
                 ["merge", inside, store],
                 ["merge", tmp_path / "link" / "inside", tmp_path / "other", store]):
        r = run(*args)
        assert r.code == USAGE, (args, r)
        assert f"inside the store {store}" in r.err and len(r.err.strip().splitlines()) == 1, r
        assert hash_tree(store) == before
        assert sorted(os.listdir(store)) == names


def test_salvage_help_and_usage(tmp_path):
    r = run("salvage", "--help")
    assert r.code == 0, r
    assert "STORE" in r.out.upper() and "OUT" in r.out.upper() and "--json" in r.out
    assert "must not exist" in r.out
    r = run("salvage", tmp_path / "s")
    assert r.code == 2 and "out" in r.err.lower(), r
    assert "salvage" in run("--help").out


def _set_state_field(store, offset, value):
    with open(os.path.join(store, "header"), "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(8, "little"))


def test_salvage_names_a_damaged_counter_and_exits_1_though_no_row_is_lost(tmp_path):
    store = make_store(tmp_path / "s")  # 30 rows, all durable
    _set_state_field(store, DURABLE_ROWS_OFFSET, 40)
    message = "field durable_rows 40 exceeds committed_rows 30"
    refused = run("verify", store)
    assert refused.code == CORRUPTION and message in refused.err, refused
    r = run("salvage", store, tmp_path / "out")
    assert r.code == 1, r  # damage found, though every row was copied
    assert "copied 30 of 30 rows" in r.out and "no row lost" in r.out
    assert f"damaged: {os.path.join(store, 'header')}: {message}" in r.out.splitlines()
    r = run("salvage", store, tmp_path / "out2", "--json")
    assert r.code == 1, r
    report = json.loads(r.out)
    assert report["rows_lost"] == 0 and report["header_source"] == "primary"
    assert len(report["damage"]) == 1 and message in report["damage"][0]
    with embstore.Reader(tmp_path / "out") as salvaged:
        assert len(salvaged) == 30 and salvaged.verify().ok


def test_salvage_json_of_an_intact_store_lists_no_damage(tmp_path):
    r = run("salvage", make_store(tmp_path / "s"), tmp_path / "out", "--json")
    assert r.code == 0, r
    assert json.loads(r.out)["damage"] == []


def _hold_writer_lock(store):
    """A child process holding the store's writer lock (an OFD lock on byte 0 of its `lock`
    file, FORMAT.md "The store directory"), as a writer does while it commits. Returns it; it
    lets go when its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, struct, sys\n"
        f"fd = os.open({os.path.join(store, 'lock')!r}, os.O_RDWR)\n"
        "fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hh4xqqi4x', fcntl.F_WRLCK, 0, 0, 1, 0))\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_salvage_with_a_writer_at_work_copies_the_committed_rows_and_calls_nothing_damage(
        tmp_path):
    # The last epoch's batch written past committed_rows while a writer holds the lock is that
    # writer's batch in the making: salvage copied it and exited 1 calling it damage (a review).
    store = make_store(tmp_path / "s")
    with open(os.path.join(store, "header"), "r+b") as f:
        for offset in (COMMITTED_ROWS_OFFSET, DURABLE_ROWS_OFFSET):
            f.seek(offset)
            f.write((20).to_bytes(8, "little"))
    holder = _hold_writer_lock(store)
    try:
        r = run("salvage", store, tmp_path / "out", "--json")
        text = run("salvage", store, tmp_path / "out2")
    finally:
        holder.communicate("")
    assert r.code == 0, r
    report = json.loads(r.out)
    assert report["writer_active"] is True and report["damage"] == []
    assert report["rows_scanned"] == 20 and report["rows_copied"] == 20
    assert text.code == 0, text
    assert "a writer was at work on the store" in text.out and "damaged" not in text.out
    with embstore.Reader(tmp_path / "out") as out:
        assert len(out) == 20 and out.verify().ok
    # With no writer, the same rows are a killed writer's: copied, and said.
    r = run("salvage", store, tmp_path / "out3", "--json")
    assert r.code == 1, r
    report = json.loads(r.out)
    assert report["writer_active"] is False and report["rows_copied"] == 30
    assert "rows 20..30 past committed_rows" in report["damage"][0]


def _truncated_store(tmp_path):
    """30 rows truncated to 20: generation 2 (rows.2, index.2). Returns it and its vectors."""
    store = make_store(tmp_path / "s")
    assert run("truncate", store, "--rows", 20, "--yes").code == 0
    with embstore.Reader(store) as r:
        assert embstore.info(store)["generation"] == 2
        return store, r.vectors.copy()


@pytest.mark.parametrize("generation, problem", [
    (7, "field generation 7 names rows.7 and index.7, which do not exist"),
    (0, "field generation 0 is outside 1..10^9"),
])
def test_a_damaged_generation_is_corruption_naming_the_field_and_salvage_reads_the_only_pair(
        tmp_path, generation, problem):
    store, vectors = _truncated_store(tmp_path)
    _set_state_field(store, GENERATION_OFFSET, generation)
    damaged = hash_tree(store)
    header = os.path.join(store, "header")
    for args in (["info", store], ["verify", store], ["get", store, 3], ["head", store]):
        r = run(*args)
        assert r.code == CORRUPTION, (args, r)
        line = r.err.strip()
        assert len(line.splitlines()) == 1, (args, r)
        assert f"{header}: {problem}" in line, (args, r)
        assert "the only generation files here are rows.2 and index.2" in line, (args, r)
    with pytest.raises(embstore.CorruptionError, match="field generation"):
        embstore.Writer(store)
    out = tmp_path / "out"
    r = run("salvage", store, out, "--json")
    assert r.code == 1, r
    report = json.loads(r.out)
    assert report["rows_copied"] == 20 and report["rows_lost"] == 0
    assert len(report["damage"]) == 1
    assert problem in report["damage"][0] and "read rows.2 and index.2" in report["damage"][0]
    with embstore.Reader(out) as salvaged:
        np.testing.assert_array_equal(salvaged.vectors, vectors)
        assert salvaged.verify().ok
    assert hash_tree(store) == damaged


def test_salvage_refuses_a_damaged_generation_when_two_generations_are_on_disk(tmp_path):
    store, _ = _truncated_store(tmp_path)
    _set_state_field(store, GENERATION_OFFSET, 7)
    for name in ("rows", "index"):  # a second pair: which one held the store is not known
        shutil.copy(os.path.join(store, f"{name}.2"), os.path.join(store, f"{name}.3"))
    r = run("salvage", store, tmp_path / "out")
    assert r.code == CORRUPTION, r
    assert "field generation 7 names rows.7 and index.7, which do not exist" in r.err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("missing, present", [("rows.1", "index.1"), ("index.1", "rows.1")])
def test_a_store_missing_its_rows_or_index_file_is_corruption_naming_it(tmp_path, missing,
                                                                         present):
    store = make_store(tmp_path / "s")
    os.remove(os.path.join(store, missing))
    damaged = hash_tree(store)
    for args in (["info", store], ["verify", store], ["get", store, 3]):
        r = run(*args)
        assert r.code == CORRUPTION, (args, r)
        assert len(r.err.strip().splitlines()) == 1, (args, r)
        assert f"{os.path.join(store, missing)}: missing, although" in r.err, (args, r)
        assert os.path.join(store, present) in r.err, (args, r)
    # Salvage cannot read or check rows without both files: refused the same way, nothing made.
    out = tmp_path / "out"
    r = run("salvage", store, out)
    assert r.code == CORRUPTION, r
    assert f"{os.path.join(store, missing)}: missing, although" in r.err, r
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["s"]
    assert hash_tree(store) == damaged


@pytest.mark.parametrize("size", ["4m", "256k"])
def test_salvage_on_a_full_disk_is_an_error_that_leaves_nothing_at_the_output(tmp_path,
                                                                              small_tmpfs, size):
    # 6000 rows of 1 KiB: on 4 MiB the copy fails part-way, on 256 KiB when the store is made.
    store = make_store(tmp_path / "s", dim=256, dtype="float32", epochs=3, rows_per_epoch=2000)
    disk = small_tmpfs(size)
    out = disk / "saved"
    r = run("salvage", store, out)
    assert r.code == FULL, r
    assert "No space left on device" in r.err and len(r.err.strip().splitlines()) == 1, r
    assert not os.path.exists(out)
    assert os.listdir(disk) == []  # no working directory or lock file left either


def test_salvage_names_a_damaged_primary_header_it_worked_around(tmp_path):
    # It printed "copied 30 of 30 rows ... (header: second copy)" and "no row lost", and exited
    # 1 with no "damaged:" line saying what was worked around, unlike every other damage.
    store = make_store(tmp_path / "s")
    _flip_header_byte(store, 16)  # dim, in the primary copy only
    problem = ("the primary fixed header or its metadata fails its checks (")
    r = run("salvage", store, tmp_path / "out")
    assert r.code == 1, r
    lines = r.out.splitlines()
    assert lines[0] == f"{store}: copied 30 of 30 rows into {tmp_path / 'out'} (header: second copy)"
    assert lines[1].startswith(f"damaged: ") and problem in lines[1], r.out
    assert lines[1].endswith("; the store is read from its copy at byte 2048"), r.out
    assert lines[2:] == ["no row lost"], r.out
    r = run("salvage", store, tmp_path / "out2", "--json")
    assert r.code == 1, r
    report = json.loads(r.out)
    assert report["header_source"] == "copy" and len(report["damage"]) == 1
    assert problem in report["damage"][0]
