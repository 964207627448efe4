"""Ordered byte-range locks: overlapping holders run one after another, in arrival order.

Theory of operation
-------------------
``hold(offset, length)`` registers the range *synchronously* when entered (before any
await), then waits for every earlier registered range that overlaps it.  Arrival order
therefore is the order in which overlapping holders run, which is what keeps mirror legs
identical: two overlapping writes are applied to every leg in the same order.
Non-overlapping holders never wait for each other.  The scan is linear in the number of
holders, which is bounded by the in-flight request limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class _Entry:
    start: int
    end: int
    done: asyncio.Event = field(default_factory=asyncio.Event)


class RangeLock:
    """Exclusive, FIFO-ordered locks on byte ranges."""

    def __init__(self) -> None:
        self._held: list[_Entry] = []  # registered, not yet released, in arrival order

    def __len__(self) -> int:
        return len(self._held)

    @asynccontextmanager
    async def hold(self, offset: int, length: int) -> AsyncIterator[None]:
        """Hold ``[offset, offset + length)`` for the body of the ``async with``."""
        end = offset + length
        earlier = [e.done for e in self._held if e.start < end and offset < e.end]
        entry = _Entry(offset, end)
        self._held.append(entry)
        try:
            for done in earlier:
                await done.wait()
            yield
        finally:
            self._held.remove(entry)
            entry.done.set()
