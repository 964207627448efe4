"""One rate-limited, sparse-aware copier for every copy job (dm-kcopyd): resync,
rebuild, replace and verify.

Theory of operation
-------------------
A job copies a set of *regions* (fixed-size pieces of a device).  :func:`plan` turns the
runs of regions to copy into :class:`Span` units by the source's block status
(``base:allocation``), a chunk of :data:`PLAN_BYTES` at a time: a *zero span* is a run of
whole regions the source reads as zeroes (holes, mostly; up to :data:`ZERO_BYTES`), a
*data span* a run of regions holding data (up to :data:`DATA_BYTES`).  Time and space
follow the data, not the device size (DESIGN.md semantics 11): a 1 TiB member holding
1 GiB is a thousand zero spans and a thousand data spans, and the holes are punched on
the target (WRITE_ZEROES without NO_HOLE), never written.

A :class:`Copier` runs one job: an asynchronous ``work(span)`` for every span, in
increasing order, up to ``depth`` at once; data spans are first paced by ``pace(region,
nbytes)`` (zero spans are not: they copy nothing).  The job's own code holds whatever
locks a span needs and must check the plan under them (block status may change until
the span's range is locked); :func:`copy_sparse` is the copy of one locked range by its
block status.  The copier counts regions and bytes (copied, and skipped as zeroes),
keeps a rate meter, persists a checkpoint every ``interval`` seconds (the first region
still in flight: a restart redoes nothing that is not done) and reports progress in one
shape for every job.  A span whose work fails is counted as an error; with
``stop_on_error`` the job stops at the first one and raises it.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dst.device import Buffer, Extent
from dst.errors import BlockError, ConfigError

log = logging.getLogger(__name__)
RATE_WINDOW = 5.0  # seconds of history behind a reported rate
PLAN_BYTES = 1 << 30  # block status asked for at once while planning
DATA_BYTES = 1 << 20  # the most one data span holds (one lock, one read)
ZERO_BYTES = 1 << 30  # the most one zero span holds (one zeroing request per target)
Status = Callable[[int, int], Awaitable[Sequence[Extent]]]  # (offset, length) -> extents


@dataclass(frozen=True, slots=True)
class Span:
    """Regions ``[first, first + count)``; ``data`` False: the source read as zeroes
    there when planned (check again under the lock)."""

    first: int
    count: int
    data: bool = True

    @property
    def stop(self) -> int:
        return self.first + self.count


@dataclass(frozen=True, slots=True)
class Moved:
    """What the work of one span did: bytes copied (or compared), bytes skipped as
    zeroes (holes punched, or nothing to compare)."""

    copied: int = 0
    skipped: int = 0


Work = Callable[[Span], Awaitable[Moved]]


def classify(
    extents: Sequence[Extent], first: int, stop: int, region_size: int, size: int
) -> tuple[list[Span], int]:
    """Regions ``[first, stop)`` by ``extents`` (which start at region ``first``'s
    offset and may cover less): the spans of whole regions they classify, in order, and
    the first region left unclassified.  At least one region is classified (as data, if
    the extents cover less than it)."""
    rs = region_size
    pos = first * rs
    end = min(stop * rs, size)
    zeroes: list[tuple[int, int]] = []  # merged byte runs of zeroes
    for e in extents:
        b = min(pos + e.length, end)
        if b <= pos:
            break
        if e.zero:
            if zeroes and zeroes[-1][1] == pos:
                zeroes[-1] = (zeroes[-1][0], b)
            else:
                zeroes.append((pos, b))
        pos = b
    covered = pos // rs if pos < size else -(-pos // rs)  # whole regions covered
    if covered <= first:
        return [Span(first, 1, True)], first + 1
    spans: list[Span] = []
    at = first
    for za, zb in zeroes:
        r0 = -(-za // rs)
        r1 = min(covered, zb // rs if zb < size else -(-zb // rs))
        if r1 <= r0:
            continue
        if r0 > at:
            spans.append(Span(at, r0 - at, True))
        spans.append(Span(r0, r1 - r0, False))
        at = r1
    if covered > at:
        spans.append(Span(at, covered - at, True))
    return spans, covered


def zeroes_everywhere(lists: Sequence[Sequence[Extent]], length: int) -> list[Extent]:
    """One extent list over ``[0, length)`` (as far as every list covers) that says zero
    only where every list says zero."""
    ends: list[list[tuple[int, bool]]] = []  # per list: (end offset, zero) of each extent
    covered = length
    for extents in lists:
        pos, out = 0, []
        for e in extents:
            if e.length <= 0 or pos >= length:
                break
            pos = min(pos + e.length, length)
            out.append((pos, e.zero))
        ends.append(out)
        covered = min(covered, pos)
    cuts = sorted({end for out in ends for end, _ in out if end <= covered})
    merged: list[Extent] = []
    idx = [0] * len(ends)
    start = 0
    for cut in cuts:
        zero = True
        for i, out in enumerate(ends):
            while out[idx[i]][0] < cut:
                idx[i] += 1
            zero = zero and out[idx[i]][1]
        if merged and merged[-1].zero == zero:
            merged[-1] = Extent(merged[-1].length + cut - start, zero=zero)
        else:
            merged.append(Extent(cut - start, zero=zero))
        start = cut
    return merged


def _split(span: Span, region_size: int, data_bytes: Callable[[], int]) -> Iterable[Span]:
    r = span.first
    while r < span.stop:
        most = max(1, (data_bytes() if span.data else ZERO_BYTES) // region_size)
        yield Span(r, min(most, span.stop - r), span.data)
        r += most


async def plan(
    runs: Iterable[tuple[int, int]],
    status: Status | None,
    *,
    region_size: int,
    size: int,
    alive: Callable[[], bool] | None = None,
    data_bytes: int | Callable[[], int] = DATA_BYTES,
) -> AsyncIterator[Span]:
    """The spans for ``runs`` of regions ``[start, stop)`` (lazily: a run is taken when
    the previous one is planned), by ``status`` of the source (None, or a status that
    fails: everything is data); data spans hold up to ``data_bytes`` (at least one
    region; a callable is asked for every span: a rate limit that changes).  Stops
    early once ``alive()`` is False."""
    span_bytes = data_bytes if callable(data_bytes) else lambda: data_bytes
    chunk = max(1, PLAN_BYTES // region_size)
    for start, stop in runs:
        pos = start
        while pos < stop:
            if alive is not None and not alive():
                return
            end = min(stop, pos + chunk)
            extents: Sequence[Extent] = ()
            if status is not None:
                off = pos * region_size
                try:
                    extents = await status(off, min(end * region_size, size) - off)
                except BlockError as exc:
                    log.info("block status at %d: %r: copied as data", off, exc)
            if extents:
                parts, nxt = classify(extents, pos, end, region_size, size)
            else:
                parts, nxt = [Span(pos, end - pos, True)], end
            for part in parts:
                for s in _split(part, region_size, span_bytes):
                    yield s
            pos = nxt


async def region_by_region(span: Span, work: Callable[[int], Awaitable[int]]) -> int:
    """``work`` every region of ``span`` in turn; the sum of what they return.  Raises
    the first BlockError once every region was tried (only the bad ones stay undone)."""
    done, first = 0, None
    for r in range(span.first, span.stop):
        try:
            done += await work(r)
        except BlockError as exc:
            first = first or exc
    if first is not None:
        raise first
    return done


async def copy_sparse(
    status: Status | None,
    read: Callable[[int, int], Awaitable[Buffer]],
    write: Callable[[int, Buffer], Awaitable[None]],
    zero: Callable[[int, int], Awaitable[None]],
    offset: int,
    length: int,
) -> Moved:
    """Copy ``[offset, offset + length)`` by the source's block status (the caller
    holds the range): data is read and written, zeroes are zeroed (holes punched).
    Raises what the callables raise."""
    copied = skipped = 0
    pos, end = offset, offset + length
    while pos < end:
        extents: Sequence[Extent] = await status(pos, end - pos) if status is not None else ()
        if not extents or extents[0].length <= 0:
            extents = [Extent(end - pos)]
        for e in extents:
            n = min(e.length, end - pos)
            if n <= 0:
                break
            if e.zero:
                await zero(pos, n)
                skipped += n
            else:
                for at in range(pos, pos + n, DATA_BYTES):  # bounded buffers
                    k = min(DATA_BYTES, pos + n - at)
                    await write(at, await read(at, k))
                copied += n
            pos += n
    return Moved(copied, skipped)


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
