"""What every command prints on stdout: a report that cannot be written (stdout on a full disk,
/dev/full) is an error, exit 17, never lost behind exit 0; and the vectors of --json output keep
NaN and the infinities, as the strings "NaN", "Infinity" and "-Infinity" (protobuf's JSON
mapping), where JSON numbers cannot hold them."""

import json
import math
import os
import subprocess

import numpy as np
import pytest

import embstore
from conftest import CLI, SEGMENT_MB, run

IO = 17
NO_SPACE = "cannot write to stdout: No space left on device"


def run_to_full(*args):
    """Runs the tool with stdout on /dev/full, where every write fails with ENOSPC."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([CLI, *map(str, args)], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    return proc.returncode, proc.stderr


def one_line(text):
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("args", [
    ["get", "{s}", 1, "--json"],
    ["get", "{s}", 1, "--history", "--json"],
    ["get", "{s}", 1],
    ["head", "{s}", "--json"],
    ["head", "{s}", "--vectors", "-n", 1000],
    ["tail", "{s}", "--vectors", "--json"],
    ["info", "{s}", "--json"],
    ["info", "{s}"],
    ["verify", "{s}", "--json"],
    ["verify", "{s}"],
    ["version", "--json"],
])
def test_a_read_only_command_whose_output_cannot_be_written_exits_17_naming_stdout(store, args):
    code, err = run_to_full(*[a.format(s=store) if isinstance(a, str) else a for a in args])
    assert code == IO, err
    assert one_line(err) == f"embstore {args[0]}: {NO_SPACE}"


def test_a_long_report_that_cannot_be_written_ends_at_the_first_failed_write(tmp_path):
    # 3.8 MB of vectors: the first write of stdio's buffer fails, and the command stops there
    # rather than format every row for a stdout that takes none (strace counts its writes).
    path = str(tmp_path / "big")
    with embstore.Writer(path, dim=64) as w:
        w.append(np.arange(3000), np.random.default_rng(1).random((3000, 64), np.float32))
    trace = tmp_path / "trace"
    with open("/dev/full", "w") as full:
        proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=write", "-o", str(trace), CLI,
                               "head", path, "--vectors", "-n", "3000"],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == IO, proc.stderr
    assert one_line(proc.stderr) == f"embstore head: {NO_SPACE}"
    to_stdout = [line for line in trace.read_text().splitlines() if "write(1," in line]
    assert len(to_stdout) == 1, to_stdout[:5]
    assert "ENOSPC" in to_stdout[0]


@pytest.mark.parametrize("command", ["get --npy", "export", "compact", "merge", "create",
                                     "rebuild-index"])
def test_a_command_that_changed_something_says_so_when_its_report_is_lost(store, tmp_path,
                                                                           command):
    out = str(tmp_path / "out")
    args, done = {
        "get --npy": (["get", store, 5, "--npy", out + ".npy"],
                      f"wrote 1 row of key 5 to {out}.npy"),
        "export": (["export", store, out, "-q"], f"wrote 30 rows to {out}"),
        "compact": (["compact", store, out, "-q"], f"wrote 30 rows to {out}"),
        "merge": (["merge", out, store, "-q"], f"wrote 30 rows to {out}"),
        "create": (["create", out, "--dim", 4], f"created {out}"),
        "rebuild-index": (["rebuild-index", store], f"rebuilt the key index of {store}"),
    }[command]
    code, err = run_to_full(*args)
    assert code == IO, err
    name = command.split()[0]
    assert one_line(err) == (f"embstore {name}: {NO_SPACE}; the {name} itself was done ({done}), "
                             "only its report was lost")
    assert os.path.exists(out + ".npy" if command == "get --npy" else
                          store if command == "rebuild-index" else out)


def run_to_closed_pipe(*args):
    """Runs the tool with stdout on a pipe whose reader has gone (`| true`): a write raises
    SIGPIPE, or fails with EPIPE where it is ignored."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([CLI, *map(str, args)], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("command", ["truncate", "import", "compact", "create"])
def test_a_command_that_changed_something_says_so_when_its_pipe_is_closed(store, tmp_path,
                                                                          command):
    # Killed by SIGPIPE (141 in a shell, no word) after it had done its work: under
    # `set -o pipefail` a truncate that ran read as one that failed.
    out = str(tmp_path / "out")
    np.save(tmp_path / "v.npy", np.ones((3, 4), np.float16))
    args, done = {
        "truncate": (["truncate", store, "--rows", 5, "--yes"], f"{store}: kept rows [0, 5)"),
        "import": (["import", store, tmp_path / "v.npy", "-q"], f"appended 3 rows to {store}"),
        "compact": (["compact", store, out, "-q"], f"wrote 30 rows to {out}"),
        "create": (["create", out, "--dim", 4], f"created {out}"),
    }[command]
    code, err = run_to_closed_pipe(*args)
    assert code == IO, err
    line = one_line(err)
    assert line.startswith(f"embstore {command}: cannot write to stdout: Broken pipe; the "
                           f"{command} itself was done ({done}"), line
    assert line.endswith("only its report was lost"), line
    rows = {"truncate": 5, "import": 33}.get(command)
    if rows is not None:
        assert len(embstore.Reader(store)) == rows
    else:
        assert os.path.exists(out)


