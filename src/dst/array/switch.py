"""The top of every array: a gate that can drain, hold, and swap the target tree.

Theory of operation
-------------------
Live reconfiguration follows device-mapper: build the new tree, *suspend* (stop
admitting new requests, wait until every in-flight request completed), *swap* the
tree, *resume* (release the held requests, in arrival order, onto the new tree).  A
request is therefore served entirely by one tree, and none fails because of a
reconfiguration.

Held requests wait on one :class:`asyncio.Event`; asyncio wakes waiters in FIFO
order, so they resume in the order they arrived.  The hot path when not suspended
costs one attribute test and two integer updates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from dst.device import BlockDevice, Buffer, Cancel, Capabilities, Done, Extent, Health

T = TypeVar("T")


class SwitchDevice(BlockDevice):
    """Wraps the root target; ``suspend``/``swap``/``resume`` reconfigure it live."""

    def __init__(self, inner: BlockDevice, *, name: str = "") -> None:
        self._inner = inner
        self.name = name or inner.name
        self._inflight = 0
        self._suspended = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self.held = 0  # requests waiting for resume (visible in status)

    # -- the device interface -------------------------------------------------
    @property
    def size(self) -> int:  # type: ignore[override]
        return self._inner.size

    @property
    def caps(self) -> Capabilities:  # type: ignore[override]
        return self._inner.caps

    @property
    def inner(self) -> BlockDevice:
        return self._inner

    @property
    def suspended(self) -> bool:
        return self._suspended

    async def _admit(self) -> None:
        while self._suspended:
            self.held += 1
            try:
                await self._resumed.wait()
            finally:
                self.held -= 1
        self._inflight += 1
        self._drained.clear()

    def _done(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    async def _run(self, op: Callable[[BlockDevice], Awaitable[T]]) -> T:
        if self._suspended:
            await self._admit()
        else:
            self._inflight += 1
            self._drained.clear()
        try:
            return await op(self._inner)
        finally:
            self._done()

    # read and write are _run written out: one coroutine less on the hot path.

    async def read(self, offset: int, length: int) -> Buffer:
        if self._suspended:
            await self._admit()
        else:
            self._inflight += 1
            self._drained.clear()
        try:
            return await self._inner.read(offset, length)
        finally:
            self._done()

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        if self._suspended:
            await self._admit()
        else:
            self._inflight += 1
            self._drained.clear()
        try:
            await self._inner.write(offset, data, fua=fua)
        finally:
            self._done()

    # The callback fast path (dst.device): only while not suspended.

    def _finisher(self, done: Done) -> Done:
        def fin(exc: BaseException | None, value: Any) -> None:
            self._done()
            done(exc, value)

        return fin

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        if self._suspended:
            return None
        self._inflight += 1
        self._drained.clear()
        cancel = self._inner.submit_read(offset, length, self._finisher(done))
        if cancel is None:
            self._done()
        return cancel

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        if self._suspended:
            return None
        self._inflight += 1
        self._drained.clear()
        cancel = self._inner.submit_write(offset, data, fua, self._finisher(done))
        if cancel is None:
            self._done()
        return cancel

    async def flush(self) -> None:
        await self._run(lambda d: d.flush())

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._run(lambda d: d.trim(offset, length, fua=fua))

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        await self._run(lambda d: d.write_zeroes(offset, length, fua=fua, punch=punch, fast=fast))

    async def cache(self, offset: int, length: int) -> None:
        await self._run(lambda d: d.cache(offset, length))

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        return await self._run(lambda d: d.block_status(offset, length))

    async def open(self) -> None:
        await self._inner.open()

    async def close(self) -> None:
        await self._inner.close()

    def spec(self) -> dict[str, Any]:
        return self._inner.spec()

    def health(self) -> Health:
        return self._inner.health()

    def children(self) -> Sequence[BlockDevice]:
        return (self._inner,)

    # -- reconfiguration --------------------------------------------------------
    async def suspend(self) -> None:
        """Hold new requests and wait until every in-flight one has completed."""
        self._suspended = True
        self._resumed.clear()
        await self._drained.wait()

    def swap(self, new: BlockDevice) -> BlockDevice:
        """Replace the tree (only while suspended); returns the old one."""
        assert self._suspended, "swap requires a suspended device"
        old, self._inner = self._inner, new
        return old

    def resume(self) -> None:
        """Release held requests in arrival order."""
        self._suspended = False
        self._resumed.set()

    async def reconfigure(self, change: Callable[[], Awaitable[None] | None]) -> None:
        """suspend -> change() -> resume, resuming even if ``change`` fails."""
        await self.suspend()
        try:
            result = change()
            if result is not None:
                await result
        finally:
            self.resume()
