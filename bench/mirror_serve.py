#!/usr/bin/env python3
"""Serve a bare MirrorDevice over ``dst serve`` nodes: the bitmap-cost bench's subject.

Theory of operation
-------------------
``bench/arrays.py``'s ``dst-mirror-memory`` and ``dst-mirror-meta`` targets run this
instead of ``dst daemon``: the same NBD server, client, remote legs and mirror data path
as the daemon, without its control plane (node gates, the array root), so that the only
difference between the two targets is the mirror's dirty log:

* ``--mode memory``: region state in memory only (the core log);
* ``--mode meta``: the on-disk write-intent bitmap (``metadata=True``), the mode
  ``dst up`` and the daemon run.

Every mode gets the daemon's leg timeout.  Stops cleanly (metadata marked clean) on
SIGTERM/SIGINT.  Not a user tool: ``python bench/mirror_serve.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from dst.array.spec import DEFAULT_LEG_TIMEOUT
from dst.net.address import parse_address
from dst.net.loop import run
from dst.net.server import NbdServer
from dst.targets.mirror import MirrorDevice
from dst.targets.remote import RemoteDevice


def mirror(mode: str, uris: list[str]) -> MirrorDevice:
    legs = [RemoteDevice(parse_address(u), name=f"n{i}") for i, u in enumerate(uris)]
    return MirrorDevice(legs, metadata=mode == "meta", leg_timeout=DEFAULT_LEG_TIMEOUT)


async def serve(mode: str, listen: str, export: str, uris: list[str]) -> None:
    m = mirror(mode, uris)
    await m.open()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = NbdServer({export: m})
    try:
        await server.start(listen)
        await stop.wait()
    finally:
        await server.close()
        await m.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["memory", "meta"], required=True)
    p.add_argument("--listen", required=True, help="e.g. unix:/tmp/m.sock")
    p.add_argument("--export", default="bench")
    p.add_argument("uris", nargs="+", help="the legs' NBD URIs")
    args = p.parse_args()
    run(serve(args.mode, args.listen, args.export, args.uris))
    return 0


if __name__ == "__main__":
    sys.exit(main())
