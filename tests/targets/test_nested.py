"""Targets stacked on targets: mirror of stripes, linear of mirrors, stripe of files."""

from __future__ import annotations

import asyncio
import errno
import random
from pathlib import Path

from dst.targets.fault import FaultDevice
from dst.targets.file import FileDevice
from dst.targets.linear import LinearDevice
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice
from dst.targets.stripe import StripeDevice

CHUNK = 4096


def mem(n: int, name: str) -> MemoryDevice:
    return MemoryDevice(n, name=name)


async def random_workload(dev: MirrorDevice | LinearDevice, seed: int) -> bytearray:
    """Concurrent writes of distinct patterns plus zeroes; returns the expected image."""
    rng = random.Random(seed)
    model = bytearray(dev.size)
    ops = []
    for i in range(200):
        off = rng.randrange(dev.size - 1)
        n = rng.randint(1, min(3 * CHUNK, dev.size - off))
        ops.append((off, n, bytes([i % 250 + 1]) * n))
    # non-overlapping batches keep the model unambiguous; overlap is tested in mirror tests
    batch: list[tuple[int, int, bytes]] = []
    for op in ops:
        if any(op[0] < o + n and o < op[0] + op[1] for o, n, _ in batch):
            await asyncio.gather(*(dev.write(o, d) for o, _, d in batch))
            batch = []
        batch.append(op)
        model[op[0] : op[0] + op[1]] = op[2]
    await asyncio.gather(*(dev.write(o, d) for o, _, d in batch))
    return model


async def test_mirror_of_stripes() -> None:
    s1 = StripeDevice([mem(8 * CHUNK, "a"), mem(8 * CHUNK, "b")], chunk=CHUNK)
    s2 = StripeDevice([mem(5 * CHUNK, "c"), mem(5 * CHUNK, "d"), mem(5 * CHUNK, "e")], chunk=CHUNK)
    m = MirrorDevice([s1, s2])
    await m.open()
    assert m.size == 15 * CHUNK
    model = await random_workload(m, 1)
    assert await s1.read(0, m.size) == model
    assert await s2.read(0, m.size) == model
    assert await m.read(0, m.size) == model
    assert m.spec()["members"][1]["type"] == "stripe"
    assert m.health().state == "ok"


async def test_linear_of_mirrors_with_a_failing_leg() -> None:
    bad = FaultDevice(mem(10 * CHUNK, "bad"))
    m1 = MirrorDevice([mem(10 * CHUNK, "m1a"), bad])
    m2 = MirrorDevice([mem(6 * CHUNK, "m2a"), mem(6 * CHUNK, "m2b")])
    lin = LinearDevice([m1, m2])
    await lin.open()
    assert lin.size == 16 * CHUNK
    model = await random_workload(lin, 2)
    bad.fail_reads(errno.EIO)
    for _ in range(4):  # reads on m1 retried on its good leg
        assert await lin.read(0, lin.size) == model
    assert m1.legs[1].state is LegState.IN_SYNC
    h = lin.health()
    assert h.state == "ok" and h.detail["children"][0]["legs"][1]["counters"]["errors"] == 2
    bad.kill()
    await lin.write(0, b"x" * 10)  # degraded, not down: the good leg holds it
    model[:10] = b"x" * 10
    assert m1.legs[1].state.value == "failed" and lin.health().state == "degraded"
    assert await lin.read(0, lin.size) == model
    await lin.close()


async def test_stripe_of_files_mirrored_with_memory(tmp_path: Path) -> None:
    files = [FileDevice(tmp_path / f"f{i}", size=16 * CHUNK, create=True) for i in range(2)]
    s = StripeDevice(files, chunk=CHUNK)
    m = MirrorDevice([s, mem(32 * CHUNK, "mem")])
    await m.open()
    try:
        model = await random_workload(m, 3)
        await m.flush()
        await m.write_zeroes(0, 4 * CHUNK, punch=True)
        model[: 4 * CHUNK] = bytes(4 * CHUNK)
        assert await s.read(0, s.size) == model
        assert m.caps.trim and m.caps.block_status
    finally:
        await m.close()


async def test_spec_is_an_array_spec_document(tmp_path: Path) -> None:
    """spec() speaks the array spec's document shape (dst.array.spec)."""
    from dst.array.speccanon import target_to_dict
    from dst.array.specdict import target_from_dict

    f = FileDevice(tmp_path / "f", size=8 * CHUNK, create=True, name="f")
    s = StripeDevice([mem(8 * CHUNK, "a"), mem(8 * CHUNK, "b")], chunk=CHUNK, name="s")
    m = MirrorDevice([s, mem(16 * CHUNK, "c")], name="m", leg_timeout=5.0)
    lin = LinearDevice([m, f], starts=[0, CHUNK], sizes=[None, 4 * CHUNK], name="l")
    await lin.open()
    try:
        spec = lin.spec()
        assert target_to_dict(target_from_dict(spec)) == spec  # every key, explicit
    finally:
        await lin.close()
