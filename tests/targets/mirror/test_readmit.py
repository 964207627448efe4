"""Never zero in-sync legs by accident (DESIGN.md semantics 10): when every leg failed,
the one that failed last holds every acknowledged write and comes back first, as it
is; the others are then re-added from it.  In process: fault-injecting legs, and legs
behind real NBD connections (a timed-out leg's connection is dropped, it reconnects
and the keeper takes the last-failed leg back by itself)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dst.array.keeper import MirrorKeeper
from dst.array.resync import Resync
from dst.errors import BlockError
from dst.meta.store import MetaStore
from dst.net.address import Address
from dst.net.server import NbdServer
from dst.targets.fault import FaultDevice
from dst.targets.member import Member
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice
from dst.targets.remote import RemoteDevice
from tests.support.fastpath import until

pytestmark = pytest.mark.timeout(60)
SIZE = 4 << 20
R = 64 << 10
TIMEOUT = 0.3


def data(leg: FaultDevice) -> bytearray:
    child = leg.child
    assert isinstance(child, MemoryDevice)
    return child.data


async def both_time_out(m: MirrorDevice, legs: list[FaultDevice]) -> None:
    """Both legs hang: a write times out on both (EIO: it reached no leg)."""
    for leg in legs:
        leg.kill(hang=True)
    with pytest.raises(BlockError):
        await m.write(5 * R, b"lost" * 1024)
    assert m.health().state == "failed"


@pytest.mark.parametrize("metadata", [False, True])
async def test_the_leg_that_failed_last_is_readmitted_and_the_other_resynced_from_it(
    metadata: bool,
) -> None:
    legs = [FaultDevice(MemoryDevice(SIZE), name=f"leg{i}") for i in range(2)]
    m = MirrorDevice(legs, region_size=R, metadata=metadata, leg_timeout=TIMEOUT)
    await m.open()
    acked = os.urandom(3 * R)
    await m.write(R, acked)
    await both_time_out(m, legs)
    last = m.legs[1]
    assert m.core.last_standing is last and "failed last" in last.reason
    for leg in legs:
        leg.revive()
    with pytest.raises(BlockError, match=r"leg 1 \(leg1\) failed last"):
        await m.readd(0)  # not first: it may miss what leg 1 acknowledged
    plan = await m.readd(1)
    assert plan.relation == "readmitted" and m.legs[1].state is LegState.IN_SYNC
    assert "re-admitted" in m.legs[1].reason and m.core.readmitted == 1
    assert await m.read(R, len(acked)) == acked  # every acknowledged write is there
    await m.write(9 * R, b"after" * 100)  # degraded, not down
    plan = await m.readd(0)
    assert not plan.full  # behind by the bitmap: a delta
    await Resync(m).run()
    assert [x.state for x in m.legs] == [LegState.IN_SYNC] * 2
    assert data(legs[0])[: m.size] == data(legs[1])[: m.size]
    await m.close()
    if metadata:  # both members agree again on disk
        sbs = [await MetaStore(x.child).load() for x in legs]
        assert sbs[0].current == sbs[1].current and sbs[0].bitmap == 0


async def test_a_leg_that_is_not_the_one_that_failed_last_is_not_readmitted() -> None:
    """Leg 0 failed first and missed a write that leg 1 acknowledged; leg 1 then
    failed: only leg 1 may come back first."""
    legs = [FaultDevice(MemoryDevice(SIZE), name=f"leg{i}") for i in range(2)]
    m = MirrorDevice(legs, region_size=R, metadata=True, leg_timeout=TIMEOUT)
    await m.open()
    legs[0].kill(hang=True)
    await m.write(2 * R, b"only on leg 1" * 100)  # acknowledged by leg 1 alone
    legs[1].kill(hang=True)
    with pytest.raises(BlockError):
        await m.write(3 * R, b"x")
    assert m.core.last_standing is m.legs[1]
    legs[0].revive()
    with pytest.raises(BlockError, match="failed last"):
        await m.readd(0)
    legs[1].revive()
    await m.readd(1)
    assert await m.read(2 * R, 13) == b"only on leg 1"
    await m.readd(0)
    await Resync(m).run()
    assert data(legs[0])[2 * R : 2 * R + 13] == b"only on leg 1"
    await m.close()


async def test_timed_out_legs_reconnect_and_the_last_one_comes_back_by_itself(
    sock_dir: Path,
) -> None:
    """Legs over NBD: both nodes' disks hang past leg_timeout; each leg's connection is
    dropped and reconnects; the keeper re-admits the leg that failed last as soon as
    its node answers, and re-adds the other from it -- no operator."""
    disks = [FaultDevice(MemoryDevice(SIZE), name=f"disk{i}") for i in range(2)]
    servers = [NbdServer({"": d}) for d in disks]
    addrs = []
    for i, server in enumerate(servers):
        (addr,) = await server.start(f"unix:{sock_dir / f'n{i}.sock'}")
        assert isinstance(addr, Address)
        addrs.append(addr)
    remotes = [RemoteDevice(a, name=f"n{i}", reconnect=True, io_timeout=0) for i, a in
               enumerate(addrs)]  # fmt: skip
    members = [Member(r, name=r.name, where=r.uri) for r in remotes]
    m = MirrorDevice(members, region_size=R, metadata=True, leg_timeout=TIMEOUT)
    await m.open()
    keeper = MirrorKeeper(m, retry_min=0.05, retry_max=0.2)
    keeper.start()
    try:
        acked = os.urandom(2 * R)
        await m.write(0, acked)
        await both_time_out(m, disks)
        for d in disks:
            d.revive()
        await until(lambda: m.health().state == "ok", "both legs back in sync", timeout=30)
        assert m.core.readmitted == 1 and keeper.readds >= 2
        assert await m.read(0, len(acked)) == acked
        assert data(disks[0])[: m.size] == data(disks[1])[: m.size]
    finally:
        keeper.stop()
        await m.close()
        for server in servers:
            await server.close(timeout=5)


async def test_a_resync_target_alone_acknowledges_nothing() -> None:
    """Every leg in sync failed while a resync target holds some regions: a write to
    them fails (EIO) rather than being acknowledged by the incomplete leg alone, so the
    leg that failed last still holds every acknowledged write (in-memory log too)."""
    legs = [FaultDevice(MemoryDevice(SIZE), name=f"leg{i}") for i in range(3)]
    m = MirrorDevice(legs, region_size=R, leg_timeout=TIMEOUT)
    await m.open()
    await m.fail_leg(2)
    await m.readd(2, full=True)
    await m.resync_region(0, [2])  # leg 2 holds region 0 now, and nothing else
    legs[0].kill()
    legs[1].kill()
    with pytest.raises(BlockError):
        await m.write(0, b"x" * 4096)  # fails legs 0 and 1
    with pytest.raises(BlockError):
        await m.write(0, b"y" * 4096)  # leg 2 alone may not acknowledge it
    assert m.core.last_standing is m.legs[1]
    legs[1].revive()
    await m.readd(1)
    assert m.health().state == "degraded"
    await m.write(0, b"z" * 4096)
    assert await m.read(0, 4096) == b"z" * 4096
    await m.close()
