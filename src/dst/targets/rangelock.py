"""Ordered byte-range locks: overlapping holders run one after another, in arrival order.

Theory of operation
-------------------
:meth:`RangeLock.register` records the range *synchronously* (no await) together with
the earlier registered ranges that overlap it; the holder then :meth:`~RangeLock.wait`\\ s
for those (only if there are any) and finally :meth:`~RangeLock.release`\\ s.  Arrival
order therefore is the order in which overlapping holders run, which is what keeps
mirror legs identical: two overlapping writes are applied to every leg in the same
order.  Non-overlapping holders never wait for each other.

The hot path (an uncontended range) allocates one small object and awaits nothing: no
Event and no future exist until a later holder actually has to wait, and each waiter
waits on a future of its own (so cancelling one waiter never disturbs another).  The
scan is linear in the number of holders, which is bounded by the in-flight request
limit; release is O(1).  :meth:`~RangeLock.hold` is the ``async with`` form.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Hold:
    """One registered range; ``earlier`` are the overlapping holds it must wait for."""

    __slots__ = ("earlier", "end", "released", "start", "waiters")

    def __init__(self, start: int, end: int, earlier: list[Hold] | None) -> None:
        self.start = start
        self.end = end
        self.earlier = earlier
        self.waiters: list[asyncio.Future[None]] | None = None
        self.released = False


class RangeLock:
    """Exclusive, FIFO-ordered locks on byte ranges."""

    def __init__(self) -> None:
        self._held: dict[Hold, None] = {}  # registered, not yet released, in arrival order

    def __len__(self) -> int:
        return len(self._held)

    def register(self, offset: int, length: int) -> Hold:
        """Register ``[offset, offset + length)`` now; :meth:`wait` before using it
        (needed only if ``hold.earlier``), :meth:`release` after (always)."""
        end = offset + length
        earlier: list[Hold] | None = None
        for h in self._held:
            if h.start < end and offset < h.end:
                if earlier is None:
                    earlier = [h]
                else:
                    earlier.append(h)
        hold = Hold(offset, end, earlier)
        self._held[hold] = None
        return hold

    async def wait(self, hold: Hold) -> None:
        """Wait until every earlier overlapping hold is released."""
        if not hold.earlier:
            return
        loop = asyncio.get_running_loop()
        for h in hold.earlier:
            if h.released:
                continue
            fut: asyncio.Future[None] = loop.create_future()
            if h.waiters is None:
                h.waiters = [fut]
            else:
                h.waiters.append(fut)
            await fut
        hold.earlier = None

    def release(self, hold: Hold) -> None:
        """Release ``hold`` (whether or not its wait finished); idempotent."""
        if hold.released:
            return
        hold.released = True
        del self._held[hold]
        if hold.waiters is not None:
            for fut in hold.waiters:
                if not fut.done():
                    fut.set_result(None)
            hold.waiters = None

    @asynccontextmanager
    async def hold(self, offset: int, length: int) -> AsyncIterator[None]:
        """Hold ``[offset, offset + length)`` for the body of the ``async with``."""
        h = self.register(offset, length)
        try:
            await self.wait(h)
            yield
        finally:
            self.release(h)
