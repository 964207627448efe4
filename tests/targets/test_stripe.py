"""StripeDevice placement checked byte for byte against MemoryDevice children."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from dst.device import Extent
from dst.errors import BlockError, ConfigError
from dst.targets.fault import FaultDevice
from dst.targets.file import FileDevice
from dst.targets.memory import MemoryDevice
from dst.targets.stripe import StripeDevice

CHUNK = 1024


def where(offset: int, members: int, chunk: int = CHUNK) -> tuple[int, int]:
    """Reference placement, written independently of layout.py."""
    chunk_no = offset // chunk
    return chunk_no % members, (chunk_no // members) * chunk + offset % chunk


async def make(sizes: list[int]) -> tuple[StripeDevice, list[MemoryDevice]]:
    kids = [MemoryDevice(s, name=f"m{i}") for i, s in enumerate(sizes)]
    dev = StripeDevice(kids, chunk=CHUNK)
    await dev.open()
    return dev, kids


async def test_size_uses_smallest_member() -> None:
    dev, _ = await make([10 * CHUNK + 5, 7 * CHUNK + 1000, 9 * CHUNK])
    assert dev.size == 3 * 7 * CHUNK
    assert StripeDevice([MemoryDevice(1)]).chunk == 64 << 10


async def test_placement_byte_for_byte() -> None:
    dev, kids = await make([8 * CHUNK, 8 * CHUNK, 9 * CHUNK])
    pattern = os.urandom(dev.size)
    await dev.write(0, pattern)
    for a in range(0, dev.size, 97):
        m, mo = where(a, 3)
        assert kids[m].data[mo] == pattern[a]
    for m, kid in enumerate(kids):
        expect = bytearray(8 * CHUNK)
        for a in range(dev.size):
            mm, mo = where(a, 3)
            if mm == m:
                expect[mo] = pattern[a]
        assert kid.data[: 8 * CHUNK] == expect
    assert kids[2].data[8 * CHUNK :] == bytes(CHUNK)  # the unused tail


async def test_random_io_matches_flat_model() -> None:
    dev, _ = await make([16 * CHUNK] * 4)
    model = bytearray(dev.size)
    rng = random.Random(7)
    for _ in range(300):
        off = rng.randrange(dev.size)
        n = rng.randint(1, min(5 * CHUNK, dev.size - off))
        op = rng.random()
        if op < 0.5:
            data = rng.randbytes(n)
            await dev.write(off, data, fua=rng.random() < 0.2)
            model[off : off + n] = data
        elif op < 0.6:
            await dev.write_zeroes(off, n, punch=True)
            model[off : off + n] = bytes(n)
        elif op < 0.7:
            await dev.trim(off, n)
            model[off : off + n] = bytes(n)  # MemoryDevice trims to zero
        else:
            assert await dev.read(off, n) == model[off : off + n]
    assert await dev.read(0, dev.size) == model


async def test_single_member_and_single_chunk_paths() -> None:
    dev, (kid,) = await make([4 * CHUNK])
    await dev.write(100, b"abc" * 1000)
    assert kid.data[100:3100] == b"abc" * 1000
    dev2, kids = await make([4 * CHUNK, 4 * CHUNK])
    await dev2.write(CHUNK + 10, b"hello")  # inside chunk 1 -> member 1
    assert kids[1].data[10:15] == b"hello"
    assert await dev2.read(CHUNK + 10, 5) == b"hello"


async def test_block_status_per_chunk(tmp_path: Path) -> None:
    chunk = 64 << 10
    files = [FileDevice(tmp_path / f"{i}", size=4 * chunk, create=True) for i in range(2)]
    dev = StripeDevice(files, chunk=chunk)
    await dev.open()
    try:
        assert dev.caps.block_status and dev.caps.trim
        await dev.write(chunk, b"d" * chunk)  # chunk 1 -> member 1, row 0
        ext = await dev.block_status(0, dev.size)
        assert ext == [
            Extent(chunk, hole=True, zero=True),
            Extent(chunk),
            Extent(6 * chunk, hole=True, zero=True),
        ]
        await dev.trim(chunk, chunk)
        ext = await dev.block_status(0, dev.size)
        assert ext == [Extent(8 * chunk, hole=True, zero=True)]
        await dev.flush()
        await dev.cache(0, dev.size)
    finally:
        await dev.close()


async def test_fast_zero_needs_every_member() -> None:
    class Slow(MemoryDevice):
        pass

    slow = Slow(4 * CHUNK)
    slow.caps = type(slow.caps)(fast_zero=False)
    dev = StripeDevice([MemoryDevice(4 * CHUNK), slow], chunk=CHUNK)
    await dev.open()
    with pytest.raises(BlockError) as ei:
        await dev.write_zeroes(0, CHUNK * 3, fast=True)
    assert ei.value.errno == errno.ENOTSUP


async def test_member_error_fails_request() -> None:
    kids = [FaultDevice(MemoryDevice(4 * CHUNK)) for _ in range(2)]
    dev = StripeDevice(kids, chunk=CHUNK)
    await dev.open()
    kids[1].fail_reads(errno.EIO, ranges=[(0, 10)])
    assert await dev.read(0, CHUNK) == bytes(CHUNK)
    with pytest.raises(BlockError) as ei:
        await dev.read(0, 2 * CHUNK)
    assert ei.value.errno == errno.EIO
    assert kids[0].counters.reads == 2
    kids[1].kill()
    assert dev.health().state == "failed"
    assert dev.health().detail["children"][0]["state"] == "ok"


async def test_spec() -> None:
    dev, kids = await make([2 * CHUNK, 2 * CHUNK])
    assert dev.spec() == {
        "type": "stripe",
        "name": "stripe",
        "chunk_size": CHUNK,
        "members": [k.spec() for k in kids],
    }
    assert list(dev.children()) == kids


def test_bad_arguments() -> None:
    m = MemoryDevice(10)
    for chunk in (0, 1000, -512):
        with pytest.raises(ConfigError):
            StripeDevice([m], chunk=chunk)
    with pytest.raises(ConfigError):
        StripeDevice([])
    with pytest.raises(ConfigError):
        StripeDevice([m, m], chunk=512)


async def test_members_smaller_than_a_chunk() -> None:
    with pytest.raises(ConfigError):
        await StripeDevice([MemoryDevice(100)], chunk=512).open()


async def test_replace_child_in_place() -> None:
    dev, kids = await make([2 * CHUNK, 2 * CHUNK])
    pattern = os.urandom(dev.size)
    await dev.write(0, pattern)
    new = MemoryDevice(3 * CHUNK, name="new")
    new.data[: 2 * CHUNK] = kids[1].data
    dev.replace_child(kids[1], new)
    assert list(dev.children()) == [kids[0], new]
    assert dev.size == 4 * CHUNK and await dev.read(0, dev.size) == pattern
    await dev.write(CHUNK, b"\x77" * CHUNK)  # chunk 1 lives on the second member
    assert new.data[:CHUNK] == b"\x77" * CHUNK and kids[1].data[:CHUNK] != new.data[:CHUNK]
    assert dev.spec()["members"][1] == new.spec()


async def test_replace_child_refusals() -> None:
    dev, kids = await make([2 * CHUNK, 2 * CHUNK])
    with pytest.raises(ConfigError, match="smaller"):
        dev.replace_child(kids[0], MemoryDevice(2 * CHUNK - 512, name="small"))
    with pytest.raises(ConfigError, match="not a member"):
        dev.replace_child(MemoryDevice(2 * CHUNK), MemoryDevice(2 * CHUNK))
    with pytest.raises(ConfigError, match="already a member"):
        dev.replace_child(kids[0], kids[1])
    assert list(dev.children()) == kids
