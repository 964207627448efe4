"""Streamed answers on the control socket: one request, then lines until either side ends.

Theory of operation
-------------------
Most control requests get one response line.  A handler may instead return a
:class:`Stream` (``dst events``): the server answers ``{"v": 1, "id": N, "ok": true,
"result": {"stream": true}}`` and then writes one line per item put into the stream,
``{"v": 1, "id": N, "item": {...}}``, until the stream is closed (the server ends the
connection) or the client closes its side; the connection carries nothing else from
then on (a client that sends more is disconnected).

A stream is bounded (semantics 9): at most ``limit`` items wait for a client that does
not read; one more ends the stream with a last item ``{"event": "overflow"}`` instead
of growing without bound, so a stuck ``dst events`` costs the daemon nothing more.
The producer (:meth:`Stream.put`) never waits.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

DEFAULT_LIMIT = 10_000  # items a stream holds for a client that does not read
OVERFLOW: dict[str, Any] = {"event": "overflow", "reason": "the client did not keep up"}


class Stream:
    """An open-ended answer (module docstring); ``on_close`` runs once when it ends."""

    def __init__(
        self, *, limit: int = DEFAULT_LIMIT, on_close: Callable[[], None] | None = None
    ) -> None:
        self.limit = limit
        self.closed = False
        self._items: collections.deque[dict[str, Any]] = collections.deque()
        self._ready = asyncio.Event()
        self._on_close = on_close

    def put(self, item: dict[str, Any]) -> None:
        """Queue ``item`` for the client (dropped once closed; over ``limit`` the stream
        ends with :data:`OVERFLOW`)."""
        if self.closed:
            return
        if len(self._items) >= self.limit:
            self._items.append(OVERFLOW)
            self.close()
            return
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        """No more items: the client gets what is queued, then the end.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._ready.set()
        if self._on_close is not None:
            self._on_close()

    async def get(self) -> dict[str, Any] | None:
        """The next item; None once closed and drained."""
        while not self._items:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()
