"""The plan of a copy job: regions cut into sparse spans, and the copy of one span.

Theory of operation
-------------------
:func:`plan` turns the runs of regions to copy into :class:`Span` units by the source's
block status (``base:allocation``), a chunk of :data:`PLAN_BYTES` at a time: a *zero
span* is a run of whole regions the source reads as zeroes (holes, mostly; up to
:data:`ZERO_BYTES`), a *data span* a run of regions holding data (up to
:data:`DATA_BYTES`, or what the job asks per span: a rate-limited copy takes smaller
ones).  Time and space follow the data, not the device size (DESIGN.md semantics 11):
a 1 TiB member holding 1 GiB is a thousand zero spans and a thousand data spans, and the
holes are punched on the target (WRITE_ZEROES without NO_HOLE), never written.
:func:`copy_sparse` copies one locked range by its block status, :func:`region_by_region`
does a span a region at a time (a fallback), and :class:`Moved` is what a span's work
did.  The engine that runs the spans is :class:`dst.targets.copier.Copier`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from dst.device import Buffer, Extent
from dst.errors import BlockError

log = logging.getLogger(__name__)

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
