"""Lazy clearing of write-intent bits (pure): which regions are idle, since when, and
how long each waits before its bit is cleared.

Theory of operation
-------------------
A region whose last write ended (or whose resync finished) is *idle*; once it has been
idle for its clear delay and no leg misses it, its bit in the bitmap is cleared (the
caller persists the change).  :class:`LazyClear` keeps two kinds of idle entries:

* single regions with their own clock (``regions``), and the adaptive delay: a region
  marked again soon after its bit was cleared (a mark and a clear wasted, each a
  metadata write and a flush) waits twice as long before its next clear, up to
  :data:`MAX_BACKOFF` times ``clear_delay``, and is forgotten once it has stayed
  clean that long;
* spans of regions settled in bulk (a resync of a whole device, the bits loaded after a
  clean shutdown): ``[start, stop)`` with one clock.  They are cleared a bitmap page at
  a time, as one integer operation per page (the bits that stay: regions some leg
  misses, busy regions, regions idle on their own clock), so even a span of a whole
  1 TiB device (512 pages) costs milliseconds.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from dst.meta.bitmap import Bitmap

MAX_BACKOFF = 8  # a region's clear delay grows up to this many times clear_delay


class LazyClear:
    """Idle regions and spans of one region tracker (module docstring)."""

    def __init__(self, clear_delay: float) -> None:
        self.clear_delay = clear_delay
        # region -> idle since (clear candidates), oldest first: a region is always
        # (re)inserted at the end with the time it became idle, so a scan for due ones
        # stops at the first that is not (every clear delay is clear_delay or longer).
        self.regions: dict[int, float] = {}
        self.spans: list[tuple[int, int, float]] = []  # [start, stop) idle since
        self._delay: dict[int, float] = {}  # region -> its clear delay, if not the base
        self._cleared: dict[int, float] = {}  # region -> when its bit was last cleared

    def span(self, start: int, stop: int, now: float) -> None:
        if stop > start:
            self.spans.append((start, stop, now))

    def marked_again(self, r: int) -> None:
        """Region ``r``'s bit is set again: if that is soon after a clear, back off."""
        if self._cleared.pop(r, None) is not None:
            self._delay[r] = min(2 * self._delay.get(r, self.clear_delay),
                                 MAX_BACKOFF * self.clear_delay)  # fmt: skip

    def due(self, now: float) -> bool:
        """Whether :meth:`clear` at ``now`` may clear some region (the oldest idle one,
        or an idle span, is past ``clear_delay``)."""
        if any(now - since >= self.clear_delay for _, _, since in self.spans):
            return True
        for since in self.regions.values():
            return now - since >= self.clear_delay
        return False

    def clear(
        self,
        bitmap: Bitmap,
        oos: Sequence[Bitmap],
        busy_regions: Collection[int],
        now: float,
    ) -> None:
        """Clear the bits of the regions idle long enough that no leg of ``oos`` misses;
        ``busy_regions`` (written, resynced, being marked) keep theirs."""
        base, delays, cleared = self.clear_delay, self._delay, self._cleared
        if cleared:  # oldest first, as regions
            forget = base * MAX_BACKOFF
            stale = []
            for r, when in cleared.items():
                if now - when < forget:
                    break
                stale.append(r)
            for r in stale:  # stayed clean: back to the base delay
                del cleared[r]
                delays.pop(r, None)
        due = []
        for r, since in self.regions.items():
            if now - since < base:
                break  # neither it nor any younger one is due
            if now - since >= delays.get(r, base):
                due.append(r)
        for r in due:
            if any(o.test(r) for o in oos):
                del self.regions[r]  # back when a resync ends
                continue
            bitmap.clear(r)
            if not bitmap.test(r):  # a full page that stays full: retry later
                del self.regions[r]
                cleared[r] = now
        if self.spans:
            self._clear_spans(bitmap, oos, busy_regions, now)

    def _clear_spans(
        self,
        bm: Bitmap,
        oos: Sequence[Bitmap],
        busy_regions: Collection[int],
        now: float,
    ) -> None:
        """Per page of a due span: clear every bit no leg misses and no busy region (or
        region on its own clock) holds, as one integer operation."""
        pb = bm.page_bits
        keep: dict[int, int] = {}  # page -> bits that stay (busy, or idle on their own)
        for r in (*busy_regions, *self.regions):
            p, bit = divmod(r, pb)
            keep[p] = keep.get(p, 0) | 1 << bit
        left: list[tuple[int, int, float]] = []
        for start, stop, since in self.spans:
            if now - since < self.clear_delay:
                left.append((start, stop, since))
                continue
            for p in range(start // pb, -(-stop // pb)):
                if bm.page_empty(p):
                    continue
                stays = keep.get(p, 0)
                for o in oos:
                    if not o.page_empty(p):
                        stays |= o.page_int(p)
                bm.clear_bits(p, bm.span_mask(p, start, stop) & ~stays)
        self.spans = left
