"""ReplaceDevice: a member of a linear or stripe array replaced live under a writer."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from dst.device import BlockDevice, Buffer, Capabilities, Extent
from dst.errors import BlockError, ConfigError
from dst.targets.copier import RateLimit
from dst.targets.fault import FaultDevice
from dst.targets.gate import GateDevice
from dst.targets.linear import LinearDevice
from dst.targets.member import Member
from dst.targets.memory import MemoryDevice
from dst.targets.replace import ReplaceDevice
from dst.targets.stripe import StripeDevice

NODE = 128 << 10
REGION = 4096
TIMEOUT = 30


class Jittery(MemoryDevice):
    """A memory device whose operations yield a random number of times (interleaving)."""

    def __init__(self, size: int, *, name: str, seed: int) -> None:
        super().__init__(size, name=name)
        self.rng = random.Random(seed)

    async def _jitter(self) -> None:
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)

    async def read(self, offset: int, length: int) -> Buffer:
        await self._jitter()
        return await super().read(offset, length)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self._jitter()
        await super().write(offset, data)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        await self._jitter()
        await super().write_zeroes(offset, length)


class ZeroAware(MemoryDevice):
    """Reports all-zero 4 KiB blocks as zero holes in block status."""

    def __init__(self, size: int, *, name: str) -> None:
        super().__init__(size, name=name)
        self.caps = Capabilities(trim=True, fast_zero=True, block_status=True)

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        out: list[Extent] = []
        for pos in range(offset, offset + length, 4096):
            n = min(4096, offset + length - pos)
            zero = not any(self.data[pos : pos + n])
            out.append(Extent(n, hole=zero, zero=zero))
        return out


def member(dev: BlockDevice) -> Member:
    return Member(dev, name=dev.name, where="")


@dataclass
class Rig:
    """An array of two members behind a switch, the old node's device and an expected image."""

    root: GateDevice
    arr: LinearDevice | StripeDevice
    old: Member
    old_dev: MemoryDevice
    expected: bytearray = field(default_factory=bytearray)


async def rig(kind: str, seed: int, *, old_dev: MemoryDevice | None = None) -> Rig:
    a = old_dev or Jittery(NODE, name="a", seed=seed)
    b = Jittery(NODE, name="b", seed=seed + 1)
    ms = [member(a), member(b)]
    arr: LinearDevice | StripeDevice
    arr = LinearDevice(ms) if kind == "linear" else StripeDevice(ms, chunk=4096)
    await arr.open()
    r = Rig(GateDevice(arr), arr, ms[0], a)
    r.expected = bytearray(random.Random(seed).randbytes(arr.size))
    await arr.write(0, r.expected)
    return r


async def start(r: Rig, new: BlockDevice, **kw: object) -> ReplaceDevice:
    rep = ReplaceDevice(r.old, new, region_size=REGION, **kw)  # type: ignore[arg-type]
    await r.root.reconfigure(lambda: r.arr.replace_child(r.old, rep))
    return rep


