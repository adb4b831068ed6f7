"""Scenario 20: Python in ordinary use. The caller reuses and changes its buffers (rows, keys,
per-row epochs; numpy arrays of several layouts, lists, torch tensors) as soon as an append
returns, and processes end without close(): falling off the end of the script, sys.exit, an
uncaught exception, garbage collection followed by os._exit, a fork-started multiprocessing
child (which leaves through os._exit after multiprocessing's finalizers), and os.fork children.

What the package promises (src/python/embstore/__init__.py, Writer and EmbeddingRecorder docs),
and what is asserted here, round after seeded round:
  - copy=True (the default) and synchronous appends: every row stored is exactly what the
    caller's arrays held when append() returned; keys and epochs likewise.
  - copy=False (donated) used as documented (not touched before flush()): the same. Donated and
    changed before flush(): which values are stored is undefined, but every stored row matches
    its checksum, and keys, epochs and the row count are exact.
  - A Writer or recorder not closed is flushed at interpreter exit, in a multiprocessing child
    before its os._exit, and on garbage collection: every returned append is stored, once.
  - A forked child cannot append through its parent's Writer (ForkedChildError) and its exit
    writes none of the parent's queued rows (no duplicates).
  - os._exit outside multiprocessing runs nothing: queued rows may be lost (documented); what
    is stored is then a prefix of whole batches, exact.
  - A flush at exit that fails is loud: the store's path and the number of rows not written on
    stderr (or the failing append's traceback and a non-zero exit); the batches before the
    failure are stored exactly.

Run by `embstore_torture scenario 20` with PYTHONPATH at the built package:
    python3 python_use.py --seed N [--rounds R]
The child processes are this file again (`--child SPEC`).
"""
import argparse
import faulthandler
import fcntl
import gc
import importlib.util
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import embstore

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HELD = []  # Writers and recorders kept alive until the interpreter exits.
FORCE_MODE = None  # --exit-mode: every exit round uses this mode (to replay one case).


def say(line):
    """One protocol line to the parent, in one write(2): children of one pipe never interleave."""
    os.write(1, (line + "\n").encode())


def payload(keys, dim):
    """The rows the caller means to append for `keys`: multiples of 1/8 in [-125, 125], exact
    in float32 and float16."""
    k = np.asarray(keys, dtype=np.uint64)
    v = ((k[:, None] * np.uint64(7919) + np.arange(dim, dtype=np.uint64)) % np.uint64(2001))
    return (v.astype(np.float32) - 1000) / 8


def as_stored(rows, dtype):
    """`rows` (float32) as the store holds them; bfloat16 as its uint16 bit patterns."""
    if dtype == "float16":
        return rows.astype(np.float16)
    if dtype == "bfloat16":  # round to nearest even, as the store converts
        bits = rows.view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rows


# ---- The appending side (this process or a child) -----------------------------------------

