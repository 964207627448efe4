"""The mirror's callback fast path: a write to every leg, a read from one, no coroutine.

Theory of operation
-------------------
:meth:`MirrorDevice.submit_write <dst.targets.mirror.MirrorDevice.submit_write>` (see
the fast path in :mod:`dst.device`) takes a write only in the steady state, where the
coroutine path would not wait for anything either: the range lock is uncontended and,
with region tracking, :meth:`IntentLog.try_begin_write
<dst.targets.intent.IntentLog.try_begin_write>` registers it at once (the metadata is
dirty, every region's mark durable, no resync on it).  Otherwise it registers nothing
and the caller runs the coroutine path, which waits for those things.

A taken write (:class:`FanOutWrite`) is submitted to every writable leg; a leg whose
device has no fast path right now runs its coroutine instead
(:func:`dst.aio.submit_coro`), so one slow leg never sends the others back.  Each
leg's completion records its outcome; the last one settles the write with the very
methods the coroutine path uses: plain mode :meth:`MirrorDevice._settle`, tracked mode
:meth:`MirrorDevice._degrade` for the legs that failed, EIO unless a leg holding the
regions acknowledged, then ``end_write`` and the lock release.  Only when a leg failure
must be made durable first (``intent.unsettled``) does the settling continue in a Task.

A read (:class:`FanOutRead`) goes to the leg the coroutine path would choose; if it
fails, the coroutine path's retry-and-repair on the other legs runs in a Task.

``leg_timeout``: one :class:`Deadlines` per mirror keeps the fast requests in flight
in submission order and one timer sweeps them every quarter of the timeout, so a leg
that does not answer is timed out between 1 and 1.25 times ``leg_timeout`` (ETIMEDOUT,
as on the coroutine path) without a timer per request.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from dst.aio import submit_coro
from dst.device import Buffer, Cancel, Done
from dst.errors import BlockError

if TYPE_CHECKING:
    from dst.targets.mirror import Leg, MirrorDevice
    from dst.targets.rangelock import Hold

log = logging.getLogger(__name__)
_PENDING: Any = object()  # a leg's outcome not known yet


class Deadlines:
    """Fast requests in flight, oldest first; ``expire()`` the ones past ``timeout``."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._items: dict[FanOutWrite | FanOutRead, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: FanOutWrite | FanOutRead) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._items[item] = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self.timeout / 4, self._sweep)

    def discard(self, item: FanOutWrite | FanOutRead) -> None:
        self._items.pop(item, None)

    def _sweep(self) -> None:
        self._timer = None
        assert self._loop is not None
        limit = self._loop.time() - self.timeout
        expired = []
        for item, started in self._items.items():
            if started > limit:
                break
            expired.append(item)
        for item in expired:
            del self._items[item]
            item.expire()
        if self._items:
            self._timer = self._loop.call_later(self.timeout / 4, self._sweep)


def _leg_error(mirror: MirrorDevice, leg: Leg, exc: BaseException) -> BaseException:
    """A leg's failure as the coroutine path sees it: BlockErrors count as the leg's
    errors; anything else is a bug, logged and turned into EIO."""
    if isinstance(exc, BlockError):
        leg.counters.errors += 1
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return exc
    log.error("%s: leg %d: unexpected error", mirror.name, leg.index, exc_info=exc)
    leg.counters.errors += 1
    return BlockError(errno.EIO, f"leg {leg.index}: internal error: {exc!r}")


