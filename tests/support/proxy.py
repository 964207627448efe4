"""A byte proxy in front of an NBD node that a test can cut and restore.

``cut()`` drops every open connection and refuses new ones (they are accepted and
closed at once, as a node that is down would behave behind a load balancer);
``restore()`` lets connections through again.  Used to simulate short network
outages between the array daemon and a member without killing the member.
"""

from __future__ import annotations

import asyncio
import contextlib


class CuttableProxy:
    """Forward ``listen`` (a unix socket path) to the unix socket ``target``."""

    def __init__(self, listen: str, target: str) -> None:
        self.listen = listen
        self.target = target
        self.connections = 0
        self._open = True
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=self.listen)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every connection now and refuse new ones until :meth:`restore`."""
        self._open = False
        for a, b in list(self._pairs):
            a.transport.abort()
            b.transport.abort()
        self._pairs.clear()

    def restore(self) -> None:
        self._open = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
