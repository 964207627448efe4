#!/usr/bin/env python3
"""Cost of the on-disk write-intent bitmap against the in-memory dirty log on 4 KiB
random writes, in process: ``python bench/region_tracking.py [WRITES]``.

Checks that both variants write the same data on both legs and prints IOPS and the
ratio.  Memory legs make the mirror's own CPU cost visible: this is the worst case for
the ratio.  "cold" writes mostly hit regions for the first time (a metadata write per
batch); "hot" writes go to regions already marked.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

from dst.targets.memory import MemoryDevice
from dst.targets.mirror import MirrorDevice

SIZE = 256 << 20
QD = 32


async def run(kind: str, n: int) -> tuple[float, float]:
    legs = [MemoryDevice(SIZE + (16 << 20)) for _ in range(2)]
    m = MirrorDevice(legs, metadata=kind == "metadata")
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
        for kind in ("memory", "metadata"):
            cold, hot = await run(kind, n)
            b = best.get(kind, (0.0, 0.0))
            best[kind] = (max(cold, b[0]), max(hot, b[1]))
    base = best["memory"]
    for kind, (cold, hot) in best.items():
        print(
            f"{kind:9s} cold {cold:8.0f} IOPS ({cold / base[0]:.2f}x)  "
            f"hot {hot:8.0f} IOPS ({hot / base[1]:.2f}x)"
        )
    return best


if __name__ == "__main__":
    asyncio.run(compare(int(sys.argv[1]) if len(sys.argv) > 1 else 30000, 3))
