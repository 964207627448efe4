"""LinearDevice placement, pass-through and live growth over MemoryDevice children."""

from __future__ import annotations

import errno
import os

import pytest

from dst.device import BlockDevice, Extent
from dst.errors import BlockError, ConfigError
from dst.targets.fault import FaultDevice
from dst.targets.file import FileDevice
from dst.targets.linear import LinearDevice
from dst.targets.memory import MemoryDevice


async def make() -> tuple[LinearDevice, list[MemoryDevice]]:
    kids = [MemoryDevice(1000, name="a"), MemoryDevice(500, name="b"), MemoryDevice(800, name="c")]
    lin = LinearDevice(kids, starts=[100, 0, 50], sizes=[300, None, 700])
    await lin.open()
    return lin, kids


async def test_placement_byte_for_byte() -> None:
    lin, (a, b, c) = await make()
    assert lin.size == 300 + 500 + 700
    pattern = os.urandom(lin.size)
    await lin.write(0, pattern)
    assert a.data[100:400] == pattern[:300]
    assert b.data[:] == pattern[300:800]
    assert c.data[50:750] == pattern[800:]
    assert a.data[:100] == bytes(100) and a.data[400:] == bytes(600)
    assert c.data[:50] == bytes(50) and c.data[750:] == bytes(50)
    for off, n in [(0, 1500), (299, 2), (250, 1000), (1499, 1), (310, 20)]:
        assert await lin.read(off, n) == pattern[off : off + n]


async def test_zeroes_trim_cache_flush_pass_through() -> None:
    lin, (a, b, c) = await make()
    await lin.write(0, b"\xff" * lin.size)
    await lin.write_zeroes(290, 20, fua=True)
    assert a.data[390:400] == bytes(10) and b.data[:10] == bytes(10) and b.data[10] == 0xFF
    await lin.trim(790, 20)
    assert b.data[490:] == bytes(10) and c.data[50:60] == bytes(10)
    await lin.cache(0, lin.size)
    await lin.flush()
    assert await lin.read(280, 40) == b"\xff" * 10 + bytes(20) + b"\xff" * 10


async def test_caps_are_intersected() -> None:
    lin, _ = await make()
    assert lin.caps.trim and lin.caps.fast_zero and not lin.caps.read_only
    ro = LinearDevice([MemoryDevice(10), MemoryDevice(10, read_only=True)])
    await ro.open()
    assert ro.caps.read_only


async def test_fast_zero_refused_when_a_child_cannot() -> None:
    plain = BlockDevice()  # the base class: no fast zero
    plain.size = 100
    lin = LinearDevice([MemoryDevice(100), plain])
    await lin.open()
    assert not lin.caps.fast_zero
    with pytest.raises(BlockError) as ei:
        await lin.write_zeroes(0, 10, fast=True)
    assert ei.value.errno == errno.ENOTSUP


async def test_block_status_maps_back(tmp_path: os.PathLike[str]) -> None:
    f1 = FileDevice(f"{tmp_path}/1", size=1 << 20, create=True)
    f2 = FileDevice(f"{tmp_path}/2", size=1 << 20, create=True)
    lin = LinearDevice([f1, f2], starts=[0, 512 << 10], sizes=[1 << 20, 512 << 10])
    await lin.open()
    try:
        await lin.write(1 << 20, b"x" * 4096)  # first block of the second segment
        ext = await lin.block_status(0, lin.size)
        assert ext == [
            Extent(1 << 20, hole=True, zero=True),
            Extent(4096),
            Extent((512 << 10) - 4096, hole=True, zero=True),
        ]
        assert f2.spec()["path"].endswith("/2")
    finally:
        await lin.close()


async def test_grow_and_shrink_live() -> None:
    lin, _ = await make()
    d = MemoryDevice(200, name="d")
    lin.append(d, 10, 100)
    assert lin.size == 1600
    await lin.write(1550, b"z" * 50)
    assert d.data[60:110] == b"z" * 50
    spec = lin.spec()
    assert [s["length"] for s in spec["members"]] == [300, 500, 700, 100]
    assert spec["members"][3] == {**d.spec(), "start": 10, "length": 100}
    assert "start" not in spec["members"][1]
    assert lin.remove_last() is d
    assert lin.size == 1500
    with pytest.raises(ConfigError):
        lin.append(d, 150, 100)  # does not fit
    lin.remove_last()
    lin.remove_last()
    with pytest.raises(ConfigError):
        lin.remove_last()


async def test_same_device_twice() -> None:
    m = MemoryDevice(100)
    lin = LinearDevice([m, m], starts=[50, 0], sizes=[50, 50])
    await lin.open()
    await lin.write(0, bytes(range(100)))
    assert m.data == bytes(range(50, 100)) + bytes(range(50))
    assert list(lin.children()) == [m]


async def test_errors_propagate_after_all_pieces() -> None:
    a, b = FaultDevice(MemoryDevice(100)), FaultDevice(MemoryDevice(100))
    lin = LinearDevice([a, b])
    await lin.open()
    b.fail_writes(errno.ENOSPC, count=1)
    with pytest.raises(BlockError) as ei:
        await lin.write(90, b"q" * 20)
    assert ei.value.errno == errno.ENOSPC
    assert a.counters.writes == 1  # the other piece still ran to completion
    b.kill()
    assert lin.health().state == "failed"
    with pytest.raises(BlockError):
        await lin.read(150, 10)
    assert await lin.read(0, 10) == bytes(10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"children": []},
        {"children": [MemoryDevice(10)], "starts": [0, 0]},
        {"children": [MemoryDevice(10)], "sizes": [1, 2]},
    ],
)
def test_bad_tables(kwargs: dict[str, list[object]]) -> None:
    with pytest.raises(ConfigError):
        LinearDevice(**kwargs)  # type: ignore[arg-type]


async def test_segment_out_of_range_on_open() -> None:
    lin = LinearDevice([MemoryDevice(10)], starts=[5], sizes=[6])
    with pytest.raises(ConfigError) as ei:
        await lin.open()
    assert ei.value.where == "segments"


async def test_replace_child_in_every_segment_it_backs() -> None:
    a, b = MemoryDevice(1000, name="a"), MemoryDevice(500, name="b")
    lin = LinearDevice([a, b, a], starts=[0, 0, 600], sizes=[300, None, 400])
    await lin.open()
    pattern = os.urandom(lin.size)
    await lin.write(0, pattern)
    new = MemoryDevice(1200, name="new")
    new.data[:1000] = a.data
    lin.replace_child(a, new)
    assert lin.children() == [new, b] and lin.size == 1200
    assert await lin.read(0, lin.size) == pattern
    await lin.write(0, b"\x11" * 300)
    await lin.write(800, b"\x22" * 400)
    assert new.data[:300] == b"\x11" * 300 and new.data[600:1000] == b"\x22" * 400
    assert a.data[:300] == pattern[:300]  # the old child is no longer written
    assert [m["name"] for m in lin.spec()["members"]] == ["new", "b", "new"]


async def test_replace_child_before_open_and_refusals() -> None:
    a, b = MemoryDevice(100, name="a"), MemoryDevice(100, name="b")
    lin = LinearDevice([a, b])
    new = MemoryDevice(100, name="new")
    lin.replace_child(b, new)
    await lin.open()
    assert lin.children() == [a, new] and lin.size == 200
    with pytest.raises(ConfigError, match="smaller"):
        lin.replace_child(a, MemoryDevice(99))
    with pytest.raises(ConfigError, match="not a member"):
        lin.replace_child(b, MemoryDevice(100))
    assert lin.children() == [a, new]
