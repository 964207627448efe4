"""Reading and writing one member's metadata area (the async shell).

Theory of operation
-------------------
A :class:`MetaStore` owns the metadata area of one member :class:`BlockDevice` (see
:mod:`dst.meta.layout`).  Superblock writes alternate between the two slots, each with
the serial of the last one plus one, each a FUA write (durable by itself, without a
flush of the whole member: a flush behind a member's dirty data can take seconds, and
superblocks are written while I/O waits, e.g. when a leg fails), so at every moment one
slot holds a complete, durable copy; :meth:`load` takes the newest valid one (a corrupt
or unreadable slot falls back to the other).  Whoever needs the data durable before a
superblock flushes first (``flush_first`` in the mirror's stores).  Bitmap pages are
written as the 4 KiB blocks a :class:`dst.meta.regions.MetaWrite` carries (contiguous
pages in one request), with FUA.  Superblock writes are serialised by a lock; bitmap writes are
serialised by the tracker (one batch in flight).

Errors: device failures propagate as :class:`dst.errors.BlockError` (the member is
then faulty); missing or inconsistent metadata raises :class:`MetadataError`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from dst.device import BlockDevice
from dst.errors import BlockError
from dst.meta.bitmap import PAGE_BITS, Bitmap
from dst.meta.layout import BLOCK, DEFAULT_REGION_SIZE, MetaLayout, layout_for, sb_offsets
from dst.meta.superblock import MetadataError, Superblock, encode, pick

_PAGE_LEN = PAGE_BITS // 8
assert _PAGE_LEN == BLOCK


class MetaStore:
    """The metadata of one member; ``sb`` is the last superblock loaded or written."""

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self.layout: MetaLayout | None = None
        self.sb: Superblock | None = None
        self._slot = 1  # slot holding ``sb``; the next write goes to the other one
        self._pages: dict[int, bytes] = {}  # non-zero bitmap pages as last written/read
        self._pages_known = False  # True: a page not in _pages is zero on the member
        self._lock = asyncio.Lock()

    async def format(
        self,
        *,
        array_uuid: uuid.UUID,
        member_uuid: uuid.UUID,
        role: int,
        member_count: int,
        generation: int,
        region_size: int = DEFAULT_REGION_SIZE,
        array_name: str = "",
        spec: Mapping[str, Any] | None = None,
        inconsistent: bool = False,
    ) -> Superblock:
        """Write fresh metadata (clean bitmap, both slots).  Data is not touched;
        ``inconsistent``: the member joins as a resync target.

        Raises ValueError if the member is too small, MetadataError if name/spec do
        not fit, BlockError on I/O failure.
        """
        lay = layout_for(self.device.size, region_size)
        sb = Superblock(
            array_uuid=array_uuid,
            member_uuid=member_uuid,
            role=role,
            member_count=member_count,
            data_size=lay.data_size,
            region_size=region_size,
            array_name=array_name,
            spec=dict(spec or {}),
            current=generation,
            inconsistent=inconsistent,
        )
        encode(sb)  # fail before touching the device
        await self.device.write_zeroes(lay.bitmap_offset, lay.bitmap_size)
        self.layout, self._slot = lay, 1
        self._pages, self._pages_known = {}, True
        async with self._lock:
            for slot, serial in ((0, 1), (1, 2)):
                await self.device.write(lay.sb_offsets[slot], encode(replace(sb, serial=serial)))
            await self.device.flush()
        self.sb = replace(sb, serial=2)
        return self.sb

    async def load(self) -> Superblock:
        """Read both slots and take the newest valid copy.

        Raises MetadataError if neither slot is valid or the superblock does not match
        the member's size; BlockError only if neither slot could be read.
        """
        raws: list[bytes | None] = []
        errors: list[BlockError] = []
        for off in sb_offsets(self.device.size):
            try:
                raws.append(bytes(await self.device.read(off, BLOCK)))
            except BlockError as e:
                raws.append(None)
                errors.append(e)
        if len(errors) == 2:
            raise errors[0]
        sb, slot = pick(raws[0], raws[1])
        try:
            lay = layout_for(self.device.size, sb.region_size)
        except ValueError as e:
            raise MetadataError(f"superblock does not fit this member: {e}") from e
        if lay.data_size != sb.data_size:
            raise MetadataError(
                f"superblock data size {sb.data_size} does not match member layout "
                f"({lay.data_size}): member resized?"
            )
        self.layout, self.sb, self._slot = lay, sb, slot
        return sb

    async def write_superblock(self, sb: Superblock) -> Superblock:
        """Durably write ``sb`` (serial set to last + 1) to the older slot; returns it."""
        lay = self._need_layout()
        async with self._lock:
            assert self.sb is not None
            new = replace(sb, serial=self.sb.serial + 1)
            slot = 1 - self._slot
            await self.device.write(lay.sb_offsets[slot], encode(new), fua=True)
            self.sb, self._slot = new, slot
        return new

    async def read_bitmap(self, *, max_pages: int | None = None) -> Bitmap:
        """The on-disk bitmap (one bit per region)."""
        lay = self._need_layout()
        data = await self.device.read(lay.bitmap_offset, lay.bitmap_size)
        self._pages = {
            i // BLOCK: bytes(data[i : i + BLOCK])
            for i in range(0, len(data), BLOCK)
            if any(data[i : i + BLOCK])
        }
        self._pages_known = True
        return Bitmap.from_bytes(lay.nregions, data, max_pages=max_pages)

    async def write_bitmap_pages(
        self, pages: Mapping[int, bytes], *, data_durable: bool = False
    ) -> None:
        """Write bitmap pages (index -> 4 KiB) durably, contiguous runs in one request.

        Marks (bits set) must be durable before the data they cover is written: the
        pages go out with FUA, which syncs only their range.  A clear must not reach
        the disk before the data of its region: if any bit goes from 1 to 0 (or the
        page's previous content is unknown), the member is flushed first -- unless
        the caller says the data of every cleared region is durable already
        (``data_durable``: it flushed after those regions were last written).
        """
        lay = self._need_layout()
        if not pages:
            return
        if not data_durable and any(self._clears(p, data) for p, data in pages.items()):
            await self.device.flush()
        run: list[bytes] = []
        start = -1
        for p in sorted(pages):
            assert 0 <= (p + 1) * BLOCK <= lay.bitmap_size and len(pages[p]) == BLOCK
            if run and p != start + len(run):
                await self._write_run(lay.bitmap_offset + start * BLOCK, run)
                run = []
            if not run:
                start = p
            run.append(pages[p])
        await self._write_run(lay.bitmap_offset + start * BLOCK, run)

    async def _write_run(self, offset: int, run: list[bytes]) -> None:
        await self.device.write(offset, b"".join(run), fua=True)
        start = (offset - self._need_layout().bitmap_offset) // BLOCK
        for i, page in enumerate(run):
            if any(page):
                self._pages[start + i] = page
            else:
                self._pages.pop(start + i, None)

    def _clears(self, page: int, data: bytes) -> bool:
        """Whether writing ``data`` over bitmap page ``page`` clears a bit."""
        old = self._pages.get(page)
        if old is None:
            return not self._pages_known
        return bool(int.from_bytes(old, "little") & ~int.from_bytes(data, "little"))

    def _need_layout(self) -> MetaLayout:
        if self.layout is None or self.sb is None:
            raise MetadataError("metadata not loaded or formatted")
        return self.layout
