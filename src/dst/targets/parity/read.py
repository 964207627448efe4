"""Reads of a parity array: straight from the data members, rebuilt when one is missing.

Theory of operation
-------------------
A read maps to the data chunk pieces it covers (:meth:`~dst.targets.parity.geometry.
Geometry.pieces`).  When every member holding one is available -- live, and not missing
the piece's region -- :class:`ParityRead` sends each piece to its member as a
:class:`~dst.targets.mirror.legs.LegCall` (no coroutine when the member has a fast path)
and hands the data on; nothing is locked, as in a plain stripe.

Otherwise (a member missing, or a piece that failed) the read goes on as
:func:`read_rebuilding` in a Task, stripe by stripe under the stripe's range lock (so no
write changes data and parity between the reads): pieces whose member answers are read,
the others are recovered from the rest of their stripe's columns and the parity -- only
where the parity is trusted (not unsynced after a crash), else EIO (the write hole,
never a silent wrong answer).  A member that failed a read with an error gets the
recovered data written back (read repair, as the mirror's); one that timed out, or
fails the repair, is failed.  The coroutine face is the callback face plus a wait.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Sequence
from typing import Any

from dst.aio import submit_coro
from dst.device import Buffer, Cancel, Done
from dst.errors import BlockError
from dst.targets.mirror.legs import LegCall
from dst.targets.parity.core import ParityCore
from dst.targets.parity.fan import Op, chunk, failures, fan
from dst.targets.parity.geometry import Piece
from dst.targets.parity.gf import Chunk

log = logging.getLogger(__name__)


def submit_read(core: ParityCore, offset: int, length: int, done: Done) -> Cancel:
    """Start a read; ``done(None, data)`` or ``done(error, None)``."""
    core.io_ops += 1
    return ParityRead(core, offset, length, done).start()


class ParityRead:
    """One read: a leg call per member (one span covering its pieces: the parity chunks
    between them are read too, fewer requests are cheaper), then (if any failed) the
    rebuild in a Task."""

    __slots__ = ("buf", "calls", "core", "done", "left", "length", "offset", "retry", "spans")

    def __init__(self, core: ParityCore, offset: int, length: int, done: Done) -> None:
        self.core = core
        self.offset = offset
        self.length = length
        self.done = done
        self.spans: list[tuple[int, list[Piece]]] = []  # (member offset, its pieces)
        self.calls: list[LegCall] = []
        self.buf: bytearray | None = None
        self.left = 0
        self.retry: Cancel | None = None

    def start(self) -> Cancel:
        core = self.core
        geo = core.geometry
        c = geo.chunk
        rh = core.regions
        by_member: dict[int, list[Piece]] = {}
        for p in geo.pieces(self.offset, self.length):
            x = geo.data_member(p.stripe, p.index)
            leg = core.legs[x]
            if not (leg.live and rh.holds(x, rh.regions(p.stripe * c + p.offset, p.length))):
                return self._rebuild({})
            by_member.setdefault(x, []).append(p)
        self.spans = [(ps[0].stripe * c + ps[0].offset, ps) for ps in by_member.values()]
        if len(by_member) > 1 or len(next(iter(by_member.values()))) > 1:
            self.buf = bytearray(self.length)
        self.left = len(by_member)
        self.calls = [LegCall(self, core.legs[x], core.deadlines, i)
                      for i, x in enumerate(by_member)]  # fmt: skip
        for call, (start, ps) in zip(self.calls, self.spans, strict=True):
            last = ps[-1]
            call.read(start, last.stripe * c + last.offset + last.length - start)
        return self.cancel

    def leg_done(self, call: LegCall, exc: BaseException | None, value: Any) -> None:
        if self.retry is not None or self.left <= 0:
            return
        start, pieces = self.spans[call.i]
        if exc is not None:
            self.left = -1
            for other in self.calls:
                if other is not call:
                    other.stop(asyncio.CancelledError())
            if not isinstance(exc, BlockError):
                self.done(exc, None)
                return
            if exc.errno == errno.ETIMEDOUT:
                self.core.fail(call.leg, exc)  # hung: it gets nothing more
            self._rebuild({})  # which stripe failed is found stripe by stripe
            return
        c = call.leg.counters
        c.reads += 1
        c.read_bytes += len(value)
        self.left -= 1
        buf = self.buf
        if buf is None:
            self.done(None, value)
            return
        chunk = self.core.geometry.chunk
        view = memoryview(value)
        for p in pieces:
            at = p.stripe * chunk + p.offset - start
            buf[p.pos : p.pos + p.length] = view[at : at + p.length]
        if not self.left:
            self.done(None, buf)

    def _rebuild(self, errors: dict[tuple[int, int], BlockError]) -> Cancel:
        coro = read_rebuilding(self.core, self.offset, self.length, errors)
        self.retry = submit_coro(coro, self.done)
        return self.cancel

    def cancel(self) -> None:
        if self.retry is not None:
            self.retry()
        else:
            for call in self.calls:
                call.stop(asyncio.CancelledError())


async def read_rebuilding(
    core: ParityCore, offset: int, length: int, failed: dict[tuple[int, int], BlockError]
) -> Buffer:
    """The read, stripe by stripe under the range lock (module docstring); ``failed``:
    the (member, stripe) pieces that failed already."""
    geo = core.geometry
    out = bytearray(length)
    by_stripe: dict[int, list[Piece]] = {}
    for p in geo.pieces(offset, length):
        by_stripe.setdefault(p.stripe, []).append(p)
    for s, pieces in by_stripe.items():
        errors = {i: exc for (i, st), exc in failed.items() if st == s}
        async with core.locks.hold(s * geo.chunk, geo.chunk):
            await _read_stripe(core, s, pieces, out, errors)
    return out


async def _read_stripe(
    core: ParityCore, s: int, pieces: Sequence[Piece], out: bytearray,
    errors: dict[int, BlockError],
) -> None:  # fmt: skip
    geo, legs = core.geometry, core.legs
    base = s * geo.chunk
    for _ in range(geo.members):
        avail = [ok and i not in errors for i, ok in enumerate(core.available(range(s, s + 1)))]
        direct = [p for p in pieces if avail[geo.data_member(s, p.index)]]
        reads = [Op.read(legs[geo.data_member(s, p.index)], base + p.offset, p.length)
                 for p in direct]  # fmt: skip
        got = await fan(core, reads)
        bad = failures(reads, got)
        if bad:
            _note(core, bad, errors)
            continue
        for p, data in zip(direct, got, strict=True):
            out[p.pos : p.pos + p.length] = data
        rest = [p for p in pieces if not avail[geo.data_member(s, p.index)]]
        if not rest:
            return
        if await _recover(core, s, rest, avail, out, errors):
            return
    raise BlockError(errno.EIO, f"{core.name}: stripe {s}: no members left to read it")


async def _recover(
    core: ParityCore, s: int, rest: Sequence[Piece], avail: list[bool], out: bytearray,
    errors: dict[int, BlockError],
) -> bool:  # fmt: skip
    """Recover ``rest`` (pieces on missing members); False if a read failed (again)."""
    geo, legs = core.geometry, core.legs
    k, m, base = geo.data, geo.parity, s * geo.chunk
    if not core.trusted(range(s, s + 1)):
        region = core.stripe_regions(range(s, s + 1)).start
        raise BlockError(
            errno.EIO,
            f"{core.name}: stripe {s} (region {region}) cannot be "
            "rebuilt: its parity is not recomputed since a crash (write hole)",
        )
    lo = min(p.offset for p in rest)
    hi = max(p.offset + p.length for p in rest)
    members = [geo.data_member(s, i) for i in range(k)] + [geo.parity_member(s, j)
                                                            for j in range(m)]  # fmt: skip
    reads = [Op.read(legs[x], base + lo, hi - lo) for x in members if avail[x]]
    got = await fan(core, reads)
    bad = failures(reads, got)
    if bad:
        _note(core, bad, errors)
        return False
    have = {op.leg.index: chunk(v) for op, v in zip(reads, got, strict=True)}
    cols: list[Chunk | None] = [have.get(x) for x in members]
    try:
        data = core.coder.recover(cols[:k], cols[k:])
    except ValueError:
        raise BlockError(errno.EIO, f"{core.name}: stripe {s}: too many members missing"
                         ) from None  # fmt: skip
    for p in rest:
        out[p.pos : p.pos + p.length] = data[p.index][p.offset - lo : p.offset - lo + p.length].data
    await _repair(core, s, rest, errors, out)
    return True


def _note(core: ParityCore, bad: dict[int, BlockError], errors: dict[int, BlockError]) -> None:
    for i, exc in bad.items():
        log.info("%s: read failed on member %d: %r", core.name, i, exc)
        errors[i] = exc
        if exc.errno == errno.ETIMEDOUT:
            core.fail(core.legs[i], exc)  # hung: it gets nothing more


async def _repair(core: ParityCore, s: int, rest: Sequence[Piece],
                  errors: dict[int, BlockError], out: bytearray) -> None:  # fmt: skip
    """Write recovered pieces back to live members that failed to read them."""
    geo = core.geometry
    writes = [Op.write(core.legs[x], s * geo.chunk + p.offset, out[p.pos : p.pos + p.length])
              for p in rest if (x := geo.data_member(s, p.index)) in errors
              and core.legs[x].live]  # fmt: skip
    with core.writing():
        results = await fan(core, writes)
    for i, exc in failures(writes, results).items():
        core.fail(core.legs[i], exc)
    for op in writes:
        if op.leg.live:
            log.info("%s: repaired %d bytes on member %d", core.name, op.length, op.leg.index)
