"""The aiohttp application behind ``embstore serve``: the JSON API and the page's static files.

See the package docstring (``embstore.serve``) for the API. Request handlers parse and validate
their parameters, then run the numpy work on a small thread pool against the follower's current
snapshot, so the event loop keeps answering while a projection is computed; what the page polls
every second (stats, epochs) runs on a thread of its own, never queued behind that work.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
from typing import Optional

import numpy as np
from aiohttp import web

from . import analysis
from .store import Follower, StoreError

# Bounds of every response (a request outside them gets a 400 naming the bound).
kDefaultSample = 5000  # points in a projection unless ?limit= says otherwise
kMaxSample = 20000
kMaxNeighbours = 100
kMaxScanRows = 1_000_000  # rows of one epoch compared by a neighbour query (sampled beyond)
kMaxHistoryRows = 1000  # a key's rows at its latest epochs, in a history
kMaxTrajectoryEpochs = 100  # the latest epochs of a history that get a projected point
kMaxEpochsListed = 10000  # the latest epochs listed by /api/epochs and /api/stats
# Projections cached (sample rows and 2-D points: ~120 KB each at the default sample).
kCacheEntries = 64
# PCA bases cached (a mean and two directions: 24 * dim bytes each), apart from the projections: a
# history walks the bases of kMaxTrajectoryEpochs epochs, and a cache smaller than that walk
# would miss at every step (a fit per epoch, seconds of CPU per history).
kBasisCacheEntries = 2 * kMaxTrajectoryEpochs + kCacheEntries
# A connection with no sign of life for this long is closed (watch_connections): no whole request
# since it opened or since its last answer (idle, kept alive, or a request sent half or a byte
# at a time), no request being answered, no byte of an answer leaving (a client that does not
# read). aiohttp 3.8 has no timeout before a first request, and ~1,000 such connections took
# every file descriptor under the usual ulimit -n 1024: the server answered no one.
kIdleSeconds = 10.0
kIdleCheckSeconds = 1.0  # how often connections are looked at (a close comes up to this late)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# Debian's libjs-chart.js; served as /static/chart.js so the page needs no CDN.
CHART_JS = "/usr/share/javascript/chart.js/chart.min.js"
# The only files the server ever sends: URL name -> (path, content type). Never a path built from
# a request.
STATIC_FILES = {
    "index.html": (os.path.join(STATIC_DIR, "index.html"), "text/html"),
    "app.js": (os.path.join(STATIC_DIR, "app.js"), "text/javascript"),
    "style.css": (os.path.join(STATIC_DIR, "style.css"), "text/css"),
    "chart.js": (CHART_JS, "text/javascript"),
}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
# A Host header: "[IPv6]" or a name or IPv4 address, then an optional ":port".
_HOST_HEADER = re.compile(r"(?:\[([^\[\]]*)\]|([^:\[\]]*))(?::[0-9]*)?")


class HostCheck:
    """Which Host headers a server bound to an address answers. A page on another site could
    reach the server through DNS rebinding: its requests then carry that site's name. So a
    server that listens on loopback (any 127.0.0.0/8 address, ::1, or a name resolving to one)
    answers only loopback addresses, localhost and the name it was bound by; one bound to every
    address (0.0.0.0, ::) also any IP address (a rebinding needs a name) and this machine's name.
    Names are compared without case or a trailing dot, as DNS does."""

    def __init__(self, any_address: bool, names, shown: str) -> None:
        self.any_address = any_address
        self.names = {n.lower().removesuffix(".") for n in names if n}
        self.shown = shown  # what a refusal says is answered

    @classmethod
    def for_bind(cls, host: str) -> Optional["HostCheck"]:
        """The check of a server bound to ``host`` (--host), or None where every Host is
        answered: a bind to network addresses only (or a name of them), which a loopback
        rebinding cannot reach."""
        name = host.lower().removesuffix(".")
        if name in WILDCARD_HOSTS:
            machine = socket.gethostname()
            return cls(True, {"localhost", machine}, f"IP addresses / localhost / {machine}")
        names = {"localhost"}
        try:
            addresses = [ipaddress.ip_address(name)]
        except ValueError:
            names.add(name)  # --host NAME: answered by that name too
            try:
                addresses = [ipaddress.ip_address(info[4][0].split("%")[0])
                             for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
            except (OSError, ValueError):
                return None  # Nor can it be bound: exit 17, said by _serve.
        if any(a.is_unspecified for a in addresses):
            return cls.for_bind("::")
        if not any(_is_loopback(a) for a in addresses):
            return None
        # A name may resolve to network addresses as well, which aiohttp binds too.
        any_address = not all(_is_loopback(a) for a in addresses)
        if name in LOOPBACK_HOSTS:
            shown = "127.0.0.1 / localhost"
        else:
            shown = " / ".join(["IP addresses" if any_address else "loopback addresses",
                                *sorted(names)])
        return cls(any_address, names, shown)

    def answers(self, header: str) -> bool:
        match = _HOST_HEADER.fullmatch(header)
        if match is None:
            return False
        bracketed, plain = match.groups()
        try:
            address = ipaddress.IPv6Address(bracketed) if bracketed is not None \
                else ipaddress.IPv4Address(plain)
        except ValueError:
            return bracketed is None and plain.lower().removesuffix(".") in self.names
        return self.any_address or _is_loopback(address)


def _is_loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


class ApiError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _int_param(query, name: str, low: int, high: int, default: Optional[int] = None) -> int:
    text = query.get(name)
    if text is None:
        if default is None:
            raise ApiError(400, f"missing parameter {name}")
        return default
    if not text.isascii() or not text.isdigit():
        raise ApiError(400, f"{name} must be a non-negative integer; got {text!r}")
    # Converted from the digits after the leading zeros, checked for length first: int()
    # refuses a text of more than 4,300 digits, leading zeros included.
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(high)):
        raise ApiError(400, f"{name} must be in {low} .. {high}; got a number of {len(digits)} "
                            "digits")
    value = int(digits)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in {low} .. {high}; got {value}")
    return value


def _check_params(query, allowed) -> None:
    seen = collections.Counter(list(query))  # Its names; a query string repeats repeated ones.
    for name, times in seen.items():
        if name not in allowed:
            raise ApiError(400, f"unknown parameter {name!r}; this endpoint takes "
                                f"{', '.join(allowed) or 'none'}")
        if times > 1:
            raise ApiError(400, f"parameter {name!r} is given {times} times; give it once")


def _u64(value: int) -> str:
    """A key or epoch (uint64) as the API sends it: decimal text, which JavaScript's JSON.parse
    keeps exact (a JSON number above 2**53 comes out rounded). Row numbers and counts stay
    numbers: a store holds at most 2**40 rows (kMaxRows, src/format/format.h)."""
    return str(int(value))


def _u64s(values) -> list:
    """Keys or epochs (an array or a list) as the API sends them: see ``_u64``."""
    return [str(v) for v in np.asarray(values, np.uint64).tolist()]


def _epoch_list(snap, epochs) -> list:
    return [{"epoch": _u64(e), "rows": snap.epoch_counts[e]} for e in epochs[-kMaxEpochsListed:]]


def _rounded(values: np.ndarray) -> list:
    return [float(f"{v:.6g}") for v in values.tolist()]


class Server:
    """The state shared by the handlers: the follower, the labels, caches of PCA results."""

    def __init__(self, follower: Follower, labels: Optional[analysis.Labels] = None,
                 host: str = "127.0.0.1") -> None:
        self.follower = follower
        self.labels = labels
        self.host_check = HostCheck.for_bind(host)  # None: every Host header is answered
        # Projections, neighbours and histories (seconds of numpy each, at worst) ...
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="embstore-api")
        # ... and apart from them, what the page polls every second (stats, epochs): constant
        # time, never queued behind the former.
        self.poll_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="embstore-poll")
        self._fits = collections.OrderedDict()
        self._bases = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self.started_unix = time.time()
        self.stopping = False
        # Requests being answered, per connection (aiohttp's RequestHandler), and per connection
        # watched by idle_connections: (time of its last sign of life, answer bytes unsent then).
        self._answering = collections.Counter()
        self._watched = {}

    def stop_computations(self) -> None:
        """Once the server stops: the computations queued are cancelled (their requests get a
        503), none is queued any more; those running go on (nothing can stop numpy)."""
        self.stopping = True
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.poll_pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stops the request threads (the follower is stopped by its owner)."""
        self.stop_computations()

    def answering(self, connection, change: int) -> None:
        """A request of ``connection`` is being answered (``change`` 1), or was (-1)."""
        self._answering[connection] += change
        if self._answering[connection] <= 0:
            del self._answering[connection]
        if connection in self._watched:
            self._watched[connection] = (time.monotonic(), 0)

    def idle_connections(self, connections, now: Optional[float] = None) -> list:
        """Those of ``connections`` (aiohttp's, open) with no sign of life for kIdleSeconds
        (see there), counted from the first call that saw them, or from their latest sign."""
        now = time.monotonic() if now is None else now
        watched, idle = {}, []
        for connection in connections:
            transport = connection.transport
            if transport is None:  # closing
                continue
            unsent = transport.get_write_buffer_size()
            since, before = self._watched.get(connection, (now, unsent))
            if connection in self._answering or unsent != before:
                since = now
            watched[connection] = (since, unsent)
            if now - since >= kIdleSeconds:
                idle.append(connection)
        self._watched = watched
        return idle

    # ---- helpers ---------------------------------------------------------------------------

    def _cached(self, cache, entries: int, key, compute):
        """cache[key], or compute() stored there; the least recently used beyond ``entries``
        are dropped."""
        with self._cache_lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        value = compute()
        with self._cache_lock:
            cache[key] = value
            while len(cache) > entries:
                cache.popitem(last=False)
        return value

    def _epoch(self, snap, query, name: str = "epoch") -> int:
        """The requested epoch (default: the newest), which must hold rows in the snapshot."""
        if not snap.epoch_counts:
            raise ApiError(404, "the store holds no rows yet")
        epoch = _int_param(query, name, 0, 2**64 - 1, default=max(snap.epoch_counts))
        if epoch not in snap.epoch_counts:
            present = snap.sorted_epochs()
            shown = ", ".join(map(str, present[:20])) + (", ..." if len(present) > 20 else "")
            raise ApiError(404, f"epoch {epoch} is not in the store (epochs present: {shown})")
        return epoch

    def _sample(self, snap, epoch: int, limit: int):
        """(rows of the epoch, a sorted random sample of at most ``limit`` of them), the same
        sample for the same epoch contents."""
        rows = self.follower.lookup.epoch_rows(snap, epoch)
        if len(rows) <= limit:
            return rows, rows
        rng = np.random.default_rng(epoch % 2**63)
        return rows, np.sort(rng.choice(rows, size=limit, replace=False))

    def _finite_sample(self, snap, epoch: int, limit: int):
        """(rows in the epoch, the rows of its sample without NaN or Inf and passing their
        checksums, their vectors as ``analysis.as_float`` reads them, sampled rows left out for
        holding NaN or Inf (a PCA of them is NaN, or fails), sampled rows left out for failing
        their checksum)."""
        rows, sample = self._sample(snap, epoch, limit)
        failed = self.follower.failing_rows(snap, sample)
        if failed:
            first = min(failed)
            print(f"embstore serve: {len(failed)} of the {len(sample)} rows sampled at epoch "
                  f"{epoch} fail their checksum and are left out of its projection; the first: "
                  f"{failed[first]}", file=sys.stderr, flush=True)
            sample = sample[~np.isin(sample, np.fromiter(failed, np.int64, len(failed)))]
        vectors = analysis.as_float(snap.vectors[sample], self.follower.dtype)
        finite = analysis.finite_rows(vectors)
        return (len(rows), sample[finite], vectors[finite], len(sample) - int(finite.sum()),
                len(failed))

    def _refuse_failing(self, snap, rows, what: str) -> None:
        """StoreError (a 503) naming the first of ``rows`` that fails its checksum, if any."""
        failed = self.follower.failing_rows(snap, rows)
        if failed:
            first = min(failed)
            raise StoreError(f"{failed[first]}: the store is damaged ({len(failed)} of the "
                             f"{len(set(np.asarray(rows).tolist()))} rows of {what} fail their "
                             "checksum; embstore verify lists the damaged rows)")

    @staticmethod
    def _fit_key(snap, epoch: int, limit: int):
        # The generation too: a truncate can leave an epoch with as many rows as before, others.
        return snap.generation, epoch, snap.epoch_counts[epoch], limit

    def _basis(self, snap, epoch: int, limit: int = kDefaultSample, vectors=None):
        """The PCA basis of an epoch's sample at ``limit`` (``vectors``: that sample's finite
        vectors, when the caller has them); cached per (generation, epoch, its row count,
        limit)."""
        def compute():
            return analysis.Basis.fit(
                vectors if vectors is not None else self._finite_sample(snap, epoch, limit)[2])
        return self._cached(self._bases, kBasisCacheEntries, self._fit_key(snap, epoch, limit),
                            compute)

    def _fit(self, snap, epoch: int, limit: int):
        """(basis, sample rows, rows in the epoch, the sample's 2-D points, sampled rows left out
        as not finite, sampled rows left out as failing their checksum) of an epoch; cached as
        the basis is (so rows are checked when sampled, not at every request). The cache holds
        no vectors (bounded memory)."""
        def compute():
            epoch_rows, sample, vectors, non_finite, corrupt = \
                self._finite_sample(snap, epoch, limit)
            basis = self._basis(snap, epoch, limit, vectors)
            return (basis, sample, epoch_rows, basis.project(vectors), non_finite, corrupt,
                    snap.offsets())
        basis, sample, epoch_rows, xy, non_finite, corrupt, offsets = self._cached(
            self._fits, kCacheEntries, self._fit_key(snap, epoch, limit), compute)
        # The same rows (same generations and rows in the epoch: no shard gained rows of it),
        # maybe renumbered since: a shard set's rows move when a shard before theirs grows.
        return basis, snap.renumbered(sample, offsets), epoch_rows, xy, non_finite, corrupt

    def _label_codes(self, keys):
        if self.labels is None:
            return None
        return self.labels.lookup(keys).tolist()

    def _label_of(self, key: int):
        if self.labels is None:
            return None
        code = int(self.labels.lookup(np.array([key], np.uint64))[0])
        return self.labels.names[code] if code >= 0 else None

    def _key(self, query) -> int:
        return _int_param(query, "key", 0, 2**64 - 1)

    # ---- endpoints (run on the pool) -------------------------------------------------------

    def stats(self) -> dict:
        follower = self.follower
        snap = follower.check()  # the page polls this: a damaged store shows at once
        infos = []
        try:
            # Polled: constant time. A shard set's: one per shard, the files summed.
            got = follower.reader.info(key_stats=False)
            infos = got if isinstance(got, list) else [got]
        except Exception:  # Damaged since check(): the next request reports it.
            infos = []
        epochs = snap.sorted_epochs()
        return {
            "store": follower.path,
            "dtype": follower.dtype,
            "dim": follower.dim,
            "rows": snap.rows,
            # Changes when a truncate replaced rows (a shard set: a list, one per shard), also
            # when the rows per epoch end up as before: the page redraws what it shows.
            "generation": snap.generation,
            "rows_per_second": round(follower.rows_per_second(), 1),
            "epoch_count": len(epochs),
            "epochs": _epoch_list(snap, epochs),
            "bytes_on_disk": follower.bytes_on_disk(),
            "file_bytes": sum(i["data_file_bytes"] + i["index_file_bytes"] for i in infos)
            if infos else None,
            "last_commit_unix": follower.last_commit_unix,
            "server_started_unix": self.started_unix,
            "server_time_unix": time.time(),
            "key_index": follower.lookup.uses_index(),
            "labels": None if self.labels is None else len(self.labels),
            "label_names": None if self.labels is None else self.labels.names,
        }

    def epochs(self) -> dict:
        snap = self.follower.check()
        epochs = snap.sorted_epochs()
        return {"rows": snap.rows, "epoch_count": len(epochs),
                "epochs": _epoch_list(snap, epochs)}

    def projection(self, query) -> dict:
        _check_params(query, ("epoch", "limit"))
        snap = self.follower.check()
        epoch = self._epoch(snap, query)
        limit = _int_param(query, "limit", 1, kMaxSample, default=kDefaultSample)
        basis, sample, epoch_rows, xy, non_finite, corrupt = self._fit(snap, epoch, limit)
        # Checked again at each request (~1 us a row): a fit is cached while its epoch keeps
        # its rows, and a row damaged since would be drawn from it.
        failed = self.follower.failing_rows(snap, sample)
        if failed:
            keep = ~np.isin(sample, np.fromiter(failed, np.int64, len(failed)))
            sample, xy, corrupt = sample[keep], xy[keep], corrupt + len(failed)
        keys = snap.keys[sample]
        return {
            "epoch": _u64(epoch), "epoch_rows": epoch_rows, "sampled": len(sample), "limit": limit,
            "generation": snap.generation,
            "non_finite": non_finite, "corrupt": corrupt,
            "snapshot_rows": snap.rows, "explained_variance": basis.explained,
            "x": _rounded(xy[:, 0]), "y": _rounded(xy[:, 1]),
            "keys": _u64s(keys), "rows": sample.tolist(),
            "labels": self._label_codes(keys),
            "label_names": None if self.labels is None else self.labels.names,
        }

    def neighbours(self, query) -> dict:
        _check_params(query, ("key", "epoch", "k"))
        key = self._key(query)
        k = _int_param(query, "k", 1, kMaxNeighbours, default=10)
        snap = self.follower.check()
        epoch = self._epoch(snap, query)
        row = self.follower.lookup.find(snap, key, epoch)
        if row is None:
            raise ApiError(404, f"key {key} has no row at epoch {epoch}")
        self._refuse_failing(snap, [row], f"key {key} at epoch {epoch}")
        if not analysis.finite_rows(
                analysis.as_float(snap.vectors[[row]], self.follower.dtype))[0]:
            raise ApiError(422, f"key {key}'s row {row} at epoch {epoch} holds NaN or infinite "
                                "values: it has no distance to other rows")
        rows, scanned = self._sample(snap, epoch, kMaxScanRows)
        exclude = snap.keys[scanned] == np.uint64(key)
        found, dist, non_finite = analysis.nearest(snap.vectors, self.follower.dtype, scanned,
                                                   snap.vectors[row], k, exclude)
        basis = self._basis(snap, epoch)
        # The rows answered are checked (the scan compared the others as mapped).
        self._refuse_failing(snap, found, f"the neighbours of key {key} at epoch {epoch}")
        xy = basis.project(analysis.as_float(snap.vectors[np.append(found, row)],
                                             self.follower.dtype))
        keys = snap.keys[found].tolist()
        return {
            "key": _u64(key), "epoch": _u64(epoch), "k": k, "row": row,
            "label": self._label_of(key),
            "x": float(xy[-1, 0]), "y": float(xy[-1, 1]),
            "epoch_rows": len(rows), "scanned": len(scanned), "exact": len(scanned) == len(rows),
            "non_finite": non_finite,
            "neighbours": [
                {"key": _u64(kk), "row": int(r), "distance": float(d), "label": self._label_of(kk),
                 "x": float(p[0]), "y": float(p[1])}
                for kk, r, d, p in zip(keys, found.tolist(), dist.tolist(), xy[:-1])],
        }

    def history(self, query) -> dict:
        _check_params(query, ("key",))
        key = self._key(query)
        snap = self.follower.check()
        # The key's row at each epoch (its latest there: a later append wins, as in lookups):
        # one vectorised lookup per epoch of the store, never a list of every version of the
        # key (Reader.history: a key appended millions of times took seconds and gigabytes).
        epochs = snap.epoch_array()
        rows = self.follower.lookup.find_each_epoch(snap, key, epochs)
        held = rows >= 0
        if not held.any():
            raise ApiError(404, f"key {key} is not in the store")
        total = int(held.sum())
        rows, epochs = rows[held][-kMaxHistoryRows:], epochs[held][-kMaxHistoryRows:]
        self._refuse_failing(snap, rows, f"key {key}")
        trajectory = []
        non_finite = 0
        for r, e in list(zip(rows.tolist(), epochs.tolist()))[-kMaxTrajectoryEpochs:]:
            vector = analysis.as_float(snap.vectors[[r]], self.follower.dtype)
            if not analysis.finite_rows(vector)[0]:
                non_finite += 1  # No place in a projection.
                continue
            p = self._basis(snap, e).project(vector)[0]
            trajectory.append({"epoch": _u64(e), "row": r, "x": float(p[0]), "y": float(p[1])})
        order = np.argsort(rows, kind="stable")  # Listed in commit (row) order.
        return {
            "key": _u64(key), "label": self._label_of(key), "total_epochs": total,
            "rows": rows[order].tolist(), "epochs": _u64s(epochs[order]),
            "trajectory": trajectory,
            "non_finite": non_finite,
        }


