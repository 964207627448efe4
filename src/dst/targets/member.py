"""A named storage node of an array: counts its I/O, reports its state, can be suspended.

The builder wraps every leaf target (a local file or a remote NBD node) in a
:class:`Member`, a :class:`~dst.targets.gate.GateDevice`, so per-node counters, health
and suspend look the same whatever the leaf is.  Errors pass through unchanged (they
are counted).

Suspending one node: :meth:`~dst.targets.gate.GateDevice.suspend` closes its gate and
waits until the requests in flight on this node completed; from then on requests to
this node wait in arrival order (at most ``max_held``; more fail with
``BlockError(EAGAIN)`` naming the node) while requests to the array's other nodes go
on.  While suspended, :meth:`Member.swap_inner` may put another device (a reconnected
node, a swapped disk) behind the member; ``resume`` releases the held requests, in
arrival order, onto whatever device is then inside.

Do not suspend the array root while a node holds requests: the root's drain would wait
for them.  Resume the node first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dst.device import BlockDevice, Health
from dst.targets.gate import DEFAULT_MAX_HELD, GateDevice


class Member(GateDevice):
    """A storage node called ``name``; ``where`` is its path or URI (its ``kind`` is the
    device inside's: file, remote, memory)."""

    node = True

    def __init__(
        self,
        inner: BlockDevice,
        *,
        name: str,
        where: str,
        max_held: int | None = DEFAULT_MAX_HELD,
    ) -> None:
        self.where = where
        self.state = "new"
        super().__init__(inner, name=name, max_held=max_held)

    def describe(self) -> str:
        return f"node {self.name!r}"

    async def open(self) -> None:
        await self.inner.open()
        self.state = "connected"

    async def close(self) -> None:
        await self.inner.close()
        self.state = "closed"

    def swap_inner(self, new: BlockDevice, *, where: str | None = None) -> BlockDevice:
        """:meth:`~dst.targets.gate.GateDevice.swap`, refusing a smaller device (the
        array's layout was computed from this one's size): ConfigError."""
        old = self.swap(new, min_size=self.inner.size)
        if where is not None:
            self.where = where
        return old

    def spec(self) -> dict[str, Any]:
        return {**self.inner.spec(), "name": self.name}

    def subscribe(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        return self.inner.subscribe(callback)

    def reset(self, reason: str) -> None:
        self.inner.reset(reason)

    def health(self) -> Health:
        """The inner device's health; ``suspended`` while suspended (if otherwise ok),
        with ``suspended`` and ``held`` always in the detail."""
        inner = self.inner.health()
        own = "suspended" if self.suspended else self.state
        state = own if inner.state == "ok" else inner.state
        return Health(state, {**inner.detail, "suspended": self.suspended, "held": self.held})

    def children(self) -> Sequence[BlockDevice]:
        return ()
