"""Recovery primitives of a mirror: fail and re-add a leg, resync a region.

Theory of operation
-------------------
A resync of one region holds the region's range lock and its resync lock in the
region hash, so writes to *that* region wait while
writes and reads elsewhere keep flowing, and a write that raced the copy is applied
after it on every leg.  The engines that drive them over a whole mirror, with rate
limits and progress, are the array's (:mod:`dst.array.resync`, on the shared region
copier; spans of regions: :mod:`.spans`); what is here does one region and the
bookkeeping around it:

* :func:`resync_region` copies a region from a leg holding it to the attached targets
  missing it; :func:`resync_checkpoint` persists how far a full resync got;
  :func:`resync_done` makes a target that holds every region a full member (it adopts
  the current generation).
* :func:`readd` brings a failed leg back after the dirty log checked who it is: a delta
  resync of what it missed if its generation allows, a full one otherwise; split brain
  is refused.  When every leg failed, the one that failed last holds every acknowledged
  write: :func:`readmit` takes it back as it is, in sync, and the others are then
  re-added from it (DESIGN.md semantics 10; MD's ``--force``, DRBD's *Consistent*).
* :func:`fail_leg` takes a leg out on the operator's word.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

from dst import changes
from dst.aio import gather_all
from dst.errors import BlockError, ConfigError
from dst.meta.bitmap import Bitmap
from dst.targets.mirror.core import MirrorCore
from dst.targets.mirror.dirtylog import ReaddPlan
from dst.targets.mirror.legs import Leg, LegState
from dst.targets.mirror.read import leg_read, leg_write

log = logging.getLogger(__name__)


async def fail_leg(core: MirrorCore, index: int) -> None:
    """Operator: take leg ``index`` out (maintenance); its misses are recorded.

    Raises ConfigError if it is the last leg in sync.
    """
    leg = core.legs[index]
    others = [x for x in core.legs if x is not leg and x.state is LegState.IN_SYNC]
    if leg.state is not LegState.FAILED and not others:
        raise ConfigError(f"leg {index} is the last leg in sync", where="node")
    core.fail(leg, BlockError(errno.ECANCELED, "failed by the operator"))
    await core.settle()


async def resync_region(core: MirrorCore, region: int, targets: Sequence[int]) -> int:
    """Copy ``region`` from a leg holding it to the attached ``targets`` missing it.

    Returns the bytes written (summed over targets).  Raises BlockError if no leg
    holding the region can be read.
    """
    rh = core.regions
    off, n = core.region_range(region)
    async with core.locks.hold(off, n), rh.resync_lock(region) as synced:
        want = [core.legs[t] for t in targets
                if t in rh.attached and not rh.in_sync(t, region)]  # fmt: skip
        if not want:
            return 0
        src = [x for x in core.read_order(range(region, region + 1)) if x not in want]
        data = await read_any(core, src, off, n)
        results = await gather_all([_outcome(core, x, off, data) for x in want])
        for leg, exc in zip(want, results, strict=True):
            if exc is None:
                synced.append(leg.index)
            else:
                core.fail(leg, exc)
    await core.settle()
    return n * len(synced)


async def _outcome(core: MirrorCore, leg: Leg, offset: int, data: bytes | bytearray | memoryview
                   ) -> BlockError | None:  # fmt: skip
    try:
        await leg_write(core, leg, offset, data)
    except BlockError as exc:
        return exc
    return None


async def read_any(core: MirrorCore, legs: list[Leg], offset: int, length: int
                   ) -> bytes | bytearray | memoryview:  # fmt: skip
    """The range from the first of ``legs`` that can read it (BlockError if none)."""
    last = BlockError(errno.EIO, f"{core.name}: no leg holds this region")
    for leg in legs:
        try:
            return await leg_read(core, leg, offset, length)
        except BlockError as exc:
            last = exc
    raise last


async def resync_checkpoint(core: MirrorCore, region: int | None, targets: Sequence[int]) -> None:
    """Persist that ``targets`` hold every region below ``region`` (resumable)."""
    async with core.reconfig:  # legs gone since the resync began are left out
        rh = core.regions
        legs = [t for t in targets if t < len(core.legs) and t in rh.attached
                and t not in core.log.current]  # fmt: skip
        await core.log.set_resync_pos(region, legs)


async def resync_done(core: MirrorCore, index: int) -> bool:
    """``index`` holds every region: make it a full member.  False if it does not."""
    rh = core.regions
    async with core.reconfig:  # not while legs are renumbered
        if index >= len(core.legs) or index not in rh.attached or rh.missing(index):
            return False
        leg = core.legs[index]
        if index not in core.log.current:
            everyone = len(core.log.current) + 1 == len(core.legs) and rh.complete()
            await core.log.leg_synced(index, everyone=everyone)
        if index in core.log.current:
            leg.state, leg.reason = LegState.IN_SYNC, ""
            log.info("%s: leg %d (%s) is in sync", core.name, index, leg.dev.name)
            changes.changed()
        return leg.state is LegState.IN_SYNC


async def readd(core: MirrorCore, index: int, *, full: bool = False) -> ReaddPlan:
    """Bring failed leg ``index`` back: delta resync if its generation allows, full
    resync otherwise (or with ``full``); the copy itself is the array's resync
    (``resync_wanted`` is set).  When every leg failed, the leg that failed last is
    re-admitted instead (:func:`readmit`) and the others wait for it.

    Raises ConfigError (leg not failed), BlockError (the leg cannot be opened or its
    metadata written; no leg in sync to copy from) or MetadataError (foreign member,
    split brain).
    """
    rh = core.regions
    leg = core.legs[index]
    if leg.state is not LegState.FAILED:
        raise ConfigError(f"leg {index} is {leg.state}, not failed", where="node")
    if not core.log.current:
        last = core.last_standing
        if last is leg and not full:
            return await readmit(core, index)
        raise BlockError(errno.EIO, f"{core.name}: no leg in sync is left" + (
            f"; leg {last.index} ({last.dev.name}) failed last and holds every "
            "acknowledged write: it comes back first (by itself when its node "
            f"answers, or: dst readd {last.dev.name})" if last is not None else ""))  # fmt: skip
    await core.settle()
    if not leg.opened:
        await leg.dev.open()
        leg.opened = True
    relation, whole = await core.log.readd(index, full=full)
    regions: range | Bitmap = range(rh.nregions) if whole else rh.tracker.oos[index]
    count = len(regions) if isinstance(regions, range) else regions.count()
    plan = ReaddPlan(index, relation, whole, count)
    # Attached, it gets every write from now on; what it lacks is marked at the same
    # point in time (no await in between), so no write slips past both.
    rh.attach(index)
    rh.missed(index, regions)
    leg.state, leg.reason = LegState.RESYNCING, f"re-added: {plan.relation}"
    changes.changed()
    await core.log.adopt_bitmap([index], rh.tracker.bitmap)
    if index not in rh.attached:  # it failed again while being given the bitmap
        raise BlockError(errno.EIO, f"{core.name}: leg {index} failed while re-added: "
                         f"{leg.reason}")  # fmt: skip
    log.info("%s: leg %d re-added (%s), %d regions to copy", core.name, index,
             plan.relation, plan.regions)  # fmt: skip
    if not rh.missing(index):
        await resync_done(core, index)
    core.want_resync()
    return plan


async def readmit(core: MirrorCore, index: int) -> ReaddPlan:
    """Every leg failed and leg ``index`` failed last: it holds every acknowledged
    write (nothing was acknowledged after it failed), so it comes back in sync as it
    is; what it was recorded as missing (writes that failed on every leg) the others
    miss too.  Writes go on once the whole bitmap is on it; the survivors' new
    generation makes the others behind (delta).

    Raises BlockError (it cannot be opened or written) or MetadataError (it is not the
    member that failed: another disk, or its generation moved).
    """
    leg = core.legs[index]
    if not leg.opened:
        await leg.dev.open()
        leg.opened = True
    await core.log.readmit(index)
    rh = core.regions
    rh.readmit(index)
    why = "re-admitted: every leg had failed and it failed last (it holds every acknowledged write)"
    leg.state, leg.reason = LegState.IN_SYNC, why
    core.last_standing = None
    core.readmitted += 1
    await rh.quiet()
    await core.settle()
    log.warning("%s: leg %d (%s) %s", core.name, index, leg.dev.name, why)
    core.want_resync()
    return ReaddPlan(index, "readmitted", False, 0)
