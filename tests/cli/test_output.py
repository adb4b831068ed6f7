"""What every command prints on stdout: a report that cannot be written (stdout on a full disk,
/dev/full) is an error, exit 17, never lost behind exit 0."""

import subprocess

import pytest

import embstore
from conftest import CLI, run

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
    ["head", "{s}", "--vectors", "-n", 1000],  # more than stdio's buffer: fails part-way
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


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["get", "--help"]])
def test_help_and_version_that_cannot_be_written_exit_17(args):
    code, err = run_to_full(*args)
    assert code == IO, err
    assert "cannot write to stdout" in one_line(err)


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
