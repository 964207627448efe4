"""A member reached over NBD: a ``dst serve`` node or any NBD server.

Theory of operation
-------------------
:class:`RemoteDevice` wraps one :class:`dst.net.client.NbdClient`.  ``open()``
connects and negotiates; every operation goes through :meth:`_client`, the single
place that yields the current connection (reconnection hooks in there).  Failures to
connect become a :class:`BlockError` whose message names the node and its URI, so
the operator sees which member is unreachable.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from dst.device import BlockDevice, Buffer, Capabilities, Extent, Health
from dst.errors import BlockError, ProtocolError, ServerRefused
from dst.net.address import Address
from dst.net.client import NbdClient


class RemoteDevice(BlockDevice):
    """The NBD export at ``address`` as a device."""

    def __init__(
        self,
        address: Address,
        *,
        name: str = "remote",
        timeout: float = 10.0,
        request_timeout: float | None = None,
        reconnect: bool = False,
        io_timeout: float | None = None,
    ) -> None:
        self.address = address
        self._reconnect = reconnect  # keep reconnecting in the background after a loss
        self._io_timeout = io_timeout  # how long a request waits for a reconnect (None/0: not)
        self.name = name
        self.size = 0
        self.caps = Capabilities()
        self._timeout = timeout
        self._request_timeout = request_timeout
        self._conn: NbdClient | None = None

    @property
    def uri(self) -> str:
        return self.address.uri()

    async def open(self) -> None:
        """Connect.  Raises BlockError naming the node and URI when it cannot."""
        if self._conn is not None:
            return
        try:
            conn = await NbdClient.connect(
                self.address, timeout=self._timeout, request_timeout=self._request_timeout
            )
        except ServerRefused as exc:
            raise BlockError(errno.ENXIO, f"{self.name}: {self.uri} refused: {exc}") from None
        except (BlockError, ProtocolError, OSError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            raise BlockError(
                errno.EHOSTUNREACH, f"{self.name}: cannot connect to {self.uri}: {why}"
            ) from None
        self._conn = conn
        self.size = conn.size
        self.caps = conn.caps

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    def _client(self) -> NbdClient:
        conn = self._conn
        if conn is None or not conn.connected:
            raise BlockError(errno.EIO, f"{self.name}: not connected to {self.uri}")
        return conn

    async def read(self, offset: int, length: int) -> Buffer:
        return await self._client().read(offset, length)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self._client().write(offset, data, fua=fua)

    async def flush(self) -> None:
        await self._client().flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self.caps.trim:
            await self._client().trim(offset, length, fua=fua)

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
        await self._client().write_zeroes(offset, length, fua=fua, punch=punch, fast=fast)

    async def cache(self, offset: int, length: int) -> None:
        if self.caps.cache:
            await self._client().cache(offset, length)

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        if not self.caps.block_status:
            return [Extent(length)]
        return await self._client().block_status(offset, length)

    def spec(self) -> dict[str, Any]:
        return {"type": "remote", "name": self.name, "uri": self.uri}

    def health(self) -> Health:
        conn = self._conn
        return Health("connected" if conn is not None and conn.connected else "disconnected")
