"""The memory budget (dst.net.budget): greedy and hostile clients are bounded in bytes,
in connections and in time, and the other clients keep being served with their data
intact."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dst.nbd.constants import Cmd
from dst.net.address import Address
from dst.net.budget import Budget
from dst.net.client import NbdClient
from dst.net.server import NbdServer
from dst.net.transmission import Transmission
from dst.targets.memory import MemoryDevice
from tests.support.fastpath import MappedFile, memoryish, until
from tests.support.rawnbd import closed, go, raw, request, simple_reply

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture(params=["callback", "inline", "compiled"])
async def served(
    sock_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[NbdServer, Address, Budget]]:
    """A 64 MiB export with a small budget: 32 MiB in all, 8 MiB per connection; its
    device served by its callback faces, inline (as a file is) or by the compiled inline
    runs (a file)."""
    budget = Budget(32 * MiB, per_connection=8 * MiB)
    dev = await memoryish(request.param, SIZE, sock_dir)
    dev.data[:] = os.urandom(SIZE)
    server = NbdServer(dev, budget=budget, max_connections=6, stall_timeout=1.0)
    (address,) = await server.start(f"unix:{sock_dir / 'b.sock'}")
    try:
        yield server, address, budget
    finally:
        await server.close(timeout=5)
        await dev.close()


def transmissions(server: NbdServer) -> list[Transmission]:
    return [c.tx for c in server.connections if c.tx is not None]


def rss() -> int:
    """This process's resident memory now (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def good_client(address: Address, rounds: int) -> float:
    """Writes and verifies 64 KiB blocks; returns the worst round trip (seconds)."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    async with await NbdClient.connect(address) as c:
        for i in range(rounds):
            offset = (i % 64) * 65536 + 32 * MiB
            data = os.urandom(65536)
            t = loop.time()
            await c.write(offset, data)
            assert await c.read(offset, 65536) == data
            worst = max(worst, loop.time() - t)
    return worst


async def test_a_reader_that_never_reads_holds_at_most_its_share(
    served: tuple[NbdServer, Address, Budget],
) -> None:
    server, address, budget = served
    async with raw(address) as (r, w):
        await go(r, w)
        # 64 READs of 4 MiB (256 MiB) in one write, and their replies never read
        w.write(b"".join(request(Cmd.READ, i, 0, 4 * MiB) for i in range(64)))
        await w.drain()
        await until(
            lambda: any(t.write_paused for t in transmissions(server)),
            "backpressure",
        )
        worst = await good_client(address, 50)  # served meanwhile, data verified
        assert budget.peak <= budget.per_connection + 4 * MiB, budget.peak  # its share
        assert worst < 10, worst  # generous: a loaded CI machine
    await until(lambda: budget.used == 0, "everything to be given back")


async def test_greedy_clients_share_the_process_budget_with_a_modest_one(
    served: tuple[NbdServer, Address, Budget],
) -> None:
    server, address, budget = served
    dev = server.exports[""]
    assert isinstance(dev, MemoryDevice | MappedFile)
    async with raw(address) as (r1, w1), raw(address) as (r2, w2), raw(address) as (r3, w3):
        for r, w in ((r1, w1), (r2, w2), (r3, w3)):
            await go(r, w)
            w.write(b"".join(request(Cmd.READ, i, i * MiB, 8 * MiB) for i in range(16)))
        await good_client(address, 20)
        assert budget.peak <= budget.limit, budget.peak
        # a greedy client that does read gets everything it asked for, intact
        for _ in range(16):
            handle, error = await simple_reply(r1)
            assert error == 0
            data = await r1.readexactly(8 * MiB)
            assert data == dev.data[handle * MiB : handle * MiB + 8 * MiB]


async def test_a_header_announcing_32_mib_costs_nothing_until_the_bytes_come(
    served: tuple[NbdServer, Address, Budget],
) -> None:
    server, address, budget = served
    before = rss()
    conns = []
    for i in range(5):
        cm = raw(address)
        r, w = await cm.__aenter__()
        conns.append(cm)
        await go(r, w)
        w.write(request(Cmd.WRITE, i, 0, 32 * MiB) + b"x" * 1000)
        await w.drain()
    await until(lambda: sum(t.holds.pending for t in transmissions(server)) == 5000, "payloads")
    grown = rss() - before
    assert grown < 64 * MiB, f"{grown} bytes"  # 5 x 32 MiB announced, kilobytes arrived
    assert budget.used == 5000
    await good_client(address, 5)
    # stalled payloads are dropped after stall_timeout, and their bytes given back
    await until(lambda: not any(t.holds.pending for t in transmissions(server)), "the drop")
    assert budget.used == 0
    for cm in conns:
        await cm.__aexit__(None, None, None)


async def test_a_client_that_stops_reading_is_dropped_after_the_stall_timeout(
    served: tuple[NbdServer, Address, Budget],
) -> None:
    _, address, budget = served
    async with raw(address) as (r, w):
        await go(r, w)
        w.write(b"".join(request(Cmd.READ, i, 0, 4 * MiB) for i in range(8)))
        await until(lambda: budget.used > 0, "replies to pile up")
        assert await asyncio.wait_for(_drained_then_closed(r), 30)
    await until(lambda: budget.used == 0, "its bytes given back")


async def _drained_then_closed(r: asyncio.StreamReader) -> bool:
    """Wait without reading for the server to give up, then see the end of stream."""
    while True:
        await asyncio.sleep(0.2)
        if r.at_eof() or r._transport.is_closing():  # type: ignore[attr-defined]
            return True
        data = await asyncio.wait_for(r.read(1 << 26), 30)  # drain what was sent
        if not data:
            return True


async def test_connections_beyond_the_limit_are_refused_and_others_go_on(
    served: tuple[NbdServer, Address, Budget],
) -> None:
    server, address, _ = served
    cms = [raw(address) for _ in range(6)]
    pairs = [await cm.__aenter__() for cm in cms]
    for r, _ in pairs:
        await r.readexactly(18)  # greeted: accepted
    async with raw(address) as (r, _w):
        assert await closed(r)  # the seventh is closed at once
    assert server.refused == 1
    await cms[0].__aexit__(None, None, None)
    await until(lambda: len(server.connections) == 5, "a slot to free")
    await good_client(address, 3)  # takes the freed slot
    for cm in cms[1:]:
        await cm.__aexit__(None, None, None)
