"""MetaStore over an in-memory member."""

from __future__ import annotations

import asyncio
import errno
import uuid
from dataclasses import replace

import pytest

from dst.device import BlockDevice, Buffer
from dst.errors import BlockError
from dst.meta.bitmap import Bitmap
from dst.meta.layout import BLOCK, layout_for
from dst.meta.regions import RegionTracker
from dst.meta.store import MetaStore
from dst.meta.superblock import MetadataError, State, decode, rotate
from dst.targets.memory import MemoryDevice

pytestmark = pytest.mark.timeout(10)
SIZE = 64 << 20
REGION = 65536


class CountingDevice(MemoryDevice):
    """Counts writes and flushes; can refuse reads of given offsets."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.writes: list[tuple[int, int]] = []
        self.flushes = 0
        self.fuas = 0
        self.bad_reads: set[int] = set()

    async def read(self, offset: int, length: int) -> Buffer:
        if offset in self.bad_reads:
            raise BlockError(errno.EIO, "injected")
        return await super().read(offset, length)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self.writes.append((offset, len(data)))
        self.fuas += fua
        await super().write(offset, data, fua=fua)

    async def flush(self) -> None:
        self.flushes += 1


class SparseDevice(BlockDevice):
    """A large device that stores only the 4 KiB blocks written (not zero)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.blocks: dict[int, bytes] = {}
        self.writes: list[tuple[int, int]] = []

    async def read(self, offset: int, length: int) -> Buffer:
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        raw = b"".join(self.blocks.get(b, bytes(BLOCK)) for b in range(first, last + 1))
        return raw[offset - first * BLOCK :][:length]

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        assert offset % BLOCK == 0 and len(data) % BLOCK == 0
        self.writes.append((offset, len(data)))
        for i in range(0, len(data), BLOCK):
            self.blocks[(offset + i) // BLOCK] = bytes(data[i : i + BLOCK])

    async def write_zeroes(self, offset: int, length: int, **_: bool) -> None:
        for b in range(offset // BLOCK, (offset + length) // BLOCK):
            self.blocks.pop(b, None)


async def formatted(dev: MemoryDevice) -> MetaStore:
    store = MetaStore(dev)
    await store.format(
        array_uuid=uuid.UUID(int=1),
        member_uuid=uuid.UUID(int=2),
        role=1,
        member_count=2,
        generation=0xABC,
        region_size=REGION,
        array_name="vol",
        spec={"type": "mirror"},
    )
    return store


async def test_format_and_load() -> None:
    dev = MemoryDevice(SIZE)
    dev.data[: SIZE - 1] = b"\x5a" * (SIZE - 1)
    sb = await formatted(dev)
    lay = layout_for(SIZE, REGION)
    assert dev.data[: lay.data_size] == b"\x5a" * lay.data_size  # data untouched
    assert dev.data[lay.bitmap_offset : lay.sb_offsets[0]] == bytes(lay.bitmap_size)
    loaded = await MetaStore(dev).load()
    assert loaded == sb.sb
    assert loaded.data_size == lay.data_size and loaded.current == 0xABC


async def test_bitmap_marks_are_fua_writes_and_clears_flush_the_data_first() -> None:
    dev = CountingDevice(SIZE)
    store = await formatted(dev)
    flushes = dev.flushes
    page = bytearray(BLOCK)
    page[0] = 0b11  # regions 0 and 1 marked: durable by FUA, no flush
    await store.write_bitmap_pages({0: bytes(page)})
    page[1] = 0b1  # one more mark on the same page
    await store.write_bitmap_pages({0: bytes(page)})
    assert (dev.flushes, dev.fuas) == (flushes, 2)
    page[0] = 0b10  # region 0 cleared: its data must be durable before the clear
    await store.write_bitmap_pages({0: bytes(page)})
    assert (dev.flushes, dev.fuas) == (flushes + 1, 3)
    # A store that has not read the bitmap does not know what a page held: it flushes.
    other = MetaStore(dev)
    await other.load()
    await other.write_bitmap_pages({0: bytes(page)})
    assert dev.flushes == flushes + 2
    # After reading the bitmap, it knows.
    assert (await other.read_bitmap()).count() == 2
    page[5] = 1
    await other.write_bitmap_pages({0: bytes(page)})
    assert dev.flushes == flushes + 2


async def test_writes_alternate_and_are_durable_by_themselves() -> None:
    """Each superblock write is a FUA write of its slot, never a flush of the member
    (that could wait seconds behind its dirty data)."""
    dev = CountingDevice(SIZE)
    store = await formatted(dev)
    lay = layout_for(SIZE, REGION)
    assert store.sb is not None
    dev.writes.clear()
    flushes, fuas = dev.flushes, dev.fuas
    s3 = await store.write_superblock(replace(store.sb, state=State.DIRTY))
    s4 = await store.write_superblock(rotate(s3, 0xDEF))
    assert (s3.serial, s4.serial) == (3, 4)
    assert [o for o, _ in dev.writes] == [lay.sb_offsets[0], lay.sb_offsets[1]]
    assert (dev.flushes, dev.fuas) == (flushes, fuas + 2)
    again = MetaStore(dev)
    assert await again.load() == s4
    s5 = await again.write_superblock(s4)
    assert s5.serial == 5 and dev.writes[-1][0] == lay.sb_offsets[0]


async def test_corrupt_slot_falls_back() -> None:
    dev = CountingDevice(SIZE)
    store = await formatted(dev)
    assert store.sb is not None
    older = await store.write_superblock(replace(store.sb, events=10))  # slot A, serial 3
    newer = await store.write_superblock(replace(older, events=11))  # slot B, serial 4
    lay = layout_for(SIZE, REGION)
    b = lay.sb_offsets[1]
    dev.data[b + 200] ^= 0xFF  # torn write of the newest copy
    again = MetaStore(dev)
    assert await again.load() == older
    # the next write overwrites the bad slot, not the good one
    s = await again.write_superblock(newer)
    assert s.serial == 4 and decode(bytes(dev.data[b : b + BLOCK])) == s
    dev.bad_reads.add(lay.sb_offsets[0])  # unreadable slot A falls back to B too
    assert await MetaStore(dev).load() == s


async def test_both_slots_bad() -> None:
    dev = CountingDevice(SIZE)
    await formatted(dev)
    lay = layout_for(SIZE, REGION)
    for off in lay.sb_offsets:
        dev.data[off + 30] ^= 1
    with pytest.raises(MetadataError, match=r"slot A.*checksum.*slot B.*checksum"):
        await MetaStore(dev).load()
    with pytest.raises(MetadataError, match="magic"):
        await MetaStore(MemoryDevice(SIZE)).load()
    dev.bad_reads.update(lay.sb_offsets)
    with pytest.raises(BlockError):
        await MetaStore(dev).load()


async def test_resized_member_is_refused() -> None:
    dev = MemoryDevice(SIZE)
    await formatted(dev)
    bigger = MemoryDevice(SIZE + (1 << 20))
    lay = layout_for(SIZE, REGION)
    new = layout_for(bigger.size, REGION)
    bigger.data[new.sb_offsets[0] : new.sb_offsets[0] + 2 * BLOCK] = dev.data[
        lay.sb_offsets[0] : lay.sb_offsets[0] + 2 * BLOCK
    ]
    with pytest.raises(MetadataError, match="resized"):
        await MetaStore(bigger).load()


async def test_not_loaded() -> None:
    with pytest.raises(MetadataError, match="not loaded"):
        await MetaStore(MemoryDevice(SIZE)).write_bitmap_pages({})


async def test_bitmap_pages_round_trip_through_tracker() -> None:
    dev = SparseDevice(16 << 30)  # 4 Mi regions of 4 KiB: 128 bitmap pages
    store = MetaStore(dev)
    await store.format(
        array_uuid=uuid.UUID(int=1), member_uuid=uuid.UUID(int=3), role=0,
        member_count=2, generation=1, region_size=4096,
    )  # fmt: skip
    lay = store.layout
    assert lay is not None and lay.bitmap_size // BLOCK >= 3
    t = RegionTracker(lay.data_size, lay.region_size, 2)
    out = t.begin_write(1, 0, 1)
    out2 = t.leg_missed(1, [5, 32768 * 2 + 1])  # pages 0 and 2
    assert out.meta is not None and out2.meta is None
    dev.writes.clear()
    await store.write_bitmap_pages(out.meta.pages)
    out = t.persisted(out.meta.batch)
    assert out.writes == [1] and out.meta is not None
    await store.write_bitmap_pages(out.meta.pages)
    t.persisted(out.meta.batch)
    # batch 1: page 0 (region 0); batch 2: pages 0 (region 5) and 2, not contiguous
    off = lay.bitmap_offset
    assert [o for o, _ in dev.writes] == [off, off, off + 2 * BLOCK]
    again = MetaStore(dev)
    await again.load()
    bm: Bitmap = await again.read_bitmap()
    assert list(bm) == [0, 5, 32768 * 2 + 1]


async def test_contiguous_pages_are_one_write() -> None:
    dev = SparseDevice(1 << 34)
    store = MetaStore(dev)
    await store.format(
        array_uuid=uuid.UUID(int=1), member_uuid=uuid.UUID(int=3), role=0,
        member_count=2, generation=1, region_size=4096,
    )  # fmt: skip
    dev.writes.clear()
    page = b"\x01" + bytes(BLOCK - 1)
    await store.write_bitmap_pages({0: page, 1: page, 3: page})
    lay = store.layout
    assert lay is not None
    assert dev.writes == [(lay.bitmap_offset, 2 * BLOCK), (lay.bitmap_offset + 3 * BLOCK, BLOCK)]
    assert list(await store.read_bitmap()) == [0, 32768, 3 * 32768]


async def test_concurrent_superblock_writes_are_serialised() -> None:
    dev = MemoryDevice(SIZE)
    store = await formatted(dev)
    assert store.sb is not None
    base = store.sb
    done = await asyncio.gather(
        *(store.write_superblock(replace(base, events=i)) for i in range(6))
    )
    assert sorted(s.serial for s in done) == list(range(3, 9))
    assert (await MetaStore(dev).load()).serial == 8
