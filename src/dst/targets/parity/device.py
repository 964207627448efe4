"""The parity targets (RAID5: ``raid5``, RAID6: ``raid6``): the block device over a
:class:`~dst.targets.parity.core.ParityCore`.

Theory of operation
-------------------
``n`` members, one (P) or two (P and Q) parity chunks per stripe rotating left-
symmetrically (:mod:`.geometry`), so the array holds ``n - 1`` or ``n - 2`` members'
worth of data and survives one or two members lost.  The parts:

* :mod:`.core` -- the mirror's core (members, region hash over the dirty log, range
  lock, the one leg-timeout clock) with the geometry, the coder and the write-hole
  policy;
* :mod:`.write` -- full-stripe, read-modify-write and reconstruct-write;
* :mod:`.read` -- reads from the data members, rebuilt from parity when one is missing;
* :mod:`.recovery` -- rebuild and resync of a region, verify, fail;
* :mod:`.gf` -- P, Q and recovery arithmetic; :mod:`.fan` -- requests to members.

Re-adding a returning member, resync checkpoints and making a rebuilt member current are
the mirror's own (:mod:`dst.targets.mirror.recovery`), so is replacing a member in its
role (:func:`dst.targets.mirror.membership.replace_leg`), and the array's keeper drives
them through :class:`~dst.targets.redundant.Redundant` as for a mirror.

Each operation has two faces over one implementation: ``submit_read``/``submit_write``
(always taken: a healthy read is leg calls and callbacks only; a write is a coroutine
run by :func:`dst.aio.submit_coro`, its reads and writes one fan-out per stripe) and
the coroutine face, which is the callback face plus a wait (:func:`dst.aio.wait_done`).
"""

from __future__ import annotations

import dataclasses
import errno
import uuid
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import Any

from dst.aio import submit_coro
from dst.device import BlockDevice, Buffer, Cancel, Capabilities, Done, Extent, Health
from dst.errors import BlockError, ConfigError
from dst.meta.layout import DEFAULT_CLEAR_DELAY
from dst.targets.copyplan import Moved, Span
from dst.targets.mirror import membership
from dst.targets.mirror.coredevice import CoreDevice
from dst.targets.mirror.legs import LegState
from dst.targets.parity import recovery
from dst.targets.parity.core import LAYOUT, ParityCore
from dst.targets.parity.fan import Op, failures, fan
from dst.targets.parity.read import submit_read
from dst.targets.parity.write import write as write_stripes

DEFAULT_PARITY_CHUNK = 32 << 10  # kept: a spec that relies on the default keeps its layout


