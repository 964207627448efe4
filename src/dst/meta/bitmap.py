"""A sparse two-level bitmap with a conservative out-of-memory rule (pure).

Theory of operation
-------------------
``nbits`` bits are split into pages of ``page_bits`` bits (default 32768: one page is
one 4 KiB block of the on-disk bitmap, so "changed pages" are exactly the blocks to
rewrite).  The first level is a dict from page index to page; a page is allocated on
the first set bit in it and freed again when its last bit is cleared, so a mostly
clean bitmap of a large device costs almost nothing.

A page whose bits are all set is kept as *full*, with no memory behind it (a bulk set
of whole pages is one set insertion per page).  If a page cannot be allocated
(``max_pages`` reached — the stand-in for an allocation failure), the whole page is
recorded as full too: every bit in it reads as set.  That
is the conservative direction for write intent and out-of-sync tracking (more regions
are resynced, none is missed).  Clearing a bit of a full page first retries the
allocation (the page becomes all ones minus that bit); if that fails again the page
stays full.

Bit ``i`` is bit ``i % 8`` of byte ``i // 8`` of the on-disk array (:meth:`page_bytes`,
:meth:`to_bytes`, :meth:`from_bytes`).  Every page whose content changed since the last
:meth:`take_changed` is remembered, so only changed blocks are rewritten.

Bulk operations work a page at a time on the page as one integer (bit ``i`` of the
page is bit ``i`` of ``int.from_bytes(page, "little")``): setting or clearing a range
(:meth:`set_range`, :meth:`clear_range`), or-ing in another bitmap (:meth:`update`),
finding the next set or clear bit (:meth:`next_set`, :meth:`next_clear`, so huge sets
are walked lazily), each costs microseconds per page however many bits it touches:
a whole 1 TiB device in 64 KiB regions is 512 pages.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

PAGE_BITS = 4096 * 8


class Bitmap:
    """``nbits`` bits, all clear initially."""

    def __init__(
        self, nbits: int, *, page_bits: int = PAGE_BITS, max_pages: int | None = None
    ) -> None:
        if nbits < 0 or page_bits <= 0 or page_bits % 64:
            raise ValueError("nbits must be >= 0 and page_bits a positive multiple of 64")
        self.nbits = nbits
        self.page_bits = page_bits
        self.page_len = page_bits // 8
        self.npages = -(-nbits // page_bits)
        self.max_pages = max_pages
        self._pages: dict[int, bytearray] = {}
        self._pop: dict[int, int] = {}  # set bits per allocated page
        self._full: set[int] = set()  # pages all set, no memory (bulk set or no room)
        self._changed: set[int] = set()
        self._all_ones: bytes | None = None

    # --- pages ---------------------------------------------------------------------

    def _alloc(self, p: int) -> bytearray | None:
        if self.max_pages is not None and len(self._pages) >= self.max_pages:
            return None
        page = self._pages[p] = bytearray(self.page_len)
        self._pop[p] = 0
        return page

    def _valid_bits(self, p: int) -> int:
        return min(self.page_bits, self.nbits - p * self.page_bits)

    def _ones(self, p: int) -> bytes:
        n = self._valid_bits(p)
        if n == self.page_bits:
            if self._all_ones is None:
                self._all_ones = b"\xff" * self.page_len
            return self._all_ones
        tail = bytes([(1 << (n % 8)) - 1]) if n % 8 else b""
        return (b"\xff" * (n // 8) + tail).ljust(self.page_len, b"\0")

    def is_full(self, page: int) -> bool:
        """True if ``page`` could not be allocated and reads as all set."""
        return page in self._full

    def allocated_pages(self) -> int:
        """Pages with memory behind them (full pages have none)."""
        return len(self._pages)

    def empty(self) -> bool:
        """No bit is set."""
        return not self._pages and not self._full

    # --- bits ----------------------------------------------------------------------

    def test(self, i: int) -> bool:
        assert 0 <= i < self.nbits, i
        p, off = divmod(i, self.page_bits)
        if p in self._full:
            return True
        page = self._pages.get(p)
        return page is not None and bool(page[off >> 3] >> (off & 7) & 1)

    def set(self, i: int) -> None:
        """Set bit ``i``; if its page cannot be allocated the whole page reads as set."""
        assert 0 <= i < self.nbits, i
        p, off = divmod(i, self.page_bits)
        if p in self._full:
            return
        page = self._pages.get(p) or self._alloc(p)
        if page is None:
            self._full.add(p)
            self._changed.add(p)
            return
        if not page[off >> 3] >> (off & 7) & 1:
            page[off >> 3] |= 1 << (off & 7)
            self._pop[p] += 1
            self._changed.add(p)

    def clear(self, i: int) -> None:
        """Clear bit ``i`` (a full page that still cannot be allocated stays full)."""
        assert 0 <= i < self.nbits, i
        p, off = divmod(i, self.page_bits)
        if p in self._full:
            page = self._alloc(p)
            if page is None:
                return
            self._full.discard(p)
            page[:] = self._ones(p)
            self._pop[p] = self._valid_bits(p)
        page = self._pages.get(p)
        if page is None or not page[off >> 3] >> (off & 7) & 1:
            return
        page[off >> 3] &= ~(1 << (off & 7)) & 0xFF
        self._pop[p] -= 1
        self._changed.add(p)
        if not self._pop[p]:
            del self._pages[p], self._pop[p]

    # --- pages as integers (bulk operations) ----------------------------------------

    def page_int(self, p: int) -> int:
        """Page ``p`` as an integer (bit i = bit ``p * page_bits + i``)."""
        if p in self._full:
            return (1 << self._valid_bits(p)) - 1
        page = self._pages.get(p)
        return int.from_bytes(page, "little") if page is not None else 0

    def _store(self, p: int, value: int) -> bool:
        """Page ``p`` becomes ``value`` (clipped to the valid bits); True if it changed."""
        value &= (1 << self._valid_bits(p)) - 1
        if value == self.page_int(p):
            return False
        self._changed.add(p)
        if not value:
            self._full.discard(p)
            self._pages.pop(p, None)
            self._pop.pop(p, None)
            return True
        page = self._pages.get(p)
        if page is None:
            self._full.discard(p)
            page = self._alloc(p)
            if page is None:  # no room: conservatively all set
                self._full.add(p)
                return True
        page[:] = value.to_bytes(self.page_len, "little")
        self._pop[p] = value.bit_count()
        return True

    def _span(self, p: int, start: int, stop: int) -> int:
        """The bits of ``[start, stop)`` that fall in page ``p``, as a page integer."""
        base = p * self.page_bits
        lo, hi = max(start, base) - base, min(stop, base + self.page_bits) - base
        return ((1 << hi) - 1) ^ ((1 << lo) - 1) if hi > lo else 0

    def _pages_of(self, start: int, stop: int) -> range:
        return range(start // self.page_bits, -(-stop // self.page_bits))

    def _fill(self, p: int) -> bool:
        """Set every bit of page ``p`` (the fast case of a bulk set: the page becomes
        *full*, all set with no memory behind it); True if it changed."""
        if p in self._full:
            return False
        self._pages.pop(p, None)
        self._pop.pop(p, None)
        self._full.add(p)
        self._changed.add(p)
        return True

    def _whole(self, p: int, start: int, stop: int) -> bool:
        base = p * self.page_bits
        return start <= base and min(base + self.page_bits, self.nbits) <= stop

    def set_range(self, start: int, stop: int) -> list[int]:
        """Set bits ``[start, stop)``; returns the pages that changed."""
        assert 0 <= start <= stop <= self.nbits
        changed = []
        for p in self._pages_of(start, stop):
            if self._whole(p, start, stop):
                hit = self._fill(p)
            else:
                hit = p not in self._full and self._store(
                    p, self.page_int(p) | self._span(p, start, stop)
                )
            if hit:
                changed.append(p)
        return changed

    def clear_range(self, start: int, stop: int) -> list[int]:
        """Clear bits ``[start, stop)`` (a full page that cannot be allocated again stays
        full); returns the pages that changed."""
        assert 0 <= start <= stop <= self.nbits
        return [p for p in self._pages_of(start, stop)
                if self._store(p, self.page_int(p) & ~self._span(p, start, stop))]  # fmt: skip

    def update(self, other: Bitmap) -> list[int]:
        """Set every bit set in ``other`` (same geometry); returns the pages that changed."""
        assert other.nbits == self.nbits and other.page_bits == self.page_bits
        changed = []
        for p in sorted(other._pages.keys() | other._full):
            if p in other._full or other._pop.get(p) == other._valid_bits(p):
                hit = self._fill(p)
            else:
                hit = p not in self._full and self._store(p, self.page_int(p) | other.page_int(p))
            if hit:
                changed.append(p)
        return changed

    def touch(self, pages: Iterable[int]) -> None:
        """Count ``pages`` as changed (they are rewritten with the next snapshot)."""
        self._changed.update(pages)

    def iter_range(self, start: int, stop: int) -> Iterator[int]:
        """Set bits in ``[start, stop)``, in increasing order."""
        pos = start
        while (r := self.next_set(pos, stop)) is not None:
            p = r // self.page_bits
            end = min(stop, (p + 1) * self.page_bits)
            for i in self._page_bits_from(p):
                if i >= end:
                    break
                if i >= r:
                    yield i
            pos = end

    def _page_bits_from(self, p: int) -> Iterator[int]:
        base = p * self.page_bits
        if p in self._full:
            yield from range(base, base + self._valid_bits(p))
            return
        page = self._pages.get(p)
        if page is None:
            return
        for w, native in enumerate(memoryview(page).cast("Q")):
            if not native:
                continue
            word = int.from_bytes(page[w * 8 : w * 8 + 8], "little")
            while word:
                low = word & -word
                yield base + w * 64 + low.bit_length() - 1
                word ^= low

    def clear_bits(self, p: int, mask: int) -> bool:
        """Clear the bits of ``mask`` (a page integer) in page ``p``; True if changed."""
        return self._store(p, self.page_int(p) & ~mask)

    def span_mask(self, p: int, start: int, stop: int) -> int:
        """The bits of ``[start, stop)`` that fall in page ``p``, as a page integer."""
        return self._span(p, start, stop)

    def clear_all(self) -> None:
        self._changed |= self._pages.keys() | self._full
        self._pages.clear()
        self._pop.clear()
        self._full.clear()

    def page_empty(self, p: int) -> bool:
        """No bit of page ``p`` is set."""
        return p not in self._pages and p not in self._full

    def next_set(self, pos: int, stop: int | None = None) -> int | None:
        """The first set bit in ``[pos, stop)`` (default: to the end), or None."""
        stop = self.nbits if stop is None else min(stop, self.nbits)
        pb = self.page_bits
        while pos < stop:
            p = pos // pb
            if p in self._pages or p in self._full:
                value = (self.page_int(p) & self._span(p, pos, stop)) >> (pos - p * pb)
                if value:
                    return pos + (value & -value).bit_length() - 1
            pos = (p + 1) * pb
        return None

    def next_clear(self, pos: int, stop: int | None = None) -> int:
        """The first clear bit in ``[pos, stop)``, or ``stop`` (default: nbits)."""
        stop = self.nbits if stop is None else min(stop, self.nbits)
        pb = self.page_bits
        while pos < stop:
            p = pos // pb
            span = self._span(p, pos, stop)
            value = (~self.page_int(p) & span) >> (pos - p * pb)
            if value:
                return pos + (value & -value).bit_length() - 1
            pos = (p + 1) * pb
        return stop

    def run_at(self, pos: int, stop: int | None = None) -> tuple[int, int] | None:
        """The first run ``[start, end)`` of set bits at or after ``pos`` (ends at
        ``stop`` at the latest), or None."""
        start = self.next_set(pos, stop)
        if start is None:
            return None
        return start, self.next_clear(start, stop)

    def count(self) -> int:
        """Number of bits that read as set."""
        return sum(self._pop.values()) + sum(self._valid_bits(p) for p in self._full)

    def __iter__(self) -> Iterator[int]:
        """Set bits in increasing order."""
        for p in sorted(self._pages.keys() | self._full):
            yield from self._page_bits_from(p)

    def ranges(self) -> Iterator[tuple[int, int]]:
        """Runs ``[start, stop)`` of set bits, in increasing order (lazily: each step
        costs a page or two, whatever the runs' lengths)."""
        pos = 0
        while (run := self.run_at(pos)) is not None:
            yield run
            pos = run[1]

    # --- on-disk form --------------------------------------------------------------

    def page_bytes(self, p: int) -> bytes:
        """The on-disk bytes of page ``p`` (``page_len`` bytes)."""
        if p in self._full:
            return self._ones(p)
        page = self._pages.get(p)
        return bytes(page) if page is not None else bytes(self.page_len)

    def to_bytes(self) -> bytes:
        """The whole on-disk array: ``npages * page_len`` bytes."""
        return b"".join(self.page_bytes(p) for p in range(self.npages))

    def load_page(self, p: int, data: bytes | bytearray | memoryview) -> None:
        """Replace page ``p`` with on-disk bytes (bits past ``nbits`` are ignored)."""
        assert 0 <= p < self.npages and len(data) == self.page_len
        ones = self._ones(p)
        value = int.from_bytes(data, "little") & int.from_bytes(ones, "little")
        self._full.discard(p)
        self._pages.pop(p, None)
        self._pop.pop(p, None)
        self._changed.add(p)
        if not value:
            return
        page = self._alloc(p)
        if page is None:
            self._full.add(p)
            return
        page[:] = value.to_bytes(self.page_len, "little")
        self._pop[p] = value.bit_count()

    @classmethod
    def from_bytes(
        cls,
        nbits: int,
        data: bytes | bytearray | memoryview,
        *,
        page_bits: int = PAGE_BITS,
        max_pages: int | None = None,
    ) -> Bitmap:
        """A bitmap from its on-disk array (at least ``npages * page_len`` bytes)."""
        bm = cls(nbits, page_bits=page_bits, max_pages=max_pages)
        view = memoryview(data)
        if len(view) < bm.npages * bm.page_len:
            raise ValueError("on-disk bitmap is shorter than nbits")
        for p in range(bm.npages):
            chunk = view[p * bm.page_len : (p + 1) * bm.page_len]
            if any(chunk.cast("Q")):
                bm.load_page(p, chunk)
        # Pages that could not be allocated read as full, which is not what the disk
        # holds: they stay "changed" so they are written (as all ones) before use.
        bm._changed = set(bm._full)
        return bm

    def changed_pages(self) -> list[int]:
        return sorted(self._changed)

    def take_changed(self) -> dict[int, bytes]:
        """Snapshot the on-disk bytes of every page changed since the last call."""
        out = {p: self.page_bytes(p) for p in sorted(self._changed)}
        self._changed.clear()
        return out


def union_run(bitmaps: Sequence[Bitmap], pos: int) -> tuple[int, int] | None:
    """The first run ``[start, end)`` at or after ``pos`` of bits set in any of
    ``bitmaps`` (same geometry), or None."""
    starts = [s for b in bitmaps if (s := b.next_set(pos)) is not None]
    if not starts:
        return None
    start = end = min(starts)
    while True:
        nxt = max(b.next_clear(end) for b in bitmaps)
        if nxt == end:
            return start, end
        end = nxt


def union_count(bitmaps: Sequence[Bitmap]) -> int:
    """How many bits are set in any of ``bitmaps`` (same geometry), a page at a time."""
    if len(bitmaps) == 1:
        return bitmaps[0].count()
    pages: set[int] = set()
    for b in bitmaps:
        pages |= b._pages.keys() | b._full
    total = 0
    for p in pages:
        value = 0
        for b in bitmaps:
            value |= b.page_int(p)
        total += value.bit_count()
    return total
