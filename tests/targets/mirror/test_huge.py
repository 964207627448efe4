"""A 1 TiB mirror over sparse legs: a full copy is sparse and never holds the event loop
(DESIGN.md semantics 9 and 11; issue 11 points 4 and 5).

The legs are :class:`tests.support.sparse.SparseDevice` (only written chunks hold
memory), the bitmap is on the legs (16 Mi regions of 64 KiB: 512 bitmap pages).  A
heartbeat task measures the longest the loop was held while the mirror opens, a leg is
re-added with a full resync (and, separately, a new leg is added) under a writer, the
lazy clear runs and verify walks the whole device.  Bounds are generous (the machine is
shared); a per-region walk of 16 Mi regions held the loop for tens of seconds.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from dst.array.resync import Resync
from dst.array.verify import verify
from dst.targets.mirror import LegState, MirrorDevice
from tests.support.fastpath import until
from tests.support.sparse import CHUNK, Heartbeat, SparseDevice

pytestmark = pytest.mark.timeout(120)
TiB = 1 << 40
MiB = 1 << 20
STALL = 0.5  # seconds: generous on a loaded machine (the issue measured 35 s)


async def writer(m: MirrorDevice, stop: asyncio.Event, rng: random.Random) -> int:
    n = 0
    while not stop.is_set():
        await m.write(rng.randrange(0, m.size // 4096) * 4096, rng.randbytes(4096))
        n += 1
        await asyncio.sleep(0.001)
    return n


def data_chunks(dev: SparseDevice, size: int) -> dict[int, bytes]:
    return {c: bytes(d) for c, d in dev.chunks.items() if (c + 1) * CHUNK <= size}


@pytest.mark.parametrize("how", ["readd", "add"])
async def test_full_copy_of_a_terabyte_mirror_is_sparse_and_keeps_the_loop_free(how: str) -> None:
    legs = [SparseDevice(TiB, name=f"leg{i}") for i in range(3)]
    m = MirrorDevice(legs[:2], metadata=True, clear_delay=0.05)
    rng = random.Random(11)
    with Heartbeat() as hb:
        await m.open()
        for _ in range(64):  # 64 MiB of data in 1 MiB pieces all over the device
            await m.write(rng.randrange(0, m.size // MiB) * MiB, rng.randbytes(MiB))
        if how == "readd":
            await m.fail_leg(1)
            await legs[1].write(TiB // 2, b"stale" * 1000)  # must not survive the copy
            await m.readd(1, full=True)
            target = 1
        else:
            target = await m.add_leg(legs[2])
        assert m.regions.missing(target) == m.regions.nregions
        stop = asyncio.Event()
        load = asyncio.ensure_future(writer(m, stop, rng))
        r = Resync(m)
        await r.run()
        stop.set()
        writes = await load
        assert m.legs[target].state is LegState.IN_SYNC
        p = r.progress()
        assert p["state"] == "done" and p["kind"] == "full", p
        assert p["skipped"] > TiB // 2 and p["bytes"] < 256 * MiB, p
        await until(lambda: m.regions.tracker.bitmap.count() == 0, "the lazy clear")
        report = await verify(m)
        assert report.mismatched == [] and report.skipped > TiB // 2
    assert writes > 10
    src, dst = legs[0], legs[target]
    assert data_chunks(dst, m.size) == data_chunks(src, m.size)
    assert dst.allocated < 2 * src.allocated + 8 * MiB  # the data, not the device
    assert hb.worst < STALL, f"the event loop was held for {hb.worst:.3f} s"
    await m.close()


async def test_opening_a_terabyte_mirror_mid_full_resync_keeps_the_loop_free() -> None:
    """The daemon stops during a full resync: every bit of the 16 Mi is set on disk; a
    restart loads them as bitmaps, not lists, and resumes."""
    legs = [SparseDevice(TiB, name=f"leg{i}") for i in range(2)]
    m = MirrorDevice(legs, metadata=True)
    await m.open()
    await m.write(0, b"x" * MiB)
    await m.fail_leg(1)
    await m.readd(1, full=True)
    await m.close()
    with Heartbeat() as hb:
        m = MirrorDevice(legs, metadata=True)
        await m.open()
        assert m.legs[1].state is LegState.RESYNCING
        assert m.regions.missing(1) == m.regions.nregions
        status = m.health()  # status of a huge array
        assert status.detail["dirty_regions"] == m.regions.nregions
        await Resync(m).run()
        assert m.health().state == "ok"
    assert hb.worst < STALL, f"the event loop was held for {hb.worst:.3f} s"
    await m.close()
