#!/usr/bin/env python3
"""What ``--metrics`` costs per request, measured in process: CPU time, no I/O noise.

Theory of operation
-------------------
Each process times its requests where they pass anyway (:mod:`dst.stats`: two clock
reads and a histogram bucket by bit length, only with ``--metrics``):

* the array daemon in its gates -- the array's root and every member node -- so a
  mirror WRITE is timed three times (root and two legs), a READ twice;
* a node (``dst serve``) in its file device (:class:`~dst.targets.meteredfile.
  MeteredFile`), around the syscall.

This drives those paths on the callback fast path, each with the timing off and on:
the daemon's (root gate -> mirror -> two member gates) over legs that complete at once
(so only the daemon's own work is measured), a single gate, and a node's file device
(real ``pread``/``pwrite`` on a page-cached file).  Variants run interleaved,
``--rounds`` times ``--n`` requests, and the least CPU time (thread time: a busy machine
steals wall time, not CPU time) per request is kept; the difference on/off is the cost
of the instrumentation.  ``bench/arrays.py --targets dst-mirror dst-mirror-metrics``
measures the same end to end, as server CPU per I/O of every process.

Run ``python bench/metrics_cost.py``.  This is not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dst import stats
from dst.device import BlockDevice, Buffer, Cancel, Done, no_cancel
from dst.targets.file import FileDevice
from dst.targets.gate import GateDevice
from dst.targets.meteredfile import MeteredFile
from dst.targets.mirror import MirrorDevice

BLOCK = 4096


class Instant(BlockDevice):
    """Completes every read and write at once (the cost of the layers above only)."""

    size = 1 << 30
    _data = bytes(BLOCK)

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        done(None, self._data)
        return no_cancel

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        done(None, None)
        return no_cancel

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        pass


def done(exc: BaseException | None, value: Any) -> None:
    assert exc is None, exc


def runner(dev: BlockDevice, op: str) -> Callable[[int], None]:
    """A loop of ``n`` requests of ``op`` on ``dev`` (4 KiB at offset 0)."""
    data = bytes(BLOCK)
    if op == "write":
        submit_write = dev.submit_write

        def loop(n: int) -> None:
            for _ in range(n):
                submit_write(0, data, False, done)
    else:
        submit_read = dev.submit_read

        def loop(n: int) -> None:
            for _ in range(n):
                submit_read(0, BLOCK, done)

    return loop


def measure(variants: dict[str, BlockDevice], n: int, rounds: int) -> dict[str, list[float]]:
    """Least CPU nanoseconds per request of each variant, [write, read]."""
    loops = {(name, op): runner(dev, op) for name, dev in variants.items()
             for op in ("write", "read")}  # fmt: skip
    best = dict.fromkeys(loops, float("inf"))
    for _ in range(rounds):
        for key, loop in loops.items():
            t0 = time.thread_time_ns()
            loop(n)
            best[key] = min(best[key], (time.thread_time_ns() - t0) / n)
    return {name: [best[name, "write"], best[name, "read"]] for name in variants}


async def daemon(timed: bool) -> GateDevice:
    """The array daemon's path for a mirror: root gate, mirror, a gate per leg."""
    stats.enable(timed)
    legs = [GateDevice(Instant(), name=f"leg{i}") for i in range(2)]
    root = GateDevice(MirrorDevice(legs, name="m"), name="a")
    await root.open()
    await root.write(0, bytes(BLOCK))  # the region's write-intent mark: from now on at once
    return root


def gate(timed: bool) -> GateDevice:
    """One gate over a device that completes at once (what one timed point costs)."""
    stats.enable(timed)
    return GateDevice(Instant())


async def node(path: Path, timed: bool) -> FileDevice:
    stats.enable(timed)
    dev = (MeteredFile if timed else FileDevice)(path)
    await dev.open()
    return dev


async def main_async(n: int, rounds: int, tmp: str | None) -> None:
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        path = Path(d) / "disk.img"
        path.write_bytes(bytes(1 << 20))
        variants: dict[str, BlockDevice] = {
            "mirror daemon": await daemon(False),
            "mirror daemon, --metrics": await daemon(True),
            "one gate": gate(False),
            "one gate, --metrics": gate(True),
            "node file": await node(path, False),
            "node file, --metrics": await node(path, True),
        }
        rows = measure(variants, n, rounds)
        for dev in variants.values():
            await dev.close()
    print(f"{'CPU ns per request':28} {'write':>8} {'read':>8}   (least of {rounds} x {n})")
    for name, (w, r) in rows.items():
        print(f"{name:28} {w:8.0f} {r:8.0f}")
    print("cost of --metrics:")
    for what in ("mirror daemon", "one gate", "node file"):
        w, r = (t - p for t, p in zip(rows[f"{what}, --metrics"], rows[what], strict=True))
        print(f"  {what:26} {w:8.0f} {r:8.0f}")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=20_000, help="requests per run")
    p.add_argument("--rounds", type=int, default=30, help="rounds; the least is kept")
    args = p.parse_args()
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    asyncio.run(main_async(args.n, args.rounds, shm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
