"""Error and latency injection around a child device (tests; dm-flakey/dm-delay).

Theory of operation
-------------------
Every operation first passes :meth:`FaultDevice._gate`: it waits while the device is
*paused* (``kill(hang=True)``: I/O hangs until :meth:`revive`), fails with EIO while it
is *dead*, sleeps for the injected latency, then checks the fault rules in order.  A
rule names an operation (``read``, ``write``, ``flush``, ``trim``, ``zeroes`` or
``any``), an errno, optional byte ranges (the rule matches only requests overlapping
one) and an optional count (the next N matching requests fail, then the rule expires).
A failing request never reaches the child.  Everything can be changed at runtime.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dst.device import BlockDevice, Buffer, Extent, Health, IOCounters
from dst.errors import BlockError

Ranges = Sequence[tuple[int, int]]  # (offset, length) pairs


@dataclass(slots=True)
class _Rule:
    op: str
    err: int
    ranges: tuple[tuple[int, int], ...] | None
    count: int | None

    def matches(self, op: str, offset: int, length: int) -> bool:
        if self.op not in (op, "any") or self.count == 0:
            return False
        if self.ranges is None:
            return True
        return any(offset < s + n and s < offset + length for s, n in self.ranges)


class FaultDevice(BlockDevice):
    """``child`` with injectable failures.  ``counters`` counts requests that got through."""

    kind = "fault"
    counters: IOCounters

    def __init__(self, child: BlockDevice, *, name: str = "fault") -> None:
        self.child = child
        self.name = name
        self.size = child.size
        self.caps = child.caps
        self.counters = IOCounters()
        self.blocked = 0  # requests currently hanging on a paused device
        self._rules: list[_Rule] = []
        self._latency = 0.0
        self._dead = False
        self._running = asyncio.Event()
        self._running.set()
        self._blocked_changed = asyncio.Event()

    # -- controls --------------------------------------------------------------------

    def fail(
        self, op: str, err: int = errno.EIO, ranges: Ranges | None = None, count: int | None = None
    ) -> None:
        """Fail ``op`` requests (overlapping ``ranges``; the next ``count`` only)."""
        assert op in ("read", "write", "flush", "trim", "zeroes", "cache", "status", "any")
        rs = tuple(ranges) if ranges is not None else None
        self._rules.append(_Rule(op, err, rs, count))

    def fail_reads(
        self, err: int = errno.EIO, ranges: Ranges | None = None, count: int | None = None
    ) -> None:
        self.fail("read", err, ranges, count)

    def fail_writes(
        self, err: int = errno.EIO, ranges: Ranges | None = None, count: int | None = None
    ) -> None:
        self.fail("write", err, ranges, count)

    def fail_flushes(self, err: int = errno.EIO, count: int | None = None) -> None:
        self.fail("flush", err, None, count)

    def clear(self) -> None:
        """Drop every fault rule (latency and dead/paused state are kept)."""
        self._rules.clear()

    def set_latency(self, seconds: float) -> None:
        self._latency = seconds

    def kill(self, *, hang: bool = False) -> None:
        """Dead: every request fails with EIO, or with ``hang`` waits for :meth:`revive`."""
        if hang:
            self._running.clear()
        else:
            self._dead = True

    def revive(self) -> None:
        """Back to life: hanging requests proceed, new ones go through."""
        self._dead = False
        self._running.set()

    async def wait_blocked(self, n: int) -> None:
        """Return once ``n`` requests hang on the paused device (test synchronisation)."""
        while self.blocked < n:
            self._blocked_changed.clear()
            await self._blocked_changed.wait()

    # -- the gate --------------------------------------------------------------------

    async def _gate(self, op: str, offset: int = 0, length: int = 0) -> None:
        if not self._running.is_set():
            self.blocked += 1
            self._blocked_changed.set()
            try:
                await self._running.wait()
            finally:
                self.blocked -= 1
        if self._latency > 0:
            await asyncio.sleep(self._latency)
        if self._dead:
            self.counters.errors += 1
            raise BlockError(errno.EIO, f"{self.name} is dead")
        for rule in self._rules:
            if rule.matches(op, offset, length):
                if rule.count is not None:
                    rule.count -= 1
                self.counters.errors += 1
                raise BlockError(rule.err, f"{self.name}: injected {op} error")

    # -- BlockDevice -----------------------------------------------------------------

    async def open(self) -> None:
        await self.child.open()
        self.size = self.child.size
        self.caps = self.child.caps

    async def close(self) -> None:
        await self.child.close()

    async def read(self, offset: int, length: int) -> Buffer:
        await self._gate("read", offset, length)
        self.counters.reads += 1
        self.counters.read_bytes += length
        return await self.child.read(offset, length)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self._gate("write", offset, len(data))
        self.counters.writes += 1
        self.counters.write_bytes += len(data)
        await self.child.write(offset, data, fua=fua)

    async def flush(self) -> None:
        await self._gate("flush")
        self.counters.flushes += 1
        await self.child.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._gate("trim", offset, length)
        self.counters.trims += 1
        await self.child.trim(offset, length, fua=fua)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        await self._gate("zeroes", offset, length)
        self.counters.zeroes += 1
        await self.child.write_zeroes(offset, length, fua=fua, punch=punch, fast=fast)

    async def cache(self, offset: int, length: int) -> None:
        await self._gate("cache", offset, length)
        await self.child.cache(offset, length)

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        await self._gate("status", offset, length)
        return await self.child.block_status(offset, length)

    def spec(self) -> dict[str, Any]:
        return {"type": "fault", "name": self.name, "members": [self.child.spec()]}

    def health(self) -> Health:
        state = "failed" if self._dead else "ok" if self._running.is_set() else "hung"
        return Health(state, {"counters": self.counters.as_dict(), "rules": len(self._rules)})

    def children(self) -> Sequence[BlockDevice]:
        return (self.child,)
