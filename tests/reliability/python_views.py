"""Scenario 14: numpy views held while the store grows by many segments (from another process
and from this one) and the Reader that gave them out is closed and garbage-collected. Every
view must keep its values (or raise a clear error), never segfault.

Run by `embstore_torture scenario 14` with PYTHONPATH at the built package:
    python3 python_views.py --seed N
Exit 0 when everything held; faulthandler prints a traceback on a crash.
"""
import argparse
import faulthandler
import gc
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import embstore

DIM = 64


def payload(keys):
    keys = np.asarray(keys, dtype=np.uint64)
    return ((keys[:, None] * np.uint64(7919) + np.arange(DIM, dtype=np.uint64)) %
            np.uint64(10007)).astype(np.float32)


GROW = """
import sys, numpy as np, embstore
sys.path.insert(0, {here!r})
from python_views import payload
w = embstore.Writer({path!r})
start = w.committed_rows()
for b in range({batches}):
    keys = np.arange(10**6 + start + b * 200, 10**6 + start + (b + 1) * 200, dtype=np.uint64)
    w.append(keys, payload(keys), epoch=2)
w.close()
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    faulthandler.enable()
    rng = np.random.default_rng(args.seed)
    here = os.path.dirname(os.path.abspath(__file__))
    base = tempfile.mkdtemp(prefix="embstore-pyviews-", dir=os.environ.get("TMPDIR"))
    try:
        for round_ in range(args.rounds):
            path = os.path.join(base, f"store{round_}")
            embstore.create(path, dim=DIM, segment_mb=1 / 16)  # 64 KiB: 256 rows per segment
            keys = np.arange(int(rng.integers(1, 300)), dtype=np.uint64)
            with embstore.Writer(path) as w:
                w.append(keys, payload(keys), epoch=1)
            r = embstore.Reader(path)
            n = len(r)
            lo = int(rng.integers(0, n))
            views = [r.vectors, r.rows(lo, n), r.vectors[::3], r.vectors.T, r.keys, r.epochs]
            expect = [v.copy() for v in views]
            # Grow by many segments from another process, then from this one.
            code = GROW.format(here=here, path=path, batches=int(rng.integers(20, 60)))
            subprocess.run([sys.executable, "-c", code], check=True)
            with embstore.Writer(path) as w:
                more = np.arange(5 * 10**6, 5 * 10**6 + 3000, dtype=np.uint64)
                w.append(more, payload(more), epoch=3)
            assert r.refresh() > n, "the reader does not see the store grow"
            grown = r.vectors
            r.close()
            try:
                r.vectors
                raise AssertionError("a closed Reader handed out a view")
            except (embstore.ClosedError, BufferError):
                pass
            del r
            gc.collect()
            for v, e in zip(views, expect):
                np.testing.assert_array_equal(v, e)
            np.testing.assert_array_equal(views[0], payload(keys))
            assert grown.shape[0] > n + 3000 - 1
            np.testing.assert_array_equal(grown[n:n + 200], payload(np.arange(10**6 + n, 10**6 + n + 200)))
            del views, expect
            gc.collect()
            np.testing.assert_array_equal(grown[-3000:], payload(more))
            del grown
            gc.collect()
            r2 = embstore.Reader(path)
            assert r2.verify().ok
            r2.close()
        print(f"python views: {args.rounds} rounds, views held across growth and reader close")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
