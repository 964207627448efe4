"""Mirror member metadata: format and reload, write intent before data, clean/dirty,
generation rotation, foreign/diverged/corrupt members, crash recovery, size."""

from __future__ import annotations

import asyncio
import errno
import random
import uuid
from pathlib import Path

import pytest

from dst.array.resync import Resync
from dst.device import Buffer
from dst.errors import BlockError
from dst.meta.layout import BLOCK, DEFAULT_REGION_SIZE, layout_for
from dst.meta.store import MetaStore
from dst.meta.superblock import MetadataError, State
from dst.targets.fault import FaultDevice
from dst.targets.file import FileDevice
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice
from tests.support.fastpath import disk_log

pytestmark = pytest.mark.timeout(30)
SIZE = 4 << 20
R = 64 << 10
LAY = layout_for(SIZE, R)


class Disk(MemoryDevice):
    """A member disk that survives "processes" (each process wraps it anew)."""

    def __init__(self, size: int = SIZE) -> None:
        super().__init__(size, name="disk")


def bit_on_disk(d: MemoryDevice, region: int) -> bool:
    off = layout_for(d.size, R).bitmap_offset + region // 8
    return bool(d.data[off] >> (region % 8) & 1)


async def process(disks: list[Disk], **kw: object) -> tuple[MirrorDevice, list[FaultDevice]]:
    """One array daemon "process": fresh wrappers and mirror over the same disks."""
    legs = [FaultDevice(d, name=f"leg{i}") for i, d in enumerate(disks)]
    m = MirrorDevice(legs, region_size=R, metadata=True, name="vol", **kw)  # type: ignore[arg-type]
    await m.open()
    return m, legs


async def crash(m: MirrorDevice) -> None:
    """The process dies: background tasks stop, nothing is written any more."""
    await m.tasks.close()
    await m.regions.abort()


def leg_state(m: MirrorDevice, i: int) -> LegState:
    """The state of leg ``i`` now (a call, so mypy does not narrow it across awaits)."""
    return m.legs[i].state


async def sb_of(d: Disk) -> object:
    return await MetaStore(d).load()


async def test_format_reload_clean_dirty_and_size() -> None:
    disks = [Disk(), Disk(SIZE + (1 << 20))]
    m, _ = await process(disks)
    assert m.size == LAY.data_size  # the smallest leg's data size
    a, b = [await MetaStore(d).load() for d in disks]
    assert a.array_uuid == b.array_uuid and a.member_uuid != b.member_uuid
    assert (a.role, b.role) == (0, 1) and a.current == b.current
    assert a.state is State.CLEAN
    await m.write(5 * R, b"w" * 10)
    assert (await MetaStore(disks[0]).load()).state is State.DIRTY
    assert bit_on_disk(disks[0], 5) and bit_on_disk(disks[1], 5)
    await m.close()
    a2 = await MetaStore(disks[0]).load()
    assert a2.state is State.CLEAN and a2.current == a.current
    assert not bit_on_disk(disks[0], 5)  # idle bits cleared at clean shutdown
    m2, _ = await process(disks)
    assert m2.size == m.size
    assert m2.log.array_uuid == a.array_uuid
    assert await m2.read(5 * R, 10) == b"w" * 10
    assert all(leg.state is LegState.IN_SYNC for leg in m2.legs)
    await m2.close()


