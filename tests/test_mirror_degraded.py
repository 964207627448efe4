"""Mirror degraded mode: failing and hung legs, EIO when no leg is left, read repair,
reads only from legs that hold the region (tracked mirrors, with and without metadata)."""

from __future__ import annotations

import errno

import pytest

from dst.errors import BlockError, ConfigError
from dst.targets.fault import FaultDevice
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice

pytestmark = pytest.mark.timeout(20)
SIZE = 4 << 20
R = 64 << 10


def disk(leg: FaultDevice) -> bytearray:
    child = leg.child
    assert isinstance(child, MemoryDevice)
    return child.data


async def make(
    n: int = 2, *, metadata: bool = False, **kw: object
) -> tuple[MirrorDevice, list[FaultDevice]]:
    legs = [FaultDevice(MemoryDevice(SIZE), name=f"leg{i}") for i in range(n)]
    m = MirrorDevice(legs, region_size=R, metadata=metadata, **kw)  # type: ignore[arg-type]
    await m.open()
    return m, legs


@pytest.mark.parametrize("metadata", [False, True])
async def test_write_error_degrades_and_records_missed_regions(metadata: bool) -> None:
    m, legs = await make(metadata=metadata)
    await m.write(0, b"a" * 100)
    legs[1].fail_writes(errno.EIO, count=1)
    await m.write(3 * R + 5, b"b" * 100)  # succeeds on leg 0 alone
    assert m.legs[1].state is LegState.FAILED
    assert m.health().state == "degraded"
    await m.write(7 * R, b"c" * (2 * R))  # leg 1 is skipped
    assert m.intent is not None
    assert sorted(m.intent.tracker.out_of_sync(1)) == [3, 7, 8]
    assert disk(legs[1])[7 * R : 7 * R + 10] == bytes(10)
    reads = legs[1].counters.reads
    for _ in range(4):  # never read from leg 1
        assert await m.read(3 * R + 5, 100) == b"b" * 100
    assert legs[1].counters.reads == reads
    await m.flush()
    await m.close()


async def test_write_error_without_tracking_is_plain_issue3_behaviour() -> None:
    legs = [FaultDevice(MemoryDevice(SIZE)) for _ in range(2)]
    m = MirrorDevice(legs)
    await m.open()
    legs[1].fail_writes(errno.EIO, count=1)
    with pytest.raises(BlockError) as ei:
        await m.write(0, b"x")
    assert ei.value.errno == errno.EIO
    with pytest.raises(ConfigError):
        await m.readd(1)


async def test_hung_leg_times_out_and_is_failed() -> None:
    m, legs = await make(leg_timeout=0.2)
    legs[0].kill(hang=True)
    await m.write(R, b"z" * 10)  # waits at most leg_timeout, then degrades
    assert m.legs[0].state is LegState.FAILED
    assert "ETIMEDOUT" in m.legs[0].reason
    assert await m.read(R, 10) == b"z" * 10
    legs[0].revive()
    await m.close()


async def test_last_leg_failing_is_eio_never_silent() -> None:
    m, legs = await make(metadata=True)
    legs[0].fail_writes(errno.EIO)
    await m.write(0, b"1" * 10)
    legs[1].kill()
    with pytest.raises(BlockError) as ei:
        await m.write(0, b"2" * 10)
    assert ei.value.errno == errno.EIO
    assert m.health().state == "failed"
    with pytest.raises(BlockError):
        await m.read(0, 10)
    with pytest.raises(BlockError):
        await m.flush()


async def test_both_legs_failing_one_write_is_eio() -> None:
    m, legs = await make()
    for leg in legs:
        leg.fail_writes(errno.EIO, count=1)
    with pytest.raises(BlockError) as ei:
        await m.write(0, b"x")
    assert ei.value.errno == errno.EIO


@pytest.mark.parametrize("metadata", [False, True])
async def test_read_error_retried_and_repaired(metadata: bool) -> None:
    m, legs = await make(metadata=metadata)
    await m.write(R, b"g" * 4096)
    disk(legs[0])[R : R + 4096] = b"?" * 4096  # leg 0's copy is bad and unreadable
    legs[0].fail_reads(errno.EIO, ranges=[(R, 4096)], count=1)
    for _ in range(2):
        assert await m.read(R, 4096) == b"g" * 4096
    assert disk(legs[0])[R : R + 4096] == b"g" * 4096  # rewritten from leg 1
    assert all(leg.state is LegState.IN_SYNC for leg in m.legs)
    await m.close()


async def test_failed_repair_write_fails_the_leg() -> None:
    m, legs = await make()
    await m.write(0, b"q" * 512)
    legs[0].fail_reads(errno.EIO, ranges=[(0, 512)])
    legs[0].fail_writes(errno.EIO, ranges=[(0, 512)])
    for _ in range(2):
        assert await m.read(0, 512) == b"q" * 512
    assert m.legs[0].state is LegState.FAILED


async def test_operator_fail_and_last_leg_guard() -> None:
    m, _ = await make()
    await m.fail_leg(0)
    assert m.legs[0].state is LegState.FAILED and "operator" in m.legs[0].reason
    with pytest.raises(ConfigError):
        await m.fail_leg(1)


async def test_reads_avoid_a_resyncing_leg_for_regions_it_misses() -> None:
    m, legs = await make()
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
    m.intent.missed(0, [3])  # type: ignore[union-attr]
    assert await m.read(2 * R, 2 * R) == b"n" * R + bytes(R)


async def test_write_during_failure_waits_for_generation_rotation() -> None:
    """A write that skipped a failed leg is acknowledged only after the survivors'
    superblocks say so (else a crash could pick the stale leg as resync source)."""
    m, legs = await make(metadata=True)
    await m.write(0, b"x")
    legs[0].set_latency(0.05)  # slow superblock writes on the survivor
    legs[1].fail_writes(errno.EIO, count=1)
    await m.write(R, b"y")
    assert m.intent is not None and not m.intent.unsettled
    sb0 = m.intent.stores[0].sb  # type: ignore[index]
    sb1 = m.intent.stores[1].sb  # type: ignore[index]
    assert sb0 is not None and sb1 is not None
    assert sb0.current != sb1.current and sb0.bitmap == sb1.current
