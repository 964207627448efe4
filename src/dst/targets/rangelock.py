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
waits on a future of its own (so cancelling one waiter never disturbs another).  A
holder that is an object per request anyway (a mirror's mutation) can *be* its hold:
a :class:`Hold` subclass, registered with :meth:`RangeLock.add`.

Finding the earlier overlapping holds does not scan every holder: holds are indexed by
:data:`GRAIN`-sized buckets of the byte space (a hold is in every bucket it touches),
so a request looks only at the holds of its own buckets -- a small write among many
in flight (every connection's, a greedy client's) costs the same as alone.  A range
over more than :data:`WIDE` buckets (a large zeroing, a resync window) is not indexed:
it is compared with every hold when it registers, and every later hold is compared with
it (there are few).  Release is O(holds per bucket).  :meth:`~RangeLock.hold` is the
``async with`` form.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

GRAIN_SHIFT = 20
GRAIN = 1 << GRAIN_SHIFT  # bytes per bucket of the index
WIDE = 64  # a range over more buckets than this is not indexed (compared with all)


class Hold:
    """One range ``[start, end)``; once registered, ``earlier`` are the overlapping
    holds it must wait for.  (A subclass that sets these attributes in its own
    ``__init__`` need not call this one.)"""

    __slots__ = ("earlier", "end", "first", "last", "released", "start", "waiters")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.earlier: list[Hold] | None = None
        self.first = self.last = -1  # the index buckets it is in (-1: not indexed)
        self.waiters: list[asyncio.Future[None]] | None = None
        self.released = False


class RangeLock:
    """Exclusive, FIFO-ordered locks on byte ranges."""

    def __init__(self) -> None:
        self._count = 0  # registered, not yet released
        self._index: dict[int, list[Hold]] = {}  # bucket -> its holds, in arrival order
        self._wide: list[Hold] = []  # holds too wide to index

    def __len__(self) -> int:
        return self._count

    def register(self, offset: int, length: int) -> Hold:
        """Register ``[offset, offset + length)`` now; :meth:`wait` before using it
        (needed only if ``hold.earlier``), :meth:`release` after (always)."""
        hold = Hold(offset, offset + length)
        self.add(hold)
        return hold

    def add(self, hold: Hold) -> None:
        """Register ``hold`` (new, its range set) now: :meth:`register` of a hold of
        the caller's."""
        offset, end = hold.start, hold.end
        first = offset >> GRAIN_SHIFT
        index = self._index
        self._count += 1
        if end > offset and (end - 1) >> GRAIN_SHIFT == first and not self._wide:
            # the hot path: a range in one bucket, no wide hold (a new hold's earlier
            # is None already)
            hold.first = hold.last = first
            holds = index.get(first)
            if holds is None:
                index[first] = [hold]
                return
            hold.earlier = [h for h in holds if h.start < end and offset < h.end] or None
            holds.append(hold)
            return
        last = (end - 1) >> GRAIN_SHIFT if end > offset else first  # (empty: its point)
        if last - first >= WIDE:  # every hold: the indexed ones (once each) and the wide
            every = {h: None for holds in index.values() for h in holds}
            hold.earlier = [h for h in (*every, *self._wide) if h.start < end
                            and offset < h.end] or None  # fmt: skip
            self._wide.append(hold)
            return
        hold.first, hold.last = first, last
        wide = self._wide
        if first == last:  # a range in one bucket (no duplicates), with wide holds
            holds = index.get(first)
            earlier = None
            for h in holds or ():
                if h.start < end and offset < h.end:
                    earlier = [h] if earlier is None else [*earlier, h]
            for h in wide:
                if h.start < end and offset < h.end:
                    earlier = [h] if earlier is None else [*earlier, h]
            hold.earlier = earlier
            if holds is None:
                index[first] = [hold]
            else:
                holds.append(hold)
            return
        buckets = range(first, last + 1)
        found: dict[Hold, None] = {}  # (a hold in two of the buckets is found twice)
        for b in buckets:
            for h in index.get(b, ()):
                if h.start < end and offset < h.end:
                    found[h] = None
        for h in wide:
            if h.start < end and offset < h.end:
                found[h] = None
        hold.earlier = list(found) if found else None
        for b in buckets:
            index.setdefault(b, []).append(hold)

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
        self._count -= 1
        first = hold.first
        index = self._index
        if first == hold.last >= 0:  # in one bucket, the common case: no loop
            holds = index[first]
            if len(holds) == 1:
                del index[first]
            else:
                holds.remove(hold)
        elif first < 0:
            self._wide.remove(hold)
        else:
            for b in range(first, hold.last + 1):
                holds = index[b]
                if len(holds) == 1:
                    del index[b]
                else:
                    holds.remove(hold)
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
