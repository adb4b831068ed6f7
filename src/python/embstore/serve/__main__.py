"""``python3 -m embstore.serve STORE [--host H] [--port P] [--labels FILE]`` (see the package doc)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

import embstore
from embstore import _embstore

from .analysis import Labels, LabelsError
from .app import LOOPBACK_HOSTS, Server, kIdleSeconds, make_app, watch_connections
from .store import Follower, StoreError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embstore serve",
        description="Serves a read-only live page (and a JSON API) of a store's embeddings.",
        epilog="Exit status: 0 once stopped by Ctrl-C or SIGTERM (a second one ends it at once, "
               "killed by it: 130 or 143), 2 usage, 12 the store or the labels file is not "
               "there, 17 cannot listen (the port in use, say), 10 + error code otherwise (as the "
               "embstore tool's).")
    parser.add_argument("store", metavar="STORE_OR_MANIFEST",
                        help="a store directory, or a manifest file of shards (read as one store)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; others are reachable by "
                             "anyone on the network, without authentication)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free)")
    parser.add_argument("--labels", metavar="FILE",
                        help='labels of keys: JSON {"KEY": LABEL} or CSV lines KEY,LABEL')
    return parser


# Exit statuses, those of the command-line tool (README, "Command-line tool"): 0 once stopped by
# SIGINT or SIGTERM (a second one kills: 130 or 143), 2 usage, 10 + the C++ ErrorCode otherwise.
USAGE = 2
_ERROR_BASE = 10
# The C++ ErrorCode of each name, from the core's one table.
_CODES = {name: number for number, name in
          ((n, _embstore.error_code_name(n)) for n in range(1, 64)) if name != "unknown"}
# The code of an OSError that carries none (one raised by Python, not by the core), by errno.
_ERRNO_CODES = {errno.ENOENT: "not_found", errno.ENOTDIR: "not_found",
                errno.EACCES: "permission_denied", errno.EPERM: "permission_denied",
                errno.ENOSPC: "full", errno.EROFS: "read_only"}


def exit_status(error: BaseException) -> int:
    """The exit status for the error that stops the server before it serves. A StoreError or
    LabelsError is judged by the error it was raised for (a missing store or labels file: 12),
    or is a usage error when it was raised for none (a labels file that does not parse)."""
    if isinstance(error, (StoreError, LabelsError)):
        if error.__context__ is None:
            return USAGE
        error = error.__context__
    if isinstance(error, embstore.NotAStoreError):
        name = "not_found"  # NotAStoreError is the core's kNotFound for a path that exists.
    else:
        name = getattr(error, "code", None)
    if name not in _CODES:
        if isinstance(error, OSError):
            name = _ERRNO_CODES.get(error.errno, "io")
        elif isinstance(error, ValueError):
            name = "invalid_argument"
        else:
            name = "io"
    return USAGE if name == "invalid_argument" else _ERROR_BASE + _CODES[name]


class _BriefBadRequests(logging.Formatter):
    """aiohttp's server log (logger ``aiohttp.server``): a request its parser refused (a request
    line or header over 8,190 bytes, say; aiohttp answers it 400 itself, before the app) is one
    line, not a traceback per request; anything else keeps its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            said = " ".join(str(error.message).split())  # one line, whatever the client sent
            return f"embstore serve: a request refused ({error.code}): {said}"
        return "embstore serve: " + super().format(record)


def _log_aiohttp_briefly() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_BriefBadRequests())
    logger = logging.getLogger("aiohttp.server")
    logger.addHandler(handler)
    logger.propagate = False


# Seconds the requests being answered get to finish once a stop signal came (aiohttp's default,
# 60 s, kept a Ctrl-C waiting that long while queued computations went on). Computations queued
# then are cancelled (their requests get a 503), and those still running are not waited for: see
# the end of this file.
kStopGraceSeconds = 1.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _serve(server: Server, host: str, port: int) -> int:
    # aiohttp's keep-alive timeout (75 s by default) counts from an answer; watch_connections
    # also closes connections that never sent a whole request.
    runner = web.AppRunner(make_app(server), access_log=None, keepalive_timeout=kIdleSeconds)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=kStopGraceSeconds)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        # Whatever the reason (the port in use, an address not of this machine, a port this
        # user may not bind): an I/O error, 17, not 1 (damage found).
        print(f"embstore serve: cannot listen on {host}:{port}: {e.strerror or e}",
              file=sys.stderr)
        return _ERROR_BASE + _CODES["io"]
    bound = site._server.sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"embstore serve: {server.follower.path} (read-only, {server.follower.snapshot.rows} "
          f"rows) at http://{shown}:{bound}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop_signal():
        # The first SIGINT or SIGTERM stops the server (exit status 0). A second one ends the
        # process at once, killed by it (128 + the signal, 130 or 143), as the command-line
        # tool's long commands do: the default action from now on, which needs neither the
        # event loop nor the interpreter to run (the clean-up may be what is slow).
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_DFL)
        stop.set()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_stop_signal)
    watch = asyncio.create_task(watch_connections(runner.server, server))
    try:
        await stop.wait()
    finally:
        watch.cancel()
        await runner.cleanup()
    return 0


def _stdout_failed(error: OSError) -> int:
    """--help (or --version) whose text could not be written (a full disk, a closed pipe):
    one line and exit 17, as the embstore tool's own commands answer it."""
    print(f"embstore serve: cannot write to stdout: {os.strerror(error.errno)}",
          file=sys.stderr)
    with contextlib.suppress(OSError):
        sys.stdout = open(os.devnull, "w")  # nothing left for the exit's flush to fail on
    return _ERROR_BASE + _CODES["io"]


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error, said by argparse
        try:
            sys.stdout.flush()  # --help's text, buffered: its write fails here, if anywhere
        except OSError as error:
            return _stdout_failed(error)
        raise done
    except OSError as error:
        return _stdout_failed(error)
    if not 0 <= args.port <= 65535:
        print(f"embstore serve: --port must be in 0 .. 65535; got {args.port}", file=sys.stderr)
        return USAGE
    labels = None
    try:
        if args.labels is not None:
            labels = Labels.load(args.labels)
        follower = Follower(args.store)
    except (StoreError, LabelsError, embstore.Error, OSError, ValueError) as e:
        print(f"embstore serve: {e}", file=sys.stderr)
        return exit_status(e)
    if args.host not in LOOPBACK_HOSTS:
        print(f"embstore serve: WARNING: listening on {args.host}: there is no authentication; "
              "anyone who can reach this port can read every embedding in the store",
              file=sys.stderr, flush=True)
    _log_aiohttp_briefly()
    return asyncio.run(_serve(Server(follower, labels, args.host), args.host, args.port))


if __name__ == "__main__":
    status = main()
    # Ended without joining the compute threads (Python's exit joins a ThreadPoolExecutor's): a
    # computation still running after a stop signal (seconds of numpy) answers a request already
    # closed, and a read-only server has nothing else to finish.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)
