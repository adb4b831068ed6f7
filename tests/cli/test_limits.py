"""The writing commands under resource limits (ulimit -f, -n, -v, -u): each fails with one line
naming the output, the cause and the limit, leaves no hidden working directory, and loses nothing
already stored; a key index that cannot be kept does not cost a new output its rows."""

import os
import re
import resource
import subprocess

import numpy as np
import pytest

import embstore
from conftest import CLI, Result, hash_tree, make_store, partial_dirs, run

FULL = 18  # 10 + ErrorCode::kFull
FSIZE_LIMIT = 1 << 20  # Bytes: the source store's rows.1 alone is twice that.


def run_limited(*args, fsize=None, cwd=None) -> Result:
    """Runs the tool with RLIMIT_FSIZE set to `fsize` bytes (SIGXFSZ at its default action, as
    subprocess restores it, as a shell's `ulimit -f` would leave it)."""
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    proc = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit, cwd=cwd, timeout=120)
    return Result(proc)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A store of 8,000 float32 rows of dim 64 (2 MiB of rows) and an .npy file of as many."""
    base = tmp_path_factory.mktemp("big")
    store = make_store(base / "s", dim=64, dtype="float32", epochs=4, rows_per_epoch=2000)
    data = base / "data.npy"
    np.save(data, np.random.default_rng(1).standard_normal((8000, 64)).astype(np.float32))
    return store, str(data)


@pytest.fixture
def source(big, tmp_path):
    """A fresh copy of the big store in tmp_path/s, and the .npy file."""
    store, data = big
    copy = tmp_path / "s"
    subprocess.run(["cp", "-a", store, str(copy)], check=True)
    return str(copy), data


FSIZE_CASES = {
    "compact": ["compact", "{s}", "{o}/out.emb"],
    "export npy": ["export", "{s}", "{o}/out"],
    "export hdf5": ["export", "{s}", "{o}/out.h5"],
    "export csv": ["export", "{s}", "{o}/out.csv"],
    "salvage": ["salvage", "{s}", "{o}/out.emb"],
    "merge": ["merge", "{o}/out.emb", "{s}"],
    "import new": ["import", "{o}/out.emb", "{d}"],
    "import existing": ["import", "{s}", "{d}"],
    "truncate": ["truncate", "{s}", "--rows", "7000", "--yes"],
}


@pytest.mark.parametrize("case", list(FSIZE_CASES))
def test_a_write_past_the_file_size_limit_fails_cleanly_naming_the_limit(source, tmp_path, case):
    store, data = source
    out = tmp_path / "o"
    out.mkdir()
    before, names = hash_tree(store), sorted(os.listdir(store))
    args = [a.format(s=store, o=out, d=data) for a in FSIZE_CASES[case]]
    r = run_limited(*args, fsize=FSIZE_LIMIT)
    # Killed by SIGXFSZ, it exited -25 (153 in a shell) with no message, leaving its working
    # directory (and truncate its next generation's rows.2 and index.2 in the store).
    assert r.code == FULL, r
    assert "File too large" in r.err, r
    assert f"(the file-size limit is {FSIZE_LIMIT} bytes: raise ulimit -f)" in r.err, r
    assert len(r.err.strip().splitlines()) == 1, r
    assert os.listdir(out) == [], r
    assert partial_dirs(out) == [] and partial_dirs(tmp_path) == []
    assert hash_tree(store) == before, r
    # The same files (the key index generation the fixture's growths reached, keys.3 or keys.4,
    # depends on when its growth thread ran).
    assert sorted(os.listdir(store)) == names, r
    reader = embstore.Reader(store)
    assert len(reader) == 8000 and reader.verify().ok


def run_with_limit(args, which, value) -> Result:
    """Runs the tool with resource limit `which` (resource.RLIMIT_*) set to `value`."""
    def limit():
        resource.setrlimit(which, (value, value))
    proc = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit, timeout=120)
    return Result(proc)


def run_with_nofile(args, nofile) -> Result:
    return run_with_limit(args, resource.RLIMIT_NOFILE, nofile)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """A store of 8,000 float32 rows of dim 4 and an .npy file of as many: rows (128 KiB) and
    index entries (256 KiB) in files smaller than a key index for them."""
    base = tmp_path_factory.mktemp("narrow")
    store = make_store(base / "s", dim=4, dtype="float32", epochs=4, rows_per_epoch=2000)
    data = base / "data.npy"
    np.save(data, np.random.default_rng(2).standard_normal((8000, 4)).astype(np.float32))
    return store, str(data)


# Limits from too low to store anything up to enough for everything: the file size (ulimit -f:
# these commands size the key index for every row at once, a file larger than the rows' own
# here), address space (ulimit -v: its mapping, or a thread's stack). Open files no longer
# tell the two apart: without a growth the key index opens no file after the store's own.
KEY_INDEX_LIMITS = {
    "file size": (resource.RLIMIT_FSIZE, range(64 << 10, 2 << 20, 16 << 10)),
    "address space": (resource.RLIMIT_AS, range(30 << 20, 200 << 20, 2 << 20)),
}


@pytest.mark.parametrize("limit", list(KEY_INDEX_LIMITS))
@pytest.mark.parametrize("command", ["import", "compact", "salvage", "merge"])
def test_a_new_output_whose_key_index_cannot_be_kept_is_made_with_every_row_and_a_warning(
        narrow, tmp_path, command, limit):
    # At a limit that lets the rows be stored but not the key index, the output is made (the
    # key index is derived data the next writer rebuilds), with a warning.
    base, data = narrow
    store = str(tmp_path / "s")
    subprocess.run(["cp", "-a", base, store], check=True)
    before = hash_tree(store)
    which, values = KEY_INDEX_LIMITS[limit]
    warned = False
    for value in values:
        out = tmp_path / f"out{value}.emb"
        args = {"import": ["import", out, data], "compact": ["compact", store, out],
                "salvage": ["salvage", store, out], "merge": ["merge", out, store]}[command]
        r = run_with_limit(args, which, value)
        assert partial_dirs(tmp_path) == [], r
        if r.code != 0:
            # Too low to store the rows: nothing made. (The old code also came here when only
            # the key index failed, removing the output with every row in it.)
            assert "the key index could not be maintained" not in r.err, r
            assert not out.exists(), r
            continue
        if "warning" not in r.err:
            assert r.err == "" and out.exists(), r
            break  # Enough for everything: the limits below it were tried.
        warned = True
        assert f"embstore {command}: warning: {out}: the key index could not be maintained" \
            in r.err, r
        assert "every row is stored" in r.err and ".partial-" not in r.err, r
        assert len(r.err.strip().splitlines()) == 1, r
        reader = embstore.Reader(str(out))
        assert len(reader) == 8000 and reader.verify().ok
        got = subprocess.run([CLI, "get", str(out), "7", "--json"], capture_output=True,
                             text=True, timeout=60)
        assert got.returncode == 0 and '"key":7' in got.stdout.replace(" ", ""), got
    if not warned and limit != "file size":
        pytest.skip(f"no {limit} limit tried stored the rows but not the key index here")
    assert warned, "no limit stored the rows but not the key index"
    assert hash_tree(store) == before


def test_an_import_into_an_existing_store_whose_key_index_cannot_be_kept_warns_and_exits_0(
        narrow, tmp_path):
    # Every row was appended and synced, and the import exited 18 (the close's key index
    # failure) with "8000 of 8000 rows were imported ... and stay there": a script that retried
    # on the exit status stored the rows twice. As for a new store: a warning, exit 0.
    base, data = narrow
    warned = False
    for value in range(256 << 10, 2 << 20, 32 << 10):
        store = str(tmp_path / f"s{value}")
        subprocess.run(["cp", "-a", base, store], check=True)
        r = run_with_limit(["import", store, data, "--quiet"], resource.RLIMIT_FSIZE, value)
        rows = len(embstore.Reader(store))
        if r.code != 0:
            # Too low to store the rows (the error names a rows or index file), or the old code.
            assert "the key index could not be maintained" not in r.err, r
            assert rows == 8000, r
            continue
        assert rows == 16000 and embstore.Reader(store).verify().ok, r
        if "warning" not in r.err:
            assert r.err == "", r
            break  # Enough for everything: the limits below it were tried.
        warned = True
        assert r.err.startswith(
            f"embstore import: warning: {store}: the key index could not be maintained"), r
        assert "every row is stored" in r.err and len(r.err.strip().splitlines()) == 1, r
        assert f"into {store} (rows 8000..16000)" in r.out, r
        got = subprocess.run([CLI, "get", store, "7", "--history", "--json"],
                             capture_output=True, text=True, timeout=60)
        # Its 4 epochs' rows, and row 8007 imported (key 7 of the file), found.
        assert got.returncode == 0 and got.stdout.replace(" ", "").count('"row":') == 5, got
        assert '"row":8007' in got.stdout.replace(" ", ""), got
    assert warned, "no limit stored the rows but not the key index"


def test_an_import_into_an_existing_store_whose_close_fails_otherwise_is_an_error(narrow, tmp_path):
    # Only the key index's failure is a warning: a disk's EIO at the close's sync (every row
    # appended was synced before it) stays an error, naming the rows imported, which stay.
    shim = tmp_path / "header_sync_eio.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim),
                    os.path.join(os.path.dirname(__file__), "..", "support",
                                 "header_sync_eio.c"), "-ldl"],
                   check=True)
    base, data = narrow
    store = str(tmp_path / "s")
    subprocess.run(["cp", "-a", base, store], check=True)
    # The import's own sync() syncs the header once; its close() a second time.
    env = dict(os.environ, LD_PRELOAD=str(shim), HEADER_SYNC_EIO_AT="2")
    r = run("import", store, data, "--quiet", env=env)
    assert r.code == 20 and "warning" not in r.err, r  # 10 + kIO
    assert "Input/output error" in r.err, r
    assert f"8000 of 8000 rows were imported into {store} before this (rows 8000..16000) and " \
        "stay there" in r.err, r
    reader = embstore.Reader(store)
    assert len(reader) == 16000 and reader.verify().ok


NEW_OUTPUT_CASES = {
    "create": ["create", "{o}", "--dim", "64"],
    "compact": ["compact", "{s}", "{o}"],
    "salvage": ["salvage", "{s}", "{o}"],
    "merge": ["merge", "{o}", "{s}"],
    "import": ["import", "{o}", "{d}"],
    "export": ["export", "{s}", "{o}"],
}


@pytest.mark.parametrize("fill", ["full", "almost full", "1 MiB free"])
@pytest.mark.parametrize("case", list(NEW_OUTPUT_CASES))
def test_a_new_output_on_a_full_disk_is_named_first_with_the_cause(source, small_tmpfs, case,
                                                                    fill):
    # They named a file of a directory the user never heard of, or of the output (which never
    # holds it): 'fallocate /d/out/rows.1: No space left on device (writing /d/.out.partial-..)',
    # 'write /d/out.creating.37ba438e01cc/header: No space left on device'.
    store, data = source
    disk = small_tmpfs("1m")
    free = {"full": 0, "almost full": 24 << 10, "1 MiB free": 1 << 20}[fill]
    if free < (1 << 20):
        with open(disk / "fill", "wb") as f:
            f.write(b"\0" * ((1 << 20) - free))
    out = disk / "out"
    before = hash_tree(store)
    r = run_limited(*[a.format(s=store, o=out, d=data) for a in NEW_OUTPUT_CASES[case]])
    if case == "create" and fill == "1 MiB free":
        assert r.code == 0, r  # A new empty store fits.
        return
    assert r.code == FULL, r
    line = r.err.strip()
    assert len(line.splitlines()) == 1, r
    # The output and the cause, then the file met in parentheses.
    assert line.split(" (", 1)[0] in (
        f"embstore {case}: {out}: cannot write it: No space left on device",
        f"embstore {case}: {out}: cannot create the store: No space left on device"), r
    assert f"{out}/" not in line, r  # A file of an output that does not exist.
    assert sorted(os.listdir(disk)) == (["fill"] if free < (1 << 20) else []), r
    assert hash_tree(store) == before


def test_a_new_output_out_of_open_files_is_named_first_with_the_cause(source, tmp_path):
    # 'open /d/out.emb/lock: Too many open files (writing /d/./.out.emb.partial-..)'.
    store, data = source
    for args in (["import", tmp_path / "out.emb", data], ["salvage", store, tmp_path / "out.emb"],
                 ["compact", store, tmp_path / "out.emb"]):
        r = run_with_nofile(args, 7)
        assert r.code == 17, (args, r)
        assert r.err.startswith(f"embstore {args[0]}: {tmp_path / 'out.emb'}: cannot write it: "
                                "Too many open files ("), (args, r)
        assert f"{tmp_path / 'out.emb'}/" not in r.err, (args, r)
        assert sorted(os.listdir(tmp_path)) == ["s"], (args, r)
