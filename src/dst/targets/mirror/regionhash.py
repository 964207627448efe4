"""The region hash of a redundant array (dm-region-hash): the async shell over the pure
:class:`~dst.meta.regions.RegionTracker`.

Theory of operation
-------------------
Every tracker call returns an :class:`~dst.meta.regions.Out` (or None: nothing to do);
:meth:`RegionHash._apply`
wakes the writes and resyncs it releases and runs its
:class:`~dst.meta.regions.MetaWrite`: one batch at a time, the bitmap pages written to
every *attached* leg through the dirty log (:mod:`dst.targets.mirror.dirtylog`), then
``persisted``.  A core log persists nothing, so its batches complete at once.

*Attached* legs get writes and bitmap pages (in sync or resyncing); the others are
*down* in the tracker and every region written meanwhile is recorded as missed by them.

Writes: :meth:`try_begin_write` registers a write that needs nothing (the hot path:
regions durably marked, no resync on them, array already marked dirty);
:meth:`begin_write` waits for what it needs.  Resync: :meth:`resync_lock` holds one
region against writes.  Lazy clear: a loop clears the bits of idle regions, after
flushing the attached legs when the log is persistent (a clear must never reach a
member before the data of its region).

A leg whose metadata write fails is reported to ``on_fail`` (the mirror fails it).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager

from dst.aio import TaskSet
from dst.errors import BlockError
from dst.meta.regions import Out, Regions, RegionTracker
from dst.targets.mirror.dirtylog import DirtyLog

FailHook = Callable[[int, BlockError], None]


class RegionHash:
    """Region state of one array over its dirty ``log`` (module docstring); the legs
    not ``attached`` are down from the start."""

    def __init__(self, log: DirtyLog, tracker: RegionTracker, attached: Iterable[int],
                 *, name: str) -> None:  # fmt: skip
        self.log = log
        self.tracker = tracker
        self.attached = set(attached)
        self.name = name
        self.region_size = tracker.region_size  # fixed for the tracker's life
        self._wid = 0
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._rs_waiters: dict[int, asyncio.Future[None]] = {}
        self._late: list[tuple[str, int]] = []  # grants nobody waits for any more
        self._idle = asyncio.Event()  # no bitmap batch in flight
        self._idle.set()
        self._loop = asyncio.get_running_loop()
        self._batches = TaskSet(f"{name}:bitmap")  # drained, not cancelled
        self._clear: asyncio.Task[None] | None = None
        self.bitmap_writes = 0  # metadata batches persisted (metrics)
        self.bitmap_pages = 0  # ... and the bitmap pages they wrote (to every attached leg)
        for leg in range(len(tracker.oos)):
            if leg not in self.attached:
                self._apply(tracker.leg_failed(leg))

    def start(self, tasks: TaskSet) -> None:
        """Start lazy clearing (in ``tasks``, the mirror's)."""
        self._clear = tasks.spawn(self._clear_loop(), name="lazy-clear")

    # --- queries -----------------------------------------------------------------------

    @property
    def nregions(self) -> int:
        return self.tracker.nregions

    def regions(self, offset: int, length: int) -> range:
        return self.tracker.regions(offset, length)

    def holds(self, leg: int, regions: range) -> bool:
        """May ``leg`` serve every region of ``regions``?"""
        t = self.tracker
        if leg in t.down:
            return False
        oos = t.oos[leg]
        return oos.empty() or oos.next_set(regions.start, regions.stop) is None

    def in_sync(self, leg: int, region: int) -> bool:
        return self.tracker.in_sync(leg, region)

    def missing(self, leg: int) -> int:
        """How many regions ``leg`` misses."""
        return self.tracker.oos[leg].count()

    def complete(self) -> bool:
        """No leg misses anything (and nothing is unsynced)."""
        t = self.tracker
        return not t.unsynced.count() and not any(o.count() for o in t.oos)

    def now(self) -> float:
        return self._loop.time()

    # --- writes ------------------------------------------------------------------------

    async def begin_write(self, offset: int, length: int) -> int:
        """Register a mutation; returns its id once its regions' marks are durable."""
        if self.log.needs_mark:
            await self.log.mark_dirty()
        self._wid += 1
        wid = self._wid
        t = self.tracker
        if not self._late and t.try_begin_write(wid, offset, length):
            return wid  # the hot path: every region already durably marked
        out = t.begin_write(wid, offset, length)
        if wid in out.writes:  # marks already durable: the common case, no future
            out.writes.remove(wid)
            self._apply(out)
            return wid
        fut = self._waiters[wid] = self._loop.create_future()
        self._apply(out)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted, then cancelled
                self.end_write(wid)
            raise
        return wid

    def try_begin_write(self, offset: int, length: int) -> int:
        """:meth:`begin_write` if it would not wait: the write's id; else 0, nothing
        registered."""
        if self._late or self.log.needs_mark:
            return 0
        wid = self._wid + 1
        if not self.tracker.try_begin_write(wid, offset, length):
            return 0
        self._wid = wid
        return wid

    def end_write(self, wid: int, missed: Iterable[int] = ()) -> None:
        """Write ``wid`` completed; ``missed`` are the legs it did not reach."""
        out = self.tracker.end_write(wid, self._loop.time(), missed=missed)
        if out is not None or self._late:  # (None, the common case: nothing released)
            self._apply(out or Out())

    @asynccontextmanager
    async def resync_lock(self, region: int) -> AsyncIterator[list[int]]:
        """Hold the resync lock of ``region``; append the legs that now hold it (and
        -1 when its redundancy was recomputed: it is no longer unsynced)."""
        fut = self._rs_waiters[region] = self._loop.create_future()
        self._apply(self.tracker.begin_resync(region))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._apply(self.tracker.end_resync(region, self.now()))
            raise
        synced_legs: list[int] = []
        try:
            yield synced_legs
        finally:
            consistent = -1 in synced_legs
            legs = [i for i in synced_legs if i >= 0]
            self._apply(self.tracker.end_resync(region, self.now(), synced=legs,
                                                consistent=consistent))  # fmt: skip

    def missed(self, leg: int, regions: Regions) -> None:
        """``leg`` does not hold ``regions`` (any more): they must be resynced to it (a
        ``range`` or a Bitmap is done a bitmap page at a time)."""
        self._apply(self.tracker.leg_missed(leg, regions))

    def unsynced(self, regions: Regions) -> None:
        """``regions`` need their redundancy recomputed (a parity array after a crash)."""
        self._apply(self.tracker.mark_unsynced(regions))

    def consistent(self, regions: range) -> bool:
        """No region of ``regions`` waits for its redundancy to be recomputed."""
        return self.tracker.unsynced.next_set(regions.start, regions.stop) is None

    def settled(self, regions: Regions) -> None:
        """``regions`` hold the same data on every leg: clear their bits lazily."""
        self.tracker.settled(regions, self.now())

    def synced(self, legs: Iterable[int], regions: range) -> None:
        """``legs`` got ``regions`` copied under the caller's range lock."""
        self.tracker.synced(legs, regions.start, regions.stop, self.now())

    # --- legs --------------------------------------------------------------------------

    def leg_down(self, leg: int) -> None:
        """``leg`` gets no more writes or bitmap pages; it misses what is in flight."""
        if leg in self.attached:
            self.attached.discard(leg)
            self._apply(self.tracker.leg_failed(leg))

    def readmit(self, leg: int) -> None:
        """Every leg had failed; ``leg`` failed last and holds every acknowledged write:
        attach it holding everything (its misses become the others'); writes wait
        until the whole bitmap is on it."""
        self.attached.add(leg)
        self._apply(self.tracker.leg_readmitted(leg))

    def attach(self, leg: int) -> None:
        """``leg`` gets writes again (what it missed stays missed until resynced)."""
        self.tracker.leg_attached(leg)
        self.attached.add(leg)

    def add_leg(self) -> int:
        """A new leg, down until :meth:`attach`; returns its index (the last)."""
        return self.tracker.add_leg()

    def remove_leg(self, leg: int) -> None:
        """Forget detached ``leg``; the legs after it move down one index."""
        assert leg not in self.attached
        self.attached = {i - (i > leg) for i in self.attached}
        self.tracker.remove_leg(leg, self.now())

    async def quiet(self) -> None:
        """Return when no bitmap batch is in flight (nothing will report a leg)."""
        while self.tracker.busy():
            await self._idle.wait()

    # --- close -------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop clearing lazily, clear every idle bit and persist the last batch."""
        if self._clear is not None:
            self._clear.cancel()
            await asyncio.gather(self._clear, return_exceptions=True)
        self._apply(self.tracker.due_clears(math.inf))
        await self._idle.wait()
        await self._batches.close()

    async def abort(self) -> None:
        """Stop without writing anything more (a simulated crash, for tests)."""
        await self._batches.close()
        if self._clear is not None:
            self._clear.cancel()

    # --- internals ---------------------------------------------------------------------

    def _apply(self, out: Out) -> None:
        """Wake what ``out`` releases; run its metadata batch (chained)."""
        if not (out.writes or out.resyncs or out.meta or self._late):
            return  # the common case: nothing released, nothing to persist
        while True:
            for wid in out.writes:
                self._grant(self._waiters.pop(wid), ("write", wid))
            for r in out.resyncs:
                self._grant(self._rs_waiters.pop(r), ("resync", r))
            if out.meta is not None and self.log.persistent and self.attached:
                self._idle.clear()
                self._batches.spawn(self._persist(out.meta.batch, out.meta.pages), name="batch")
                out = Out()
            elif out.meta is not None:
                out = self.tracker.persisted(out.meta.batch)
                continue
            if not self._late:
                break
            kind, key = self._late.pop()
            if kind == "write":
                out = self.tracker.end_write(key, self.now()) or Out()
            else:
                out = self.tracker.end_resync(key, self.now())
        if not self.tracker.busy():
            self._idle.set()

    def _grant(self, fut: asyncio.Future[None], late: tuple[str, int]) -> None:
        if fut.cancelled():  # the caller gave up while waiting: release at once
            self._late.append(late)
        else:
            fut.set_result(None)

    async def _persist(self, batch: int, pages: Mapping[int, bytes]) -> None:
        await self.log.write_pages(pages, sorted(self.attached))
        self.bitmap_writes += 1
        self.bitmap_pages += len(pages)
        self._apply(self.tracker.persisted(batch))
        if not self.tracker.busy():
            self._idle.set()

    async def _clear_loop(self) -> None:
        """Clear the bits of idle regions, lazily.  With a persistent log the attached
        legs are flushed first and only regions already idle when the flush started
        are cleared, so batches never need a flush of their own and marks keep
        flowing."""
        interval = max(0.01, min(1.0, self.tracker.clear_delay / 2))
        while True:
            await asyncio.sleep(interval)
            started = self.now()
            if self.log.persistent:
                if not self.tracker.clears_due(started):
                    continue
                await self.log.flush_legs(sorted(self.attached))
            self._apply(self.tracker.due_clears(started))
