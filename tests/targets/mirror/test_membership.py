"""Live membership changes of a mirror: add, remove and replace a leg under load, with
the background resync running; legs converge byte for byte, superblocks say the new
roles, member count and names, assembly and restart find the new shape, removed
members are not taken for members again, and bad requests get a clear ConfigError."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from dst.array.assemble import AssembleError, assemble_spec, probe_all
from dst.array.resync import Resync, Resyncer
from dst.device import BlockDevice
from dst.errors import ConfigError
from dst.meta.regions import RegionTracker
from dst.meta.store import MetaStore
from dst.meta.superblock import MetadataError, Superblock
from dst.targets.fault import FaultDevice
from dst.targets.file import FileDevice
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice

pytestmark = pytest.mark.timeout(60)
SIZE = 4 << 20
R = 64 << 10


class Writer:
    """Writers own disjoint 4 KiB slots: the final content is known whatever the
    interleaving with each other and with the membership change."""

    def __init__(self, m: MirrorDevice, tasks: int = 4) -> None:
        self.m = m
        self.want: dict[int, bytes] = {}
        self.count = 0
        self.stop = asyncio.Event()
        self.tick = asyncio.Event()
        slots = [i * 4096 for i in range(0, m.size // 4096, 5)]
        self.tasks = [asyncio.ensure_future(self.run(i, slots[i::tasks])) for i in range(tasks)]

    async def run(self, seed: int, mine: list[int]) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            off = rng.choice(mine)
            data = rng.randbytes(4096)
            await self.m.write(off, data)
            self.want[off] = data
            self.count += 1
            self.tick.set()
            await asyncio.sleep(0)

    async def reach(self, count: int) -> None:
        while self.count < count:
            self.tick.clear()
            await self.tick.wait()

    async def more(self, n: int) -> None:
        await self.reach(self.count + n)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    async def check(self, m: MirrorDevice, datas: list[bytes]) -> None:
        assert self.count > 0
        for off, data in self.want.items():
            assert await m.read(off, 4096) == data
            for d in datas:
                assert d[off : off + 4096] == data


def make_files(tmp_path: Path, n: int, size: int = SIZE) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"m{i}.img"
        with p.open("wb") as f:
            f.truncate(size)
        paths.append(p)
    return paths


def fdev(p: Path) -> FileDevice:
    return FileDevice(p, name=p.name)


async def open_mirror(legs: list[BlockDevice], **kw: object) -> MirrorDevice:
    m = MirrorDevice(legs, region_size=R, metadata=True, name="vol", **kw)  # type: ignore[arg-type]
    await m.open()
    return m


async def sb_of(dev: BlockDevice) -> Superblock:
    return await MetaStore(dev).load()


def in_sync(m: MirrorDevice) -> bool:
    return all(x.state is LegState.IN_SYNC for x in m.legs) and m.health().state == "ok"


def test_tracker_membership_keeps_per_leg_sets_apart() -> None:
    t = RegionTracker(10 * R, R, 3, clear_delay=1.0)
    for leg, region in ((1, 3), (2, 5)):
        t.leg_failed(leg)
        out = t.leg_missed(leg, [region])
        assert out.meta is not None
        t.persisted(out.meta.batch)
    before = t.oos
    t.remove_leg(1, now=0.0)
    assert len(before) == 3 and len(t.oos) == 2 and t.oos[1] is before[2]
    assert list(t.oos[1]) == [5] and t.down == {1}
    t.due_clears(2.0)  # only the removed leg missed region 3: clean again
    assert not t.bitmap.test(3) and t.bitmap.test(5)
    assert t.add_leg() == 2 and t.down == {1, 2} and t.oos[2].count() == 0
    assert len(before) == 3  # a resync holding the old list is not disturbed


async def test_add_leg_under_writer_converges_and_reassembles(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 3)
    m = await open_mirror([fdev(p) for p in paths[:2]])
    resyncer = Resyncer(m)
    resyncer.start()
    w = Writer(m)
    await w.reach(50)
    index = await m.add_leg(fdev(paths[2]))
    assert index == 2 and len(m.legs) == 3 and m.legs[2].state is not LegState.FAILED
    assert [x.index for x in m.legs] == [0, 1, 2]
    await w.more(150)  # the writers go on while the new leg is copied
    await w.finish()
    await resyncer.wait_idle()
    assert in_sync(m)
    assert [d["missing_regions"] for d in m.health().detail["legs"]] == [0, 0, 0]
    size = m.size
    datas = [p.read_bytes()[:size] for p in paths]
    assert datas[0] == datas[1] == datas[2]
    await w.check(m, datas)
    await m.close()
    found = await probe_all([str(p) for p in paths])
    assert [f.sb.role for f in found] == [0, 1, 2]
    assert {f.sb.member_count for f in found} == {3}
    assert {f.sb.array_uuid for f in found} == {found[0].sb.array_uuid}
    assert len({f.sb.member_uuid for f in found}) == 3
    for f in found:
        assert f.sb.spec["names"] == [p.name for p in paths] and f.sb.spec["legs"] == 3
    target = assemble_spec(found)["array"]["target"]
    assert [x["path"] for x in target["members"]] == [str(p.absolute()) for p in paths]
    assert [x["name"] for x in target["members"]] == [p.name for p in paths]
    m2 = await open_mirror([fdev(p) for p in paths])  # restart
    assert in_sync(m2)
    await w.check(m2, [p.read_bytes()[:size] for p in paths])
    await m2.close()


async def test_new_leg_gets_writes_at_once_and_reads_only_once_copied() -> None:
    disks = [MemoryDevice(SIZE, name=f"d{i}") for i in range(3)]
    m = await open_mirror(list(disks[:2]))
    await m.write(0, b"a" * (2 * R))
    assert await m.add_leg(disks[2]) == 2
    new = m.legs[2]
    assert new.state is LegState.RESYNCING and m.resync_wanted.is_set()
    assert m.regions.missing(2) == m.regions.nregions
    for _ in range(12):
        assert await m.read(0, 4096) == b"a" * 4096
    assert new.counters.reads == 0  # it holds nothing yet
    await m.write(5 * R, b"b" * 4096)
    assert disks[2].data[5 * R : 5 * R + 4096] == b"b" * 4096  # writes reach it at once
    await m.resync_region(0, [2])
    assert disks[2].data[:R] == b"a" * R
    for _ in range(12):
        await m.read(0, 4096)
    assert new.counters.reads > 0  # region 0 is now served by it too
    before = new.counters.reads
    for _ in range(12):
        await m.read(R, 4096)
    assert new.counters.reads == before  # region 1 is not
    assert m.health().state == "degraded"
    await Resync(m).run()
    assert in_sync(m) and disks[2].data[: m.size] == disks[0].data[: m.size]
    await m.close()


async def test_remove_leg_renumbers_and_reassembles(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 3)
    m = await open_mirror([fdev(p) for p in paths])
    array = m.log.array_uuid
    w = Writer(m)
    await w.reach(100)
    removed = await m.remove_leg(1)
    assert removed.name == paths[1].name
    assert [(x.index, x.dev.name) for x in m.legs] == [(0, paths[0].name), (1, paths[2].name)]
    assert in_sync(m) and len(m.health().detail["legs"]) == 2
    await w.more(100)
    await w.finish()
    size = m.size
    await w.check(m, [paths[0].read_bytes()[:size], paths[2].read_bytes()[:size]])
    await m.close()
    await removed.close()
    kept = [str(paths[0]), str(paths[2])]
    found = await probe_all(kept)
    assert [(f.sb.role, f.sb.member_count) for f in found] == [(0, 2), (1, 2)]
    assert found[0].sb.spec["names"] == [paths[0].name, paths[2].name]
    assert len(assemble_spec(found)["array"]["target"]["members"]) == 2
    gone = (await probe_all([str(paths[1])]))[0].sb
    assert gone.array_uuid != array and gone.spec["removed_from"] == str(array)
    assert gone.member_count == 1 and gone.role == 0
    with pytest.raises(AssembleError, match="different arrays"):
        assemble_spec(await probe_all([str(p) for p in paths]))
    stale = MirrorDevice([fdev(paths[0]), fdev(paths[1])], region_size=R, metadata=True)
    with pytest.raises(MetadataError, match=r"leg 1 \(m1.img\) left the array"):
        await stale.open()
    for leg in stale.legs:
        await leg.dev.close()
    m2 = await open_mirror([fdev(paths[0]), fdev(paths[2])])  # restart
    assert in_sync(m2)
    await w.check(m2, [paths[0].read_bytes()[:size], paths[2].read_bytes()[:size]])
    # The removed disk comes back: it is taken as a new member (full resync).
    assert await m2.add_leg(fdev(paths[1])) == 2
    assert m2.regions.missing(2) == m2.regions.nregions
    await Resync(m2).run()
    assert in_sync(m2)
    await w.check(m2, [p.read_bytes()[:size] for p in paths])
    await m2.close()
    found = await probe_all([str(paths[0]), str(paths[2]), str(paths[1])])
    assert [f.sb.role for f in found] == [0, 1, 2]
    assert {f.sb.array_uuid for f in found} == {array}


@pytest.mark.parametrize("gone", [1, 2])  # a leg in sync, or the resync target itself
async def test_remove_leg_while_a_resync_runs(gone: int) -> None:
    disks = [MemoryDevice(SIZE) for _ in range(3)]
    legs = [FaultDevice(d, name=f"leg{i}") for i, d in enumerate(disks)]
    m = await open_mirror(list(legs))
    rng = random.Random(1)
    await m.fail_leg(2)
    for _ in range(64):
        await m.write(rng.randrange(0, m.size // 4096) * 4096, rng.randbytes(4096))
    await m.readd(2, full=True)
    resyncer = Resyncer(m, max_rate=16 * R)  # slow: the removal lands mid-copy
    resyncer.start()
    await resyncer.started.wait()
    r = resyncer.current
    assert r is not None
    while r.done < 3:
        r.advanced.clear()
        await r.advanced.wait()
    await m.remove_leg(gone)  # leg 1: the resync target (leg 2) becomes leg 1
    kept = [i for i in range(3) if i != gone]
    assert [x.dev for x in m.legs] == [legs[i] for i in kept]
    resyncer.set_rate(max_rate=None)
    await resyncer.wait_idle()
    assert in_sync(m) and disks[kept[1]].data[: m.size] == disks[0].data[: m.size]
    await m.close()
    m2 = await open_mirror([FaultDevice(disks[i]) for i in kept])
    assert in_sync(m2)
    await m2.close()


async def test_removing_a_failed_leg_lets_the_bitmap_clear() -> None:
    disks = [MemoryDevice(SIZE) for _ in range(3)]
    m = await open_mirror(list(disks), clear_delay=0.01)
    await m.fail_leg(2)
    await m.write(0, b"z" * (4 * R))  # leg 2 misses these regions: their bits stay
    assert m.regions.missing(2) == 4
    sb = await sb_of(disks[0])
    assert sb.bitmap  # the generation leg 2 holds is kept for its delta resync
    await m.remove_leg(2)
    assert in_sync(m) and m.regions.tracker.bitmap.count() == 4
    sbs = [await sb_of(d) for d in disks[:2]]
    assert [sb.bitmap for sb in sbs] == [0, 0] and sbs[0].current == sbs[1].current
    await m.close()  # idle bits are cleared and persisted
    for d in disks[:2]:
        store = MetaStore(d)
        await store.load()
        assert (await store.read_bitmap()).count() == 0


async def test_replace_dead_leg_rebuilds_it() -> None:
    disks = [MemoryDevice(SIZE) for _ in range(2)]
    legs = [FaultDevice(d, name=f"leg{i}") for i, d in enumerate(disks)]
    m = await open_mirror(list(legs))
    resyncer = Resyncer(m)
    resyncer.start()
    rng = random.Random(2)
    await m.write(0, rng.randbytes(m.size // 2))
    legs[1].kill()
    await m.write(m.size // 2, rng.randbytes(R))
    assert m.legs[1].state is LegState.FAILED
    spare = MemoryDevice(SIZE, name="spare")
    old = await m.replace_leg(1, spare)
    assert old is legs[1] and m.legs[1].dev is spare and m.legs[1].index == 1
    await resyncer.wait_idle()
    assert in_sync(m) and spare.data[: m.size] == disks[0].data[: m.size]
    sbs = [await sb_of(disks[0]), await sb_of(spare)]
    assert [(sb.role, sb.member_count) for sb in sbs] == [(0, 2), (1, 2)]
    assert sbs[0].spec["names"] == ["leg0", "spare"] == sbs[1].spec["names"]
    assert sbs[0].array_uuid == sbs[1].array_uuid and sbs[0].current == sbs[1].current
    await m.close()
    m2 = await open_mirror([FaultDevice(disks[0], name="leg0"), FaultDevice(spare)])
    assert in_sync(m2)
    await m2.close()


async def test_replace_live_leg_under_writer() -> None:
    disks = [MemoryDevice(SIZE, name=f"d{i}") for i in range(2)]
    m = await open_mirror(list(disks))
    array = m.log.array_uuid
    resyncer = Resyncer(m)
    resyncer.start()
    w = Writer(m)
    await w.reach(50)
    new = MemoryDevice(SIZE, name="new")
    old = await m.replace_leg(0, new)
    assert old is disks[0] and [x.dev for x in m.legs] == [new, disks[1]]
    await w.more(150)
    await w.finish()
    await resyncer.wait_idle()
    assert in_sync(m) and new.data[: m.size] == disks[1].data[: m.size]
    await w.check(m, [bytes(new.data), bytes(disks[1].data)])
    gone = await sb_of(disks[0])
    assert gone.array_uuid != array and gone.spec["removed_from"] == str(array)
    assert (await sb_of(new)).role == 0
    await m.close()
    m2 = await open_mirror([new, disks[1]])
    assert in_sync(m2)
    await w.check(m2, [bytes(new.data), bytes(disks[1].data)])
    await m2.close()


async def test_restart_before_the_new_leg_is_copied() -> None:
    disks = [MemoryDevice(SIZE, name=f"d{i}") for i in range(3)]
    m = await open_mirror(list(disks[:2]))
    await m.write(R, b"x" * (3 * R))
    await m.add_leg(disks[2])
    await m.resync_region(1, [2])
    await m.close()
    m2 = await open_mirror(list(disks))
    assert [x.state for x in m2.legs] == [LegState.IN_SYNC] * 2 + [LegState.RESYNCING]
    assert m2.regions.missing(2) >= m2.regions.nregions - 1
    await Resync(m2).run()
    assert in_sync(m2) and disks[2].data[: m2.size] == disks[0].data[: m2.size]
    await m2.close()
    m3 = await open_mirror(list(disks))
    assert in_sync(m3)
    await m3.close()


async def test_membership_without_metadata() -> None:
    disks = [MemoryDevice(SIZE, name=f"d{i}") for i in range(4)]
    m = MirrorDevice(disks[:2], region_size=R)
    await m.open()
    await m.write(0, b"q" * R)
    assert await m.add_leg(disks[2]) == 2
    await Resync(m).run()
    assert in_sync(m) and disks[2].data[:R] == b"q" * R
    assert await m.remove_leg(0) is disks[0]
    assert await m.replace_leg(0, disks[3]) is disks[1]
    await Resync(m).run()
    assert in_sync(m) and [x.dev for x in m.legs] == [disks[3], disks[2]]
    assert await m.read(0, R) == b"q" * R
    await m.close()


async def test_bad_requests_get_a_clear_config_error() -> None:
    disks = [MemoryDevice(SIZE, name=f"d{i}") for i in range(3)]
    m = await open_mirror(list(disks[:2]))
    with pytest.raises(ConfigError, match=r"tiny is too small.*at least"):
        await m.add_leg(MemoryDevice(SIZE // 2, name="tiny"))
    with pytest.raises(ConfigError, match="d0 is leg 0 already"):
        await m.add_leg(disks[0])
    with pytest.raises(ConfigError, match="is leg 1 of 'vol' already"):
        await m.add_leg(FaultDevice(disks[1], name="again"))  # the same disk
    with pytest.raises(ConfigError, match="at least two legs"):
        await m.remove_leg(0)
    for bad in (2, -1):
        with pytest.raises(ConfigError, match=f"no leg {bad}"):
            await m.remove_leg(bad)
        with pytest.raises(ConfigError, match=f"no leg {bad}"):
            await m.replace_leg(bad, MemoryDevice(SIZE))
    assert len(m.legs) == 2 and in_sync(m)
    await m.add_leg(disks[2])
    await Resync(m).run()
    await m.fail_leg(1)
    await m.fail_leg(2)
    with pytest.raises(ConfigError, match="leg 0 is the last leg in sync"):
        await m.remove_leg(0)
    with pytest.raises(ConfigError, match="no other leg is in sync"):
        await m.replace_leg(0, MemoryDevice(SIZE))
    with pytest.raises(ConfigError, match="leg 2 is failed and would change its role"):
        await m.remove_leg(1)
    await m.remove_leg(2)
    assert len(m.legs) == 2 and [x.state for x in m.legs] == [LegState.IN_SYNC, LegState.FAILED]
    await m.close()


async def test_a_leg_dead_during_the_change_learns_the_member_count_when_back() -> None:
    disks = [MemoryDevice(SIZE) for _ in range(3)]
    legs = [FaultDevice(d, name=f"leg{i}") for i, d in enumerate(disks)]
    m = await open_mirror(list(legs[:2]))
    legs[1].kill()
    await m.write(0, b"k" * R)
    assert m.legs[1].state is LegState.FAILED
    await m.add_leg(legs[2])  # leg 1 cannot be told
    assert (await sb_of(disks[1])).member_count == 2
    legs[1].revive()
    plan = await m.readd(1)
    assert not plan.full
    await Resync(m).run()
    assert in_sync(m)
    sbs = [await sb_of(d) for d in disks]
    assert [(sb.role, sb.member_count) for sb in sbs] == [(0, 3), (1, 3), (2, 3)]
    assert {sb.current for sb in sbs} == {sbs[0].current}
    assert sbs[1].spec["names"] == ["leg0", "leg1", "leg2"]
    await m.close()