def test_a_read_only_command_into_a_closed_pipe_ends_quietly(store):
    # `embstore info s | head -1`: the default death by SIGPIPE, no message, as any filter.
    code, err = run_to_closed_pipe("info", store)
    assert code == -13 and err == "", (code, err)  # SIGPIPE


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["get", "--help"]])
def test_help_and_version_that_cannot_be_written_exit_17(args):
    code, err = run_to_full(*args)
    assert code == IO, err
    assert one_line(err) == f"embstore: {NO_SPACE}"


@pytest.mark.parametrize("stdout", ["full", "closed pipe"])
def test_serve_help_that_cannot_be_written_exits_17_without_a_traceback(stdout):
    # The Python module's argparse printed a BrokenPipeError or OSError traceback, exit 1.
    code, err = (run_to_full if stdout == "full" else run_to_closed_pipe)("serve", "--help")
    assert code == IO, err
    assert one_line(err) == "embstore serve: cannot write to stdout: " + (
        "No space left on device" if stdout == "full" else "Broken pipe")


def test_truncate_whose_report_cannot_be_written_exits_17_and_says_the_rows_were_dropped(store):
    # Epochs 0, 1, 2 of 10 rows each: --from-epoch 1 keeps 10.
    code, err = run_to_full("truncate", store, "--from-epoch", 1, "--yes", "--json")
    assert code == IO, err
    line = one_line(err)
    assert line.startswith(f"embstore truncate: {NO_SPACE}; the truncate itself was done ("), line
    assert "kept rows [0, 10), dropped 20" in line and "only its report was lost" in line
    assert len(embstore.Reader(store)) == 10


def test_salvage_whose_report_cannot_be_written_exits_17_and_says_the_copy_was_made(
        store, tmp_path):
    out = str(tmp_path / "saved")
    code, err = run_to_full("salvage", store, out, "--json", "--quiet")
    assert code == IO, err
    line = one_line(err)
    assert line.startswith(f"embstore salvage: {NO_SPACE}; the salvage itself was done ("), line
    assert f"copied 30 of 30 rows of {store} into {out}, 0 lost" in line
    assert len(embstore.Reader(out)) == 30


def test_import_whose_report_cannot_be_written_exits_17_and_says_the_rows_were_appended(
        store, tmp_path):
    exported = str(tmp_path / "out")
    assert run("export", store, exported, "-q").code == 0
    copy = str(tmp_path / "copy")
    code, err = run_to_full("import", copy, exported, "--json", "-q")
    assert code == IO, err
    line = one_line(err)
    assert line.startswith(f"embstore import: {NO_SPACE}; the import itself was done ("), line
    assert f"appended 30 rows to {copy}" in line
    assert len(embstore.Reader(copy)) == 30


def test_nothing_changed_says_only_that_stdout_failed(store):
    # --rows equal to the store's size: nothing to drop, so nothing was done.
    code, err = run_to_full("truncate", store, "--rows", 30, "--yes")
    assert code == IO, err
    assert one_line(err) == f"embstore truncate: {NO_SPACE}"


# Values that JSON numbers hold (a negative zero among them) and those they cannot: NaN, +inf
# and -inf.
SPECIAL = [math.nan, math.inf, -math.inf, 0.1, -0.0, 1.5, -2.0e-3]


def non_finite_store(path, dtype):
    embstore.create(path, dim=len(SPECIAL), dtype=dtype, segment_mb=SEGMENT_MB)
    values = np.array([SPECIAL, SPECIAL[::-1]],
                      dtype=np.float64 if dtype == "float64" else np.float32)
    with embstore.Writer(path) as w:
        w.append(keys=np.array([7, 8], dtype=np.uint64), vectors=values, epoch=3)
    return str(path)


def from_json(values):
    """The JSON vector as floats: the strings of protobuf's JSON mapping back to NaN and inf."""
    names = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    out = []
    for v in values:
        if isinstance(v, str):
            out.append(names[v])  # KeyError for any other string.
        else:
            assert isinstance(v, (int, float)), values
            out.append(float(v))
    return out


