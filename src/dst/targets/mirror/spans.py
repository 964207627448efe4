"""Span-wise, sparse resync and verify of a mirror: the units of the shared copier.

Theory of operation
-------------------
The array's resync and verify plan their work with :func:`dst.targets.copyplan.plan`:
runs of regions cut into *zero spans* (whole regions the source read as zeroes, up to
1 GiB) and *data spans* (up to 1 MiB).  Each span is done here under its byte range in
the mirror's :class:`~dst.targets.rangelock.RangeLock`: a write to the span waits and
a write that raced the plan is applied after the copy on every leg (DESIGN.md
semantics 4).  The plan is checked again under the lock, so a hole that got data meanwhile
is copied as data, never punched.

* :func:`resync_span` copies a span from a leg holding it to the attached targets that
  miss some of it: a zero span is one WRITE_ZEROES (holes punched) per target, a data
  span a read and a write, holes inside it punched (:func:`~dst.targets.copyplan.
  copy_sparse`).  The targets that got it hold the span
  (:meth:`~dst.targets.mirror.regionhash.RegionHash.synced`); a target that fails is
  failed.  Without one leg holding the whole span, it falls back to region by region
  (:func:`~dst.targets.mirror.recovery.resync_region`).
* :func:`verify_span` compares a span on the legs holding it: a zero span that every
  leg still reads as zeroes is equal without reading it; data is read and compared
  region by region, and may be repaired from one leg.

Both return what they moved (:class:`~dst.targets.copyplan.Moved`: bytes copied or
compared, bytes skipped as zeroes).
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dst.aio import gather_all
from dst.device import Buffer, Extent
from dst.errors import BlockError
from dst.targets.copyplan import (
    DATA_BYTES,
    Moved,
    Span,
    copy_sparse,
    region_by_region,
    zeroes_everywhere,
)
from dst.targets.mirror.core import MirrorCore
from dst.targets.mirror.legs import Leg, call_leg
from dst.targets.mirror.read import leg_read, leg_write, repair
from dst.targets.mirror.recovery import read_any, resync_region


def span_bytes(core: MirrorCore, span: Span) -> tuple[int, int]:
    """``(offset, length)`` of the regions of ``span`` (the last one may be short)."""
    rs = core.regions.region_size
    off = span.first * rs
    return off, min(span.stop * rs, core.size) - off


async def leg_status(core: MirrorCore, leg: Leg, offset: int, length: int) -> Sequence[Extent]:
    """Block status of ``leg`` (timed by the mirror's clock)."""
    extents: Sequence[Extent] = await call_leg(
        leg, core.deadlines, lambda c: c.run(c.leg.dev.block_status(offset, length))
    )
    return extents


async def leg_zero(core: MirrorCore, leg: Leg, offset: int, length: int) -> None:
    """Zero ``leg``'s range, punching holes where it can."""
    await call_leg(
        leg, core.deadlines, lambda c: c.run(c.leg.dev.write_zeroes(offset, length, punch=True))
    )
    leg.counters.zeroes += 1


async def all_zero(core: MirrorCore, legs: Sequence[Leg], offset: int, length: int) -> bool:
    """Every one of ``legs`` reads ``[offset, offset + length)`` as zeroes (by block
    status; a leg that cannot say counts as data)."""
    end = offset + length
    for leg in legs:
        if not leg.dev.caps.block_status:
            return False
        pos = offset
        while pos < end:
            extents = await leg_status(core, leg, pos, end - pos)
            if not extents:
                return False
            for e in extents:
                if not e.zero or e.length <= 0:
                    return False
                pos += e.length
                if pos >= end:
                    break
    return True


class _Targets:
    """The legs a span is copied to; a leg that fails gets nothing more."""

    def __init__(self, core: MirrorCore, legs: Sequence[Leg]) -> None:
        self.core = core
        self.legs = list(legs)
        self.failed: dict[int, BlockError] = {}

    async def _each(self, op: Callable[[Leg], Awaitable[Any]]) -> None:
        live = [x for x in self.legs if x.index not in self.failed]
        if not live:
            raise BlockError(errno.EIO, f"{self.core.name}: every target of the copy failed")
        results = await gather_all([_outcome(op(x)) for x in live])
        for leg, exc in zip(live, results, strict=True):
            if exc is not None:
                self.failed[leg.index] = exc

    async def write(self, offset: int, data: Buffer) -> None:
        await self._each(lambda x: leg_write(self.core, x, offset, data))

    async def zero(self, offset: int, length: int) -> None:
        await self._each(lambda x: leg_zero(self.core, x, offset, length))

    def finish(self) -> list[int]:
        """Fail the legs that failed; the indices of those that got everything (and
        are still attached: a leg failed meanwhile keeps missing the span)."""
        for leg in self.legs:
            exc = self.failed.get(leg.index)
            if exc is not None:
                self.core.fail(leg, exc)
        attached = self.core.regions.attached
        return [x.index for x in self.legs if x.index not in self.failed and x.index in attached]


async def _outcome(aw: Awaitable[Any]) -> BlockError | None:
    try:
        await aw
    except BlockError as exc:
        return exc
    return None


def _wanted(core: MirrorCore, targets: Sequence[int], regions: range) -> list[Leg]:
    rh = core.regions
    oos = rh.tracker.oos
    return [
        core.legs[t]
        for t in targets
        if t < len(core.legs)
        and t in rh.attached
        and oos[t].next_set(regions.start, regions.stop) is not None
    ]


async def resync_span(core: MirrorCore, span: Span, targets: Sequence[int]) -> Moved:
    """Copy ``span`` to the attached ``targets`` missing some of it (module docstring).

    Raises BlockError if no leg holding it can be read."""
    if not span.data:
        moved = await _zero_span(core, span, targets)
        if moved is not None:
            return moved
    step = max(1, DATA_BYTES // core.regions.region_size)
    copied = skipped = 0
    for r in range(span.first, span.stop, step):
        part = Span(r, min(step, span.stop - r))
        try:
            m = await _data_span(core, part, targets)
        except BlockError:
            if part.count == 1:
                raise
            m = await _by_region(core, part, targets)  # only the bad region stays missed
        copied, skipped = copied + m.copied, skipped + m.skipped
    return Moved(copied, skipped)


async def _by_region(core: MirrorCore, span: Span, targets: Sequence[int]) -> Moved:
    """Copy ``span`` a region at a time; raises the first region's error at the end."""
    return Moved(await region_by_region(span, lambda r: resync_region(core, r, targets)))


async def _zero_span(core: MirrorCore, span: Span, targets: Sequence[int]) -> Moved | None:
    """Punch a span the source still reads as zeroes; None if it does not any more."""
    off, n = span_bytes(core, span)
    regions = range(span.first, span.stop)
    async with core.locks.hold(off, n):
        want = _wanted(core, targets, regions)
        if not want:
            return Moved()
        src = [x for x in core.read_order(regions) if x not in want]
        if not src or not await all_zero(core, src[:1], off, n):
            return None
        to = _Targets(core, want)
        await to.zero(off, n)
        synced = to.finish()
        core.regions.synced(synced, regions)
    await core.settle()
    return Moved(0, n * len(synced))


async def _data_span(core: MirrorCore, span: Span, targets: Sequence[int]) -> Moved:
    off, n = span_bytes(core, span)
    regions = range(span.first, span.stop)
    async with core.locks.hold(off, n):
        want = _wanted(core, targets, regions)
        if not want:
            return Moved()
        src = [x for x in core.read_order(regions) if x not in want]
        synced: list[int] = []
        moved = Moved()
        if src:
            to = _Targets(core, want)
            moved = await copy_sparse(
                _status(core, src[0]),
                lambda o, k: read_any(core, src, o, k),
                to.write,
                to.zero,
                off,
                n,
            )
            synced = to.finish()
            core.regions.synced(synced, regions)
    if not src:  # no leg holds the whole span: region by region
        return await _by_region(core, span, targets)
    await core.settle()
    return Moved(moved.copied * len(synced), moved.skipped * len(synced))


def _status(core: MirrorCore, leg: Leg) -> Callable[[int, int], Awaitable[Sequence[Extent]]] | None:
    if not leg.dev.caps.block_status:
        return None
    return lambda o, k: leg_status(core, leg, o, k)


async def merged_status(core: MirrorCore, offset: int, length: int) -> Sequence[Extent]:
    """Block status that says zero only where every leg holding the range reads zeroes
    (a verify's plan: a region is skipped only if no leg has data there)."""
    rh = core.regions
    regions = rh.regions(offset, length)
    legs = [x for x in core.legs if core.holds(x, regions)]
    if not legs or not all(x.dev.caps.block_status for x in legs):
        return [Extent(length)]
    lists = [await leg_status(core, x, offset, length) for x in legs]
    return zeroes_everywhere(lists, length)


async def verify_span(
    core: MirrorCore, span: Span, *, repair_from: int | None = None
) -> tuple[Moved, list[int]]:
    """Compare ``span`` on the legs holding it; the regions that differ (rewritten
    from leg ``repair_from`` on the others, when given)."""
    off, n = span_bytes(core, span)
    regions = range(span.first, span.stop)
    if not span.data:
        async with core.locks.hold(off, n):
            legs = [x for x in core.legs if core.holds(x, regions)]
            if len(legs) < 2 or await all_zero(core, legs, off, n):
                return Moved(0, n), []
    step = max(1, DATA_BYTES // core.regions.region_size)
    compared, differ = 0, []
    for r in range(span.first, span.stop, step):
        m, d = await _verify_data(core, Span(r, min(step, span.stop - r)), repair_from)
        compared += m
        differ += d
    return Moved(compared, 0), differ


async def _verify_data(
    core: MirrorCore, span: Span, repair_from: int | None
) -> tuple[int, list[int]]:
    off, n = span_bytes(core, span)
    rs = core.regions.region_size
    regions = range(span.first, span.stop)
    async with core.locks.hold(off, n):
        legs = [x for x in core.legs if core.holds(x, regions)]
        if len(legs) < 2:
            return 0, []
        datas = [bytes(await leg_read(core, x, off, n)) for x in legs]
        differ = []
        for r in regions:
            a, b = r * rs - off, min((r + 1) * rs, off + n) - off
            if any(d[a:b] != datas[0][a:b] for d in datas[1:]):
                differ.append(r)
        if differ and repair_from is not None and core.legs[repair_from] in legs:
            src = datas[legs.index(core.legs[repair_from])]
            for r in differ:
                a, b = r * rs - off, min((r + 1) * rs, off + n) - off
                bad = [x for x, d in zip(legs, datas, strict=True) if d[a:b] != src[a:b]]
                await repair(core, bad, off + a, src[a:b])
    return n, differ
