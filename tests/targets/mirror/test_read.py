"""Mirror reads (dst.targets.mirror.read): one leg serves, balanced; a failed read is
retried on another leg and the bad leg repaired; reads only from legs holding the
regions; both faces; leg timeouts and cancel."""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any, Literal

import pytest

from dst.device import Buffer
from dst.errors import BlockError
from dst.targets.fault import FaultDevice
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice
from tests.support.fastpath import Completion, Disk, Mode, submit, until

pytestmark = pytest.mark.timeout(30)
SIZE = 1 << 20
R = 64 << 10
TIMEOUT = 0.2
Face = Literal["submit", "coro"]
FACES: list[Face] = ["submit", "coro"]


def disks(*modes: Mode) -> list[Disk]:
    return [Disk(SIZE, name=f"d{i}", mode=m) for i, m in enumerate(modes)]


async def mirror(devs: list[Any], **kw: Any) -> MirrorDevice:
    m = MirrorDevice(devs, region_size=R, **kw)
    await m.open()
    return m


async def read(m: MirrorDevice, face: Face, offset: int, length: int) -> Buffer:
    if face == "submit":
        data: Buffer = await submit(m, "read", offset, length)
        return data
    return await m.read(offset, length)


def idle(m: MirrorDevice) -> None:
    assert [leg.inflight for leg in m.legs] == [0] * len(m.legs)
    assert len(m.locks) == 0


def fault_legs(n: int) -> list[FaultDevice]:
    return [FaultDevice(MemoryDevice(SIZE), name=f"leg{i}") for i in range(n)]


def data_of(leg: FaultDevice) -> bytearray:
    child = leg.child
    assert isinstance(child, MemoryDevice)
    return child.data


@pytest.mark.parametrize("face", FACES)
async def test_a_read_is_served_by_one_leg_and_reads_rotate(face: Face) -> None:
    ds = disks("async", "refuse")
    m = await mirror(ds)
    data = os.urandom(8192)
    await m.write(0, data)
    m.core.rotation = 0
    assert await read(m, face, 0, 8192) == data
    assert await read(m, face, 4096, 4096) == data[4096:]
    # one read each: leg 0 on its fast path, leg 1 (no fast path) as a coroutine
    assert [r.kind for r in ds[0].taken].count("read") == 1 and ds[1].coro_reads == 1
    assert sum(leg.counters.reads for leg in m.legs) == 2
    assert sum(leg.counters.read_bytes for leg in m.legs) == 8192 + 4096
    idle(m)


async def test_reads_are_balanced_and_avoid_a_busy_leg() -> None:
    legs = fault_legs(2)
    m = await mirror(legs)
    for _ in range(10):
        await m.read(0, 512)
    assert [leg.counters.reads for leg in legs] == [5, 5]
    legs[0].kill(hang=True)  # leg 0 busy with one stuck read: the rest go to leg 1
    m.core.rotation = 0
    stuck = asyncio.ensure_future(m.read(0, 512))
    await legs[0].wait_blocked(1)
    reads = [leg.counters.reads for leg in legs]
    await asyncio.gather(*(m.read(0, 512) for _ in range(4)))
    assert legs[1].counters.reads == reads[1] + 4
    legs[0].revive()
    await stuck
    idle(m)
    detail = m.health().detail["legs"]
    assert [d["counters"]["reads"] for d in detail] == [6, 9]
    await asyncio.gather(*(m.read(i * 512, 512) for i in range(8)))  # concurrent: 4 each
    assert [leg.counters.reads for leg in legs] == [10, 13]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("mode", ["async", "sync", "refuse"])
async def test_a_failed_read_is_retried_and_the_bad_leg_repaired(face: Face, mode: Mode) -> None:
    ds = disks(mode, mode)
    m = await mirror(ds)
    data = os.urandom(4096)
    await m.write(0, data)
    ds[0].data[:4096] = b"\xee" * 4096  # leg 0 lost it
    ds[0].fail_reads = errno.EIO
    m.core.rotation = 0
    assert await read(m, face, 0, 4096) == data
    assert ds[0].data[:4096] == data  # read repair wrote the good data back
    assert m.legs[0].counters.errors == 1 and m.legs[0].state is LegState.IN_SYNC
    assert m.legs[1].counters.reads == 1
    idle(m)