def as_stored(values, dtype):
    """`values` converted to the store's dtype, as the bit patterns the Reader returns."""
    if dtype == "bfloat16":
        # A bfloat16 is the upper half of the float32 of the same value (exact here: the CLI
        # printed a value the store holds).
        return (np.array(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return np.array(values, dtype=np.dtype(dtype))


def assert_same_row(values, reader, row, dtype):
    stored = reader.vectors[row]
    printed = as_stored(from_json(values), dtype)
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[stored.dtype.itemsize]
    as_floats = (stored.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else stored
    nan = np.isnan(as_floats)
    assert np.array_equal(nan, np.isnan(from_json(values))), values
    # Finite values and the infinities bit-exact (-0.0 included); NaN as NaN.
    assert np.array_equal(printed.view(uint)[~nan], stored.view(uint)[~nan]), (values, stored)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_json_vectors_keep_nan_and_infinities_as_protobuf_strings(tmp_path, dtype):
    store = non_finite_store(tmp_path / "s", dtype)
    reader = embstore.Reader(store)
    outputs = {
        "get": run("get", store, 7, "--json"),
        "get --history": run("get", store, 8, "--history", "--json"),
        "head": run("head", store, "--vectors", "--json"),
        "tail": run("tail", store, "--vectors", "--json", "-n", 1),
    }
    for what, r in outputs.items():
        assert r.code == 0, (what, r)
        assert "null" not in r.out, (what, r.out)
    got = json.loads(outputs["get"].out)
    assert got["vector"][:3] == ["NaN", "Infinity", "-Infinity"]
    assert_same_row(got["vector"], reader, 0, dtype)
    history = json.loads(outputs["get --history"].out)["versions"]
    assert [v["row"] for v in history] == [1]
    assert history[0]["vector"][-3:] == ["-Infinity", "Infinity", "NaN"]
    assert_same_row(history[0]["vector"], reader, 1, dtype)
    head = [json.loads(line) for line in outputs["head"].out.splitlines()]
    assert [h["row"] for h in head] == [0, 1]
    for h in head:
        assert_same_row(h["vector"], reader, h["row"], dtype)
    tail = json.loads(outputs["tail"].out)
    assert tail["row"] == 1
    assert_same_row(tail["vector"], reader, 1, dtype)


def test_csv_export_spells_nan_and_infinities_as_numpy_reads_them(tmp_path):
    # Not JSON: CSV has no null, and "nan", "inf", "-inf" are what numpy, pandas and Python's
    # float() read; pinned here so that the two outputs are changed knowingly.
    store = non_finite_store(tmp_path / "s", "float32")
    out = str(tmp_path / "rows.csv")
    assert run("export", store, out, "-q").code == 0
    with open(out) as f:
        header = f.readline().strip().split(",")
        rows = [line.strip().split(",") for line in f]
    assert header[:3] == ["row", "key", "epoch"]
    assert rows[0][3:6] == ["nan", "inf", "-inf"]
    values = np.genfromtxt(out, delimiter=",", skip_header=1, dtype=np.float64)[:, 3:]
    stored = embstore.Reader(store).vectors[:]
    assert np.array_equal(values.astype(np.float32), stored, equal_nan=True)
    assert np.array_equal(np.signbit(values), np.signbit(stored))


def test_a_nan_with_its_sign_bit_set_prints_as_nan_in_tables_and_csv(tmp_path):
    # fmt printed it "-nan", which the README's "nan" does not cover (float() reads it, but
    # tools that match the text do not).
    path = str(tmp_path / "s")
    embstore.create(path, dim=3, segment_mb=SEGMENT_MB)
    values = np.array([[-np.nan, np.nan, -np.inf]], np.float32)
    assert np.signbit(values[0, 0])
    with embstore.Writer(path) as w:
        w.append(keys=np.array([1], dtype=np.uint64), vectors=values, epoch=0)
    for args in (["head", path, "--vectors"], ["tail", path, "--vectors"], ["get", path, 1]):
        r = run(*args)
        assert r.code == 0 and "[nan nan -inf]" in r.out and "-nan" not in r.out, (args, r)
    out = str(tmp_path / "rows.csv")
    assert run("export", path, out, "-q").code == 0
    with open(out) as f:
        assert f.read().splitlines()[1] == "0,1,0,nan,nan,-inf"


def test_rows_printed_before_a_damaged_row_reach_stdout_before_the_error(tmp_path):
    """head --vectors meets a row that fails its checksum after printing 5: those lines are
    written, then the one error line (exit 14). Output held for the next write was dropped when
    the command ended in an error."""
    store = str(tmp_path / "s")
    with embstore.Writer(store, dim=4) as w:
        w.append(np.arange(10), np.ones((10, 4), np.float32), 0)
    with open(os.path.join(store, "rows.1"), "r+b") as f:
        f.seek(5 * 16 + 1)
        byte = f.read(1)
        f.seek(5 * 16 + 1)
        f.write(bytes([byte[0] ^ 0x40]))
    r = run("head", store, "-n", "10", "--vectors")
    assert r.code == 14 and "row 5 (key 5, epoch 0) fails its checksum" in r.err, r
    assert [line.split()[0] for line in r.out.splitlines()[1:]] == ["0", "1", "2", "3", "4"], r
