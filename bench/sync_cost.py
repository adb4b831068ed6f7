"""The cost of the default sync policy (a background sync every 5 s and a sync at close) on
append throughput and latency: `embstore bench` with --sync interval against --sync none, the
same workload, the two policies (and each writer count) in a fresh random order every round.

Usage: /usr/bin/python3 bench/sync_cost.py [--bin build/bin/embstore] [--rounds 5]
           [--seconds 6] [--writers 1,2] [--dir DIR]

Each run appends batches of 512 x 768 float32 for --seconds, then closes its Writer; the time
includes the close (with --sync interval, close() syncs: that is part of the policy's cost).
Prints one line per run, then per writer count the same-round ratios interval / none of MB/s
(min / median / max) and the p50 / p99 append latencies of each policy (medians over rounds).
"""
import argparse
import json
import random
import statistics
import subprocess
import sys


def run(binary, policy, writers, seconds, directory):
    cmd = [binary, "bench", "--json", "--quiet", "--no-baselines", "--repeat", "1",
           "--writers", str(writers), "--seconds", str(seconds), "--sync", policy]
    if directory:
        cmd += ["--dir", directory]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)["runs"][0]["embstore"]
    return {"mb_s": result["mb_per_s"], "p50": result["latency_us"]["p50"],
            "p99": result["latency_us"]["p99"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="build/bin/embstore")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--writers", default="1,2")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    writer_counts = [int(w) for w in args.writers.split(",")]
    results = {}  # (writers, policy) -> [per-round result]
    rng = random.Random()
    for r in range(args.rounds):
        order = [(w, p) for w in writer_counts for p in ("none", "interval")]
        rng.shuffle(order)
        for writers, policy in order:
            res = run(args.bin, policy, writers, args.seconds, args.dir)
            results.setdefault((writers, policy), []).append(res)
            print(f"round {r + 1} writers {writers} sync {policy:8s} {res['mb_s']:9.1f} MB/s "
                  f"p50 {res['p50']:8.1f} us p99 {res['p99']:9.1f} us", flush=True)
    print()
    for writers in writer_counts:
        none, interval = results[(writers, "none")], results[(writers, "interval")]
        ratios = sorted(i["mb_s"] / n["mb_s"] for i, n in zip(interval, none))
        print(f"writers {writers}: interval/none MB/s per round min {ratios[0]:.2f} median "
              f"{statistics.median(ratios):.2f} max {ratios[-1]:.2f} "
              f"(all: {' '.join(f'{x:.2f}' for x in ratios)})")
        for name, runs in (("none", none), ("interval", interval)):
            print(f"  {name:8s} MB/s median {statistics.median(x['mb_s'] for x in runs):9.1f}  "
                  f"p50 {statistics.median(x['p50'] for x in runs):8.1f} us  "
                  f"p99 {statistics.median(x['p99'] for x in runs):9.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
