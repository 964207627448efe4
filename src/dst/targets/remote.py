"""A member reached over NBD: a ``dst serve`` node or any NBD server.

Theory of operation
-------------------
:class:`RemoteDevice` is a block device over one :class:`~dst.targets.reconnect.Link`,
the connection to the node kept up across outages: its first connect, the reconnect
loop, and the requests that wait for a reconnect and are replayed
(:mod:`dst.targets.reconnect` says how).  READ and WRITE go to the live connection
directly, the callback fast path too; whatever meets a lost connection goes on
through the link's replay (:mod:`dst.targets.replay`).  What the export cannot do is
emulated or skipped as the base class does.

Durability: a write acknowledged before the loss but not yet flushed may be lost if
the server itself went down.  Replaying the writes that were in flight, and the
flush that was in flight, is all a client can do; callers that need durability
flush (or use FUA), and such a flush is replayed until it succeeds or times out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from dst.device import BlockDevice, Buffer, Cancel, Capabilities, Done, Extent, Health
from dst.nbd.constants import Cmd
from dst.net.address import Address
from dst.net.client import ConnectionLost
from dst.targets.reconnect import Link, Listener
from dst.targets.replay import Replayable

_WRITE = int(Cmd.WRITE)


class RemoteDevice(BlockDevice):
    """The NBD export at ``address`` as a device (see the module docstring)."""

    kind = "remote"

    def __init__(
        self,
        address: Address,
        *,
        name: str = "remote",
        timeout: float = 10.0,
        request_timeout: float | None = None,
        reconnect: bool = False,
        io_timeout: float | None = None,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address
        self.name = name
        self.size = 0
        self.caps = Capabilities()
        self._link = Link(
            address,
            name=name,
            timeout=timeout,
            request_timeout=request_timeout,
            reconnect=reconnect,
            io_timeout=io_timeout,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
            rng=rng,
        )

    @property
    def uri(self) -> str:
        return self.address.uri()

    # --- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        """Connect.  Raises BlockError naming the node and URI when it cannot."""
        await self._link.open()
        self.size = self._link.size
        self.caps = self._link.caps

    async def close(self) -> None:
        """Stop reconnecting, fail waiting requests (ESHUTDOWN), disconnect.  Idempotent."""
        await self._link.close()

    def reset(self, reason: str) -> None:
        """Drop the connection (its node did not answer in time); it reconnects in the
        background and subscribers hear of the loss (:meth:`Link.reset`)."""
        self._link.reset(reason)

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(False)`` on each loss and ``callback(True)`` on each reconnect.

        Returns the function that unsubscribes.  A callback that raises is logged.
        """
        return self._link.subscribe(callback)

    # --- I/O --------------------------------------------------------------------------

    # read and write try the live connection directly (two coroutines less on the hot
    # path) and fall back to Link.run, which waits for a reconnect and replays.

    async def read(self, offset: int, length: int) -> Buffer:
        link = self._link
        conn = link.conn
        if conn is not None and conn.connected:
            try:
                return await conn.read(offset, length)
            except ConnectionLost as exc:
                link.lost(conn, exc)
        return await link.run(lambda c: c.read(offset, length))

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        link = self._link
        conn = link.conn
        if conn is not None and conn.connected:
            try:
                return await conn.write(offset, data, fua=fua)
            except ConnectionLost as exc:
                link.lost(conn, exc)
        await link.run(lambda c: c.write(offset, data, fua=fua))

    # The callback fast path (dst.device): the live connection's, and on a lost
    # connection the same replay as above, in a Task.

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        link = self._link
        conn = link.conn
        if conn is None:
            return None
        if not link.replays:  # the link learns of a loss from the connection itself
            return conn.submit_read(offset, length, done)  # (lost: None)
        if not conn.connected:
            return None
        req = Replayable(link, conn, done, lambda c: c.read(offset, length))
        return req.started(conn.submit_read(offset, length, req.finish))

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        link = self._link
        conn = link.conn
        if conn is None:
            return None
        if not link.replays:  # the link learns of a loss from the connection itself
            return conn.submit(_WRITE, offset, len(data), fua, data, done)  # (lost: None)
        if not conn.connected:
            return None
        req = Replayable(link, conn, done, lambda c: c.write(offset, data, fua=fua))
        return req.started(conn.submit(_WRITE, offset, len(data), fua, data, req.finish))

    def submit_gather(
        self, offset: int, parts: Sequence[Buffer], fua: bool, done: Done
    ) -> Cancel | None:
        link = self._link
        conn = link.conn
        if conn is None or not conn.connected or link.replays:  # a replay joins them
            return None
        return conn.submit_gather(offset, parts, fua, done)

    async def flush(self) -> None:
        await self._link.run(lambda c: c.flush())

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self.caps.trim:
            await self._link.run(lambda c: c.trim(offset, length, fua=fua))

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        if not self.caps.zeroes:
            await super().write_zeroes(offset, length, fua=fua, punch=punch, fast=fast)
            return
        await self._link.run(
            lambda c: c.write_zeroes(offset, length, fua=fua, punch=punch, fast=fast)
        )

    async def cache(self, offset: int, length: int) -> None:
        if self.caps.cache:
            await self._link.run(lambda c: c.cache(offset, length))

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        if not self.caps.block_status:
            return [Extent(length)]
        return await self._link.run(lambda c: c.block_status(offset, length))

    # --- status -----------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        return {"type": "remote", "name": self.name, "uri": self.uri}

    def health(self) -> Health:
        """The link's: connected, reconnecting or disconnected (:meth:`Link.health`)."""
        return self._link.health()
