"""embstore.io when writing fails (a full disk) or is interrupted (Ctrl-C): the error names the
output the caller asked for, nothing half-made is left at it or beside it, and rows that stay in
an existing store are said to stay. A full disk is a small tmpfs (root only, else skipped); calls
that used to kill the interpreter run in a child process."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import embstore

ROWS, DIM = 30000, 128  # 15 MiB of float32: more than the 4 MiB file systems below hold


@pytest.fixture
def small_tmpfs(tmp_path):
    """A function that mounts a tmpfs of `size` (mount(8) syntax: "4m") at a new directory under
    tmp_path and returns it: a full disk on demand (as tests/cli/conftest.py's small_tmpfs).
    Skips the test where mounting is not permitted. Unmounted afterwards."""
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) on this machine: cannot make a small file system")
    points = []

    def make(size):
        point = tmp_path / f"tmpfs{len(points)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                            str(point)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip("mounting a tmpfs is not permitted here (needs root / CAP_SYS_ADMIN): "
                        + (r.stderr.strip().splitlines() or ["?"])[0])
        points.append(point)
        return point

    try:
        yield make
    finally:
        for point in points:
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def small_appends(monkeypatch):
    """Rows copied and appended 1 MiB at a time. On a 4 MiB tmpfs, stores of the default
    segment size then take some before the disk is full, and their key index cannot be built
    at the close either (with other sizes, whether the close fails too depends on timing)."""
    import embstore.io as eio
    monkeypatch.setattr(eio, "_CHUNK_BYTES", 1 << 20)


def rows(n=ROWS):
    return np.random.default_rng(3).standard_normal((n, DIM)).astype(np.float32)


def big_store(path):
    with embstore.Writer(path, dim=DIM) as w:
        w.append(np.arange(ROWS), rows())
    return str(path)


def run_child(script, *args):
    """Runs `script` in a new interpreter; returns (exit code, its last stdout line as JSON or
    None, stderr)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None, proc.stderr


# Calls `embstore.io.<argv[1]>(argv[2], argv[3])`; prints the error it raised as JSON once what
# is left of it is freed (h5py objects outliving a failed close crashed the interpreter there).
CALL_AND_REPORT = """
    import gc, json, sys
    import embstore.io
    try:
        getattr(embstore.io, sys.argv[1])(sys.argv[2], sys.argv[3])
        report = {"raised": None}
    except BaseException as error:
        report = {"raised": type(error).__name__, "errno": getattr(error, "errno", None),
                  "message": str(error), "notes": getattr(error, "__notes__", [])}
    gc.collect()
    print(json.dumps(report), flush=True)
"""


def test_import_on_a_full_disk_into_an_empty_directory_leaves_it_empty(small_tmpfs,
                                                                        small_appends):
    """The error path closed the Writer first; its close raised again (the disk still full), so
    the directory kept a store of the rows appended so far that verified clean, and the error
    raised was the close's, saying "every row is stored"."""
    mnt = small_tmpfs("4m")
    out = mnt / "out"
    out.mkdir()
    with pytest.raises(OSError) as raised:
        embstore.import_npy(out, rows())
    assert raised.value.errno == errno.ENOSPC
    assert str(out) in str(raised.value) and "every row is stored" not in str(raised.value)
    assert os.listdir(out) == [] and os.listdir(mnt) == ["out"]


def test_import_on_a_full_disk_into_a_new_path_leaves_nothing_and_names_it(small_tmpfs,
                                                                           small_appends):
    """The same close error left the hidden .out.partial-* directory behind, and the message
    named it."""
    mnt = small_tmpfs("4m")
    out = str(mnt / "out")
    with pytest.raises(OSError) as raised:
        embstore.import_npy(out, rows())
    assert raised.value.errno == errno.ENOSPC
    message = str(raised.value)
    # As every tool words it: the output first, the working directory's file in parentheses.
    assert re.fullmatch(rf"\[Errno 28\] {re.escape(out)}: cannot write it: No space left on "
                        rf"device \(\w+ {re.escape(str(mnt))}/\.out\.partial-\w+/\S+\)",
                        message), message
    assert "every row is stored" not in message
    assert os.listdir(mnt) == []


def test_import_into_an_existing_store_on_a_full_disk_says_which_rows_stay(small_tmpfs,
                                                                          small_appends):
    mnt = small_tmpfs("4m")
    store = str(mnt / "s")
    with embstore.Writer(store, dim=DIM, segment_mb=1 / 16) as w:
        w.append(np.arange(10), rows(10))
    with pytest.raises(OSError) as raised:
        embstore.import_npy(store, rows())
    assert raised.value.errno == errno.ENOSPC
    notes = getattr(raised.value, "__notes__", [str(raised.value)])
    said = re.search(rf"(\d+) of {ROWS} rows were imported into {re.escape(store)} before this "
                     r"\(rows 10\.\.(\d+)\) and stay there$", notes[0])
    assert said, notes
    assert 0 < int(said[1]) < ROWS and int(said[2]) == 10 + int(said[1])
    assert len(embstore.Reader(store)) == int(said[2])


# Ctrl-C as the Writer's append returns for the third time: the rows it appended are stored,
# and counted only by the store (import_npy had not counted them yet).
INTERRUPT_AFTER_THIRD_APPEND = """
    import json, os, signal, sys
    import numpy as np
    import embstore, embstore.io

    appends = 0

    def profile(frame, event, arg):
        global appends
        if event == "return" and frame.f_code is embstore.Writer.append.__code__:
            appends += 1
            if appends == 3:
                sys.setprofile(None)
                os.kill(os.getpid(), signal.SIGINT)

    source = np.ones((1000, 8), np.float32)
    sys.setprofile(profile)
    try:
        embstore.io.import_npy(sys.argv[1], source)
        report = {"raised": None}
    except BaseException as error:
        sys.setprofile(None)
        report = {"raised": type(error).__name__, "message": str(error),
                  "notes": getattr(error, "__notes__", [])}
    print(json.dumps(report), flush=True)
"""


def test_an_import_whose_close_fails_at_a_sync_raises_saying_which_rows_stay(tmp_path):
    # Only the key index's failure at close is a RuntimeWarning (test_salvage): a disk's EIO at
    # the close's sync (every row appended was synced before it) is raised, with the note.
    shim = tmp_path / "header_sync_eio.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim),
                    os.path.join(os.path.dirname(__file__), "..", "support",
                                 "header_sync_eio.c"), "-ldl"], check=True)
    store = str(tmp_path / "s")
    with embstore.Writer(store, dim=4) as w:
        w.append(range(100), np.zeros((100, 4), np.float32))
    script = textwrap.dedent(f"""
        import warnings
        import numpy as np, embstore
        warnings.simplefilter("error")  # a warning instead of the error fails the child
        try:
            embstore.import_npy({store!r}, np.ones((50, 4), np.float32))
        except embstore.Error as error:
            print(type(error).__name__, error, *getattr(error, "__notes__", []))
        """)
    # The import's own sync() syncs the header once; its close() a second time.
    env = dict(os.environ, LD_PRELOAD=str(shim), HEADER_SYNC_EIO_AT="2")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=env, timeout=120)
    assert child.returncode == 0, child.stderr
    # The Writer is poisoned by the failed sync: PoisonedError, naming the disk's error.
    assert child.stdout.startswith("PoisonedError "), child.stdout
    assert "fdatasync" in child.stdout and "Input/output error" in child.stdout, child.stdout
    assert f"50 of 50 rows were imported into {store} before this (rows 100..150) and stay " \
        "there" in child.stdout, child.stdout
    r = embstore.Reader(store)
    assert len(r) == 150 and r.verify().ok


