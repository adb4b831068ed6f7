"""Benchmark of `embstore serve` (python3 -m embstore.serve).

1. Time to first projection: a store of ROWS rows (dim DIM float32, EPOCHS epochs of equal size)
   is written, then a server process is started on it; measured: start until the URL is printed
   (open + first snapshot), then the first GET /api/projection?limit=10000 of the newest epoch
   (sample, gather, SVD, JSON), then the same request again (cached). Target: first projection
   < 1 s.
2. The server's cost on a concurrent writer: a writer process appends RUN_MB of 512-row batches
   (a new epoch every 4,096 batches) into a fresh store: alone; beside a "placebo" server and
   polling client on another, empty store (the same processes started, nothing to follow: this
   separates the server's work from the machine's reaction to processes starting); or while a
   server follows the store and a client polls it the way the page does (stats every second,
   the newest epoch's projection when a new epoch appears, and as it grows at most every 5 s). The three
   run in random order per round; the cost is 1 - (MB/s served) / (MB/s alone or placebo) of
   the same round, min and median. Target: < 5%. Also printed: the CPU time of the writer and of the
   server per second of writing (cores busy), which scheduling noise moves much less.

Usage: PYTHONPATH=build/python python3 bench/serve_bench.py [--rows 1000000] [--dim 128]
       [--repeats 6] [--run-mb 4096] [--dir DIR]
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

import embstore

BATCH = 512
kRedrawSeconds = 5.0  # static/app.js kRedrawMs
# Batches per epoch of the writer runs: an epoch every few seconds (a real one lasts minutes;
# each new epoch makes the page ask for its projection at once).
kEpochBatches = 4096
WRITER = r"""
import sys, time, numpy as np, embstore
path, dim, total_mb = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
EPOCH_BATCHES = int(sys.argv[4])
rows = np.random.default_rng(0).standard_normal((512, dim)).astype(np.float32)
batches = int(total_mb * (1 << 20) // rows.nbytes)
with embstore.Writer(path) as w:
    print("ready", flush=True)
    sys.stdin.readline()
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(batches):
        w.append(np.arange(i * 512, (i + 1) * 512), rows, i // EPOCH_BATCHES)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
print(batches * rows.nbytes / (1 << 20) / seconds, seconds, cpu, flush=True)
"""


def start_server(path):
    proc = subprocess.Popen([sys.executable, "-m", "embstore.serve", path, "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        stop(proc)
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line[line.index("http://"):].strip().rstrip("/")


def stop(proc):
    """Ends a process this benchmark started (SIGTERM, then SIGKILL after 30 s), if running;
    called from ``finally`` blocks, so that an error leaves no server or writer behind."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid):
    """User + system CPU time of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get(url):
    with urllib.request.urlopen(url, timeout=120) as response:
        return json.loads(response.read())


def first_projection(args, work):
    path = os.path.join(work, "big.emb")
    embstore.create(path, dim=args.dim)
    rng = np.random.default_rng(1)
    per_epoch = args.rows // args.epochs
    started = time.perf_counter()
    with embstore.Writer(path) as w:
        block = rng.standard_normal((65536, args.dim)).astype(np.float32)
        for epoch in range(args.epochs):
            for begin in range(0, per_epoch, 65536):
                n = min(65536, per_epoch - begin)
                w.append(np.arange(begin, begin + n), block[:n], epoch)
    print(f"store: {args.rows} rows x {args.dim} float32, {args.epochs} epochs, written in "
          f"{time.perf_counter() - started:.1f} s")
    for attempt in range(args.first_repeats):
        start = time.perf_counter()
        proc, url = start_server(path)
        try:
            up = time.perf_counter() - start
            start = time.perf_counter()
            p = get(url + f"/api/projection?limit=10000&epoch={args.epochs - 1}")
            first = time.perf_counter() - start
            start = time.perf_counter()
            get(url + f"/api/projection?limit=10000&epoch={args.epochs - 1}")
            again = time.perf_counter() - start
        finally:
            stop(proc)
        print(f"first projection, try {attempt + 1}: server up in {up:.3f} s; first "
              f"projection of {p['sampled']} points (of {p['epoch_rows']} rows in the epoch) "
              f"{first:.3f} s (target < 1 s); again (cached) {again:.3f} s")
    shutil.rmtree(path)


def page_client(url, stop):
    """Polls like the page (static/app.js): stats every second, the newest epoch's projection
    at once when a new epoch appears, and when it grew at most every kRedrawSeconds."""
    drawn, drawn_at = None, 0.0
    while not stop.wait(1.0):
        try:
            stats = get(url + "/api/stats")
            if stats["epochs"]:
                newest = stats["epochs"][-1]
                state = (newest["epoch"], newest["rows"])
                if state != drawn and (drawn is None or drawn[0] != state[0]
                                       or time.monotonic() - drawn_at > kRedrawSeconds):
                    get(url + f"/api/projection?epoch={newest['epoch']}")
                    drawn, drawn_at = state, time.monotonic()
        except OSError:
            pass


def writer_run(work, dim, run_mb, serve):
    """One writer run: serve is None (writer alone), "placebo" (a server and a polling page on
    another, empty store: the same processes, nothing to follow) or "served"."""
    path = os.path.join(work, "run.emb")
    embstore.create(path, dim=dim)
    served_path = path
    if serve == "placebo":
        served_path = os.path.join(work, "empty.emb")
        embstore.create(served_path, dim=dim)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path, str(dim), str(run_mb),
                               str(kEpochBatches)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    server = client = None
    done = threading.Event()
    server_cpu = 0.0
    try:
        assert writer.stdout.readline().strip() == "ready"
        if serve:
            server, url = start_server(served_path)
            client = threading.Thread(target=page_client, args=(url, done))
            client.start()
            server_cpu = cpu_seconds(server.pid)
        writer.stdin.write("go\n")
        writer.stdin.flush()
        mb_s, seconds, writer_cpu = map(float, writer.stdout.readline().split())
        assert writer.wait() == 0
        if serve:
            server_cpu = cpu_seconds(server.pid) - server_cpu
    finally:
        done.set()
        if client is not None:
            client.join()
        stop(server)
        stop(writer)
    shutil.rmtree(path)
    if serve == "placebo":
        shutil.rmtree(served_path)
    return mb_s, writer_cpu / seconds, server_cpu / seconds, seconds


def writer_cost(args, work):
    modes = [None, "placebo", "served"]
    runs = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        random.shuffle(modes)
        for mode in modes:
            runs[mode].append(writer_run(work, args.dim, args.run_mb, mode))
        alone, placebo, served = (runs[m][-1] for m in (None, "placebo", "served"))
        print(f"writer, round {repeat + 1}: alone {alone[0]:.0f} MB/s ({alone[1]:.2f} cores), "
              f"placebo server {placebo[0]:.0f} MB/s ({placebo[1]:.2f} cores), served "
              f"{served[0]:.0f} MB/s ({served[1]:.2f} cores; the server used {served[2]:.2f} "
              f"cores, {served[3]:.1f} s)", flush=True)

    def cost(base):
        costs = [1 - s[0] / b[0] for b, s in zip(runs[base], runs["served"])]
        return f"min {100 * min(costs):+.1f}%, median {100 * statistics.median(costs):+.1f}%"
    print(f"server's cost on the writer's append throughput ({args.repeats} rounds of "
          f"{args.run_mb:.0f} MiB runs in random order, 512 x {args.dim} float32 batches; "
          f"target < 5%): against the writer alone {cost(None)}; against a placebo server "
          f"{cost('placebo')}. Median writer MB/s: alone "
          f"{statistics.median(r[0] for r in runs[None]):.0f}, placebo "
          f"{statistics.median(r[0] for r in runs['placebo']):.0f}, served "
          f"{statistics.median(r[0] for r in runs['served']):.0f}; the server's CPU while the "
          f"writer ran: median {statistics.median(r[2] for r in runs['served']):.3f} cores")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--first-repeats", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=6)
    # Long enough for the page's polls (one a second) to land inside every served run.
    parser.add_argument("--run-mb", type=float, default=4096)
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="serve_bench.", dir=args.dir)
    try:
        first_projection(args, work)
        writer_cost(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