class Appender:
    """Appends a list of batches [first_key, rows, epoch, layout] reusing one set of buffers,
    and scribbles over them as soon as each append returns."""

    def __init__(self, dim, dtype, max_rows, rng_seed):
        self.dim, self.dtype = dim, dtype
        self.rng = np.random.default_rng(rng_seed)
        self.contig = np.empty((max_rows, dim), np.float32)
        self.wide = np.empty((2 * max_rows, dim + 5), np.float32)
        self.half = np.empty((max_rows, dim), np.float16)
        self.keys = np.empty(max_rows, np.uint64)
        self.epochs = np.empty(max_rows, np.uint64)

    def vectors(self, rows, layout, values):
        if layout == "rowgap":  # contiguous elements, a gap between rows: passed with its stride
            v = self.wide[:rows, :self.dim]
        elif layout == "every_other":
            v = self.wide[:2 * rows:2, :self.dim]
        elif layout == "list":
            return values.tolist(), None
        elif layout == "float16" and self.dtype == "float16":
            v = self.half[:rows]
        else:
            v = self.contig[:rows]
        v[...] = values
        if layout == "torch" and HAVE_TORCH:
            import torch
            return torch.from_numpy(v), v  # shares the buffer: changing v changes the tensor
        return v, v

    def scribble(self, buf, rows):
        if buf is not None:
            buf[...] = self.rng.standard_normal(buf.shape).astype(buf.dtype)
        self.keys[:rows] = self.rng.integers(0, 2**63, rows, dtype=np.uint64)
        self.epochs[:rows] = 12345

    def append_all(self, w, batches, tag, copy=True, honest=True, start=0, report=say):
        for i, (first, rows, epoch, layout) in enumerate(batches, start):
            keys = self.keys[:rows]
            keys[:] = np.arange(first, first + rows, dtype=np.uint64)
            if epoch < 0:  # one epoch per row, from a reused array
                self.epochs[:rows] = np.arange(rows, dtype=np.uint64) % 3
                ep = self.epochs[:rows]
            else:
                ep = epoch
            vec, buf = self.vectors(rows, layout, payload(keys, self.dim))
            w.append(keys, vec, ep, copy=copy)
            report(f"R {tag} {i}")
            if honest and not copy:
                w.flush()
            self.scribble(buf, rows)


def open_writer(spec):
    return embstore.Writer(spec["path"], async_queue_mb=spec["queue_mb"],
                           map_bytes=spec.get("map_bytes"))


def wait_for_go(spec):
    """With the parent holding the store's lock: tell it we opened, wait until it holds it."""
    if spec.get("locked"):
        say("opened")
        sys.stdin.readline()


def child_main(spec):
    """One child process: append spec["batches"], then leave as spec["exit"] says."""
    mode = spec["exit"]
    if mode == "mp":
        return child_mp(spec)
    if mode == "fork":
        return child_fork(spec)
    if spec.get("recorder"):
        return child_recorder(spec)
    w = open_writer(spec)
    wait_for_go(spec)
    app = Appender(spec["dim"], spec["dtype"], spec["max_rows"], spec["seed"])
    if spec["hold"] == "global":
        HELD.append(w)
    else:  # a reference cycle: only the collector (or the interpreter's end) frees it

        class Holder:
            pass

        h = Holder()
        h.self, h.writer = h, w
    app.append_all(w, spec["batches"], "p", copy=spec["copy"])
    say("appended")
    del w
    if mode == "end":
        return
    if mode == "sys_exit":
        sys.exit(0)
    if mode == "exception":
        raise RuntimeError("the training loop failed (on purpose)")
    if mode == "gc":
        HELD.clear()
        h = None
        gc.collect()
        os._exit(0)  # nothing runs from here: only the collector can have written the rows
    if mode == "os_exit":
        os._exit(0)
    raise ValueError(mode)


def mp_target(spec, j):
    global MP_WRITER
    MP_WRITER = open_writer(spec)
    app = Appender(spec["dim"], spec["dtype"], spec["max_rows"], spec["seed"] + j)
    app.append_all(MP_WRITER, spec["children"][j], f"c{j}")
    how = spec["mp_exit"]
    if how == "gc":
        MP_WRITER = None
        gc.collect()
    elif how == "raise":
        raise RuntimeError("a worker failed (on purpose)")
    elif how == "sys_exit":
        sys.exit(0)


def child_mp(spec):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=mp_target, args=(spec, j)) for j in range(len(spec["children"]))]
    for p in procs:
        p.start()
    for j, p in enumerate(procs):
        p.join(300)
        say(f"X c{j} {p.exitcode}")


