"""Mirroring over two or more legs (dm-raid1, RAID 1).

Theory of operation
-------------------
Each child is wrapped in a :class:`Leg` carrying its state, its in-flight count and
its I/O counters.  Mutations (WRITE, WRITE_ZEROES, TRIM) hold a :class:`RangeLock` on
their range while they fan out to every writable leg, so overlapping mutations reach
all legs in the same order and the legs never diverge.  A mutation then completes
only when every writable leg acknowledged it; what happens when some did not is decided
in one place, :meth:`MirrorDevice._settle` (today: the failing leg is marked failed
and the request fails with EIO, never a silent success).  FLUSH and FUA go to every
writable leg.

Reads go to the readable leg with the fewest requests in flight (ties rotate) and are
retried on the other readable legs if that leg fails.  BLOCK_STATUS asks one leg.

Extension points for degraded mode and the write-intent bitmap: :class:`LegState`,
:meth:`MirrorDevice.before_write` (awaited before a mutation reaches the legs) and
:meth:`MirrorDevice.leg_missed` (called for every range a leg did not get).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dst.device import BlockDevice, Buffer, Extent, Health, IOCounters
from dst.errors import BlockError, ConfigError
from dst.targets.composite import intersect_caps
from dst.targets.rangelock import RangeLock

log = logging.getLogger(__name__)


class LegState(enum.StrEnum):
    IN_SYNC = "in_sync"
    FAILED = "failed"


@dataclass(eq=False, slots=True)
class Leg:
    """One mirror leg: its device, state and statistics."""

    dev: BlockDevice
    index: int
    state: LegState = LegState.IN_SYNC
    inflight: int = 0
    counters: IOCounters = field(default_factory=IOCounters)

    @property
    def readable(self) -> bool:
        return self.state is LegState.IN_SYNC

    @property
    def writable(self) -> bool:
        return self.state is LegState.IN_SYNC

    async def run(self, op: Awaitable[Any]) -> Any:
        self.inflight += 1
        try:
            return await op
        except BlockError:
            self.counters.errors += 1
            raise
        finally:
            self.inflight -= 1

    def status(self) -> dict[str, Any]:
        return {
            "name": self.dev.name,
            "state": str(self.state),
            "inflight": self.inflight,
            "counters": self.counters.as_dict(),
            "health": self.dev.health().state,
        }


class MirrorDevice(BlockDevice):
    """``legs`` mirrored (2 or more).  The size is the smallest leg's."""

    def __init__(self, legs: Sequence[BlockDevice], *, name: str = "mirror") -> None:
        if len(legs) < 2:
            raise ConfigError("a mirror needs at least two legs", where="legs")
        if len({id(d) for d in legs}) != len(legs):
            raise ConfigError("a device may appear only once in a mirror", where="legs")
        self.legs = [Leg(d, i) for i, d in enumerate(legs)]
        self.locks = RangeLock()
        self.name = name
        self.size = 0
        self._next = 0  # rotates the read tie-break

    async def open(self) -> None:
        for leg in self.legs:
            await leg.dev.open()
        self.size = min(leg.dev.size for leg in self.legs)
        self.caps = intersect_caps([leg.dev for leg in self.legs])

    async def close(self) -> None:
        for leg in self.legs:
            await leg.dev.close()

    # -- policy and hooks ------------------------------------------------------------

    async def before_write(self, offset: int, length: int) -> None:
        """Hook awaited before a mutation reaches the legs (write-intent goes here)."""

    def leg_missed(self, leg: Leg, offset: int, length: int) -> None:
        """Hook: ``leg`` did not get the mutation of ``[offset, offset + length)``."""

    def mark_failed(self, leg: Leg, exc: BaseException) -> None:
        if leg.state is not LegState.FAILED:
            log.warning("%s: leg %d (%s) failed: %r", self.name, leg.index, leg.dev.name, exc)
        leg.state = LegState.FAILED

    def _settle(
        self, what: str, outcomes: list[tuple[Leg, BaseException | None]], offset: int, length: int
    ) -> None:
        """THE write policy: decide a mutation's result from its per-leg outcomes.

        Today every writable leg must acknowledge: a leg that failed is marked failed
        and the request fails with EIO.  (Degraded mode will instead succeed when at
        least one leg acknowledged, recording the missed range for the failed legs.)
        """
        failed = [(leg, exc) for leg, exc in outcomes if exc is not None]
        if not outcomes:
            raise BlockError(errno.EIO, f"{self.name}: no leg to {what} to")
        if not failed:
            return
        if what == "zero" and all(_is_enotsup(exc) for _, exc in failed):
            raise BlockError(errno.ENOTSUP, "fast zero not supported")
        for leg, exc in failed:
            self.mark_failed(leg, exc)
            if length:
                self.leg_missed(leg, offset, length)
        raise BlockError(errno.EIO, f"{self.name}: {what} failed on {len(failed)} leg(s)")

    async def _fan_out(
        self, what: str, offset: int, length: int, op: Callable[[Leg], Awaitable[None]]
    ) -> None:
        """Run ``op`` on every writable leg, then :meth:`_settle` the outcomes."""
        legs = []
        for leg in self.legs:
            if leg.writable:
                legs.append(leg)
            elif length:
                self.leg_missed(leg, offset, length)
        results = await asyncio.gather(*(_outcome(leg, op(leg)) for leg in legs))
        self._settle(what, list(zip(legs, results, strict=True)), offset, length)

    # -- mutations -------------------------------------------------------------------

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        n = len(data)

        async def one(leg: Leg) -> None:
            await leg.dev.write(offset, data, fua=fua)
            leg.counters.writes += 1
            leg.counters.write_bytes += n

        async with self.locks.hold(offset, n):
            await self.before_write(offset, n)
            await self._fan_out("write", offset, n, one)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        if fast and not self.caps.fast_zero:
            raise BlockError(errno.ENOTSUP, "fast zero not supported by every leg")

        async def one(leg: Leg) -> None:
            await leg.dev.write_zeroes(offset, length, fua=fua, punch=punch, fast=fast)
            leg.counters.zeroes += 1

        async with self.locks.hold(offset, length):
            await self.before_write(offset, length)
            await self._fan_out("zero", offset, length, one)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        async def one(leg: Leg) -> None:
            await leg.dev.trim(offset, length, fua=fua)
            leg.counters.trims += 1

        async with self.locks.hold(offset, length):
            await self.before_write(offset, length)
            await self._fan_out("trim", offset, length, one)

    async def flush(self) -> None:
        async def one(leg: Leg) -> None:
            await leg.dev.flush()
            leg.counters.flushes += 1

        await self._fan_out("flush", 0, 0, one)

    # -- reads -----------------------------------------------------------------------

    def _read_order(self) -> list[Leg]:
        """Readable legs, least busy first; ties rotate so idle legs share the load."""
        n = len(self.legs)
        start = self._next
        self._next = (start + 1) % n
        rotated = [self.legs[(start + i) % n] for i in range(n)]
        return sorted((leg for leg in rotated if leg.readable), key=lambda leg: leg.inflight)

    async def read(self, offset: int, length: int) -> Buffer:
        last: BlockError | None = None
        for leg in self._read_order():
            try:
                data: Buffer = await leg.run(leg.dev.read(offset, length))
            except BlockError as exc:
                log.info("%s: read failed on leg %d, retrying: %r", self.name, leg.index, exc)
                last = exc
                continue
            leg.counters.reads += 1
            leg.counters.read_bytes += length
            return data
        raise last or BlockError(errno.EIO, f"{self.name}: no readable leg")

    async def cache(self, offset: int, length: int) -> None:
        for leg in self._read_order()[:1]:
            await leg.run(leg.dev.cache(offset, length))

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        last: BlockError | None = None
        for leg in self._read_order():
            try:
                extents: Sequence[Extent] = await leg.run(leg.dev.block_status(offset, length))
                return extents
            except BlockError as exc:
                last = exc
        raise last or BlockError(errno.EIO, f"{self.name}: no readable leg")

    # -- status ----------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        return {
            "type": "mirror",
            "name": self.name,
            "members": [leg.dev.spec() for leg in self.legs],
        }

    def health(self) -> Health:
        ok = sum(leg.readable for leg in self.legs)
        state = "ok" if ok == len(self.legs) else "degraded" if ok else "failed"
        return Health(state, {"legs": [leg.status() for leg in self.legs]})

    def children(self) -> Sequence[BlockDevice]:
        return [leg.dev for leg in self.legs]


async def _outcome(leg: Leg, op: Awaitable[None]) -> BaseException | None:
    """Run ``op`` on ``leg``; its BlockError (or None) rather than raising."""
    try:
        await leg.run(op)
    except BlockError as exc:
        return exc
    return None


def _is_enotsup(exc: BaseException) -> bool:
    return isinstance(exc, BlockError) and exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
