"""Requests caught by a lost connection: held until the link is back, then replayed.

Theory of operation
-------------------
:class:`~dst.targets.reconnect.Link` owns the policy -- whether a request caught by an
outage waits, for how long, and what it fails with -- and runs every request through
:meth:`~dst.targets.reconnect.Link.run`.  This module is the two pieces that policy
works with, and that know nothing of connecting.

:class:`Held` is the set of requests waiting for a reconnect.  Each waits on a bare
future and a timer, not ``asyncio.timeout``, because the NBD server runs the first
step of a request eagerly, outside any task; :meth:`Held.release` lets them all go on
at once (the link is back, or closed: each looks at the link again), and a timer that
fires first lets one go with False (it fails with ETIMEDOUT).  Its length is the
``waiting`` count of the link's health.

:class:`Replayable` is the other face of the same replay (STYLE 12): a request on a
connection's callback fast path (:mod:`dst.device`) that meets the loss goes on as
:meth:`Replaying.run` in a Task, and the canceller handed out for it reaches whichever
of the two is running.  It needs of its link only :class:`Replaying`: record the loss,
run the request again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from dst.aio import submit_coro
from dst.device import Cancel, Done
from dst.net.client import ConnectionLost, NbdClient

T = TypeVar("T")


def _settle(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


class Held:
    """The requests waiting for a reconnect (see the module docstring)."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[bool]] = set()

    def __len__(self) -> int:
        return len(self._waiters)

    def release(self) -> None:
        """Let every waiting request go on (the link is back, or closed)."""
        for waiter in self._waiters:
            _settle(waiter, True)

    async def wait(self, deadline: float) -> bool:
        """Wait for :meth:`release` until loop time ``deadline``; False: expired."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.add(waiter)
        timer = loop.call_at(deadline, _settle, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiters.discard(waiter)


class Replaying(Protocol):
    """What a :class:`Replayable` needs of its link (:class:`~dst.targets.reconnect.Link`)."""

    def lost(self, conn: NbdClient, exc: BaseException | None) -> None:
        """Record that ``conn`` is gone."""

    async def run(self, op: Callable[[NbdClient], Awaitable[T]]) -> T:
        """Run ``op`` on the live connection, replaying it when the connection is lost."""


class Replayable:
    """A request on a connection's fast path that goes on as a replay in a Task
    (:meth:`Replaying.run`) if the connection is lost; the canceller handed out reaches
    whichever of the two is running."""

    __slots__ = ("conn", "done", "link", "op", "running")

    def __init__(
        self,
        link: Replaying,
        conn: NbdClient,
        done: Done,
        op: Callable[[NbdClient], Awaitable[Any]],
    ) -> None:
        self.link = link
        self.conn = conn
        self.done = done
        self.op = op
        self.running: Cancel | None = None

    def finish(self, exc: BaseException | None, value: Any) -> None:
        if exc is not None and isinstance(exc, ConnectionLost):
            self.link.lost(self.conn, exc)
            self.running = submit_coro(self.link.run(self.op), self.done)
        else:
            self.done(exc, value)

    def started(self, cancel: Cancel | None) -> Cancel | None:
        """What the submit returns, given the connection's canceller (None: refused)."""
        if cancel is None:
            return None
        if self.running is None:  # not replaying already
            self.running = cancel
        return self.cancel

    def cancel(self) -> None:
        if self.running is not None:
            self.running()
