"""What every part of a mirror shares: its legs, region hash, dirty log and locks.

Theory of operation
-------------------
:class:`MirrorCore` is the state of one mirror and the few rules every part applies the
same way: how a leg fails (:meth:`MirrorCore.fail`: its state, the region hash and the
dirty log learn it at one point), which legs may serve a read of some regions
(:meth:`~MirrorCore.read_order`) and how the mirror is opened from its legs' metadata.
The parts -- the fan-out of mutations (:mod:`.fanout`), reads (:mod:`.read`), recovery
(:mod:`.recovery`) and membership changes (:mod:`.membership`) -- work on a core; the
block device the array sees is :class:`~dst.targets.mirror.device.MirrorDevice`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dst import changes
from dst.aio import TaskSet
from dst.device import BlockDevice, Capabilities
from dst.errors import BlockError, ConfigError
from dst.meta.bitmap import Bitmap
from dst.meta.layout import DEFAULT_REGION_SIZE, check_region_size
from dst.meta.regions import RegionTracker
from dst.targets.composite import intersect_caps
from dst.targets.mirror.dirtylog import DirtyLog, Opening
from dst.targets.mirror.disklog import DiskLog
from dst.targets.mirror.legs import Deadlines, Leg, LegState
from dst.targets.mirror.regionhash import RegionHash
from dst.targets.rangelock import RangeLock

log = logging.getLogger(__name__)


class MirrorCore:
    """The shared state of one mirror over ``devices`` (see :class:`MirrorDevice
    <dst.targets.mirror.device.MirrorDevice>` for the arguments)."""

    def __init__(
        self,
        devices: Sequence[BlockDevice],
        *,
        name: str,
        region_size: int | None,
        metadata: bool,
        clear_delay: float,
        leg_timeout: float | None,
        array_uuid: uuid.UUID | None,
        label: Mapping[str, Any] | None = None,
        layout: Mapping[str, Any] | None = None,
    ) -> None:
        if len(devices) < 2:
            raise ConfigError("a mirror needs at least two legs", where="legs")
        if len({id(d) for d in devices}) != len(devices):
            raise ConfigError("a device may appear only once in a mirror", where="legs")
        if leg_timeout is not None and leg_timeout <= 0:
            raise ConfigError("must be positive", where="leg_timeout")
        try:
            if region_size is not None:
                check_region_size(region_size)
        except ValueError as e:
            raise ConfigError(str(e), where="region_size") from e
        self.name = name
        self.legs = [Leg(d, i) for i, d in enumerate(devices)]
        self.leg_timeout = leg_timeout
        self.clear_delay = clear_delay
        kind = DiskLog if metadata else DirtyLog
        self.log: DirtyLog = kind(
            devices, region_size=region_size, name=name, array_uuid=array_uuid,
            leg_timeout=leg_timeout, on_fail=self.fail_index, layout=layout,
        )  # fmt: skip
        self.log.label = dict(label) if label else None
        self._regions: RegionHash | None = None
        self.rh: RegionHash = None  # type: ignore[assignment]  # set by open()
        self.deadlines = Deadlines(leg_timeout, lambda: self.legs) if leg_timeout else None
        self.locks = RangeLock()
        self.tasks = TaskSet(name)
        self.size = 0
        self.caps = Capabilities()
        self.io_ops = 0  # foreground requests so far (copies throttle on activity)
        self.resync_wanted = asyncio.Event()  # some attached leg misses regions
        self.resync_status: Callable[[], dict[str, Any]] | None = None
        self.reconfig = asyncio.Lock()  # membership changes vs resync bookkeeping
        self.rotation = 0  # the leg a read tie goes to first (it rotates)
        self.last_standing: Leg | None = None  # every leg failed: this one failed last
        self.readmitted = 0  # times the last-failed leg was taken back (recovery.readmit)

    @property
    def regions(self) -> RegionHash:
        assert self._regions is not None, "mirror used before open"
        return self._regions

    @property
    def ready(self) -> bool:
        return self._regions is not None

    # -- open and close ------------------------------------------------------------------

    async def open(self) -> None:
        """Open the legs, load (or create) the dirty log, set every leg's state.

        Raises BlockError if no leg can be opened, MetadataError for foreign,
        inconsistent or diverged members.
        """
        why: dict[int, str] = {}
        for leg in self.legs:
            try:
                await leg.dev.open()
                leg.opened = True
            except BlockError as e:
                why[leg.index] = e.message
                log.warning("%s: leg %d (%s) did not open: %r", self.name, leg.index,
                            leg.dev.name, e)  # fmt: skip
        if not any(leg.opened for leg in self.legs):
            raise BlockError(errno.EIO, f"{self.name}: no leg could be opened: "
                             + "; ".join(why.values()))  # fmt: skip
        op = await self.log.open([leg.opened for leg in self.legs])
        self.opening(op)
        self.size = op.size
        tracker = RegionTracker(op.size, op.region_size, len(self.legs),
                                clear_delay=self.clear_delay, bitmap=op.bitmap)  # fmt: skip
        attached = [i for i, (s, _) in enumerate(op.legs) if s is not LegState.FAILED]
        rh = self._regions = self.rh = RegionHash(self.log, tracker, attached, name=self.name)
        for leg, (state, reason) in zip(self.legs, op.legs, strict=True):
            leg.state, leg.reason = state, reason
            if leg.index in why:
                leg.reason = f"did not open: {why[leg.index]}"
        for i, regions in op.missing.items():
            rh.missed(i, regions)
        if op.crashed is not None:
            self.crashed(op.crashed)
        await self.log.adopt_bitmap(
            [x.index for x in self.legs if x.state is LegState.RESYNCING], tracker.bitmap
        )
        rh.settled(op.settled)
        rh.start(self.tasks)
        if op.stale:
            await self.log.settle()
        self.caps = intersect_caps([leg.dev for leg in self.legs if leg.opened])
        self.want_resync()

    def opening(self, op: Opening) -> None:
        """What the dirty log found, before anything is decided or written: a target
        that must refuse some starts raises MetadataError here (a parity array that is
        dirty and degraded at once).  A mirror takes every start."""

    def crashed(self, regions: Bitmap) -> None:
        """The daemon crashed with write intent on ``regions``: the legs may differ
        there.  A mirror resyncs them from the lowest current leg to the others."""
        for i in sorted(self.log.current)[1:]:
            self.regions.missed(i, regions)

    async def close(self) -> None:
        """Clean shutdown: background work stops, the last bitmap batch is written and
        the log marked clean.  I/O must have stopped."""
        await self.tasks.close()
        if self._regions is not None:
            await self._regions.close()
            await self.log.close()
        if self.deadlines is not None:
            self.deadlines.close()
        for leg in self.legs:
            if leg.opened:
                await leg.dev.close()

    # -- leg failures --------------------------------------------------------------------

    def fail(self, leg: Leg, exc: BaseException) -> None:
        """``leg`` failed: it gets nothing more; the regions it misses are recorded.

        A leg that did not answer in time has its connection dropped: a silent but
        live connection would never come back by itself, a new one is the reconnect
        and automatic re-add path (DESIGN.md semantics 10)."""
        if leg.state is not LegState.FAILED:
            log.warning("%s: leg %d (%s) failed: %r", self.name, leg.index, leg.dev.name, exc)
            leg.reason = repr(exc)
            leg.failures += 1
            changes.changed()
        if isinstance(exc, BlockError) and exc.errno == errno.ETIMEDOUT:
            leg.dev.reset(f"{leg.dev.name}: {exc.message}")
        leg.state = LegState.FAILED
        if leg.index < 0:
            return  # no longer a leg (removed or replaced meanwhile)
        if self.log.current == {leg.index}:  # the last leg in sync: it holds everything
            self.last_standing = leg
            leg.reason += ("; every leg has failed and this one failed last: it holds "
                           "every acknowledged write and comes back first")  # fmt: skip
            log.error("%s: no leg in sync is left; leg %d (%s) failed last", self.name,
                      leg.index, leg.dev.name)  # fmt: skip
        if self._regions is not None:
            self._regions.leg_down(leg.index)
        self.log.leg_down(leg.index)

    def fail_index(self, index: int, exc: BaseException) -> None:
        if 0 <= index < len(self.legs):
            self.fail(self.legs[index], exc)

    async def settle(self) -> None:
        """Make every leg failure so far durable (BlockError if no leg in sync is left)."""
        if self.log.unsettled:
            await self.log.settle()

    # -- reads ---------------------------------------------------------------------------

    def holds(self, leg: Leg, regions: range) -> bool:
        return leg.live and self.regions.holds(leg.index, regions)

    def read_order(self, regions: range) -> list[Leg]:
        """Legs that hold ``regions``, least busy first; ties rotate.  (Every read asks:
        :meth:`holds` inlined.)"""
        legs = self.legs
        n = len(legs)
        start = self.rotation % n
        self.rotation = (start + 1) % n
        t = self.regions.tracker
        down, oos, a, b = t.down, t.oos, regions.start, regions.stop
        failed = LegState.FAILED
        ok = []
        for i in range(n):
            leg = legs[(start + i) % n]
            j = leg.index
            if leg.state is not failed and j not in down:
                miss = oos[j]
                if miss.empty() or miss.next_set(a, b) is None:
                    ok.append(leg)
        if len(ok) > 1:
            ok.sort(key=_inflight)
        return ok

    # -- regions -------------------------------------------------------------------------

    def region_range(self, region: int, region_size: int | None = None) -> tuple[int, int]:
        """``(offset, length)`` of ``region`` (the last one may be short)."""
        rs = region_size or (self.regions.region_size if self.ready else DEFAULT_REGION_SIZE)
        off = region * rs
        return off, min(rs, self.size - off)

    def want_resync(self) -> None:
        rh = self._regions
        if rh is not None and (
            any(rh.missing(i) for i in rh.attached) or rh.tracker.unsynced.count()
        ):
            self.resync_wanted.set()

    def no_holder(self, what: str) -> BlockError:
        return BlockError(errno.EIO, f"{self.name}: {what} reached no leg in sync")


def _inflight(leg: Leg) -> int:
    return leg.inflight