def child_fork(spec):
    w = open_writer(spec)
    app = Appender(spec["dim"], spec["dtype"], spec["max_rows"], spec["seed"])
    HELD.append(w)
    half = len(spec["batches"]) // 2
    app.append_all(w, spec["batches"][:half], "p")  # some of it still queued at the fork
    pid = os.fork()
    if pid == 0:
        try:
            w.append([2**62], np.zeros((1, spec["dim"]), np.float32))
            say("E the parent's Writer took an append in a forked child")
            os._exit(3)
        except embstore.ForkedChildError:
            pass
        cw = embstore.Writer(spec["path"], async_queue_mb=spec["child_queue_mb"])
        app.append_all(cw, spec["children"][0], "c0")
        how = spec["fork_exit"]
        if how == "end":
            HELD.append(cw)
            return  # the interpreter ends: the child's exit handlers run, the parent's do nothing
        if how == "gc":
            del w, cw
            HELD.clear()
            gc.collect()
            os._exit(0)
        os._exit(0)  # "os_exit": the child's queued rows may be lost (documented)
    _, status = os.waitpid(pid, 0)
    say(f"X c0 {os.waitstatus_to_exitcode(status)}")
    app.append_all(w, spec["batches"][half:], "p", start=half)
    say("appended")


def child_recorder(spec):
    import torch
    from embstore.torch import EmbeddingRecorder
    model = torch.nn.Sequential(torch.nn.Identity())  # the recorded output is the input itself
    recorder = EmbeddingRecorder(model, "0", spec["path"], dim=spec["dim"], dtype=spec["dtype"],
                                 buffer_rows=spec["buffer_rows"],
                                 async_queue_mb=spec["queue_mb"])
    buf = torch.empty((spec["max_rows"], spec["dim"]))
    for i, (first, rows, epoch, _) in enumerate(spec["batches"]):
        ids = torch.arange(first, first + rows)
        x = buf[:rows]
        x.copy_(torch.from_numpy(payload(np.arange(first, first + rows), spec["dim"])))
        with torch.no_grad(), recorder.batch(ids, epoch):
            model(x)
        say(f"R p {i}")
        x.normal_()  # the caller's tensor is reused at once
    say("appended")
    if spec["exit"] == "end":
        HELD.append(recorder)
        return
    del model, recorder  # the hook held the last reference to the recorder
    gc.collect()
    os._exit(0)


# ---- The checking side ---------------------------------------------------------------------

class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def check_store(path, dim, dtype, writers, exact, prefix_ok=()):
    """`writers`: tag -> returned batches, in append order. Every returned batch of every tag is
    stored once, in order, exactly as passed (values only if `exact`); tags in `prefix_ok` may
    have lost a suffix of whole batches. Nothing else is stored."""
    r = embstore.Reader(path)
    report = r.verify()
    check(report.ok, f"{path}: verify found bad rows {report}")
    keys = r.keys.copy()
    check(len(np.unique(keys)) == len(keys), f"{path}: duplicate keys")
    row_of = {int(k): i for i, k in enumerate(keys)}
    expected_rows = 0
    for tag, batches in writers.items():
        kept = 0
        for first, rows, epoch, _ in batches:
            present = [first + j in row_of for j in range(rows)]
            if not any(present) and tag in prefix_ok:
                break
            check(all(present), f"{path}: writer {tag}: batch at key {first} ({rows} rows) "
                  f"returned but {rows - sum(present)} of its rows are missing")
            kept += 1
        for first, rows, epoch, _ in batches[kept:]:
            check(all(first + j not in row_of for j in range(rows)),
                  f"{path}: writer {tag}: rows after a lost batch are stored (not a prefix)")
        ks = np.concatenate([np.arange(b[0], b[0] + b[1], dtype=np.uint64)
                             for b in batches[:kept]] or [np.empty(0, np.uint64)])
        rows_at = np.array([row_of[int(k)] for k in ks], dtype=np.int64)
        check(np.all(np.diff(rows_at) > 0), f"{path}: writer {tag}: rows out of append order")
        eps = np.concatenate([np.arange(b[1], dtype=np.uint64) % 3 if b[2] < 0
                              else np.full(b[1], b[2], np.uint64) for b in batches[:kept]]
                             or [np.empty(0, np.uint64)])
        check(np.array_equal(r.epochs[rows_at], eps), f"{path}: writer {tag}: wrong epochs")
        if exact and len(ks):
            want = as_stored(payload(ks, dim), dtype)
            got = r.vectors[rows_at]
            bad = np.nonzero(np.any(got.view(np.uint8).reshape(len(ks), -1) !=
                                    want.view(np.uint8).reshape(len(ks), -1), axis=1))[0]
            check(len(bad) == 0, f"{path}: writer {tag}: {len(bad)} rows differ from what was "
                  f"passed (first: key {int(ks[bad[0]]) if len(bad) else 0})")
        expected_rows += len(ks)
    check(len(r) == expected_rows, f"{path}: {len(r)} rows stored, {expected_rows} expected")
    for i in np.random.default_rng(len(r)).integers(0, max(len(r), 1), min(len(r), 16)):
        r.record(int(i))  # the checksum-checked read
    r.close()
    return expected_rows


