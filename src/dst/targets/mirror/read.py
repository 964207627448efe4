"""Reads of a mirror: one leg serves, a failure is retried elsewhere and repaired.

Theory of operation
-------------------
A read goes to the least busy leg that holds every region of the request (ties rotate:
:meth:`~dst.targets.mirror.core.MirrorCore.read_order`).  :class:`MirrorRead` sends it
there as a :class:`~dst.targets.mirror.legs.LegCall` -- with no coroutine when the leg
has a fast path -- and hands the data on.  If that leg fails (an error, or no answer
within ``leg_timeout``: then the hung leg is failed and gets nothing more), the read
goes on as :func:`read_repair`: under the range lock, so no write can slip between the
good read and the repair, the other legs holding the regions are tried in turn and the
good data is written back to the legs that failed.  When no leg holds the whole range
(a leg resyncing holds some regions only), the read is split by region
(:func:`read_split`).  The coroutine face is the callback face plus a wait.

The leg helpers :func:`leg_read` and :func:`leg_write` are also what recovery (resync,
verify) uses: every request to a leg is a LegCall, timed by the one clock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from functools import partial
from typing import Any

from dst.aio import submit_coro, wait_done
from dst.device import Buffer, Cancel, Done
from dst.errors import BlockError
from dst.targets.mirror.core import MirrorCore
from dst.targets.mirror.legs import Leg, LegCall, call_leg

log = logging.getLogger(__name__)


def submit_read(core: MirrorCore, offset: int, length: int, done: Done) -> Cancel:
    """Start a read (module docstring); ``done(None, data)`` or ``done(error, None)``."""
    core.io_ops += 1
    return MirrorRead(core, offset, length, done).start()


class MirrorRead:
    """One read: a leg call, then (if it fails) the retry-and-repair in a Task."""

    __slots__ = ("call", "core", "done", "length", "offset", "order", "retry")

    def __init__(self, core: MirrorCore, offset: int, length: int, done: Done) -> None:
        self.core = core
        self.offset = offset
        self.length = length
        self.done = done
        self.order: list[Leg] = []
        self.call: LegCall | None = None
        self.retry: Cancel | None = None  # the canceller of the retry, once it runs

    def start(self) -> Cancel:
        core = self.core
        regions = core.regions.regions(self.offset, self.length)
        order = self.order = core.read_order(regions)
        if order:
            self.call = LegCall(self, order[0], core.deadlines)
            self.call.read(self.offset, self.length)
        elif len(regions) > 1:
            self.retry = submit_coro(read_split(core, self.offset, self.length), self.done)
        else:
            self.done(BlockError(errno.EIO, f"{core.name}: no leg holds this range"), None)
        return self.cancel

    def leg_done(self, call: LegCall, exc: BaseException | None, value: Any) -> None:
        self.call = None  # (it refers back to this read: no cycle for the collector)
        leg = call.leg
        if exc is None:
            leg.counters.reads += 1
            leg.counters.read_bytes += self.length
            self.done(None, value)
        elif not isinstance(exc, BlockError):  # cancelled
            self.done(exc, None)
        else:
            _failed_read(self.core, leg, exc)
            retry = read_repair(self.core, self.order[1:], [leg], self.offset, self.length, exc)
            self.retry = submit_coro(retry, self.done)

    def cancel(self) -> None:
        if self.retry is not None:
            self.retry()
        elif self.call is not None:
            self.call.stop(asyncio.CancelledError())


def _failed_read(core: MirrorCore, leg: Leg, exc: BlockError) -> None:
    log.info("%s: read failed on leg %d: %r", core.name, leg.index, exc)
    if exc.errno == errno.ETIMEDOUT:
        core.fail(leg, exc)  # hung: it gets nothing more


async def leg_read(core: MirrorCore, leg: Leg, offset: int, length: int) -> Buffer:
    """Read from one leg (a hung leg is failed).  Raises its BlockError."""
    try:
        data: Buffer = await call_leg(leg, core.deadlines, lambda c: c.read(offset, length))
    except BlockError as exc:
        _failed_read(core, leg, exc)
        raise
    leg.counters.reads += 1
    leg.counters.read_bytes += length
    return data


async def leg_write(core: MirrorCore, leg: Leg, offset: int, data: Buffer) -> None:
    """Write to one leg.  Raises its BlockError (the caller decides about the leg)."""
    await call_leg(leg, core.deadlines, lambda c: c.write(offset, data, False))
    leg.counters.writes += 1
    leg.counters.write_bytes += len(data)


async def read_repair(
    core: MirrorCore, rest: list[Leg], bad: list[Leg], offset: int, length: int, last: BlockError
) -> Buffer:
    """Retry on ``rest`` under the range lock; write the good data to ``bad``.
    Raises the last error if no leg can serve the range."""
    async with core.locks.hold(offset, length):
        regions = core.regions.regions(offset, length)
        for leg in rest:
            if not core.holds(leg, regions):
                continue
            try:
                data = await leg_read(core, leg, offset, length)
            except BlockError as exc:
                bad.append(leg)
                last = exc
                continue
            await repair(core, bad, offset, data)
            return data
    raise last


async def repair(core: MirrorCore, bad: list[Leg], offset: int, data: Buffer) -> None:
    """Rewrite ``data`` on the live legs of ``bad``; a leg that fails that is failed."""
    for leg in bad:
        if not leg.live:
            continue
        try:
            await leg_write(core, leg, offset, data)
        except BlockError as exc:
            core.fail(leg, exc)
            continue
        log.info("%s: repaired %d bytes at %d on leg %d", core.name, len(data), offset,
                 leg.index)  # fmt: skip


def _start_read(core: MirrorCore, offset: int, length: int, done: Done) -> Cancel:
    return MirrorRead(core, offset, length, done).start()


async def read_split(core: MirrorCore, offset: int, length: int) -> Buffer:
    """No leg holds the whole range: read it region by region."""
    rs = core.regions.region_size
    out = bytearray()
    pos, end = offset, offset + length
    while pos < end:
        n = min(end, (pos // rs + 1) * rs) - pos
        out += await wait_done(partial(_start_read, core, pos, n))
        pos += n
    return out
