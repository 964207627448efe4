"""An admission gate: count requests in flight, hold new ones while closed, release FIFO.

Theory of operation
-------------------
Device-mapper's suspend, reduced to one small object.  A request *enters* the gate
before it touches the device behind it and *leaves* when it completed.  While the gate
is open, entering costs one attribute test and one integer increment (the caller does
both inline, see :meth:`Gate.admit`)::

    if gate.closed:
        await gate.admit()      # may hold the request; raises BlockError when full
    else:
        gate.inflight += 1
    try:
        ...                     # the request
    finally:
        gate.leave()

:meth:`Gate.close` stops admitting and waits until every request in flight has left
(drain).  Requests arriving while closed wait, each on a future of its own, in a FIFO
queue; :meth:`Gate.open` counts them in flight and wakes them in arrival order.  At
most ``max_held`` requests wait: one more fails at once with ``BlockError(EAGAIN)``
naming the gate, instead of queueing without bound (on the NBD wire it is an EIO).
A held request that is cancelled leaves the queue; a cancelled :meth:`close` opens the
gate again, so an abandoned suspend leaves everything as it was.
"""

from __future__ import annotations

import asyncio
import collections
import errno

from dst.errors import BlockError, ConfigError

DEFAULT_MAX_HELD = 1024


class Gate:
    """Admission control for one device; ``name`` appears in errors."""

    __slots__ = ("_drained", "_held", "closed", "inflight", "max_held", "name")

    def __init__(self, *, name: str = "", max_held: int | None = DEFAULT_MAX_HELD) -> None:
        if max_held is not None and max_held < 0:
            raise ConfigError("max_held cannot be negative", where="max_held")
        self.name = name
        self.max_held = max_held  # None: unbounded
        self.closed = False
        self.inflight = 0  # admitted and not yet left (held requests are not counted)
        self._held: collections.deque[asyncio.Future[None]] = collections.deque()
        self._drained: asyncio.Future[None] | None = None  # exists only while draining

    @property
    def held(self) -> int:
        """Requests waiting for :meth:`open`."""
        return len(self._held)

    async def admit(self) -> None:
        """Enter a closed gate: wait for :meth:`open` (counted in flight once released).

        Raises BlockError(EAGAIN) if ``max_held`` requests already wait.  Call only when
        ``closed`` (the open fast path is ``inflight += 1``); it also works when open.
        """
        if not self.closed:
            self.inflight += 1
            return
        if self.max_held is not None and len(self._held) >= self.max_held:
            msg = f"{self.name or 'device'} is suspended with {len(self._held)} requests held"
            raise BlockError(errno.EAGAIN, msg)
        fut = asyncio.get_running_loop().create_future()
        self._held.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.leave()  # released (counted in flight) but cancelled before running
            elif fut in self._held:
                self._held.remove(fut)
            raise

    def leave(self) -> None:
        """A request admitted by the gate completed (successfully or not)."""
        self.inflight -= 1
        if self.inflight == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def close(self) -> None:
        """Stop admitting; return once nothing is in flight.

        Raises ConfigError if already closed.  If cancelled while draining, the gate
        opens again (held requests are released) and the cancellation propagates.
        """
        if self.closed:
            raise ConfigError(f"{self.name or 'device'} is already suspended")
        self.closed = True
        if self.inflight == 0:
            return
        self._drained = asyncio.get_running_loop().create_future()
        try:
            await self._drained
        except asyncio.CancelledError:
            self.open()
            raise
        finally:
            self._drained = None

    def open(self) -> None:
        """Admit again; release held requests in arrival order.  Idempotent."""
        self.closed = False
        held = self._held
        while held:
            fut = held.popleft()
            if not fut.done():
                self.inflight += 1
                fut.set_result(None)
