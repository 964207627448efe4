"""Parity I/O over memory and fault devices: both faces, the plan each write takes
(counted member reads), degraded reads and writes, read repair, ordering."""

from __future__ import annotations

import asyncio
import errno
import os
import random

import pytest

from dst.errors import BlockError
from dst.targets.memory import MemoryDevice
from dst.targets.parity import ParityDevice
from tests.support.fastpath import submit

from .support import CHUNK, check, make, member_bytes, scribble

pytestmark = pytest.mark.timeout(60)
SHAPES = [(3, 1), (5, 1), (4, 2), (6, 2)]


@pytest.mark.parametrize(("n", "parity"), SHAPES)
@pytest.mark.parametrize("metadata", [False, True])
async def test_random_writes_both_faces_keep_parity(n: int, parity: int, metadata: bool) -> None:
    a, _ = await make(n, parity, metadata=metadata)
    assert a.size == (n - parity) * (a.core.size // CHUNK) * CHUNK
    image = bytearray(a.size)
    rnd = random.Random(n * 10 + parity)
    await scribble(a, image, rnd, 60)
    for _ in range(30):  # the callback face, to the same implementation
        off = rnd.randrange(a.size)
        data = os.urandom(min(rnd.choice([7, CHUNK, 5 * CHUNK]), a.size - off))
        await submit(a, "write", off, data, False)
        image[off : off + len(data)] = data
        ln = min(rnd.randrange(1, 6 * CHUNK), a.size - off)
        assert bytes(await submit(a, "read", off, ln)) == image[off : off + ln]
    assert bytes(await a.read(0, a.size)) == image
    check(a, image)
    await a.close()


@pytest.mark.parametrize(("n", "parity", "write", "reads"), [
    (3, 1, (0, 2 * CHUNK), 0),  # a whole stripe: no reads
    (4, 2, (0, 4 * CHUNK), 0),  # two whole stripes of a raid6 of 4
    (3, 1, (0, 100), 1),  # reconstruct-write: the other data chunk
    (5, 1, (0, 100), 2),  # read-modify-write: old data and P
    (6, 2, (0, 100), 3),  # read-modify-write: old data, P and Q
    (6, 2, (0, 3 * CHUNK), 1),  # reconstruct-write: the fourth data chunk
])  # fmt: skip
async def test_each_write_takes_the_plan_with_fewest_reads(
    n: int, parity: int, write: tuple[int, int], reads: int
) -> None:
    a, devs = await make(n, parity)
    before = sum(d.counters.reads for d in devs)
    off, ln = write
    await a.write(off, os.urandom(ln))
    assert sum(d.counters.reads for d in devs) - before == reads
    check(a)
    await a.close()


@pytest.mark.parametrize(("n", "parity"), SHAPES)
async def test_degraded_reads_and_writes_and_too_many_lost(n: int, parity: int) -> None:
    a, devs = await make(n, parity)
    image = bytearray(a.size)
    rnd = random.Random(3)
    await scribble(a, image, rnd, 30)
    for i in range(parity):
        devs[i * 2].kill()  # dead members: the next request to each fails it
    await scribble(a, image, rnd, 30)
    assert [leg.live for leg in a.legs].count(False) == parity
    assert a.health().state == "degraded"
    assert bytes(await a.read(0, a.size)) == image
    assert a.health().detail["degraded"] == [devs[i * 2].name for i in range(parity)]
    devs[1].kill()  # one more than there is parity
    with pytest.raises(BlockError) as e:
        for off in range(0, a.size, a.core.geometry.width):
            await a.write(off, b"x" * a.core.geometry.width)
    assert e.value.errno == errno.EIO
    await a.close()


async def test_a_read_error_is_rebuilt_from_parity_and_repaired() -> None:
    a, devs = await make(4, 1)
    image = os.urandom(a.size)
    await a.write(0, image)
    bad = a.core.geometry.data_member(5, 1)
    off = 5 * CHUNK
    devs[bad].fail_reads(ranges=[(off, CHUNK)])  # a bad spot, until rewritten
    before = devs[bad].counters.writes
    got = await a.read(0, a.size)
    assert bytes(got) == image
    assert a.legs[bad].live  # an error, not a timeout: repaired, not failed
    assert devs[bad].counters.writes == before + 1  # that chunk only
    devs[bad].clear()
    check(a, image)
    await a.close()


async def test_overlapping_writes_to_one_stripe_keep_parity() -> None:
    a, _ = await make(5, 2)
    image = bytearray(a.size)
    rnd = random.Random(9)
    writes = []
    for i in range(200):
        off = rnd.randrange(0, 3 * a.core.geometry.width)
        data = bytes([i % 251 + 1]) * rnd.choice([1, 700, CHUNK, 2 * CHUNK + 3])
        writes.append((off, data))
    await asyncio.gather(*(a.write(off, d) for off, d in writes))
    for off, d in writes:  # arrival order is the order of application
        image[off : off + len(d)] = d
    assert bytes(await a.read(0, a.size)) == image
    check(a, image)
    await a.close()


async def test_flush_reaches_every_member_and_too_few_members_refused() -> None:
    a, devs = await make(3, 1)
    await a.flush()
    assert all(d.counters.flushes == 1 for d in devs)
    with pytest.raises(Exception, match="at least 3 members"):
        ParityDevice([MemoryDevice(1 << 20), MemoryDevice(1 << 20)])
    with pytest.raises(Exception, match="power of two"):
        ParityDevice([MemoryDevice(1 << 20) for _ in range(3)], chunk=5000)
    assert member_bytes(devs[0]) is member_bytes(a.legs[0].dev)
    await a.close()
