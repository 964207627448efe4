"""Live reconfiguration of a linear array: ``dst add`` while a writer runs loses nothing,
new connections see the grown size, and ``dst remove`` shrinks it back."""

from __future__ import annotations

import asyncio
import struct

import pytest

from dst.net.client import NbdClient
from tests.support.cluster import DST, Cluster, Daemon, remote, run

from .arrays import MiB
from .helpers import nbdsh, require

BLOCK = 64 << 10
WORKERS = 8
ROUNDS_AFTER = 3


def pattern(generation: int, block: int) -> bytes:
    return struct.pack(">QQ", generation, block) * (BLOCK // 16)


def export_size(uri: str) -> int:
    return int(run(["nbdinfo", "--size", uri]).stdout)


@pytest.mark.timeout(60)
async def test_add_while_writing_then_remove(daemon: Daemon, cluster: Cluster) -> None:
    require("nbdinfo", "nbdsh")
    first, second = cluster.node("n0", "8M"), cluster.node("n1", "8M")
    uri = cluster.create("lin", {"type": "linear", "members": [remote("n0", first.uri)]})
    blocks = 8 * MiB // BLOCK
    written: dict[int, int] = {}  # block -> generation last acknowledged
    adding = asyncio.Event()
    added = asyncio.Event()
    during = 0

    async def writer(client: NbdClient, worker: int) -> None:
        nonlocal during
        generation, after = 0, 0
        while after < ROUNDS_AFTER:
            for block in range(worker, blocks, WORKERS):
                await client.write(block * BLOCK, pattern(generation, block))
                written[block] = generation
                if adding.is_set() and not added.is_set():
                    during += 1
            generation += 1
            after += added.is_set()

    async def add() -> None:
        await asyncio.sleep(0)  # let the writers start first
        adding.set()
        proc = await asyncio.create_subprocess_exec(
            *DST, "add", "lin", "--uri", second.uri, "--name", "n1",
            "--control", str(daemon.control),
        )  # fmt: skip
        assert await proc.wait() == 0
        added.set()

    client = await NbdClient.connect(uri)
    try:
        async with asyncio.TaskGroup() as tg:
            for w in range(WORKERS):
                tg.create_task(writer(client, w))
            tg.create_task(add())
        assert during > 0, "no write overlapped the add"
        for block, generation in written.items():
            assert await client.read(block * BLOCK, BLOCK) == pattern(generation, block), block
        await client.flush()
    finally:
        await client.close()
    image = first.path.read_bytes()
    for block, generation in written.items():
        assert image[block * BLOCK : (block + 1) * BLOCK] == pattern(generation, block), block

    assert await asyncio.to_thread(export_size, uri) == 16 * MiB
    script = (
        "data = bytes(range(256)) * 4096\n"
        "h.pwrite(data, 8 * 1024 * 1024)\n"
        "h.flush()\n"
        "assert h.pread(len(data), 8 * 1024 * 1024) == data\n"
        "print('ok')\n"
    )
    assert (await asyncio.to_thread(nbdsh, uri, script)).strip() == "ok"
    assert second.path.read_bytes()[: 1 * MiB] == bytes(range(256)) * 4096
    status = daemon.status("lin")["arrays"][0]
    assert [(k["name"], k["start"]) for k in status["root"]["members"]] == [
        ("n0", 0),
        ("n1", 8 * MiB),
    ]

    await asyncio.to_thread(daemon.dst, "remove", "lin", "n1")
    assert await asyncio.to_thread(export_size, uri) == 8 * MiB
    assert [k["name"] for k in daemon.status("lin")["arrays"][0]["root"]["members"]] == ["n0"]