def submit_write(
    mirror: MirrorDevice, offset: int, data: Buffer, fua: bool, done: Done
) -> Cancel | None:
    """:meth:`MirrorDevice.submit_write`: see the module docstring."""
    n = len(data)
    locks = mirror.locks
    hold = locks.register(offset, n)  # arrival order, as the coroutine path
    if hold.earlier:
        locks.release(hold)  # nothing happened in between: its retry keeps the order
        return None
    intent = mirror.intent
    wid = 0
    if intent is not None:
        wid = intent.try_begin_write(offset, n)
        if not wid:
            locks.release(hold)
            return None
    mirror.io_ops += 1
    legs: list[Leg] = []
    holders: list[bool] | None = None
    if intent is None:
        for leg in mirror.legs:
            if leg.writable:
                legs.append(leg)
            else:
                mirror.leg_missed(leg, offset, n)
    else:
        legs = [leg for leg in mirror.legs if leg.writable]
        regions = intent.tracker.regions(offset, n)
        holders = [intent.holds(leg.index, regions) for leg in legs]
    w = FanOutWrite(mirror, offset, n, legs, holders, hold, wid, done)
    for i, leg in enumerate(legs):
        leg.inflight += 1
        finish = partial(w.leg_done, i)
        cancel = leg.dev.submit_write(offset, data, fua, finish)
        if cancel is None:
            cancel = submit_coro(leg.dev.write(offset, data, fua=fua), finish)
        w.cancels[i] = cancel
    if not legs:
        w.settle()
    elif w.left and mirror.deadlines is not None:
        mirror.deadlines.add(w)
    return w.cancel


class FanOutWrite:
    """One write in flight on every writable leg (module docstring)."""

    __slots__ = (
        "cancelled",
        "cancels",
        "done",
        "hold",
        "holders",
        "left",
        "legs",
        "length",
        "mirror",
        "offset",
        "results",
        "wid",
    )

    def __init__(
        self,
        mirror: MirrorDevice,
        offset: int,
        length: int,
        legs: list[Leg],
        holders: list[bool] | None,
        hold: Hold,
        wid: int,
        done: Done,
    ) -> None:
        self.mirror = mirror
        self.offset = offset
        self.length = length
        self.legs = legs
        self.holders = holders
        self.hold = hold
        self.wid = wid
        self.done = done
        self.results: list[Any] = [_PENDING] * len(legs)
        self.cancels: list[Cancel | None] = [None] * len(legs)
        self.left = len(legs)
        self.cancelled = False

    def leg_done(self, i: int, exc: BaseException | None, _: Any) -> None:
        if self.results[i] is not _PENDING:
            return  # timed out or cancelled before
        leg = self.legs[i]
        leg.inflight -= 1
        if exc is None:
            leg.counters.writes += 1
            leg.counters.write_bytes += self.length
        else:
            exc = _leg_error(self.mirror, leg, exc)
        self.results[i] = exc
        self.left -= 1
        if not self.left:
            self.settle()

    def _stop_pending(self, outcome: BaseException) -> None:
        """Give every leg still running ``outcome``, cancel its request, then settle."""
        for i, result in enumerate(self.results):
            if result is not _PENDING:
                continue
            leg = self.legs[i]
            leg.inflight -= 1
            if isinstance(outcome, BlockError):
                leg.counters.errors += 1
            self.results[i] = outcome
            self.left -= 1
            cancel = self.cancels[i]
            if cancel is not None:
                cancel()  # its late completion finds the outcome set, and is dropped
        if not self.left:
            self.settle()

    def expire(self) -> None:
        """``leg_timeout`` passed: the legs that did not answer failed (ETIMEDOUT)."""
        timeout = self.mirror.leg_timeout
        self._stop_pending(BlockError(errno.ETIMEDOUT, f"no answer within {timeout} s"))

    def cancel(self) -> None:
        """Stop waiting (the legs may differ now: the others are resynced from the
        first attached leg, as when a coroutine write is cancelled)."""
        if self.left:
            self.cancelled = True
            self._stop_pending(asyncio.CancelledError())

    def settle(self) -> None:
        """Every leg answered: the coroutine path's verdict, then done()."""
        m = self.mirror
        if m.deadlines is not None:
            m.deadlines.discard(self)
        intent = m.intent
        results = self.results
        if (
            intent is not None
            and not self.cancelled
            and not any(results)  # every leg acknowledged (all None)
            and not intent.unsettled
            and any(self.holders or ())
        ):  # the common case: nothing to degrade or record
            self._end(set())
            self.done(None, None)
            return
        outcomes = list(zip(self.legs, results, strict=True))
        err: BaseException | None = None
        if intent is None:
            if self.cancelled:  # a cancel from above fails no leg (as on the coroutine path)
                m.locks.release(self.hold)
                self.done(asyncio.CancelledError(), None)
                return
            try:
                m._settle("write", outcomes, self.offset, self.length)
            except BlockError as exc:
                err = exc
            m.locks.release(self.hold)
            self.done(err, None)
            return
        missed: set[int] = set()
        if self.cancelled:
            missed.update(sorted(intent.attached)[1:])
            m.resync_wanted.set()
            self._end(missed)
            self.done(asyncio.CancelledError(), None)
            return
        assert self.holders is not None
        held = any(r is None and h for r, h in zip(self.results, self.holders, strict=True))
        failed = [(leg, exc) for leg, exc in outcomes if exc is not None]
        if failed:
            m._degrade("write", len(self.legs), failed, missed)
        if intent.unsettled:  # a leg failure must be durable first: go on in a Task
            submit_coro(self._settle_durably(missed, held), self.done)
            return
        self._end(missed)
        self.done(None if held else self._no_holder(), None)

    async def _settle_durably(self, missed: set[int], held: bool) -> None:
        intent = self.mirror.intent
        assert intent is not None
        try:
            await intent.settle()
        finally:
            self._end(missed)
        if not held:
            raise self._no_holder()

    def _end(self, missed: set[int]) -> None:
        intent = self.mirror.intent
        assert intent is not None
        intent.end_write(self.wid, missed)
        self.mirror.locks.release(self.hold)

    def _no_holder(self) -> BlockError:
        return BlockError(errno.EIO, f"{self.mirror.name}: write reached no leg in sync")


