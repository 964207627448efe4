"""A sparse in-memory block device of any size (a 1 TiB member in a few MiB), and a
heartbeat that measures how long the event loop was held.

:class:`SparseDevice` keeps only the 64 KiB chunks that hold data; block status reports
the others as holes, WRITE_ZEROES with punch and TRIM drop whole chunks, so a test can
check that a copy allocated what the data needs and no more (:attr:`allocated`).
:class:`Heartbeat` is a task that wakes every few milliseconds and records the longest
gap between two wake-ups: the event loop's worst stall while it ran.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence
from typing import Any

from dst.device import BlockDevice, Buffer, Capabilities, Extent

CHUNK = 64 << 10


class SparseDevice(BlockDevice):
    """``size`` bytes, of which only the chunks written hold memory (module docstring)."""

    kind = "memory"

    def __init__(self, size: int, *, name: str = "sparse") -> None:
        self.size = size
        self.name = name
        self.chunks: dict[int, bytearray] = {}
        self._index: list[int] = []  # sorted keys of ``chunks``
        self.caps = Capabilities(trim=True, zeroes=True, fast_zero=True, block_status=True)
        self.zeroed = 0  # bytes zeroed (WRITE_ZEROES/TRIM)
        self.written = 0  # bytes written

    @property
    def allocated(self) -> int:
        return len(self.chunks) * CHUNK

    def _chunk(self, c: int) -> bytearray:
        chunk = self.chunks.get(c)
        if chunk is None:
            chunk = self.chunks[c] = bytearray(CHUNK)
            bisect.insort(self._index, c)
        return chunk

    async def read(self, offset: int, length: int) -> Buffer:
        out = bytearray(length)
        pos = offset
        while pos < offset + length:
            c, within = divmod(pos, CHUNK)
            n = min(CHUNK - within, offset + length - pos)
            chunk = self.chunks.get(c)
            if chunk is not None:
                out[pos - offset : pos - offset + n] = chunk[within : within + n]
            pos += n
        return bytes(out)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        view = memoryview(data)
        pos = offset
        self.written += len(view)
        while view:
            c, within = divmod(pos, CHUNK)
            n = min(CHUNK - within, len(view))
            self._chunk(c)[within : within + n] = view[:n]
            view, pos = view[n:], pos + n

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        self.zeroed += length
        end = offset + length
        first, last = -(-offset // CHUNK), end // CHUNK  # chunks wholly inside
        for pos, stop in ((offset, min(end, first * CHUNK)), (max(offset, last * CHUNK), end)):
            if stop > pos and pos // CHUNK in self.chunks:  # the partial chunks at the ends
                c, within = divmod(pos, CHUNK)
                self.chunks[c][within : within + stop - pos] = bytes(stop - pos)
        lo = bisect.bisect_left(self._index, first)
        hi = bisect.bisect_left(self._index, last)
        for c in self._index[lo:hi]:
            del self.chunks[c]
        del self._index[lo:hi]

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.write_zeroes(offset, length, punch=True)

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        out: list[Extent] = []
        pos, end = offset, offset + length
        i = bisect.bisect_left(self._index, pos // CHUNK)
        while pos < end and len(out) < 1024:
            nxt = self._index[i] * CHUNK if i < len(self._index) else end
            if nxt > pos:  # a hole up to the next chunk
                stop = min(nxt, end)
                out.append(Extent(stop - pos, hole=True, zero=True))
                pos = stop
                continue
            stop = min((self._index[i] + 1) * CHUNK, end)
            out.append(Extent(stop - pos))
            pos, i = stop, i + 1
        return out

    def spec(self) -> dict[str, Any]:
        return {"type": "memory", "name": self.name, "size": self.size}


class Heartbeat:
    """Wakes every ``period`` seconds; :attr:`worst` is the longest gap seen."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.period)
            now = loop.time()
            self.worst = max(self.worst, now - last - self.period)
            last = now

    def __enter__(self) -> Heartbeat:
        self._task = asyncio.ensure_future(self._beat())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
