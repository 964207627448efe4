"""The dirty log of a redundant array (dm-log): where region state and generations live.

Theory of operation
-------------------
The region hash (:mod:`dst.targets.mirror.regionhash`) decides *which* regions are
dirty and which legs miss what; the dirty log decides *where that is kept*.  One
interface, two variants sharing code, as device-mapper's core and disk logs:

* :class:`DirtyLog` itself is the core (in-memory) log, ENBD's behaviour: degraded mode
  and delta resync work, nothing survives a restart, no I/O at all.
* :class:`~dst.targets.mirror.disklog.DiskLog` keeps a superblock and the bitmap at the
  end of every member (:mod:`dst.meta`): the array is reassembled from its members,
  after a crash only dirty regions are resynced, and generations tell a stale member
  from a current one.

A leg whose metadata I/O fails is reported to ``on_fail`` (the mirror fails it, which
calls :meth:`DirtyLog.leg_down`) and the operation goes on without it.

Legs are *current* when they hold the current generation (every in-sync leg); the log
keeps that set.  A current leg that fails makes the log *unsettled* until the survivors
recorded it (:meth:`DirtyLog.settle`): no write that the failed leg missed may be
acknowledged before, or a crash could make the stale leg the resync source.

Leg indices: membership changes (:mod:`dst.targets.mirror.membership`) call
:meth:`~DirtyLog.grow`, :meth:`~DirtyLog.swap` and :meth:`~DirtyLog.drop` while holding
``lock`` with no bitmap batch in flight, so indices change at one point in time.
"""

from __future__ import annotations

import asyncio
import errno
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dst.device import BlockDevice
from dst.errors import BlockError
from dst.meta.bitmap import Bitmap
from dst.meta.layout import DEFAULT_REGION_SIZE
from dst.meta.members import LegState
from dst.meta.regions import Regions
from dst.meta.store import MetaStore

FailHook = Callable[[int, BlockError], None]


@dataclass(frozen=True, slots=True)
class ReaddPlan:
    """What was decided for a returning leg (:meth:`DirtyLog.readd`)."""

    leg: int
    relation: str  # a Relation value, or "new" for a blank member, or "memory"
    full: bool
    regions: int  # regions to copy


@dataclass(slots=True)
class Opening:
    """What :meth:`DirtyLog.open` found: the data size and region size, the bitmap to
    start from (None: clean), every leg's state and why, the regions each leg misses,
    the regions that may be cleared lazily, whether the survivors must start a new
    generation (:meth:`DirtyLog.settle`), and the regions marked dirty by a crash
    (``crashed``: write intent the array did not clear; what they mean is the target's
    policy: a mirror resyncs them from one current leg, a parity array recomputes their
    parity)."""

    size: int
    region_size: int
    legs: list[tuple[LegState, str]]
    bitmap: Bitmap | None = None
    missing: dict[int, Regions] = field(default_factory=dict)
    settled: Regions = ()
    stale: bool = False
    crashed: Bitmap | None = None