async def test_a_read_error_is_retried_and_does_not_fail_the_leg() -> None:
    legs = fault_legs(2)
    m = await mirror(legs)
    await m.write(0, b"x" * 1024)
    legs[0].fail_reads(errno.EIO, ranges=[(0, 1024)])
    legs[1].fail_reads(errno.EIO, ranges=[(4096, 10)])
    for _ in range(4):
        assert await m.read(0, 1024) == b"x" * 1024
    assert legs[0].counters.errors == 2 and legs[1].counters.reads == 4
    assert m.legs[0].state is LegState.IN_SYNC
    legs[0].fail_reads(errno.EIO, ranges=[(4096, 10)])
    with pytest.raises(BlockError) as err:
        await m.read(4096, 10)
    assert err.value.errno == errno.EIO


async def test_a_failed_repair_write_fails_the_leg() -> None:
    legs = fault_legs(2)
    m = await mirror(legs)
    await m.write(0, b"q" * 512)
    legs[0].fail_reads(errno.EIO, ranges=[(0, 512)])
    legs[0].fail_writes(errno.EIO, ranges=[(0, 512)])
    for _ in range(2):
        assert await m.read(0, 512) == b"q" * 512
    assert m.legs[0].state is LegState.FAILED


@pytest.mark.parametrize("face", FACES)
async def test_a_read_failing_on_every_leg_is_an_error(face: Face) -> None:
    ds = disks("async", "async")
    m = await mirror(ds)
    for d in ds:
        d.fail_reads = errno.EIO
    with pytest.raises(BlockError) as err:
        await read(m, face, 0, 4096)
    assert err.value.errno == errno.EIO
    assert [leg.counters.errors for leg in m.legs] == [1, 1]
    idle(m)


@pytest.mark.parametrize("face", FACES)
async def test_leg_timeout_retries_a_hung_read_on_the_other_leg(face: Face) -> None:
    ds = disks("async", "async")
    m = await mirror(ds, leg_timeout=TIMEOUT)
    data = os.urandom(4096)
    await m.write(0, data)
    ds[0].hang = True
    m.core.rotation = 0  # the rotation asks leg 0 first
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await read(m, face, 0, 4096) == data
    took = loop.time() - start
    assert TIMEOUT <= took < 20 * TIMEOUT, took
    assert m.legs[0].state is LegState.FAILED and "ETIMEDOUT" in m.legs[0].reason
    assert ds[0].cancelled == 1
    idle(m)


@pytest.mark.parametrize("face", FACES)
async def test_cancelling_a_read_whose_retry_runs_ends_it(face: Face) -> None:
    """Leg 0 fails, the retry on leg 1 hangs (no leg_timeout): cancelling must end the
    read, whichever face started it."""
    ds = disks("async", "async")
    m = await mirror(ds)
    await m.write(0, bytes(4096))
    ds[0].fail_reads = errno.EIO
    ds[1].hang = True
    m.core.rotation = 0
    c = Completion()
    if face == "submit":
        cancel = m.submit_read(0, 4096, c)
    else:
        task = asyncio.ensure_future(m.read(0, 4096))
        cancel = task.cancel
    await until(lambda: len(ds[1].taken) == 1, "the retry on leg 1")
    cancel()
    if face == "submit":
        exc, _ = await c.wait(timeout=2)
        assert isinstance(exc, asyncio.CancelledError)
    else:
        with pytest.raises(asyncio.CancelledError):
            await task
    await until(lambda: m.legs[1].inflight == 0, "the retry to unwind")
    idle(m)


async def test_reads_avoid_a_resyncing_leg_for_regions_it_misses() -> None:
    legs = fault_legs(2)
    m = await mirror(legs)
    await m.fail_leg(1)
    await m.write(2 * R, b"n" * R)
    plan = await m.readd(1)
    assert plan.regions == 1 and m.legs[1].state is LegState.RESYNCING
    before = legs[1].counters.read_bytes
    for _ in range(6):
        assert await m.read(2 * R, R) == b"n" * R  # only leg 0 holds region 2
    assert legs[1].counters.read_bytes == before
    for _ in range(6):
        await m.read(5 * R, 10)  # both hold region 5
    assert legs[1].counters.read_bytes == before + 30
    # a read spanning a region only leg 0 holds and one only leg 1 holds is split
    m.regions.missed(0, [3])
    assert await m.read(2 * R, 2 * R) == b"n" * R + bytes(R)
    # a region no leg holds is an error
    m.regions.missed(1, [3])
    with pytest.raises(BlockError) as err:
        await m.read(3 * R, 10)
    assert err.value.errno == errno.EIO
