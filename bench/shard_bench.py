#!/usr/bin/python3
"""Several stores as one: ShardSet lookups across 4 shards vs the same rows in one store, and a
dask.distributed scan of the shards vs one Reader scanning the merged store.

    PYTHONPATH=build/python bench/shard_bench.py [--rows 400000] [--dim 256] [--repeat 3]

Both sides get the same keys (random u64 keys, rows spread round-robin over the shards, 4
epochs). Lookups: the first find after open (builds the per-shard key tables while Reader has no
key index) and warm find / find_many of 4,096 ids. Scan: sum of every vector (float32, warm
page cache) on a LocalCluster of 2 worker processes (1 thread each) vs numpy over one Reader's
zero-copy view in this process, min / median / max over the runs. Prints a Markdown table.
"""
import argparse
import os
import tempfile
import time

import numpy as np

import embstore
import embstore.dask
from embstore import shards as es


def build(root, rows, dim, shards):
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, rows // 4, dtype=np.uint64)
    writers = [embstore.Writer(os.path.join(root, f"node-{i}"), dim=dim) for i in range(shards)]
    batch = 4096
    for epoch in range(4):
        for b in range(0, len(keys), batch):
            k = keys[b:b + batch]
            v = rng.standard_normal((len(k), dim), dtype=np.float32)
            writers[(b // batch) % shards].append(k, v, epoch)
    entries = []
    for i, w in enumerate(writers):
        info = w.info()
        w.close()
        entries.append({"path": f"node-{i}", "store_id": info["store_id"],
                        "rows": info["committed_rows"], "epochs": [0, 1, 2, 3]})
    es.write_manifest(os.path.join(root, es.MANIFEST_NAME),
                      {"dim": dim, "dtype": "float32", "metadata": "", "shards": entries})
    embstore.merge(os.path.join(root, "merged"), root)
    return keys


def lookups(path, keys, repeat):
    start = time.perf_counter()
    s = embstore.ShardSet(path)
    s.find(int(keys[0]), 0)
    first = time.perf_counter() - start
    rng = np.random.default_rng(1)
    probe = keys[rng.integers(0, len(keys), 2000)]
    lat = []
    for _ in range(repeat):
        for k in probe:
            t = time.perf_counter()
            s.find(int(k), 2)
            lat.append(time.perf_counter() - t)
    batch = keys[rng.integers(0, len(keys), 4096)]
    best = min(_timed(lambda: s.find_many(batch, 2)) for _ in range(repeat * 5))
    assert (s.find_many(batch, 2) >= 0).all()
    return first, np.percentile(lat, 50), np.percentile(lat, 99), 4096 / best


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as root:
        keys = build(root, args.rows, args.dim, 4)
        mb = args.rows * args.dim * 4 / 1e6
        print(f"{args.rows} rows x {args.dim} float32 ({mb:.0f} MB), 4 shards; "
              f"medians/bests of {args.repeat}\n")
        print("| what | first find after open ms | find p50 us | find p99 us "
              "| find_many 4096 ids lookups/s |")
        print("|---|---:|---:|---:|---:|")
        for label, path in (("ShardSet, 4 shards", root),
                            ("ShardSet, 1 store (merged)", os.path.join(root, "merged"))):
            first, p50, p99, rate = lookups(path, keys, args.repeat)
            print(f"| {label} | {first * 1e3:.1f} | {p50 * 1e6:.1f} | {p99 * 1e6:.1f} "
                  f"| {rate:,.0f} |")

        import distributed
        reader = embstore.Reader(os.path.join(root, "merged"))
        want = reader.vectors.sum(axis=0, dtype=np.float64)
        one = [_timed(lambda: reader.vectors.sum(axis=0, dtype=np.float64))
               for _ in range(args.repeat)]
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None, host="127.0.0.1") as cluster, \
                distributed.Client(cluster):
            def scan_once(run):
                # A new graph per run (chunking shifted by a row or so): the scheduler would
                # hand back results it still holds for keys it has seen.
                arrays = embstore.dask.from_store(root, chunk_mb=32 - run * 1e-3)
                got = arrays.vectors.sum(axis=0, dtype=np.float64).compute()
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

            scan_once(0)  # warms the workers (imports) and checks the result
            scans = [_timed(lambda: scan_once(run)) for run in range(1, args.repeat + 1)]

        def spread(seconds):
            rates = sorted(mb / t for t in seconds)
            return f"{rates[0]:,.0f} / {rates[len(rates) // 2]:,.0f} / {rates[-1]:,.0f}"

        print(f"\n| scan (sum of every vector, warm page cache), {args.repeat} runs each "
              "| MB/s min / median / max |")
        print("|---|---|")
        print(f"| one Reader, numpy over the zero-copy view (1 thread) | {spread(one)} |")
        print(f"| embstore.dask over 4 shards, LocalCluster 2 processes x 1 thread "
              f"| {spread(scans)} |")

if __name__ == "__main__":
    main()
