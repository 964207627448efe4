"""Mirror recovery (dst.targets.mirror.recovery): a re-added leg gets every write from the
moment it is attached, and what it missed before is resynced: the legs end identical."""

from __future__ import annotations

import asyncio
import os

import pytest

from dst.array.resync import Resync
from dst.device import Buffer
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice
from tests.support.fastpath import until

pytestmark = pytest.mark.timeout(30)
SIZE = 4 << 20
R = 64 << 10


class HeldMetadata(MemoryDevice):
    """Writes into the metadata area (from ``meta_from`` on) wait while ``hold``."""

    def __init__(self, size: int) -> None:
        super().__init__(size, name="held")
        self.meta_from = size
        self.hold = False
        self.waiting = 0
        self.release = asyncio.Event()

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        if self.hold and offset >= self.meta_from:
            self.waiting += 1
            await self.release.wait()
        await super().write(offset, data, fua=fua)


@pytest.mark.parametrize("metadata", [False, True])
async def test_a_write_while_a_leg_is_being_readded_reaches_it_or_is_resynced(
    metadata: bool,
) -> None:
    a, b = MemoryDevice(SIZE, name="a"), HeldMetadata(SIZE)
    m = MirrorDevice([a, b], region_size=R, metadata=metadata)
    await m.open()
    b.meta_from = m.size
    await m.write(0, os.urandom(4096))
    await m.write(5 * R, os.urandom(4096))  # region 5 marked: the next write to it is fast
    await m.fail_leg(1)
    await m.write(R, os.urandom(4096))  # leg 1 misses region 1
    b.hold = True
    readd = asyncio.ensure_future(m.readd(1))
    if metadata:  # leg 1 is attached and its metadata writes wait: re-add in progress
        await until(lambda: b.waiting >= 1, "the re-add to write leg 1's metadata")
    late = os.urandom(4096)
    write = asyncio.ensure_future(m.write(5 * R, late))  # leg 1 did not miss region 5
    for _ in range(5):
        await asyncio.sleep(0)
    b.release.set()
    await asyncio.wait_for(asyncio.gather(readd, write), 10)
    assert m.legs[1].state is LegState.RESYNCING
    await Resync(m).run()
    assert str(m.legs[1].state) == "in_sync"
    assert a.data[: m.size] == b.data[: m.size]
    assert b.data[5 * R : 5 * R + 4096] == late
    await m.close()
