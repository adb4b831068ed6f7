"""embstore tail -f: follows rows that another process commits, and ends cleanly (exit 0) on
SIGINT and when the reader of its stdout goes away."""

import json
import os
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
