"""Recovery of a parity array, one region at a time: rebuild and resync, verify.

Theory of operation
-------------------
A region is a run of stripes (member space, :mod:`.core`).  :func:`resync_region` holds
its range lock and resync lock (writes to it wait; everything else flows), reads the
region from every member that holds it, and for each stripe recovers what the
*targets* lack (a returning member's missed regions, a new member's everything) from
the others, data from the parity or parity from the data; an *unsynced* region (dirty at
a crash) gets its parity recomputed from its data.  Only the members whose image
changes are written.  Sparse: when every source reports the region as zeroes (block
status), so is every chunk of it, and the targets get a WRITE_ZEROES instead.  The
engine that drives it over the array -- rate limits, checkpoints, progress -- is the
array's resync (:mod:`dst.array.resync`) on the shared copier, as for a mirror.

:func:`verify_region` recomputes the parity of every stripe of a region from its data
and compares; with ``repair`` it writes the parity it computed.  Stripes with a data
member missing are left out (nothing to compare against).

:func:`fail_member` takes a member out on the operator's word, unless that would leave
fewer members than the data needs.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

import numpy as np

from dst.errors import BlockError, ConfigError
from dst.meta.members import LegState
from dst.targets.copyplan import Moved, Span, region_by_region
from dst.targets.mirror.legs import Leg
from dst.targets.parity.core import ParityCore
from dst.targets.parity.fan import Op, chunk, failures, fan
from dst.targets.parity.gf import Chunk

log = logging.getLogger(__name__)


async def fail_member(core: ParityCore, index: int) -> None:
    """Operator: take member ``index`` out.  ConfigError if too few would be left."""
    leg = core.legs[index]
    in_sync = [x for x in core.legs if x is not leg and x.state is LegState.IN_SYNC]
    if leg.state is not LegState.FAILED and len(in_sync) < core.geometry.data:
        raise ConfigError(f"member {index} cannot go: {core.name} keeps only "
                          f"{len(in_sync)} members in sync", where="node")  # fmt: skip
    core.fail(leg, BlockError(errno.ECANCELED, "failed by the operator"))
    await core.settle()


def _span(core: ParityCore, region: int) -> tuple[int, int]:
    """The region's member range, up to the last whole stripe."""
    off, n = core.region_range(region)
    end = core.geometry.stripes * core.geometry.chunk
    return off, max(0, min(off + n, end) - off)


async def resync_region(core: ParityCore, region: int, targets: Sequence[int]) -> int:
    """Rebuild ``region`` on the attached ``targets`` that miss it and recompute its
    parity if it is unsynced.  Returns the bytes written.  Raises BlockError if too
    few members hold it, a source fails, or the region is unsynced while members are
    missing (its parity cannot be recomputed: the write hole)."""
    rh = core.regions
    off, n = _span(core, region)
    regions = range(region, region + 1)
    async with core.locks.hold(off, max(n, 1)), rh.resync_lock(region) as synced:
        want = [core.legs[t] for t in targets if t in rh.attached and not rh.in_sync(t, region)]
        unsynced = not rh.consistent(regions)
        if n == 0:  # the tail past the last stripe: nothing to hold
            synced.extend([x.index for x in want] + [-1])
            return 0
        if not want and not unsynced:
            return 0
        sources = [x for x in core.legs if x not in want and core.holds(x, regions)]
        if len(sources) < core.geometry.data:
            raise BlockError(errno.EIO, f"{core.name}: region {region}: only {len(sources)} "
                             "members hold it")  # fmt: skip
        if unsynced and len(sources) < len(core.legs) and not core.forced:
            raise BlockError(
                errno.EIO,
                f"{core.name}: region {region} is unsynced and "
                "members are missing: its parity cannot be recomputed",
            )
        written = await _rebuild(core, off, n, sources, want, unsynced)
        synced.extend(x.index for x in want if x.live)
        if unsynced:
            synced.append(-1)
    await core.settle()
    return written


async def resync_span(core: ParityCore, span: Span, targets: Sequence[int]) -> Moved:
    """:func:`resync_region` for each region of ``span`` (each finds its own holes);
    raises the first region's BlockError once the others are done."""
    return Moved(await region_by_region(span, lambda r: resync_region(core, r, targets)))