async def writer(r: Rig, w: int, n: int, rng: random.Random, stop: asyncio.Event) -> int:
    """Random writes/zeroes/trims inside writer ``w``'s own 3000-byte pieces (of ``n``),
    each followed by a verified read; runs until ``stop`` and at least 40 operations."""
    piece = 3000
    mine = [p for p in range(r.arr.size // piece) if p % n == w]
    ops = 0
    while not stop.is_set() or ops < 40:
        base = rng.choice(mine) * piece
        off = base + rng.randrange(piece - 1)
        length = rng.randrange(1, base + piece - off + 1)
        what = rng.random()
        if what < 0.8:
            data = rng.randbytes(length)
            await r.root.write(off, data)
        elif what < 0.9:
            data = bytes(length)
            await r.root.write_zeroes(off, length)
        else:
            data = bytes(length)
            await r.root.trim(off, length)
        r.expected[off : off + length] = data
        check = base + rng.randrange(piece - 1)
        got = await r.root.read(check, base + piece - check)
        assert got == r.expected[check : base + piece], f"writer {w} read stale data"
        ops += 1
    return ops


@pytest.mark.parametrize("kind", ["linear", "stripe"])
@pytest.mark.parametrize("seed", range(8))
async def test_replace_under_concurrent_writers_loses_nothing(kind: str, seed: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        r = await rig(kind, seed)
        new_dev = Jittery(NODE + 8192, name="new", seed=seed + 2)
        new_dev.data[:] = b"\xa5" * len(new_dev.data)  # a used disk: nothing is assumed zero
        new = member(new_dev)
        rep = await start(r, new)
        assert r.arr.children()[0] is rep and rep.name == "replace-a"
        rng = random.Random(seed)
        stop = asyncio.Event()
        writers = [
            asyncio.create_task(writer(r, w, 4, random.Random(rng.random()), stop))
            for w in range(4)
        ]
        await rep.run()
        assert rep.state == "done"
        snap: list[bytes] = []

        def swap() -> None:  # I/O is suspended: nothing in flight, both copies stable
            r.arr.replace_child(rep, rep.take_new())
            snap.extend([bytes(r.old_dev.data), bytes(new_dev.data[:NODE])])

        await r.root.reconfigure(swap)
        stop.set()
        assert all(n >= 40 for n in await asyncio.gather(*writers))
        assert snap[0] == snap[1], "NEW does not hold exactly OLD's data at the swap"
        assert r.arr.children()[0] is new and rep.state == "finished"
        assert await r.root.read(0, r.arr.size) == r.expected
        before = bytes(r.old_dev.data)
        await r.root.write(0, b"\x42" * 8192)  # OLD is out of the array now
        assert bytes(r.old_dev.data) == before
        assert new_dev.data[:4096] == b"\x42" * 4096


async def test_progress_numbers_and_zero_regions() -> None:
    async with asyncio.timeout(TIMEOUT):
        old = ZeroAware(NODE, name="a")
        r = await rig("linear", 7, old_dev=old)
        await r.arr.write_zeroes(0, NODE // 2)  # the first half of OLD is zero
        new_dev = MemoryDevice(NODE, name="new")
        new_dev.data[:] = b"\xff" * NODE
        rep = await start(r, member(new_dev))
        p = rep.progress()
        assert p["state"] == "pending" and p["regions_done"] == 0
        assert p["regions_total"] == NODE // REGION and p["percent"] == 0.0
        await rep.run()
        p = rep.progress()
        assert p["state"] == "done" and p["regions_done"] == p["regions_total"]
        assert p["percent"] == 100.0 and p["eta"] is None and p["error"] is None
        assert p["bytes_zeroed"] == NODE // 2 and p["bytes_copied"] == NODE // 2
        assert p["rate"] > 0 and p["old"] == "a" and p["new"] == "new"
        assert new_dev.data == old.data
        assert rep.health().detail["replace"]["state"] == "done"
        assert rep.spec() == r.old.spec()
        with pytest.raises(ConfigError, match="done"):
            await rep.run()


async def test_cancel_midway_keeps_serving_from_old() -> None:
    async with asyncio.timeout(TIMEOUT):
        r = await rig("stripe", 11)
        new_dev = MemoryDevice(NODE, name="new")
        rep = await start(r, member(new_dev))
        copy = asyncio.create_task(rep.run())
        while rep.regions_done < rep.regions_total // 2:
            rep.advanced.clear()
            await rep.advanced.wait()
        rep.cancel()
        await copy  # returns: a cancel is not an error
        p = rep.progress()
        assert p["state"] == "cancelled" and 0 < p["regions_done"] < p["regions_total"]
        frozen = bytes(new_dev.data)
        data = os.urandom(r.arr.size)
        await r.root.write(0, data)
        assert bytes(new_dev.data) == frozen, "NEW written after the cancel"
        assert await r.root.read(0, r.arr.size) == data
        with pytest.raises(ConfigError, match="cancelled"):
            rep.take_new()
        await r.root.reconfigure(lambda: r.arr.replace_child(rep, r.old))  # as before
        assert r.arr.children()[0] is r.old
        assert await r.root.read(0, r.arr.size) == data


async def test_run_cancelled_from_outside_ends_the_replace() -> None:
    async with asyncio.timeout(TIMEOUT):
        r = await rig("linear", 12)
        rep = await start(r, member(MemoryDevice(NODE, name="new")))
        rep_limit = RateLimit(max_rate=64 << 10)  # slow: the task is still copying
        rep.limit = rep_limit
        copy = asyncio.create_task(rep.run())
        await rep.advanced.wait()
        copy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await copy
        assert rep.state == "cancelled"
        await r.root.write(0, b"x" * 10)
        assert await r.root.read(0, 10) == b"x" * 10


async def test_new_failing_in_the_copy_aborts_cleanly() -> None:
    async with asyncio.timeout(TIMEOUT):
        r = await rig("linear", 13)
        new_dev = FaultDevice(MemoryDevice(NODE, name="new-disk"), name="new")
        new_dev.fail_writes(errno.ENOSPC, ranges=[(NODE // 2, 1)])
        rep = await start(r, member(new_dev))
        with pytest.raises(BlockError, match="'a' by 'new' failed") as info:
            await rep.run()
        assert info.value.errno == errno.ENOSPC
        p = rep.progress()
        assert p["state"] == "failed" and p["regions_done"] == NODE // 2 // REGION
        assert "'a' by 'new' failed" in p["error"]
        assert await r.root.read(0, r.arr.size) == r.expected  # nothing lost
        data = os.urandom(4096)
        await r.root.write(NODE // 2, data)  # served by OLD alone, no error
        assert await r.root.read(NODE // 2, 4096) == data
        with pytest.raises(ConfigError):
            rep.take_new()


async def test_new_failing_a_foreground_write_aborts_but_the_write_succeeds() -> None:
    async with asyncio.timeout(TIMEOUT):
        r = await rig("linear", 14)
        new_dev = FaultDevice(MemoryDevice(NODE, name="new-disk"), name="new")
        rep = await start(r, member(new_dev))
        rep.limit = RateLimit(max_rate=64 << 10)
        copy = asyncio.create_task(rep.run())
        await rep.advanced.wait()
        new_dev.fail_writes(errno.EIO)
        data = os.urandom(1000)
        await r.root.write(NODE - 1000, data)  # OLD took it: acknowledged
        r.expected[NODE - 1000 : NODE] = data
        with pytest.raises(BlockError, match="failed") as info:
            await copy
        assert info.value.errno == errno.EIO and rep.state == "failed"
        await r.root.flush()
        assert await r.root.read(0, r.arr.size) == r.expected


async def test_reads_fall_back_to_copied_new_or_to_the_source() -> None:
    async with asyncio.timeout(TIMEOUT):
        r = await rig("linear", 15)
        replica = MemoryDevice(NODE, name="replica")
        replica.data[:] = r.old_dev.data
        dying = FaultDevice(r.old_dev, name="a")
        r.old.inner = dying  # (test shortcut: the array is idle)
        new_dev = MemoryDevice(NODE, name="new")
        rep = await start(r, member(new_dev), source=replica)
        dying.kill()  # OLD is dead: the copy reads the replica
        with pytest.raises(BlockError):
            await r.root.write(0, b"w")  # a write needs OLD
        await rep.run()
        assert new_dev.data == replica.data
        assert await r.root.read(0, NODE) == r.expected[:NODE]  # from NEW
        rep.cancel()
        assert await r.root.read(0, NODE) == r.expected[:NODE]  # from the source


async def test_rate_limit_is_respected_roughly() -> None:
    async with asyncio.timeout(TIMEOUT):
        r = await rig("linear", 16)
        rep = await start(r, member(MemoryDevice(NODE, name="new")))
        rep.limit = RateLimit(max_rate=NODE * 4)  # 0.25 s for the whole node
        t0 = time.monotonic()
        await rep.run()
        elapsed = time.monotonic() - t0
        assert 0.15 < elapsed < 5
        assert rep.progress()["rate"] < NODE * 8


async def test_construction_refusals() -> None:
    old = MemoryDevice(8192, name="old")
    with pytest.raises(ConfigError, match="smaller"):
        ReplaceDevice(old, MemoryDevice(4096, name="new"))
    with pytest.raises(ConfigError, match="smaller"):
        ReplaceDevice(old, MemoryDevice(8192), source=MemoryDevice(10, name="src"))
    with pytest.raises(ConfigError, match="region"):
        ReplaceDevice(old, MemoryDevice(8192), region_size=0)
    rep = ReplaceDevice(old, MemoryDevice(8192, name="new"))
    assert rep.size == 8192 and rep.children() == (old, rep.new)
    with pytest.raises(ConfigError, match="pending"):
        rep.take_new()
    await rep.write(0, b"both")
    assert old.data[:4] == b"both" and await rep.new.read(0, 4) == b"both"
    plain = BlockDevice()  # no fast zero
    plain.size = 8192
    with pytest.raises(BlockError) as info:
        await ReplaceDevice(old, plain).write_zeroes(0, 1, fast=True)
    assert info.value.errno == errno.ENOTSUP


async def test_take_new_before_the_suspend_loses_no_write() -> None:
    async with asyncio.timeout(TIMEOUT):
        r = await rig("linear", 17)
        new_dev = FaultDevice(MemoryDevice(NODE, name="new-disk"), name="new")
        rep = await start(r, member(new_dev))
        await rep.run()
        new = rep.take_new()  # before the suspend, as a caller may do
        assert rep.state == "finished"
        await r.root.write(100, b"late")  # still reaches NEW
        r.expected[100:104] = b"late"
        new_dev.fail_writes(errno.EIO, count=1)
        with pytest.raises(BlockError):  # NEW is the member of record: no silent loss
            await r.root.write(200, b"lost")
        rep.cancel()  # too late to cancel: nothing changes
        assert rep.state == "finished"
        await r.root.reconfigure(lambda: r.arr.replace_child(rep, new))
        await rep.close()  # closes nothing once finished
        await r.root.write(300, b"after")
        r.expected[300:305] = b"after"
        got = await r.root.read(0, NODE)
        assert got[:200] == r.expected[:200] and got[204:NODE] == r.expected[204:NODE]
