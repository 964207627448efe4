"""Memory budgets: the bytes of payload in flight, per connection and per process.

Theory of operation
-------------------
Every byte a client makes the server hold is *charged*: the data of a READ from the
moment it is dispatched until its reply left our transport buffer, a WRITE's payload
from the moment its bytes arrive until the request completes.  A connection may hold at
most its own limit (``per_connection``); all connections of a process together at most
the process's :class:`Budget` (``limit``).  A connection over either stops parsing and
reading: what it has not read stays in the kernel's socket buffer, so a greedy or
hostile client slows itself, not the others.  One request is always let through when
nothing is held at all (a request larger than a limit must still be served).

A waiting connection is woken, in arrival order, when bytes are given back.  Reply
bytes a client does not read stay charged (they are memory) -- such a client also stops
being served, and a connection whose client neither reads its replies nor sends the
payload it announced for ``stall_timeout`` seconds is closed (:class:`Holdings`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from dst.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 512 << 20  # bytes of payload a process holds for its clients
DEFAULT_PER_CONNECTION = 64 << 20  # ... and one connection
DEFAULT_MAX_CONNECTIONS = 256  # clients one server serves at once
DEFAULT_STALL_TIMEOUT = 60.0  # seconds a client may leave replies unread or a payload half sent
RECHECK = 0.05  # seconds between looks at a transport buffer that is not empty


class Budget:
    """Bytes a process may hold for its clients (module docstring)."""

    def __init__(
        self, limit: int = DEFAULT_LIMIT, *, per_connection: int = DEFAULT_PER_CONNECTION
    ) -> None:
        if limit <= 0 or per_connection <= 0:
            raise ConfigError("must be positive", where="--memory-budget")
        self.limit = limit
        self.per_connection = min(per_connection, limit)
        self.used = 0
        self.peak = 0
        self.waiting: collections.OrderedDict[int, Callable[[], None]] = collections.OrderedDict()

    def allowance(self, held: int) -> int:
        """Bytes a connection holding ``held`` may take now (<= 0: none)."""
        return min(self.per_connection - held, self.limit - self.used)

    def room(self, held: int) -> tuple[int, bool]:
        """:meth:`allowance`, and whether nothing is held anywhere (one request may then
        go, however large): what a connection asks before each batch, in one call."""
        return self.allowance(held), not held and not self.used

    def charge(self, delta: int) -> None:
        """Take (``delta`` > 0) or give back (< 0) bytes; giving back wakes waiters."""
        self.used += delta
        if self.used > self.peak:
            self.peak = self.used
        if delta < 0 and self.waiting:
            self.wake()

    def wait(self, key: int, wake: Callable[[], None]) -> None:
        """Call ``wake()`` once bytes are given back (once per registration)."""
        if key not in self.waiting:
            self.waiting[key] = wake

    def forget(self, key: int) -> None:
        self.waiting.pop(key, None)

    def wake(self) -> None:
        """Wake waiters in arrival order while there is room; one that is still short
        waits again, behind the others."""
        items = list(self.waiting.items())
        self.waiting.clear()
        for n, (_, wake) in enumerate(items):
            if self.used >= self.limit:
                again = self.waiting
                self.waiting = collections.OrderedDict(items[n:])
                self.waiting.update(again)
                break
            wake()


DEFAULT = Budget()  # the process's budget unless a server is given another
MAX_CONNECTIONS = DEFAULT_MAX_CONNECTIONS  # a server's limit unless it is given another


def configure(limit: int | None = None, *, max_connections: int | None = None) -> None:
    """Set the process's defaults (``dst --memory-budget``, ``--max-connections``):
    ``limit`` bytes in all, an eighth of it (at most the default 64 MiB) per connection;
    clients per server.  ConfigError if not positive."""
    global DEFAULT, MAX_CONNECTIONS
    if limit is not None:
        per = min(DEFAULT_PER_CONNECTION, max(limit // 8, 1))
        DEFAULT = Budget(limit, per_connection=per)
    if max_connections is not None:
        if max_connections <= 0:
            raise ConfigError("must be positive", where="--max-connections")
        MAX_CONNECTIONS = max_connections


class Holdings:
    """What one connection holds of a :class:`Budget`, and when its client last moved.

    ``inflight``: payload bytes of dispatched requests; ``out``: reply bytes in the
    transport's buffer (as last seen: :meth:`output`); ``pending``: bytes of an
    incomplete WRITE payload (:meth:`payload`).  While ``out`` or ``pending`` is not
    zero it looks again every :data:`RECHECK` seconds (``look()`` gives the transport
    buffer's size now) and calls ``stalled(what)`` once the client has neither read nor
    sent anything for ``stall_timeout`` seconds.
    """

    __slots__ = (
        "budget",
        "inflight",
        "key",
        "look",
        "loop",
        "out",
        "pending",
        "progress",
        "stall_timeout",
        "stalled",
        "timer",
    )

    def __init__(
        self,
        budget: Budget,
        *,
        look: Callable[[], int],
        stalled: Callable[[str], None],
        stall_timeout: float,
    ) -> None:
        self.budget = budget
        self.key = id(self)
        self.loop = asyncio.get_running_loop()
        self.look = look
        self.stalled = stalled
        self.stall_timeout = stall_timeout
        self.inflight = 0
        self.out = 0
        self.pending = 0
        self.progress = 0.0
        self.timer: asyncio.TimerHandle | None = None

    @property
    def held(self) -> int:
        return self.inflight + self.out + self.pending

    def allowance(self) -> int:
        """Bytes this connection may take now (<= 0: none; see :meth:`Budget.allowance`)."""
        return self.budget.allowance(self.held)

    def room(self) -> tuple[int, bool]:
        """:meth:`Budget.room` for this connection."""
        return self.budget.room(self.inflight + self.out + self.pending)

    def short(self, wake: Callable[[], None]) -> None:
        """Over budget: if the process is short (not this connection), ``wake`` once
        bytes are given back elsewhere; this connection's own bytes wake it anyway."""
        if self.held < self.budget.per_connection:
            self.budget.wait(self.key, wake)

    def change(self, n: int) -> None:
        """Requests dispatched (``n`` > 0) or completed (< 0) changed the payload bytes
        in flight by ``n``; the connection sums its requests' bytes and tells this once
        per batch, not per request."""
        self.inflight += n
        self.budget.charge(n)

    def output(self, buffered: int) -> None:
        """The transport's buffer holds ``buffered`` reply bytes now."""
        if buffered != self.out:
            if buffered < self.out or not self.out:
                self.progress = self.loop.time()
            self.budget.charge(buffered - self.out)
            self.out = buffered
        self._arm()

    def payload(self, pending: int, *, wake: Callable[[], None]) -> bool:
        """``pending`` bytes of an incomplete WRITE payload are here now.  True when
        that is over budget: the caller stops reading, ``wake()`` comes once the
        process has bytes again (or its own requests give theirs back)."""
        if pending > self.pending:
            self.progress = self.loop.time()
        self.budget.charge(pending - self.pending)
        self.pending = pending
        self._arm()
        if pending and self.allowance() < 0:
            self.short(wake)
            return True
        return False

    def close(self) -> None:
        """The connection is gone: give back its buffers (requests in flight give back
        theirs as they end)."""
        self.budget.forget(self.key)
        self.budget.charge(-(self.out + self.pending))
        self.out = self.pending = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _arm(self) -> None:
        if (self.out or self.pending) and self.timer is None:
            self.timer = self.loop.call_later(RECHECK, self._check)

    def _check(self) -> None:
        self.timer = None
        self.output(self.look())
        if not (self.out or self.pending):
            return
        if self.loop.time() - self.progress > self.stall_timeout:
            self.stalled("read its replies" if self.out else "sent the payload it announced")