class DirtyLog:
    """The core (in-memory) dirty log; the interface every variant implements."""

    persistent = False

    def __init__(
        self,
        devices: Sequence[BlockDevice],
        *,
        region_size: int | None,
        name: str = "mirror",
        array_uuid: uuid.UUID | None = None,
        leg_timeout: float | None = None,
        on_fail: FailHook | None = None,
        layout: Mapping[str, Any] | None = None,
    ) -> None:
        self.devices = list(devices)
        # What the members' superblocks say the array is (``type`` and its geometry):
        # written when a member is formatted, checked when the array is opened.
        self.layout: dict[str, Any] = dict(layout or {"type": "mirror"})
        self.on_fail: FailHook = on_fail or (lambda leg, exc: self.leg_down(leg))
        self.asked = region_size  # (None: the members' own, the default for new ones)
        self.region_size = region_size or DEFAULT_REGION_SIZE
        self.name = name
        self.array_uuid = array_uuid
        self.leg_timeout = leg_timeout
        self.current: set[int] = set()
        self.label: dict[str, Any] | None = None  # the array's name and exports (disk log)
        self.lock = asyncio.Lock()  # superblock writes; membership changes hold it
        self.unsettled = False  # a leg failure not yet recorded by the survivors
        self.needs_mark = False  # the first write must first mark the array dirty

    # --- open and close --------------------------------------------------------------

    async def open(self, opened: Sequence[bool]) -> Opening:
        """Every leg that opened is current.  Raises BlockError if none opened."""
        self._need_one(opened)
        self.current = {i for i, ok in enumerate(opened) if ok}
        size = min(d.size for d, ok in zip(self.devices, opened, strict=True) if ok)
        states = [(LegState.IN_SYNC, "") if ok else (LegState.FAILED, "did not open")
                  for ok in opened]  # fmt: skip
        return Opening(size, self.region_size, states)

    def _need_one(self, opened: Sequence[bool]) -> None:
        if not any(opened):
            raise BlockError(errno.EIO, f"{self.name}: no leg could be opened")

    async def adopt_bitmap(self, legs: Iterable[int], bitmap: Bitmap) -> None:
        """Give ``legs`` (resync targets) the whole bitmap."""

    async def close(self) -> None:
        """Clean shutdown (after the last bitmap batch)."""

    # --- writes and bitmap batches ---------------------------------------------------

    async def mark_dirty(self) -> None:
        pass

    async def write_pages(self, pages: Mapping[int, bytes], legs: Iterable[int]) -> None:
        """Persist bitmap pages on ``legs``."""

    async def flush_legs(self, legs: Iterable[int]) -> None:
        """Flush ``legs`` before bits are cleared (a clear must not overtake data)."""

    # --- leg failures and generations --------------------------------------------------

    def leg_down(self, leg: int) -> None:
        """``leg`` failed; a current leg makes the log unsettled (persistent logs; the
        core log only when it was the last one: from then on nothing is acknowledged,
        not even by a resync target that holds the regions, until a leg is current)."""
        if self.current == {leg}:
            self.unsettled = True
        self.current.discard(leg)

    async def settle(self) -> None:
        """Record every leg failure so far.  Raises BlockError(EIO) if no current leg
        is left (then nothing holds every acknowledged write)."""
        if not self.current:
            raise BlockError(errno.EIO, f"{self.name}: no leg in sync is left")
        self.unsettled = False

    async def leg_synced(self, leg: int, *, everyone: bool) -> None:
        """``leg`` holds every region now: it becomes current (``everyone``: every leg
        is current and nothing is out of sync)."""
        self.current.add(leg)

    async def set_resync_pos(self, pos: int | None, targets: Sequence[int]) -> None:
        """Persist that ``targets`` (attached, not current) hold every region below
        ``pos`` (resumable)."""

    # --- returning, joining and leaving legs -----------------------------------------

    async def readd(self, leg: int, *, full: bool) -> tuple[str, bool]:
        """A failed leg comes back: how it relates to the array and whether it needs
        a full resync.  The core log knows exactly what it missed since it failed."""
        return "memory", full

    async def readmit(self, leg: int) -> None:
        """Every leg failed and ``leg`` failed last: it is current again, as it is (the
        survivors' generation then moves on, see :meth:`settle`)."""
        self.current.add(leg)

    async def format_new(self, leg: int) -> None:
        """``leg`` (grown or swapped in) joins as a new member."""

    async def member_of(self, device: BlockDevice) -> int | None:
        """The leg that ``device`` already is (reached another way), else None."""
        return None

    def grow(self, device: BlockDevice) -> None:
        self.devices.append(device)

    def swap(
        self, leg: int, device: BlockDevice, keep: MetaStore | None = None
    ) -> MetaStore | None:
        """``device`` in place of ``leg``; returns what :meth:`retire` and an undo need
        of the old one (``keep``: put that back instead of starting afresh)."""
        self.devices[leg] = device
        return None

    def drop(self, leg: int) -> MetaStore | None:
        """Forget ``leg``; the legs after it move down one index."""
        self.devices.pop(leg)
        self.current = {i - (i > leg) for i in self.current if i != leg}
        return None

    async def write_members(self, attached: Iterable[int], *, everyone: bool) -> None:
        """After a membership change: every member learns its role and the count."""

    async def retire(self, old: MetaStore | None) -> bool:
        """Mark a member that left so it is never taken for one of ours again."""
        return False
