"""Turns compare_native / compare_py.py JSON lines into the markdown comparison table (min /
median / max over the rounds, the ratio to the same round's pwrite(), and every round listed with
what ran before it) with the machine and the date it ran on. Used by run.sh."""
import argparse
import collections
import json
import os
import platform
import statistics
import subprocess

ORDER = ["memcpy", "pwrite", "embstore", "embstore-py", "numpy", "hdf5", "h5py", "lmdb-sync",
         "lmdb-nosync", "sqlite-wal", "redis"]
LABELS = {
    "memcpy": "memcpy into memory (ceiling)",
    "pwrite": "pwrite() into the page cache",
    "embstore": "**embstore** (C++)",
    "embstore-py": "**embstore** (Python binding)",
    "numpy": "numpy open_memmap",
    "hdf5": "HDF5 chunked extendable dataset (C)",
    "h5py": "h5py resizable dataset",
    "lmdb-sync": "LMDB put per row, txn per batch (sync)",
    "lmdb-nosync": "LMDB put per row, txn per batch (MDB_NOSYNC)",
    "sqlite-wal": "SQLite BLOB rows, WAL, txn per batch",
    "redis": "Redis SET per row, pipelined per batch (hiredis)",
}


def median(values):
    nums = [v for v in values if isinstance(v, (int, float))]
    if nums:
        return statistics.median(nums)
    return values[0] if values else None


def fmt(value, digits=0):
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def machine():
    cpu = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((l.split(":", 1)[1].strip() for l in out.splitlines()
                    if l.startswith("Model name")), "")
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    fs = subprocess.run(["df", "-T", os.environ.get("TMPDIR", "/tmp")], capture_output=True,
                        text=True).stdout.splitlines()[-1].split()[1]
    return (f"{os.cpu_count()} cores ({cpu or platform.processor()}), {mem_gb:.0f} GiB RAM, "
            f"Linux {platform.release()}, {fs} under $TMPDIR")


def spread(values, digits=0):
    """min / median / max of the numbers in `values`, or the one value, or ""."""
    nums = [v for v in values if isinstance(v, (int, float))]
    if not nums:
        return fmt(values[0], digits) if values else ""
    if len(nums) == 1:
        return fmt(nums[0], digits)
    return " / ".join(fmt(v, digits) for v in (min(nums), statistics.median(nums), max(nums)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--command", default="")
    args = ap.parse_args()
    by_system = collections.defaultdict(list)
    rows = []
    with open(args.results) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                by_system[r["system"]].append(r)
                rows.append(r)
    first = rows[0]
    rounds = sorted({r.get("round", 0) for r in rows})
    dates = sorted(r["date"] for r in rows if r.get("date"))
    loads = [r["load1"] for r in rows if isinstance(r.get("load1"), (int, float))]
    # The same round's pwrite() run is each system's baseline: a ratio, not two figures from
    # different minutes.
    pwrite_by_round = {r.get("round", 0): r["append_mb_s"] for r in by_system.get("pwrite", [])
                       if isinstance(r.get("append_mb_s"), (int, float))}
    print(f"Workload: {first['rows']:,} rows x {first['dim']} float32, batches of {first['batch']},"
          f" random u64 keys, epoch 0. {len(rounds)} round(s), each system once per round in a"
          f" random order; cells are min / median / max over the rounds.  ")
    if dates:
        print(f"Date: {dates[0]} to {dates[-1]} (UTC); load average (1 min) at each start"
              f" {min(loads):.1f}-{max(loads):.1f}.  " if loads else f"Date: {dates[0]}.  ")
    print(f"Machine: {machine()}.  ")
    if args.command:
        print(f"Command: `{args.command}`")
    print()
    print("| approach | append MB/s | x pwrite() same round | 2 writer processes MB/s | sync s |"
          " lookup p50 us | lookup p99 us | scan MB/s | open ms | bytes on disk (x payload) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ORDER + sorted(set(by_system) - set(ORDER)):
        runs = by_system.get(name)
        if not runs:
            continue
        vals = lambda key: [r[key] for r in runs if r.get(key) is not None]  # noqa: E731
        col = lambda key: median(vals(key))  # noqa: E731
        ratios = [r["append_mb_s"] / pwrite_by_round[r.get("round", 0)] for r in runs
                  if isinstance(r.get("append_mb_s"), (int, float))
                  and pwrite_by_round.get(r.get("round", 0))]
        note = runs[0].get("lookup_note") or ""
        p50 = col("lookup_p50_us")
        lookup50 = fmt(p50, 1) + (f" ({note})" if note and p50 is not None else "")
        disk = col("bytes_on_disk")
        payload = runs[0]["payload_bytes"]
        disk_text = (f"{disk / 1e6:,.0f} MB ({disk / payload:.3f}x)"
                     if isinstance(disk, (int, float)) and disk > 0 else "-")
        print(f"| {LABELS.get(name, name)} | {spread(vals('append_mb_s'))} | "
              f"{spread(ratios, 2)} | {spread(vals('two_writer_mb_s'))} | "
              f"{fmt(col('sync_s'), 3)} | {lookup50} | "
              f"{fmt(col('lookup_p99_us'), 1)} | {spread(vals('scan_mb_s'))} | "
              f"{fmt(col('open_ms'), 2)} | {disk_text} |")
    # Every round, misses included: what ran before each system and what its append phase paid.
    print()
    print("Every round (append MB/s; after = the system run just before it; settle = seconds"
          " waited for writeback and the host's page reporting to go quiet; touch = ns per 4 KiB"
          " page of the warm-up touch; host MiB = guest memory reported to the host during the"
          " append phase):")
    print()
    print("| round | # | system | after | load | settle s | touch ns/page | host MiB |"
          " dirty MB at start | append MB/s | x pwrite() |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r.get("round", 0), r.get("position", 0))):
        mm = r.get("append_mm") or {}
        base = pwrite_by_round.get(r.get("round", 0))
        mb = r.get("append_mb_s")
        ratio = (f"{mb / base:.2f}" if base and isinstance(mb, (int, float)) else "")
        dirty = mm.get("nr_dirty_at_start")
        print(f"| {r.get('round', '')} | {r.get('position', '')} | {r['system']} |"
              f" {r.get('after', '')} | {fmt(r.get('load1'), 1)} | {fmt(r.get('settle_s'))} |"
              f" {fmt(r.get('warm_touch_ns_per_page'))} |"
              f" {fmt(mm['host_reported_kib'] / 1024) if 'host_reported_kib' in mm else ''} |"
              f" {fmt(dirty * 4096 / 1e6) if dirty is not None else ''} | {fmt(mb)} | {ratio} |")


if __name__ == "__main__":
    main()
