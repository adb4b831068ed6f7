"""Same-repetition ratios from a Google Benchmark JSON report (append_bench, read_bench).

    build/bin/append_bench --benchmark_filter=... --benchmark_format=json > out.json
    /usr/bin/python3 bench/ratios.py out.json [--pair 'A=B' ...]

For each pair, repetition k of A is divided by repetition k of B (bytes_per_second, else
items_per_second); prints min / median / max of the ratio and every repetition (misses kept),
with the load average now; --times REGEX adds min / median / max time per iteration of the
matching runs. Without --pair it uses the pairs bench/RESULTS.md states targets for.
The suites run 5 repetitions in random interleaved order by default (bench/bench_util.h).
"""
import argparse
import collections
import json
import os
import re
import statistics

DEFAULT_PAIRS = [
    ("BM_Append/batch:512/dim:768/dtype:0/sync:0", "BM_Pwrite/batch:512/dim:768/sync:0/prealloc:0"),
    ("BM_Append/batch:512/dim:768/dtype:0/sync:0", "BM_Pwrite/batch:512/dim:768/sync:0/prealloc:1"),
    ("BM_Append/batch:512/dim:64/dtype:0/sync:0", "BM_Pwrite/batch:512/dim:64/sync:0/prealloc:0"),
    ("BM_Append/batch:512/dim:768/dtype:0/sync:1", "BM_Pwrite/batch:512/dim:768/sync:1/prealloc:0"),
    ("BM_ScanViewCold/populate:0", "BM_ScanMemory"),
    ("BM_ScanViewCold/populate:1", "BM_ScanMemory"),
    ("BM_ScanView", "BM_ScanMemory"),
]


def rate(run, cpu=False):
    wall = run.get("bytes_per_second") or run.get("items_per_second")
    # Per CPU second of the benchmark's thread: the same work over cpu_time instead of real_time.
    return wall * run["real_time"] / run["cpu_time"] if cpu and run.get("cpu_time") else wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--pair", action="append", default=[],
                    help="NAME_A=NAME_B (run names without /repeats, /real_time and /manual_time"
                    " suffixes)")
    ap.add_argument("--cpu", action="store_true",
                    help="ratios of work per CPU second of the benchmark thread (kernel time"
                    " included), which a busy machine disturbs less than wall time")
    ap.add_argument("--times", default="",
                    help="also print min / median / max time per iteration of runs matching this regex")
    args = ap.parse_args()
    with open(args.report) as f:
        report = json.load(f)
    runs = collections.defaultdict(dict)
    times = collections.defaultdict(list)
    for b in report["benchmarks"]:
        if b.get("run_type") != "iteration" or b.get("error_occurred"):
            continue
        # A manual-time run reports the time it measured as its real_time.
        name = b["run_name"].replace("/real_time", "").replace("/manual_time", "")
        runs[name][b.get("repetition_index", 0)] = rate(b, args.cpu)
        times[name].append((b["real_time"], b.get("time_unit", "ns")))
    pairs = [tuple(p.split("=", 1)) for p in args.pair] or DEFAULT_PAIRS
    print(("per CPU second; " if args.cpu else "") + "load average now: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    for name, t in sorted(times.items()):
        if args.times and re.search(args.times, name):
            v = sorted(x for x, _ in t)
            print(f"{name}: {t[0][1]} per iteration min {v[0]:.2f} median "
                  f"{statistics.median(v):.2f} max {v[-1]:.2f} over {len(v)} repetitions")
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        ratios = [runs[a][k] / runs[b][k] for k in sorted(runs[a]) if runs[b].get(k)]
        if not ratios:
            continue
        print(f"{a} / {b}: min {min(ratios):.2f} median {statistics.median(ratios):.2f} "
              f"max {max(ratios):.2f} over {len(ratios)} repetitions "
              f"(all: {' '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