async def _rebuild(core: ParityCore, off: int, n: int, sources: list[Leg], want: list[Leg],
                   unsynced: bool) -> int:  # fmt: skip
    if await core.zeroes.all_zero(core, sources, off, n):
        ops = [Op(x, off, n, zero=True) for x in want]
    else:
        got = await fan(core, [Op.read(x, off, n) for x in sources])
        bad = {x.index: r for x, r in zip(sources, got, strict=True) if isinstance(r, BlockError)}
        if bad:
            for i, exc in bad.items():
                core.fail(core.legs[i], exc)
            raise next(iter(bad.values()))
        have: dict[int, Chunk] = {x.index: chunk(v) for x, v in zip(sources, got, strict=True)}
        images = _images(core, off, n, have)
        ops = [Op.write(x, off, images[x.index].data) for x in want]
        if unsynced:
            ops += [Op.write(x, off, images[x.index].data) for x in sources
                    if not np.array_equal(images[x.index], have[x.index])]  # fmt: skip
    if unsynced:  # parity rewritten on sources: their block status may change
        with core.writing():
            results = await fan(core, ops)
    else:  # the targets only, which are never asked
        results = await fan(core, ops)
    for i, exc in failures(ops, results).items():
        core.fail(core.legs[i], exc)
    return sum(op.length for op in ops if op.leg.live)


def _images(core: ParityCore, off: int, n: int, have: dict[int, Chunk]) -> list[Chunk]:
    """Every member's bytes of ``[off, off + n)`` made consistent: missing data recovered,
    parity computed from the data."""
    geo = core.geometry
    c, k, m = geo.chunk, geo.data, geo.parity
    images = [np.empty(n, dtype=np.uint8) for _ in core.legs]
    for s in range(off // c, (off + n) // c):
        a = s * c - off
        dms = [geo.data_member(s, i) for i in range(k)]
        pms = [geo.parity_member(s, j) for j in range(m)]
        data: list[Chunk | None] = [have[x][a : a + c] if x in have else None for x in dms]
        if any(d is None for d in data):
            par: list[Chunk | None] = [have[x][a : a + c] if x in have else None for x in pms]
            data = list(core.coder.recover(data, par))
        full = [d for d in data if d is not None]
        for x, d in zip(dms, full, strict=True):
            images[x][a : a + c] = d
        for x, p in zip(pms, core.coder.encode(full), strict=True):
            images[x][a : a + c] = p
    return images


async def verify_span(core: ParityCore, span: Span, *, repair: bool) -> tuple[Moved, list[int]]:
    """:func:`verify_region` for each region of ``span``: the bytes checked, the regions
    whose parity differed."""
    checked, differ = 0, []
    for r in range(span.first, span.stop):
        if await verify_region(core, r, repair=repair):
            differ.append(r)
        checked += _span(core, r)[1]
    return Moved(checked, 0), differ


async def verify_region(core: ParityCore, region: int, *, repair: bool) -> bool:
    """Recompute the parity of ``region``'s stripes; True if some stored parity differs
    (rewritten with ``repair``).  Raises BlockError if a member cannot be read."""
    off, n = _span(core, region)
    if n == 0:
        return False
    regions = range(region, region + 1)
    async with core.locks.hold(off, n):
        legs = [x for x in core.legs if core.holds(x, regions)]
        got = await fan(core, [Op.read(x, off, n) for x in legs])
        for r in got:
            if isinstance(r, BlockError):
                raise r
        have = {x.index: chunk(v) for x, v in zip(legs, got, strict=True)}
        geo = core.geometry
        c = geo.chunk
        fixes: dict[int, Chunk] = {}
        for s in range(off // c, (off + n) // c):
            a = s * c - off
            dms = [geo.data_member(s, i) for i in range(geo.data)]
            if any(x not in have for x in dms):
                continue
            parity = core.coder.encode([have[x][a : a + c] for x in dms])
            for j, p in enumerate(parity):
                x = geo.parity_member(s, j)
                if x in have and not np.array_equal(have[x][a : a + c], p):
                    log.warning("%s: parity %s of stripe %d differs (member %d)", core.name,
                                "PQ"[j], s, x)  # fmt: skip
                    fixes.setdefault(x, have[x].copy())[a : a + c] = p
        if repair and fixes:
            ops = [Op.write(core.legs[x], off, img.data) for x, img in fixes.items()]
            with core.writing():
                results = await fan(core, ops)
            for i, exc in failures(ops, results).items():
                core.fail(core.legs[i], exc)
    return bool(fixes)
