"""What the array's keeper needs of a redundant target (a mirror; parity arrays too).

A redundant target holds every acknowledged write on more than one member, so the array
keeps it healthy in the background: it resyncs what members miss, re-adds members whose
node came back, verifies, and rebuilds a replaced member from the others instead of
copying it.  A mirror fills a new leg next to the old one (``add_leg`` then
``remove_leg``); a parity array puts it in the old member's role at once
(``replaces_in_place``, ``replace_leg``) and rebuilds it from the others.
:class:`Redundant` is that contract, checked structurally; the control
plane asks it of a device instead of naming a concrete target.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from dst.aio import TaskSet
from dst.device import BlockDevice, Extent
from dst.targets.copyplan import Moved, Span
from dst.targets.mirror.dirtylog import ReaddPlan
from dst.targets.mirror.legs import Leg
from dst.targets.mirror.regionhash import RegionHash


@runtime_checkable
class Redundant(Protocol):
    """A target whose members are redundant (see the module docstring)."""

    name: str
    resync_rate: int
    resync_min_rate: int
    replaces_in_place: bool  # dst replace: the new member takes the old one's role at once

    @property
    def size(self) -> int: ...

    @property
    def legs(self) -> list[Leg]: ...

    @property
    def regions(self) -> RegionHash: ...

    @property
    def tasks(self) -> TaskSet: ...

    @property
    def io_ops(self) -> int: ...

    @property
    def resync_wanted(self) -> asyncio.Event: ...

    @property
    def resync_status(self) -> Callable[[], dict[str, Any]] | None: ...

    @resync_status.setter
    def resync_status(self, fn: Callable[[], dict[str, Any]] | None) -> None: ...

    def leg_index(self, name: str) -> int: ...

    def region_range(self, region: int, region_size: int | None = None) -> tuple[int, int]: ...

    async def fail_leg(self, index: int) -> None: ...

    async def readd(self, index: int, *, full: bool = False) -> ReaddPlan: ...

    async def resync_span(self, span: Span, targets: Sequence[int]) -> Moved: ...

    async def verify_span(
        self, span: Span, *, repair_from: int | None = None
    ) -> tuple[Moved, list[int]]: ...

    async def copy_status(self, offset: int, length: int) -> Sequence[Extent]:
        """Block status of the source of a resync, in region space (what the copier
        plans holes and data by)."""
        ...

    async def verify_status(self, offset: int, length: int) -> Sequence[Extent]:
        """Block status saying zero only where no member holds data (a verify's plan)."""
        ...

    async def resync_checkpoint(self, region: int | None, targets: Sequence[int]) -> None: ...

    async def resync_done(self, index: int) -> bool: ...

    async def add_leg(self, dev: BlockDevice) -> int: ...

    async def remove_leg(self, index: int) -> BlockDevice: ...

    async def replace_leg(self, index: int, dev: BlockDevice) -> BlockDevice: ...
