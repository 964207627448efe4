"""Background resync and online verify of mirror legs.

Theory of operation
-------------------
A :class:`Resync` copies, region by region in increasing order, every region that one
of its *target* legs misses (the mirror's out-of-sync sets: what a failed leg missed,
everything for a full resync, or the dirty regions after a crash) from a leg that
holds it.  Each copy is :meth:`dst.targets.mirror.MirrorDevice.resync_region`: it holds
the region's range lock and resync lock, so writes to *that* region wait while writes
and reads elsewhere keep flowing, and a write that raced the copy is applied after it
on every leg.  When a pass ends, regions that were missed again meanwhile (a new
failure) are copied in a further pass; a target that misses nothing becomes a full
member (:meth:`~dst.targets.mirror.MirrorDevice.resync_done`: it adopts the current
generation; when every leg is in sync the bitmap generation is cleared).

The copy engine is the shared region copier (:class:`dst.targets.copier.Copier`, paced
by its :class:`~dst.targets.copier.RateLimit`: ``max_rate`` bytes per second while the
array is idle, ``min_rate`` while foreground requests arrive).  One leg may have a
limit of its own (``leg_limits``: the new leg of a ``dst replace
--rate``): the copies to it are paced by that limit instead of the mirror's, and a
region copied to several legs at once waits for each of their limits.

Restarts: every ``checkpoint_interval`` seconds the position is persisted
(``resync_pos`` in the superblocks, see
:meth:`dst.targets.mirror.dirtylog.DirtyLog.set_resync_pos`);
a full resync interrupted by a daemon restart resumes there, a delta resync restarts
from the persisted bitmap, which only still holds the regions not yet copied.

:class:`Resyncer` runs resyncs in the mirror's task set whenever the mirror asks
(``resync_wanted``: a leg was re-added, or the array opened with legs to catch up).
:func:`verify` compares the legs region by region online and optionally repairs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dst import changes
from dst.device import BlockDevice
from dst.errors import ConfigError
from dst.targets.copier import Copier, RateLimit
from dst.targets.mirror import LegState
from dst.targets.redundant import Redundant

log = logging.getLogger(__name__)
DEFAULT_DEPTH = 8  # regions a resync copies at once


class Resync:
    """One resync of ``mirror`` towards ``targets`` (default: every attached leg that
    misses regions).  :meth:`run` returns when they hold everything or cannot get more.
    ``limit`` paces it, but the copies to a leg in ``leg_limits`` (by device, read as
    the resync goes) are paced by that leg's limit."""

    def __init__(
        self,
        mirror: Redundant,
        *,
        targets: Sequence[int] | None = None,
        limit: RateLimit | None = None,
        leg_limits: Mapping[BlockDevice, RateLimit] | None = None,
        checkpoint_interval: float = 1.0,
        depth: int = DEFAULT_DEPTH,
    ) -> None:
        self.mirror = mirror
        self.regions = mirror.regions
        self.wanted = None if targets is None else set(targets)
        self.limit = limit or RateLimit()
        # The caller's mapping itself, not a copy: a leg's limit may come and go.
        self.leg_limits: Mapping[BlockDevice, RateLimit] = {} if leg_limits is None else leg_limits
        self.checkpoint_interval = checkpoint_interval
        self.depth = max(1, depth)  # regions copied at once
        self.targets: list[int] = []
        self.kind = ""  # full (a target is new or re-added in full) or delta, once known
        self.copier = Copier(
            name=f"{mirror.name}: resync",
            depth=depth,
            pace=self._pace,
            checkpoint=self._checkpoint,
            interval=checkpoint_interval,
        )
        self._last_ops = mirror.io_ops

    @property
    def state(self) -> str:
        return self.copier.state

    @property
    def done(self) -> int:
        return self.copier.done

    @property
    def bytes(self) -> int:
        return self.copier.bytes

    @property
    def errors(self) -> int:
        return self.copier.errors

    @property
    def advanced(self) -> asyncio.Event:
        """Set after every region (status watchers)."""
        return self.copier.advanced

    def _targets(self) -> list[int]:
        rh = self.regions
        return [
            i
            for i in sorted(rh.attached)
            if rh.missing(i) and (self.wanted is None or i in self.wanted)
        ]

    def _todo(self, targets: Sequence[int]) -> Iterator[int]:
        """Regions some target misses, in increasing order (one bitmap page at a time)."""
        oos = self.regions.tracker.oos
        bm = oos[0]
        for p in range(bm.npages):
            value = 0
            for t in targets:
                if oos[t].count():
                    value |= int.from_bytes(oos[t].page_bytes(p), "little")
            base = p * bm.page_bits
            while value:
                low = value & -value
                yield base + low.bit_length() - 1
                value ^= low

    def _count(self, targets: Sequence[int]) -> int:
        return sum(1 for _ in self._todo(targets))

    def _limits(self, targets: Sequence[int]) -> dict[RateLimit, int]:
        """The limits a copy to ``targets`` waits for, each with its number of targets."""
        legs = self.mirror.legs
        out: dict[RateLimit, int] = {}
        for t in targets:
            own = self.leg_limits.get(legs[t].dev) if t < len(legs) else None
            limit = self.limit if own is None else own
            out[limit] = out.get(limit, 0) + 1
        return out

    async def run(self) -> None:
        """Copy until the targets hold every region; then they become full members.

        Up to ``depth`` regions are copied at once (each under its own range and
        resync locks), in increasing order; the persisted resync position is the
        lowest region still being copied, so a restart redoes nothing that is not done.
        A pass that could not copy some region ends the resync (state ``failed``; a
        later resync retries) rather than spinning on it.
        """
        copier = self.copier
        while targets := self._targets():
            self.targets = targets
            legs = self.mirror.legs
            full = self.kind == "full" or any(legs[t].resync == "full" for t in targets)
            self.kind = "full" if full else "delta"
            copier.total = copier.done + self._count(targets)
            errors = copier.errors
            await copier.run(self._while_live(targets), self._region_bytes, self._copy)
            if copier.errors > errors:
                break  # unreadable regions: do not spin; a later resync retries
        for t in self.targets:
            await self.mirror.resync_done(t)
        await self.mirror.resync_checkpoint(None, self.targets)
        if copier.state == "pending":
            copier.state = "done"  # nothing was missing

    def _while_live(self, targets: Sequence[int]) -> Iterator[int]:
        """The regions ``targets`` miss, until none of them is attached any more."""
        for r in self._todo(targets):
            if not self._live(targets):
                return
            yield r

    def _region_bytes(self, region: int) -> int:
        return self.mirror.region_range(region)[1]

    async def _pace(self, region: int, nbytes: int) -> None:
        ops = self.mirror.io_ops
        busy, self._last_ops = ops != self._last_ops, ops
        targets = self._live(self.targets)
        for limit, legs in self._limits(targets).items():
            await limit.pace(nbytes * legs, busy)

    async def _checkpoint(self, region: int) -> None:
        await self.mirror.resync_checkpoint(region, self._live(self.targets))

    def _live(self, targets: Sequence[int]) -> list[int]:
        return [t for t in targets if t in self.regions.attached]

    async def _copy(self, region: int) -> int:
        targets = self._live(self.targets)
        if not targets:
            return 0
        return await self.mirror.resync_region(region, targets)

    def progress(self) -> dict[str, Any]:
        """Status: state, targets, regions done/total, bytes, rate (B/s), ETA (s)."""
        bpr = self.regions.region_size * max(len(self.targets), 1)
        return {
            **self.copier.progress(bytes_per_region=bpr),
            "kind": self.kind or "delta",
            "bytes_per_region": bpr,
            "targets": list(self.targets),
            "max_rate": self.limit.max_rate,
            "min_rate": self.limit.min_rate,
        }


