"""The connection of a remote member, kept up across outages: reconnect, wait, replay.

Theory of operation
-------------------
A :class:`Link` holds one :class:`dst.net.client.NbdClient` at a time.  ``open()``
connects and negotiates once; a first connect that fails is a :class:`BlockError`
naming the node and its URI (it is not retried: the operator sees at once which
member is unreachable).

Every operation runs through :meth:`Link.run`, which takes the current connection
and, when that connection is gone -- a request failed with
:class:`~dst.net.client.ConnectionLost`, or the client is found disconnected --
records the loss once (:meth:`Link.lost`; subscribers hear ``False``) and, with
``reconnect``, starts one background reconnect loop.  The loop retries with
exponential backoff and full jitter (a uniform delay in
``[0, min(backoff_max, backoff_min * 2**n))``).  A new connection is used only if its
export has the size the device had when opened; otherwise it is not the same device:
it is closed, health says why and the loop keeps retrying at the slowest pace.  On
success subscribers hear ``True``.

A request caught by the outage -- before it was sent or while in flight -- waits,
when ``io_timeout`` is positive, until the link is reconnected or ``io_timeout``
seconds after the request started (then ETIMEDOUT), and is replayed on the new
connection.  Every NBD command is idempotent at the block level, so replaying reads,
writes, flush, trim, zeroes, cache and block status is safe.  With ``io_timeout``
None or 0 the request fails at once with EIO (a mirror degrades the leg instead of
stalling).  An error *reply* from the server is a real answer and is never
replayed, nor is a per-request timeout (the connection is still there).  The
waiting requests are :mod:`dst.targets.replay`'s :class:`~dst.targets.replay.Held`,
and a request on a connection's callback fast path that meets the loss goes on as the
same replay in a Task (:class:`~dst.targets.replay.Replayable`).  ``close()`` stops
the loop and fails waiting requests with ESHUTDOWN.

A loss is noticed as soon as the connection is gone, idle or not: TCP connections
carry keepalive (:class:`~dst.net.client.Keepalive`: a peer cut off by the network is
given up after ``keepalive.bound`` seconds, about 10), and a closed or reset
connection is seen at once (:meth:`~dst.net.client.NbdClient.when_lost`).
:meth:`Link.reset` drops the connection on its owner's word (a mirror leg that did not
answer within ``leg_timeout``: a live but silent connection would otherwise never be
replaced), which takes the same path: loss, reconnect, subscribers told.  A reconnect
attempt is bounded by :data:`ATTEMPT_TIMEOUT` (a connect into a partition would
otherwise wait for TCP's SYN retries long after the network is back).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dst import changes
from dst.device import Capabilities, Health
from dst.errors import BlockError, ConfigError, ProtocolError, ServerRefused
from dst.net.address import Address
from dst.net.client import MEMBER_KEEPALIVE, ConnectionLost, Keepalive, NbdClient
from dst.targets.replay import Held

log = logging.getLogger(__name__)

T = TypeVar("T")
Listener = Callable[[bool], None]
ATTEMPT_TIMEOUT = 5.0  # seconds one reconnect attempt may take (connect + handshake)


def backoff_delay(attempt: int, *, low: float, high: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (0-based): full jitter."""
    bound = min(high, low * 2.0 ** min(attempt, 60))
    return rng.uniform(0.0, bound)


