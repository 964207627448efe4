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

Leg timeouts have one clock: :class:`Deadlines` keeps the requests in flight in start
order and one timer sweeps them every quarter of the timeout, with no timer per
request.  The time is the leg's own (DESIGN.md semantics 9: a leg is blamed only for
its own answer time):

* a call times out when it waited ``leg_timeout`` *and its leg answered nothing at all
  for that long* -- a node that keeps answering is busy, not dead, however deep the
  queue a greedy client built up (a silent leg is timed out between 1 and 1.5 times
  ``leg_timeout`` after its last answer);
* a call that waited :data:`STUCK_FACTOR` times ``leg_timeout`` times out anyway (one
  request stuck on a node that answers the others);
* time the daemon's own event loop was held does not count: a sweep that runs late
  (the loop did not run, so nobody could read an answer) restarts every clock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dst.aio import submit_coro, wait_done
from dst.device import BlockDevice, Buffer, Cancel, Done, IOCounters
from dst.errors import BlockError
from dst.meta.members import LegState
from dst.targets.gate import GateDevice

__all__ = ["Deadlines", "Leg", "LegCall", "LegState", "call_leg"]
log = logging.getLogger(__name__)
STUCK_FACTOR = 6  # a call this many leg timeouts old times out even if its leg answers
Silent = Callable[["Leg"], bool]  # is this leg silent (for the request being swept)?


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
    answers: int = 0  # answers so far (the deadline sweep watches it move)
    seen: int = 0  # ``answers`` at the last sweep
    alive_at: float = 0.0  # loop time of the sweep that last saw ``answers`` move
    failures: int = 0  # times it failed (metrics: a leg that flaps)
    timeouts: int = 0  # requests that got no answer within leg_timeout
    node: GateDevice | None = field(init=False, default=None)  # ``dev`` if a gated node

    def __post_init__(self) -> None:
        if isinstance(self.dev, GateDevice):
            self.node = self.dev

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

    __slots__ = ("cancel_", "deadlines", "i", "leg", "node", "over", "owner")

    def __init__(self, owner: Owner, leg: Leg, deadlines: Deadlines | None, i: int = 0) -> None:
        self.owner = owner
        self.leg = leg
        self.deadlines = deadlines
        self.i = i  # the owner's index for it
        self.over = False
        self.cancel_: Cancel | None = None
        self.node: GateDevice | None = None  # a node's gate this call entered inline

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        leg = self.leg
        leg.inflight += 1
        node = leg.node
        if node is not None and not node.gate.closed and node.counters.timing is None:
            # The node's gate, entered inline (dst.targets.gate): finish leaves it.
            node.gate.inflight += 1
            self.node = node
            cancel = node.inner.submit_write(offset, data, fua, self.finish)
            if cancel is not None:  # (every mirrored write comes here twice)
                c = node.counters
                c.writes += 1
                c.write_bytes += len(data)
                if not self.over:  # (_started, inline)
                    self.cancel_ = cancel
                    if self.deadlines is not None:
                        self.deadlines.add(self)
                return
            self.node = None
            node.leave_inline(None)
        dev = leg.dev
        cancel = dev.submit_write(offset, data, fua, self.finish)
        if cancel is None:
            cancel = submit_coro(dev.write(offset, data, fua=fua), self.finish)
        self._started(cancel)

    def gather(self, offset: int, parts: Sequence[Buffer], fua: bool) -> None:
        """A write of ``parts`` end to end: sent as they are where the leg can, else
        joined into one buffer."""
        self.leg.inflight += 1
        dev = self.leg.dev
        cancel = dev.submit_gather(offset, parts, fua, self.finish)
        if cancel is None:
            data = b"".join(parts)
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
        node = self.node
        if node is not None:  # the answer from below: it leaves the node's gate
            self.node = None
            if exc is None:  # (leave_inline, inline: no error to count)
                g = node.gate
                g.inflight -= 1
                if not g.inflight:
                    g.leave_last()
            else:
                node.leave_inline(exc)
        if self.over:
            return  # timed out or stopped before: a late answer is dropped
        self.over = True
        leg = self.leg
        leg.inflight -= 1
        leg.answers += 1
        if self.deadlines is not None and self.cancel_ is not None:
            self.deadlines.discard(self)
        self.cancel_ = None  # answered: nothing to cancel (a canceller may refer to it)
        if exc is not None:
            if not isinstance(exc, BlockError | asyncio.CancelledError):
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
        node, self.node = self.node, None
        self.finish(exc, None)
        self.node = node  # the request below holds the node's gate until it is answered
        if cancel is not None:
            cancel()

    def expire(self, timeout: float) -> None:
        self.leg.timeouts += 1
        self.stop(BlockError(errno.ETIMEDOUT, f"no answer within {timeout} s"))

    def expire_silent(self, timeout: float, silent: Silent) -> bool:
        """Time it out if its leg is ``silent``; True if it is over."""
        if not self.over and silent(self.leg):
            self.expire(timeout)
        return self.over


class Expiring(Protocol):
    """A request that can be timed out (a :class:`LegCall`, or a fan-out of them)."""

    def expire_silent(self, timeout: float, silent: Silent) -> bool:
        """Time out its parts on the legs ``silent`` says are; True if it is over."""
        ...


class Deadlines:
    """Leg requests in flight, oldest first; one sweep timer times out the parts on
    legs silent for ``timeout`` (module docstring).  A fan-out registers once for all
    its legs (they start together).  ``legs`` gives the mirror's legs."""

    def __init__(self, timeout: float, legs: Callable[[], Sequence[Leg]] = tuple) -> None:
        self.timeout = timeout
        self._legs = legs
        self._items: dict[Expiring, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the sweep timer should fire
        self._fresh = 0.0  # clocks count from here at the earliest (after a held loop)

    def add(self, call: Expiring) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._items[call] = loop.time()
        if self._timer is None:
            self._arm(loop)

    def discard(self, call: Expiring) -> None:
        self._items.pop(call, None)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.timeout / 4
        self._timer = loop.call_at(self._due, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        timeout = self.timeout
        if now - self._due > timeout / 4:  # the loop was held: nobody could answer
            log.warning("event loop held for %.1f s: leg timeouts restart", now - self._due)
            self._fresh = now
        for leg in self._legs():
            if leg.answers != leg.seen:
                leg.seen, leg.alive_at = leg.answers, now
        old = []
        for call, started in self._items.items():
            if now - started < timeout:
                break  # later ones are younger
            old.append((call, max(started, self._fresh)))
        for call, since in old:

            def silent(leg: Leg, since: float = since) -> bool:
                quiet = now - max(since, leg.alive_at) >= timeout
                return quiet or now - since >= timeout * STUCK_FACTOR

            if call.expire_silent(timeout, silent):
                self._items.pop(call, None)
        if self._items:
            self._arm(loop)

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
