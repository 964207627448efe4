"""Which member ranges hold only zeroes, asked a window at a time.

Theory of operation
-------------------
A rebuild is sparse (DESIGN.md semantics 11): a region that every source member reports
as zeroes (holes, block status) is zeroes on the target too, so it gets a WRITE_ZEROES
(a hole punched) instead of reads and a write.  Block status is a round trip to every
source, as long as a read of the region, so :class:`ZeroMap` asks for a window of
``WINDOW`` bytes at once and answers the next regions from it -- only while that answer
cannot be stale: it was asked with no foreground write in flight, and no write started
since (``ParityCore.write_epoch``).  Otherwise the window is asked again, under the
region's lock, for that region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dst.errors import BlockError
from dst.targets.mirror.legs import Leg

WINDOW = 16 << 20  # member bytes one block status asks for


@dataclass(slots=True)
class _Seen:
    start: int
    end: int  # what the answer covered
    zeroes: list[tuple[int, int]]  # runs of zeroes, in order
    epoch: int  # ParityCore.write_epoch when asked; -1: good for one region only


class Writes(Protocol):
    """What the zero map needs of the array (a :class:`~.core.ParityCore`)."""

    write_epoch: int
    writes_inflight: int

    @property
    def data_end(self) -> int: ...


class ZeroMap:
    """Zero runs of the members, by member index (module docstring)."""

    def __init__(self) -> None:
        self._seen: dict[int, _Seen] = {}

    async def all_zero(self, core: Writes, sources: Sequence[Leg], off: int, n: int) -> bool:
        """Every one of ``sources`` holds zeroes in ``[off, off + n)`` (hold its lock)."""
        for x in sources:
            if not x.dev.caps.block_status:
                return False
            seen = self._seen.get(x.index)
            fresh = seen is not None and seen.epoch == core.write_epoch
            if not (fresh and seen is not None and seen.start <= off and off + n <= seen.end):
                seen = await self._ask(core, x, off, n)
            if seen is None or not _covered(seen.zeroes, off, n):
                return False
        return True

    async def _ask(self, core: Writes, x: Leg, off: int, n: int) -> _Seen | None:
        epoch, quiet = core.write_epoch, not core.writes_inflight
        end = max(off + n, min(off + WINDOW, core.data_end))
        try:
            extents = await x.dev.block_status(off, end - off)
        except BlockError:
            return None
        zeroes, pos = [], off
        for e in extents:
            if e.zero or e.hole:
                zeroes.append((pos, pos + e.length))
            pos += e.length
        valid = quiet and core.write_epoch == epoch
        seen = self._seen[x.index] = _Seen(off, pos, zeroes, epoch if valid else -1)
        return seen


def _covered(runs: list[tuple[int, int]], off: int, n: int) -> bool:
    pos, end = off, off + n
    for a, b in runs:
        if a <= pos < b:
            pos = b
        if pos >= end:
            return True
    return pos >= end
