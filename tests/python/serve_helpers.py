"""Shared by the `embstore serve` tests: a server process, a writer process, HTTP helpers.

Run as a script (``python3 serve_helpers.py STORE DIM``) it is the writer process: it reads
commands from stdin, one per line, and answers each with a line "done ..." once its rows are
committed:
    ``append EPOCH KEY_BEGIN KEY_END BATCH``  rows of keys [KEY_BEGIN, KEY_END) at EPOCH, in
                                              batches of BATCH rows
    ``quit``
Row vectors: a centre per class (key % 10) scaled by the epoch, plus noise, so projections show
clusters that separate as epochs go on.
"""
import json
import os
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def class_rows(keys, epoch, dim, rng):
    centres = np.random.default_rng(12345).standard_normal((10, dim))
    keys = np.asarray(keys)
    return (centres[keys % 10] * (0.3 + epoch) + rng.standard_normal((len(keys), dim))
            ).astype(np.float32)


def writer_main(store, dim):
    import embstore
    rng = np.random.default_rng(7)
    with embstore.Writer(store, dim=dim) as w:
        print("ready", flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "quit":
                break
            epoch, begin, end, batch = map(int, words[1:5])
            for start in range(begin, end, batch):
                keys = np.arange(start, min(end, start + batch))
                w.append(keys, class_rows(keys, epoch, dim, rng), epoch)
            print(f"done {w.committed_rows()}", flush=True)


def read_line(proc, timeout=60.0):
    """The next line of proc's stdout (text), or AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no output from {proc.args} in {timeout} s"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            assert line, f"{proc.args} ended (exit {proc.wait()}): {proc.stderr.read()}"
            return line.strip()


class WriterProcess:
    """The writer process above, driven line by line."""

    def __init__(self, store, dim):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), store, str(dim)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert read_line(self.proc) == "ready"

    def send(self, epoch, begin, end, batch=50):
        self.proc.stdin.write(f"append {epoch} {begin} {end} {batch}\n")
        self.proc.stdin.flush()

    def done(self, timeout=60.0):
        line = read_line(self.proc, timeout)
        assert line.startswith("done "), line
        return int(line.split()[1])

    def append(self, epoch, begin, end, batch=50):
        self.send(epoch, begin, end, batch)
        return self.done()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            assert self.proc.wait(60) == 0, self.proc.stderr.read()


class ServerProcess:
    """``python3 -m embstore.serve STORE --port 0 ARGS...`` on 127.0.0.1; ``url`` once up."""

    def __init__(self, store, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "embstore.serve", store,
                                      "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = read_line(self.proc)
        assert "http://" in line, line
        self.url = line[line.index("http://"):].rstrip("/")

    def get(self, path):
        """(status, parsed JSON body) of GET url+path."""
        status, body = self.get_raw(path)
        return status, json.loads(body)

    def get_raw(self, path, headers=None):
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def ok(self, path):
        status, body = self.get(path)
        assert status == 200, (path, status, body)
        return body

    def until(self, path, predicate, timeout=60.0):
        """Polls GET path until predicate(body) holds; returns that body."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.get(path)
            if status == 200 and predicate(body):
                return body
            assert time.monotonic() < deadline, f"{path} never satisfied the condition: {body}"
            time.sleep(0.05)

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        """SIGTERM; returns (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(30)
        return code, self.proc.stderr.read()


if __name__ == "__main__":
    writer_main(sys.argv[1], int(sys.argv[2]))
