"""Mirror legs and the one way to send a request to a leg: :class:`LegCall`.

Theory of operation
-------------------
A :class:`Leg` is one child device of a mirror with its state (:class:`LegState`), its
requests in flight, its I/O counters and why it failed.

Every request the mirror sends to a leg -- the legs' parts of a write, a read, a flush,
a resync copy, a read repair, a metadata page -- is a :class:`LegCall`.  It starts the
request on the device's callback fast path when the device has one (:mod:`dst.device`)
and as a coroutine otherwise (:func:`dst.aio.submit_coro`), and reports to its owner
exactly once: the device's answer, ``ETIMEDOUT`` when the leg did not answer within the
mirror's ``leg_timeout``, or ``CancelledError`` when the owner stopped it.  A request
that raised anything but a :class:`~dst.errors.BlockError` is a bug in the layer below:
it is logged and counts as the leg's ``EIO``.

Leg timeouts have one clock: :class:`Deadlines` keeps the calls in flight in start
order and one timer sweeps them every quarter of the timeout, so a leg that does not
answer is timed out between 1 and 1.25 times ``leg_timeout``, with no timer per request.
The time is the leg's own: a call's clock starts when it is sent to that leg.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from dst.aio import submit_coro, wait_done
from dst.device import BlockDevice, Buffer, Cancel, Done, IOCounters
from dst.errors import BlockError
from dst.meta.members import LegState

__all__ = ["Deadlines", "Leg", "LegCall", "LegState", "call_leg"]
log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Leg:
    """One mirror leg: its device, state and statistics."""

    dev: BlockDevice
    index: int
    state: LegState = LegState.IN_SYNC
    inflight: int = 0
    counters: IOCounters = field(default_factory=IOCounters)
    reason: str = ""
    opened: bool = False
    failures: int = 0  # times it failed (metrics: a leg that flaps)
    timeouts: int = 0  # requests that got no answer within leg_timeout
    resync: str = "delta"  # what its next resync is: full (new, or re-added fully) or delta

    @property
    def live(self) -> bool:
        """Not failed: it gets writes (and, for regions it holds, reads)."""
        return self.state is not LegState.FAILED

    def status(self) -> dict[str, Any]:
        return {
            "name": self.dev.name,
            "state": str(self.state),
            "reason": self.reason,
            "inflight": self.inflight,
            "counters": self.counters.as_dict(),
            "health": self.dev.health().state,
        }


class Owner(Protocol):
    """What a :class:`LegCall` reports to."""

    def leg_done(self, call: LegCall, exc: BaseException | None, value: Any) -> None: ...


class LegCall:
    """One request on one leg (module docstring); ``owner.leg_done`` exactly once."""

    __slots__ = ("cancel_", "deadlines", "i", "leg", "over", "owner")

    def __init__(self, owner: Owner, leg: Leg, deadlines: Deadlines | None, i: int = 0) -> None:
        self.owner = owner
        self.leg = leg
        self.deadlines = deadlines
        self.i = i  # the owner's index for it
        self.over = False
        self.cancel_: Cancel | None = None

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        self.leg.inflight += 1
        dev = self.leg.dev
        cancel = dev.submit_write(offset, data, fua, self.finish)
        if cancel is None:
            cancel = submit_coro(dev.write(offset, data, fua=fua), self.finish)
        self._started(cancel)

    def read(self, offset: int, length: int) -> None:
        self.leg.inflight += 1
        dev = self.leg.dev
        cancel = dev.submit_read(offset, length, self.finish)
        if cancel is None:
            cancel = submit_coro(dev.read(offset, length), self.finish)
        self._started(cancel)

    def run(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Any other request, as a coroutine on the leg's device."""
        self.leg.inflight += 1
        self._started(submit_coro(coro, self.finish))

    def _started(self, cancel: Cancel) -> None:
        if self.over:  # completed before its submit returned
            return
        self.cancel_ = cancel
        if self.deadlines is not None:
            self.deadlines.add(self)

    def finish(self, exc: BaseException | None, value: Any) -> None:
        """The leg's answer (also: a timeout or a stop)."""
        if self.over:
            return  # timed out or stopped before: a late answer is dropped
        self.over = True
        leg = self.leg
        leg.inflight -= 1
        if self.deadlines is not None and self.cancel_ is not None:
            self.deadlines.discard(self)
        if exc is not None and not isinstance(exc, BlockError | asyncio.CancelledError):
            log.error("leg %d (%s): unexpected error", leg.index, leg.dev.name, exc_info=exc)
            exc = BlockError(errno.EIO, f"leg {leg.index}: internal error: {exc!r}")
        if isinstance(exc, BlockError):
            leg.counters.errors += 1
        self.owner.leg_done(self, exc, value)

    def stop(self, exc: BaseException) -> None:
        """End it now with ``exc`` and cancel the request (it may still reach the leg)."""
        if self.over:
            return
        cancel = self.cancel_
        self.finish(exc, None)
        if cancel is not None:
            cancel()

    def expire(self, timeout: float) -> None:
        self.leg.timeouts += 1
        self.stop(BlockError(errno.ETIMEDOUT, f"no answer within {timeout} s"))


class Deadlines:
    """Leg calls in flight, oldest first; one sweep timer expires those past ``timeout``."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._items: dict[LegCall, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, call: LegCall) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._items[call] = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self.timeout / 4, self._sweep)

    def discard(self, call: LegCall) -> None:
        self._items.pop(call, None)

    def _sweep(self) -> None:
        self._timer = None
        assert self._loop is not None
        limit = self._loop.time() - self.timeout
        expired = []
        for call, started in self._items.items():
            if started > limit:
                break
            expired.append(call)
        for call in expired:
            self._items.pop(call, None)
            call.expire(self.timeout)
        if self._items:
            self._timer = self._loop.call_later(self.timeout / 4, self._sweep)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Waiter:
    """The owner of a single :func:`call_leg`: hands the answer to ``done``."""

    __slots__ = ("done",)

    def __init__(self, done: Done) -> None:
        self.done = done

    def leg_done(self, call: LegCall, exc: BaseException | None, value: Any) -> None:
        self.done(exc, value)


async def call_leg(
    leg: Leg,
    deadlines: Deadlines | None,
    start: Callable[[LegCall], None],
) -> Any:
    """One request on ``leg`` as a coroutine: ``start(call)`` sends it (e.g.
    ``lambda c: c.read(off, n)``); returns its value or raises its error (BlockError,
    ETIMEDOUT included)."""

    def submit(done: Done) -> Cancel:
        call = LegCall(_Waiter(done), leg, deadlines)
        start(call)
        return lambda: call.stop(asyncio.CancelledError())

    return await wait_done(submit)
