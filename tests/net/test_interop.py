"""Interop: real NBD clients against dst's server, dst's client against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from dst.errors import BlockError
from dst.net.address import Address
from dst.net.client import NbdClient, list_exports
from dst.net.server import NbdServer
from dst.targets.memory import MemoryDevice
from tests.support.fastpath import Memoryish

pytestmark = pytest.mark.timeout(60)

# nbdsh is a python3 script using the distribution's python3 (where the nbd module is).
ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv[0]} failed: {err.decode()}"
    return out.decode()


async def test_nbdinfo(nbd_memory: tuple[NbdServer, Address, Memoryish]) -> None:
    need("nbdinfo")
    server, address, device = nbd_memory
    server.set_export("second", MemoryDevice(1 << 20, name="the second"))
    info = json.loads(await run("nbdinfo", "--json", address.uri()))
    (export,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed" and info["structured"]
    assert export["export-size"] == device.size
    assert export["contexts"] == ["base:allocation"]
    assert export["can_multi_conn"] and export["can_fua"] and export["can_trim"]
    assert export["block_size_maximum"] == 32 << 20
    listing = json.loads(await run("nbdinfo", "--json", "--list", address.uri()))
    names = {e["export-name"]: e.get("description") for e in listing["exports"]}
    assert names == {"": "memory", "second": "the second"}
    extents = await run("nbdinfo", "--map", address.uri())
    assert extents.split()[:2] == ["0", str(device.size)]


NBDSH_SCRIPT = """
import os
data = os.urandom(1 << 20)
h.pwrite(data, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(len(data), 4096) == data
h.flush()
h.zero(8192, 4096, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 4096) == bytes(8192)
h.trim(4096, 0)
h.cache(4096, 0)
seen = []
h.block_status(65536, 0, lambda meta, off, ents, err: seen.append((meta, ents)))
assert seen[0][0] == "base:allocation" and sum(seen[0][1][0::2]) == 65536
# many requests in flight at once
for i in range(64):
    h.aio_pread(nbd.Buffer(512), i * 512)
while h.aio_in_flight() > 0:
    h.poll(-1)
try:
    h.pread(4096, h.get_size() - 1)
except nbd.Error as e:
    assert e.errno is not None
else:
    raise AssertionError("read past the end succeeded")
print("ok", h.get_structured_replies_negotiated(), h.can_multi_conn())
"""


async def test_nbdsh(nbd_memory: tuple[NbdServer, Address, Memoryish]) -> None:
    need("nbdsh")
    _, address, device = nbd_memory
    out = await run("nbdsh", "--base-allocation", "-u", address.uri(), "-c", NBDSH_SCRIPT)
    assert out.split() == ["ok", "True", "True"]
    assert device.data[8192 : 8192 + 4096] == bytes(4096)


async def test_nbdsh_tcp_without_structured_replies() -> None:
    need("nbdsh")
    device = MemoryDevice(1 << 20)
    device.data[:5] = b"hello"
    server = NbdServer(device)
    (address,) = await server.start("127.0.0.1:0")
    script = (
        "h.set_request_structured_replies(False)\n"
        f"h.connect_uri({address.uri()!r})\n"
        "assert h.pread(5, 0) == b'hello'\n"
        "h.pwrite(b'world', 5)\n"
        "print(h.get_structured_replies_negotiated())\n"
    )
    try:
        assert (await run("nbdsh", "-c", script)).strip() == "False"
        assert device.data[:10] == b"helloworld"
    finally:
        await server.close()


async def _exercise(client: NbdClient) -> None:
    data = os.urandom(3 << 20)  # longer than one chunk, spans receive buffers
    await client.write(1 << 20, data, fua=True)
    assert await client.read(1 << 20, len(data)) == data
    reads = await asyncio.gather(*(client.read((1 << 20) + i * 4096, 4096) for i in range(200)))
    assert b"".join(reads) == data[: 200 * 4096]
    await client.flush()
    await client.write_zeroes(1 << 20, 65536)
    assert await client.read(1 << 20, 65536) == bytes(65536)
    await client.trim(0, 65536)
    extents = await client.block_status(0, 8 << 20)
    assert extents and sum(e.length for e in extents) <= 8 << 20
    with pytest.raises(BlockError):
        await client.read(client.size, 512)


def _listening(path: Path) -> bool:
    """True once a connection to the unix socket succeeds (the file appears earlier)."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


async def _wait_for_socket(path: Path, proc: asyncio.subprocess.Process) -> None:
    """Poll for an external server's socket (it has no readiness notification)."""
    for _ in range(200):
        if _listening(path):
            return
        if proc.returncode is not None:
            raise AssertionError("server exited early")
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


async def _server_proc(argv: list[str], sock: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*argv, env=ENV)
    await _wait_for_socket(sock, proc)
    return proc


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
    await proc.wait()


async def test_client_against_nbdkit_memory(sock_dir: Path) -> None:
    need("nbdkit")
    sock = sock_dir / "k.sock"
    proc = await _server_proc(["nbdkit", "-f", "-U", str(sock), "memory", "64M"], sock)
    try:
        address = Address(path=str(sock))
        async with await NbdClient.connect(address) as c:
            assert c.size == 64 << 20 and c.structured and c.context_id
            await _exercise(c)
        assert [name for name, _ in await list_exports(address)] == [""]
    finally:
        await _stop(proc)


async def test_client_against_nbdkit_file(sock_dir: Path) -> None:
    need("nbdkit")
    image = sock_dir / "disk.img"
    image.write_bytes(bytes(16 << 20))
    sock = sock_dir / "k.sock"
    argv = ["nbdkit", "-f", "-U", str(sock), "file", str(image)]
    proc = await _server_proc(argv, sock)
    try:
        async with await NbdClient.connect(f"nbd+unix:///?socket={sock}") as c:
            await _exercise(c)
            await c.write(0, b"persisted", fua=True)
    finally:
        await _stop(proc)
    assert image.read_bytes()[:9] == b"persisted"


async def test_client_against_qemu_nbd(sock_dir: Path) -> None:
    need("qemu-nbd")
    image = sock_dir / "disk.img"
    image.write_bytes(bytes(16 << 20))
    sock = sock_dir / "q.sock"
    argv = ["qemu-nbd", "-k", str(sock), "-f", "raw", "--persistent", "-e", "4", str(image)]
    proc = await _server_proc(argv, sock)
    try:
        address = Address(path=str(sock))
        async with await NbdClient.connect(address) as c:
            assert c.size == 16 << 20
            await _exercise(c)
            await c.write(0, b"qemu", fua=True)
        async with await NbdClient.connect(address) as c:
            assert await c.read(0, 4) == b"qemu"
    finally:
        await _stop(proc)
