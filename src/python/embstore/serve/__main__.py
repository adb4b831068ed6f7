"""``python3 -m embstore.serve STORE [--host H] [--port P] [--labels FILE]`` (see the package doc)."""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

from .analysis import Labels, LabelsError
from .app import LOOPBACK_HOSTS, Server, make_app
from .store import Follower, StoreError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embstore serve",
        description="Serves a read-only live page (and a JSON API) of a store's embeddings.")
    parser.add_argument("store", metavar="STORE_OR_MANIFEST",
                        help="a store directory, or a manifest file of shards (read as one store)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; others are reachable by "
                             "anyone on the network, without authentication)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free)")
    parser.add_argument("--labels", metavar="FILE",
                        help='labels of keys: JSON {"KEY": LABEL} or CSV lines KEY,LABEL')
    return parser


async def _serve(server: Server, host: str, port: int) -> None:
    runner = web.AppRunner(make_app(server), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise SystemExit(f"embstore serve: cannot listen on {host}:{port}: {e.strerror}")
    bound = site._server.sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"embstore serve: {server.follower.path} (read-only, {server.follower.snapshot.rows} "
          f"rows) at http://{shown}:{bound}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"embstore serve: --port must be in 0 .. 65535; got {args.port}", file=sys.stderr)
        return 2
    labels = None
    try:
        if args.labels is not None:
            labels = Labels.load(args.labels)
        follower = Follower(args.store)
    except (StoreError, LabelsError) as e:
        print(f"embstore serve: {e}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK_HOSTS:
        print(f"embstore serve: WARNING: listening on {args.host}: there is no authentication; "
              "anyone who can reach this port can read every embedding in the store",
              file=sys.stderr, flush=True)
    asyncio.run(_serve(Server(follower, labels, args.host), args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
