"""A named node of an array: counts its I/O and reports its state for status.

The builder wraps every leaf target (a local file or a remote NBD node) in a
:class:`Member`, so per-node counters and health look the same whatever the leaf
is.  Errors pass through unchanged (they are counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dst.device import BlockDevice, Buffer, Capabilities, Extent, Health, IOCounters
from dst.errors import BlockError


class Member(BlockDevice):
    """Pass-through wrapper with :class:`IOCounters` and a connection state."""

    def __init__(self, inner: BlockDevice, *, name: str, kind: str, where: str) -> None:
        self.inner = inner
        self.name = name
        self.kind = kind  # "file" | "remote" | "memory"
        self.where = where  # local path or remote URI
        self.counters = IOCounters()
        self.state = "new"

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.inner.size

    @property
    def caps(self) -> Capabilities:  # type: ignore[override]
        return self.inner.caps

    async def open(self) -> None:
        await self.inner.open()
        self.state = "connected"

    async def close(self) -> None:
        await self.inner.close()
        self.state = "closed"

    def _error(self, exc: BlockError) -> BlockError:
        self.counters.errors += 1
        return exc

    async def read(self, offset: int, length: int) -> Buffer:
        c = self.counters
        c.reads += 1
        c.read_bytes += length
        try:
            return await self.inner.read(offset, length)
        except BlockError as exc:
            raise self._error(exc) from None

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        c = self.counters
        c.writes += 1
        c.write_bytes += len(data)
        try:
            await self.inner.write(offset, data, fua=fua)
        except BlockError as exc:
            raise self._error(exc) from None

    async def flush(self) -> None:
        self.counters.flushes += 1
        try:
            await self.inner.flush()
        except BlockError as exc:
            raise self._error(exc) from None

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.counters.trims += 1
        try:
            await self.inner.trim(offset, length, fua=fua)
        except BlockError as exc:
            raise self._error(exc) from None

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        self.counters.zeroes += 1
        try:
            await self.inner.write_zeroes(offset, length, fua=fua, punch=punch, fast=fast)
        except BlockError as exc:
            raise self._error(exc) from None

    async def cache(self, offset: int, length: int) -> None:
        await self.inner.cache(offset, length)

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        try:
            return await self.inner.block_status(offset, length)
        except BlockError as exc:
            raise self._error(exc) from None

    def spec(self) -> dict[str, Any]:
        return self.inner.spec()

    def health(self) -> Health:
        inner = self.inner.health()
        state = self.state if inner.state == "ok" else inner.state
        return Health(state, dict(inner.detail))

    def children(self) -> Sequence[BlockDevice]:
        return ()