class StoreLock:
    """Holds the store's writer lock from this process (a POSIX record lock over the whole file
    conflicts with the OFD locks a Writer takes: the writer lock, byte 0, and the key index lock,
    byte 2), so background appends block until it is released."""

    def __init__(self, path):
        self.fd = os.open(os.path.join(path, "lock"), os.O_RDWR)
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def release(self):
        if self.fd >= 0:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def make_batches(rng, first_key, count, max_rows, layouts):
    out = []
    for _ in range(count):
        rows = int(rng.integers(1, max_rows + 1))
        epoch = -1 if rng.random() < 0.2 else int(rng.integers(0, 5))
        out.append([first_key, rows, epoch, str(rng.choice(layouts))])
        first_key += rows
    return out


def run_child(spec, locked=False):
    spec = dict(spec, locked=locked)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lock = None
    if locked:
        check(proc.stdout.readline() == "opened\n", "the child did not open its Writer")
        lock = StoreLock(spec["path"])
        proc.stdin.write("go\n")
        proc.stdin.flush()
        # Every batch is queued behind the lock; the child scribbles over its buffers, then
        # ends with all of them still queued once we let go.
        line = proc.stdout.readline()
        lines = [line]
        while line and line != "appended\n":
            line = proc.stdout.readline()
            lines.append(line)
        lock.release()
        out, err = proc.communicate(timeout=300)
        out = "".join(lines) + out
    else:
        out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def returned(out, tag, batches):
    done = {int(l.split()[2]) for l in out.splitlines() if l.startswith(f"R {tag} ")}
    check(done == set(range(len(done))), f"appends of {tag} returned out of order")
    return batches[:len(done)]


def round_in_process(rng, path, dim, dtype, stats):
    """The caller's buffers reused and changed after each append, in this process."""
    queue_mb = float(rng.choice([0, 0.25, 1, 8]))
    copy = queue_mb == 0 or rng.random() < 0.7
    honest = copy or rng.random() < 0.5
    layouts = ["contig", "rowgap", "every_other", "list", "float16"] + (["torch"] if HAVE_TORCH
                                                                          else [])
    batches = make_batches(rng, 0, int(rng.integers(5, 40)), 400, layouts)
    # With the lock held the background thread cannot copy anything before we scribble.
    hold = queue_mb > 0 and (copy or not honest) and rng.random() < 0.5 and \
        sum(b[1] for b in batches) * dim * 4 * 2 < queue_mb * (1 << 20)
    w = embstore.Writer(path, async_queue_mb=queue_mb)
    lock = StoreLock(path) if hold else None
    app = Appender(dim, dtype, 400, int(rng.integers(1 << 30)))
    try:
        app.append_all(w, batches, "p", copy=copy, honest=honest, report=lambda line: None)
    finally:
        if lock:
            lock.release()
    w.close()
    stats["rows"] += check_store(path, dim, dtype, {"p": batches}, exact=honest)
    return f"in-process queue_mb={queue_mb} copy={copy} honest={honest} locked={hold}"


