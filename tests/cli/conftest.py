"""Shared helpers for the command-line tests: the binary, a runner, small stores, file hashes."""

import contextlib
import hashlib
import os
import shutil
import subprocess

import numpy as np
import pytest

import embstore

CLI = os.environ.get("EMBSTORE_CLI") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build", "bin", "embstore")
# Small segments keep the test stores a few hundred KiB instead of 64 MiB + index.
SEGMENT_MB = 1 / 16


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def __repr__(self):
        return f"Result(code={self.code}, out={self.out[:500]!r}, err={self.err[:500]!r})"


def run(*args, stdin=None, env=None) -> Result:
    """Runs the tool with `args`; returns its exit code, stdout and stderr (text)."""
    proc = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, input=stdin,
                          env=env, timeout=120)
    return Result(proc)


def make_store(path, dim=4, dtype="float16", epochs=3, rows_per_epoch=10, metadata=None,
               key_offset=True):
    """A store with `epochs` epochs of `rows_per_epoch` rows; epoch e has keys e..e+rows-1."""
    embstore.create(path, dim=dim, dtype=dtype, segment_mb=SEGMENT_MB,
                    metadata=metadata if metadata is not None else {"model": "tiny \"q\""})
    rng = np.random.default_rng(7)
    with embstore.Writer(path) as w:
        for e in range(epochs):
            if dtype in ("int8", "uint8"):
                v = rng.integers(0, 100, size=(rows_per_epoch, dim)).astype(dtype)
            elif dtype == "float64":
                v = rng.standard_normal((rows_per_epoch, dim))
            else:
                v = rng.standard_normal((rows_per_epoch, dim)).astype(np.float32)
            keys = np.arange(rows_per_epoch, dtype=np.uint64) + (e if key_offset else 0)
            w.append(keys=keys, vectors=v, epoch=e)
        w.sync()
    return str(path)


def hash_tree(path) -> dict:
    """sha256 of every file under `path`, by relative name."""
    hashes = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                hashes[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def corrupt_row(store, row, record_bytes):
    """Flips one byte of row `row` in the data file (its checksum then fails)."""
    with open(os.path.join(store, "rows.1"), "r+b") as f:
        f.seek(row * record_bytes + 1)
        byte = f.read(1)
        f.seek(row * record_bytes + 1)
        f.write(bytes([byte[0] ^ 0x55]))


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "s")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A function that mounts a tmpfs of `size` (mount(8) syntax: "4m") at a new directory under
    tmp_path and returns it: a full disk on demand. Skips the test where mounting is not
    permitted (it needs root / CAP_SYS_ADMIN). Unmounted afterwards."""
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount(8) on this machine: cannot make a small file system")
    points = []

    def make(size):
        point = tmp_path / f"tmpfs{len(points)}"
        point.mkdir()
        r = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
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


@contextlib.contextmanager
def bind_mounted(directory, alias):
    """`directory` also at `alias` (a bind mount, removed afterwards); skips the test where
    mounting is not permitted."""
    os.makedirs(alias)
    if subprocess.run(["mount", "--bind", directory, alias], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (not root, or no mount permission)")
    try:
        yield alias
    finally:
        subprocess.run(["umount", alias], check=True)


def partial_dirs(directory):
    """The hidden working directories (.NAME.partial-*) in `directory`."""
    return sorted(name for name in os.listdir(directory)
                  if name.startswith(".") and ".partial-" in name)


def kill_when(proc, ready, timeout):
    """Kills `proc` (SIGKILL) as soon as ready() holds, polled every millisecond for at most
    `timeout` seconds. True if it was killed running (mid-way), False if it had ended first."""
    import signal
    import time
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL
