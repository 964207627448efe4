"""Where a parity array keeps each byte (pure arithmetic, no I/O).

Theory of operation
-------------------
``n`` members, ``m`` of them parity in every stripe (1: RAID5, P; 2: RAID6, P and Q),
``k = n - m`` data.  Every member's data area is cut into chunks of ``chunk`` bytes;
*stripe* ``s`` is chunk ``s`` of every member, at member offset ``s * chunk``, so a
stripe is a member byte range and a range of stripes is one member range on every
member.  The array's bytes fill the data chunks stripe after stripe: logical chunk ``c``
is data chunk ``c % k`` of stripe ``c // k``.

The rotation is MD's *left-symmetric* (its default): stripe ``s`` has P on member
``n - 1 - s % n`` and Q (RAID6) on the next member (mod ``n``); its data chunks follow,
in order, on the members after the parity ones (mod ``n``), so a sequential read
touches every member in turn.  For 3 members (raid5)::

    stripe 0:  D0  D1  P
    stripe 1:  D3  P   D2
    stripe 2:  P   D4  D5

Parity is computed column by column: byte ``j`` of a stripe's parity chunks depends on
byte ``j`` of its data chunks only, so a write of a few bytes needs those bytes of the
column range it touches (``hull``), not whole chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Piece:
    """``length`` bytes of data chunk ``index`` of ``stripe``, from ``offset`` in the
    chunk; ``pos`` is where they are in the request's buffer."""

    stripe: int
    index: int
    offset: int
    length: int
    pos: int


@dataclass(frozen=True, slots=True)
class Geometry:
    """The layout of ``members`` members with ``parity`` parity chunks per stripe,
    ``chunk`` bytes per chunk and ``stripes`` stripes (each member's data area)."""

    members: int
    parity: int
    chunk: int
    stripes: int

    def __post_init__(self) -> None:
        assert self.parity in (1, 2) and self.members >= self.parity + 2
        assert self.chunk > 0 and self.stripes >= 0

    @property
    def data(self) -> int:
        """Data chunks per stripe (``k``)."""
        return self.members - self.parity

    @property
    def width(self) -> int:
        """Array bytes per stripe."""
        return self.data * self.chunk

    @property
    def size(self) -> int:
        """The array's size in bytes."""
        return self.stripes * self.width

    def parity_member(self, stripe: int, j: int = 0) -> int:
        """The member holding parity ``j`` (0: P, 1: Q) of ``stripe``."""
        n = self.members
        return (n - 1 - stripe % n + j) % n

    def data_member(self, stripe: int, index: int) -> int:
        """The member holding data chunk ``index`` of ``stripe``."""
        n = self.members
        return (n - 1 - stripe % n + self.parity + index) % n

    def role(self, stripe: int, member: int) -> tuple[bool, int]:
        """``(is_parity, index)`` of ``member`` in ``stripe``: parity ``index`` (0: P,
        1: Q) or data chunk ``index``."""
        r = (member - (self.members - 1 - stripe % self.members)) % self.members
        return (True, r) if r < self.parity else (False, r - self.parity)

    def stripes_of(self, offset: int, length: int) -> range:
        """The stripes ``[offset, offset + length)`` of the array touches (length > 0)."""
        w = self.width
        return range(offset // w, (offset + length - 1) // w + 1)

    def pieces(self, offset: int, length: int) -> Iterator[Piece]:
        """The data chunk pieces of ``[offset, offset + length)``, in array order."""
        c, k = self.chunk, self.data
        pos, end = offset, offset + length
        while pos < end:
            logical, within = divmod(pos, c)
            n = min(c - within, end - pos)
            stripe, index = divmod(logical, k)
            yield Piece(stripe, index, within, n, pos - offset)
            pos += n

    def member_range(self, stripes: range) -> tuple[int, int]:
        """``(offset, length)`` of ``stripes`` on every member."""
        return stripes.start * self.chunk, len(stripes) * self.chunk