# Strict JSON: a NaN or Infinity (not JSON: the page's JSON.parse refuses it) is a 500 naming it.
_strict_dumps = functools.partial(json.dumps, allow_nan=False)


def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"},
                             dumps=_strict_dumps)


def make_app(server: Server) -> web.Application:
    """The aiohttp application serving ``server`` (see the package docstring for the routes)."""

    @web.middleware
    async def guard(request, handler):
        server.answering(request.protocol, 1)  # not idle meanwhile (watch_connections)
        try:
            return await answer(request, handler)
        finally:
            server.answering(request.protocol, -1)

    async def answer(request, handler):
        # A page on another site could reach a loopback server through DNS rebinding: the Host
        # header then names that site (HostCheck says what is answered).
        check = server.host_check
        if check is not None and not check.answers(request.host):
            return _json({"error": f"Host {request.host!r} refused: this server answers only "
                                   f"to {check.shown}"}, 403)
        try:
            response = await handler(request)
        except ApiError as e:
            return _json({"error": e.message}, e.status)
        except StoreError as e:
            return _json({"error": f"store problem: {e}"}, 503)
        except web.HTTPException as e:
            if e.status >= 400:
                return _json({"error": f"{e.status} {e.reason}: {request.path}"}, e.status)
            raise
        except Exception as e:  # Reported, and the server keeps serving.
            print(f"embstore serve: {request.path_qs}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            return _json({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault(
            "Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        return response

    def api(method, pool=server.pool):
        async def handler(request):
            stopping = ApiError(503, "the server is stopping (Ctrl-C or SIGTERM)")
            if server.stopping:
                raise stopping
            loop = asyncio.get_running_loop()
            query = request.rel_url.query
            try:
                data = await loop.run_in_executor(pool, method, query)
            except asyncio.CancelledError:
                # The computation was cancelled before it started, by the stop: said. (This
                # handler cancelled, at the end of the stop's grace, is not answered.)
                task = asyncio.current_task()
                if server.stopping and not getattr(task, "cancelling", lambda: 1)():
                    raise stopping from None
                raise
            return _json(data)
        return handler

    async def static(request):
        name = request.match_info.get("name", "index.html")
        entry = STATIC_FILES.get(name)
        if entry is None:
            raise ApiError(404, f"no such file: {name}")
        path, content_type = entry
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            hint = " (Debian package libjs-chart.js)" if name == "chart.js" else ""
            raise ApiError(404, f"{name} is not installed{hint}") from None
        return web.Response(body=body, content_type=content_type,
                            headers={"Cache-Control": "no-cache"})

    async def not_found(request):
        if request.method not in ("GET", "HEAD"):
            raise ApiError(405, f"{request.method} refused: this server is read-only (GET only)")
        raise ApiError(404, f"no such endpoint: {request.path}")

    app = web.Application(middlewares=[guard])
    app.router.add_get("/", static)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/stats", api(lambda q: (_check_params(q, ()), server.stats())[1],
                                         server.poll_pool))
    app.router.add_get("/api/epochs", api(lambda q: (_check_params(q, ()), server.epochs())[1],
                                          server.poll_pool))
    app.router.add_get("/api/projection", api(server.projection))
    app.router.add_get("/api/neighbours", api(server.neighbours))
    app.router.add_get("/api/history", api(server.history))
    app.router.add_route("*", "/{tail:.*}", not_found)

    async def on_startup(_):
        server.follower.start()

    async def on_shutdown(_):  # a stop signal came: before the requests' grace
        server.stop_computations()

    async def on_cleanup(_):
        server.follower.stop()
        server.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def watch_connections(web_server: web.Server, server: Server) -> None:
    """Closes, until cancelled, the connections of ``web_server`` (the aiohttp server answering
    for ``server``) with no sign of life for kIdleSeconds (see there)."""
    while True:
        await asyncio.sleep(kIdleCheckSeconds)
        for connection in server.idle_connections(web_server.connections):
            if connection.transport.get_write_buffer_size():
                connection.transport.abort()  # Its client does not read: close() would wait.
            else:
                connection.force_close()