class Link:
    """The NBD connection to ``address``, kept up (see the module docstring).
    ``conn`` is the live connection or None; ``size`` and ``caps`` are the export's
    when first opened."""

    def __init__(
        self,
        address: Address,
        *,
        name: str,
        timeout: float,
        request_timeout: float | None,
        reconnect: bool,
        io_timeout: float | None,
        backoff_min: float,
        backoff_max: float,
        rng: random.Random | None,
        keepalive: Keepalive | None = MEMBER_KEEPALIVE,
    ) -> None:
        assert 0 < backoff_min <= backoff_max
        self.address = address
        self._keepalive = keepalive
        self.name = name
        self.size = 0
        self.caps = Capabilities()
        self.conn: NbdClient | None = None
        self.closed = True  # not open (never opened, or closed)
        self._timeout = timeout
        self._request_timeout = request_timeout
        self._reconnect = reconnect  # keep reconnecting in the background after a loss
        self._io_timeout = io_timeout  # how long a request waits for a reconnect (None/0: not)
        self.replays = bool(reconnect and io_timeout)  # a request caught by a loss waits
        self._backoff = (backoff_min, backoff_max)
        self._rng = rng or random.Random()
        self._held = Held()  # requests waiting for a reconnect
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []
        self._attempts = 0
        self._last_error = ""
        self._refused = ""  # why the last connection was not used (size changed)
        self._down_since = 0.0
        self.reconnects = 0  # connections found again after a loss

    @property
    def uri(self) -> str:
        return self.address.uri()

    # --- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        """Connect.  Raises BlockError naming the node and URI when it cannot."""
        if self.conn is not None or not self.closed:
            return
        try:
            conn = await self._connect(self._timeout)
        except ServerRefused as exc:
            raise BlockError(errno.ENXIO, f"{self.name}: {self.uri} refused: {exc}") from None
        except (BlockError, ProtocolError, OSError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            raise BlockError(
                errno.EHOSTUNREACH, f"{self.name}: cannot connect to {self.uri}: {why}"
            ) from None
        self._use(conn)
        self.size = conn.size
        self.caps = conn.caps
        self.closed = False

    async def _connect(self, timeout: float) -> NbdClient:  # noqa: ASYNC109
        return await NbdClient.connect(
            self.address,
            timeout=timeout,
            request_timeout=self._request_timeout,
            keepalive=self._keepalive,
        )

    def _use(self, conn: NbdClient) -> None:
        """``conn`` is the connection from now on; its loss is noticed at once."""
        self.conn = conn
        conn.when_lost(lambda: self.lost(conn, conn.lost))

    def reset(self, reason: str) -> None:
        """Drop the connection (its node did not answer in time): requests in flight
        fail, and the link reconnects in the background as after any loss."""
        conn = self.conn
        if conn is None or self.closed:
            return
        conn.abort(reason)
        self.lost(conn, conn.lost)

    async def close(self) -> None:
        """Stop reconnecting, fail waiting requests (ESHUTDOWN), disconnect.  Idempotent."""
        self.closed = True
        self._held.release()  # waiters see closed
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(False)`` on each loss and ``callback(True)`` on each reconnect.

        Returns the function that unsubscribes.  A callback that raises is logged.
        """
        self._listeners.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return unsubscribe

    def _notify(self, up: bool) -> None:
        changes.changed()
        for callback in list(self._listeners):
            try:
                callback(up)
            except Exception:
                log.exception("%s: connection listener failed", self.name)

    # --- losing and finding the connection --------------------------------------------

    def lost(self, conn: NbdClient, exc: BaseException | None) -> None:
        """Record that ``conn`` is gone (once per connection) and start reconnecting."""
        if self.conn is not conn:
            return  # already known (or a request of an old connection)
        self.conn = None
        self._down_since = time.monotonic()
        self._attempts = 0
        self._last_error = str(exc) if exc is not None else "connection found closed"
        self._refused = ""
        log.warning("%s: lost connection to %s: %s", self.name, self.uri, self._last_error)
        if self._reconnect and not self.closed:
            self._task = asyncio.create_task(self._reconnect_loop(conn), name=f"{self.name}-rc")
            self._task.add_done_callback(self._loop_ended)
        self._notify(False)

    async def _reconnect_loop(self, old: NbdClient) -> None:
        await old.close()  # the transport is gone already; this just releases it
        low, high = self._backoff
        while True:
            conn = await self._attempt()
            if conn is not None:
                break
            failed = self._attempts - 1 if not self._refused else 60  # refused: slowest
            await asyncio.sleep(backoff_delay(failed, low=low, high=high, rng=self._rng))
        down = time.monotonic() - self._down_since
        log.warning(
            "%s: reconnected to %s after %d attempts (%.2fs down)",
            self.name,
            self.uri,
            self._attempts,
            down,
        )
        self._task = None
        self._use(conn)
        self._refused = ""
        self.reconnects += 1
        self._held.release()
        self._notify(True)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: reconnect loop failed", self.name, exc_info=exc)
            self._last_error = f"reconnect loop failed: {exc!r}"
            if self._task is task:
                self._task = None  # health: disconnected, saying why

    async def _attempt(self) -> NbdClient | None:
        """One connect attempt: the new connection if it is usable, else None."""
        self._attempts += 1
        try:
            conn = await self._connect(min(self._timeout, ATTEMPT_TIMEOUT))
        except (
            BlockError,
            ServerRefused,
            ProtocolError,
            OSError,
            TimeoutError,
            ConfigError,
        ) as exc:
            self._last_error = str(exc) or type(exc).__name__
            log.debug("%s: reconnect attempt %d: %s", self.name, self._attempts, exc)
            return None
        if conn.size != self.size:
            await conn.close()
            why = (
                f"export size changed from {self.size} to {conn.size} bytes: "
                "not the same device, not using it"
            )
            if why != self._refused:
                log.error("%s: %s: %s", self.name, self.uri, why)
            self._last_error = self._refused = why
            return None
        if conn.caps != self.caps:
            log.warning("%s: %s came back with other capabilities", self.name, self.uri)
        return conn

    async def _connection(self, started: float) -> NbdClient:
        """The live connection, waiting for a reconnect until ``io_timeout`` after start.

        Raises BlockError: ESHUTDOWN when closed, EIO when not waiting, ETIMEDOUT.
        """
        while True:
            if self.closed:
                raise BlockError(errno.ESHUTDOWN, f"{self.name}: {self.uri} is closed")
            conn = self.conn
            if conn is not None:
                if conn.connected:
                    return conn
                self.lost(conn, None)
            if not self._reconnect or not self._io_timeout:
                why = " (reconnecting)" if self._reconnect else ""
                raise BlockError(errno.EIO, f"{self.name}: not connected to {self.uri}{why}")
            if not await self._held.wait(started + self._io_timeout):
                waited = asyncio.get_running_loop().time() - started
                raise BlockError(
                    errno.ETIMEDOUT,
                    f"{self.name}: {self.uri} did not come back: waited {waited:.1f}s "
                    f"for a reconnect (io_timeout {self._io_timeout:g}s; {self._last_error})",
                ) from None

    async def run(self, op: Callable[[NbdClient], Awaitable[T]]) -> T:
        """Run ``op`` on the live connection; replay it when the connection is lost."""
        started = asyncio.get_running_loop().time()
        while True:
            conn = await self._connection(started)
            try:
                return await op(conn)
            except ConnectionLost as exc:
                self.lost(conn, exc)

    # --- status -----------------------------------------------------------------------

    def health(self) -> Health:
        """connected (over TLS: ``tls`` in the detail, with the server certificate's
        subject); reconnecting; or disconnected (closed, never opened, or lost
        without ``reconnect``).  While reconnecting the detail has ``attempts``,
        ``last_error``, ``down_since`` (seconds since the loss), ``waiting`` (requests
        held for the reconnect) and, when a server answered with another export,
        ``refused`` (why it was not used).  Every detail has ``reconnects``, the
        connections found again after a loss so far."""
        conn = self.conn
        n = {"reconnects": self.reconnects}
        if self.closed:
            return Health("disconnected", n)
        if conn is not None and conn.connected:
            return Health("connected", {"tls": conn.tls.as_dict(), **n} if conn.tls else n)
        if self._task is None:
            return Health("disconnected", {"last_error": self._last_error or "connection lost"} | n)
        detail: dict[str, Any] = {
            **n,
            "attempts": self._attempts,
            "last_error": self._last_error,
            "down_since": round(time.monotonic() - self._down_since, 3),
            "waiting": len(self._held),
        }
        if self._refused:
            detail["refused"] = self._refused
        return Health("reconnecting", detail)
