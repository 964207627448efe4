"""Mutations of a mirror: one fan-out to every live leg, with two faces.

Theory of operation
-------------------
A WRITE, WRITE_ZEROES, TRIM or FLUSH is one :class:`Mutation`: it sends its part to
every attached leg at once (the region hash's set: a leg that gets no write must have it
recorded as missed, so the two never disagree), a
:class:`~dst.targets.mirror.legs.LegCall` each (the leg's fast path when it has one, its
coroutine otherwise), collects every answer, and *settles* once, by one policy:

* every leg that failed (an error, or no answer within ``leg_timeout``) is failed and
  misses the mutation's regions (recorded in the region hash, so it is resynced);
* the mutation succeeds if a leg that held all its regions acknowledged it (for a flush:
  a current leg), and fails with EIO otherwise -- never a silent success;
* a fast zero that some legs cannot do fails with ENOTSUP and fails no leg (the legs
  that did zero make the others miss the range);
* when a leg failure must first be made durable (the dirty log is *unsettled*), the
  answer waits for that (in a Task); otherwise it is given at once;
* cancelled from above, the legs still running are stopped and every attached leg but
  the first misses the regions: the legs may differ now, the first one is the source.

Admission: a mutation holds its byte range in the mirror's :class:`RangeLock` (arrival
order, so overlapping mutations reach every leg in the same order; the mutation is its
own :class:`~dst.targets.rangelock.Hold`) and its regions in the region hash (marked
durably dirty first).  :func:`submit_mutation` -- the callback
face of :mod:`dst.device` -- registers the range at once; when the range is free and the
regions are marked already (the steady state) the mutation starts right there, with no
coroutine, Task or future; otherwise a coroutine waits for the lock and the marks and
then starts the *same* mutation.  The coroutine face of every operation is the callback
face plus a wait (:func:`dst.aio.wait_done`).
"""

from __future__ import annotations

import asyncio
import enum
import errno
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from dst.aio import submit_coro, wait_done
from dst.device import BlockDevice, Buffer, Cancel, Done
from dst.errors import BlockError
from dst.targets.mirror.core import MirrorCore
from dst.targets.mirror.legs import LegCall, Silent
from dst.targets.rangelock import Hold

LegOp = Callable[[BlockDevice], Coroutine[Any, Any, Any]]


class Kind(enum.Enum):
    WRITE = "write"
    ZERO = "zero"
    TRIM = "trim"
    FLUSH = "flush"


# the members as plain globals: ``Kind.WRITE`` costs ~130 ns per lookup (Python 3.11)
_WRITE, _ZERO, _TRIM, _FLUSH = Kind.WRITE, Kind.ZERO, Kind.TRIM, Kind.FLUSH


def submit_mutation(
    core: MirrorCore,
    kind: Kind,
    offset: int,
    length: int,
    done: Done,
    *,
    data: Buffer = b"",
    fua: bool = False,
    op: LegOp | None = None,
) -> Cancel:
    """Start a mutation (module docstring); ``done(error, None)`` when it settled.

    ``data``/``fua`` for a write; ``op`` for the others: what to run on each leg's
    device.  Returns the canceller.
    """
    core.io_ops += 1
    m = Mutation(core, kind, offset, length, done, data, fua, op)
    if kind is _FLUSH:
        return m.go()
    m.locked = True
    core.locks.add(m)  # arrival order, before anything else
    if not m.earlier:
        m.wid = core.rh.try_begin_write(offset, length)
        if m.wid:
            return m.go()
    return submit_coro(_admit(m), done)


async def _admit(m: Mutation) -> None:
    """Wait for the range lock and the regions' marks, then run the mutation."""
    core = m.core
    try:
        if m.earlier:
            await core.locks.wait(m)
        m.wid = await core.regions.begin_write(m.offset, m.length)
    except BaseException:
        core.locks.release(m)
        raise
    await wait_done(m.run)


