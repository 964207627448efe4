"""Membership changes of a running mirror: add, remove and replace a leg.

Theory of operation
-------------------
Precondition: no foreground I/O in flight (the array daemon calls these with its root
gate suspended).  Background work may run: the whole range is locked (a resync copy in
progress, or a late write, finishes first; later ones wait), the resync's bookkeeping
(:func:`~.recovery.resync_done`, checkpoints) waits for ``core.reconfig``, and leg
indices change only inside :func:`reconfiguring` (the dirty log's lock held, no bitmap
batch in flight), where the legs, the region hash and the dirty log are renumbered at
once.  The three are serialised with each other; re-add and fail must not run
concurrently.

A joining device is opened, checked (big enough, not a leg already), formatted as a new
member of this array and attached with every region out of sync: it gets every write at
once and no read until a region was copied to it; the background resync converges it.
A leaving leg is failed first (the survivors rotate their generation) and its metadata
made that of a one-leg array of its own, so it is never taken for a member again.
Every member's superblock then says its role, the member count and the leg names, which
is what assembly reads.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError
from dst.meta.layout import layout_for, member_size_for
from dst.targets.composite import intersect_caps
from dst.targets.mirror.core import MirrorCore
from dst.targets.mirror.legs import Leg, LegState

log = logging.getLogger(__name__)


@asynccontextmanager
async def reconfiguring(core: MirrorCore) -> AsyncIterator[None]:
    """Leg indices may change in the body (until its first await nothing holds one)."""
    async with core.log.lock:
        await core.regions.quiet()
        yield


async def add_leg(core: MirrorCore, dev: BlockDevice) -> int:
    """Grow the mirror by the leg ``dev`` live; returns its index (the last).

    Raises ConfigError (``dev`` already a leg, too small for the data plus metadata),
    BlockError or MetadataError (``dev`` cannot be opened, read or formatted: the
    mirror is unchanged).  A refused ``dev`` stays open.
    """
    await _open_new(core, dev)
    async with core.reconfig, core.locks.hold(0, core.size):
        _not_a_leg(core, dev)
        async with reconfiguring(core):
            core.log.grow(dev)
            index = core.regions.add_leg()
            leg = Leg(dev, index, LegState.FAILED, reason="joining", opened=True)
            core.legs.append(leg)
            try:
                await _join(core, leg)
            except BaseException:
                await _unjoin(core, leg)
                core.regions.remove_leg(index)
                core.log.drop(index)
                core.legs.pop()
                raise
            await _write_members(core)
        await _changed(core)
    log.info("%s: leg %d (%s) added", core.name, index, dev.name)
    return index


async def remove_leg(core: MirrorCore, index: int) -> BlockDevice:
    """Shrink the mirror by leg ``index`` live; returns its device (not closed).

    The legs after it move down one index.  If it was in sync the others start a new
    generation, and it is marked as a one-leg array of its own (``spec["removed_from"]``;
    its data, as of now, untouched).  Best effort for a dead leg (its old generation
    then marks it stale).

    Raises ConfigError: bad index; the mirror would keep fewer than two legs (replace or
    fail the leg instead); it is the last leg in sync; a failed leg after it would be
    renumbered without being told (remove, re-add or replace that one first).
    """
    async with core.reconfig, core.locks.hold(0, core.size):
        _check_remove(core, index)
        leg = core.legs[index]
        if leg.state is not LegState.FAILED:
            core.fail(leg, BlockError(errno.ECANCELED, "removed by the operator"))
        await core.settle()
        async with reconfiguring(core):
            core.regions.remove_leg(index)
            old = core.log.drop(index)
            del core.legs[index]
            for i, x in enumerate(core.legs):
                x.index = i
            leg.index = -1  # a late failure report about it changes nothing
            await _write_members(core)
        await _changed(core)
        await core.log.retire(old)
    log.info("%s: leg %d (%s) removed", core.name, index, leg.dev.name)
    return leg.dev


async def replace_leg(core: MirrorCore, index: int, dev: BlockDevice) -> BlockDevice:
    """Put ``dev`` in place of leg ``index`` (same role) live; returns the old device
    (not closed).

    ``dev`` joins as in :func:`add_leg` (new member, full resync from the legs in sync).
    The old leg may be dead or failed (rebuild) or live: it then simply stops being a
    leg; if it was in sync the others start a new generation.  It is marked as in
    :func:`remove_leg`.

    Raises ConfigError (bad index; ``dev`` already a leg or too small; no other leg in
    sync to copy from), BlockError or MetadataError (``dev`` cannot be opened, read or
    formatted: the old leg stays, failed if it was live).
    """
    _check_index(core, index)
    await _open_new(core, dev)
    async with core.reconfig, core.locks.hold(0, core.size):
        _not_a_leg(core, dev)
        old = core.legs[index]
        if not any(x.state is LegState.IN_SYNC for x in core.legs if x is not old):
            raise ConfigError(f"cannot replace leg {index}: no other leg is in sync to copy "
                              "from", where="node")  # fmt: skip
        if old.state is not LegState.FAILED:
            core.fail(old, BlockError(errno.ECANCELED, "replaced by the operator"))
        await core.settle()
        async with reconfiguring(core):
            store = core.log.swap(index, dev)
            leg = core.legs[index] = Leg(dev, index, LegState.FAILED, reason="joining",
                                         opened=True)  # fmt: skip
            try:
                await _join(core, leg)
            except BaseException:
                await _unjoin(core, leg)
                core.log.swap(index, old.dev, store)
                core.legs[index] = old
                raise
            old.index = -1
            await _write_members(core)
        await _changed(core)
        await core.log.retire(store)
    log.info("%s: leg %d: %s replaced by %s", core.name, index, old.dev.name, dev.name)
    return old.dev


async def _open_new(core: MirrorCore, dev: BlockDevice) -> None:
    """Open a joining device and check it: ConfigError if it is a leg already (also
    reached another way: same member UUID) or too small."""
    _not_a_leg(core, dev)
    await dev.open()
    rs = core.regions.region_size
    if core.log.persistent:
        need = member_size_for(core.size, rs)
        try:
            ok = layout_for(dev.size, rs).data_size >= core.size
        except ValueError:
            ok = False
    else:
        need, ok = core.size, dev.size >= core.size
    if not ok:
        meta = " plus metadata" if core.log.persistent else ""
        raise ConfigError(
            f"{dev.name or 'the new leg'} is too small: {dev.size} bytes; a leg of "
            f"{core.name!r} needs at least {need} ({core.size} bytes of data{meta})",
            where="node",
        )
    member = await core.log.member_of(dev)
    if member is not None:
        raise ConfigError(f"{dev.name} is leg {member} of {core.name!r} already "
                          "(same member UUID)", where="node")  # fmt: skip


def _not_a_leg(core: MirrorCore, dev: BlockDevice) -> None:
    for x in core.legs:
        if x.dev is dev:
            raise ConfigError(f"{dev.name} is leg {x.index} already", where="node")


def _check_index(core: MirrorCore, index: int) -> None:
    if not 0 <= index < len(core.legs):
        raise ConfigError(f"no leg {index}: {core.name!r} has legs 0 to "
                          f"{len(core.legs) - 1}", where="node")  # fmt: skip


def _check_remove(core: MirrorCore, index: int) -> None:
    _check_index(core, index)
    if len(core.legs) <= 2:
        raise ConfigError(f"cannot remove leg {index}: a mirror keeps at least two legs "
                          "(replace or fail it instead)", where="node")  # fmt: skip
    if not any(x.state is LegState.IN_SYNC for x in core.legs if x.index != index):
        raise ConfigError(f"leg {index} is the last leg in sync", where="node")
    for x in core.legs[index + 1 :]:
        if x.state is LegState.FAILED:
            raise ConfigError(f"leg {x.index} is failed and would change its role "
                              "unbeknown to it: remove, re-add or replace it first",
                              where="node")  # fmt: skip


async def _join(core: MirrorCore, leg: Leg) -> None:
    """Format the new ``leg`` and attach it for a full resync (BlockError if it fails
    meanwhile; it is detached again)."""
    rh, i = core.regions, leg.index
    await core.log.format_new(i)
    rh.attach(i)  # gets every write from now on; it misses everything before
    rh.missed(i, range(rh.nregions))
    await core.log.adopt_bitmap([i], rh.tracker.bitmap)
    if i in rh.attached:
        await rh.quiet()
    if i not in rh.attached:
        raise BlockError(errno.EIO, f"{core.name}: {leg.dev.name} failed while joining: "
                         f"{leg.reason}")  # fmt: skip
    log.info("%s: leg %d (%s) joins, %d regions to copy", core.name, i, leg.dev.name,
             rh.nregions)  # fmt: skip
    leg.state, leg.reason, leg.resync = LegState.RESYNCING, "new member: full resync", "full"


async def _unjoin(core: MirrorCore, leg: Leg) -> None:
    """Undo :func:`_join` (detach; nothing reports the leg any more)."""
    core.regions.leg_down(leg.index)
    core.log.leg_down(leg.index)
    await core.regions.quiet()


async def _write_members(core: MirrorCore) -> None:
    await core.log.write_members(core.regions.attached, everyone=core.regions.complete())


async def _changed(core: MirrorCore) -> None:
    await core.settle()
    core.caps = intersect_caps([x.dev for x in core.legs if x.opened])
    core.want_resync()
