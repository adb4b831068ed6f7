"""embstore tail -f: follows rows that another process commits, and ends cleanly (exit 0) on
SIGINT and when the reader of its stdout goes away."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import CLI, hash_tree, make_store

APPEND = """
import sys, numpy as np, embstore
path, first_key, n, epoch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with embstore.Writer(path) as w:
    for i in range(n):  # one batch per row: tail -f sees separate commits
        w.append(keys=[first_key + i], vectors=np.full((1, 4), i, np.float32), epoch=epoch)
"""


def append_from_another_process(store, first_key, n, epoch):
    subprocess.run([sys.executable, "-c", APPEND, store, str(first_key), str(n), str(epoch)],
                   check=True, timeout=60)


def start_follow(store, *extra):
    proc = subprocess.Popen([CLI, "tail", "-f", store, "-n", "1", "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The last existing row comes first; once it is out, the tool is following.
    first = json.loads(proc.stdout.readline())
    assert first["row"] == 29
    return proc


def test_tail_follow_sees_rows_committed_by_another_process_and_stops_on_sigint(tmp_path):
    store = make_store(tmp_path / "s")
    before = hash_tree(store)
    proc = start_follow(store, "--vectors")
    try:
        append_from_another_process(store, 1000, 5, 7)
        seen = [json.loads(proc.stdout.readline()) for _ in range(5)]
        assert [r["row"] for r in seen] == [30, 31, 32, 33, 34]
        assert [r["key"] for r in seen] == [1000, 1001, 1002, 1003, 1004]
        assert all(r["epoch"] == 7 for r in seen)
        assert [r["vector"] for r in seen] == [[float(i)] * 4 for i in range(5)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Following wrote nothing to the store itself (the appends did; compare the other files).
    after = hash_tree(store)
    assert set(after) == set(before)


def test_tail_follow_ends_when_stdout_is_closed_while_idle(tmp_path):
    store = make_store(tmp_path / "s")
    proc = start_follow(store)
    try:
        proc.stdout.close()  # as `| head -1` does after its line
        assert proc.wait(timeout=10) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tail_follow_ends_when_stdout_is_closed_and_rows_arrive(tmp_path):
    store = make_store(tmp_path / "s")
    proc = start_follow(store)
    try:
        proc.stdout.close()
        append_from_another_process(store, 500, 3, 1)  # the next write meets a closed pipe
        assert proc.wait(timeout=10) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tail_follow_piped_into_head_ends_when_head_exits(tmp_path):
    store = make_store(tmp_path / "s")
    script = f"'{CLI}' tail -f '{store}' -n 5 | head -n 2; echo \"${{PIPESTATUS[@]}}\""
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["row", "key", "epoch"]
    assert lines[1].split() == ["25", "7", "2"]
    # tail noticed head was gone and exited 0 instead of dying of SIGPIPE (141).
    assert lines[2] == "0 0"
    assert out.stderr == ""


def test_tail_follow_on_a_missing_store_fails_at_once(tmp_path):
    r = subprocess.run([CLI, "tail", "-f", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 12 and str(tmp_path / "nope") in r.stderr


def row_reader(proc):
    """next_row() of `proc`'s JSON lines: a failure after `timeout` seconds, not a hang; and
    rest(), the lines left once it has ended."""
    import queue
    import threading
    lines = queue.Queue()
    pump = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    pump.start()

    def next_row(timeout=30):
        try:
            return json.loads(lines.get(timeout=timeout))
        except queue.Empty:
            pytest.fail(f"no row from tail -f within {timeout} s")

    def rest():
        pump.join(timeout=10)
        return [lines.get() for _ in range(lines.qsize())]
    return next_row, rest


TRUNCATE = """
import sys, embstore
with embstore.Writer(sys.argv[1]) as w:
    w.truncate(rows=int(sys.argv[2]))
"""


REPLACE = """
import sys, numpy as np, embstore
with embstore.Writer(sys.argv[1]) as w:
    w.truncate(rows=32)
    w.append(keys=[2000, 2001], vectors=np.zeros((2, 4), np.float32), epoch=8)
    # Row 34 again as it was printed: key 1004, epoch 7, every value 4.
    w.append(keys=[1004], vectors=np.full((1, 4), 4, np.float32), epoch=7)
