"""Parity recovery over memory devices: a returning member gets only what it missed,
a crash's dirty regions get their parity recomputed, dirty and degraded is refused
(or accepted on purpose), verify finds and repairs bad parity, a member replaced in
its role is rebuilt, a rebuild of zeroes writes zeroes."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from dst.array.keeper import MirrorKeeper
from dst.array.resync import Resync
from dst.array.verify import verify
from dst.meta.superblock import MetadataError
from dst.targets.fault import FaultDevice
from dst.targets.file import FileDevice
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice
from dst.targets.parity import ParityDevice

from .support import CHUNK, MEMBER, R, check, make, member_bytes, scribble

pytestmark = pytest.mark.timeout(60)


async def crash(a: ParityDevice) -> None:
    """The process dies: background tasks stop, nothing more is written."""
    await a.tasks.close()
    await a.regions.abort()


def again(devs: list[FaultDevice]) -> list[FaultDevice]:
    """Fresh wrappers over the same disks (a new process)."""
    return [FaultDevice(d.child, name=d.name) for d in devs]


@pytest.mark.parametrize(("n", "parity"), [(3, 1), (4, 2)])
async def test_returning_members_get_only_what_they_missed(n: int, parity: int) -> None:
    a, _ = await make(n, parity, metadata=True)
    image = bytearray(a.size)
    rnd = random.Random(1)
    await scribble(a, image, rnd, 20)
    for i in range(parity):
        await a.fail_leg(i)
    span = 3 * a.core.geometry.width  # writes while degraded touch the first 3 stripes
    for _ in range(20):
        off = rnd.randrange(span - 100)
        data = os.urandom(100)
        await a.write(off, data)
        image[off : off + 100] = data
    missed = [a.regions.missing(i) for i in range(parity)]
    assert missed == [1] * parity  # 3 stripes of 4 KiB chunks: region 0 only
    for i in range(parity):
        plan = await a.readd(i)
        assert (plan.relation, plan.regions) == ("behind", 1)
    r = Resync(a)
    await r.run()
    assert r.done == 1 and [leg.state for leg in a.legs] == [LegState.IN_SYNC] * n
    check(a, image)
    for i in range(n - parity, n):  # the returned members now carry the data
        await a.fail_leg(i)
    assert bytes(await a.read(0, a.size)) == image
    await a.close()


async def test_crash_mid_write_leaves_unsynced_regions_whose_parity_is_recomputed() -> None:
    a, devs = await make(4, 2, metadata=True)
    image = os.urandom(a.size)
    await a.write(0, image)
    # The next write reaches its data member but not its parity members: they hang.
    geo = a.core.geometry
    for j in range(2):
        devs[geo.parity_member(7, j)].kill(hang=True)
    new = os.urandom(CHUNK)
    write = asyncio.ensure_future(a.write(7 * geo.width, new))
    await devs[geo.parity_member(7, 0)].wait_blocked(1)
    await crash(a)  # the daemon dies with the write in flight
    write.cancel()
    for d in devs:
        d.revive()
    await asyncio.gather(write, return_exceptions=True)
    b, _ = await make(4, 2, metadata=True, devs=again(devs))
    unsynced = b.health().detail["unsynced_regions"]
    assert unsynced >= 1
    with pytest.raises(AssertionError):
        check(b)  # the stripe's parity does not match its data yet
    await Resync(b).run()
    assert b.health().detail["unsynced_regions"] == 0
    check(b)
    got = bytes(await b.read(7 * geo.width, CHUNK))
    assert got in (image[7 * geo.width : 7 * geo.width + CHUNK], new)
    await b.close()


async def test_dirty_and_degraded_is_refused_with_the_regions_or_forced() -> None:
    a, devs = await make(3, 1, metadata=True)
    await a.write(5 * R, b"x" * 100)  # region 2 marked dirty (2 data chunks per stripe)
    await crash(a)
    devs2 = again(devs)
    devs2[2].kill()
    with pytest.raises(MetadataError, match=r"dirty and degraded.*regions 2 .*from r \* 32768"):
        await make(3, 1, metadata=True, devs=devs2)
    devs3 = again(devs)
    devs3[2].kill()
    b, _ = await make(3, 1, metadata=True, devs=devs3, start_dirty_degraded=True)
    assert b.health().detail["at_risk"] == [2]
    assert b.spec()["start_dirty_degraded"] is False  # a one-shot
    assert bytes(await b.read(5 * R, 100)) == b"x" * 100
    await b.close()


async def test_verify_finds_bad_parity_and_repair_rewrites_it() -> None:
    a, devs = await make(4, 2, metadata=True)
    image = os.urandom(a.size)
    await a.write(0, image)
    geo = a.core.geometry
    for s, j in ((3, 0), (40, 1)):  # P of stripe 3, Q of stripe 40
        member_bytes(devs[geo.parity_member(s, j)])[s * CHUNK + 9] ^= 0xFF
    report = await verify(a)
    assert report.mismatched == [3 * CHUNK // R, 40 * CHUNK // R]
    report = await verify(a, repair=True)
    assert report.repaired == [3 * CHUNK // R, 40 * CHUNK // R]
    assert (await verify(a)).mismatched == []
    check(a, image)
    await a.close()


@pytest.mark.parametrize("dead", [True, False])
async def test_replace_a_member_in_its_role_rebuilds_it(dead: bool) -> None:
    a, devs = await make(4, 2, metadata=True)
    image = os.urandom(a.size)
    await a.write(0, image)
    if dead:
        devs[1].kill()
    new = FaultDevice(MemoryDevice(MEMBER, name="new"), name="new")
    old = await a.replace_leg(1, new)
    assert old is devs[1] and a.legs[1].dev is new
    assert str(a.legs[1].state) == "resyncing"
    await Resync(a).run()
    assert str(a.legs[1].state) == "in_sync"
    check(a, image)
    await a.fail_leg(0)
    await a.fail_leg(2)
    assert bytes(await a.read(0, a.size)) == image  # the new member carries its share
    await a.close()


async def test_a_rebuild_of_zeroes_writes_zeroes(tmp_path: Path) -> None:
    paths = [tmp_path / f"m{i}" for i in range(3)]
    devs = [FaultDevice(FileDevice(p, size=MEMBER, create=True), name=p.name) for p in paths]
    a = ParityDevice(devs, chunk=CHUNK, region_size=R, metadata=True)
    await a.open()
    data = os.urandom(2 * CHUNK)
    await a.write(0, data)  # region 0 holds data, the rest are holes
    await a.fail_leg(0)
    assert (await a.readd(0, full=True)).full
    before = devs[0].counters.writes
    await Resync(a).run()
    assert a.legs[0].state is LegState.IN_SYNC
    nregions = a.regions.nregions
    assert devs[0].counters.zeroes >= nregions - 2  # holes everywhere else: zeroes
    assert devs[0].counters.writes - before <= 3  # region 0, and the last partial region
    await a.fail_leg(1)
    assert bytes(await a.read(0, 2 * CHUNK)) == data
    await a.close()


async def test_a_mirrors_members_are_not_opened_as_a_raid5() -> None:
    disks = [MemoryDevice(MEMBER, name=f"d{i}") for i in range(3)]
    m = MirrorDevice(disks, region_size=R, metadata=True)
    await m.open()
    await m.close()
    with pytest.raises(MetadataError, match="are a mirror, not a raid5"):
        await make(3, 1, metadata=True, devs=[FaultDevice(d) for d in disks])


async def test_keeper_suspend_and_resume_a_member() -> None:
    a, _ = await make(4, 2, metadata=True)
    keeper = MirrorKeeper(a)
    image = bytearray(os.urandom(a.size))
    await a.write(0, image)
    await keeper.suspend(2)
    assert keeper.status()["suspended"] == [2]
    new = os.urandom(3 * CHUNK)
    await a.write(CHUNK, new)
    image[CHUNK : 4 * CHUNK] = new
    result = await keeper.resume(2)
    assert result["regions"] == 1 and not result["full"]
    await Resync(a).run()
    assert [str(leg.state) for leg in a.legs] == ["in_sync"] * 4
    check(a, bytes(image))
    await a.close()
