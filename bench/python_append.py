"""Python's synchronous Writer.append against the C++ library's append, same workload, same run.

Usage: PYTHONPATH=build/python /usr/bin/python3 bench/python_append.py [--bin build/bin/embstore]
           [--rounds 5] [--rows 400000] [--dir DIR]

The C++ figure is `embstore bench --writers 1 --no-baselines --repeat 1` (one writer process
appending 512 x 768 float32 batches, row i of a batch keyed t + i with t the append's
CLOCK_MONOTONIC time in ns, epoch 0, sync none, key index on). The Python figure is the same
loop written as a user would in Python (this script with --child): the keys made with numpy,
then `Writer.append(keys, batch, 0)` of one reused float32 array, timed over the same span
(open excluded, close included). Both start from page cache freed a moment ago (a file of the
payload written first and removed as the run starts, after a free page reporting pass where
the kernel makes them: `embstore bench --page-state warm`). Each round runs both in a fresh random order, each into a
fresh store; a round's ratio is Python MB/s / C++ MB/s (target: >= 0.95, issue "Append at the
speed of the page cache"). Prints one line per run, then the ratio's min / median / max and
the p50 latencies of both (medians over rounds).

The rows come from an array as numpy allocates it and from a page-aligned one (see
make_batch: where the rows start decides how fast the kernel copies them). The child also reports the share of its timed spans (making the keys with numpy, then the
append call) spent inside the C++ append (its stats()["append_seconds"]): what Python adds,
free of the run-to-run noise between processes.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_batch(source, batch_rows, dim):
    """The rows to append: "numpy" is an array as numpy allocates it (a large one starts 16
    bytes into a page: glibc's mmap'd chunk header); "page-aligned" starts on a page, as an
    mmap'd buffer and the C++ benchmark's batch do. (torch's large tensors start 64-byte
    aligned, e.g. 1,344 bytes into a page: as fast a source as a page-aligned one.)"""
    values = np.random.default_rng(0).standard_normal((batch_rows, dim)).astype(np.float32)
    if source == "numpy":
        return values
    import mmap
    memory = mmap.mmap(-1, values.nbytes)
    batch = np.frombuffer(memory, np.float32).reshape(batch_rows, dim)
    batch[:] = values
    return batch


def warm_page_cache(directory, nbytes):
    """As `embstore bench` does before its phase (--page-state warm): writes a file of the
    payload, which release_warm_file() removes as the run starts, so this run's page cache comes
    from pages freed a moment ago, not from memory the VM host took back (bench/RESULTS.md,
    "Same state before every phase"). Returns its path."""
    path = os.path.join(directory, "page-cache-warm-up")
    chunk = bytes(8 << 20)
    with open(path, "wb") as f:
        for _ in range(0, nbytes, len(chunk)):
            f.write(chunk)
    return path


def page_reporting(parameter):
    """A parameter of the kernel's free page reporting, or None where it has none."""
    try:
        with open(f"/sys/module/page_reporting/parameters/{parameter}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def release_warm_file(path, nbytes):
    """Removes the warm-up file, as `embstore bench` does: where the kernel reports free pages to
    the VM host and the payload is as large as the free memory that starts a pass
    (max_waiting_mib), after the next reporting pass (at most 4 s), so that the next pass comes
    ~2 s later, after the run (bench/RESULTS.md, "Phases that met a reporting pass")."""
    threshold = page_reporting("max_waiting_mib")
    before = page_reporting("passes")
    if threshold is not None and before is not None and nbytes >= threshold << 20:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and page_reporting("passes") == before:
            time.sleep(0.002)
    os.unlink(path)


def child(rows, directory, source, batch_rows=512, dim=768):
    import embstore
    path = os.path.join(directory, "python_append.emb")
    batch = make_batch(source, batch_rows, dim)
    warm = warm_page_cache(directory, rows * dim * 4)
    base = np.arange(batch_rows, dtype=np.uint64)
    keys = np.empty_like(base)
    latencies = []
    w = embstore.Writer(path, dim=dim, sync="none")
    release_warm_file(warm, rows * dim * 4)
    start = time.monotonic_ns()
    done = 0
    in_calls = 0.0
    while done < rows:
        t0 = time.monotonic_ns()
        np.add(base, t0, out=keys)  # in the timed span, as embstore bench makes its keys in it
        w.append(keys, batch, 0)
        t1 = time.monotonic_ns()
        latencies.append(t1 - t0)
        in_calls += (t1 - t0) / 1e9
        done += batch_rows
    in_cpp = w.stats()["append_seconds"]
    w.close()
    seconds = (time.monotonic_ns() - start) / 1e9
    print(json.dumps({"mb_per_s": done * dim * 4 / 1e6 / seconds, "page_offset": batch.ctypes.data % 4096,
                      "p50_us": statistics.median(latencies) / 1e3,
                      "in_cpp_share": in_cpp / in_calls}))


def run_cpp(binary, rows, directory):
    out = subprocess.run([binary, "bench", "--json", "--quiet", "--no-baselines", "--repeat", "1",
                          "--writers", "1", "--rows", str(rows), "--dir", directory],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out)["runs"][0]["embstore"]
    return {"mb_per_s": result["mb_per_s"], "p50_us": result["latency_us"]["p50"]}


def run_python(rows, directory, source):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--rows", str(rows),
                          "--dir", directory, "--source", source], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="build/bin/embstore")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=400000)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--source", default="numpy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.rows, args.dir, args.source)
        return
    sources = ["page-aligned", "numpy"]
    names = ["C++"] + [f"Python, {source} rows" for source in sources]
    results = {name: [] for name in names}
    for r in range(args.rounds):
        order = list(names)
        random.shuffle(order)
        for name in order:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                result = (run_cpp(args.bin, args.rows, tmp) if name == "C++"
                          else run_python(args.rows, tmp, name.split(", ")[1].split()[0]))
            results[name].append(result)
            extra = (f", rows at page offset {result['page_offset']}, "
                     f"{100 * result['in_cpp_share']:.1f}% of the call inside C++"
                     if "in_cpp_share" in result else "")
            print(f"round {r + 1} {name}: {result['mb_per_s']:,.0f} MB/s, "
                  f"append p50 {result['p50_us']:.1f} us{extra}", flush=True)
    cpp = results["C++"]
    print(f"append p50, median over rounds: C++ {statistics.median(c['p50_us'] for c in cpp):.1f} us")
    for name in names[1:]:
        py = results[name]
        ratios = [p["mb_per_s"] / c["mb_per_s"] for p, c in zip(py, cpp)]
        p50 = [c["p50_us"] / p["p50_us"] for p, c in zip(py, cpp)]
        shares = [p["in_cpp_share"] for p in py]
        print(f"{name}: MB/s / C++'s, same round: min {min(ratios):.3f} / median "
              f"{statistics.median(ratios):.3f} / max {max(ratios):.3f} (target >= 0.95); "
              f"C++ p50 / Python p50: min {min(p50):.3f} / median {statistics.median(p50):.3f}; "
              f"inside the C++ append: median {100 * statistics.median(shares):.1f}% of the call")


if __name__ == "__main__":
    main()
