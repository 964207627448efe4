"""One rate-limited copier for every copy job (dm-kcopyd): resync, rebuild, replace and
verify.

Theory of operation
-------------------
A job copies a set of *regions* (fixed-size pieces of a device), planned into spans by
:func:`dst.targets.copyplan.plan` (sparse: zero spans and data spans by the source's
block status).

A :class:`Copier` runs one job: an asynchronous ``work(span)`` for every span, in
increasing order, up to ``depth`` at once; data spans are first paced by ``pace(region,
nbytes)`` (zero spans are not: they copy nothing). The job's own code holds whatever
locks a span needs and must check the plan under them (block status may change until the
span's range is locked); :func:`~dst.targets.copyplan.copy_sparse` is the copy of one
locked range by its block status. The copier counts regions and bytes (copied, and
skipped as zeroes), keeps a rate meter, persists a checkpoint every ``interval`` seconds
(the first region still in flight: a restart redoes nothing that is not done) and
reports progress in one shape for every job. A span whose work fails is counted as an
error; with ``stop_on_error`` the job stops at the first one and raises it.

The runs of regions come from a lazy walk (a bitmap's :meth:`~dst.meta.bitmap.Bitmap.
ranges`, or one ``range``); nothing here holds the event loop for more than one chunk's
worth of arithmetic, whatever the device size.

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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dst.errors import BlockError, ConfigError
from dst.targets.copyplan import Span, Work

log = logging.getLogger(__name__)

RATE_WINDOW = 5.0  # seconds of history behind a reported rate


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
    a further pass; the counters add up.  ``kind`` says what the job is (``full``,
    ``delta``, ``verify``, ...) in progress."""

    def __init__(
        self,
        *,
        name: str,
        depth: int = 8,
        pace: Callable[[int, int], Awaitable[None]] | None = None,
        checkpoint: Callable[[int], Awaitable[None]] | None = None,
        interval: float = 1.0,
        stop_on_error: bool = False,
        region_size: int = 1,
    ) -> None:
        self.name = name
        self.depth = max(1, depth)
        self._pace = pace
        self._checkpoint = checkpoint
        self.interval = interval
        self.stop_on_error = stop_on_error
        self.region_size = region_size  # bytes per region (pacing of data spans)
        self.kind = ""
        self.state = "pending"  # running, done, failed, stopped
        self.done = 0  # regions
        self.total = 0
        self.bytes = 0  # copied (or compared)
        self.skipped = 0  # bytes not copied: zeroes (holes punched) or left out
        self.errors = 0
        self.error: BlockError | None = None  # the first one
        self.position = 0
        self.started = 0.0
        self.finished = 0.0
        self.meter = Meter()
        self.advanced = asyncio.Event()  # set after every span (status watchers)

    async def run(
        self, spans: AsyncIterator[Span], work: Work, *, alive: Callable[[], bool] | None = None
    ) -> None:
        """``work`` every span of ``spans`` (until ``alive()`` is False: the job has
        nothing left to copy to).  Raises the first BlockError with ``stop_on_error``;
        cancelled, the spans in flight are cancelled and waited for (state
        ``stopped``)."""
        if not self.started:
            self.started = time.monotonic()
        self.state = "running"
        inflight: dict[asyncio.Task[None], int] = {}
        checkpoint_at = time.monotonic() + self.interval
        try:
            async for span in spans:
                if self.error is not None and self.stop_on_error:
                    break
                if alive is not None and not alive():
                    break
                self.position = span.first
                if self._pace is not None and span.data:
                    await self._pace(span.first, span.count * self.region_size)
                if self._checkpoint is not None and time.monotonic() >= checkpoint_at:
                    await self._checkpoint(min(inflight.values(), default=span.first))
                    checkpoint_at = time.monotonic() + self.interval
                inflight[asyncio.ensure_future(self._one(span, work))] = span.first
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

    async def _one(self, span: Span, work: Work) -> None:
        try:
            moved = await work(span)
        except BlockError as e:
            log.error("%s: regions %d-%d failed: %r", self.name, span.first, span.stop - 1, e)
            self.errors += 1
            if self.error is None:
                self.error = e
            return
        self.done += span.count
        self.bytes += moved.copied
        self.skipped += moved.skipped
        self.meter.add(moved.copied)
        self.advanced.set()

    def progress(self, *, bytes_per_region: int) -> dict[str, Any]:
        """State, kind, regions done/total, percent, bytes (copied), skipped (zeroes
        not copied), rate (B/s), ETA (s), position, errors, elapsed (s)."""
        rate = self.meter.rate()
        left = max(self.total - self.done, 0)
        eta = left * bytes_per_region / rate if rate and left else None
        end = self.finished if self.state != "running" and self.finished else time.monotonic()
        return {
            "state": self.state,
            "kind": self.kind,
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
