"""Parity arrays over memory and fault devices, and an independent parity check."""

from __future__ import annotations

import os
import random

from dst.targets.fault import FaultDevice
from dst.targets.memory import MemoryDevice
from dst.targets.parity import ParityDevice
from tests.support.parity import pq

MEMBER = 1 << 20
CHUNK = 4096
R = 16 << 10  # region size: 4 stripes per region


def member_bytes(dev: object) -> bytearray:
    while isinstance(dev, FaultDevice):
        dev = dev.child
    assert isinstance(dev, MemoryDevice)
    return dev.data


def check(a: ParityDevice, image: bytes | bytearray | None = None) -> None:
    """Every stripe's P (and Q) on the members matches its data chunks (recomputed here,
    with the rotation written out: P on member n-1-s%n, Q after it, data after them);
    with ``image``, the data chunks hold the array's image."""
    n, m, c = len(a.legs), a.core.parity, a.core.chunk
    k = n - m
    mem = [member_bytes(leg.dev) for leg in a.legs]
    for s in range(a.core.geometry.stripes):
        pd = n - 1 - s % n
        chunks = [bytes(mem[(pd + m + i) % n][s * c : (s + 1) * c]) for i in range(k)]
        p, q = pq(chunks)
        assert mem[pd][s * c : (s + 1) * c] == p, f"P of stripe {s}"
        if m == 2:
            assert mem[(pd + 1) % n][s * c : (s + 1) * c] == q, f"Q of stripe {s}"
        if image is not None:
            assert b"".join(chunks) == image[s * k * c : (s + 1) * k * c], f"data of stripe {s}"


def members(n: int, size: int = MEMBER) -> list[FaultDevice]:
    return [FaultDevice(MemoryDevice(size, name=f"m{i}"), name=f"m{i}") for i in range(n)]


async def make(
    n: int, parity: int, *, metadata: bool = False, devs: list[FaultDevice] | None = None,
    **kw: object,
) -> tuple[ParityDevice, list[FaultDevice]]:  # fmt: skip
    devs = devs if devs is not None else members(n)
    a = ParityDevice(devs, parity=parity, chunk=CHUNK, region_size=R, metadata=metadata,
                     name="vol", **kw)  # type: ignore[arg-type]  # fmt: skip
    await a.open()
    return a, devs


async def scribble(a: ParityDevice, image: bytearray, rnd: random.Random, count: int) -> None:
    """``count`` random writes of random sizes, applied to ``image`` too."""
    for _ in range(count):
        off = rnd.randrange(a.size)
        n = min(rnd.choice([1, 100, CHUNK, 3 * CHUNK + 5, 9 * CHUNK, 40 * CHUNK]), a.size - off)
        data = os.urandom(n)
        await a.write(off, data)
        image[off : off + n] = data