def test_two_imports_creating_the_same_store_both_store_their_rows(tmp_path):
    # The second to publish raised FileExistsError and imported nothing; it now appends to the
    # store the first made (as the CLI's import: tests/cli/test_transfer.py).
    data = str(tmp_path / "v.npy")
    np.save(data, np.random.default_rng(3).standard_normal((200_000, 64)).astype(np.float32))
    store = str(tmp_path / "race")
    script = f"import embstore; print(embstore.import_npy({store!r}, {data!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [(code, out.strip()) for code, out, _ in results] == [(0, "200000")] * 2, results
    r = embstore.Reader(store)
    assert len(r) == 400_000 and r.verify().ok
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_ctrl_c_during_an_import_into_an_existing_store_says_which_rows_stay(tmp_path):
    """A KeyboardInterrupt kept the rows appended so far without a word (a retry appends them
    again); it now carries what the other errors say."""
    store = str(tmp_path / "s")
    with embstore.Writer(store, dim=8) as w:
        w.append(np.arange(10), np.zeros((10, 8), np.float32))
    # Chunks of 4 MiB are 131072 rows of 8 float32: a 1000-row source would be one append.
    script = INTERRUPT_AFTER_THIRD_APPEND.replace(
        "import embstore, embstore.io", "import embstore, embstore.io\n"
        "    embstore.io._CHUNK_BYTES = 100 * 8 * 4")
    code, report, err = run_child(script, store)
    assert code == 0, err
    assert report["raised"] == "KeyboardInterrupt", report
    assert report["notes"] == [f"300 of 1000 rows were imported into {store} before this "
                               "(rows 10..310) and stay there"]
    assert len(embstore.Reader(store)) == 310