class Resyncer:
    """Runs a :class:`Resync` in the mirror's task set whenever the mirror wants one."""

    def __init__(
        self,
        mirror: Redundant,
        *,
        max_rate: float | None = None,
        min_rate: float | None = None,
        checkpoint_interval: float = 1.0,
    ) -> None:
        self.mirror = mirror
        self.limit = RateLimit(max_rate=max_rate, min_rate=min_rate)
        self.leg_limits: dict[BlockDevice, RateLimit] = {}  # see limit_leg
        self.checkpoint_interval = checkpoint_interval
        self.current: Resync | None = None
        self.last: Resync | None = None
        self.runs = 0
        self.kind = "delta"  # of the current or last resync (once it had targets)
        self.finished: dict[str, int] = {"full": 0, "delta": 0, "sparse_skip": 0}
        self._idle = False
        self._changed = asyncio.Event()
        self.started = asyncio.Event()  # set when a resync starts (status, tests)

    def start(self) -> None:
        self.mirror.resync_status = self.progress
        self.mirror.tasks.spawn(self._loop(), name="resync")

    def set_rate(self, *, max_rate: float | None = None, min_rate: float | None = None) -> None:
        self.limit.set(max_rate=max_rate, min_rate=min_rate)

    def limit_leg(self, dev: BlockDevice, limit: RateLimit | None) -> None:
        """Pace the resync of the leg ``dev`` (a leg, or one about to be added) by
        ``limit`` instead of the mirror's limit, from its next region on; None: by the
        mirror's limit again.  The mirror's own limit is left as it is."""
        if limit is None:
            self.leg_limits.pop(dev, None)
        else:
            self.leg_limits[dev] = limit

    def progress(self) -> dict[str, Any]:
        r = self.current or self.last
        return r.progress() if r is not None else {"state": "idle"}

    async def wait_idle(self) -> None:
        """Return once no resync runs or is wanted (tests, shutdown)."""
        while not (self._idle and not self.mirror.resync_wanted.is_set()):
            self._changed.clear()
            await self._changed.wait()

    def _set_idle(self, idle: bool) -> None:
        self._idle = idle
        self._changed.set()

    async def _loop(self) -> None:
        wanted = self.mirror.resync_wanted
        while True:
            if not wanted.is_set():
                self._set_idle(True)
            await wanted.wait()
            self._set_idle(False)
            wanted.clear()
            self.current = Resync(
                self.mirror,
                limit=self.limit,
                leg_limits=self.leg_limits,
                checkpoint_interval=self.checkpoint_interval,
            )
            self.started.set()
            changes.changed()
            try:
                await self.current.run()
            finally:
                self._count(self.current)
                self.last, self.current = self.current, None
                self.runs += 1
                changes.changed()

    def _count(self, r: Resync) -> None:
        self.kind = r.kind or self.kind
        self.finished[self.kind] += r.bytes
        self.finished["sparse_skip"] += r.copier.skipped

    def bytes_by_kind(self) -> dict[str, int]:
        """Bytes copied by full and by delta resyncs, and bytes not copied because the
        source had holes (``sparse_skip``), so far: the running resync included."""
        out = dict(self.finished)
        r = self.current
        if r is not None:
            out[r.kind or self.kind] += r.bytes
            out["sparse_skip"] += r.copier.skipped
        return out


