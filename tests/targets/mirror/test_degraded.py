"""Mirror degraded mode with either dirty log: a failing leg misses what it did not get,
EIO when no leg is left, the operator's fail, and a write that skipped a failed leg
waits until the survivors recorded the failure."""

from __future__ import annotations

import errno

import pytest

from dst.errors import BlockError, ConfigError
from dst.targets.fault import FaultDevice
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice
from tests.support.fastpath import disk_log

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
    assert sorted(m.regions.tracker.out_of_sync(1)) == [3, 7, 8]
    assert disk(legs[1])[7 * R : 7 * R + 10] == bytes(10)
    reads = legs[1].counters.reads
    for _ in range(4):  # never read from leg 1
        assert await m.read(3 * R + 5, 100) == b"b" * 100
    assert legs[1].counters.reads == reads
    await m.flush()
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


async def test_operator_fail_and_last_leg_guard() -> None:
    m, _ = await make()
    await m.fail_leg(0)
    assert m.legs[0].state is LegState.FAILED and "operator" in m.legs[0].reason
    with pytest.raises(ConfigError):
        await m.fail_leg(1)


async def test_write_during_failure_waits_for_generation_rotation() -> None:
    """A write that skipped a failed leg is acknowledged only after the survivors'
    superblocks say so (else a crash could pick the stale leg as resync source)."""
    m, legs = await make(metadata=True)
    await m.write(0, b"x")
    legs[0].set_latency(0.05)  # slow superblock writes on the survivor
    legs[1].fail_writes(errno.EIO, count=1)
    await m.write(R, b"y")
    assert not m.log.unsettled
    sb0 = disk_log(m).stores[0].sb
    sb1 = disk_log(m).stores[1].sb
    assert sb0 is not None and sb1 is not None
    assert sb0.current != sb1.current and sb0.bitmap == sb1.current