"""


def _truncate_then_append(store, appended):
    subprocess.run([sys.executable, "-c", TRUNCATE, store, "32"], check=True, timeout=60)
    append_from_another_process(store, 2000, appended, 8)


# What another process does to the store after rows 30..34 were printed, and the rows tail must
# print then (row, key, epoch).
AFTER_A_TRUNCATE = {
    # A truncate to 32 rows drops rows 32..34; the rows appended after it are rows 32, 33, ...,
    # even fewer than were dropped (1): each is printed under its own row number.
    "one appended": (lambda store: _truncate_then_append(store, 1), [(32, 2000, 8)]),
    "six appended": (lambda store: _truncate_then_append(store, 6),
                     [(32 + i, 2000 + i, 8) for i in range(6)]),
    # Rows 32 and 33 replaced and row 34 equal again to the one printed: rows 32 and 33 are not
    # what was printed, so tail says so and prints from row 32, though the last printed row
    # looks the same as before.
    "the last equal again": (
        lambda store: subprocess.run([sys.executable, "-c", REPLACE, store], check=True,
                                     timeout=60),
        [(32, 2000, 8), (33, 2001, 8), (34, 1004, 7)]),
}


@pytest.mark.parametrize("case", list(AFTER_A_TRUNCATE))
def test_tail_follow_after_another_process_truncates_prints_the_new_rows_and_says_so(
        tmp_path, case):
    change, expected = AFTER_A_TRUNCATE[case]
    store = make_store(tmp_path / "s")  # 30 rows: tail prints row 29
    proc = start_follow(store)
    next_row, rest = row_reader(proc)
    try:
        append_from_another_process(store, 1000, 5, 7)
        assert [next_row()["row"] for _ in range(5)] == list(range(30, 35))
        change(store)
        seen = [next_row() for _ in expected]
        assert [(r["row"], r["key"], r["epoch"]) for r in seen] == expected
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert rest() == []
        assert proc.stderr.read() == (f"embstore tail: {store} was truncated: rows [32, 35) "
                                      "printed above are no longer in it; following from row 32\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("how", ["replaced", "deleted", "moved"])
def test_tail_follow_of_a_store_no_longer_at_its_path_says_so_and_fails(tmp_path, how):
    # It followed the deleted store's files: nothing printed again, no word, never ending.
    store = make_store(tmp_path / "s")
    other = make_store(tmp_path / "other")
    proc = start_follow(store)
    try:
        # Moved away whole first: while `rm -rf` is half done, the tool may instead report the
        # first missing file it needed (also exit 12).
        os.rename(store, tmp_path / "trash")
        if how == "moved":  # still a store, growing, but not at the path followed
            append_from_another_process(str(tmp_path / "trash"), 500, 2, 3)
        else:
            shutil.rmtree(tmp_path / "trash")
        if how == "replaced":
            os.rename(other, store)
            append_from_another_process(store, 500, 2, 3)
        assert proc.wait(timeout=30) == 12
        assert f"{store}: the store followed is no longer at this path (deleted, moved, or " \
            "replaced by another store)" in proc.stderr.read()
        assert proc.stdout.read() == ""  # none of the other store's rows
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


TRUNCATE_AND_APPEND = """
import sys, numpy as np, embstore
with embstore.Writer(sys.argv[1]) as w:
    w.truncate(rows=2)
    w.append(keys=[2000, 2001, 2002], vectors=np.zeros((3, 4), np.float32), epoch=8)