@dataclass(slots=True)
class VerifyReport:
    """Result of :func:`verify`."""

    regions: int = 0
    checked: int = 0
    bytes: int = 0
    mismatched: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "regions": self.regions,
            "checked": self.checked,
            "bytes": self.bytes,
            "mismatched": list(self.mismatched),
            "repaired": list(self.repaired),
        }


async def verify(
    mirror: Redundant,
    *,
    repair: bool = False,
    source: int | None = None,
    max_rate: float | None = None,
    min_rate: float | None = None,
    progress: Callable[[VerifyReport], None] | None = None,
) -> VerifyReport:
    """Compare the legs online, region by region; report the regions that differ.

    With ``repair`` the other legs are rewritten from ``source`` (default: the first
    leg in sync).  Raises ConfigError if ``source`` is not in sync, BlockError if a leg
    cannot be read.
    """
    if repair:
        if source is None:
            source = next(x.index for x in mirror.legs if x.state is LegState.IN_SYNC)
        if mirror.legs[source].state is not LegState.IN_SYNC:
            raise ConfigError(f"leg {source} is not in sync", where="source")
    limit = RateLimit(max_rate=max_rate, min_rate=min_rate)
    report = VerifyReport(regions=mirror.regions.nregions)
    last_ops = mirror.io_ops

    async def pace(region: int, nbytes: int) -> None:
        nonlocal last_ops
        busy, last_ops = mirror.io_ops != last_ops, mirror.io_ops
        await limit.pace(nbytes, busy)

    async def check(region: int) -> int:
        differ = await mirror.verify_region(region, repair_from=source if repair else None)
        _, n = mirror.region_range(region)
        report.checked += 1
        report.bytes += n
        if differ:
            report.mismatched.append(region)
            if repair:
                report.repaired.append(region)
        if progress is not None:
            progress(report)
        return n

    copier = Copier(name=f"{mirror.name}: verify", depth=1, pace=pace, stop_on_error=True)
    copier.total = report.regions
    await copier.run(range(report.regions), lambda r: mirror.region_range(r)[1], check)
    return report
