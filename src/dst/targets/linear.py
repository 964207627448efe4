"""Linear concatenation of segments of child devices (dm-linear).

Theory of operation
-------------------
The segment table is an immutable :class:`_Table` (a :class:`LinearLayout` plus the
device behind each segment).  Every request takes one snapshot of the table, splits
itself into pieces with the layout and runs the pieces concurrently on the children.
Growing (:meth:`LinearDevice.append`) and shrinking (:meth:`LinearDevice.remove_last`)
build a new table and swap the reference; the array daemon suspends I/O around the
swap, so no request straddles two tables.

Sizes are known only once children are open, so the table is built in :meth:`open`.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dst.aio import gather_all
from dst.device import BlockDevice, Buffer, Cancel, Done, Extent, Health
from dst.errors import BlockError, ConfigError
from dst.targets.composite import (
    combined_health,
    intersect_caps,
    status_over,
    unique,
)
from dst.targets.layout import LinearLayout, Segment


@dataclass(frozen=True, slots=True)
class _Table:
    layout: LinearLayout
    devs: tuple[BlockDevice, ...]


class LinearDevice(BlockDevice):
    """Segment ``i`` is ``sizes[i]`` bytes of ``children[i]`` from ``starts[i]``.

    ``starts`` default to 0 and ``sizes`` (or a ``None`` entry) to the rest of the
    child.  Raises ConfigError (at construction or open) for a bad table.
    """

    kind = "linear"

    def __init__(
        self,
        children: Sequence[BlockDevice],
        *,
        starts: Sequence[int] | None = None,
        sizes: Sequence[int | None] | None = None,
        name: str = "linear",
    ) -> None:
        if not children:
            raise ConfigError("a linear device needs at least one segment", where="children")
        n = len(children)
        self._starts = list(starts) if starts is not None else [0] * n
        self._sizes = list(sizes) if sizes is not None else [None] * n
        if len(self._starts) != n or len(self._sizes) != n:
            raise ConfigError("starts/sizes must have one entry per child", where="segments")
        self._pending = list(children)
        self.name = name
        self.size = 0
        self._table = _Table(LinearLayout(()), ())

    # -- lifecycle and reconfiguration ----------------------------------------------

    async def open(self) -> None:
        """Open the children and build the table.  Raises BlockError, ConfigError."""
        for dev in unique(self._pending):
            await dev.open()
        segs = [
            _segment(d, st, sz)
            for d, st, sz in zip(self._pending, self._starts, self._sizes, strict=True)
        ]
        self._swap(_Table(LinearLayout(tuple(segs)), tuple(self._pending)))

    async def close(self) -> None:
        for dev in unique(self._table.devs or tuple(self._pending)):
            await dev.close()

    def append(self, child: BlockDevice, start: int = 0, size: int | None = None) -> None:
        """Grow by ``size`` bytes of the already open ``child`` from ``start``.

        Call with I/O suspended.  Raises ConfigError if the segment does not fit.
        """
        t = self._table
        self._swap(_Table(t.layout.append(_segment(child, start, size)), (*t.devs, child)))

    def remove_last(self) -> BlockDevice:
        """Shrink by the last segment; return its device (still open, now the caller's).

        Call with I/O suspended.  Raises ConfigError if it is the only segment.
        """
        t = self._table
        self._swap(_Table(t.layout.drop_last(), t.devs[:-1]))
        return t.devs[-1]

    def replace_child(self, old: BlockDevice, new: BlockDevice) -> None:
        """Put ``new`` (open, at least as large) in every segment ``old`` backs.

        The segments keep their offsets, so ``new`` must hold ``old``'s data there (a
        replace copies it first).  Call with I/O suspended; ``old`` is still open and
        now the caller's.  Raises ConfigError if ``old`` is not a child or ``new`` is
        smaller.
        """
        t = self._table
        devs = t.devs or tuple(self._pending)
        _check_replace(devs, old, new)
        swapped = tuple(new if d is old else d for d in devs)
        if not t.devs:  # not open yet: the table is built from _pending
            self._pending = list(swapped)
            return
        self._swap(_Table(t.layout, swapped))

    def _swap(self, table: _Table) -> None:
        self._table = table
        self.size = table.layout.size
        self.caps = intersect_caps(table.devs)

    # -- I/O -------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> Buffer:
        t = self._table
        pieces = t.layout.split(offset, length)
        if len(pieces) == 1:
            return await t.devs[pieces[0].member].read(pieces[0].member_offset, length)
        parts = await gather_all([t.devs[p.member].read(p.member_offset, p.length) for p in pieces])
        return b"".join(parts)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        t = self._table
        pieces = t.layout.split(offset, len(data))
        if len(pieces) == 1:
            return await t.devs[pieces[0].member].write(pieces[0].member_offset, data, fua=fua)
        view = memoryview(data)
        writes = []
        for p in pieces:
            at = p.array_offset - offset
            writes.append(
                t.devs[p.member].write(p.member_offset, view[at : at + p.length], fua=fua)
            )
        await gather_all(writes)

    # The callback fast path (dst.device): a request within one segment goes to it.

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        t = self._table
        pieces = t.layout.split(offset, length)
        if len(pieces) != 1:
            return None
        return t.devs[pieces[0].member].submit_read(pieces[0].member_offset, length, done)

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        t = self._table
        pieces = t.layout.split(offset, len(data))
        if len(pieces) != 1:
            return None
        return t.devs[pieces[0].member].submit_write(pieces[0].member_offset, data, fua, done)

    async def flush(self) -> None:
        await gather_all([d.flush() for d in unique(self._table.devs)])

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        t = self._table
        pieces = t.layout.split(offset, length)
        await gather_all(
            [t.devs[p.member].trim(p.member_offset, p.length, fua=fua) for p in pieces]
        )

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        t = self._table
        if fast and not self.caps.fast_zero:
            raise BlockError(errno.ENOTSUP, "fast zero not supported by every segment")
        await gather_all(
            [
                t.devs[p.member].write_zeroes(
                    p.member_offset, p.length, fua=fua, punch=punch, fast=fast
                )
                for p in t.layout.split(offset, length)
            ]
        )

    async def cache(self, offset: int, length: int) -> None:
        t = self._table
        pieces = t.layout.split(offset, length)
        await gather_all([t.devs[p.member].cache(p.member_offset, p.length) for p in pieces])

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        t = self._table
        return await status_over(t.layout.split(offset, length), t.devs)

    # -- status ----------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        t = self._table
        return {
            "type": "linear",
            "name": self.name,
            "members": [_part(s, d) for s, d in zip(t.layout.segments, t.devs, strict=True)],
        }

    def health(self) -> Health:
        return combined_health(self.children())

    def member_info(self) -> list[dict[str, Any]]:
        """Each child's ``start``: where its first segment sits in the array."""
        starts: dict[int, int] = {}
        pos = 0
        for seg, dev in zip(self._table.layout.segments, self._table.devs, strict=True):
            starts.setdefault(id(dev), pos)
            pos += seg.size
        return [{"start": starts.get(id(d))} for d in self.children()]

    async def add_member(self, dev: BlockDevice, *, start: int = 0, length: int | None = None
                         ) -> None:  # fmt: skip
        self.append(dev, start, length)

    async def remove_member(self, name: str) -> BlockDevice:
        """Only the last segment's device can go (the array shrinks)."""
        devs = self._table.devs
        if not any(d.name == name for d in devs):
            raise ConfigError(f"no member {name!r} in {self.name!r}", where="node")
        if devs[-1].name != name:
            raise ConfigError(f"only the last node ({devs[-1].name!r}) can be removed",
                              where="node")  # fmt: skip
        if len(devs) == 1:
            raise ConfigError("cannot remove the only node of an array", where="node")
        return self.remove_last()

    def children(self) -> Sequence[BlockDevice]:
        return unique(self._table.devs or tuple(self._pending))


def _part(seg: Segment, dev: BlockDevice) -> dict[str, Any]:
    """A member in the array spec's shape: the device's spec plus start/length."""
    part = dev.spec()
    if seg.start:
        part["start"] = seg.start
    part["length"] = seg.size
    return part


def _check_replace(devs: Sequence[BlockDevice], old: BlockDevice, new: BlockDevice) -> None:
    """Raise ConfigError unless ``old`` is among ``devs`` and ``new`` is as large."""
    if not any(d is old for d in devs):
        raise ConfigError(f"{old.name!r} is not a member", where="members")
    if new.size < old.size:
        msg = f"{new.name!r} ({new.size} bytes) is smaller than {old.name!r} ({old.size} bytes)"
        raise ConfigError(msg, where="members")


def _segment(dev: BlockDevice, start: int, size: int | None) -> Segment:
    """The segment of ``dev`` (open) from ``start``; raises ConfigError if out of range."""
    if size is None:
        size = dev.size - start
    if start < 0 or size <= 0 or start + size > dev.size:
        msg = f"segment [{start}, {start}+{size}) does not fit in {dev.name!r} ({dev.size} bytes)"
        raise ConfigError(msg, where="segments")
    return Segment(start, size)