def round_exit(rng, path, dim, dtype, seed, stats):
    """A child that ends without close()."""
    mode = str(rng.choice(["end", "sys_exit", "exception", "gc", "os_exit", "mp", "fork"]))
    if HAVE_TORCH and rng.random() < 0.15:
        mode = "recorder"
    if FORCE_MODE:
        mode = FORCE_MODE
    queue_mb = float(rng.choice([0, 0.25, 1, 8]))
    layouts = ["contig", "rowgap", "every_other", "list", "float16"]
    spec = dict(path=path, dim=dim, dtype=dtype, queue_mb=queue_mb, max_rows=300, seed=seed,
                copy=True, hold=str(rng.choice(["global", "cycle"])), exit=mode)
    batches = make_batches(rng, 0, int(rng.integers(2, 25)), 300, layouts)
    spec["batches"] = batches
    writers = {}
    prefix_ok = ()
    if mode == "recorder":
        spec.update(recorder=True, exit=str(rng.choice(["end", "gc"])),
                    buffer_rows=int(rng.choice([0, 64, 512])), queue_mb=float(rng.choice([0, 8])))
        for b in batches:
            b[2] = max(b[2], 0)  # the recorder takes one epoch per batch
    if mode == "mp":
        spec["mp_exit"] = str(rng.choice(["return", "gc", "raise", "sys_exit"]))
        spec["queue_mb"] = float(rng.choice([0.25, 1, 8]))
        spec["children"] = [make_batches(rng, 10**6 * (j + 1), int(rng.integers(2, 15)), 300,
                                         layouts) for j in range(int(rng.integers(1, 4)))]
        spec["batches"] = []
    if mode == "fork":
        spec["fork_exit"] = str(rng.choice(["end", "gc", "os_exit"]))
        spec["child_queue_mb"] = float(rng.choice([0, 1, 8]))
        spec["children"] = [make_batches(rng, 10**6, int(rng.integers(2, 15)), 300, layouts)]
        if spec["fork_exit"] == "os_exit" and spec["child_queue_mb"] > 0:
            prefix_ok = ("c0",)
    if mode == "os_exit" and queue_mb > 0:
        prefix_ok = ("p",)
    # Holding the lock keeps every batch queued until the exit path runs (all must fit).
    locked = (mode in ("end", "sys_exit", "exception", "gc", "os_exit") and queue_mb > 0 and
              sum(b[1] for b in batches) * dim * 4 * 2 < queue_mb * (1 << 20) and
              rng.random() < 0.6)
    code, out, err = run_child(spec, locked)
    check("Fatal Python error" not in err and "Segmentation" not in err, f"child crashed: {err}")
    want_code = 1 if mode == "exception" else 0
    check(code == want_code, f"{mode}: child exited {code}, expected {want_code}: {err[-2000:]}")
    check(not any(l.startswith("E ") for l in out.splitlines()), out)
    if mode == "mp":
        for j, kids in enumerate(spec["children"]):
            want = 1 if spec["mp_exit"] == "raise" else 0
            check(f"X c{j} {want}" in out, f"mp child {j}: {out} {err[-2000:]}")
            writers[f"c{j}"] = returned(out, f"c{j}", kids)
            check(len(writers[f"c{j}"]) == len(kids), f"mp child {j} did not append everything")
    else:
        writers["p"] = returned(out, "p", batches)
        check(len(writers["p"]) == len(batches) and "appended" in out, f"{mode}: {out} {err}")
    if mode == "fork":
        check("X c0 0" in out, f"forked child: {out} {err[-2000:]}")
        writers["c0"] = returned(out, "c0", spec["children"][0])
    stats["rows"] += check_store(path, dim, dtype, writers, exact=True, prefix_ok=prefix_ok)
    detail = spec.get("mp_exit") or spec.get("fork_exit") or ("recorder" if mode == "recorder"
                                                               else "")
    return f"exit mode={spec['exit']} {detail} queue_mb={spec['queue_mb']} locked={locked}"


