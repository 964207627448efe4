"""Write intent, out-of-sync tracking and member metadata of a mirror (the async shell).

Theory of operation
-------------------
:class:`IntentLog` wraps the pure :class:`dst.meta.regions.RegionTracker` and, with
``metadata=True``, one :class:`dst.meta.store.MetaStore` per leg.  Every tracker call
returns an :class:`~dst.meta.regions.Out`; :meth:`IntentLog._apply` wakes the writes and
resyncs it releases and runs its :class:`~dst.meta.regions.MetaWrite` (one batch at a
time, bitmap pages on every *attached* leg, then ``persisted``).  Without metadata the
same tracker runs in memory only (ENBD's behaviour): degraded mode and delta resync
work, but nothing survives a restart.

Legs are *attached* (they get writes and bitmap pages: in sync or resyncing) and, of
those, *current* (they hold the current generation: their superblocks are rewritten on
every state change).  A resync target becomes current when it adopts the generation
(:meth:`leg_synced`).

Durability rules (DESIGN.md 1-3, 5):

* The first mutation after a clean start writes ``State.DIRTY`` on every current leg.
* A write proceeds only once its regions' bits are on every attached leg.
* When a current leg fails, the survivors rotate their generation (the failed leg's
  generation becomes the bitmap generation, so its missed regions stay in the persisted
  bitmap until it is resynced).  Until that superblock write is durable
  (:meth:`settle`), no write that the failed leg missed is acknowledged: otherwise a
  crash could make the stale leg the resync source.
* A clean shutdown clears idle bits, persists the bitmap and writes ``State.CLEAN``.

:meth:`open` loads (or, on blank members, formats) the superblocks, picks the newest
generation and classifies every leg: current, resync target (delta from the bitmap or
full), or failed/refused.  After a crash (``DIRTY``) the dirty regions are marked out of
sync on every current leg but the lowest, which is the resync source.

Errors: :class:`MetadataError` for foreign, inconsistent or split-brain members;
:class:`dst.errors.BlockError` for I/O failures (a failing leg is reported through
``on_fail`` and dropped, it is not raised).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import math
import secrets
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

from dst.aio import TaskSet, timed
from dst.device import BlockDevice
from dst.errors import BlockError
from dst.meta.bitmap import PAGE_BITS, Bitmap
from dst.meta.layout import (
    BLOCK,
    DEFAULT_CLEAR_DELAY,
    DEFAULT_REGION_SIZE,
    MetaLayout,
    layout_for,
    sb_offsets,
)
from dst.meta.regions import Out, RegionTracker
from dst.meta.store import MetaStore
from dst.meta.superblock import (
    MAGIC,
    MetadataError,
    Relation,
    State,
    Superblock,
    adopt,
    compare,
    rotate,
    synced,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
BEST_EFFORT_TIMEOUT = 10.0  # seconds, superblock writes to failed or removed legs


class LegState(enum.StrEnum):
    IN_SYNC = "in_sync"
    RESYNCING = "resyncing"
    FAILED = "failed"


def new_generation(known: Iterable[int] = ()) -> int:
    avoid = set(known)
    while True:
        g = secrets.randbits(64)
        if g and g not in avoid:
            return g


@dataclass(frozen=True, slots=True)
class ReaddPlan:
    """What :meth:`IntentLog.readd` decided for a returning leg."""

    leg: int
    relation: str  # a Relation value, or "new" for a blank member, or "memory"
    full: bool
    regions: int  # regions to copy


FailHook = Callable[[int, BaseException], None]


class IntentLog:
    """Region state and member metadata of one mirror over ``devices``."""

    def __init__(
        self,
        devices: Sequence[BlockDevice],
        *,
        tasks: TaskSet,
        on_fail: FailHook,
        region_size: int = DEFAULT_REGION_SIZE,
        metadata: bool = True,
        clear_delay: float = DEFAULT_CLEAR_DELAY,
        leg_timeout: float | None = None,
        array_uuid: uuid.UUID | None = None,
        name: str = "mirror",
    ) -> None:
        self.devices = list(devices)
        self.tasks = tasks
        self.on_fail = on_fail
        self.region_size = region_size
        self.metadata = metadata
        self.clear_delay = clear_delay
        self.leg_timeout = leg_timeout
        self.array_uuid = array_uuid
        self.name = name
        self.stores = [MetaStore(d) for d in devices] if metadata else None
        self.size = 0
        self.attached: set[int] = set()
        self.current: set[int] = set()
        self.ref: Superblock | None = None  # the array's shared superblock fields
        self._tracker: RegionTracker | None = None
        self._wid = 0
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._rs_waiters: dict[int, asyncio.Future[None]] = {}
        self._late: list[tuple[str, int]] = []  # grants nobody waits for any more
        self._idle = asyncio.Event()
        self._idle.set()
        self._sb_lock = asyncio.Lock()
        self._stale_gen = False  # a current leg failed: rotation not yet persisted
        self._settled = asyncio.Event()
        self._settled.set()
        self._clear_task: asyncio.Task[None] | None = None
        self._meta_tasks = TaskSet(f"{name}:meta")  # batches: drained, not cancelled
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- queries -------------------------------------------------------------------

    @property
    def tracker(self) -> RegionTracker:
        assert self._tracker is not None, "IntentLog used before open"
        return self._tracker

    @property
    def ready(self) -> bool:
        """Opened: the tracker exists."""
        return self._tracker is not None

    @property
    def nregions(self) -> int:
        return self.tracker.nregions

    @property
    def resync_pos(self) -> int | None:
        return self.ref.resync_pos if self.ref is not None else None

    @property
    def unsettled(self) -> bool:
        """A leg failure is not yet durable in the survivors' superblocks."""
        return not self._settled.is_set()

    def in_sync(self, leg: int, region: int) -> bool:
        return self.tracker.in_sync(leg, region)

    def holds(self, leg: int, regions: range) -> bool:
        """May ``leg`` serve every region of ``regions``?"""
        t = self._tracker
        assert t is not None
        if leg in t.down:
            return False
        oos = t.oos[leg]  # no page allocated: empty (the tracker has no page limit)
        return not oos.allocated_pages() or not any(oos.test(r) for r in regions)

    def missing(self, leg: int) -> int:
        return self.tracker.oos[leg].count()

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # --- open and close ------------------------------------------------------------

    async def open(self, opened: Sequence[bool]) -> list[tuple[LegState, str]]:
        """Load or format metadata; the initial state of every leg (and why).

        Raises MetadataError (foreign or inconsistent members, split brain) or
        BlockError (no leg usable).
        """
        self._loop = asyncio.get_running_loop()
        if not any(opened):
            raise BlockError(errno.EIO, f"{self.name}: no leg could be opened")
        if self.stores is not None:
            states = await _Opener(self, opened).run()
        else:
            states = self._open_memory(opened)
            for i, (state, _) in enumerate(states):
                if state is LegState.FAILED:
                    self._apply(self.tracker.leg_failed(i))
        self._clear_task = self.tasks.spawn(self._clear_loop(), name="lazy-clear")
        if self._stale_gen:
            await self.settle()
        return states

    def _open_memory(self, opened: Sequence[bool]) -> list[tuple[LegState, str]]:
        sizes = [d.size for d, ok in zip(self.devices, opened, strict=True) if ok]
        self.size = min(sizes)
        self._tracker = RegionTracker(
            self.size, self.region_size, len(self.devices), clear_delay=self.clear_delay
        )
        self.attached = {i for i, ok in enumerate(opened) if ok}
        self.current = set(self.attached)
        return [
            (LegState.IN_SYNC, "") if ok else (LegState.FAILED, "did not open") for ok in opened
        ]

    async def close(self) -> None:
        """Clean shutdown: idle bits cleared, bitmap persisted, State.CLEAN written."""
        if self._clear_task is not None:
            self._clear_task.cancel()
            await asyncio.gather(self._clear_task, return_exceptions=True)
        if self._tracker is None:
            return
        self._apply(self.tracker.due_clears(math.inf))
        await self._idle.wait()
        if self.ref is not None and self.ref.state is State.DIRTY and self.current:
            await self._write_current(replace(self.ref, state=State.CLEAN))
        await self._meta_tasks.close()

    async def abort(self) -> None:
        """Stop without writing anything more (a simulated crash, for tests)."""
        await self._meta_tasks.close()
        if self._clear_task is not None:
            self._clear_task.cancel()

    # --- writes --------------------------------------------------------------------

    async def begin_write(self, offset: int, length: int) -> int:
        """Register a mutation; returns once its regions' marks are durable."""
        ref = self.ref
        if ref is not None and ref.state is State.CLEAN:
            await self._mark_dirty()
        self._wid += 1
        wid = self._wid
        t = self._tracker
        assert t is not None
        if not self._late and t.try_begin_write(wid, offset, length):
            return wid  # the hot path: every region already durably marked
        out = t.begin_write(wid, offset, length)
        if wid in out.writes:  # marks already durable: the common case, no future
            out.writes.remove(wid)
            self._apply(out)
            return wid
        fut = self._waiters[wid] = asyncio.get_running_loop().create_future()
        self._apply(out)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted, then cancelled
                self.end_write(wid)
            raise
        return wid

    def try_begin_write(self, offset: int, length: int) -> int:
        """:meth:`begin_write` if it would not wait (the metadata is dirty already and
        every region durably marked): the write's id; else 0, nothing registered."""
        ref = self.ref
        t = self._tracker
        if t is None or self._late or (ref is not None and ref.state is State.CLEAN):
            return 0
        wid = self._wid + 1
        if not t.try_begin_write(wid, offset, length):
            return 0
        self._wid = wid
        return wid

    def end_write(self, wid: int, missed: Iterable[int] = ()) -> None:
        t = self._tracker
        assert t is not None and self._loop is not None
        self._apply(t.end_write(wid, self._loop.time(), missed=missed))

    @asynccontextmanager
    async def resync_lock(self, region: int) -> AsyncIterator[list[int]]:
        """Hold the resync lock of ``region``; append the legs that now hold it."""
        fut = self._rs_waiters[region] = asyncio.get_running_loop().create_future()
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
            self._apply(self.tracker.end_resync(region, self.now(), synced=synced_legs))

    def missed(self, leg: int, regions: Iterable[int]) -> None:
        """``leg`` (attached) does not hold ``regions`` any more: resync them."""
        self._apply(self.tracker.leg_missed(leg, regions))

    # --- legs ----------------------------------------------------------------------

    def leg_down(self, leg: int) -> None:
        """``leg`` failed: no more writes or metadata; remember to rotate (see settle)."""
        if leg not in self.attached:
            return
        self.attached.discard(leg)
        if leg in self.current:
            self.current.discard(leg)
            if self.metadata:
                self._stale_gen = True
                self._settled.clear()
        self._apply(self.tracker.leg_failed(leg))

    async def settle(self) -> None:
        """Make every leg failure so far durable (generation rotation on survivors).

        Raises BlockError(EIO) if no current leg is left.
        """
        async with self._sb_lock:
            while self._stale_gen and self.current:
                self._stale_gen = False
                assert self.ref is not None
                ref = rotate(self.ref, new_generation(self._known()))
                await self._write_current_locked(replace(ref, resync_pos=None))
            if not self.current:
                raise BlockError(errno.EIO, f"{self.name}: no leg in sync is left")
            self._settled.set()

    async def readd(self, leg: int, *, full: bool = False) -> ReaddPlan:
        """Attach a failed ``leg`` again and mark what it must get (delta or full).

        Raises MetadataError for a foreign member (another array), a member with
        another role, a diverged member (split brain) or one ahead of the array,
        unless ``full`` (the operator discards that member's data).
        """
        assert leg not in self.attached
        t = self.tracker
        if self.stores is None:
            regions = set(range(t.nregions)) if full else set(t.out_of_sync(leg))
            plan = ReaddPlan(leg, "memory", full, len(regions))
        else:
            plan, regions = await self._readd_plan(leg, full)
        t.leg_attached(leg)
        self.attached.add(leg)
        if self.stores is not None:
            await self._write_whole_bitmap(leg)
        self.missed(leg, sorted(regions))
        log.info("%s: leg %d re-added (%s), %d regions to copy", self.name, leg,
                 plan.relation, plan.regions)  # fmt: skip
        return plan

    async def _readd_plan(self, leg: int, full: bool) -> tuple[ReaddPlan, set[int]]:
        assert self.stores is not None and self.ref is not None
        t, ref = self.tracker, self.ref
        store = self.stores[leg] = MetaStore(self.devices[leg])
        if await self._blank(leg):
            await self._format(leg, new_generation(self._known()))
            return ReaddPlan(leg, "new", True, t.nregions), set(range(t.nregions))
        try:
            sb = await timed(store.load(), self.leg_timeout)
        except MetadataError as e:
            if not full:
                raise MetadataError(f"{self.name}: leg {leg}: {e}; re-add with full resync "
                                    "to overwrite it") from e  # fmt: skip
            await self._format(leg, new_generation(self._known()))
            return ReaddPlan(leg, "new", True, t.nregions), set(range(t.nregions))
        self._check_member(leg, sb)
        rel = compare(ref, sb)
        if rel in (Relation.DIVERGED, Relation.AHEAD, Relation.AHEAD_FULL) and not full:
            raise MetadataError(
                f"{self.name}: leg {leg} ({self.devices[leg].name}) is {rel.value} from the "
                "array (split brain): it holds writes the array does not; re-add it with a "
                "full resync to discard them, or assemble the array from it"
            )
        if full or rel not in (Relation.SAME, Relation.BEHIND):
            return ReaddPlan(leg, rel.value, True, t.nregions), set(range(t.nregions))
        # What it missed is known exactly: since it failed (or, if it was absent when
        # the array started, since every bit then set) no region it misses was cleared.
        regions = set(t.out_of_sync(leg))
        return ReaddPlan(leg, rel.value, False, len(regions)), regions

    # --- membership changes --------------------------------------------------------

    @asynccontextmanager
    async def reconfiguring(self) -> AsyncIterator[None]:
        """Hold the superblock lock with no bitmap batch in flight: until the body's
        first await nothing holds a leg index, so the body may renumber legs (then
        the mirror renumbers its own at once).  Do not :meth:`settle` in the body."""
        async with self._sb_lock:
            await self.quiet()
            yield

    async def quiet(self) -> None:
        """Return when no bitmap batch is in flight (nothing will report a leg)."""
        while self.tracker.busy():
            await self._idle.wait()

    def grow(self, device: BlockDevice) -> int:
        """Append ``device`` as a new leg, detached until :meth:`attach_new`; its index.
        Call in :meth:`reconfiguring`."""
        self.devices.append(device)
        if self.stores is not None:
            self.stores.append(MetaStore(device))
        return self.tracker.add_leg()

    def swap(
        self, leg: int, device: BlockDevice, store: MetaStore | None = None
    ) -> MetaStore | None:
        """Put ``device`` (with ``store``, or a new one) in place of detached ``leg``;
        returns the old device's store.  Call in :meth:`reconfiguring`."""
        assert leg not in self.attached
        self.devices[leg] = device
        if self.stores is None:
            return None
        old, self.stores[leg] = self.stores[leg], store or MetaStore(device)
        return old

    def drop(self, leg: int) -> MetaStore | None:
        """Forget detached ``leg``; the legs after it move down one index.  Returns its
        store.  Call in :meth:`reconfiguring`."""
        assert leg not in self.attached and len(self.devices) > 1
        self.devices.pop(leg)
        store = self.stores.pop(leg) if self.stores is not None else None
        self.attached = {i - (i > leg) for i in self.attached}
        self.current = {i - (i > leg) for i in self.current}
        self.tracker.remove_leg(leg, self.now())
        return store

    async def attach_new(self, leg: int) -> None:
        """Format ``leg`` (grown or swapped in) as a new member of this array and attach
        it with every region out of sync (full resync); returns once those marks are
        durable.  If the leg fails meanwhile it is detached again (``on_fail``).

        Raises BlockError or MetadataError if it cannot be formatted (still detached).
        """
        assert leg not in self.attached
        t = self.tracker
        if self.stores is not None:
            await self._format(leg, new_generation(self._known()))
        t.leg_attached(leg)
        self.attached.add(leg)
        if self.stores is not None:
            await self._write_whole_bitmap(leg)
        self.missed(leg, range(t.nregions))
        await self.quiet()
        log.info("%s: leg %d (%s) joins, %d regions to copy", self.name, leg,
                 self.devices[leg].name, t.nregions)  # fmt: skip

    async def write_members(self) -> None:
        """After a membership change (in :meth:`reconfiguring`): every member's
        superblock gets its role (its index), the member count and the leg names; the
        bitmap generation is dropped if every leg is now in sync.  A leg that fails
        this is dropped (settle afterwards); a failed leg is written if it can be."""
        if self.stores is None or self.ref is None:
            return
        n, t = len(self.devices), self.tracker
        spec = {**self.ref.spec, "legs": n, "names": [d.name for d in self.devices]}
        ref = replace(self.ref, member_count=n, spec=spec, events=self.ref.events + 1)
        if len(self.current) == n and not any(o.count() for o in t.oos):
            ref = synced(ref)
        self.ref = ref = replace(ref, resync_pos=None)
        jobs: list[tuple[int, Awaitable[Superblock]]] = []
        for i, store in enumerate(self.stores):
            if store.sb is None:
                continue
            sb = replace(store.sb, role=i, member_count=n, spec=spec)
            sb = _shared(sb, ref) if i in self.current else sb
            limit = self.leg_timeout if i in self.attached else _best_effort(self.leg_timeout)
            jobs.append((i, timed(store.write_superblock(sb), limit)))
        results = await asyncio.gather(*(job for _, job in jobs), return_exceptions=True)
        for (i, _), res in zip(jobs, results, strict=True):
            if isinstance(res, BlockError) and i in self.attached:
                self._fail(i, res)
            elif isinstance(res, BlockError):
                log.warning("%s: failed leg %d keeps its old superblock: %r", self.name, i, res)
            elif isinstance(res, BaseException):
                raise res

    async def member_of(self, device: BlockDevice) -> int | None:
        """The leg that ``device`` already is (its superblock has the array and member
        UUID of that leg: the same disk reached another way), else None.

        Raises BlockError if it cannot be read."""
        if self.stores is None:
            return None
        try:
            sb = await timed(MetaStore(device).load(), self.leg_timeout)
        except MetadataError:
            return None  # blank, or not a dst member
        for i, store in enumerate(self.stores):
            mine = store.sb
            if mine is not None and (mine.array_uuid, mine.member_uuid) == (
                sb.array_uuid,
                sb.member_uuid,
            ):
                return i
        return None

    async def retire(self, store: MetaStore | None) -> bool:
        """Mark the metadata of a member that left the array so that it is never taken
        for one of its members again: it becomes a one-leg array of its own (a new
        array UUID; ``spec["removed_from"]`` names this one).  Its data is untouched.
        Best effort: False if it could not be written (a dead device)."""
        if store is None or store.sb is None:
            return False
        sb = store.sb
        name, was = store.device.name, str(self.array_uuid)
        spec = {**sb.spec, "legs": 1, "names": [name], "removed_from": was}
        new = replace(sb, array_uuid=uuid.uuid4(), role=0, member_count=1, spec=spec,
                      state=State.CLEAN, bitmap=0, resync_pos=None)  # fmt: skip
        limit = _best_effort(self.leg_timeout)
        try:
            await timed(store.device.flush(), limit)
            await timed(store.write_superblock(new), limit)
        except BlockError as e:
            log.warning("%s: could not mark removed member %s: %r", self.name,
                        store.device.name, e)  # fmt: skip
            return False
        return True

    async def leg_synced(self, leg: int) -> None:
        """``leg`` holds every region: it takes the current generation; if every leg
        is now in sync, the bitmap generation is cleared (write intent only again).

        The leg counts as current *before* its superblock says so, so that a failure
        racing the adoption rotates the survivors' generation (see :meth:`settle`)."""
        if self.stores is None or self.ref is None:
            if leg in self.attached and not self.tracker.oos[leg].count():
                self.current.add(leg)
            return
        async with self._sb_lock:
            store = self.stores[leg]
            if leg not in self.attached or self.tracker.oos[leg].count():
                return
            assert store.sb is not None
            self.current.add(leg)
            try:
                await timed(store.device.flush(), self.leg_timeout)
                await timed(store.write_superblock(adopt(store.sb, self.ref)), self.leg_timeout)
            except BlockError as e:
                self._fail(leg, e)
            everyone = len(self.current) == len(self.devices)
            if everyone and not any(o.count() for o in self.tracker.oos):
                await self._write_current_locked(synced(self.ref))
        if self._stale_gen:
            await self.settle()

    async def set_resync_pos(self, pos: int | None, targets: Sequence[int]) -> None:
        """Persist a resync checkpoint: ``targets`` hold every region below ``pos`` but
        those set in the bitmap.  Only recorded when every leg not current is one of
        ``targets`` (otherwise a later full resync could skip what an absent leg lacks)."""
        if self.stores is None or self.ref is None:
            return
        others = set(range(len(self.devices))) - self.current
        if pos is not None and not others <= set(targets):
            pos = None
        if pos == self.ref.resync_pos:
            return
        async with self._sb_lock:
            for leg in targets:
                store = self.stores[leg]
                if leg in self.attached and leg not in self.current and store.sb is not None:
                    try:
                        await timed(store.device.flush(), self.leg_timeout)
                        new = replace(store.sb, resync_pos=pos)
                        await timed(store.write_superblock(new), self.leg_timeout)
                    except BlockError as e:
                        self._fail(leg, e)
            await self._write_current_locked(replace(self.ref, resync_pos=pos))

    # --- internals: tracker outputs ------------------------------------------------

    def _apply(self, out: Out) -> None:
        """Wake what ``out`` releases; run its metadata batch (chained)."""
        if not (out.writes or out.resyncs or out.meta or self._late):
            return  # the common case: nothing released, nothing to persist
        while True:
            for wid in out.writes:
                self._grant(self._waiters.pop(wid), ("write", wid))
            for r in out.resyncs:
                self._grant(self._rs_waiters.pop(r), ("resync", r))
            if out.meta is not None and self.stores is not None and self.attached:
                self._idle.clear()
                self._meta_tasks.spawn(self._persist(out.meta.batch, out.meta.pages), name="bitmap")
                out = Out()
            elif out.meta is not None:
                out = self.tracker.persisted(out.meta.batch)
                continue
            if not self._late:
                break
            kind, key = self._late.pop()
            if kind == "write":
                out = self.tracker.end_write(key, self.now())
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
        assert self.stores is not None
        legs = sorted(self.attached)
        stores = self.stores
        results = await asyncio.gather(
            *(
                timed(stores[i].write_bitmap_pages(pages, data_durable=True), self.leg_timeout)
                for i in legs
            ),
            return_exceptions=True,
        )
        for i, res in zip(legs, results, strict=True):
            if isinstance(res, BlockError):
                self._fail(i, res)
            elif isinstance(res, BaseException):
                raise res
        self._apply(self.tracker.persisted(batch))
        if not self.tracker.busy():
            self._idle.set()

    async def _clear_loop(self) -> None:
        """Clear the bits of idle regions, lazily.  A clear must not reach a member
        before the data of its region: with metadata, the attached legs are flushed
        first and only regions already idle when the flush started are cleared, so
        batches (_persist) never need a flush of their own and marks keep flowing."""
        interval = max(0.01, min(1.0, self.clear_delay / 2))
        while True:
            await asyncio.sleep(interval)
            started = self.now()
            if self.stores is not None:
                if not self.tracker.clears_due(started):
                    continue
                await self._flush_attached()
            self._apply(self.tracker.due_clears(started))

    async def _flush_attached(self) -> None:
        """Flush every attached leg; a leg that fails is failed (and holds nothing)."""
        legs = sorted(self.attached)
        results = await asyncio.gather(
            *(timed(self.devices[i].flush(), self.leg_timeout) for i in legs),
            return_exceptions=True,
        )
        for i, res in zip(legs, results, strict=True):
            if isinstance(res, BlockError):
                self._fail(i, res)
            elif isinstance(res, BaseException):
                raise res

    def _fail(self, leg: int, exc: BaseException) -> None:
        self.on_fail(leg, exc)  # the mirror marks the leg and calls leg_down
        self.leg_down(leg)

    # --- internals: superblocks ----------------------------------------------------

    def _known(self) -> set[int]:
        known: set[int] = set()
        for store in self.stores or ():
            if store.sb is not None:
                known |= {store.sb.current, store.sb.bitmap, *store.sb.history}
        return known

    async def _mark_dirty(self) -> None:
        async with self._sb_lock:
            assert self.ref is not None
            if self.ref.state is State.CLEAN:
                await self._write_current_locked(replace(self.ref, state=State.DIRTY))

    async def _write_current(self, ref: Superblock) -> None:
        async with self._sb_lock:
            await self._write_current_locked(ref)

    async def _write_current_locked(self, ref: Superblock) -> None:
        """Write ``ref``'s shared fields on every current leg (a failing one is dropped
        and the survivors rotate again, in :meth:`settle`)."""
        assert self.stores is not None
        self.ref = ref
        legs = sorted(self.current)
        stores = self.stores

        async def one(i: int) -> None:
            sb = stores[i].sb
            assert sb is not None
            await timed(stores[i].write_superblock(_shared(sb, ref)), self.leg_timeout)

        results = await asyncio.gather(*(one(i) for i in legs), return_exceptions=True)
        for i, res in zip(legs, results, strict=True):
            if isinstance(res, BlockError):
                self._fail(i, res)
            elif isinstance(res, BaseException):
                raise res

    async def _blank(self, leg: int) -> bool:
        """True if neither superblock slot of ``leg`` has the dst magic (a new member)."""
        dev = self.devices[leg]
        _layout(dev.size, BLOCK)  # too small for any metadata: MetadataError
        for off in sb_offsets(dev.size):
            raw = await timed(dev.read(off, BLOCK), self.leg_timeout)
            if bytes(raw[: len(MAGIC)]) == MAGIC:
                return False
        return True

    async def _format(self, leg: int, generation: int) -> Superblock:
        assert self.stores is not None and self.array_uuid is not None
        store = self.stores[leg] = MetaStore(self.devices[leg])
        spec = {
            "type": "mirror",
            "size": self.size,
            "region_size": self.region_size,
            "legs": len(self.devices),
            "names": [d.name for d in self.devices],
        }  # fmt: skip  (for dst assemble)
        try:
            sb = await timed(
                store.format(
                    array_uuid=self.array_uuid, member_uuid=uuid.uuid4(), role=leg,
                    member_count=len(self.devices), generation=generation,
                    region_size=self.region_size, array_name=self.name, spec=spec,
                ),
                self.leg_timeout,
            )  # fmt: skip
        except ValueError as e:
            raise MetadataError(f"{self.name}: leg {leg}: {e}") from e
        return sb

    def _check_member(self, leg: int, sb: Superblock) -> None:
        dev = self.devices[leg].name
        if self.array_uuid is not None and sb.array_uuid != self.array_uuid:
            raise MetadataError(
                f"{self.name}: leg {leg} ({dev}) belongs to another array "
                f"{sb.array_name!r} ({sb.array_uuid}), not {self.array_uuid}: refused"
            )
        if sb.role != leg:
            raise MetadataError(f"{self.name}: leg {leg} ({dev}) has role {sb.role} on disk")
        if sb.region_size != self.region_size and self._tracker is not None:
            raise MetadataError(
                f"{self.name}: leg {leg} ({dev}) has region size {sb.region_size}, "
                f"the array {self.region_size}"
            )

    async def _raw_bitmap(self, leg: int) -> int:
        """The on-disk bitmap of ``leg`` as an integer (bit i = region i)."""
        assert self.stores is not None
        lay = self.stores[leg].layout
        assert lay is not None
        n = -(-self.size // self.region_size)
        length = -(-n // PAGE_BITS) * BLOCK
        raw = await timed(self.devices[leg].read(lay.bitmap_offset, length), self.leg_timeout)
        return int.from_bytes(raw, "little") & ((1 << n) - 1)

    async def _write_whole_bitmap(self, leg: int) -> None:
        assert self.stores is not None
        bm = self.tracker.bitmap
        pages = {p: bm.page_bytes(p) for p in range(bm.npages)}
        try:
            await timed(self.stores[leg].write_bitmap_pages(pages), self.leg_timeout)
        except BlockError as e:
            self._fail(leg, e)
            raise


def _layout(member_size: int, region_size: int) -> MetaLayout:
    try:
        return layout_for(member_size, region_size)
    except ValueError as e:
        raise MetadataError(str(e)) from e


def _best_effort(limit: float | None) -> float:
    """Time limit for writing to a leg that is not (or no longer) in the array."""
    return min(limit, BEST_EFFORT_TIMEOUT) if limit is not None else BEST_EFFORT_TIMEOUT


def _shared(sb: Superblock, ref: Superblock) -> Superblock:
    """``sb`` (one member's identity) with the array-wide fields of ``ref``."""
    return replace(
        sb,
        member_count=ref.member_count,  # a member that missed a membership change
        current=ref.current,
        bitmap=ref.bitmap,
        history=ref.history,
        events=ref.events,
        state=ref.state,
        resync_pos=ref.resync_pos,
        spec=ref.spec,
    )


class _Opener:
    """:meth:`IntentLog.open` with metadata: load, classify, build the tracker."""

    def __init__(self, log_: IntentLog, opened: Sequence[bool]) -> None:
        self.il = log_
        self.opened = opened
        self.n = len(opened)
        self.states: list[tuple[LegState, str]] = [
            (LegState.IN_SYNC, "") if ok else (LegState.FAILED, "did not open") for ok in opened
        ]

    async def run(self) -> list[tuple[LegState, str]]:
        il = self.il
        assert il.stores is not None
        sbs: dict[int, Superblock] = {}
        blank: list[int] = []
        for i in range(self.n):
            if not self.opened[i]:
                continue
            try:
                if await il._blank(i):
                    blank.append(i)
                else:
                    sbs[i] = await timed(il.stores[i].load(), il.leg_timeout)
            except MetadataError as e:
                self.states[i] = (LegState.FAILED, f"bad metadata: {e}")
            except BlockError as e:
                self.states[i] = (LegState.FAILED, f"metadata unreadable: {e!r}")
        if not sbs:
            return await self._create(blank)
        self._identify(sbs)
        ref_i = self._reference(sbs)
        ref = sbs[ref_i]
        il.size = int(ref.spec.get("size") or min(sb.data_size for sb in sbs.values()))
        for i in range(self.n):
            if not self.opened[i]:
                continue  # absent (a node down): it is checked when it comes back
            lay = _layout(il.devices[i].size, il.region_size)
            if lay.data_size < il.size:
                raise MetadataError(f"{il.name}: leg {i} is too small for the array")
        il.ref = ref
        return await self._classify(sbs, ref, blank)

    async def _create(self, blank: list[int]) -> list[tuple[LegState, str]]:
        il = self.il
        if len(blank) != self.n:
            bad = [f"leg {i}: {why}" for i, (s, why) in enumerate(self.states) if why]
            raise MetadataError(f"{il.name}: no leg has valid metadata ({'; '.join(bad)})")
        il.array_uuid = il.array_uuid or uuid.uuid4()
        il.size = min(_layout(d.size, il.region_size).data_size for d in il.devices)
        gen = new_generation()
        for i in blank:
            il.ref = await il._format(i, gen)
        il._tracker = RegionTracker(il.size, il.region_size, self.n, clear_delay=il.clear_delay)
        il.attached = set(range(self.n))
        il.current = set(range(self.n))
        log.info("%s: new array %s over %d legs", il.name, il.array_uuid, self.n)
        return self.states

    def _identify(self, sbs: dict[int, Superblock]) -> None:
        il = self.il
        uuids = {sb.array_uuid for sb in sbs.values()}
        if il.array_uuid is None:
            if len(uuids) > 1:
                who = "; ".join(
                    f"leg {i} ({il.devices[i].name}): member of {sb.array_name!r} ({sb.array_uuid})"
                    for i, sb in sbs.items()
                )
                raise MetadataError(f"{il.name}: legs belong to different arrays ({who})")
            il.array_uuid = uuids.pop()
        sizes = {sb.region_size for sb in sbs.values()}
        if len(sizes) > 1:
            raise MetadataError(f"{il.name}: legs disagree on the region size: {sorted(sizes)}")
        on_disk = sizes.pop()
        if on_disk != il.region_size:
            log.warning(
                "%s: the members were formatted with %d-byte regions; using that, not the "
                "%d asked for (a member's region size is fixed when it is formatted)",
                il.name,
                on_disk,
                il.region_size,
            )
        il.region_size = on_disk
        for i, sb in sbs.items():
            il._check_member(i, sb)

    def _reference(self, sbs: dict[int, Superblock]) -> int:
        """The leg with the newest generation; MetadataError on split brain."""
        ahead = (Relation.AHEAD, Relation.AHEAD_FULL)
        cands = [i for i in sbs if not any(compare(sbs[i], sbs[j]) in ahead for j in sbs)]
        for a in cands:
            for b in cands:
                if a < b and compare(sbs[a], sbs[b]) is Relation.DIVERGED:
                    raise MetadataError(
                        f"{self.il.name}: legs {a} and {b} diverged (split brain): both "
                        "wrote after a common generation; the operator must pick one"
                    )
        return max(cands, key=lambda i: (sbs[i].events, -i))

    async def _classify(
        self, sbs: dict[int, Superblock], ref: Superblock, blank: list[int]
    ) -> list[tuple[LegState, str]]:
        il = self.il
        current = sorted(i for i, sb in sbs.items() if compare(ref, sb) is Relation.SAME)
        union = 0
        for i in current:
            union |= await il._raw_bitmap(i)
        nregions = -(-il.size // il.region_size)
        npages = -(-nregions // PAGE_BITS)
        bm = Bitmap.from_bytes(nregions, union.to_bytes(npages * BLOCK, "little"))
        t = il._tracker = RegionTracker(
            il.size, il.region_size, self.n, clear_delay=il.clear_delay, bitmap=bm
        )
        bits = list(bm)
        il.current = set(current)
        il.attached = set(current)
        dirty = any(sbs[i].state is State.DIRTY for i in current)
        for i in current[1:] if dirty else ():
            il.missed(i, bits)  # crash: the lowest current leg is the source
        for i, sb in sbs.items():
            rel = compare(ref, sb)
            if i in current:
                continue
            if rel is Relation.BEHIND:  # it misses at most what the bitmap holds
                self._target(i, set(bits), f"behind: {len(bits)} regions")
            elif rel in (Relation.BEHIND_FULL, Relation.UNRELATED):
                pos = ref.resync_pos if sb.resync_pos == ref.resync_pos else None
                start = min(pos or 0, t.nregions)
                self._target(i, set(bits) | set(range(start, t.nregions)), "full resync")
            else:
                self.states[i] = (LegState.FAILED, f"refused: {rel.value} (split brain)")
        for i in blank:
            await il._format(i, new_generation(il._known()))
            self._target(i, set(range(t.nregions)), "new member: full resync")
        failed = [i for i, (s, _) in enumerate(self.states) if s is LegState.FAILED]
        for i in failed:
            il._apply(t.leg_failed(i))
            il.missed(i, bits)
        for i, (s, _) in enumerate(self.states):
            if s is LegState.RESYNCING:
                await il._write_whole_bitmap(i)
        if not dirty:
            t.settled(bits, il.now())
        if failed or blank:
            # Started degraded, or a blank member took the place of one that is away:
            # the survivors start a new generation, so the member that was there
            # before is known as behind (not as current) if it ever comes back.
            il._stale_gen = True
            il._settled.clear()
        return self.states

    def _target(self, leg: int, regions: set[int], why: str) -> None:
        self.il.attached.add(leg)
        self.il.missed(leg, sorted(regions))
        self.states[leg] = (LegState.RESYNCING, why)
