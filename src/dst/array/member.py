"""A named node of an array: counts its I/O, reports its state, and can be suspended.

The builder wraps every leaf target (a local file or a remote NBD node) in a
:class:`Member`, so per-node counters and health look the same whatever the leaf
is.  Errors pass through unchanged (they are counted).

Suspending one node
-------------------
Every request passes the member's :class:`~dst.array.gate.Gate`.  :meth:`Member.suspend`
closes it and waits until the requests in flight on this node completed; from then on
requests to this node wait in arrival order (at most ``max_held``; more fail with
``BlockError(EAGAIN)`` naming the node) while requests to the array's other nodes go on.
While suspended, :meth:`Member.swap_inner` may put another device (a reconnected node,
a swapped disk) behind the member; :meth:`Member.resume` releases the held requests, in
arrival order, onto whatever device is then inside.  Not suspended, a request on the
callback fast path (:mod:`dst.device`) costs one attribute test, two integer updates
and a closure more than the bare device.

Do not suspend the array root (:class:`~dst.array.switch.SwitchDevice`) while a node
holds requests: the root's drain would wait for them.  Resume the node first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from dst.array.gate import DEFAULT_MAX_HELD, Gate
from dst.device import (
    BlockDevice,
    Buffer,
    Cancel,
    Capabilities,
    Done,
    Extent,
    Health,
    IOCounters,
)
from dst.errors import BlockError, ConfigError

T = TypeVar("T")


class Member(BlockDevice):
    """Pass-through wrapper with :class:`IOCounters`, a connection state and a gate.

    ``max_held`` bounds the requests held while suspended (None: unbounded).
    """

    def __init__(
        self,
        inner: BlockDevice,
        *,
        name: str,
        kind: str,
        where: str,
        max_held: int | None = DEFAULT_MAX_HELD,
    ) -> None:
        self.inner = inner
        self.name = name
        self.kind = kind  # "file" | "remote" | "memory"
        self.where = where  # local path or remote URI
        self.counters = IOCounters()
        self.state = "new"
        self._gate = Gate(name=f"node {name!r}", max_held=max_held)

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.inner.size

    @property
    def caps(self) -> Capabilities:  # type: ignore[override]
        return self.inner.caps

    @property
    def suspended(self) -> bool:
        """True between :meth:`suspend` (even while it drains) and :meth:`resume`."""
        return self._gate.closed

    @property
    def held(self) -> int:
        """Requests waiting for :meth:`resume`."""
        return self._gate.held

    @property
    def inflight(self) -> int:
        """Requests running on the device inside."""
        return self._gate.inflight

    async def open(self) -> None:
        await self.inner.open()
        self.state = "connected"

    async def close(self) -> None:
        await self.inner.close()
        self.state = "closed"

    # -- suspend / resume / swap -------------------------------------------------------

    async def suspend(self) -> None:
        """Hold new requests to this node; return when none is in flight any more.

        Raises ConfigError if already suspended.  Cancelled while draining (e.g. by a
        timeout around it), the node is resumed again and nothing was held for good.
        """
        await self._gate.close()

    def resume(self) -> None:
        """Release held requests in arrival order.  Raises ConfigError if not suspended."""
        if not self._gate.closed:
            raise ConfigError(f"node {self.name!r} is not suspended")
        self._gate.open()

    def swap_inner(
        self, new: BlockDevice, *, kind: str | None = None, where: str | None = None
    ) -> BlockDevice:
        """Put ``new`` (already open) behind this member; return the old device.

        Only while suspended (and drained: after :meth:`suspend` returned).  Nothing is
        opened or closed here; the caller owns the old device.  Raises ConfigError if not
        suspended or if ``new`` is smaller than the old device (the array's layout was
        computed from its size).
        """
        if not self._gate.closed or self._gate.inflight:
            raise ConfigError(f"node {self.name!r} must be suspended to swap its device")
        old = self.inner
        if new.size < old.size:
            msg = f"{new.name or 'new device'!r} ({new.size} bytes) is smaller than {old.size}"
            raise ConfigError(msg, where=self.name)
        self.inner = new
        if kind is not None:
            self.kind = kind
        if where is not None:
            self.where = where
        return old

    # -- I/O ---------------------------------------------------------------------------

    def _error(self, exc: BlockError) -> BlockError:
        self.counters.errors += 1
        return exc

    async def _admit(self) -> None:
        """Slow path of entering: the node is suspended."""
        try:
            await self._gate.admit()
        except BlockError as exc:
            raise self._error(exc) from None

    async def _through(self, op: Callable[[BlockDevice], Awaitable[T]]) -> T:
        """Run ``op`` on the device inside, through the gate, counting its errors."""
        g = self._gate
        if g.closed:
            await self._admit()
        else:
            g.inflight += 1
        try:
            return await op(self.inner)
        except BlockError as exc:
            raise self._error(exc) from None
        finally:
            g.leave()

    async def read(self, offset: int, length: int) -> Buffer:
        c = self.counters
        c.reads += 1
        c.read_bytes += length
        return await self._through(lambda d: d.read(offset, length))

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        c = self.counters
        c.writes += 1
        c.write_bytes += len(data)
        await self._through(lambda d: d.write(offset, data, fua=fua))

    # The callback fast path (dst.device): only through an open gate, and only if the
    # device inside takes it.

    def _finisher(self, done: Done) -> Done:
        g = self._gate

        def fin(exc: BaseException | None, value: Any) -> None:
            g.leave()
            if isinstance(exc, BlockError):
                self.counters.errors += 1
            done(exc, value)

        return fin

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        g = self._gate
        if g.closed:
            return None
        g.inflight += 1
        cancel = self.inner.submit_read(offset, length, self._finisher(done))
        if cancel is None:
            g.leave()
            return None
        c = self.counters
        c.reads += 1
        c.read_bytes += length
        return cancel

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        g = self._gate
        if g.closed:
            return None
        g.inflight += 1
        cancel = self.inner.submit_write(offset, data, fua, self._finisher(done))
        if cancel is None:
            g.leave()
            return None
        c = self.counters
        c.writes += 1
        c.write_bytes += len(data)
        return cancel

    async def flush(self) -> None:
        self.counters.flushes += 1
        await self._through(lambda d: d.flush())

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.counters.trims += 1
        await self._through(lambda d: d.trim(offset, length, fua=fua))

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        self.counters.zeroes += 1
        await self._through(
            lambda d: d.write_zeroes(offset, length, fua=fua, punch=punch, fast=fast)
        )

    async def cache(self, offset: int, length: int) -> None:
        await self._through(lambda d: d.cache(offset, length))

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        return await self._through(lambda d: d.block_status(offset, length))

    def spec(self) -> dict[str, Any]:
        return self.inner.spec()

    def health(self) -> Health:
        """The inner device's health; ``suspended`` while suspended (if otherwise ok),
        with ``suspended`` and ``held`` always in the detail."""
        inner = self.inner.health()
        g = self._gate
        own = "suspended" if g.closed else self.state
        state = own if inner.state == "ok" else inner.state
        return Health(state, {**inner.detail, "suspended": g.closed, "held": g.held})

    def children(self) -> Sequence[BlockDevice]:
        return ()
