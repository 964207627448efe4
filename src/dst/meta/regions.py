"""Write intent, out-of-sync tracking and resync locks per region (pure).

Theory of operation
-------------------
The data area is cut into regions of ``region_size`` bytes.  ``bitmap`` is the image
the members' on-disk bitmap must converge to: a bit is set while its region may differ
between legs — a write is or was recently in flight (write intent), or some leg missed
it (out of sync).  The tracker never does I/O; every call returns an :class:`Out`
saying which writes and resyncs may now proceed and, at most one at a time, a
:class:`MetaWrite` for the shell to persist on every live member before it calls
:meth:`RegionTracker.persisted` (:meth:`~RegionTracker.end_write` returns None when it
releases nothing, the common case: no object per write).

A region's life::

    CLEAN --first write--> MARKING --batch persisted--> DIRTY --idle >= clear_delay,
      ^                    (writes wait)                (writes     no leg out of sync-+
      |                                                  proceed)                       |
      +--------------------- bit cleared in the next batch <----------------------------+

* Batching (DRBD's activity log in spirit): only one MetaWrite is in flight.  Marks
  made while it is persisted join the next one, so a burst of writes costs one
  metadata write, not one per data write; a MetaWrite carries a snapshot of the
  changed 4 KiB bitmap pages, so later changes never leak into it and batches reach
  the disk in order.  Lazy clearing (:mod:`dst.meta.clearing`, with a delay that
  adapts per region) keeps hot regions dirty: steady writes to them need no metadata
  I/O at all.  The price is a bigger bitmap (more to resync after a crash) while a
  write pattern keeps revisiting regions.
* A write may proceed only when the mark of each of its regions is on disk and none
  of them is resynced (or waiting to be).  A write holds its regions from
  :meth:`begin_write` to :meth:`end_write`; held regions are never cleared.
* Per-leg out-of-sync bitmaps record what a failed leg misses: every region written
  while the leg is down, and those of writes in flight when it failed or that failed
  on it.  A region stays set in ``bitmap`` while any leg misses it.  On disk only the
  union is kept; which leg misses what is recovered from the generations of
  :mod:`dst.meta.superblock` (a BEHIND leg misses every set bit).
* Resync of a region takes its lock: it waits until no write is active there, and
  new writes to the region wait until :meth:`end_resync`.  A copy of a whole span of
  regions (the sparse copier's holes) is done under the caller's byte-range lock
  instead, and reported with :meth:`synced`.
* ``unsynced`` regions (MD's "resync" as opposed to "recovery") are those whose
  redundancy must be recomputed though no leg misses them: a parity array's regions
  that were dirty at a crash, whose parity may not match the data.  Like a missed
  region, an unsynced one keeps its bit until a resync says it is consistent
  (``end_resync(..., consistent=True)``).

Huge sets of regions (a full resync of a 1 TiB member is 16 Mi regions) are never
walked region by region: :meth:`leg_missed` and :meth:`settled` take a ``range`` or a
:class:`~dst.meta.bitmap.Bitmap` and work a bitmap page at a time (such marks are
tracked per page: a page being persisted holds back writes to its regions); spans of
settled regions are cleared lazily a page at a time (:mod:`dst.meta.clearing`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from dst.meta.bitmap import PAGE_BITS, Bitmap
from dst.meta.clearing import LazyClear
from dst.meta.layout import DEFAULT_CLEAR_DELAY

Regions = Iterable[int] | range | Bitmap  # a range or a Bitmap is handled in bulk
READY_MAX = 1 << 16  # regions remembered as ready for writes (4 GiB at 64 KiB regions)


@dataclass(frozen=True, slots=True)
class MetaWrite:
    """Write these bitmap pages (index -> 4 KiB) on every live member, then flush."""

    batch: int
    pages: Mapping[int, bytes]


@dataclass(slots=True)
class Out:
    """What the shell may do now: resume ``writes`` (ids), resyncs (regions), persist."""

    writes: list[int] = field(default_factory=list)
    resyncs: list[int] = field(default_factory=list)
    meta: MetaWrite | None = None


class RegionTracker:
    """Region state of one array with ``legs`` legs.

    ``bitmap`` is the on-disk bitmap as loaded: its set bits are taken as persisted,
    except in pages changed since (:meth:`Bitmap.changed_pages`), written first;
    ``clear_delay`` is how long a region stays idle before its bit is cleared.
    """

    def __init__(
        self,
        data_size: int,
        region_size: int,
        legs: int,
        *,
        clear_delay: float = DEFAULT_CLEAR_DELAY,
        bitmap: Bitmap | None = None,
        page_bits: int = PAGE_BITS,
        max_pages: int | None = None,
    ) -> None:
        self.region_size = region_size
        self.data_size = data_size
        self.nregions = -(-data_size // region_size)
        self.clear_delay = clear_delay
        self.bitmap = bitmap or Bitmap(self.nregions, page_bits=page_bits, max_pages=max_pages)
        assert self.bitmap.nbits == self.nregions
        self.oos = [
            Bitmap(self.nregions, page_bits=self.bitmap.page_bits, max_pages=max_pages)
            for _ in range(legs)
        ]
        self.down: set[int] = set()
        self.unsynced = Bitmap(self.nregions, page_bits=self.bitmap.page_bits, max_pages=max_pages)
        self._marking: dict[int, int] = {}  # region -> batch persisting its mark
        self._page_marking: dict[int, int] = {}  # page went full -> batch persisting it
        self._next = 1  # id of the batch being gathered
        self._inflight: int | None = None
        self._writes: dict[int, range] = {}  # write id -> its regions
        self._waiting: dict[int, None] = {}  # ids of writes not yet proceeding, in order
        self._held: dict[int, int] = {}  # region -> waiting + proceeding writes
        self._queued: dict[int, int] = {}  # region -> waiting writes (proceeding: the rest)
        self._resync: set[int] = set()
        self._resync_wait: dict[int, None] = {}
        # Regions a write may enter at once (mark durable, no resync): what
        # try_begin_write's check found, kept until something may change it -- emptied
        # where marks are made a page at a time or bits cleared, a region dropped when
        # its resync is asked for (a region is marked only while its bit is clear, so
        # never while in here); emptied too once READY_MAX (a 1 TiB array written all
        # over would otherwise remember millions).
        self._ready: set[int] = set()
        self.lazy = LazyClear(clear_delay)
        self._idle = self.lazy.regions  # region -> idle since (clear candidates)
        # Pages of ``bitmap`` changed since it was read (e.g. pages that went full in
        # memory when loaded) are not on disk yet: they go out with the first batch.
        for p in self.bitmap.changed_pages():
            self._page_marking[p] = self._next

    # --- queries -------------------------------------------------------------------

    def regions(self, offset: int, length: int) -> range:
        """Regions touched by ``[offset, offset + length)`` (length > 0)."""
        return range(offset // self.region_size, (offset + length - 1) // self.region_size + 1)

    def durable(self, region: int) -> bool:
        """True if the region's bit is set and that is persisted."""
        page = region // self.bitmap.page_bits
        return (
            self.bitmap.test(region)
            and region not in self._marking
            and page not in self._page_marking
        )

    def in_sync(self, leg: int, region: int) -> bool:
        """May ``leg`` serve reads of ``region``?"""
        return leg not in self.down and not self.oos[leg].test(region)

    def out_of_sync(self, leg: int) -> Iterator[int]:
        """Regions ``leg`` misses, in increasing order (what a resync must copy)."""
        return iter(self.oos[leg])

    def busy(self) -> bool:
        """True while a MetaWrite is being persisted."""
        return self._inflight is not None

    # --- writes --------------------------------------------------------------------

    def begin_write(self, wid: int, offset: int, length: int) -> Out:
        """Register write ``wid``; it may proceed once its id is in some ``Out.writes``."""
        assert wid not in self._writes
        regions = self._writes[wid] = self.regions(offset, length)
        for r in regions:
            self._held[r] = self._held.get(r, 0) + 1
            self._queued[r] = self._queued.get(r, 0) + 1
            self._idle.pop(r, None)
            self._mark(r)
            for leg in self.down:
                self.oos[leg].set(r)
        self._waiting[wid] = None
        return self._progress(wid)

    def try_begin_write(self, wid: int, offset: int, length: int) -> bool:
        """The fast path of :meth:`begin_write`: if write ``wid`` needs nothing -- every
        region's mark durable, none resynced or waiting to be -- register it as already
        proceeding and return True.  Otherwise register nothing and return False (call
        :meth:`begin_write`).  Nothing else can change: no bit is set, so no batch."""
        rs = self.region_size  # (regions(), inline: every write comes here)
        first = offset // rs
        last = (offset + length - 1) // rs
        ready = self._ready
        if first == last:  # within one region, the common case: no loops
            if first not in ready and not self._now_ready(first):
                return False
            self._writes[wid] = range(first, first + 1)
            held = self._held
            held[first] = held.get(first, 0) + 1
            if self._idle:
                self._idle.pop(first, None)
            for leg in self.down:
                self.oos[leg].set(first)
            return True
        regions = range(first, last + 1)
        for r in regions:
            if r not in ready and not self._now_ready(r):
                return False
        self._writes[wid] = regions
        held, idle = self._held, self._idle
        for r in regions:
            held[r] = held.get(r, 0) + 1
            if idle:
                idle.pop(r, None)
            for leg in self.down:
                self.oos[leg].set(r)
        return True

    def _now_ready(self, r: int) -> bool:
        """Is region ``r`` writable at once (:meth:`_writable`)?  Remembered if so."""
        if not self._writable(r):
            return False
        ready = self._ready
        if len(ready) >= READY_MAX:
            ready.clear()
        ready.add(r)
        return True

    def _writable(self, r: int) -> bool:
        """May a write enter region ``r`` at once (mark durable, no resync)?"""
        return r not in self._resync and r not in self._resync_wait and self.durable(r)

    def end_write(self, wid: int, now: float, *, missed: Iterable[int] = ()) -> Out | None:
        """Write ``wid`` completed; ``missed`` are legs it did not reach.  None: it
        releases nothing (the common case)."""
        regions = self._writes.pop(wid)
        assert wid not in self._waiting, "end_write of a write that never proceeded"
        if missed:
            for leg in missed:
                self.oos[leg].set_range(regions.start, regions.stop)
        held = self._held
        resync_wait = self._resync_wait
        for r in regions:
            n = held[r] - 1
            if n:
                held[r] = n
            else:
                del held[r]
                if r not in self._resync and r not in resync_wait:
                    self._idle[r] = now
        if not resync_wait:
            # Nothing to release: no bit or mark changed, and waiting writes wait on
            # marks and resyncs, not on other writes; only a resync waits for writes.
            return None
        return self._progress()

    # --- legs ----------------------------------------------------------------------

    def leg_failed(self, leg: int) -> Out:
        """``leg`` gets no more writes; it misses everything in flight and to come."""
        self.down.add(leg)
        for regions in self._writes.values():
            self.oos[leg].set_range(regions.start, regions.stop)
        return self._progress()

    def leg_attached(self, leg: int) -> None:
        """``leg`` gets writes again; what it missed stays out of sync until resynced."""
        self.down.discard(leg)

    def leg_missed(self, leg: int, regions: Regions) -> Out:
        """``leg`` misses ``regions`` (e.g. every set bit of a BEHIND member)."""
        if isinstance(regions, range) and regions.step == 1:
            if regions:
                self.oos[leg].set_range(regions.start, regions.stop)
                self._mark_pages(self.bitmap.set_range(regions.start, regions.stop))
            return self._progress()
        if isinstance(regions, Bitmap):
            self.oos[leg].update(regions)
            self._mark_pages(self.bitmap.update(regions))
            return self._progress()
        for r in regions:
            self._idle.pop(r, None)
            self._mark(r)
            self.oos[leg].set(r)
        return self._progress()

    def leg_readmitted(self, leg: int) -> Out:
        """Every leg had failed and ``leg``, the one that failed last, holds every
        acknowledged write: it is attached again holding every region; what it was
        recorded as missing (writes that reached no leg) the others miss too.  Every
        bitmap page is persisted again before a write proceeds (nothing was persisted
        while no leg was attached)."""
        mine = self.oos[leg]
        for i, o in enumerate(self.oos):
            if i != leg:
                o.update(mine)
        mine.clear_all()
        self.down.discard(leg)
        pages = range(self.bitmap.npages)
        self.bitmap.touch(pages)
        self._mark_pages(pages)
        return self._progress()

    def mark_unsynced(self, regions: Regions) -> Out:
        """``regions`` need their redundancy recomputed (their bits stay set until a
        resync says they are consistent); a Bitmap is done a page at a time."""
        if isinstance(regions, Bitmap):
            self.unsynced.update(regions)
            self._mark_pages(self.bitmap.update(regions))
            return self._progress()
        for r in regions:
            self._idle.pop(r, None)
            self._mark(r)
            self.unsynced.set(r)
        return self._progress()

    def settled(self, regions: Regions, now: float) -> None:
        """``regions`` hold the same data on every leg (e.g. bits loaded after a clean
        shutdown, or checked by a resync): let their bits be cleared lazily."""
        if isinstance(regions, range) and regions.step == 1:
            if regions:
                self.lazy.span(regions.start, regions.stop, now)
            return
        if isinstance(regions, Bitmap):
            pb = regions.page_bits
            pos = 0  # a span per run of pages holding bits (cleared a page at a time)
            while (first := regions.next_set(pos)) is not None:
                p = first // pb
                while p + 1 < regions.npages and not regions.page_empty(p + 1):
                    p += 1
                pos = min((p + 1) * pb, regions.nbits)
                self.lazy.span(first, pos, now)
            return
        idle = self._idle
        for r in regions:
            if r not in self._held and r not in self._resync and r not in self._resync_wait:
                idle.pop(r, None)
                idle[r] = now

    def synced(self, legs: Iterable[int], start: int, stop: int, now: float) -> None:
        """``legs`` now hold regions ``[start, stop)``, copied under the caller's range
        lock (no write was active there); their bits are cleared lazily."""
        for leg in legs:
            self.oos[leg].clear_range(start, stop)
        self.lazy.span(start, stop, now)

    # --- resync --------------------------------------------------------------------

    def begin_resync(self, region: int) -> Out:
        """Ask for the resync lock of ``region``: granted when it is in ``Out.resyncs``."""
        assert region not in self._resync and region not in self._resync_wait
        self._resync_wait[region] = None
        self._ready.discard(region)
        self._idle.pop(region, None)
        return self._progress()

    def end_resync(
        self, region: int, now: float, *, synced: Iterable[int] = (), consistent: bool = False
    ) -> Out:
        """Release the lock; ``synced`` legs now hold ``region``; ``consistent``: its
        redundancy was recomputed (it is no longer unsynced)."""
        self._resync.remove(region)
        for leg in synced:
            self.oos[leg].clear(region)
        if consistent:
            self.unsynced.clear(region)
        if region not in self._held:
            self._idle.pop(region, None)
            self._idle[region] = now
        return self._progress()

    # --- metadata ------------------------------------------------------------------

    def persisted(self, batch: int) -> Out:
        """MetaWrite ``batch`` is durable on every live member."""
        assert batch == self._inflight
        self._inflight = None
        self._marking = {r: b for r, b in self._marking.items() if b != batch}
        self._page_marking = {p: b for p, b in self._page_marking.items() if b != batch}
        return self._progress()

    def clears_due(self, now: float) -> bool:
        """Whether :meth:`due_clears` at ``now`` would consider some region."""
        return self.lazy.due(now)

    def due_clears(self, now: float) -> Out:
        """Clear the bits of regions idle for their clear delay (``clear_delay``, longer
        for regions that keep being marked again right after a clear) that every leg
        holds."""
        busy = (*self._held, *self._resync, *self._resync_wait, *self._marking)
        self.lazy.clear(self.bitmap, (*self.oos, self.unsynced), busy, now)
        self._ready.clear()  # (bits cleared: found again by the next writes)
        return self._progress()

    # --- internals -----------------------------------------------------------------

    def _mark(self, r: int) -> None:
        if self.bitmap.test(r):
            return
        self.lazy.marked_again(r)
        page = r // self.bitmap.page_bits
        self.bitmap.set(r)
        if self.bitmap.is_full(page):
            self._page_marking[page] = self._next
            self._ready.clear()
        else:
            self._marking[r] = self._next

    def _mark_pages(self, pages: Iterable[int]) -> None:
        """Bits of ``pages`` were set in bulk: the next batch persists them, and writes
        to their regions wait for it."""
        for p in pages:
            self._page_marking[p] = self._next
        self._ready.clear()

    def _may_write(self, regions: range) -> bool:
        return all(map(self._writable, regions))

    def _progress(self, new: int | None = None) -> Out:
        """Start a batch if none is in flight; hand out the resyncs and writes that may
        now proceed.  ``new``: only that write, just registered, can have become
        ready (registering one only adds marks and holds), so only it is checked: the
        cost of a write arriving stays flat however many wait for a batch (a greedy
        client's thousand writes to fresh regions would otherwise scan each other,
        quadratically)."""
        out = Out()
        if self._inflight is None:
            pages = self.bitmap.take_changed()
            if pages:
                self._inflight, self._next = self._next, self._next + 1
                out.meta = MetaWrite(self._inflight, pages)
        if new is None:
            held, queued = self._held, self._queued
            for r in list(self._resync_wait):
                if held.get(r, 0) == queued.get(r, 0):  # no write proceeding there
                    del self._resync_wait[r]
                    self._resync.add(r)
                    out.resyncs.append(r)
        for wid in list(self._waiting) if new is None else (new,):
            regions = self._writes[wid]
            if self._may_write(regions):
                del self._waiting[wid]
                queued = self._queued
                for r in regions:
                    n = queued[r] - 1
                    if n:
                        queued[r] = n
                    else:
                        del queued[r]
                out.writes.append(wid)
        return out

    # --- membership ----------------------------------------------------------------
    # The per-leg list ``oos`` is replaced, never changed in place, so that a resync
    # that took it before a membership change still sees one consistent list.

    def add_leg(self) -> int:
        """A new leg, down (it gets no writes) until :meth:`leg_attached`; returns its
        index (the last)."""
        bm = self.bitmap
        self.oos = [
            *self.oos,
            Bitmap(self.nregions, page_bits=bm.page_bits, max_pages=bm.max_pages),
        ]
        leg = len(self.oos) - 1
        self.down.add(leg)
        return leg

    def remove_leg(self, leg: int, now: float) -> None:
        """Forget ``leg`` (down); the legs after it move down one index.  The regions
        only it missed are clean again: their bits are cleared lazily."""
        assert leg in self.down
        gone = self.oos[leg]
        self.oos = [o for i, o in enumerate(self.oos) if i != leg]
        self.down = {i - (i > leg) for i in self.down if i != leg}
        self.settled(gone, now)
