"""The mirror target (dm-raid1, RAID 1): the block device over a :class:`MirrorCore`.

Theory of operation
-------------------
Every leg holds the same data.  The parts, each a module of this package:

* :mod:`.legs` -- a leg and the one way to send it a request (timed by one clock);
* :mod:`.fanout` -- WRITE, WRITE_ZEROES, TRIM and FLUSH: one fan-out, one settle policy;
* :mod:`.read` -- READ: one leg serves, failures are retried and repaired;
* :mod:`.regionhash` over :mod:`.dirtylog` / :mod:`.disklog` -- write intent and what
  every leg misses, in memory or on the members;
* :mod:`.recovery` and :mod:`.membership` -- re-add, resync, verify; add, remove,
  replace legs live.

Each operation has two faces over one implementation: the callback form of
:mod:`dst.device` (``submit_read``/``submit_write``, always taken) and the coroutine
form, which is the callback form plus a wait (:func:`dst.aio.wait_done`).

Semantics (DESIGN.md 1-5): a write completes when every live leg answered and one that
holds all its regions acknowledged; a leg that fails or times out is failed and misses
what it did not get (persisted with ``metadata``, so a restart resyncs only that);
overlapping writes reach every leg in the same order; reads go to legs holding the
regions only.
"""

from __future__ import annotations

import errno
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from dst.aio import wait_done
from dst.device import BlockDevice, Buffer, Cancel, Capabilities, Done, Extent, Health
from dst.errors import BlockError, ConfigError
from dst.meta.layout import DEFAULT_CLEAR_DELAY
from dst.targets.copyplan import Moved, Span
from dst.targets.mirror import membership, recovery, spans
from dst.targets.mirror.core import MirrorCore
from dst.targets.mirror.coredevice import CoreDevice
from dst.targets.mirror.fanout import Kind, submit_mutation
from dst.targets.mirror.legs import LegState, call_leg
from dst.targets.mirror.read import submit_read

_WRITE = Kind.WRITE  # a global: an enum member lookup costs ~130 ns (Python 3.11)


