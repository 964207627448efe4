"""Requests to several members at once, every outcome kept: :func:`fan`.

Each request is a :class:`~dst.targets.mirror.legs.LegCall` (the member's fast path
when it has one, timed by the array's one clock); one future waits for all of them, so
a stripe's reads or writes cost one future, not a task each.  Successful calls count in
the member's I/O counters.  Cancelled, the calls still running are stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dst.device import Buffer
from dst.errors import BlockError
from dst.targets.mirror.core import MirrorCore
from dst.targets.mirror.legs import Leg, LegCall


@dataclass(frozen=True, slots=True)
class Op:
    """One request: a read of ``length`` bytes or a write of ``data`` (or of the buffers
    ``parts`` end to end) at ``offset``."""

    leg: Leg
    offset: int
    length: int = 0
    data: Buffer | None = None
    fua: bool = False
    zero: bool = False  # write_zeroes of ``length`` bytes (may punch)
    flush: bool = False
    parts: Sequence[Buffer] = ()

    @classmethod
    def read(cls, leg: Leg, offset: int, length: int) -> Op:
        return cls(leg, offset, length)

    @classmethod
    def write(cls, leg: Leg, offset: int, data: Buffer, fua: bool = False) -> Op:
        return cls(leg, offset, len(data), data, fua)

    @classmethod
    def gather(cls, leg: Leg, offset: int, parts: Sequence[Buffer], fua: bool = False) -> Op:
        return cls(leg, offset, sum(map(len, parts)), b"", fua, parts=parts)


class _Fan:
    __slots__ = ("fut", "left", "ops", "results")

    def __init__(self, ops: Sequence[Op], fut: asyncio.Future[None]) -> None:
        self.ops = ops
        self.fut = fut
        self.left = len(ops)
        self.results: list[Any] = [None] * len(ops)

    def leg_done(self, call: LegCall, exc: BaseException | None, value: Any) -> None:
        op = self.ops[call.i]
        c = op.leg.counters
        if exc is None:
            if op.flush:
                c.flushes += 1
            elif op.data is None and not op.zero:
                c.reads += 1
                c.read_bytes += op.length
            else:
                c.writes += 1
                c.write_bytes += op.length
        self.results[call.i] = exc if exc is not None else value
        self.left -= 1
        if not self.left and not self.fut.done():
            self.fut.set_result(None)


async def fan(core: MirrorCore, ops: Sequence[Op]) -> list[Any]:
    """Run ``ops`` at once; per op its value (read data, None for a write) or its
    BlockError (ETIMEDOUT when the member did not answer in time)."""
    if not ops:
        return []
    fut = asyncio.get_running_loop().create_future()
    f = _Fan(ops, fut)
    calls = [LegCall(f, op.leg, core.deadlines, i) for i, op in enumerate(ops)]
    for call, op in zip(calls, ops, strict=True):
        if op.flush:
            call.run(op.leg.dev.flush())
        elif op.zero:
            dev, off, n = op.leg.dev, op.offset, op.length
            call.run(dev.write_zeroes(off, n, fua=op.fua, punch=True))
        elif op.data is None:
            call.read(op.offset, op.length)
        elif op.parts:
            call.gather(op.offset, op.parts, op.fua)
        else:
            call.write(op.offset, op.data, op.fua)
    if f.left:
        try:
            await fut
        except asyncio.CancelledError:
            for call in calls:
                call.stop(asyncio.CancelledError())
            raise
    return f.results


def failures(ops: Sequence[Op], results: Sequence[Any]) -> dict[int, BlockError]:
    """The members whose op failed, by index, with their error."""
    return {op.leg.index: r for op, r in zip(ops, results, strict=True)
            if isinstance(r, BlockError)}  # fmt: skip


def chunk(data: Buffer) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A read-only uint8 view of ``data`` (no copy)."""
    return np.frombuffer(data, dtype=np.uint8)
