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

Pacing (MD's ``speed_limit_min``/``max``): :class:`RateLimit` lets the copy run at
``max_rate`` bytes per second while the array is idle and at ``min_rate`` while
foreground requests arrive; both can be changed while it runs (0/None: unlimited).
One leg may have a limit of its own (``leg_limits``: the new leg of a ``dst replace
--rate``): the copies to it are paced by that limit instead of the mirror's, and a
region copied to several legs at once waits for each of their limits.

Restarts: every ``checkpoint_interval`` seconds the position is persisted
(``resync_pos`` in the superblocks, see :meth:`dst.targets.intent.IntentLog.set_resync_pos`);
a full resync interrupted by a daemon restart resumes there, a delta resync restarts
from the persisted bitmap, which only still holds the regions not yet copied.

:class:`Resyncer` runs resyncs in the mirror's task set whenever the mirror asks
(``resync_wanted``: a leg was re-added, or the array opened with legs to catch up).
:func:`verify` compares the legs region by region online and optionally repairs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError
from dst.targets.intent import LegState
from dst.targets.mirror import MirrorDevice

log = logging.getLogger(__name__)
DEFAULT_DEPTH = 8  # regions a resync copies at once
RATE_WINDOW = 5.0  # seconds of history behind the reported rate


class RateLimit:
    """Paces a copy: ``max_rate`` bytes/s when idle, ``min_rate`` under load."""

    def __init__(self, *, max_rate: float | None = None, min_rate: float | None = None) -> None:
        self.max_rate = max_rate
        self.min_rate = min_rate
        self._next = 0.0
        self._changed = asyncio.Event()

    def set(self, *, max_rate: float | None = None, min_rate: float | None = None) -> None:
        """Change the limits now (0 or None: unlimited); a waiting copy re-plans."""
        for v in (max_rate, min_rate):
            if v is not None and v < 0:
                raise ConfigError("a rate cannot be negative", where="rate")
        self.max_rate, self.min_rate = max_rate, min_rate
        self._next = 0.0
        self._changed.set()

    def rate(self, busy: bool) -> float | None:
        if busy and self.min_rate:
            return self.min_rate
        return self.max_rate or None

    async def pace(self, nbytes: int, busy: bool) -> None:
        """Account ``nbytes`` about to be copied; sleep to stay under the rate."""
        while True:
            rate = self.rate(busy)
            now = time.monotonic()
            if rate is None:
                self._next = now
                return
            start = max(self._next, now)
            if start <= now:
                self._next = start + nbytes / rate
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), start - now)


@dataclass(slots=True)
class _Meter:
    """Bytes per second over the last RATE_WINDOW seconds."""

    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def add(self, nbytes: int) -> None:
        now = time.monotonic()
        self.samples.append((now, nbytes))
        while self.samples and self.samples[0][0] < now - RATE_WINDOW:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        span = max(time.monotonic() - self.samples[0][0], 1e-3)
        return sum(n for _, n in self.samples) / span


