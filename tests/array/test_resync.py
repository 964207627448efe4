"""Resync engine, readd and verify over memory and fault-injecting legs: legs identical
byte for byte, delta resync copies only what was missed, writes racing the copy are
kept, resumable after a restart, rate limited with progress."""

from __future__ import annotations

import asyncio
import errno
import random
import time

import pytest

from dst.array.resync import Resync, Resyncer
from dst.array.verify import verify
from dst.device import Buffer
from dst.errors import BlockError
from dst.meta.store import MetaStore
from dst.targets.copier import RateLimit
from dst.targets.copyplan import DATA_BYTES
from dst.targets.fault import FaultDevice
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice
from tests.support.fastpath import until

pytestmark = pytest.mark.timeout(60)
R = 64 << 10


def state_of(m: MirrorDevice, i: int) -> LegState:
    """Leg ``i``'s state now (a call: mypy does not narrow it across awaits)."""
    return m.legs[i].state


class Jittery(MemoryDevice):
    """Writes and reads yield a random number of times: requests interleave."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__(size, name=f"jittery{seed}")
        self.rng = random.Random(seed)

    async def _jitter(self) -> None:
        for _ in range(self.rng.randint(0, 4)):
            await asyncio.sleep(0)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self._jitter()
        await super().write(offset, data, fua=fua)

    async def read(self, offset: int, length: int) -> Buffer:
        await self._jitter()
        return await super().read(offset, length)


async def progressed(r: Resync, regions: int) -> None:
    """Return once ``r`` copied ``regions`` regions."""
    while r.done < regions:
        r.advanced.clear()
        await r.advanced.wait()


def same(m: MirrorDevice, disks: list[MemoryDevice]) -> bool:
    return all(d.data[: m.size] == disks[0].data[: m.size] for d in disks[1:])


async def make(
    size: int, *, metadata: bool = True, jitter: bool = False, **kw: object
) -> tuple[MirrorDevice, list[FaultDevice], list[MemoryDevice]]:
    disks: list[MemoryDevice] = [
        Jittery(size, i) if jitter else MemoryDevice(size) for i in range(2)
    ]
    legs = [FaultDevice(d, name=f"leg{i}") for i, d in enumerate(disks)]
    m = MirrorDevice(legs, region_size=R, metadata=metadata, **kw)  # type: ignore[arg-type]
    await m.open()
    return m, legs, disks


class Model:
    """Writers own disjoint 4 KiB slots and write them in turn: the final content is
    known whatever the interleaving."""

    def __init__(self, m: MirrorDevice, slots: list[int]) -> None:
        self.m = m
        self.slots = slots
        self.want: dict[int, bytes] = {}
        self.stop = asyncio.Event()
        self.count = 0

    async def writer(self, seed: int, mine: list[int]) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            off = rng.choice(mine)
            data = rng.randbytes(4096)
            await self.m.write(off, data)
            self.want[off] = data
            self.count += 1
            await asyncio.sleep(0)

    def start(self, tasks: int) -> list[asyncio.Task[None]]:
        return [asyncio.ensure_future(self.writer(i, self.slots[i::tasks])) for i in range(tasks)]

    async def check(self, disks: list[MemoryDevice]) -> None:
        for off, data in self.want.items():
            assert await self.m.read(off, 4096) == data
            for d in disks:
                assert d.data[off : off + 4096] == data


@pytest.mark.parametrize("metadata", [False, True])
async def test_delta_resync_copies_only_regions_written_during_outage(metadata: bool) -> None:
    m, legs, disks = await make(64 << 20, metadata=metadata)
    rng = random.Random(4)
    for _ in range(50):
        await m.write(rng.randrange(0, m.size - 4096), rng.randbytes(4096))
    legs[1].kill()
    dirtied: set[int] = set()
    for _ in range(40):  # the outage: leg 1 misses these
        off = rng.randrange(0, m.size - 4096) // 4096 * 4096
        await m.write(off, rng.randbytes(4096))
        dirtied.add(off // R)
    assert m.legs[1].state is LegState.FAILED
    legs[1].revive()
    plan = await m.readd(1)
    assert not plan.full and plan.regions == len(dirtied)
    r = Resync(m)
    await r.run()
    assert r.bytes == len(dirtied) * R < m.size // 20  # ~ what was dirtied, not the disk
    assert same(m, disks) and state_of(m, 1) is LegState.IN_SYNC
    assert m.health().state == "ok"
    if metadata:
        sbs = [await MetaStore(d).load() for d in disks]
        assert sbs[0].current == sbs[1].current and sbs[0].bitmap == 0
    await m.close()


@pytest.mark.parametrize("seed", range(3))
async def test_random_concurrent_writes_failure_readd_resync(seed: int) -> None:
    m, legs, disks = await make(8 << 20, jitter=True, clear_delay=0.05)
    resyncer = Resyncer(m)
    resyncer.start()
    model = Model(m, [i * 4096 for i in range(0, m.size // 4096, 7)])
    tasks = model.start(8)
    await asyncio.sleep(0.05)
    legs[1].fail_writes(errno.EIO, count=1)  # leg 1 fails mid-load
    await until(lambda: m.legs[1].state is LegState.FAILED, "leg 1 to fail")
    await asyncio.sleep(0.05)  # the load goes on degraded
    legs[1].clear()
    await m.readd(1)  # resync runs while the writers go on
    await asyncio.sleep(0.05)
    model.stop.set()
    await asyncio.gather(*tasks)
    await resyncer.wait_idle()
    assert m.legs[1].state is LegState.IN_SYNC
    assert resyncer.runs >= 1 and resyncer.progress()["state"] == "done"
    assert same(m, disks)
    await model.check(disks)
    await m.close()


async def test_writes_to_the_region_being_copied_are_not_lost() -> None:
    m, legs, disks = await make(4 << 20, jitter=True)
    await m.fail_leg(1)
    legs[0].set_latency(0.0005)  # copies take a while: writes pile up behind them
    model = Model(m, [r * R + k * 4096 for r in range(4) for k in (0, 7, 15)])
    tasks = model.start(6)
    await m.readd(1, full=True)
    r = Resync(m)
    await asyncio.gather(r.run(), asyncio.sleep(0.2))
    model.stop.set()
    await asyncio.gather(*tasks)
    assert model.count > 50 and r.done >= m.regions.nregions
    assert m.legs[1].state is LegState.IN_SYNC
    assert same(m, disks)
    await model.check(disks)
    await m.close()


async def test_full_resync_resumes_after_restart() -> None:
    size = 16 << 20  # 16 data spans of 1 MiB
    disks = [MemoryDevice(size), MemoryDevice(size)]
    m = MirrorDevice([FaultDevice(d) for d in disks], region_size=R, metadata=True)
    await m.open()
    await m.write(0, b"a" * (m.size - 4096))
    await m.close()
    disks[1].data[:] = bytes(size)  # replaced by a blank disk
    m = MirrorDevice([FaultDevice(d) for d in disks], region_size=R, metadata=True)
    await m.open()
    total = m.regions.missing(1)
    r = Resync(m, limit=RateLimit(max_rate=160 * R), checkpoint_interval=0.05, depth=2)
    task = asyncio.ensure_future(r.run())
    await progressed(r, total // 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert r.progress()["state"] == "stopped"
    await m.close()  # daemon restart
    m2 = MirrorDevice([FaultDevice(d) for d in disks], region_size=R, metadata=True)
    await m2.open()
    assert m2.legs[1].state is LegState.RESYNCING
    left = m2.regions.missing(1)
    assert left < total - total // 3  # resumed near the checkpoint, not from 0
    r2 = Resync(m2)
    await r2.run()
    assert r2.done == left and same(m2, disks)
    await m2.close()
    m3 = MirrorDevice([FaultDevice(d) for d in disks], region_size=R, metadata=True)
    await m3.open()
    assert [leg.state for leg in m3.legs] == [LegState.IN_SYNC] * 2
    await m3.close()


async def test_rate_limit_progress_and_live_change() -> None:
    m, _, disks = await make(4 << 20)
    resyncer = Resyncer(m, max_rate=32 * R)  # spans of 8 regions (1/4 s), ~2 s in all
    resyncer.start()
    await m.fail_leg(1)
    await m.readd(1, full=True)
    await resyncer.started.wait()
    assert resyncer.current is not None
    await progressed(resyncer.current, 2 * 16)  # two spans: a rate
    p = m.health().detail["resync"]
    assert p["state"] == "running" and p["targets"] == [1] and p["kind"] == "full"
    assert 32 <= p["regions_done"] < p["regions_total"] == m.regions.nregions
    assert p["bytes"] >= 32 * R and p["rate"] > 0 and p["eta"] > 0.1
    assert p["max_rate"] == 32 * R
    started = time.monotonic()
    resyncer.set_rate(max_rate=None)  # unthrottled from now on
    await resyncer.wait_idle()
    assert time.monotonic() - started < 5
    assert same(m, disks) and resyncer.progress()["state"] == "done"
    await m.close()


async def test_spans_shrink_to_a_quarter_second_of_the_rate() -> None:
    m, _, _ = await make(4 << 20)
    await m.fail_leg(1)
    await m.readd(1, full=True)
    limit = RateLimit()
    r = Resync(m, limit=limit)
    r.targets = [1]
    assert r._span_bytes() == DATA_BYTES  # unlimited: the largest spans
    limit.set(max_rate=32 * R)
    assert r._span_bytes() == 8 * R
    limit.set(max_rate=32 * R, min_rate=4 * R)  # the lower one, under load
    assert r._span_bytes() == R
    limit.set(max_rate=1)  # never less than a region
    assert r._span_bytes() == R
    limit.set(max_rate=None)
    assert r._span_bytes() == DATA_BYTES
    await m.close()


async def test_rate_limit_min_under_load() -> None:
    lim = RateLimit(max_rate=1000.0, min_rate=10.0)
    assert lim.rate(busy=False) == 1000.0 and lim.rate(busy=True) == 10.0
    lim.set(max_rate=0, min_rate=0)
    assert lim.rate(busy=True) is None
    await lim.pace(1 << 30, busy=True)  # unlimited: no wait


async def test_target_failing_during_resync_stops_cleanly() -> None:
    """The target fails (ENOSPC, say): the resync ends ``failed``, saying why, with
    most regions not done -- never ``done`` (issue 11, point 7)."""
    m, legs, _ = await make(32 << 20)
    await m.fail_leg(1)
    await m.readd(1, full=True)
    legs[1].fail_writes(errno.ENOSPC, ranges=[(10 * R, 1)])
    r = Resync(m, depth=1)
    await r.run()
    assert m.legs[1].state is LegState.FAILED and 10 <= r.done < m.regions.nregions // 2
    p = r.progress()
    assert p["state"] == "failed" and "ENOSPC" in p["error"], p
    await m.write(0, b"still works")
    await m.close()


async def test_unreadable_source_region_is_reported_not_spun_on() -> None:
    m, legs, _ = await make(1 << 20)
    await m.fail_leg(1)
    await m.readd(1, full=True)
    legs[0].fail_reads(errno.EIO, ranges=[(2 * R, 1)])
    r = Resync(m)
    await r.run()
    assert r.errors == 1 and r.progress()["state"] == "failed"
    assert m.legs[1].state is LegState.RESYNCING
    assert list(m.regions.tracker.out_of_sync(1)) == [2]
    with pytest.raises(BlockError):  # nobody holds region 2 readably
        await m.read(2 * R, 10)
    legs[0].clear()
    await Resync(m).run()
    assert state_of(m, 1) is LegState.IN_SYNC


@pytest.mark.parametrize("metadata", [False, True])
async def test_verify_reports_and_repairs(metadata: bool) -> None:
    if metadata:
        m, _, disks = await make(2 << 20)
    else:
        disks = [MemoryDevice(2 << 20), MemoryDevice(2 << 20)]
        m = MirrorDevice(disks, region_size=R)
        await m.open()
    await m.write(0, b"v" * 8192)
    assert (await verify(m)).mismatched == []
    disks[1].data[3 * R + 10] ^= 1
    disks[0].data[5 * R] ^= 1
    seen: list[int] = []
    report = await verify(m, progress=lambda rep: seen.append(rep.checked))
    assert report.mismatched == [3, 5] and report.repaired == []
    assert report.checked == report.regions == seen[-1] and seen == sorted(seen)
    report = await verify(m, repair=True, source=1)
    assert report.repaired == [3, 5]
    assert (await verify(m)).mismatched == [] and same(m, disks)
    assert disks[0].data[5 * R] == 0  # leg 1 was the chosen source
    await m.close()


async def test_readd_of_a_leg_in_sync_is_refused_and_memory_full_readd() -> None:
    m, legs, disks = await make(1 << 20, metadata=False)
    with pytest.raises(Exception, match="not failed"):
        await m.readd(0)
    await m.fail_leg(0)
    plan = await m.readd(0, full=True)
    assert plan.full and plan.regions == m.regions.nregions
    await Resync(m).run()
    assert [leg.state for leg in m.legs] == [LegState.IN_SYNC] * 2 and same(m, disks)
    assert legs[0].counters.write_bytes >= m.size  # everything copied (no block status)
