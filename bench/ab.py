"""Before/after: the same-run ratios of several builds, interleaved round by round.

    /usr/bin/python3 bench/ab.py [LABEL=]BUILD_DIR [LABEL=]BUILD_DIR ... [--rounds 5]
                                 [--min-time 0.5]

Each round runs append_bench and read_bench of every build (in random order) on the cases
bench/RESULTS.md states targets for, and computes in every run the ratio of embstore to its
baseline measured in that same run (append / pwrite into a preallocated file, scan of a view /
scan of private memory; bytes per second). Prints, per build and ratio, min / median / max over
the rounds and every round's value (misses kept), with the load average before each round. A
change that costs nothing keeps the after ratios within the spread of the before ones.
"""
import argparse
import json
import os
import random
import statistics
import subprocess

# (label, binary, embstore run, baseline run): run names as Google Benchmark prints them.
PAIRS = [
    ("append 512x768 f32 / pwrite prealloc", "append_bench",
     "BM_Append/batch:512/dim:768/dtype:0/sync:0", "BM_Pwrite/batch:512/dim:768/sync:0/prealloc:1"),
    ("append 512x64 f32 / pwrite", "append_bench",
     "BM_Append/batch:512/dim:64/dtype:0/sync:0", "BM_Pwrite/batch:512/dim:64/sync:0/prealloc:0"),
    ("scan of a warm view / memory", "read_bench", "BM_ScanView", "BM_ScanMemory"),
]


def run_binary(build, binary, names, min_time):
    pattern = "^(" + "|".join(names) + ")(/real_time)?$"
    out = subprocess.run(
        [os.path.join(build, "bin", binary), f"--benchmark_filter={pattern}",
         f"--benchmark_min_time={min_time}", "--benchmark_repetitions=1",
         "--benchmark_format=json"],
        check=True, capture_output=True, text=True).stdout
    rates = {}
    for b in json.loads(out)["benchmarks"]:
        name = b["name"].removesuffix("/real_time")
        rates[name] = b.get("bytes_per_second") or b.get("items_per_second")
    return rates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("builds", nargs="+", help="[LABEL=]BUILD_DIR, two or more")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", default="0.5")
    args = ap.parse_args()
    builds = dict(b.split("=", 1) if "=" in b else (os.path.basename(b.rstrip("/")), b)
                  for b in args.builds)
    ratios = {(label, which): [] for label, *_ in PAIRS for which in builds}
    for round_number in range(args.rounds):
        with open("/proc/loadavg") as f:
            print(f"round {round_number + 1}: load average {' '.join(f.read().split()[:3])}",
                  flush=True)
        jobs = [(which, binary) for which in builds for binary in ("append_bench", "read_bench")]
        random.shuffle(jobs)
        for which, binary in jobs:
            names = [n for _, b, a, base in PAIRS if b == binary for n in (a, base)]
            rates = run_binary(builds[which], binary, names, args.min_time)
            for label, b, a, base in PAIRS:
                if b == binary and rates.get(a) and rates.get(base):
                    ratios[(label, which)].append(rates[a] / rates[base])
    for label, *_ in PAIRS:
        for which in builds:
            values = ratios[(label, which)]
            if not values:
                print(f"{label:40s} {which:8s}: no runs")
                continue
            print(f"{label:40s} {which:8s}: min {min(values):.3f} median "
                  f"{statistics.median(values):.3f} max {max(values):.3f}  rounds "
                  + " ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
