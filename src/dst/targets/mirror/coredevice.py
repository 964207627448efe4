"""What a mirror and a parity array share as block devices: a core and its recovery.

:class:`CoreDevice` is the device face of a :class:`~dst.targets.mirror.core.MirrorCore`
(a mirror's, or a parity array's :class:`~dst.targets.parity.core.ParityCore`, which
extends it): the core's state as the array's keeper reads it
(:class:`~dst.targets.redundant.Redundant`), and the recovery steps that are the core's
own whatever the algorithm (re-add, resync checkpoints and completion, members by name),
and the coroutine face of READ and WRITE as the callback face plus a wait.
The I/O, resync and verify of a span, membership changes, spec and health are each
target's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from dst.aio import TaskSet, wait_done
from dst.device import BlockDevice, Buffer, Cancel, Done
from dst.errors import ConfigError
from dst.targets.mirror import recovery
from dst.targets.mirror.core import MirrorCore
from dst.targets.mirror.dirtylog import DirtyLog, ReaddPlan
from dst.targets.mirror.legs import Leg
from dst.targets.mirror.regionhash import RegionHash
from dst.targets.rangelock import RangeLock


class CoreDevice(BlockDevice):
    """A block device over a mirror core (module docstring)."""

    core: MirrorCore
    MEMBER = "leg"  # what its members are called in messages

    @property
    def legs(self) -> list[Leg]:
        return self.core.legs

    @property
    def regions(self) -> RegionHash:
        return self.core.regions

    @property
    def log(self) -> DirtyLog:
        return self.core.log

    @property
    def locks(self) -> RangeLock:
        return self.core.locks

    @property
    def tasks(self) -> TaskSet:
        return self.core.tasks

    @property
    def io_ops(self) -> int:
        return self.core.io_ops

    @property
    def leg_timeout(self) -> float | None:
        return self.core.leg_timeout

    @property
    def resync_wanted(self) -> asyncio.Event:
        return self.core.resync_wanted

    @property
    def resync_status(self) -> Callable[[], dict[str, Any]] | None:
        return self.core.resync_status

    @resync_status.setter
    def resync_status(self, fn: Callable[[], dict[str, Any]] | None) -> None:
        self.core.resync_status = fn

    # The coroutine face is the callback face (each target's: it always has one) plus
    # a wait.

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel:
        raise NotImplementedError

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel:
        raise NotImplementedError

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await wait_done(lambda done: self.submit_write(offset, data, fua, done))

    async def read(self, offset: int, length: int) -> Buffer:
        data: Buffer = await wait_done(lambda done: self.submit_read(offset, length, done))
        return data

    async def close(self) -> None:
        """Clean shutdown: background work stops, the metadata is drained and marked
        clean.  I/O must have stopped."""
        await self.core.close()

    async def readd(self, index: int, *, full: bool = False) -> ReaddPlan:
        return await recovery.readd(self.core, index, full=full)

    async def resync_checkpoint(self, region: int | None, targets: Sequence[int]) -> None:
        await recovery.resync_checkpoint(self.core, region, targets)

    async def resync_done(self, index: int) -> bool:
        return await recovery.resync_done(self.core, index)

    def region_range(self, region: int, region_size: int | None = None) -> tuple[int, int]:
        return self.core.region_range(region, region_size)

    def leg_index(self, name: str) -> int:
        """The index of the member called ``name``.  ConfigError if there is none."""
        for leg in self.core.legs:
            if leg.dev.name == name:
                return leg.index
        raise ConfigError(f"{name!r} is not a {self.MEMBER} of {self.name!r}", where="node")

    async def remove_member(self, name: str) -> BlockDevice:
        return await self.remove_leg(self.leg_index(name))

    async def remove_leg(self, index: int) -> BlockDevice:
        raise NotImplementedError

    def health_regions(self, detail: dict[str, Any], legs: list[dict[str, Any]]) -> None:
        """Add what the region hash knows (once open) and the resync's progress to a
        health ``detail`` whose ``legs`` are the members' status, in order."""
        core = self.core
        if core.ready:
            rh = core.regions
            for leg, d in zip(core.legs, legs, strict=True):
                d["missing_regions"] = rh.missing(leg.index)
            detail["region_size"] = rh.region_size
            detail["dirty_regions"] = rh.tracker.bitmap.count()
        if core.resync_status is not None:
            detail["resync"] = core.resync_status()

    def children(self) -> Sequence[BlockDevice]:
        return [leg.dev for leg in self.core.legs]

    def member_info(self) -> list[dict[str, Any]]:
        return [{"state": leg.state.value} for leg in self.core.legs]