class ParityDevice(CoreDevice):
    """``members`` (``parity + 2`` or more) with ``parity`` (1: raid5, 2: raid6) parity
    chunks of ``chunk`` bytes per stripe.  ``metadata``, ``region_size``,
    ``clear_delay``, ``leg_timeout``, ``array_uuid``, ``resync_rate`` and
    ``resync_min_rate`` as for :class:`~dst.targets.mirror.MirrorDevice`;
    ``start_dirty_degraded`` accepts a dirty and degraded start (the write hole, see
    :mod:`.core`).  Raises ConfigError for too few members or a bad chunk size."""

    replaces_in_place = True  # a new member takes the old one's role (no extra leg)
    MEMBER = "member"
    core: ParityCore

    def __init__(
        self,
        members: Sequence[BlockDevice],
        *,
        parity: int = 1,
        chunk: int = DEFAULT_PARITY_CHUNK,
        name: str = "raid",
        region_size: int | None = None,
        metadata: bool = False,
        clear_delay: float = DEFAULT_CLEAR_DELAY,
        leg_timeout: float | None = None,
        array_uuid: uuid.UUID | None = None,
        resync_rate: int = 0,
        resync_min_rate: int = 0,
        start_dirty_degraded: bool = False,
        label: Mapping[str, Any] | None = None,
    ) -> None:
        self.core = ParityCore(
            members, parity=parity, chunk=chunk, name=name, region_size=region_size,
            metadata=metadata, clear_delay=clear_delay, leg_timeout=leg_timeout,
            array_uuid=array_uuid, start_dirty_degraded=start_dirty_degraded, label=label,
        )  # fmt: skip
        self.kind = self.core.kind
        self.name = name
        self.resync_rate = resync_rate
        self.resync_min_rate = resync_min_rate

    # -- the shared state, for the array's keeper and status (Redundant) ----------------

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.core.geometry.size

    @property
    def caps(self) -> Capabilities:  # type: ignore[override]
        c = self.core.caps  # trim is not passed down: parity would have to follow it
        return dataclasses.replace(c, trim=False, fast_zero=False, cache=False,
                                   block_status=False)  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the members, load or create their metadata.  Raises BlockError (too
        few members), MetadataError (foreign or diverged members, another kind of
        array, or dirty and degraded without ``start_dirty_degraded``)."""
        await self.core.open()
        if sum(x.opened for x in self.core.legs) < self.core.geometry.data:
            raise BlockError(errno.EIO, f"{self.name}: fewer than {self.core.geometry.data} "
                             "members could be opened")  # fmt: skip

    # -- I/O: the callback face, and the coroutine face as the callback face plus a wait -

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel:
        return submit_coro(write_stripes(self.core, offset, data, fua), done)

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel:
        return submit_read(self.core, offset, length, done)

    async def flush(self) -> None:
        core = self.core
        ops = [Op(x, 0, flush=True) for x in core.legs if x.live]
        for i, exc in failures(ops, await fan(core, ops)).items():
            core.fail(core.legs[i], exc)
        await core.settle()
        if sum(not x.live for x in core.legs) > core.parity:
            raise BlockError(errno.EIO, f"{self.name}: flush reached too few members")

    # -- recovery and membership (Redundant) ---------------------------------------------

    async def fail_leg(self, index: int) -> None:
        await recovery.fail_member(self.core, index)

    async def resync_span(self, span: Span, targets: Sequence[int]) -> Moved:
        return await recovery.resync_span(self.core, span, targets)

    async def verify_span(
        self, span: Span, *, repair_from: int | None = None
    ) -> tuple[Moved, list[int]]:
        """Check the parity of ``span``'s regions (recomputed from the data);
        ``repair_from`` (any member) rewrites what differs."""
        return await recovery.verify_span(self.core, span, repair=repair_from is not None)

    async def copy_status(self, offset: int, length: int) -> Sequence[Extent]:
        """All data: a rebuild finds its holes itself, a region at a time, from every
        source's block status (:mod:`.sparse`)."""
        return [Extent(length)]

    async def verify_status(self, offset: int, length: int) -> Sequence[Extent]:
        return [Extent(length)]

    async def add_leg(self, dev: BlockDevice) -> int:
        raise ConfigError(f"a {self.kind} does not grow by a member (no restripe)", where="node")

    async def remove_leg(self, index: int) -> BlockDevice:
        raise ConfigError(f"a {self.kind} keeps its members: replace one instead", where="node")

    async def add_member(self, dev: BlockDevice, *, start: int = 0, length: int | None = None
                         ) -> None:  # fmt: skip
        await self.add_leg(dev)

    async def replace_leg(self, index: int, dev: BlockDevice) -> BlockDevice:
        """``dev`` in the role of member ``index`` (dead or alive), rebuilt from the
        others in the background; returns the old device.  ConfigError if the others
        cannot rebuild it."""
        core = self.core
        others = [x for x in core.legs if x.index != index and x.state is LegState.IN_SYNC]
        if len(others) < core.geometry.data:
            raise ConfigError(f"cannot replace member {index}: only {len(others)} others "
                              "are in sync", where="node")  # fmt: skip
        return await membership.replace_leg(core, index, dev)

    # -- status --------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        core = self.core
        out: dict[str, Any] = {
            "type": core.kind,
            "name": self.name,
            "members": [leg.dev.spec() for leg in core.legs],
            "chunk_size": core.chunk,
            "metadata": core.log.persistent,
            "clear_delay": core.clear_delay,
            "resync_rate": self.resync_rate,
            "resync_min_rate": self.resync_min_rate,
            "start_dirty_degraded": False,  # a one-shot: consumed by the start it allowed
        }
        if core.log.asked is not None:  # (not asked: the members' own, in the status)
            out["region_size"] = core.log.asked
        if core.leg_timeout is not None:
            out["leg_timeout"] = core.leg_timeout
        return out

    def health(self) -> Health:
        core = self.core
        geo = core.geometry
        down = [leg.dev.name for leg in core.legs if leg.state is not LegState.IN_SYNC]
        lost = sum(not leg.live for leg in core.legs)
        state = "ok" if not down else "degraded" if lost <= core.parity else "failed"
        legs = [leg.status() for leg in core.legs]
        detail: dict[str, Any] = {
            "layout": {"level": core.kind, "rotation": LAYOUT, "members": geo.members,
                       "data": geo.data, "parity": geo.parity, "chunk_size": geo.chunk},
            "degraded": down,
            "legs": legs,
        }  # fmt: skip
        self.health_regions(detail, legs)
        if core.ready:
            detail["unsynced_regions"] = core.regions.tracker.unsynced.count()
        if core.at_risk is not None:
            detail["at_risk"] = list(islice(core.at_risk, 100))
            detail["at_risk_regions"] = core.at_risk.count()
        return Health(state, detail)