"""


def _truncate_to_4_then_append_one(store):
    subprocess.run([sys.executable, "-c", TRUNCATE, store, "4"], check=True, timeout=60)
    append_from_another_process(store, 2000, 1, 8)


# A truncate below the rows printed (28 and 29), and the rows tail must print then (row, key,
# epoch), and the row it follows from. "seen at once": tail is stopped (SIGSTOP) while another
# process truncates and appends, so that it sees both at once.
BELOW_THE_ROWS_PRINTED = {
    # It said rows [4, 30) were printed above, when only 28 and 29 were.
    "to 4, one appended": (_truncate_to_4_then_append_one, False, [(4, 2000, 8)], 4),
    # It followed from the store's size then (row 5), skipping rows 2..4 without a word.
    "to 2, three appended, seen at once": (
        lambda store: subprocess.run([sys.executable, "-c", TRUNCATE_AND_APPEND, store],
                                     check=True, timeout=60),
        True, [(2, 2000, 8), (3, 2001, 8), (4, 2002, 8)], 2),
}


@pytest.mark.parametrize("case", list(BELOW_THE_ROWS_PRINTED))
def test_tail_follow_after_a_truncate_below_the_rows_printed_prints_every_row_after_it(
        tmp_path, case):
    change, stopped, expected, following_from = BELOW_THE_ROWS_PRINTED[case]
    store = make_store(tmp_path / "s")  # 30 rows
    proc = subprocess.Popen([CLI, "tail", "-f", store, "-n", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    next_row, rest = row_reader(proc)
    try:
        assert [next_row()["row"] for _ in range(2)] == [28, 29]
        if stopped:
            proc.send_signal(signal.SIGSTOP)
        change(store)
        if stopped:
            proc.send_signal(signal.SIGCONT)
        seen = [next_row() for _ in expected]
        assert [(r["row"], r["key"], r["epoch"]) for r in seen] == expected
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert rest() == []
        assert proc.stderr.read() == (
            f"embstore tail: {store} was truncated: rows [28, 30) printed above are no longer "
            f"in it; following from row {following_from}\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_head_and_tail_end_with_exit_0_when_the_reader_of_the_pipe_goes_away(tmp_path):
    # SIGPIPE killed them (141 in a shell: a failure under `set -o pipefail`).
    store = str(tmp_path / "big")
    import numpy as np
    import embstore
    with embstore.Writer(store, dim=4) as w:
        w.append(range(20000), np.ones((20000, 4), np.float32))
    for command in (["head", store, "-n", "20000"], ["tail", store, "-n", "20000", "--json"]):
        proc = subprocess.Popen([CLI, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.readline()
        proc.stdout.close()  # the reader goes away with most rows unprinted
        assert proc.wait(timeout=30) == 0, command
        assert proc.stderr.read() == b"", command


def _blocked_on_a_full_pipe(pid, read_end):
    """Waits until process `pid` sleeps with the pipe it writes (read end `read_end`) full."""
    import fcntl
    import termios
    import time
    capacity = fcntl.fcntl(read_end, 1032)  # F_GETPIPE_SZ
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        queued = fcntl.ioctl(read_end, termios.FIONREAD, b"\0\0\0\0")
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        # Within a page of full: a write of a page (PIPE_BUF) more cannot go in.
        if int.from_bytes(queued, "little") > capacity - 4096 and state == "S":
            return
        time.sleep(0.01)
    pytest.fail("tail -f never filled its pipe")


def _taken(pid, sig):
    """Waits until process `pid` has taken signal `sig` sent to it (no longer pending)."""
    import time
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            pending = [int(line.split()[1], 16) for line in f
                       if line.startswith(("SigPnd:", "ShdPnd:"))]
        if not any(mask & (1 << (sig - 1)) for mask in pending):
            return
        time.sleep(0.001)
    pytest.fail(f"signal {sig} still pending")


def _read_all(read_end):
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_tail_follow_stopped_while_its_reader_does_not_read_exits_0_after_whole_lines(
        tmp_path, sig):
    # A reader that does not keep up (`| less` at its prompt): the signal interrupted the blocked
    # write, which was taken for a failure: exit 17, "cannot write to stdout: Interrupted system
    # call".
    store = make_store(tmp_path / "s", epochs=1, rows_per_epoch=20000)
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([CLI, "tail", "-f", store, "-n", "20000", "--json"],
                            stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    try:
        _blocked_on_a_full_pipe(proc.pid, read_end)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read() == ""
        out = _read_all(read_end)
    finally:
        os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The rows from the first, each on a whole line.
    assert out.endswith("\n")
    rows = [json.loads(line)["row"] for line in out.splitlines()]
    assert 0 < len(rows) < 20000 and rows == list(range(rows[0], rows[0] + len(rows)))


def test_tail_follow_stopped_in_the_middle_of_a_long_line_ends_it_or_stops_at_a_second_signal(
        tmp_path):
    # Lines longer than PIPE_BUF (vectors of 2,000 values) are written in pieces: a stop while
    # one is half written lets it end, and a second stop ends the output at once.
    store = make_store(tmp_path / "s", dim=2000, dtype="float32", epochs=1, rows_per_epoch=100)
    for second_signal in (False, True):
        read_end, write_end = os.pipe()
        proc = subprocess.Popen([CLI, "tail", "-f", store, "-n", "100", "--json", "--vectors"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True)
        os.close(write_end)
        try:
            _blocked_on_a_full_pipe(proc.pid, read_end)
            proc.send_signal(signal.SIGINT)
            if second_signal:
                _taken(proc.pid, signal.SIGINT)  # else the two may arrive as one
                proc.send_signal(signal.SIGINT)
                assert proc.wait(timeout=30) == 0
            out = _read_all(read_end)  # the reader reads again: the line (if any) ends
            assert proc.wait(timeout=30) == 0
            assert proc.stderr.read() == ""
        finally:
            os.close(read_end)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lines = out.split("\n")
        whole = [json.loads(line) for line in lines[:-1]]
        assert 0 < len(whole) < 100
        assert [r["row"] for r in whole] == list(range(whole[0]["row"], whole[-1]["row"] + 1))
        assert all(len(r["vector"]) == 2000 for r in whole)
        if not second_signal:
            assert lines[-1] == ""  # nothing after the last line end
