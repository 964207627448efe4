"""RemoteDevice reconnects with backoff and replays requests across short outages.

A real NbdServer over a MemoryDevice on a unix socket, reached through a
CuttableProxy whose cut() drops the connection and refuses new ones until
restore().  Data is checked on the MemoryDevice itself.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dst.errors import BlockError
from dst.net.address import Address, parse_address
from dst.net.client import NbdClient
from dst.net.server import NbdServer
from dst.targets.memory import MemoryDevice
from dst.targets.reconnect import backoff_delay
from dst.targets.remote import RemoteDevice
from tests.support.fastpath import Completion, Disk, submit, until
from tests.support.proxy import CuttableProxy

SIZE = 4 << 20
BLOCK = 64 << 10


@dataclass
class Rig:
    memory: MemoryDevice
    server: NbdServer
    proxy: CuttableProxy
    node: str  # the node's own socket
    address: Address  # the proxy's


@pytest.fixture
async def rig(sock_dir: Path) -> AsyncIterator[Rig]:
    memory = MemoryDevice(SIZE)
    server = NbdServer(memory)
    node = f"{sock_dir}/node.sock"
    await server.start(parse_address(f"unix:{node}"))
    proxy = CuttableProxy(f"{sock_dir}/proxy.sock", node)
    await proxy.start()
    try:
        yield Rig(memory, server, proxy, node, parse_address(f"unix:{sock_dir}/proxy.sock"))
    finally:
        await proxy.close()
        await server.close(timeout=5)


def remote(address: Address, io_timeout: float | None, **kw: float) -> RemoteDevice:
    return RemoteDevice(
        address,
        name="node2",
        reconnect=True,
        io_timeout=io_timeout,
        backoff_min=kw.get("backoff_min", 0.01),
        backoff_max=kw.get("backoff_max", 0.1),
        rng=random.Random(7),
    )


def pattern(writer: int, generation: int, block: int) -> bytes:
    return random.Random(f"{writer}/{generation}/{block}").randbytes(BLOCK)


async def test_writers_see_no_error_across_a_one_second_cut(rig: Rig) -> None:
    dev = remote(rig.address, io_timeout=5.0)
    await dev.open()
    events: list[bool] = []
    dev.subscribe(events.append)
    writers, per_writer = 4, SIZE // 4 // BLOCK
    expected: dict[int, bytes] = {}
    done = [0] * writers
    stop = asyncio.Event()
    stalls: list[float] = []

    async def writer(w: int) -> None:
        gen = 0
        while not stop.is_set():
            gen += 1
            for b in range(per_writer):
                off = (w * per_writer + b) * BLOCK
                data = pattern(w, gen, b)
                t0 = time.monotonic()
                await dev.write(off, data)
                if b % 8 == 0:
                    assert await dev.read(off, BLOCK) == data
                if b % 16 == 15:
                    await dev.flush()
                stalls.append(time.monotonic() - t0)
                expected[off] = data
                done[w] += 1

    async with asyncio.timeout(60):
        tasks = [asyncio.create_task(writer(w)) for w in range(writers)]
        await until(lambda: min(done) >= 10, "writers to get going")
        rig.proxy.cut()
        await until(lambda: dev.health().state == "reconnecting", "the loss to be seen")
        before = list(done)
        await asyncio.sleep(1.0)  # the outage itself
        assert done == before, "writes completed while the node was cut off"
        health = dev.health()
        assert health.detail["attempts"] >= 3 and health.detail["down_since"] >= 0.9
        rig.proxy.restore()
        await until(lambda: min(done) >= before[0] + per_writer, "writers to go on")
        stop.set()
        await asyncio.gather(*tasks)  # any BlockError surfaces here
    await dev.flush()
    for off, data in expected.items():
        assert rig.memory.data[off : off + BLOCK] == data, f"block at {off} lost"
    assert len(expected) == writers * per_writer
    assert events == [False, True]
    assert rig.proxy.connections == 2
    assert dev.health().state == "connected"
    assert 0.9 < max(stalls) < 3.0  # the writes caught by the cut waited for it, no longer
    await dev.close()


async def test_io_timeout_zero_fails_at_once_then_reconnects(rig: Rig) -> None:
    dev = remote(rig.address, io_timeout=0.0)
    await dev.open()
    up = asyncio.Event()
    dev.subscribe(lambda ok: up.set() if ok else None)
    await dev.write(0, b"before")
    rig.proxy.cut()
    for _ in range(2):  # the in-flight loss, then a request while reconnecting
        t0 = time.monotonic()
        with pytest.raises(BlockError) as info:
            await dev.write(0, b"during")
        assert info.value.errno == errno.EIO
        assert time.monotonic() - t0 < 0.5
        assert "node2: not connected to" in info.value.message
        assert "(reconnecting)" in info.value.message
    rig.proxy.restore()
    async with asyncio.timeout(10):
        await up.wait()
    await dev.write(0, b"after!")
    assert rig.memory.data[:6] == b"after!"
    await dev.close()


async def test_outage_longer_than_io_timeout_is_etimedout(rig: Rig) -> None:
    dev = remote(rig.address, io_timeout=0.5)
    await dev.open()
    rig.proxy.cut()
    t0 = time.monotonic()
    with pytest.raises(BlockError) as info:
        await dev.read(0, 512)
    waited = time.monotonic() - t0
    assert info.value.errno == errno.ETIMEDOUT
    assert 0.45 < waited < 2.0
    msg = info.value.message
    assert "node2" in msg and rig.address.uri() in msg and "waited 0.5s" in msg, msg
    rig.proxy.restore()
    async with asyncio.timeout(10):
        await dev.write(4096, b"back")  # waits for the reconnect in progress
    assert rig.memory.data[4096:4100] == b"back"
    await dev.close()


async def test_subscribers_hear_loss_and_return_and_may_fail(rig: Rig) -> None:
    dev = remote(rig.address, io_timeout=5.0)
    await dev.open()
    seen: list[bool] = []

    def broken(up: bool) -> None:
        raise RuntimeError("listener bug")

    dev.subscribe(broken)
    unsubscribe = dev.subscribe(seen.append)
    rig.proxy.cut()
    pending = asyncio.create_task(dev.write(0, b"x" * 4096))
    await until(lambda: seen == [False], "the loss to be announced")
    rig.proxy.restore()
    async with asyncio.timeout(10):
        await pending
    assert seen == [False, True]
    assert rig.memory.data[:4096] == b"x" * 4096
    unsubscribe()
    unsubscribe()  # idempotent
    rig.proxy.cut()
    rig.proxy.restore()
    async with asyncio.timeout(10):
        await dev.write(0, b"y")
    assert seen == [False, True]
    await dev.close()


def test_backoff_is_bounded_exponential_full_jitter() -> None:
    rng = random.Random(42)
    delays = [
        [backoff_delay(n, low=0.05, high=2.0, rng=rng) for n in range(12)] for _ in range(200)
    ]
    for row in delays:
        for n, d in enumerate(row):
            assert 0.0 <= d <= min(2.0, 0.05 * 2**n)
    means = [sum(row[n] for row in delays) / len(delays) for n in range(12)]
    assert means[0] < means[3] < means[6]  # grows ...
    assert 0.8 < means[11] < 1.2  # ... to the cap, jittered over [0, cap]
    again = random.Random(42)
    assert [backoff_delay(n, low=0.05, high=2.0, rng=again) for n in range(12)] == delays[0]
    assert backoff_delay(10_000, low=0.05, high=2.0, rng=rng) <= 2.0


async def test_reconnect_attempts_follow_the_backoff(rig: Rig) -> None:
    dev = remote(rig.address, io_timeout=0.0, backoff_min=0.05, backoff_max=0.2)
    await dev.open()
    rig.proxy.cut()
    with pytest.raises(BlockError):
        await dev.read(0, 1)
    await asyncio.sleep(1.0)  # let the loop run against a dead node
    attempts = dev.health().detail["attempts"]
    # delays average min(0.2, 0.05*2**n)/2 -> ~0.1 s once capped: 1 s holds ~7-12 attempts
    assert 4 <= attempts <= 30, attempts
    await dev.close()


async def test_close_while_reconnecting_fails_waiters_promptly(rig: Rig) -> None:
    dev = remote(rig.address, io_timeout=30.0)
    await dev.open()
    rig.proxy.cut()
    waiters = [asyncio.create_task(dev.read(i * 512, 512)) for i in range(3)]
    await until(lambda: dev.health().state == "reconnecting", "reconnecting")
    t0 = time.monotonic()
    await dev.close()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert time.monotonic() - t0 < 1.0
    for r in results:
        assert isinstance(r, BlockError) and r.errno == errno.ESHUTDOWN, r
    assert dev.health().state == "disconnected"
    with pytest.raises(BlockError) as info:
        await dev.write(0, b"z")
    assert info.value.errno == errno.ESHUTDOWN


async def test_a_server_of_another_size_is_refused(sock_dir: Path) -> None:
    node = f"{sock_dir}/node.sock"
    first = NbdServer(MemoryDevice(SIZE))
    await first.start(parse_address(f"unix:{node}"))
    dev = remote(parse_address(f"unix:{node}"), io_timeout=0.3, backoff_max=0.05)
    await dev.open()
    await first.close(timeout=5)
    other = NbdServer(MemoryDevice(2 * SIZE))
    await other.start(parse_address(f"unix:{node}"))
    try:
        with pytest.raises(BlockError) as info:
            await dev.read(0, 512)
        assert info.value.errno == errno.ETIMEDOUT
        assert "size changed" in info.value.message
        health = dev.health()
        assert health.state == "reconnecting"
        assert "not the same device" in health.detail["refused"]
    finally:
        await other.close(timeout=5)
    same = MemoryDevice(SIZE)
    same.data[:5] = b"again"
    third = NbdServer(same)
    await third.start(parse_address(f"unix:{node}"))
    try:
        async with asyncio.timeout(10):
            await until(lambda: dev.health().state == "connected", "the right device")
        assert await dev.read(0, 5) == b"again"
    finally:
        await dev.close()
        await third.close(timeout=5)


async def test_without_reconnect_a_loss_is_eio(rig: Rig) -> None:
    dev = RemoteDevice(rig.address, name="node2", io_timeout=5.0)
    await dev.open()
    rig.proxy.cut()
    with pytest.raises(BlockError) as info:
        await dev.read(0, 1)
    assert info.value.errno == errno.EIO
    assert dev.health().state == "disconnected"
    await dev.close()


async def test_replay_when_served_over_nbd(rig: Rig, sock_dir: Path) -> None:
    """Served by an NbdServer (which starts requests outside any task) the wait works too."""
    dev = remote(rig.address, io_timeout=5.0)
    await dev.open()
    front = NbdServer(dev)
    (address,) = await front.start(parse_address(f"unix:{sock_dir}/front.sock"))
    client = await NbdClient.connect(address, "")
    try:
        rig.proxy.cut()
        probe = asyncio.create_task(dev.read(0, 1))  # finds the loss
        await until(lambda: dev.health().state == "reconnecting", "the loss to be seen")
        pending = asyncio.create_task(client.write(8192, b"through two hops"))
        await until(lambda: dev.health().detail["waiting"] == 2, "the served write to wait")
        rig.proxy.restore()
        async with asyncio.timeout(10):
            await asyncio.gather(probe, pending)
        assert rig.memory.data[8192:8208] == b"through two hops"
        assert await client.read(8192, 16) == b"through two hops"
    finally:
        await client.close()
        await front.close(timeout=5)
        await dev.close()


# -- the callback fast path -----------------------------------------------------------------------


async def test_remote_replays_a_request_caught_by_a_connection_loss(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    server, address, disk = served
    r = remote(address, io_timeout=5)
    await r.open()
    data = os.urandom(8192)
    await submit(r, "write", 0, data, False)
    assert disk.data[:8192] == data
    disk.hang = True
    done = Completion()
    assert r.submit_read(0, 8192, done) is not None
    await until(lambda: len(disk.taken) == 2, "the read at the server")
    disk.hang = False
    for conn in list(server.connections):
        conn.abort()
    assert await done.result() == data  # replayed on the new connection
    assert len(disk.taken) == 3
    await submit(r, "write", 8192, data, False)  # and the fast path is back
    assert disk.data[8192 : 2 * 8192] == data
    await r.close()


async def test_remote_without_waiting_fails_a_lost_request_with_eio(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    server, address, disk = served
    r = RemoteDevice(address, name="node")  # no reconnect: fail at once
    await r.open()
    disk.hang = True
    done = Completion()
    assert r.submit_write(0, b"e" * 4096, False, done) is not None
    await until(lambda: len(disk.taken) == 1, "the write at the server")
    for conn in list(server.connections):
        conn.abort()
    exc, _ = await done.wait()
    assert isinstance(exc, BlockError) and exc.errno == errno.EIO
    assert r.submit_read(0, 4096, Completion()) is None  # no connection: not taken
    await r.close()


async def test_remote_cancel_reaches_the_replay(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    """The canceller a remote member returned must still work once the request went on
    as a replay waiting for a reconnect (the device contract: ``done`` comes soon)."""
    server, address, disk = served
    r = remote(address, io_timeout=10)
    await r.open()
    ups: list[bool] = []
    r.subscribe(ups.append)
    disk.hang = True
    done = Completion()
    cancel = r.submit_read(0, 4096, done)
    assert cancel is not None
    await until(lambda: len(disk.taken) == 1, "the read at the server")
    await server.close(timeout=0)  # gone for good: the replay waits for a reconnect
    await until(lambda: ups == [False], "the loss to be noticed")
    assert done.calls == []
    cancel()
    try:
        exc, _ = await done.wait(timeout=1)
        assert isinstance(exc, asyncio.CancelledError)
    finally:
        await r.close()
