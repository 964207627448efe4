"""Suspending one node of a linear or stripe array: held FIFO, bounded, swappable."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dst.device import BlockDevice, Buffer, Health
from dst.errors import BlockError, ConfigError
from dst.targets.gate import Gate
from dst.targets.linear import LinearDevice
from dst.targets.member import Member
from dst.targets.memory import MemoryDevice
from dst.targets.stripe import StripeDevice

NODE = 64 << 10
CHUNK = 4096
TIMEOUT = 10


class SlowWrites(MemoryDevice):
    """Writes wait for ``gate``, so a test controls when they complete."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self.gate.wait()
        await super().write(offset, data)


class Recording(MemoryDevice):
    """Remembers the first byte of every write, in the order they were applied."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.applied: list[int] = []

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self.applied.append(bytes(data[:1])[0])
        await super().write(offset, data)


def members(*inner: BlockDevice, max_held: int | None = 1024) -> list[Member]:
    return [Member(d, name=f"n{i}", where="", max_held=max_held) for i, d in enumerate(inner)]


async def linear(
    *inner: BlockDevice, max_held: int | None = 1024
) -> tuple[BlockDevice, list[Member]]:
    ms = members(*inner, max_held=max_held)
    dev = LinearDevice(ms)
    await dev.open()
    return dev, ms


async def stripe(
    *inner: BlockDevice, max_held: int | None = 1024
) -> tuple[BlockDevice, list[Member]]:
    ms = members(*inner, max_held=max_held)
    dev = StripeDevice(ms, chunk=CHUNK)
    await dev.open()
    return dev, ms


Maker = Callable[..., Awaitable[tuple[BlockDevice, list[Member]]]]
ARRAYS = [pytest.param(linear, id="linear"), pytest.param(stripe, id="stripe")]


def on_node(make: Maker, node: int, i: int) -> int:
    """An array offset whose block lives on ``node`` (two nodes), the ``i``-th such block."""
    if make is linear:
        return node * NODE + i * 512
    return (2 * i + node) * CHUNK


async def spin(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.parametrize("make", ARRAYS)
async def test_suspended_node_holds_while_the_other_keeps_serving(make: Maker) -> None:
    async with asyncio.timeout(TIMEOUT):
        a, b = MemoryDevice(NODE), MemoryDevice(NODE)
        arr, (ma, mb) = await make(a, b)
        pattern = os.urandom(arr.size)
        await arr.write(0, pattern)
        before = bytes(a.data)
        await ma.suspend()
        assert ma.suspended and not mb.suspended
        held: list[asyncio.Task[Any]] = [
            asyncio.create_task(arr.write(on_node(make, 0, i), bytes([i + 1]) * 512))
            for i in range(4)
        ]
        held.append(asyncio.create_task(arr.read(on_node(make, 0, 0), 512)))
        await spin()
        assert ma.held == 5 and not any(t.done() for t in held)
        h = ma.health()
        assert h.state == "suspended" and h.detail["suspended"] and h.detail["held"] == 5
        worst = 0.0
        for i in range(50):  # the other node serves as usual meanwhile
            off = on_node(make, 1, i % 8)
            t0 = time.monotonic()
            await arr.write(off, bytes([0xEE]) * 512)
            assert await arr.read(off, 512) == bytes([0xEE]) * 512
            worst = max(worst, time.monotonic() - t0)
        assert worst < 0.05
        assert ma.held == 5 and bytes(a.data) == before  # nothing reached the held node
        ma.resume()
        await asyncio.gather(*held)
        assert held[-1].result() == bytes([1]) * 512  # after the write before it
        assert ma.held == 0 and not ma.suspended and ma.health().state == "connected"
        for i in range(4):
            assert await arr.read(on_node(make, 0, i), 512) == bytes([i + 1]) * 512


@pytest.mark.parametrize("make", ARRAYS)
async def test_resume_applies_overlapping_held_writes_in_arrival_order(make: Maker) -> None:
    async with asyncio.timeout(TIMEOUT):
        a, b = Recording(NODE), MemoryDevice(NODE)
        arr, (ma, _) = await make(a, b)
        off = on_node(make, 0, 3)
        await ma.suspend()
        tasks = []
        for v in range(1, 21):  # same block, growing lengths: every write overlaps
            tasks.append(asyncio.create_task(arr.write(off, bytes([v]) * (512 + v))))
            await asyncio.sleep(0)
        await spin()
        assert ma.held == 20 and a.applied == []
        ma.resume()
        await asyncio.gather(*tasks)
        assert a.applied == list(range(1, 21))
        assert await arr.read(off, 532) == bytes([20]) * 532


@pytest.mark.parametrize("make", ARRAYS)
async def test_suspend_drains_requests_in_flight_first(make: Maker) -> None:
    async with asyncio.timeout(TIMEOUT):
        a = SlowWrites(NODE)
        arr, (ma, _) = await make(a, MemoryDevice(NODE))
        first = asyncio.create_task(arr.write(on_node(make, 0, 0), b"x" * 512))
        await spin()
        assert ma.inflight == 1
        suspending = asyncio.create_task(ma.suspend())
        await spin()
        assert not suspending.done() and ma.suspended
        a.gate.set()
        await first
        await suspending
        assert ma.inflight == 0
        with pytest.raises(ConfigError, match="already suspended"):
            await ma.suspend()
        ma.resume()
        with pytest.raises(ConfigError, match="not suspended"):
            ma.resume()


async def test_cancelled_suspend_resumes_the_node() -> None:
    async with asyncio.timeout(TIMEOUT):
        a = SlowWrites(NODE)
        arr, (ma, _) = await linear(a, MemoryDevice(NODE))
        first = asyncio.create_task(arr.write(0, b"x" * 512))
        await spin()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ma.suspend(), 0.01)
        assert not ma.suspended
        later = asyncio.create_task(arr.write(512, b"y" * 512))
        a.gate.set()
        await asyncio.gather(first, later)
        assert a.data[:1024] == b"x" * 512 + b"y" * 512


@pytest.mark.parametrize("make", ARRAYS)
async def test_bound_on_held_requests_fails_clearly(make: Maker) -> None:
    async with asyncio.timeout(TIMEOUT):
        arr, (ma, mb) = await make(MemoryDevice(NODE), MemoryDevice(NODE), max_held=3)
        await ma.suspend()
        held = [asyncio.create_task(arr.read(on_node(make, 0, i), 512)) for i in range(3)]
        await spin()
        assert ma.held == 3
        with pytest.raises(BlockError, match="n0") as info:
            await arr.write(on_node(make, 0, 5), b"z" * 512)
        assert info.value.errno == errno.EAGAIN
        assert "suspended" in info.value.message
        assert ma.counters.errors == 1 and mb.counters.errors == 0
        await arr.write(on_node(make, 1, 5), b"z" * 512)  # the other node is unaffected
        ma.resume()
        assert [len(r) for r in await asyncio.gather(*held)] == [512] * 3


@pytest.mark.parametrize("make", ARRAYS)
async def test_swap_inner_while_suspended_moves_io_to_the_new_device(make: Maker) -> None:
    async with asyncio.timeout(TIMEOUT):
        a, b = MemoryDevice(NODE), MemoryDevice(NODE)
        arr, (ma, _) = await make(a, b)
        pattern = bytearray(os.urandom(arr.size))
        await arr.write(0, pattern)
        with pytest.raises(ConfigError, match="suspended"):
            ma.swap_inner(MemoryDevice(NODE))
        await ma.suspend()
        with pytest.raises(ConfigError, match="smaller"):
            ma.swap_inner(MemoryDevice(NODE - 512))
        disk = MemoryDevice(NODE, name="new-disk")
        disk.data[:] = a.data  # the "swapped disk" holds the node's data
        off = on_node(make, 0, 2)
        pending = asyncio.create_task(arr.write(off, b"\x5a" * 512))
        await spin()
        assert ma.swap_inner(disk, where="/dev/new") is a
        assert ma.inner is disk and ma.where == "/dev/new"
        ma.resume()
        await pending
        pattern[off : off + 512] = b"\x5a" * 512
        assert await arr.read(0, arr.size) == pattern
        assert bytes(a.data) != bytes(disk.data)  # the held write went to the new disk only


async def test_held_request_cancelled_leaves_the_queue() -> None:
    async with asyncio.timeout(TIMEOUT):
        gate = Gate(name="g", max_held=2)
        await gate.close()
        t1 = asyncio.create_task(gate.admit())
        t2 = asyncio.create_task(gate.admit())
        await spin()
        assert gate.held == 2
        t1.cancel()
        await spin()
        assert gate.held == 1
        gate.open()
        await t2
        assert gate.inflight == 1
        gate.leave()
        assert gate.inflight == 0
        await gate.close()  # nothing in flight: returns at once
        gate.open()


async def test_released_but_cancelled_request_is_not_left_in_flight() -> None:
    async with asyncio.timeout(TIMEOUT):
        gate = Gate()
        await gate.close()
        t = asyncio.create_task(gate.admit())
        await spin()
        gate.open()  # counted in flight, but the task has not run yet
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert gate.inflight == 0 and gate.held == 0


def test_gate_rejects_a_negative_bound() -> None:
    with pytest.raises(ConfigError):
        Gate(max_held=-1)


@pytest.mark.parametrize("make", ARRAYS)
async def test_request_spanning_a_suspended_node_completes_after_resume(make: Maker) -> None:
    async with asyncio.timeout(TIMEOUT):
        a, b = MemoryDevice(NODE), MemoryDevice(NODE)
        arr, (_, mb) = await make(a, b)
        await mb.suspend()
        off = NODE - 1024 if make is linear else CHUNK - 1024  # crosses from a into b
        task = asyncio.create_task(arr.write(off, b"\x33" * 2048))
        await spin()
        assert not task.done() and mb.held == 1
        assert await arr.read(off, 1024) == b"\x33" * 1024  # a's piece is already applied
        mb.resume()
        await task
        assert await arr.read(off, 2048) == b"\x33" * 2048


async def test_health_reports_an_inner_failure_over_suspended() -> None:
    async with asyncio.timeout(TIMEOUT):
        (m,) = members(MemoryDevice(NODE))

        class Failed(MemoryDevice):
            def health(self) -> Health:
                return Health("failed", {"why": "gone"})

        await m.suspend()
        assert m.health().state == "suspended"
        m.swap_inner(Failed(NODE))
        h = m.health()
        assert h.state == "failed" and h.detail == {"why": "gone", "suspended": True, "held": 0}
        m.resume()
        assert m.health().detail["suspended"] is False
