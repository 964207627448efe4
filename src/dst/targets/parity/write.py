"""Writes of a parity array: one stripe at a time, parity computed without reads when
it can be, from the fewest reads otherwise.

Theory of operation
-------------------
A write holds the member range of the stripes it touches in the range lock (arrival
order: writes to one stripe reach every member one after another, in the same order)
and their regions in the region hash (marked durably dirty on every member first:
semantics 2 and 12).  Then each stripe is written by one of three plans:

* **full stripe** -- every data chunk is new: the parity is computed from the new data
  alone and every member gets its chunk; consecutive full stripes go out as one request
  per member (a member's chunks of consecutive stripes are contiguous);
* **read-modify-write** -- read the old data the write replaces and the old parity
  (over the columns the write touches), parity ^= parity(old ^ new);
* **reconstruct-write** -- read the data chunks the write does not replace, compute the
  parity afresh.

The plan with fewer reads wins (MD's ``rmw_level``; read-modify-write needs every data
member it replaces, reconstruct-write every one it keeps).  When a member the chosen
plan reads is missing (degraded), the stripe is rebuilt: every available chunk is read,
the missing data recovered from the parity (:meth:`~dst.targets.parity.gf.Coder.
recover`), the new data laid over it and the parity recomputed -- only where the parity
is trusted (not unsynced after a crash, :mod:`.core`); elsewhere that is the write hole
and the write fails with EIO rather than writing parity computed from wrong data.

A member that fails a read or a write is failed (it misses the write's regions,
recorded in the region hash; the dirty log's generation rotation is awaited before the
answer, as in the mirror); a stripe whose read failed is planned again without it.  The
write succeeds if no more members than there are parities lack it, else EIO: never a
silent success.  Cancelled halfway, the write's regions are marked unsynced (their
parity is recomputed by the resync).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
from collections.abc import Sequence
from typing import Any

import numpy as np

from dst.device import Buffer
from dst.errors import BlockError
from dst.targets.parity.core import ParityCore
from dst.targets.parity.fan import Op, chunk, failures, fan
from dst.targets.parity.geometry import Piece
from dst.targets.parity.gf import Chunk

MAX_REPLANS = 4  # a stripe planned again after members failed reads, at most


async def write(core: ParityCore, offset: int, data: Buffer, fua: bool) -> None:
    """Write ``data`` at ``offset`` (module docstring).  Raises BlockError (EIO when
    more members than parities lack it, or the write hole)."""
    core.io_ops += 1
    geo = core.geometry
    stripes = geo.stripes_of(offset, len(data))
    moff, mlen = geo.member_range(stripes)
    locks, rh = core.locks, core.regions
    hold = locks.register(moff, mlen)
    try:
        if hold.earlier:
            await locks.wait(hold)
        wid = rh.try_begin_write(moff, mlen) or await rh.begin_write(moff, mlen)
    except BaseException:
        locks.release(hold)
        raise
    failed: dict[int, BlockError] = {}
    try:
        with core.writing():
            await _stripes(core, offset, chunk(data), fua, stripes, failed)
    except asyncio.CancelledError:
        rh.unsynced(rh.regions(moff, mlen))
        raise
    finally:
        for i, exc in failed.items():
            core.fail(core.legs[i], exc)
        rh.end_write(wid, failed)
        locks.release(hold)
    await core.settle()
    if core.lost(stripes) > core.parity:
        raise BlockError(errno.EIO, f"{core.name}: write reached too few members")


async def _stripes(
    core: ParityCore, offset: int, data: Chunk, fua: bool, stripes: range,
    failed: dict[int, BlockError],
) -> None:  # fmt: skip
    """The whole stripes as one run, the partial ones (at most two) each on its own."""
    geo = core.geometry
    w, end = geo.width, offset + len(data)
    whole = range(-(-offset // w), end // w)  # the stripes the write covers entirely
    jobs = []
    if whole:
        at = whole.start * w - offset
        jobs.append(_full(core, whole, data[at : at + len(whole) * w], fua, failed))
    for s in sorted({stripes.start, stripes.stop - 1}):
        if s in whole:
            continue
        lo, hi = max(offset, s * w), min(end, (s + 1) * w)
        pieces = [dataclasses.replace(p, pos=p.pos + lo - offset) for p in geo.pieces(lo, hi - lo)]
        jobs.append(_partial(core, s, pieces, data, fua, failed))
    if len(jobs) == 1:
        await jobs[0]
    else:
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r


async def _full(
    core: ParityCore, stripes: range, data: Chunk, fua: bool, failed: dict[int, BlockError]
) -> None:
    """Consecutive whole stripes: no reads; one request per member (its chunks of
    consecutive stripes are contiguous), sent from the data and parity where they lie."""
    geo = core.geometry
    t, k, m, c, n = len(stripes), geo.data, geo.parity, geo.chunk, geo.members
    cols = data[: t * k * c].reshape(t, k, c)
    parity = core.coder.encode_stripes(cols)
    parts: list[list[Any]] = [[] for _ in range(n)]
    for row, s in enumerate(stripes):
        base = n - 1 - s % n  # P's member; Q and the data follow
        for j in range(m):
            parts[(base + j) % n].append(parity[row, j].data)
        for i in range(k):
            parts[(base + m + i) % n].append(cols[row, i].data)
    avail = core.available(stripes)
    moff = stripes.start * c
    ops = [Op.gather(leg, moff, parts[leg.index], fua) for leg in core.legs if avail[leg.index]]
    failed.update(failures(ops, await fan(core, ops)))


async def _partial(
    core: ParityCore, s: int, pieces: Sequence[Piece], data: Chunk, fua: bool,
    failed: dict[int, BlockError],
) -> None:  # fmt: skip
    """Part of one stripe: read-modify-write, reconstruct-write or a rebuild."""
    for _ in range(MAX_REPLANS):
        if await _partial_once(core, s, pieces, data, fua, failed):
            return
    raise BlockError(errno.EIO, f"{core.name}: stripe {s}: members keep failing")


async def _partial_once(
    core: ParityCore, s: int, pieces: Sequence[Piece], data: Chunk, fua: bool,
    failed: dict[int, BlockError],
) -> bool:  # fmt: skip
    """One attempt; False if a read failed (the member is failed: plan again)."""
    geo, legs = core.geometry, core.legs
    k, m = geo.data, geo.parity
    lo = min(p.offset for p in pieces)
    hi = max(p.offset + p.length for p in pieces)
    width, base = hi - lo, s * geo.chunk
    stripes = range(s, s + 1)
    avail = [ok and i not in failed for i, ok in enumerate(core.available(stripes))]
    dms = [geo.data_member(s, i) for i in range(k)]
    pms = [geo.parity_member(s, j) for j in range(m)]
    new = {p.index: p for p in pieces}
    covered = {i for i, p in new.items() if p.offset == lo and p.length == width}
    keep = [i for i in range(k) if i not in covered]  # reconstruct-write reads these
    par_ok = [j for j in range(m) if avail[pms[j]]]
    rmw_ok = all(avail[dms[i]] for i in new)
    rcw_ok = all(avail[dms[i]] for i in keep)
    if rmw_ok and (not rcw_ok or len(new) + len(par_ok) < len(keep)):
        reads = [Op.read(legs[dms[i]], base + p.offset, p.length) for i, p in new.items()]
        reads += [Op.read(legs[pms[j]], base + lo, width) for j in par_ok]
        got = await fan(core, reads)
        if _failed_reads(reads, got, failed):
            return False
        deltas = [np.zeros(width, dtype=np.uint8) for _ in range(k)]
        for (i, p), old in zip(new.items(), got, strict=False):
            a = p.offset - lo
            deltas[i][a : a + p.length] = chunk(old) ^ data[p.pos : p.pos + p.length]
        dpar = core.coder.encode(deltas)
        parity: list[Chunk | None] = [None] * m
        for j, old in zip(par_ok, got[len(new) :], strict=True):
            parity[j] = chunk(old) ^ dpar[j]
    else:
        wanted = keep if rcw_ok else range(k)
        reads = [Op.read(legs[dms[i]], base + lo, width) for i in wanted if avail[dms[i]]]
        if not rcw_ok:  # degraded: rebuild the stripe's columns from the parity
            if not core.trusted(stripes):
                raise _hole(core, s)
            reads += [Op.read(legs[pms[j]], base + lo, width) for j in par_ok]
        got = await fan(core, reads)
        if _failed_reads(reads, got, failed):
            return False
        by_member = {op.leg.index: chunk(v) for op, v in zip(reads, got, strict=True)}
        cols = [by_member.get(dms[i]) for i in range(k)]
        if not rcw_ok:
            old_par: list[Chunk | None] = [by_member.get(pms[j]) for j in range(m)]
            try:
                cols = list(core.coder.recover(cols, old_par))
            except ValueError:
                raise BlockError(errno.EIO, f"{core.name}: stripe {s}: too many members "
                                 "missing") from None  # fmt: skip
        for i, p in new.items():
            col = cols[i]
            if col is None or i in covered:
                cols[i] = data[p.pos : p.pos + p.length]
            else:
                col = col.copy()
                col[p.offset - lo : p.offset - lo + p.length] = data[p.pos : p.pos + p.length]
                cols[i] = col
        parity = list(core.coder.encode([c for c in cols if c is not None]))
    writes = [Op.write(legs[dms[i]], base + p.offset, data[p.pos : p.pos + p.length].data, fua)
              for i, p in new.items() if avail[dms[i]]]  # fmt: skip
    writes += [Op.write(legs[pms[j]], base + lo, pc.data, fua)
               for j, pc in enumerate(parity) if pc is not None and avail[pms[j]]]  # fmt: skip
    failed.update(failures(writes, await fan(core, writes)))
    return True


def _failed_reads(ops: Sequence[Op], results: Sequence[Any], failed: dict[int, BlockError]
                  ) -> bool:  # fmt: skip
    bad = failures(ops, results)
    failed.update(bad)
    return bool(bad)


def _hole(core: ParityCore, stripe: int) -> BlockError:
    region = core.stripe_regions(range(stripe, stripe + 1)).start
    return BlockError(
        errno.EIO,
        f"{core.name}: stripe {stripe} (region {region}) needs a missing member's data "
        "rebuilt from parity that is not yet recomputed after a crash (write hole)",
    )
