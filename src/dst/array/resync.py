"""Background resync of the members of a mirror or parity array.

Theory of operation
-------------------
A :class:`Resync` copies every region that one of its *target* legs misses (the
mirror's out-of-sync sets: what a failed leg missed, everything for a full resync, or
the dirty regions after a crash) from a leg that holds it, in increasing order, and
makes every *unsynced* region consistent (one whose redundancy must be recomputed
though no member misses it: a parity array's after a crash).  The regions are walked
lazily as runs of the targets' out-of-sync bitmaps
(:func:`~dst.meta.bitmap.union_run`: a bitmap page at a time, whatever the device size)
and planned into spans by the target's ``copy_status`` (:func:`dst.targets.copyplan.plan`):
holes are punched on the targets, data is copied (DESIGN.md semantics 11), so time and
space follow the data, not the device size.  Each span is
:meth:`~dst.targets.redundant.Redundant.resync_span`: it holds the span's byte range, so
writes to *that* range wait while writes and reads elsewhere keep flowing, and a write
that raced the copy is applied after it on every leg.  When a pass ends, regions that
were missed again meanwhile (a new failure) are copied in a further pass; a target that
misses nothing becomes a full member (:meth:`~dst.targets.mirror.MirrorDevice.
resync_done`: it adopts the current generation; when every leg is in sync the bitmap
generation is cleared).  Progress says the kind (``full`` when the targets missed
everything, else ``delta``) and the bytes skipped as holes; a resync whose targets all
left ends ``stopped`` (the operator took them out) or ``failed`` (they failed), never
``done``.

The copy engine is the shared copier (:class:`dst.targets.copier.Copier`, paced by its
:class:`~dst.targets.copier.RateLimit`: ``max_rate`` bytes of data per second while the
array is idle, ``min_rate`` while foreground requests arrive).  One leg may have a
limit of its own (``leg_limits``: the new leg of a ``dst replace --rate``): the copies
to it are paced by that limit instead of the mirror's, and a span copied to several
legs at once waits for each of their limits.

Restarts: every ``checkpoint_interval`` seconds the position is persisted
(``resync_pos`` in the superblocks, see
:meth:`dst.targets.mirror.dirtylog.DirtyLog.set_resync_pos`);
a full resync interrupted by a daemon restart resumes there, a delta resync restarts
from the persisted bitmap, which only still holds the regions not yet copied.

:class:`Resyncer` runs resyncs in the mirror's task set whenever the mirror asks
(``resync_wanted``: a leg was re-added, or the array opened with legs to catch up).
The online verify is :mod:`dst.array.verify`, on the same copier.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dst import changes
from dst.device import BlockDevice
from dst.meta.bitmap import union_count, union_run
from dst.targets.copier import Copier, RateLimit
from dst.targets.copyplan import DATA_BYTES, Moved, Span, plan
from dst.targets.redundant import Redundant

log = logging.getLogger(__name__)
DEFAULT_DEPTH = 8  # spans a resync copies at once


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
        self.depth = max(1, depth)  # spans copied at once
        self.targets: list[int] = []
        self.note = ""  # why it ended early (a target left)
        self.copier = Copier(
            name=f"{mirror.name}: resync",
            depth=depth,
            pace=self._pace,
            checkpoint=self._checkpoint,
            interval=checkpoint_interval,
            region_size=self.regions.region_size,
        )
        self._last_ops = mirror.io_ops

    @property
    def state(self) -> str:
        return self.copier.state

    @property
    def kind(self) -> str:
        """``full`` (the targets missed every region) or ``delta``, once known."""
        return self.copier.kind

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
        """Set after every span (status watchers)."""
        return self.copier.advanced

    def _targets(self) -> list[int]:
        rh = self.regions
        return [
            i
            for i in sorted(rh.attached)
            if rh.missing(i) and (self.wanted is None or i in self.wanted)
        ]

    def _runs(self, targets: Sequence[int]) -> Iterator[tuple[int, int]]:
        """Runs of regions some live target misses or that are unsynced, in increasing
        order (lazily)."""
        pos = 0
        while self._alive(targets):
            tracker = self.regions.tracker  # oos replaced on membership changes: read afresh
            run = union_run([*(tracker.oos[t] for t in self._live(targets)), tracker.unsynced],
                            pos)  # fmt: skip
            if run is None:
                return
            yield run
            pos = run[1]

    def _alive(self, targets: Sequence[int]) -> bool:
        """Some target is still attached, or some region still unsynced."""
        return bool(self._live(targets)) or not self.regions.tracker.unsynced.empty()

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

        Up to ``depth`` spans are copied at once (each under its own range lock), in
        increasing order; the persisted resync position is the first region still being
        copied, so a restart redoes nothing that is not done.  A pass that could not
        copy some span ends the resync (state ``failed``; a later resync retries)
        rather than spinning on it; so does a pass whose targets all left.
        """
        copier = self.copier
        rh = self.regions
        while (targets := self._targets()) or not rh.tracker.unsynced.empty():
            self.targets = targets
            tracker = rh.tracker
            count = union_count([*(tracker.oos[t] for t in targets), tracker.unsynced])
            if not copier.kind:
                copier.kind = "full" if count >= rh.nregions else "delta"
            copier.total = copier.done + count
            errors = copier.errors
            alive = lambda: self._alive(self.targets)  # noqa: E731
            spans = plan(
                self._runs(targets), self.mirror.copy_status, region_size=rh.region_size,
                size=rh.tracker.data_size, alive=alive, data_bytes=self._span_bytes,
            )  # fmt: skip
            await copier.run(spans, self._copy, alive=alive)
            if copier.errors > errors:
                break  # unreadable regions: do not spin; a later resync retries
            if self._left(targets):
                break
            if not targets and rh.tracker.unsynced.count() >= count:
                log.error("%s: resync: no unsynced region became consistent", self.mirror.name)
                break  # never spin
        for t in self.targets:
            await self.mirror.resync_done(t)
        await self.mirror.resync_checkpoint(None, self.targets)
        if copier.state == "pending":
            copier.state = "done"  # nothing was missing

    def _span_bytes(self) -> int:
        """A data span under a rate limit holds about a quarter of a second of it (at
        least a region), so a copy keeps its rate smoothly, not in 1 MiB steps."""
        rates = [r for lim in self._limits(self._live(self.targets))
                 for r in (lim.max_rate, lim.min_rate) if r]  # fmt: skip
        if not rates:
            return DATA_BYTES
        return max(self.regions.region_size, min(DATA_BYTES, int(min(rates) // 4)))

    def _left(self, targets: Sequence[int]) -> bool:
        """True if every target of the pass left (failed or taken out): the resync
        ends ``stopped`` (by the operator) or ``failed``, saying why."""
        if not targets:  # only unsynced regions: nobody to leave
            return False
        gone = [t for t in targets if t not in self.regions.attached]
        legs = self.mirror.legs
        why = [f"leg {t} ({legs[t].dev.name}): {legs[t].reason}" for t in gone if t < len(legs)]
        if why:
            self.note = "; ".join(why)
            log.warning("%s: resync target left: %s", self.mirror.name, self.note)
        if len(gone) < len(targets):
            return False
        by_operator = all(t < len(legs) and "operator" in legs[t].reason for t in gone)
        self.copier.state = "stopped" if by_operator else "failed"
        return True

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

    async def _copy(self, span: Span) -> Moved:
        targets = self._live(self.targets)
        unsynced = self.regions.tracker.unsynced.next_set(span.first, span.stop) is not None
        if not targets and not unsynced:
            return Moved()
        return await self.mirror.resync_span(span, targets)

    def progress(self) -> dict[str, Any]:
        """Status: state, kind, targets, regions done/total, bytes, skipped, rate (B/s),
        ETA (s), and why it ended early (``error``)."""
        bpr = self.regions.region_size * max(len(self.targets), 1)
        out = {
            **self.copier.progress(bytes_per_region=bpr),
            "bytes_per_region": bpr,
            "targets": list(self.targets),
            "max_rate": self.limit.max_rate,
            "min_rate": self.limit.min_rate,
        }
        if self.note:
            out["error"] = self.note
        return out


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