@pytest.mark.parametrize("what", ["export_npy", "export_hdf5"])
def test_export_on_a_full_disk_raises_naming_the_output(tmp_path, small_tmpfs, what):
    """export_npy wrote through a mapping of a sparse file: the full disk killed the interpreter
    with SIGBUS. export_hdf5 raised h5py's RuntimeError, then the interpreter crashed (SIGSEGV)
    freeing the h5py objects. Both left the hidden working directory."""
    if what == "export_hdf5":
        pytest.importorskip("h5py")
    src = big_store(tmp_path / "src")
    mnt = small_tmpfs("4m")
    out = str(mnt / ("out" if what == "export_npy" else "out.h5"))
    code, report, err = run_child(CALL_AND_REPORT, what, src, out)
    assert code == 0, err
    assert report["raised"] == "OSError" and report["errno"] == errno.ENOSPC, report
    name = os.path.basename(out)
    hidden = re.escape(str(mnt)) + r"/\." + re.escape(name) + r"\.partial-\w+"
    inner = r"(vectors|keys|epochs)\.npy" if what == "export_npy" else re.escape(name)
    assert re.fullmatch(rf"\[Errno 28\] {re.escape(out)}: cannot write it: No space left on "
                        rf"device \(cannot write {hidden}/{inner}\)", report["message"]), report
    assert os.listdir(mnt) == []


def test_compact_on_a_full_disk_names_the_output_and_warns_of_nothing(tmp_path, small_tmpfs,
                                                                       small_appends, capfd,
                                                                       caplog):
    """The error named the removed .out.partial-*/index.1, and Writer's with-block logged the
    close's error, that "every row is stored", about a store that was then removed."""
    src = big_store(tmp_path / "src")
    mnt = small_tmpfs("4m")
    out = str(mnt / "out")
    with pytest.raises(OSError) as raised:
        embstore.compact(src, out)
    assert raised.value.errno == errno.ENOSPC
    assert re.fullmatch(rf"\[Errno 28\] {re.escape(out)}: cannot write it: No space left on "
                        rf"device \(\w+ {re.escape(str(mnt))}/\.out\.partial-\w+/\S+\)",
                        str(raised.value)), str(raised.value)
    assert "every row is stored" not in capfd.readouterr().err + caplog.text
    assert os.listdir(mnt) == []