def round_loss(rng, path, dim, seed, stats):
    """A flush at exit that fails (a batch beyond map_bytes): loud, and nothing else lost."""
    mode = str(rng.choice(["end", "gc", "exception"]))
    small = make_batches(rng, 0, int(rng.integers(1, 4)), 60, ["contig"])
    first = small[-1][0] + small[-1][1]
    big = [first, 3000, 0, "contig"]  # beyond the whole reservation: its append fails
    after = make_batches(rng, first + 3000, int(rng.integers(0, 3)), 20, ["contig"])
    batches = small + [big] + after
    spec = dict(path=path, dim=dim, dtype="float32", queue_mb=64, max_rows=3000, seed=seed,
                copy=True, hold="global", exit=mode, map_bytes=1 << 20, batches=batches)
    code, out, err = run_child(spec, locked=True)
    got = returned(out, "p", batches)
    check(len(got) >= len(small) + 1, f"loss: the big batch's append did not return: {err}")
    stored = check_store(path, dim, "float32", {"p": got}, exact=True, prefix_ok=("p",))
    lost = sum(b[1] for b in got) - stored
    check(stored == sum(b[1] for b in small), f"loss: {stored} rows stored, expected the "
          f"{sum(b[1] for b in small)} rows before the failed batch")
    # Every append returned before the failure (the lock held the background thread), so the
    # exit path is the only one that can tell: it must name the store and the rows.
    loud = path in err and f"{lost} appended rows were not written" in err
    check(loud, f"loss: {lost} returned rows were not written, and nothing said so "
          f"(exit {code}): {err[-2000:]}")
    stats["rows"] += stored
    stats["lost_loudly"] += lost
    return f"loss mode={mode} lost={lost}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--child")
    ap.add_argument("--exit-mode", help="only exit rounds, all of this mode (mp, fork, ...)")
    args = ap.parse_args()
    faulthandler.enable()
    if args.child:
        child_main(json.loads(args.child))
        return
    rng = np.random.default_rng(args.seed)
    base = tempfile.mkdtemp(prefix="embstore-pyuse-", dir=os.environ.get("TMPDIR"))
    stats = {"rows": 0, "lost_loudly": 0}
    try:
        for round_ in range(args.rounds):
            path = os.path.join(base, f"store{round_}")
            kind = rng.random()
            if args.exit_mode:
                global FORCE_MODE
                FORCE_MODE, kind = args.exit_mode, 0.5
            dim = int(rng.choice([1, 8, 64, 300]))
            dtype = str(rng.choice(["float32", "float16", "bfloat16"]))
            try:
                if kind < 0.3:
                    embstore.create(path, dim=dim, dtype=dtype, segment_mb=1 / 16)
                    what = round_in_process(rng, path, dim, dtype, stats)
                elif kind < 0.85:
                    embstore.create(path, dim=dim, dtype=dtype, segment_mb=1 / 16)
                    what = round_exit(rng, path, dim, dtype, int(rng.integers(1 << 30)), stats)
                else:
                    dim = 256
                    embstore.create(path, dim=dim, segment_mb=1 / 4)
                    what = round_loss(rng, path, dim, int(rng.integers(1 << 30)), stats)
            except Failure as failure:
                print(f"FAIL round {round_} (seed {args.seed}, dim {dim}, {dtype}): {failure}",
                      file=sys.stderr)
                sys.exit(1)
            print(f"round {round_}: {what}: ok", flush=True)
            shutil.rmtree(path, ignore_errors=True)
        print(f"python ordinary use: {args.rounds} rounds, {stats['rows']} rows checked "
              f"byte for byte, {stats['lost_loudly']} rows lost and reported")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
