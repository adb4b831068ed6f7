"""Turns compare_native / compare_py.py JSON lines into the markdown comparison table (medians
over repeats) with the machine it ran on. Used by run.sh."""
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--command", default="")
    args = ap.parse_args()
    by_system = collections.defaultdict(list)
    with open(args.results) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                by_system[r["system"]].append(r)
    first = next(iter(by_system.values()))[0]
    repeats = max(len(v) for v in by_system.values())
    print(f"Workload: {first['rows']:,} rows x {first['dim']} float32, batches of {first['batch']},"
          f" random u64 keys, epoch 0. Medians of {repeats} run(s).  ")
    print(f"Machine: {machine()}.  ")
    if args.command:
        print(f"Command: `{args.command}`")
    print()
    print("| approach | append MB/s | 2 writer processes MB/s | sync s | lookup p50 us | "
          "lookup p99 us | scan MB/s | open ms | bytes on disk (x payload) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ORDER + sorted(set(by_system) - set(ORDER)):
        runs = by_system.get(name)
        if not runs:
            continue
        col = lambda key: median([r[key] for r in runs if r.get(key) is not None])  # noqa: E731
        note = runs[0].get("lookup_note") or ""
        p50 = col("lookup_p50_us")
        lookup50 = fmt(p50, 1) + (f" ({note})" if note and p50 is not None else "")
        disk = col("bytes_on_disk")
        payload = runs[0]["payload_bytes"]
        disk_text = (f"{disk / 1e6:,.0f} MB ({disk / payload:.3f}x)"
                     if isinstance(disk, (int, float)) and disk > 0 else "-")
        print(f"| {LABELS.get(name, name)} | {fmt(col('append_mb_s'))} | "
              f"{fmt(col('two_writer_mb_s'))} | {fmt(col('sync_s'), 3)} | {lookup50} | "
              f"{fmt(col('lookup_p99_us'), 1)} | {fmt(col('scan_mb_s'))} | "
              f"{fmt(col('open_ms'), 2)} | {disk_text} |")


if __name__ == "__main__":
    main()
