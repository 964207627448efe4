"""MirrorDevice: identical legs under concurrency, balancing, retries, failure policy."""

from __future__ import annotations

import asyncio
import errno
import random
from typing import Any

import pytest

from dst.device import Extent
from dst.errors import BlockError, ConfigError
from dst.targets.fault import FaultDevice
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice
from dst.targets.rangelock import RangeLock

SIZE = 64 << 10


class Jittery(MemoryDevice):
    """A MemoryDevice whose writes yield a random number of times, so that concurrent
    writes complete in a different order on every leg unless the mirror orders them."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__(size, name=f"jittery{seed}")
        self.rng = random.Random(seed)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        for _ in range(self.rng.randint(0, 6)):
            await asyncio.sleep(0)
        await super().write(offset, data, fua=fua)


async def make(n: int = 2) -> tuple[MirrorDevice, list[FaultDevice]]:
    legs = [FaultDevice(MemoryDevice(SIZE), name=f"leg{i}") for i in range(n)]
    m = MirrorDevice(legs)
    await m.open()
    return m, legs


def data_of(leg: FaultDevice) -> bytearray:
    child = leg.child
    assert isinstance(child, MemoryDevice)
    return child.data


@pytest.mark.parametrize("seed", range(5))
async def test_legs_identical_after_concurrent_overlapping_writes(seed: int) -> None:
    legs = [Jittery(SIZE, seed * 10 + i) for i in range(3)]
    m = MirrorDevice(legs)
    await m.open()
    rng = random.Random(seed)
    ops = []
    for i in range(300):
        off = rng.randrange(0, 4096)  # a small hot area: lots of overlap
        n = rng.randint(1, 2048)
        kind = rng.random()
        if kind < 0.8:
            ops.append(m.write(off, bytes([i % 251 + 1]) * n, fua=rng.random() < 0.1))
        elif kind < 0.9:
            ops.append(m.write_zeroes(off, n))
        else:
            ops.append(m.trim(off, n))
    await asyncio.gather(*ops)
    assert legs[0].data[:8192] != bytes(8192)
    assert legs[0].data == legs[1].data == legs[2].data
    assert len(m.locks) == 0


async def test_unordered_writes_would_diverge() -> None:
    """Sanity check of the workload: without the range lock the legs do diverge."""
    legs = [Jittery(SIZE, 1), Jittery(SIZE, 2)]
    rng = random.Random(0)
    ops = []
    for i in range(200):
        off, n = rng.randrange(0, 4096), rng.randint(1, 2048)
        ops += [leg.write(off, bytes([i % 251 + 1]) * n) for leg in legs]
    await asyncio.gather(*ops)
    assert legs[0].data != legs[1].data


async def test_round_trip_and_fan_out() -> None:
    m, legs = await make(3)
    assert m.size == SIZE and m.caps.trim and m.caps.fast_zero
    await m.write(100, b"abc" * 100, fua=True)
    assert all(data_of(leg)[100:400] == b"abc" * 100 for leg in legs)
    assert await m.read(100, 300) == b"abc" * 100
    await m.write_zeroes(150, 50, fast=True)
    await m.trim(300, 10)
    await m.flush()
    assert all(data_of(leg)[150:200] == bytes(50) for leg in legs)
    assert all(leg.counters.flushes == 1 for leg in legs)
    assert all(leg.counters.zeroes == 1 and leg.counters.trims == 1 for leg in legs)
    assert await m.block_status(0, SIZE) == [Extent(SIZE)]
    await m.cache(0, 10)


async def test_reads_are_balanced() -> None:
    m, legs = await make(2)
    for _ in range(10):
        await m.read(0, 512)
    assert [leg.counters.reads for leg in legs] == [5, 5]
    legs[0].kill(hang=True)  # leg 0 busy with one stuck read: the rest go to leg 1
    stuck = asyncio.ensure_future(m.read(0, 512))
    await legs[0].wait_blocked(1)
    reads = [leg.counters.reads for leg in legs]
    await asyncio.gather(*(m.read(0, 512) for _ in range(4)))
    assert legs[1].counters.reads == reads[1] + 4
    legs[0].revive()
    await stuck
    assert [leg.inflight for leg in m.legs] == [0, 0]
    detail = m.health().detail["legs"]
    assert [d["counters"]["reads"] for d in detail] == [6, 9]


async def test_concurrent_reads_use_least_busy_leg() -> None:
    m, legs = await make(2)
    await asyncio.gather(*(m.read(i * 512, 512) for i in range(8)))
    assert [leg.counters.reads for leg in legs] == [4, 4]


async def test_failed_read_retried_on_other_leg() -> None:
    m, legs = await make(2)
    await m.write(0, b"x" * 1024)
    legs[0].fail_reads(errno.EIO, ranges=[(0, 1024)])
    legs[1].fail_reads(errno.EIO, ranges=[(4096, 10)])
    for _ in range(4):
        assert await m.read(0, 1024) == b"x" * 1024
    assert legs[0].counters.errors == 2 and legs[1].counters.reads == 4
    assert m.legs[0].state is LegState.IN_SYNC  # a read error does not fail the leg
    legs[0].fail_reads(errno.EIO, ranges=[(4096, 10)])
    with pytest.raises(BlockError) as ei:
        await m.read(4096, 10)
    assert ei.value.errno == errno.EIO


async def test_write_failure_fails_leg_and_request() -> None:
    m, legs = await make(2)
    missed: list[tuple[int, int, int]] = []
    m.leg_missed = lambda leg, offset, length: missed.append(  # type: ignore[method-assign]
        (leg.index, offset, length)
    )
    legs[1].fail_writes(errno.ENOSPC, count=1)
    with pytest.raises(BlockError) as ei:
        await m.write(0, b"y" * 100)
    assert ei.value.errno == errno.EIO
    assert m.legs[1].state is LegState.FAILED
    assert missed == [(1, 0, 100)]
    assert m.health().state == "degraded"
    # a failed leg gets no more I/O: reads go to leg 0, writes record the miss
    await m.write(200, b"z" * 10)
    assert missed[-1] == (1, 200, 10)
    assert await m.read(200, 10) == b"z" * 10
    assert data_of(legs[1])[200:210] == bytes(10)
    legs[0].kill()
    with pytest.raises(BlockError):
        await m.flush()
    assert m.health().state == "failed"
    with pytest.raises(BlockError) as ei:
        await m.write(0, b"q")
    assert ei.value.errno == errno.EIO
    with pytest.raises(BlockError):
        await m.read(0, 1)


async def test_flush_failure_fails_leg() -> None:
    m, legs = await make(3)
    legs[2].fail_flushes(errno.EIO, count=1)
    with pytest.raises(BlockError):
        await m.flush()
    assert [leg.state for leg in m.legs] == [LegState.IN_SYNC, LegState.IN_SYNC, LegState.FAILED]


async def test_fast_zero_enotsup_is_not_a_leg_failure() -> None:
    m, legs = await make(2)
    legs[0].fail("zeroes", errno.ENOTSUP, count=1)
    with pytest.raises(BlockError) as ei:
        await m.write_zeroes(0, 10, fast=True)
    assert ei.value.errno == errno.ENOTSUP
    assert all(leg.state is LegState.IN_SYNC for leg in m.legs)


async def test_spec_health_caps() -> None:
    a = MemoryDevice(SIZE)
    b = MemoryDevice(SIZE + 100, read_only=True)
    m = MirrorDevice([a, b], name="m0")
    await m.open()
    assert m.size == SIZE and m.caps.read_only
    assert m.spec() == {"type": "mirror", "name": "m0", "members": [a.spec(), b.spec()]}
    h = m.health()
    assert h.state == "ok" and [leg["state"] for leg in h.detail["legs"]] == ["in_sync"] * 2
    assert list(m.children()) == [a, b]


def test_bad_arguments() -> None:
    a = MemoryDevice(10)
    with pytest.raises(ConfigError):
        MirrorDevice([a])
    with pytest.raises(ConfigError):
        MirrorDevice([a, a])


async def test_range_lock_orders_overlaps_only() -> None:
    lock = RangeLock()
    order: list[str] = []
    gate = asyncio.Event()

    async def hold(name: str, off: int, n: int, wait: bool = False) -> None:
        async with lock.hold(off, n):
            order.append(name + "+")
            if wait:
                await gate.wait()
            order.append(name + "-")

    a = asyncio.ensure_future(hold("a", 0, 10, wait=True))
    b = asyncio.ensure_future(hold("b", 5, 10))  # overlaps a: waits
    c = asyncio.ensure_future(hold("c", 10, 10))  # overlaps b only... and waits for it
    d = asyncio.ensure_future(hold("d", 100, 10))  # independent
    await d
    assert order == ["a+", "d+", "d-"]
    gate.set()
    await asyncio.gather(a, b, c)
    assert order == ["a+", "d+", "d-", "a-", "b+", "b-", "c+", "c-"]
    assert len(lock) == 0


async def test_range_lock_cancelled_waiter_releases() -> None:
    lock = RangeLock()
    gate = asyncio.Event()

    async def holder() -> None:
        async with lock.hold(0, 10):
            await gate.wait()

    h = asyncio.ensure_future(holder())
    await asyncio.sleep(0)
    w = asyncio.ensure_future(holder())
    await asyncio.sleep(0)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert len(lock) == 1
    gate.set()
    await h
    assert len(lock) == 0


class Parked(MemoryDevice):
    """Writes park on a future that resolves on the next loop iteration (like a reply)."""

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, None)
        await fut
        await super().write(offset, data, fua=fua)


@pytest.mark.parametrize("tracked", [False, True])
async def test_write_fan_out_creates_no_task(tracked: bool) -> None:
    """The fan-out steps the legs itself: no Task per leg (nor per write) and it can
    start outside any Task, as the NBD server steps a request from a callback."""
    legs = [Parked(SIZE), Parked(SIZE)]
    m = MirrorDevice(legs, region_size=4096 if tracked else None, leg_timeout=5.0)
    await m.open()
    await m.write(0, b"w" * 8192)  # marks the regions (tracked): the hot path follows
    loop = asyncio.get_running_loop()
    created: list[object] = []

    def counting(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        created.append(coro)
        return asyncio.Task(coro, loop=lp, **kw)

    factory = loop.get_task_factory()
    loop.set_task_factory(counting)
    try:
        done: asyncio.Future[None] = loop.create_future()
        coro = m.write(4096, b"x" * 4096)

        def step(value: object = None) -> None:
            try:
                fut = coro.send(None)
            except StopIteration:
                done.set_result(None)
                return
            fut._asyncio_future_blocking = False
            fut.add_done_callback(step)

        loop.call_soon(step)  # outside any Task
        await asyncio.wait_for(done, 5)
    finally:
        loop.set_task_factory(factory)
    assert created == []
    assert (
        legs[0].data[:SIZE] == legs[1].data[:SIZE] == b"w" * 4096 + b"x" * 4096 + bytes(SIZE - 8192)
    )
    await m.close()
