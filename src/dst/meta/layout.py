"""Where a member's metadata lives (pure arithmetic, no I/O).

Theory of operation
-------------------
Data starts at offset 0 of every member, so a mirror leg detached from its array is a
plain image.  The metadata area is reserved at the *end* of the member, 4 KiB aligned::

    0                    data_size == meta_offset   sb_offsets[0]   sb_offsets[1]
    | data ............... | bitmap ................ | superblock A | superblock B |
                                                       member end aligned down to 4 KiB ^

The two superblock slots are the last 8 KiB (of the member size aligned down to 4 KiB),
so a loader finds them from the member size alone, before it knows the region size
(as MD's v1.0 superblock at the end of the device).  The on-disk bitmap (1 bit per
region, bit ``i`` is bit ``i % 8`` of byte ``i // 8``, rounded up to 4 KiB) sits just
before them.  ``data_size`` is the largest 4 KiB multiple that leaves room for the
bitmap it needs (found by a binary search on the bitmap size); the last region may be partial.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = 4096
SB_SLOT = BLOCK
SB_SLOTS = 2
# Bytes per write-intent bit.  The first write to a clean region waits for its bit to
# be durable on every leg (a synchronous write on each node), so small regions make
# random writes to a cold array slow (md's internal bitmaps default to 64 MiB chunks;
# DRBD's activity log keeps 4 MiB extents); a region is also the unit of resync, locked
# while it is copied, and a crash resyncs every region written in the last
# DEFAULT_CLEAR_DELAY seconds.  1 MiB: on ext4, 4 KiB random writes over a fresh 1 GiB
# mirror ran at 1.17x qemu's quorum (0.62x at QD1) against 0.89x (0.42x) with 64 KiB
# regions, as fast as with 4 MiB ones (docs/benchmarks-log.md); 128 KiB of bitmap per TiB.
DEFAULT_REGION_SIZE = 1 << 20
# Seconds a region stays idle before its write-intent bit is cleared.  Long enough that
# a working set stays marked (no mark/clear churn; DRBD's activity log keeps gigabytes
# of extents hot), short enough that a crash resyncs little: at most what was written
# in the last half minute.
DEFAULT_CLEAR_DELAY = 30.0


def _down(n: int, a: int) -> int:
    return n - n % a


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


def check_region_size(region_size: int) -> None:
    """Raise ValueError unless ``region_size`` is a power of two >= 4 KiB."""
    if region_size < BLOCK or region_size & (region_size - 1):
        raise ValueError(f"region size must be a power of two >= {BLOCK}: {region_size}")


def region_count(data_size: int, region_size: int) -> int:
    """Regions covering ``data_size`` bytes (the last one may be partial)."""
    return -(-data_size // region_size)


def bitmap_bytes(nregions: int) -> int:
    """Bytes of on-disk bitmap for ``nregions`` bits, rounded up to 4 KiB (at least one block)."""
    return max(BLOCK, _up(-(-nregions // 8), BLOCK))


@dataclass(frozen=True, slots=True)
class MetaLayout:
    """Byte offsets of one member's areas; build with :func:`layout_for`."""

    member_size: int
    region_size: int
    data_size: int
    nregions: int
    bitmap_offset: int
    bitmap_size: int
    sb_offsets: tuple[int, int]

    @property
    def meta_offset(self) -> int:
        """Start of the metadata area (== bitmap_offset)."""
        return self.bitmap_offset

    @property
    def meta_size(self) -> int:
        return self.bitmap_size + SB_SLOTS * SB_SLOT


def _meta_size(data_size: int, region_size: int) -> int:
    return bitmap_bytes(region_count(data_size, region_size)) + SB_SLOTS * SB_SLOT


def layout_for(member_size: int, region_size: int = DEFAULT_REGION_SIZE) -> MetaLayout:
    """The layout of a member of ``member_size`` bytes.

    Raises ValueError if the region size is invalid or the member is too small to hold
    metadata plus at least one 4 KiB block of data.
    """
    check_region_size(region_size)
    end = _down(member_size, BLOCK)
    room = end - SB_SLOTS * SB_SLOT  # for data and bitmap together

    def fits(bm: int) -> bool:  # monotone: a bigger bitmap leaves less data to map
        return bitmap_bytes(region_count(max(room - bm, 0), region_size)) <= bm

    # Binary search for the smallest bitmap (in blocks) that maps the data it leaves.
    lo, hi = 1, max(1, bitmap_bytes(region_count(max(room, 0), region_size)) // BLOCK)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid * BLOCK) else (mid + 1, hi)
    bm = lo * BLOCK  # may exceed what the regions need by a block; it is reserved
    data = room - bm
    if data < BLOCK:
        raise ValueError(f"member of {member_size} bytes is too small for dst metadata")
    sb0 = end - SB_SLOTS * SB_SLOT
    return MetaLayout(
        member_size=member_size,
        region_size=region_size,
        data_size=data,
        nregions=region_count(data, region_size),
        bitmap_offset=sb0 - bm,
        bitmap_size=bm,
        sb_offsets=(sb0, sb0 + SB_SLOT),
    )


def member_size_for(data_size: int, region_size: int = DEFAULT_REGION_SIZE) -> int:
    """Smallest member size whose :func:`layout_for` gives at least ``data_size`` bytes."""
    check_region_size(region_size)
    data = _up(max(data_size, BLOCK), BLOCK)
    return data + _meta_size(data, region_size)


def sb_offsets(member_size: int) -> tuple[int, int]:
    """The two superblock slots of a member, known from its size alone."""
    sb0 = _down(member_size, BLOCK) - SB_SLOTS * SB_SLOT
    if sb0 < 0:
        raise ValueError(f"member of {member_size} bytes is too small for dst metadata")
    return (sb0, sb0 + SB_SLOT)