class IntentChecker(MemoryDevice):
    """Fails the test if a data write reaches a region whose bit is not on disk."""

    def __init__(self) -> None:
        super().__init__(SIZE)
        self.violations = 0
        self.data_writes = 0

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        if offset < LAY.data_size:
            self.data_writes += 1
            for r in range(offset // R, (offset + len(data) - 1) // R + 1):
                if not bit_on_disk(self, r):
                    self.violations += 1
        await super().write(offset, data, fua=fua)


async def test_write_intent_is_on_disk_before_data_and_batched() -> None:
    disks = [IntentChecker(), IntentChecker()]
    legs = [FaultDevice(d) for d in disks]
    m = MirrorDevice(legs, region_size=R, metadata=True, clear_delay=0.05)
    await m.open()
    meta_writes = legs[0].counters.writes
    rng = random.Random(1)
    await asyncio.gather(*(m.write(rng.randrange(0, 20) * R, b"x" * 4096) for _ in range(200)))
    assert all(d.violations == 0 and d.data_writes == 200 for d in disks)
    # 200 writes to 20 regions: far fewer than 200 metadata writes (batching)
    assert legs[0].counters.writes - meta_writes - 200 < 40
    await asyncio.sleep(0.3)  # lazy clear of idle regions
    assert m.regions.tracker.bitmap.count() == 0
    assert not any(bit_on_disk(disks[0], r) for r in range(20))
    await m.close()


class DurabilityChecker(MemoryDevice):
    """Models a page cache: data writes are volatile until a flush (or FUA); fails the
    test if a bitmap write clears the bit of a region whose data is not durable."""

    def __init__(self) -> None:
        super().__init__(SIZE)
        self.volatile: set[int] = set()  # regions written since the last flush
        self.violations = 0
        self.flushes = 0

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        lay = LAY
        if offset < lay.data_size and not fua:
            self.volatile.update(range(offset // R, (offset + len(data) - 1) // R + 1))
        elif lay.bitmap_offset <= offset < lay.bitmap_offset + lay.bitmap_size:
            before = {r for r in self.volatile if bit_on_disk(self, r)}
            await super().write(offset, data, fua=fua)
            self.violations += sum(not bit_on_disk(self, r) for r in before)
            return
        await super().write(offset, data, fua=fua)

    async def flush(self) -> None:
        self.flushes += 1
        self.volatile.clear()


async def test_a_bit_is_cleared_only_once_its_data_is_durable() -> None:
    disks = [DurabilityChecker(), DurabilityChecker()]
    m = MirrorDevice(disks, region_size=R, metadata=True, clear_delay=0.05)
    await m.open()
    for round_ in range(3):
        await asyncio.gather(*(m.write(r * R, bytes([round_]) * 4096) for r in range(10)))
        await asyncio.sleep(0.3)  # idle: the bits are cleared lazily
        assert m.regions.tracker.bitmap.count() == 0
        assert not any(bit_on_disk(disks[0], r) for r in range(10))
    assert all(d.violations == 0 and d.flushes >= 3 for d in disks)
    await m.close()


async def test_foreign_member_refused() -> None:
    disks = [Disk(), Disk()]
    m, _ = await process(disks)
    await m.close()
    other = [Disk(), Disk()]
    m2, _ = await process(other)
    await m2.close()
    with pytest.raises(MetadataError, match="different arrays"):
        await process([disks[0], other[1]])
    uid = (await MetaStore(disks[0]).load()).array_uuid
    with pytest.raises(MetadataError, match="another array"):
        await process([disks[0], other[1]], array_uuid=uid)
    # a foreign member coming back through readd is refused too
    m3, legs3 = await process(disks)
    await m3.fail_leg(1)
    legs3[1].child = other[1]
    with pytest.raises(MetadataError, match="another array"):
        await m3.readd(1)
    assert m3.legs[1].state is LegState.FAILED


async def test_role_mismatch_refused() -> None:
    disks = [Disk(), Disk()]
    m, _ = await process(disks)
    await m.close()
    with pytest.raises(MetadataError, match="role"):
        await process([disks[1], disks[0]])


async def test_corrupted_superblock_slot_falls_back() -> None:
    disks = [Disk(), Disk()]
    m, _ = await process(disks)
    await m.write(0, b"d")
    await m.close()
    want = await MetaStore(disks[0]).load()
    store = MetaStore(disks[0])
    await store.load()
    slot = store._slot
    off = LAY.sb_offsets[slot]
    disks[0].data[off + 100] ^= 0xFF  # the newest copy is torn
    m2, _ = await process(disks)
    assert all(leg.state is LegState.IN_SYNC for leg in m2.legs)
    got = disk_log(m2).stores[0].sb
    assert got is not None and got.current == want.current
    await m2.close()
    for off in LAY.sb_offsets:  # both copies bad: the leg is refused, not guessed
        disks[1].data[off + 100] ^= 0xFF
    m3, _ = await process(disks)
    assert m3.legs[1].state is LegState.FAILED and "bad metadata" in m3.legs[1].reason
    await m3.close()


async def test_diverged_legs_refused() -> None:
    disks = [Disk(), Disk()]
    m, _ = await process(disks)
    await m.close()
    for alone in (1, 0):  # each leg runs on its own once: split brain
        legs = [FaultDevice(d) for d in disks]
        legs[1 - alone].kill()
        m = MirrorDevice(legs, region_size=R, metadata=True)
        await m.open()
        assert m.legs[1 - alone].state is LegState.FAILED
        await m.write(alone * R, b"s" * 10)
        await m.close()
    with pytest.raises(MetadataError, match="diverged"):
        await process(disks)
    # readd of the diverged leg is refused as well, unless the operator says full
    legs = [FaultDevice(d) for d in disks]
    legs[1].kill()
    m = MirrorDevice(legs, region_size=R, metadata=True)
    await m.open()
    legs[1].revive()
    with pytest.raises(MetadataError, match="split brain"):
        await m.readd(1)
    plan = await m.readd(1, full=True)
    assert plan.full and m.legs[1].state is LegState.RESYNCING
    await Resync(m).run()
    assert disks[0].data[: m.size] == disks[1].data[: m.size]
    assert leg_state(m, 1) is LegState.IN_SYNC
    await m.close()
    m2, _ = await process(disks)
    assert all(leg.state is LegState.IN_SYNC for leg in m2.legs)
    await m2.close()


async def test_degraded_start_rotates_and_returning_leg_is_behind() -> None:
    disks = [Disk(), Disk()]
    m, _ = await process(disks)
    await m.close()
    legs = [FaultDevice(d) for d in disks]
    legs[1].kill()  # node 1 is down when the array starts
    m = MirrorDevice(legs, region_size=R, metadata=True)
    await m.open()
    a, b = await MetaStore(disks[0]).load(), await MetaStore(disks[1]).load()
    assert a.current != b.current and a.bitmap == b.current
    await m.write(9 * R, b"9" * R)
    await m.close()
    m2, _ = await process(disks)  # both back: leg 1 is behind by region 9 only
    assert m2.legs[1].state is LegState.RESYNCING
    assert sorted(m2.regions.tracker.out_of_sync(1)) == [9]
    r = Resync(m2)
    await r.run()
    assert r.bytes == R and disks[1].data[9 * R : 10 * R] == b"9" * R
    assert leg_state(m2, 1) is LegState.IN_SYNC
    a, b = await MetaStore(disks[0]).load(), await MetaStore(disks[1]).load()
    assert a.current == b.current and a.bitmap == 0
    await m2.close()


class DataGate(FaultDevice):
    """Holds data-area writes (metadata writes pass) until :meth:`open_gate`."""

    def __init__(self, child: MemoryDevice) -> None:
        super().__init__(child, name="gated")
        self.gate = asyncio.Event()
        self.held = 0
        self.arrived = asyncio.Event()

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        if offset < LAY.data_size and not self.gate.is_set():
            self.held += 1
            self.arrived.set()
            await self.gate.wait()
        await super().write(offset, data, fua=fua)


@pytest.mark.parametrize("seed", range(3))
async def test_crash_mid_writes_resyncs_only_dirty_regions(seed: int) -> None:
    disks = [Disk(), Disk()]
    m, _ = await process(disks, clear_delay=0.05)
    rng = random.Random(seed)
    for i in range(30):  # old, settled data everywhere
        await m.write(rng.randrange(0, m.size - 4096), bytes([i + 1]) * 4096)
    await asyncio.sleep(0.3)
    assert m.regions.tracker.bitmap.count() == 0
    await crash(m)
    # a new process; it dies with writes in flight that reached leg 0 only
    gated = DataGate(disks[1])
    m = MirrorDevice([FaultDevice(disks[0]), gated], region_size=R, metadata=True)
    await m.open()
    hot = sorted(rng.sample(range(m.size // R - 1), 5))
    writes = [asyncio.ensure_future(m.write(r * R + 100, b"\xee" * 3000)) for r in hot]
    while gated.held < len(hot):
        gated.arrived.clear()
        await gated.arrived.wait()
    assert disks[0].data[hot[0] * R + 100] == 0xEE != disks[1].data[hot[0] * R + 100]
    for w in writes:
        w.cancel()
    await crash(m)
    # the next process sees DIRTY and resyncs exactly the dirty regions
    assert (await MetaStore(disks[0]).load()).state is State.DIRTY
    m2, _ = await process(disks)
    assert sorted(m2.regions.tracker.out_of_sync(1)) == hot
    r = Resync(m2)
    await r.run()
    assert r.bytes == len(hot) * R  # only the dirty regions were copied
    assert disks[0].data[: m2.size] == disks[1].data[: m2.size]
    await m2.close()


async def test_all_legs_blank_but_one_absent_is_refused() -> None:
    legs = [FaultDevice(Disk()), FaultDevice(Disk())]
    legs[1].kill()
    m = MirrorDevice(legs, region_size=R, metadata=True)
    with pytest.raises(MetadataError, match="no leg has valid metadata"):
        await m.open()


async def test_blank_replacement_member_gets_full_resync() -> None:
    disks = [Disk(), Disk()]
    m, _ = await process(disks)
    await m.write(0, b"r" * 5000)
    await m.close()
    disks[1] = Disk()  # the disk was replaced
    m2, _ = await process(disks)
    assert m2.legs[1].state is LegState.RESYNCING
    assert m2.regions.missing(1) == m2.regions.nregions
    await Resync(m2).run()
    assert disks[0].data[: m2.size] == disks[1].data[: m2.size]
    sbs = [await MetaStore(d).load() for d in disks]
    assert sbs[0].array_uuid == sbs[1].array_uuid and sbs[0].current == sbs[1].current
    await m2.close()


async def test_metadata_write_failure_fails_the_leg() -> None:
    disks = [Disk(), Disk()]
    m, legs = await process(disks)
    legs[1].fail_writes(errno.EIO, ranges=[(LAY.bitmap_offset, LAY.bitmap_size)])
    await m.write(3 * R, b"m" * 10)
    assert m.legs[1].state is LegState.FAILED
    assert await m.read(3 * R, 10) == b"m" * 10
    await m.close()


async def test_open_with_every_leg_dead_fails() -> None:
    legs = [FaultDevice(Disk()), FaultDevice(Disk())]
    m = MirrorDevice(legs, region_size=R, metadata=True)
    await m.open()
    await m.close()
    for leg in legs:
        leg.kill()
    m = MirrorDevice(legs, region_size=R, metadata=True)
    with pytest.raises((BlockError, MetadataError)):
        await m.open()


async def test_member_too_small_for_metadata() -> None:
    m = MirrorDevice([Disk(8192), Disk(8192)], metadata=True)
    with pytest.raises(MetadataError, match="too small"):
        await m.open()


def test_uuid_argument_is_kept() -> None:
    u = uuid.uuid4()
    m = MirrorDevice([Disk(), Disk()], metadata=True, array_uuid=u)
    assert m.log.array_uuid == u
    assert BLOCK == 4096
    assert errno.EIO


async def test_file_legs_failure_crash_and_delta_resync(tmp_path: Path) -> None:
    size = 8 << 20
    paths = [tmp_path / f"leg{i}.img" for i in range(2)]

    def files() -> list[FaultDevice]:
        return [FaultDevice(FileDevice(p, size=size, create=True), name=p.name) for p in paths]

    legs = files()
    m = MirrorDevice(legs, region_size=R, metadata=True)
    await m.open()
    rng = random.Random(7)
    for _ in range(20):
        await m.write(rng.randrange(0, m.size - 4096), rng.randbytes(4096))
    legs[1].fail_writes(errno.EIO, count=1)
    outage: set[int] = set()
    for _ in range(10):
        off = rng.randrange(0, m.size - 4096)
        await m.write(off, rng.randbytes(4096))
        outage.update(range(off // R, (off + 4095) // R + 1))
    assert m.legs[1].state is LegState.FAILED
    await crash(m)  # the daemon dies degraded; nothing is closed
    for leg in legs:
        await leg.close()
    m2 = MirrorDevice(files(), region_size=R, metadata=True)
    await m2.open()
    assert m2.legs[1].state is LegState.RESYNCING
    assert outage <= set(m2.regions.tracker.out_of_sync(1))
    r = Resync(m2)
    await r.run()
    assert r.bytes < m2.size // 4
    await m2.close()
    a, b = (p.read_bytes()[: m2.size] for p in paths)
    assert a == b


@pytest.mark.parametrize("asked", [4 * R, None])
async def test_members_region_size_wins_over_the_spec(
    caplog: pytest.LogCaptureFixture, asked: int | None
) -> None:
    """Members formatted with 64 KiB regions keep them: a spec that asks for another
    size is told so at every start; one that asks for none (the default changed since
    they were formatted) is not, and new members of a spec that asks for none get the
    default."""
    disks = [Disk(), Disk()]
    m, _ = await process(disks)
    await m.write(0, b"\x5a" * BLOCK)
    await m.close()
    legs = [FaultDevice(d, name=f"leg{i}") for i, d in enumerate(disks)]
    again = MirrorDevice(legs, region_size=asked, metadata=True, name="vol")
    with caplog.at_level("WARNING"):
        await again.open()
    assert again.regions.region_size == R
    warned = "formatted with 65536-byte regions" in caplog.text
    assert warned == (asked is not None)
    assert bytes(await again.read(0, BLOCK)) == b"\x5a" * BLOCK
    await again.close()
    fresh = MirrorDevice([Disk(), Disk()], region_size=None, metadata=True, name="new")
    await fresh.open()
    assert fresh.regions.region_size == DEFAULT_REGION_SIZE
    await fresh.close()