def submit_read(mirror: MirrorDevice, offset: int, length: int, done: Done) -> Cancel | None:
    """:meth:`MirrorDevice.submit_read`: see the module docstring."""
    order = mirror._read_order(mirror._regions(offset, length))
    if not order:
        return None  # split by region, or EIO: the coroutine path says which
    r = FanOutRead(mirror, order, offset, length, done)
    leg = order[0]
    leg.inflight += 1
    cancel = leg.dev.submit_read(offset, length, r.leg_done)
    if cancel is None:
        leg.inflight -= 1
        return None
    mirror.io_ops += 1
    r.leg_cancel = cancel
    if not r.finished and mirror.deadlines is not None:
        mirror.deadlines.add(r)
    return r.cancel


class FanOutRead:
    """One read in flight on one leg; a failure goes on as the coroutine path's
    retry on the other legs, with read repair."""

    __slots__ = ("done", "finished", "leg_cancel", "length", "mirror", "offset", "order", "retry")

    def __init__(
        self, mirror: MirrorDevice, order: list[Leg], offset: int, length: int, done: Done
    ) -> None:
        self.mirror = mirror
        self.order = order
        self.offset = offset
        self.length = length
        self.done = done
        self.finished = False
        self.leg_cancel: Cancel | None = None
        self.retry: Cancel | None = None  # the canceller of the retry, once it runs

    def leg_done(self, exc: BaseException | None, value: Any) -> None:
        if self.finished:
            return
        self.finished = True
        m = self.mirror
        if m.deadlines is not None:
            m.deadlines.discard(self)
        leg = self.order[0]
        leg.inflight -= 1
        if exc is None:
            leg.counters.reads += 1
            leg.counters.read_bytes += self.length
            self.done(None, value)
            return
        exc = _leg_error(m, leg, exc)
        if not isinstance(exc, BlockError):
            self.done(exc, None)
            return
        log.info("%s: read failed on leg %d: %r", m.name, leg.index, exc)
        if exc.errno == errno.ETIMEDOUT:
            m._fail(leg, exc)  # hung: it gets nothing more
        retry = m._read_repair(self.order[1:], [leg], self.offset, self.length, exc)
        self.retry = submit_coro(retry, self.done)

    def expire(self) -> None:
        timeout = self.mirror.leg_timeout
        self._stop(BlockError(errno.ETIMEDOUT, f"no answer within {timeout} s"))

    def cancel(self) -> None:
        if self.retry is not None:
            self.retry()
        else:
            self._stop(asyncio.CancelledError())

    def _stop(self, outcome: BaseException) -> None:
        if self.finished:
            return
        cancel, self.leg_cancel = self.leg_cancel, None
        self.leg_done(outcome, None)
        if cancel is not None:
            cancel()
