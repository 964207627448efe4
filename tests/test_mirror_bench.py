"""Cost of region tracking and the write-intent bitmap on 4 KiB random writes.

A micro-benchmark, not a timed test: it checks that every variant writes the same data
and prints IOPS and ratios (``pytest -s tests/test_mirror_bench.py``, or run this file
with ``python`` for a bigger run).  Memory legs make the mirror's own CPU cost visible:
this is the worst case for the ratio.  "cold" writes mostly hit regions for the first
time (a metadata write per batch); "hot" writes go to regions already marked.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

import pytest

from dst.targets.memory import MemoryDevice
from dst.targets.mirror import MirrorDevice

pytestmark = pytest.mark.timeout(120)
SIZE = 256 << 20
QD = 32


async def run(kind: str, n: int) -> tuple[float, float]:
    legs = [MemoryDevice(SIZE + (16 << 20)) for _ in range(2)]
    if kind == "plain":
        m = MirrorDevice(legs)
    elif kind == "memory":
        m = MirrorDevice(legs, region_size=64 << 10)
    else:
        m = MirrorDevice(legs, metadata=True)
    await m.open()
    rng = random.Random(1)
    offs = [rng.randrange(0, m.size // 4096) * 4096 for _ in range(n)]
    buf = b"x" * 4096

    async def worker(k: int) -> None:
        for i in range(k, n, QD):
            await m.write(offs[i], buf)

    rates = []
    for _ in range(2):  # cold, then hot
        t = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(QD)))
        rates.append(n / (time.perf_counter() - t))
    assert legs[0].data[: m.size] == legs[1].data[: m.size]
    await m.close()
    return rates[0], rates[1]


async def compare(n: int, rounds: int) -> dict[str, tuple[float, float]]:
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for kind in ("plain", "memory", "metadata"):
            cold, hot = await run(kind, n)
            b = best.get(kind, (0.0, 0.0))
            best[kind] = (max(cold, b[0]), max(hot, b[1]))
    base = best["plain"]
    for kind, (cold, hot) in best.items():
        print(
            f"{kind:9s} cold {cold:8.0f} IOPS ({cold / base[0]:.2f}x)  "
            f"hot {hot:8.0f} IOPS ({hot / base[1]:.2f}x)"
        )
    return best


async def test_bitmap_cost_micro_benchmark() -> None:
    best = await compare(3000, 1)
    assert all(cold > 0 and hot > 0 for cold, hot in best.values())


if __name__ == "__main__":
    asyncio.run(compare(int(sys.argv[1]) if len(sys.argv) > 1 else 30000, 3))
