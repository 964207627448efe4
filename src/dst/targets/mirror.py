"""Mirroring over two or more legs (dm-raid1, RAID 1), degraded mode and resync primitives.

Theory of operation
-------------------
Each child is wrapped in a :class:`Leg` carrying its state, its in-flight count and
its I/O counters.  Mutations (WRITE, WRITE_ZEROES, TRIM) hold a :class:`RangeLock` on
their range while they fan out to every writable leg, so overlapping mutations reach
all legs in the same order and the legs never diverge.  FLUSH and FUA go to every
writable leg.  ``leg_timeout`` bounds every leg request: a leg that does not answer in
time is treated as failed (ETIMEDOUT).

Two modes:

* **Plain** (``MirrorDevice(legs)``): every writable leg must acknowledge a mutation; a
  leg that fails is marked failed and the request fails with EIO (:meth:`_settle`).
* **Tracked** (``region_size=`` and/or ``metadata=True``): an
  :class:`dst.targets.intent.IntentLog` keeps per-region write intent and per-leg
  out-of-sync sets (persisted on the members with ``metadata=True``).  A failing leg is
  marked FAILED and the mutation succeeds when at least one leg holding all its
  regions acknowledged (EIO otherwise, never a silent success); the regions the leg
  misses are recorded and, with metadata, made durable (generation rotation) before
  the write is acknowledged.

Reads go to the least busy leg that holds every region of the request (ties rotate);
a failed read is retried on the next leg *under the range lock* and the good data is
written back to the legs that failed (read repair), so no write can slip between the
good read and the repair.  Resync and verify work region by region under the range
lock (:meth:`resync_region`, :meth:`verify_region`); the engine that drives them, with
rate limits and progress, is :mod:`dst.array.resync`.  :meth:`readd` brings a failed leg
back after checking its generation (delta or full resync, split brain refused).

Membership changes (tracked mode): :meth:`add_leg`, :meth:`remove_leg` and
:meth:`replace_leg` run with the whole range locked and no metadata I/O in flight,
so leg indices can change at one point in time for the mirror, the intent log and
the tracker together.  A joining device is formatted as a new member and attached
with every region out of sync (writes at once, reads only of copied regions; the
background resync converges it); a leaving one is failed first (the survivors
rotate their generation) and its superblock made that of a one-leg array of its own.
Every member's superblock is then rewritten with its role, the member count and the
leg names, which is what assembly reads.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from dst.aio import TaskSet, run_all, timed
from dst.device import BlockDevice, Buffer, Cancel, Done, Extent, Health, IOCounters
from dst.errors import BlockError, ConfigError
from dst.meta.layout import (
    DEFAULT_CLEAR_DELAY,
    DEFAULT_REGION_SIZE,
    check_region_size,
    layout_for,
    member_size_for,
)
from dst.targets import fanout
from dst.targets.composite import intersect_caps
from dst.targets.intent import IntentLog, LegState, ReaddPlan
from dst.targets.rangelock import RangeLock

__all__ = ["Leg", "LegState", "MirrorDevice"]
log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Leg:
    """One mirror leg: its device, state and statistics."""

    dev: BlockDevice
    index: int
    state: LegState = LegState.IN_SYNC
    inflight: int = 0
    counters: IOCounters = field(default_factory=IOCounters)
    timeout: float | None = None
    reason: str = ""
    opened: bool = False

    @property
    def readable(self) -> bool:
        return self.state is not LegState.FAILED

    @property
    def writable(self) -> bool:
        return self.state is not LegState.FAILED

    async def run(self, op: Awaitable[Any]) -> Any:
        self.inflight += 1
        try:
            return await timed(op, self.timeout)
        except BlockError:
            self.counters.errors += 1
            raise
        finally:
            self.inflight -= 1

    def status(self) -> dict[str, Any]:
        return {
            "name": self.dev.name,
            "state": str(self.state),
            "reason": self.reason,
            "inflight": self.inflight,
            "counters": self.counters.as_dict(),
            "health": self.dev.health().state,
        }


LegOp = Callable[[Leg], Coroutine[Any, Any, None]]  # one leg's part of a mutation


class MirrorDevice(BlockDevice):
    """``legs`` mirrored (2 or more).

    The size is the smallest leg's; with ``metadata`` the smallest leg's data size
    (metadata sits at the end of each leg).  ``region_size`` (or ``metadata``) turns on
    region tracking and degraded mode; ``clear_delay`` is how long a region stays idle
    before its write-intent bit is cleared; ``leg_timeout`` bounds each leg request.
    """

    def __init__(
        self,
        legs: Sequence[BlockDevice],
        *,
        name: str = "mirror",
        region_size: int | None = None,
        metadata: bool = False,
        clear_delay: float = DEFAULT_CLEAR_DELAY,
        leg_timeout: float | None = None,
        array_uuid: uuid.UUID | None = None,
    ) -> None:
        if len(legs) < 2:
            raise ConfigError("a mirror needs at least two legs", where="legs")
        if len({id(d) for d in legs}) != len(legs):
            raise ConfigError("a device may appear only once in a mirror", where="legs")
        if leg_timeout is not None and leg_timeout <= 0:
            raise ConfigError("must be positive", where="leg_timeout")
        self.legs = [Leg(d, i, timeout=leg_timeout) for i, d in enumerate(legs)]
        self.leg_timeout = leg_timeout
        self.deadlines = fanout.Deadlines(leg_timeout) if leg_timeout else None
        self.locks = RangeLock()
        self.name = name
        self.size = 0
        self.tasks = TaskSet(name)
        self.io_ops = 0  # foreground requests so far (resync throttles on activity)
        self.resync_wanted = asyncio.Event()  # some attached leg misses regions
        self.resync_status: Callable[[], dict[str, Any]] | None = None
        self._reconfig = asyncio.Lock()  # membership changes vs resync bookkeeping
        self.intent: IntentLog | None = None
        if metadata or region_size is not None:
            rs = region_size or DEFAULT_REGION_SIZE
            try:
                check_region_size(rs)
            except ValueError as e:
                raise ConfigError(str(e), where="region_size") from e
            self.intent = IntentLog(
                legs, tasks=self.tasks, on_fail=self._on_intent_fail, region_size=rs,
                metadata=metadata, clear_delay=clear_delay, leg_timeout=leg_timeout,
                array_uuid=array_uuid, name=name,
            )  # fmt: skip
        self._next = 0  # rotates the read tie-break

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Open the legs (and load, check or create their metadata).

        Raises BlockError if a leg (plain mode) or every leg (tracked) cannot be
        opened; MetadataError for foreign, inconsistent or diverged members.
        """
        if self.intent is None:
            for leg in self.legs:
                await leg.dev.open()
                leg.opened = True
            self.size = min(leg.dev.size for leg in self.legs)
            self.caps = intersect_caps([leg.dev for leg in self.legs])
            return
        for leg in self.legs:
            try:
                await leg.dev.open()
                leg.opened = True
            except BlockError as e:
                log.warning("%s: leg %d (%s) did not open: %r", self.name, leg.index,
                            leg.dev.name, e)  # fmt: skip
        states = await self.intent.open([leg.opened for leg in self.legs])
        for leg, (state, why) in zip(self.legs, states, strict=True):
            leg.state, leg.reason = state, why
        self.size = self.intent.size
        self.caps = intersect_caps([leg.dev for leg in self.legs if leg.opened])
        self._want_resync()

    async def close(self) -> None:
        """Clean shutdown: background work (resync, lazy clear) stops, then the
        metadata is drained and marked clean.  I/O must have stopped."""
        await self.tasks.close()
        if self.intent is not None:
            await self.intent.close()
        for leg in self.legs:
            if leg.opened:
                await leg.dev.close()

    # -- policy and hooks ------------------------------------------------------------

    def leg_missed(self, leg: Leg, offset: int, length: int) -> None:
        """Hook (plain mode): ``leg`` did not get the mutation of ``[offset, +length)``."""

    def mark_failed(self, leg: Leg, exc: BaseException) -> None:
        if leg.state is not LegState.FAILED:
            log.warning("%s: leg %d (%s) failed: %r", self.name, leg.index, leg.dev.name, exc)
            leg.reason = repr(exc)
        leg.state = LegState.FAILED

    def _fail(self, leg: Leg, exc: BaseException) -> None:
        """Mark ``leg`` failed; with tracking, it stops getting writes (see settle)."""
        self.mark_failed(leg, exc)
        if self.intent is not None:
            self.intent.leg_down(leg.index)

    def _on_intent_fail(self, index: int, exc: BaseException) -> None:
        self.mark_failed(self.legs[index], exc)

    async def fail_leg(self, index: int) -> None:
        """Operator: take leg ``index`` out (maintenance).  Its misses are recorded.

        Raises ConfigError if it is the last leg in sync.
        """
        leg = self.legs[index]
        others = [x for x in self.legs if x is not leg and x.state is LegState.IN_SYNC]
        if leg.state is not LegState.FAILED and not others:
            raise ConfigError(f"leg {index} is the last leg in sync", where="node")
        self._fail(leg, BlockError(errno.ECANCELED, "failed by the operator"))
        if self.intent is not None:
            await self.intent.settle()

    def _settle(
        self, what: str, outcomes: list[tuple[Leg, BaseException | None]], offset: int, length: int
    ) -> None:
        """Plain-mode write policy: every writable leg must acknowledge.

        A leg that failed is marked failed and the request fails with EIO.
        """
        failed = [(leg, exc) for leg, exc in outcomes if exc is not None]
        if not outcomes:
            raise BlockError(errno.EIO, f"{self.name}: no leg to {what} to")
        if not failed:
            return
        if what == "zero" and all(_is_enotsup(exc) for _, exc in failed):
            raise BlockError(errno.ENOTSUP, "fast zero not supported")
        for leg, exc in failed:
            self.mark_failed(leg, exc)
            if length:
                self.leg_missed(leg, offset, length)
        raise BlockError(errno.EIO, f"{self.name}: {what} failed on {len(failed)} leg(s)")

    async def _run_legs(self, legs: list[Leg], op: LegOp) -> list[BaseException | None]:
        """Run ``op`` on every leg of ``legs`` at once, without a Task per leg
        (:func:`dst.aio.run_all`: every leg's request is issued before anything
        is awaited; one timer bounds them all by ``leg_timeout``).  Per leg, its
        BlockError or None; any other exception is a bug and propagates."""
        for leg in legs:
            leg.inflight += 1
        try:
            results = await run_all([op(leg) for leg in legs], limit=self.leg_timeout)
        finally:
            for leg in legs:
                leg.inflight -= 1
        for i, exc in enumerate(results):
            if exc is None:
                continue
            if isinstance(exc, TimeoutError):
                exc = results[i] = BlockError(
                    errno.ETIMEDOUT, f"no answer within {self.leg_timeout} s"
                )
            if not isinstance(exc, BlockError):
                raise exc
            legs[i].counters.errors += 1
        return results

    async def _fan_out(self, what: str, offset: int, length: int, op: LegOp) -> None:
        """Plain mode: run ``op`` on every writable leg, then :meth:`_settle`."""
        legs = []
        for leg in self.legs:
            if leg.writable:
                legs.append(leg)
            elif length:
                self.leg_missed(leg, offset, length)
        results = await self._run_legs(legs, op)
        self._settle(what, list(zip(legs, results, strict=True)), offset, length)

    async def _fan_out_degraded(
        self, what: str, regions: range | None, op: LegOp, missed: set[int]
    ) -> None:
        """Tracked mode: run ``op`` on every attached leg; succeed if a leg holding
        ``regions`` (all current legs for a flush) acknowledged, else EIO."""
        intent = self.intent
        assert intent is not None
        legs = [leg for leg in self.legs if leg.writable]
        if regions is None:
            holders = [leg.index in intent.current for leg in legs]
        else:
            holders = [intent.holds(leg.index, regions) for leg in legs]
        results = await self._run_legs(legs, op)
        held = False
        failed: list[tuple[Leg, BaseException]] = []
        for leg, exc, holder in zip(legs, results, holders, strict=True):
            if exc is not None:
                failed.append((leg, exc))
            elif holder:
                held = True
        if failed:
            self._degrade(what, len(legs), failed, missed)
        if intent.unsettled:
            await intent.settle()  # a leg this request skipped or lost is recorded
        if not held:
            raise BlockError(errno.EIO, f"{self.name}: {what} reached no leg in sync")

    def _degrade(
        self, what: str, nlegs: int, failed: list[tuple[Leg, BaseException]], missed: set[int]
    ) -> None:
        """Legs failed a mutation: fail them (recording what they miss), except for a
        fast zero that some legs cannot do (ENOTSUP, nothing failed)."""
        if what == "zero" and all(_is_enotsup(exc) for _, exc in failed):
            if len(failed) < nlegs:  # some legs zeroed: the others must get it
                missed.update(leg.index for leg, _ in failed)
                self.resync_wanted.set()
            raise BlockError(errno.ENOTSUP, "fast zero not supported")
        for leg, exc in failed:
            missed.add(leg.index)
            self._fail(leg, exc)

    async def _mutate(self, what: str, offset: int, length: int, op: LegOp) -> None:
        self.io_ops += 1
        locks = self.locks
        hold = locks.register(offset, length)  # arrival order, before any await
        try:
            if hold.earlier:
                await locks.wait(hold)
            intent = self.intent
            if intent is None:
                await self._fan_out(what, offset, length, op)
                return
            wid = await intent.begin_write(offset, length)
            missed: set[int] = set()
            done = False
            try:
                await self._fan_out_degraded(
                    what, intent.tracker.regions(offset, length), op, missed
                )
                done = True
            except BlockError:
                done = True
                raise
            finally:
                if not done:  # cancelled mid-way: legs may differ; keep the first
                    legs = sorted(intent.attached)
                    missed.update(legs[1:])
                    self.resync_wanted.set()
                intent.end_write(wid, missed)
        finally:
            locks.release(hold)

    # -- mutations -------------------------------------------------------------------

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        n = len(data)

        async def one(leg: Leg) -> None:
            await leg.dev.write(offset, data, fua=fua)
            leg.counters.writes += 1
            leg.counters.write_bytes += n

        await self._mutate("write", offset, n, one)

    # The callback fast path (dst.device; the steady state only: dst.targets.fanout).

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        return fanout.submit_write(self, offset, data, fua, done)

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        return fanout.submit_read(self, offset, length, done)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        if fast and not self.caps.fast_zero:
            raise BlockError(errno.ENOTSUP, "fast zero not supported by every leg")

        async def one(leg: Leg) -> None:
            await leg.dev.write_zeroes(offset, length, fua=fua, punch=punch, fast=fast)
            leg.counters.zeroes += 1

        await self._mutate("zero", offset, length, one)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        async def one(leg: Leg) -> None:
            await leg.dev.trim(offset, length, fua=fua)
            leg.counters.trims += 1

        await self._mutate("trim", offset, length, one)

    async def flush(self) -> None:
        async def one(leg: Leg) -> None:
            await leg.dev.flush()
            leg.counters.flushes += 1

        self.io_ops += 1
        if self.intent is None:
            await self._fan_out("flush", 0, 0, one)
        else:
            await self._fan_out_degraded("flush", None, one, set())

    # -- reads -----------------------------------------------------------------------

    def _read_order(self, regions: range | None = None) -> list[Leg]:
        """Legs that hold ``regions``, least busy first; ties rotate."""
        n = len(self.legs)
        start = self._next
        self._next = (start + 1) % n
        rotated = [self.legs[(start + i) % n] for i in range(n)]
        ok = [leg for leg in rotated if self._holds(leg, regions)]
        return sorted(ok, key=lambda leg: leg.inflight)

    def _holds(self, leg: Leg, regions: range | None) -> bool:
        if not leg.readable:
            return False
        return regions is None or self.intent is None or self.intent.holds(leg.index, regions)

    def _regions(self, offset: int, length: int) -> range | None:
        return self.intent.tracker.regions(offset, length) if self.intent else None

    async def _leg_read(self, leg: Leg, offset: int, length: int) -> Buffer:
        try:
            data: Buffer = await leg.run(leg.dev.read(offset, length))
        except BlockError as exc:
            log.info("%s: read failed on leg %d: %r", self.name, leg.index, exc)
            if exc.errno == errno.ETIMEDOUT:
                self._fail(leg, exc)  # hung: it gets nothing more
            raise
        leg.counters.reads += 1
        leg.counters.read_bytes += length
        return data

    async def read(self, offset: int, length: int) -> Buffer:
        self.io_ops += 1
        regions = self._regions(offset, length)
        order = self._read_order(regions)
        if not order and regions is not None and len(regions) > 1:
            return await self._read_split(offset, length)
        if not order:
            raise BlockError(errno.EIO, f"{self.name}: no leg holds this range")
        try:
            return await self._leg_read(order[0], offset, length)
        except BlockError as exc:
            return await self._read_repair(order[1:], [order[0]], offset, length, exc)

    async def _read_repair(
        self, rest: list[Leg], bad: list[Leg], offset: int, length: int, last: BlockError
    ) -> Buffer:
        """Retry on ``rest`` under the range lock; write the good data to ``bad``."""
        async with self.locks.hold(offset, length):
            regions = self._regions(offset, length)
            for leg in rest:
                if not self._holds(leg, regions):
                    continue
                try:
                    data = await self._leg_read(leg, offset, length)
                except BlockError as exc:
                    bad.append(leg)
                    last = exc
                    continue
                await self._repair(bad, offset, data)
                return data
        raise last

    async def _repair(self, bad: list[Leg], offset: int, data: Buffer) -> None:
        for leg in bad:
            if not leg.writable:
                continue
            try:
                await leg.run(leg.dev.write(offset, data))
            except BlockError as exc:
                self._fail(leg, exc)
                continue
            leg.counters.writes += 1
            leg.counters.write_bytes += len(data)
            log.info("%s: repaired %d bytes at %d on leg %d", self.name, len(data), offset,
                     leg.index)  # fmt: skip

    async def _read_split(self, offset: int, length: int) -> Buffer:
        """No leg holds the whole range: read it region by region."""
        assert self.intent is not None
        rs = self.intent.region_size
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            n = min(end, (pos // rs + 1) * rs) - pos
            out += await self.read(pos, n)
            pos += n
        return out

    async def cache(self, offset: int, length: int) -> None:
        for leg in self._read_order(self._regions(offset, length))[:1]:
            await leg.run(leg.dev.cache(offset, length))

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        last: BlockError | None = None
        for leg in self._read_order(self._regions(offset, length)):
            try:
                extents: Sequence[Extent] = await leg.run(leg.dev.block_status(offset, length))
                return extents
            except BlockError as exc:
                last = exc
        raise last or BlockError(errno.EIO, f"{self.name}: no readable leg")

    # -- resync primitives -----------------------------------------------------------

    def region_range(self, region: int, region_size: int | None = None) -> tuple[int, int]:
        """``(offset, length)`` of ``region`` (the last one may be short)."""
        rs = region_size or (self.intent.region_size if self.intent else DEFAULT_REGION_SIZE)
        off = region * rs
        return off, min(rs, self.size - off)

    def _want_resync(self) -> None:
        intent = self.intent
        if intent is not None and any(intent.missing(i) for i in intent.attached):
            self.resync_wanted.set()

    async def resync_region(self, region: int, targets: Sequence[int]) -> int:
        """Copy ``region`` from a leg holding it to the attached ``targets`` missing it.

        Holds the range lock and the region's resync lock, so writes to the region
        wait; returns the bytes written (per target summed).  Raises BlockError if no
        leg holding the region can be read.
        """
        intent = self._need_intent()
        off, n = self.region_range(region)
        async with self.locks.hold(off, n), intent.resync_lock(region) as synced:
            want = [self.legs[t] for t in targets
                    if t in intent.attached and not intent.in_sync(t, region)]  # fmt: skip
            if not want:
                return 0
            src = [x for x in self._read_order(range(region, region + 1)) if x not in want]
            data = await self._read_any(src, off, n)
            results = await asyncio.gather(*(_outcome(x, x.dev.write(off, data)) for x in want))
            for leg, exc in zip(want, results, strict=True):
                if exc is None:
                    synced.append(leg.index)
                else:
                    self._fail(leg, exc)
        if intent.unsettled:
            await intent.settle()
        return n * len(synced)

    async def _read_any(self, legs: list[Leg], offset: int, length: int) -> Buffer:
        last: BlockError = BlockError(errno.EIO, f"{self.name}: no leg holds this region")
        for leg in legs:
            try:
                return await self._leg_read(leg, offset, length)
            except BlockError as exc:
                last = exc
        raise last

    async def resync_checkpoint(self, region: int | None, targets: Sequence[int]) -> None:
        """Persist that ``targets`` hold every region below ``region`` (resumable)."""
        intent = self._need_intent()
        async with self._reconfig:  # legs gone since the resync began are left out
            await intent.set_resync_pos(region, [t for t in targets if t < len(self.legs)])

    async def resync_done(self, index: int) -> bool:
        """``index`` holds every region: make it a full member.  False if it does not."""
        intent = self._need_intent()
        async with self._reconfig:  # not while legs are renumbered
            if index >= len(self.legs) or index not in intent.attached or intent.missing(index):
                return False
            leg = self.legs[index]
            if index not in intent.current:
                await intent.leg_synced(index)
            if index in intent.current:
                leg.state, leg.reason = LegState.IN_SYNC, ""
                log.info("%s: leg %d (%s) is in sync", self.name, index, leg.dev.name)
            return leg.state is LegState.IN_SYNC

    async def readd(self, index: int, *, full: bool = False) -> ReaddPlan:
        """Bring failed leg ``index`` back: delta resync if its generation allows,
        full resync otherwise (or with ``full``).  The resync itself is run by
        :mod:`dst.array.resync` (``resync_wanted`` is set).

        Raises ConfigError (untracked mirror, leg not failed), BlockError (the leg
        cannot be opened) or MetadataError (foreign member, split brain).
        """
        intent = self._need_intent()
        leg = self.legs[index]
        if leg.state is not LegState.FAILED:
            raise ConfigError(f"leg {index} is {leg.state}, not failed", where="node")
        if intent.unsettled:
            await intent.settle()
        if not leg.opened:
            await leg.dev.open()
            leg.opened = True
        plan = await intent.readd(index, full=full)
        leg.state, leg.reason = LegState.RESYNCING, f"re-added: {plan.relation}"
        if not intent.missing(index):
            await self.resync_done(index)
        self._want_resync()
        return plan

    # -- membership changes ----------------------------------------------------------
    # Precondition of add_leg/remove_leg/replace_leg: no foreground I/O in flight (the
    # array daemon calls them with its root gate suspended).  Background work may run:
    # the whole range is locked (a resync copy in progress, or a late write, finishes
    # first; later ones wait), the resync's bookkeeping (resync_done/checkpoint) waits
    # for ``_reconfig``, and leg indices change only in IntentLog.reconfiguring (no
    # metadata batch or superblock write in flight), with self.legs renumbered at once.
    # They are serialised with each other; readd/fail_leg must not run concurrently.

    async def add_leg(self, dev: BlockDevice) -> int:
        """Grow the mirror by the leg ``dev`` live; returns its index (the last).

        ``dev`` is opened, formatted as a new member of this array (new member UUID,
        role = its index) and attached with every region out of sync: it gets every
        write at once and no read until a region was copied to it; the background
        resync (``resync_wanted``) copies the rest, then it is IN_SYNC.  Every member's
        superblock then says the new member count and leg names (for ``dst assemble``).

        Raises ConfigError (untracked mirror; ``dev`` already a leg, too small for the
        data plus metadata), BlockError or MetadataError (``dev`` cannot be opened,
        read or formatted: the mirror is unchanged).  A refused ``dev`` stays open.
        """
        intent = self._need_intent()
        await self._open_new(dev)
        async with self._reconfig, self.locks.hold(0, self.size):
            self._not_a_leg(dev)
            async with intent.reconfiguring():
                index = intent.grow(dev)
                leg = Leg(dev, index, LegState.FAILED, reason="joining", opened=True,
                          timeout=self.leg_timeout)  # fmt: skip
                self.legs.append(leg)
                try:
                    await self._join(leg)
                except BaseException:
                    await self._unjoin(leg)
                    intent.drop(index)
                    self.legs.pop()
                    raise
                await intent.write_members()
            await self._membership_changed()
        log.info("%s: leg %d (%s) added", self.name, index, dev.name)
        return index

    async def remove_leg(self, index: int) -> BlockDevice:
        """Shrink the mirror by leg ``index`` live; returns its device (not closed).

        The legs after it move down one index (their superblocks get the new role,
        member count and names).  If it was in sync the others start a new generation,
        and its superblock is rewritten as a one-leg array of its own (new array UUID,
        ``spec["removed_from"]``; its data, as of now, untouched): assembly and open
        refuse it next to the remaining members, and :meth:`add_leg` takes it as a new
        member.  Best effort for a dead leg (its old generation then marks it stale).

        Raises ConfigError: bad index; the mirror would keep fewer than two legs (the
        constructor's minimum: replace or fail the leg instead); it is the last leg in
        sync; a failed leg after it would be renumbered without being told (remove,
        re-add or replace that one first).
        """
        intent = self._need_intent()
        async with self._reconfig, self.locks.hold(0, self.size):
            self._check_remove(index)
            leg = self.legs[index]
            if leg.state is not LegState.FAILED:
                self._fail(leg, BlockError(errno.ECANCELED, "removed by the operator"))
            if intent.unsettled:
                await intent.settle()
            async with intent.reconfiguring():
                store = intent.drop(index)
                del self.legs[index]
                for i, x in enumerate(self.legs):
                    x.index = i
                leg.index = -1  # a late failure report about it changes nothing
                await intent.write_members()
            await self._membership_changed()
            await intent.retire(store)
        log.info("%s: leg %d (%s) removed", self.name, index, leg.dev.name)
        return leg.dev

    async def replace_leg(self, index: int, dev: BlockDevice) -> BlockDevice:
        """Put ``dev`` in place of leg ``index`` (same role) live; returns the old
        device (not closed).

        ``dev`` joins as in :meth:`add_leg` (new member, full resync from the legs in
        sync).  The old leg may be dead or FAILED (rebuild) or live: it then simply
        stops being a leg (nothing more is read from it); if it was in sync the others
        start a new generation.  Its superblock is marked as in :meth:`remove_leg`.

        Raises ConfigError (bad index; ``dev`` already a leg or too small; no other
        leg in sync to copy from), BlockError or MetadataError (``dev`` cannot be
        opened, read or formatted: the old leg stays, failed if it was live).
        """
        intent = self._need_intent()
        self._check_index(index)
        await self._open_new(dev)
        async with self._reconfig, self.locks.hold(0, self.size):
            self._not_a_leg(dev)
            old = self.legs[index]
            if not any(x.state is LegState.IN_SYNC for x in self.legs if x is not old):
                raise ConfigError(f"cannot replace leg {index}: no other leg is in sync to "
                                  "copy from", where="node")  # fmt: skip
            if old.state is not LegState.FAILED:
                self._fail(old, BlockError(errno.ECANCELED, "replaced by the operator"))
            if intent.unsettled:
                await intent.settle()
            async with intent.reconfiguring():
                store = intent.swap(index, dev)
                leg = self.legs[index] = Leg(dev, index, LegState.FAILED, reason="joining",
                                             opened=True, timeout=self.leg_timeout)  # fmt: skip
                try:
                    await self._join(leg)
                except BaseException:
                    await self._unjoin(leg)
                    intent.swap(index, old.dev, store)
                    self.legs[index] = old
                    raise
                old.index = -1
                await intent.write_members()
            await self._membership_changed()
            await intent.retire(store)
        log.info("%s: leg %d: %s replaced by %s", self.name, index, old.dev.name, dev.name)
        return old.dev

    async def _open_new(self, dev: BlockDevice) -> None:
        """Open a joining device and check it: ConfigError if it is a leg already
        (also reached another way: same member UUID) or too small."""
        intent = self._need_intent()
        self._not_a_leg(dev)
        await dev.open()
        rs = intent.region_size
        if intent.metadata:
            need = member_size_for(self.size, rs)
            try:
                ok = layout_for(dev.size, rs).data_size >= self.size
            except ValueError:
                ok = False
        else:
            need, ok = self.size, dev.size >= self.size
        if not ok:
            meta = " plus metadata" if intent.metadata else ""
            raise ConfigError(
                f"{dev.name or 'the new leg'} is too small: {dev.size} bytes; a leg of "
                f"{self.name!r} needs at least {need} ({self.size} bytes of data{meta})",
                where="node",
            )
        member = await intent.member_of(dev)
        if member is not None:
            raise ConfigError(f"{dev.name} is leg {member} of {self.name!r} already "
                              "(same member UUID)", where="node")  # fmt: skip

    def _not_a_leg(self, dev: BlockDevice) -> None:
        for x in self.legs:
            if x.dev is dev:
                raise ConfigError(f"{dev.name} is leg {x.index} already", where="node")

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.legs):
            raise ConfigError(f"no leg {index}: {self.name!r} has legs 0 to "
                              f"{len(self.legs) - 1}", where="node")  # fmt: skip

    def _check_remove(self, index: int) -> None:
        self._check_index(index)
        if len(self.legs) <= 2:
            raise ConfigError(f"cannot remove leg {index}: a mirror keeps at least two "
                              "legs (replace or fail it instead)", where="node")  # fmt: skip
        if not any(x.state is LegState.IN_SYNC for x in self.legs if x.index != index):
            raise ConfigError(f"leg {index} is the last leg in sync", where="node")
        for x in self.legs[index + 1 :]:
            if x.state is LegState.FAILED:
                raise ConfigError(f"leg {x.index} is failed and would change its role "
                                  "unbeknown to it: remove, re-add or replace it first",
                                  where="node")  # fmt: skip

    async def _join(self, leg: Leg) -> None:
        """Attach the new ``leg`` for a full resync (BlockError if it fails meanwhile)."""
        intent = self._need_intent()
        await intent.attach_new(leg.index)
        if leg.index not in intent.attached:
            raise BlockError(errno.EIO, f"{self.name}: {leg.dev.name} failed while "
                             f"joining: {leg.reason}")  # fmt: skip
        leg.state, leg.reason = LegState.RESYNCING, "new member: full resync"

    async def _unjoin(self, leg: Leg) -> None:
        """Undo :meth:`_join` (detach; nothing reports the leg any more)."""
        intent = self._need_intent()
        intent.leg_down(leg.index)
        await intent.quiet()

    async def _membership_changed(self) -> None:
        intent = self._need_intent()
        if intent.unsettled:
            await intent.settle()
        self.caps = intersect_caps([x.dev for x in self.legs if x.opened])
        self._want_resync()

    async def verify_region(
        self, region: int, *, region_size: int | None = None, repair_from: int | None = None
    ) -> bool:
        """Compare ``region`` on the legs that hold it; True if they differ.

        With ``repair_from`` (a leg index) the others are rewritten from that leg.
        """
        off, n = self.region_range(region, region_size)
        async with self.locks.hold(off, n):
            regions = self._regions(off, n)
            legs = [x for x in self.legs if self._holds(x, regions)]
            datas = [bytes(await self._leg_read(x, off, n)) for x in legs]
            if all(d == datas[0] for d in datas[1:]):
                return False
            log.warning("%s: legs differ in region %d", self.name, region)
            if repair_from is not None and self.legs[repair_from] in legs:
                src = datas[legs.index(self.legs[repair_from])]
                await self._repair([x for x, d in zip(legs, datas, strict=True) if d != src],
                                   off, src)  # fmt: skip
            return True

    def _need_intent(self) -> IntentLog:
        if self.intent is None:
            raise ConfigError("the mirror has no region tracking", where="region_size")
        return self.intent

    # -- status ----------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "mirror",
            "name": self.name,
            "members": [leg.dev.spec() for leg in self.legs],
        }
        if self.intent is not None:
            out["region_size"] = self.intent.region_size
        return out

    def health(self) -> Health:
        ok = sum(leg.state is LegState.IN_SYNC for leg in self.legs)
        live = sum(leg.readable for leg in self.legs)
        state = "ok" if ok == len(self.legs) else "degraded" if live else "failed"
        legs = [leg.status() for leg in self.legs]
        detail: dict[str, Any] = {"legs": legs}
        intent = self.intent
        if intent is not None and intent.ready:
            for leg, d in zip(self.legs, legs, strict=True):
                d["missing_regions"] = intent.missing(leg.index)
            detail["region_size"] = intent.region_size
            detail["dirty_regions"] = intent.tracker.bitmap.count()
        if self.resync_status is not None:
            detail["resync"] = self.resync_status()
        return Health(state, detail)

    def children(self) -> Sequence[BlockDevice]:
        return [leg.dev for leg in self.legs]


async def _outcome(leg: Leg, op: Awaitable[None]) -> BaseException | None:
    """Run ``op`` on ``leg``; its BlockError (or None) rather than raising."""
    try:
        await leg.run(op)
    except BlockError as exc:
        return exc
    return None


def _is_enotsup(exc: BaseException) -> bool:
    return isinstance(exc, BlockError) and exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