class MirrorDevice(CoreDevice):
    """``legs`` mirrored (2 or more).

    The size is the smallest leg's; with ``metadata`` the smallest leg's data size
    (a superblock and the bitmap sit at the end of each leg, and the array survives
    restarts); without, region state lives in memory.  ``region_size`` is the
    write-intent grain (None: the members' own, or 1 MiB for new ones; a size asked for
    that differs from the members' is logged, and theirs kept); ``clear_delay`` how
    long a region stays idle before its bit is cleared; ``leg_timeout`` bounds every
    leg request (a leg that does not answer in time is failed); ``array_uuid`` the
    array the members must belong to; ``resync_rate``/``resync_min_rate`` how fast the
    array's keeper may copy to it; ``label`` what the superblocks record of the array
    it is the top of (its name and export addresses, for ``dst assemble``).
    """

    kind = "mirror"
    replaces_in_place = False  # dst replace: a new leg joins, then the old one leaves

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
        resync_rate: int = 0,
        resync_min_rate: int = 0,
        label: Mapping[str, Any] | None = None,
    ) -> None:
        self.resync_rate = resync_rate  # bytes/s the array's resync may take (0: no limit)
        self.resync_min_rate = resync_min_rate  # ... and at least gets under load
        self.core = MirrorCore(
            legs, name=name, region_size=region_size, metadata=metadata,
            clear_delay=clear_delay, leg_timeout=leg_timeout, array_uuid=array_uuid, label=label,
        )  # fmt: skip
        self.name = name

    # -- the shared state, for the array's keepers and status ----------------------------

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.core.size

    @property
    def caps(self) -> Capabilities:  # type: ignore[override]
        return self.core.caps

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the legs and load, check or create their metadata.

        Raises BlockError if no leg can be opened; MetadataError for foreign,
        inconsistent or diverged members.
        """
        await self.core.open()

    # -- I/O: the callback face, and the coroutine face as the callback face plus a wait -

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel:
        return submit_mutation(self.core, _WRITE, offset, len(data), done, data=data, fua=fua)

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel:
        return submit_read(self.core, offset, length, done)

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

        def op(dev: BlockDevice) -> Any:
            return dev.write_zeroes(offset, length, fua=fua, punch=punch, fast=fast)

        await wait_done(lambda done: submit_mutation(self.core, Kind.ZERO, offset, length,
                                                     done, op=op))  # fmt: skip

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        def op(dev: BlockDevice) -> Any:
            return dev.trim(offset, length, fua=fua)

        await wait_done(lambda done: submit_mutation(self.core, Kind.TRIM, offset, length,
                                                     done, op=op))  # fmt: skip

    async def flush(self) -> None:
        await wait_done(lambda done: submit_mutation(self.core, Kind.FLUSH, 0, 0, done,
                                                     op=lambda dev: dev.flush()))  # fmt: skip

    async def cache(self, offset: int, length: int) -> None:
        core = self.core
        for leg in core.read_order(core.regions.regions(offset, length))[:1]:
            await call_leg(leg, core.deadlines, lambda c: c.run(c.leg.dev.cache(offset, length)))

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        core = self.core
        last: BlockError | None = None
        for leg in core.read_order(core.regions.regions(offset, length)):
            try:
                extents: Sequence[Extent] = await call_leg(
                    leg, core.deadlines, lambda c: c.run(c.leg.dev.block_status(offset, length))
                )
                return extents
            except BlockError as exc:
                last = exc
        raise last or BlockError(errno.EIO, f"{self.name}: no readable leg")

    # -- recovery and membership (see those modules) -------------------------------------

    async def fail_leg(self, index: int) -> None:
        await recovery.fail_leg(self.core, index)

    async def resync_region(self, region: int, targets: Sequence[int]) -> int:
        return await recovery.resync_region(self.core, region, targets)

    async def resync_span(self, span: Span, targets: Sequence[int]) -> Moved:
        return await spans.resync_span(self.core, span, targets)

    async def verify_span(
        self, span: Span, *, repair_from: int | None = None
    ) -> tuple[Moved, list[int]]:
        return await spans.verify_span(self.core, span, repair_from=repair_from)

    async def copy_status(self, offset: int, length: int) -> Sequence[Extent]:
        """A leg's block status (regions are array offsets, the same on every leg)."""
        return await self.block_status(offset, length)

    async def verify_status(self, offset: int, length: int) -> Sequence[Extent]:
        """Block status saying zero only where every leg holding the range reads zeroes."""
        return await spans.merged_status(self.core, offset, length)

    async def add_leg(self, dev: BlockDevice) -> int:
        return await membership.add_leg(self.core, dev)

    async def remove_leg(self, index: int) -> BlockDevice:
        return await membership.remove_leg(self.core, index)

    async def add_member(self, dev: BlockDevice, *, start: int = 0, length: int | None = None
                         ) -> None:  # fmt: skip
        """A new leg (:meth:`add_leg`); a leg is a whole device."""
        if start or length is not None:
            raise ConfigError("a mirror leg is a whole device (no start or length)",
                              where="node")  # fmt: skip
        await self.add_leg(dev)

    async def replace_leg(self, index: int, dev: BlockDevice) -> BlockDevice:
        return await membership.replace_leg(self.core, index, dev)

    # -- status --------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        core = self.core
        out: dict[str, Any] = {
            "type": "mirror",
            "name": self.name,
            "members": [leg.dev.spec() for leg in core.legs],
            "metadata": core.log.persistent,
            "clear_delay": core.clear_delay,
            "resync_rate": self.resync_rate,
            "resync_min_rate": self.resync_min_rate,
        }
        if core.log.asked is not None:  # (not asked: the members' own, in the status)
            out["region_size"] = core.log.asked
        if core.leg_timeout is not None:
            out["leg_timeout"] = core.leg_timeout
        return out

    def health(self) -> Health:
        core = self.core
        ok = sum(leg.state is LegState.IN_SYNC for leg in core.legs)
        live = sum(leg.live for leg in core.legs)
        state = "ok" if ok == len(core.legs) else "degraded" if live else "failed"
        legs = [leg.status() for leg in core.legs]
        detail: dict[str, Any] = {"legs": legs, "readmitted": core.readmitted}
        if core.last_standing is not None:  # every leg failed: this one comes back first
            detail["last_standing"] = core.last_standing.dev.name
        self.health_regions(detail, legs)
        return Health(state, detail)
