"""Pure layout arithmetic for the composite targets (no I/O).

Theory of operation
-------------------
A layout maps the array's byte space onto its members.  Requests are split into
:class:`Piece` objects ``(member, member_offset, length, array_offset)``: each piece is
contiguous both on the array and on its member, the pieces of a request are returned in
array order, cover it exactly and never overlap.

* :class:`LinearLayout` concatenates segments: segment ``i`` contributes bytes
  ``[start, start + size)`` of its device and the array offsets after all earlier
  segments.  "member" is the segment index (a device may back several segments).
* :class:`StripeLayout` deals ``chunk``-sized chunks round-robin over ``members``
  devices: array chunk ``c`` lives on member ``c % members`` at row ``c // members``.
  Every member contributes ``rows * chunk`` bytes; the tail of bigger members is unused.
  For a given member the chunks of one request are contiguous on that member, which
  :meth:`StripeLayout.member_runs` exploits to issue one I/O per member.

``to_member``/``to_array`` are inverses and let a target map a member's answer (block
status) back into array space.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from dst.errors import ConfigError

DEFAULT_CHUNK = 64 << 10


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a request: ``length`` bytes at ``member_offset`` of ``member``."""

    member: int
    member_offset: int
    length: int
    array_offset: int


@dataclass(frozen=True, slots=True)
class Segment:
    """``size`` bytes of a device starting at its offset ``start``."""

    start: int
    size: int

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ConfigError("segment start must be >= 0", where="start")
        if self.size <= 0:
            raise ConfigError("segment size must be > 0", where="size")


@dataclass(frozen=True, slots=True)
class LinearLayout:
    """Segments laid end to end.  Immutable: growing returns a new layout."""

    segments: tuple[Segment, ...]
    bounds: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bounds = [0]
        for seg in self.segments:
            bounds.append(bounds[-1] + seg.size)
        object.__setattr__(self, "bounds", tuple(bounds))

    @property
    def size(self) -> int:
        return self.bounds[-1]

    def append(self, segment: Segment) -> LinearLayout:
        return LinearLayout((*self.segments, segment))

    def drop_last(self) -> LinearLayout:
        """The layout without its last segment.  Raises ConfigError if it is the only one."""
        if len(self.segments) <= 1:
            raise ConfigError("cannot remove the only segment", where="segments")
        return LinearLayout(self.segments[:-1])

    def to_member(self, offset: int) -> tuple[int, int]:
        """``(segment index, device offset)`` of array byte ``offset``."""
        assert 0 <= offset < self.size
        i = bisect.bisect_right(self.bounds, offset) - 1
        return i, self.segments[i].start + offset - self.bounds[i]

    def to_array(self, member: int, member_offset: int) -> int:
        """Array offset of byte ``member_offset`` of segment ``member``'s device."""
        seg = self.segments[member]
        assert seg.start <= member_offset < seg.start + seg.size
        return self.bounds[member] + member_offset - seg.start

    def split(self, offset: int, length: int) -> list[Piece]:
        assert offset >= 0 and length >= 0 and offset + length <= self.size
        pieces: list[Piece] = []
        end = offset + length
        i = bisect.bisect_right(self.bounds, offset) - 1
        while offset < end:
            seg_end = self.bounds[i + 1]
            n = min(end, seg_end) - offset
            moff = self.segments[i].start + offset - self.bounds[i]
            pieces.append(Piece(i, moff, n, offset))
            offset += n
            i += 1
        return pieces


@dataclass(frozen=True, slots=True)
class StripeLayout:
    """``members`` devices, ``rows`` rows of ``chunk`` bytes each."""

    members: int
    chunk: int
    rows: int

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ConfigError("a stripe needs at least one member", where="members")
        if self.chunk <= 0:
            raise ConfigError("chunk size must be > 0", where="chunk")
        if self.rows < 0:
            raise ConfigError("rows must be >= 0", where="rows")

    @classmethod
    def for_sizes(cls, sizes: list[int], chunk: int = DEFAULT_CHUNK) -> StripeLayout:
        """The layout over members of these sizes (the smallest one limits)."""
        if not sizes:
            raise ConfigError("a stripe needs at least one member", where="members")
        if chunk <= 0:
            raise ConfigError("chunk size must be > 0", where="chunk")
        return cls(len(sizes), chunk, min(sizes) // chunk)

    @property
    def size(self) -> int:
        return self.members * self.rows * self.chunk

    @property
    def member_size(self) -> int:
        """Bytes used on each member."""
        return self.rows * self.chunk

    def to_member(self, offset: int) -> tuple[int, int]:
        assert 0 <= offset < self.size
        c, within = divmod(offset, self.chunk)
        row, member = divmod(c, self.members)
        return member, row * self.chunk + within

    def to_array(self, member: int, member_offset: int) -> int:
        assert 0 <= member < self.members and 0 <= member_offset < self.member_size
        row, within = divmod(member_offset, self.chunk)
        return (row * self.members + member) * self.chunk + within

    def split(self, offset: int, length: int) -> list[Piece]:
        assert offset >= 0 and length >= 0 and offset + length <= self.size
        pieces: list[Piece] = []
        end = offset + length
        while offset < end:
            member, moff = self.to_member(offset)
            n = min(self.chunk - offset % self.chunk, end - offset)
            pieces.append(Piece(member, moff, n, offset))
            offset += n
        return pieces

    def member_runs(self, offset: int, length: int) -> list[tuple[Piece, list[Piece]]]:
        """Per member touched, in array order: (its run, the pieces the run is made of).

        The run is the member's contiguous range for the request; its ``array_offset``
        is where its first byte lives, the rest is scattered as the pieces say.
        """
        groups: dict[int, list[Piece]] = {}
        for p in self.split(offset, length):
            groups.setdefault(p.member, []).append(p)
        out = []
        for m, ps in groups.items():
            run = Piece(m, ps[0].member_offset, sum(p.length for p in ps), ps[0].array_offset)
            out.append((run, ps))
        return out