class Resync:
    """One resync of ``mirror`` towards ``targets`` (default: every attached leg that
    misses regions).  :meth:`run` returns when they hold everything or cannot get more.
    ``limit`` paces it, but the copies to a leg in ``leg_limits`` (by device, read as
    the resync goes) are paced by that leg's limit."""

    def __init__(
        self,
        mirror: MirrorDevice,
        *,
        targets: Sequence[int] | None = None,
        limit: RateLimit | None = None,
        leg_limits: Mapping[BlockDevice, RateLimit] | None = None,
        checkpoint_interval: float = 1.0,
        depth: int = DEFAULT_DEPTH,
    ) -> None:
        if mirror.intent is None:
            raise ConfigError("the mirror has no region tracking", where="region_size")
        self.mirror = mirror
        self.intent = mirror.intent
        self.wanted = None if targets is None else set(targets)
        self.limit = limit or RateLimit()
        # The caller's mapping itself, not a copy: a leg's limit may come and go.
        self.leg_limits: Mapping[BlockDevice, RateLimit] = {} if leg_limits is None else leg_limits
        self.checkpoint_interval = checkpoint_interval
        self.depth = max(1, depth)  # regions copied at once
        self.state = "pending"
        self.targets: list[int] = []
        self.done = 0
        self.total = 0
        self.bytes = 0
        self.errors = 0
        self.position = 0
        self.started = 0.0
        self.finished = 0.0
        self._meter = _Meter()
        self.advanced = asyncio.Event()  # set after every region (status watchers)

    def _targets(self) -> list[int]:
        il = self.intent
        return [
            i
            for i in sorted(il.attached)
            if il.missing(i) and (self.wanted is None or i in self.wanted)
        ]

    def _todo(self, targets: Sequence[int]) -> Iterator[int]:
        """Regions some target misses, in increasing order (one bitmap page at a time)."""
        oos = self.intent.tracker.oos
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
        """
        self.state, self.started = "running", time.monotonic()
        last_ops = self.mirror.io_ops
        checkpoint_at = self.started + self.checkpoint_interval
        inflight: dict[asyncio.Task[None], int] = {}
        try:
            while targets := self._targets():
                self.targets = targets
                self.total = self.done + self._count(targets)
                errors = self.errors
                for r in self._todo(targets):
                    targets = [t for t in targets if t in self.intent.attached]
                    if not targets:
                        break
                    self.position = r
                    busy, last_ops = self.mirror.io_ops != last_ops, self.mirror.io_ops
                    _, n = self.mirror.region_range(r)
                    for limit, legs in self._limits(targets).items():
                        await limit.pace(n * legs, busy)
                    if time.monotonic() >= checkpoint_at:
                        low = min(inflight.values(), default=r)
                        await self.mirror.resync_checkpoint(low, targets)
                        checkpoint_at = time.monotonic() + self.checkpoint_interval
                    task = asyncio.ensure_future(self._copy(r, targets))
                    inflight[task] = r
                    if len(inflight) >= self.depth:
                        done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                        for finished in done:
                            del inflight[finished]
                if inflight:
                    await asyncio.wait(inflight)
                    inflight.clear()
                if self.errors > errors:
                    break  # unreadable regions: do not spin; a later resync retries
            for t in self.targets:
                await self.mirror.resync_done(t)
            await self.mirror.resync_checkpoint(None, self.targets)
            self.state = "failed" if self.errors else "done"
        except asyncio.CancelledError:
            self.state = "stopped"
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            raise
        finally:
            self.finished = time.monotonic()

    async def _copy(self, region: int, targets: Sequence[int]) -> None:
        try:
            copied = await self.mirror.resync_region(region, targets)
        except BlockError as e:
            log.error("%s: resync of region %d failed: %r", self.mirror.name, region, e)
            self.errors += 1
            return
        self.done += 1
        self.bytes += copied
        self._meter.add(copied)
        self.advanced.set()

    def progress(self) -> dict[str, Any]:
        """Status: state, targets, regions done/total, bytes, rate (B/s), ETA (s)."""
        rate = self._meter.rate()
        left = max(self.total - self.done, 0)
        region = self.intent.region_size
        eta = left * region * max(len(self.targets), 1) / rate if rate and left else None
        return {
            "state": self.state,
            "targets": list(self.targets),
            "regions_done": self.done,
            "regions_total": self.total,
            "percent": 100.0 * self.done / self.total if self.total else 100.0,
            "bytes": self.bytes,
            "rate": rate,
            "eta": eta,
            "position": self.position,
            "errors": self.errors,
            "elapsed": (self.finished or time.monotonic()) - self.started if self.started else 0.0,
            "max_rate": self.limit.max_rate,
            "min_rate": self.limit.min_rate,
        }


class Resyncer:
    """Runs a :class:`Resync` in the mirror's task set whenever the mirror wants one."""

    def __init__(
        self,
        mirror: MirrorDevice,
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
            try:
                await self.current.run()
            finally:
                self.last, self.current = self.current, None
                self.runs += 1


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
    mirror: MirrorDevice,
    *,
    repair: bool = False,
    source: int | None = None,
    max_rate: float | None = None,
    min_rate: float | None = None,
    region_size: int = 64 << 10,
    progress: Callable[[VerifyReport], None] | None = None,
) -> VerifyReport:
    """Compare the legs online, region by region; report the regions that differ.

    With ``repair`` the other legs are rewritten from ``source`` (default: the first
    leg in sync).  Raises ConfigError if ``source`` is not in sync, BlockError if a leg
    cannot be read.
    """
    if mirror.intent is not None:
        region_size = mirror.intent.region_size
    if repair:
        if source is None:
            source = next(x.index for x in mirror.legs if x.state is LegState.IN_SYNC)
        if mirror.legs[source].state is not LegState.IN_SYNC:
            raise ConfigError(f"leg {source} is not in sync", where="source")
    limit = RateLimit(max_rate=max_rate, min_rate=min_rate)
    report = VerifyReport(regions=-(-mirror.size // region_size))
    last_ops = mirror.io_ops
    for r in range(report.regions):
        _, n = mirror.region_range(r, region_size)
        busy, last_ops = mirror.io_ops != last_ops, mirror.io_ops
        await limit.pace(n, busy)
        differ = await mirror.verify_region(
            r, region_size=region_size, repair_from=source if repair else None
        )
        report.checked += 1
        report.bytes += n
        if differ:
            report.mismatched.append(r)
            if repair:
                report.repaired.append(r)
        if progress is not None:
            progress(report)
    return report
