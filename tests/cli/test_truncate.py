"""embstore truncate: --rows and --from-epoch, what it prints, --json, --yes, bad input, a live
reader process that keeps its arrays, and kill -9 in the middle of the switch."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import embstore
from conftest import CLI, hash_tree, make_store, run

USAGE = 2


@pytest.fixture
def store(tmp_path):
    """Three epochs of ten rows; epoch e has keys e..e+9 (make_store)."""
    return make_store(tmp_path / "s", dim=4, dtype="float32")


def test_truncate_from_epoch_prints_what_it_dropped(store):
    r = run("truncate", store, "--from-epoch", 1, "--yes")
    assert r.code == 0, r
    assert "kept rows [0, 10), dropped 20 rows [10, 30)" in r.out
    assert "epoch 1: 10 rows" in r.out and "epoch 2: 10 rows" in r.out
    reader = embstore.Reader(store)
    assert len(reader) == 10 and set(reader.epochs.tolist()) == {0}
    assert reader.verify().ok


def test_truncate_rows_json(store):
    r = run("truncate", store, "--rows", 25, "--yes", "--json")
    assert r.code == 0, r
    report = json.loads(r.out)
    assert report["rows_before"] == 30 and report["rows_kept"] == 25
    assert report["rows_dropped"] == 5 and report["generation"] == 2
    assert report["dropped_epochs"] == [{"epoch": 2, "rows": 5}]
    assert len(embstore.Reader(store)) == 25


def test_truncate_with_nothing_to_drop_changes_nothing(store):
    before = hash_tree(store)
    for args in (["--rows", 30], ["--from-epoch", 9]):
        r = run("truncate", store, *args)  # No --yes needed: nothing to ask about.
        assert r.code == 0, r
        assert "nothing to drop" in r.out
    assert hash_tree(store) == before


def test_truncate_bad_input_is_one_line_and_changes_nothing(store):
    before = hash_tree(store)
    cases = [
        ([], "exactly one of --rows and --from-epoch"),
        (["--rows", 3, "--from-epoch", 1], "excludes"),
        (["--rows", 31, "--yes"], "31"),
        (["--rows", -1, "--yes"], "row count"),
        (["--from-epoch", "x", "--yes"], "epoch"),
        (["--rows", 3], "without --yes"),  # stdin is not a terminal: never asks, refuses
    ]
    for args, message in cases:
        r = run("truncate", store, *args, stdin="y\n")
        assert r.code == USAGE, (args, r)
        lines = [line for line in r.err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (args, r.err)
    assert hash_tree(store) == before
    missing = run("truncate", os.path.join(os.path.dirname(store), "nope"), "--rows", 0, "--yes")
    assert missing.code == 12 and "nope" in missing.err


def test_truncate_of_a_damaged_store_is_refused_and_changes_nothing(store):
    # The last row kept would be row 14, which fails its checksum and ends no batch.
    with open(f"{store}/rows.1", "r+b") as f:
        f.seek(14 * 4 * 4)
        f.write(b"damaged!")
    before = hash_tree(store)
    r = run("truncate", store, "--rows", 15, "--yes")
    assert r.code == 14, r
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "row 14" in lines[0] and "rows.1" in lines[0], r.err
    assert hash_tree(store) == before


def test_truncate_from_epoch_refuses_a_cut_decided_by_a_damaged_epoch(store):
    # From a review: one flipped bit made row 3's epoch 0 read as 8; --from-epoch 2 cut there,
    # dropped 27 rows (17 good rows of epochs 0-1), exited 0, and verify then found nothing.
    with open(f"{store}/index.1", "r+b") as f:
        f.seek(3 * 32 + 8)
        f.write(bytes([8]))
    before = hash_tree(store)
    r = run("truncate", store, "--from-epoch", 2, "--yes")
    assert r.code == 14, r
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "row 3 (epoch 8 in its index entry" in lines[0], r.err
    assert "nothing was dropped" in lines[0], r.err
    assert hash_tree(store) == before


def test_truncate_help():
    r = run("truncate", "--help")
    assert r.code == 0 and "--from-epoch" in r.out and "--rows" in r.out and "--yes" in r.out
    assert "  truncate " in run("--help").out


def test_a_reader_process_keeps_its_arrays_and_sees_the_truncate_on_refresh(store):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import embstore
        r = embstore.Reader({store!r})
        v = r.vectors
        copy = v.copy()
        print(len(r), flush=True)
        sys.stdin.readline()
        assert len(r) == 30 and np.array_equal(v, copy)
        print(r.refresh(), int(np.array_equal(v, copy)), r.find(25), flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "30"
        r = run("truncate", store, "--rows", 12, "--yes")
        assert r.code == 0, r
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().split() == ["12", "1", "None"]
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()


def test_kill_at_random_instants_leaves_the_old_or_the_new_store(tmp_path):
    rng = np.random.default_rng(3)
    for attempt in range(8):
        path = make_store(tmp_path / f"s{attempt}", dim=64, dtype="float32", epochs=4,
                          rows_per_epoch=2000)
        before = embstore.Reader(path).vectors.copy()
        proc = subprocess.Popen([CLI, "truncate", path, "--rows", "3000", "--yes"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=float(rng.uniform(0.0, 0.05)))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        reader = embstore.Reader(path)
        assert len(reader) in (8000, 3000), attempt
        np.testing.assert_array_equal(reader.vectors, before[:len(reader)])
        with embstore.Writer(path) as w:
            assert w.committed_rows() == len(reader)
        assert embstore.Reader(path).verify().ok


def test_leading_zeros_are_decimal_for_rows_and_epochs(tmp_path):
    # CLI11 2.1 read "010" as octal 8: --from-epoch 010 dropped epochs 8 and 9 too, --rows 010
    # kept 8 rows.
    path = make_store(tmp_path / "s", dim=2, dtype="float32", epochs=12, rows_per_epoch=3)
    r = run("truncate", path, "--from-epoch", "010", "--yes", "--json")
    assert r.code == 0, r
    report = json.loads(r.out)
    assert report["rows_kept"] == 30
    assert report["dropped_epochs"] == [{"epoch": 10, "rows": 3}, {"epoch": 11, "rows": 3}]
    r = run("truncate", path, "--rows", "010", "--yes", "--json")
    assert r.code == 0, r
    assert json.loads(r.out)["rows_kept"] == 10
    r = run("truncate", path, "--from-epoch", "09", "--yes")  # not octal: a usage error before
    assert r.code == 0, r
    assert len(embstore.Reader(path)) == 10 and embstore.Reader(path).epochs.max() == 3


def _asked_on_a_terminal(args, *answers):
    """Runs `embstore truncate` with a terminal as stdin; for each (while_asking, answer) of
    `answers`, waits for a question (on stderr), calls while_asking(stderr since the last
    answer) unless it is None, answers. Returns (exit status, stdout, stderr after the last
    answer)."""
    import pty
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([CLI, "truncate", *args], stdin=secondary, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    os.close(secondary)
    try:
        for while_asking, answer in answers:
            asked = b""
            while b"[y/N]" not in asked:
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, (asked, proc.wait(timeout=60), proc.stdout.read())
                asked += chunk
            if while_asking is not None:
                while_asking(asked)
            os.write(primary, answer)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


@pytest.mark.parametrize("answer, dropped", [(b"YES\n", True), (b" Yes \n", True),
                                            (b"y\n", True), (b"no\n", False), (b"yess\n", False),
                                            (b"\n", False)])
def test_the_question_takes_y_or_yes_in_any_case(store, answer, dropped):
    # "YES" and "Yes" were taken for a no (exit 2, nothing changed).
    code, _, _ = _asked_on_a_terminal([store, "--rows", "5"], (None, answer))
    assert code == (0 if dropped else 2)
    assert len(embstore.Reader(store)) == (5 if dropped else 30)


def _append_from_another_process(store, tmp_path, rows, epoch):
    """`embstore import` of `rows` rows of ones at `epoch` (keys 0..rows-1): another writer
    process, ended before this returns."""
    npy = tmp_path / f"append-{epoch}-{rows}.npy"
    np.save(npy, np.ones((rows, 4), np.float32))
    r = run("import", store, npy, "--epoch", epoch)
    assert r.code == 0, r


def test_rows_appended_by_another_process_while_it_asks_are_asked_about_again(store, tmp_path):
    # It asked about rows [10, 30), then dropped [10, 34) on the answer: 4 rows the user never
    # saw counted.
    def append_meanwhile(asked):
        assert b"drop rows [10, 30)" in asked and b"epoch 2: 10 rows" in asked, asked
        _append_from_another_process(store, tmp_path, 4, 7)

    def asked_again(asked):
        assert (f"{store} changed while it asked (another process appended rows or truncated "
                "it): nothing dropped; the rows to drop are no longer [10, 30)").encode() \
            in asked, asked
        assert b"drop rows [10, 34)" in asked and b"epoch 7: 4 rows" in asked, asked
        assert len(embstore.Reader(store)) == 34

    code, out, _ = _asked_on_a_terminal([store, "--from-epoch", "1", "--json"],
                                        (append_meanwhile, b"y\n"), (asked_again, b"y\n"))
    assert code == 0
    report = json.loads(out)
    assert (report["rows_before"], report["rows_kept"], report["rows_dropped"]) == (34, 10, 24)
    assert report["dropped_epochs"] == [{"epoch": 1, "rows": 10}, {"epoch": 2, "rows": 10},
                                        {"epoch": 7, "rows": 4}]
    assert len(embstore.Reader(store)) == 10


def test_no_to_the_question_asked_again_after_an_append_changes_nothing(store, tmp_path):
    def append_meanwhile(asked):
        assert b"drop rows [5, 30)" in asked, asked
        _append_from_another_process(store, tmp_path, 3, 2)

    before = {}

    def asked_again(asked):
        assert b"no longer [5, 30)" in asked and b"drop rows [5, 33)" in asked, asked
        before.update(hash_tree(store))

    code, out, err = _asked_on_a_terminal([store, "--rows", "5"], (append_meanwhile, b"y\n"),
                                          (asked_again, b"n\n"))
    assert code == 2, (out, err)
    assert b"nothing changed" in err and out == b""
    assert len(embstore.Reader(store)) == 33 and hash_tree(store) == before


def test_an_answer_other_than_yes_changes_nothing_and_exits_2(store):
    # The README's exit table lists it with the other usage refusals.
    for answer in (b"n\n", b"\n", b"maybe\n"):
        code, _, err = _asked_on_a_terminal([store, "--rows", "5"], (None, answer))
        assert code == 2, (answer, err)
        assert b"nothing changed" in err
        assert len(embstore.Reader(store)) == 30


def test_info_names_the_leftover_files_of_an_interrupted_truncate_it_counts(tmp_path):
    # After a truncate killed with kill -9, info's "bytes on disk" counted its rows.2 and
    # index.2 (1.28 GB against a 485 MB data file in a review) without a word. Here they are
    # what a truncate killed once it had copied the rows leaves: generation 2's files.
    store = make_store(tmp_path / "s")
    for name in ("rows", "index"):
        with open(os.path.join(store, f"{name}.1"), "rb") as src, \
                open(os.path.join(store, f"{name}.2"), "wb") as dst:
            dst.write(src.read())
            os.fsync(dst.fileno())
    report = json.loads(run("info", store, "--json").out)
    assert report["leftover_files"] == ["index.2", "rows.2"]
    leftover = sum(f["disk_bytes"] for f in report["files"] if f["name"] in ("index.2", "rows.2"))
    assert leftover > 0
    r = run("info", store)
    assert r.code == 0, r
    line = next(line for line in r.out.splitlines() if line.startswith("bytes on disk"))
    assert line.split(None, 3)[3] == (
        f"{report['bytes_on_disk']} bytes, {leftover} of them in index.2, rows.2: files of a "
        "truncate or key index build, running or interrupted, which the next writer removes")
    # As said: the next writer removes them.
    assert run("rebuild-index", store).code == 0
    assert json.loads(run("info", store, "--json").out)["leftover_files"] == []
    line = next(line for line in run("info", store).out.splitlines()
                if line.startswith("bytes on disk"))
    assert re.fullmatch(r"bytes on disk +\d+ bytes", line), line