class Mutation(Hold):
    """One mutation in flight on every live leg (module docstring), and its hold of
    the range lock."""

    __slots__ = (
        "calls",
        "cancelled",
        "core",
        "data",
        "done",
        "fua",
        "kind",
        "left",
        "length",
        "locked",
        "offset",
        "op",
        "results",
        "wid",
    )

    def __init__(
        self,
        core: MirrorCore,
        kind: Kind,
        offset: int,
        length: int,
        done: Done,
        data: Buffer,
        fua: bool,
        op: LegOp | None,
    ) -> None:
        # the Hold's attributes (Hold.__init__, inline: every write comes here)
        self.start = offset
        self.end = offset + length
        self.earlier: list[Hold] | None = None
        self.first = self.last = -1
        self.waiters: list[asyncio.Future[None]] | None = None
        self.released = False
        self.locked = False  # registered in the range lock (a flush is not)
        self.core = core
        self.kind = kind
        self.offset = offset
        self.length = length
        self.wid = 0  # its write id in the region hash (0: none)
        self.done = done
        self.data = data
        self.fua = fua
        self.op = op
        self.cancelled = False
        # set when it starts (go): calls, results, left

    calls: Sequence[LegCall]  # its call on each leg it goes to (none once settled)
    results: list[BaseException | None] | None  # per call its error; None: no error
    left: int  # calls not answered yet

    def run(self, done: Done) -> Cancel:
        """Start it, admitted, with ``done`` as its completion."""
        self.done = done
        return self.go()

    def go(self) -> Cancel:
        core = self.core
        attached = core.rh.attached  # the legs that get writes: what they miss is recorded
        calls: list[LegCall] = []
        for leg in core.legs:  # (a loop, not a comprehension: every write comes here)
            if leg.index in attached:
                calls.append(LegCall(self, leg, None, len(calls)))
        self.calls = calls
        self.results = None
        self.left = len(calls)
        if not calls:
            self.settle()
            return self.cancel
        # One deadline for the fan-out: its legs start together (Deadlines).
        if self.kind is _WRITE:
            offset, data, fua = self.offset, self.data, self.fua
            for call in calls:
                call.write(offset, data, fua)
        else:
            op = self.op
            assert op is not None
            for call in calls:
                call.run(op(call.leg.dev))
        if self.left and core.deadlines is not None:
            core.deadlines.add(self)
        return self.cancel

    def expire_silent(self, timeout: float, silent: Silent) -> bool:
        """``leg_timeout`` passed: the legs ``silent`` says did not answer (ETIMEDOUT);
        True once every leg answered or timed out."""
        for call in self.calls:
            call.expire_silent(timeout, silent)
        return not self.left

    def _holders(self) -> list[bool]:
        """Per leg: does it hold the regions (a flush: the current generation)?"""
        core = self.core
        if not self.wid:
            current = core.log.current
            return [call.leg.index in current for call in self.calls]
        rh = core.rh
        regions = rh.regions(self.offset, self.length)
        return [rh.holds(call.leg.index, regions) for call in self.calls]

    def _held(self) -> bool:
        """A leg that acknowledged holds the regions: the common case checks one leg
        (every leg acknowledged: ``settle`` asks only then), and one missing nothing
        holds them."""
        t = self.core.rh.tracker
        down, oos = t.down, t.oos
        for call in self.calls:  # (no generator: every write comes here)
            i = call.leg.index
            if i not in down and oos[i].empty():
                return True
        rh = self.core.rh
        regions = rh.regions(self.offset, self.length)
        return any(rh.holds(call.leg.index, regions) for call in self.calls)

    def leg_done(self, call: LegCall, exc: BaseException | None, value: Any) -> None:
        if exc is None:
            c = call.leg.counters
            kind = self.kind
            if kind is _WRITE:
                c.writes += 1
                c.write_bytes += self.length
            elif kind is _ZERO:
                c.zeroes += 1
            elif kind is _TRIM:
                c.trims += 1
            else:
                c.flushes += 1
        else:
            if self.results is None:
                self.results = [None] * len(self.calls)
            self.results[call.i] = exc
        self.left -= 1
        if not self.left:
            self.settle()

    def cancel(self) -> None:
        """Stop waiting for the legs (see the module docstring)."""
        if self.left and not self.cancelled:
            self.cancelled = True
            for call in self.calls:
                call.stop(asyncio.CancelledError())

    def settle(self) -> None:
        """Every leg answered: the verdict, then ``done``."""
        core = self.core
        if self.calls and core.deadlines is not None:
            core.deadlines.discard(self)
        if self.cancelled:
            missed: set[int] = set()
            if self.wid:
                missed.update(sorted(core.regions.attached)[1:])
                core.resync_wanted.set()
            self._end(missed)
            self.done(asyncio.CancelledError(), None)
            return
        if self.wid and self.results is None and not core.log.unsettled and self._held():
            self._end(())  # the common case: nothing to degrade or record
            self.done(None, None)
            return
        calls = self.calls
        results = self.results or [None] * len(calls)
        held = any(r is None and h for r, h in zip(results, self._holders(), strict=True))
        failed = [(c.leg, r) for c, r in zip(calls, results, strict=True) if r is not None]
        missed = set()
        err: BlockError | None = None
        if self.kind is _ZERO and failed and all(_is_enotsup(e) for _, e in failed):
            if len(failed) < len(calls):  # some legs zeroed: the others must get it
                missed.update(leg.index for leg, _ in failed)
                core.resync_wanted.set()
            err = BlockError(errno.ENOTSUP, "fast zero not supported")
        else:
            for leg, e in failed:
                missed.add(leg.index)
                core.fail(leg, e)
        if err is None and not held:
            err = core.no_holder(self.kind.value)
        if core.log.unsettled:  # a leg failure must be durable first: go on in a Task
            submit_coro(self._settle_durably(missed, err), self.done)
            return
        self._end(missed)
        self.done(err, None)

    async def _settle_durably(self, missed: set[int], err: BlockError | None) -> None:
        try:
            await self.core.settle()
        finally:
            self._end(missed)
        if err is not None:
            raise err

    def _end(self, missed: set[int] | tuple[()]) -> None:
        # Its calls refer back to it: let go of them, so that no cycle is left for the
        # garbage collector (a pass over the young objects every few hundred writes).
        self.calls = ()
        core = self.core
        if self.wid:
            core.rh.end_write(self.wid, missed)  # (rh: no property call)
        if self.locked:
            core.locks.release(self)


def _is_enotsup(exc: BaseException) -> bool:
    return isinstance(exc, BlockError) and exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
