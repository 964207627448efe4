"""One rate-limited region copier for every copy job (dm-kcopyd): resync, rebuild,
replace and verify.

Theory of operation
-------------------
A :class:`Copier` runs one job: an asynchronous ``work(region)`` for every region of an
iterable, in increasing order, up to ``depth`` at once, each first paced by
``pace(region, nbytes)``; the job's own code (a mirror's resync of a region, a replace's
copy, a verify's comparison) holds whatever locks the region needs.  The copier counts
regions and bytes, keeps a rate meter, persists a checkpoint every ``interval`` seconds
(the lowest region still in flight: a restart redoes nothing that is not done) and
reports progress in one shape for every job.  A region whose work fails is counted as
an error; with ``stop_on_error`` the job stops at the first one and raises it.

Pacing (MD's ``speed_limit_min``/``max``): :class:`RateLimit` lets a copy run at
``max_rate`` bytes per second while the device is idle and at ``min_rate`` while
foreground requests arrive; both can be changed while it runs (0/None: unlimited).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dst.errors import BlockError, ConfigError

log = logging.getLogger(__name__)
RATE_WINDOW = 5.0  # seconds of history behind a reported rate
Work = Callable[[int], Awaitable[int]]  # region -> bytes done


class RateLimit:
    """Paces a copy: ``max_rate`` bytes/s when idle, ``min_rate`` under load."""

    def __init__(self, *, max_rate: float | None = None, min_rate: float | None = None) -> None:
        self.max_rate = max_rate
        self.min_rate = min_rate
        self._next = 0.0
        self._changed = asyncio.Event()

    def set(self, *, max_rate: float | None = None, min_rate: float | None = None) -> None:
        """Change the limits now (0 or None: unlimited); a waiting copy re-plans."""
        for v in (max_rate, min_rate):
            if v is not None and v < 0:
                raise ConfigError("a rate cannot be negative", where="rate")
        self.max_rate, self.min_rate = max_rate, min_rate
        self._next = 0.0
        self._changed.set()

    def rate(self, busy: bool) -> float | None:
        if busy and self.min_rate:
            return self.min_rate
        return self.max_rate or None

    async def pace(self, nbytes: int, busy: bool) -> None:
        """Account ``nbytes`` about to be copied; sleep to stay under the rate."""
        while True:
            rate = self.rate(busy)
            now = time.monotonic()
            if rate is None:
                self._next = now
                return
            start = max(self._next, now)
            if start <= now:
                self._next = start + nbytes / rate
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), start - now)


@dataclass(slots=True)
class Meter:
    """Bytes per second over the last :data:`RATE_WINDOW` seconds."""

    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def add(self, nbytes: int) -> None:
        now = time.monotonic()
        self.samples.append((now, nbytes))
        while self.samples and self.samples[0][0] < now - RATE_WINDOW:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        span = max(time.monotonic() - self.samples[0][0], 1e-3)
        return sum(n for _, n in self.samples) / span


class Copier:
    """One copy job's engine (module docstring).  :meth:`run` may be called again for
    a further pass; the counters add up."""

    def __init__(
        self,
        *,
        name: str,
        depth: int = 8,
        pace: Callable[[int, int], Awaitable[None]] | None = None,
        checkpoint: Callable[[int], Awaitable[None]] | None = None,
        interval: float = 1.0,
        stop_on_error: bool = False,
    ) -> None:
        self.name = name
        self.depth = max(1, depth)
        self._pace = pace
        self._checkpoint = checkpoint
        self.interval = interval
        self.stop_on_error = stop_on_error
        self.state = "pending"  # running, done, failed, stopped
        self.done = 0  # regions
        self.total = 0
        self.bytes = 0
        self.skipped = 0  # bytes not copied because the source had a hole there (sparse)
        self.errors = 0
        self.error: BlockError | None = None  # the first one
        self.position = 0
        self.started = 0.0
        self.finished = 0.0
        self.meter = Meter()
        self.advanced = asyncio.Event()  # set after every region (status watchers)

    async def run(self, regions: Iterable[int], size: Callable[[int], int], work: Work) -> None:
        """``work`` every region of ``regions`` (``size(region)`` bytes each, for the
        pacing).  Raises the first BlockError with ``stop_on_error``; cancelled, the
        regions in flight are cancelled and waited for."""
        if not self.started:
            self.started = time.monotonic()
        self.state = "running"
        inflight: dict[asyncio.Task[None], int] = {}
        checkpoint_at = time.monotonic() + self.interval
        try:
            for r in regions:
                if self.error is not None and self.stop_on_error:
                    break
                self.position = r
                if self._pace is not None:
                    await self._pace(r, size(r))
                if self._checkpoint is not None and time.monotonic() >= checkpoint_at:
                    await self._checkpoint(min(inflight.values(), default=r))
                    checkpoint_at = time.monotonic() + self.interval
                inflight[asyncio.ensure_future(self._one(r, work))] = r
                if len(inflight) >= self.depth:
                    done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    for finished in done:
                        del inflight[finished]
            if inflight:
                await asyncio.wait(inflight)
        except asyncio.CancelledError:
            self.state = "stopped"
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            raise
        finally:
            self.finished = time.monotonic()
        self.state = "failed" if self.errors else "done"
        if self.error is not None and self.stop_on_error:
            raise self.error

    async def _one(self, region: int, work: Work) -> None:
        try:
            n = await work(region)
        except BlockError as e:
            log.error("%s: region %d failed: %r", self.name, region, e)
            self.errors += 1
            if self.error is None:
                self.error = e
            return
        self.done += 1
        self.bytes += n
        self.meter.add(n)
        self.advanced.set()

    def progress(self, *, bytes_per_region: int) -> dict[str, Any]:
        """State, regions done/total, percent, bytes (copied), skipped (bytes not
        copied: holes), rate (B/s), ETA (s), position, errors, elapsed (s)."""
        rate = self.meter.rate()
        left = max(self.total - self.done, 0)
        eta = left * bytes_per_region / rate if rate and left else None
        end = self.finished if self.state != "running" and self.finished else time.monotonic()
        return {
            "state": self.state,
            "regions_done": self.done,
            "regions_total": self.total,
            "percent": 100.0 * self.done / self.total if self.total else 100.0,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "rate": rate,
            "eta": eta,
            "position": self.position,
            "errors": self.errors,
            "elapsed": end - self.started if self.started else 0.0,
        }
