"""dst's NBD server and client together over a unix socket."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dst.device import Buffer, Cancel, Done, Extent, no_cancel
from dst.errors import BlockError, ServerRefused
from dst.nbd.constants import CmdFlags, TransmissionFlags
from dst.net.address import Address
from dst.net.client import ConnectionLost, NbdClient, list_exports
from dst.net.edge import allowed_flags
from dst.net.server import NbdServer
from dst.targets.memory import MemoryDevice
from tests.support.fastpath import Memoryish

pytestmark = pytest.mark.timeout(30)


class SlowDevice(MemoryDevice):
    """Reads sleep a little, varying by offset, so replies come back out of order."""

    async def read(self, offset: int, length: int) -> Buffer:
        await asyncio.sleep((offset // 4096 % 7) / 1000)
        return await super().read(offset, length)


class GatedDevice(MemoryDevice):
    """Reads wait for ``gate``; ``active``/``peak`` count concurrent reads."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()
        self.active = 0
        self.peak = 0
        self.entered = asyncio.Event()

    async def read(self, offset: int, length: int) -> Buffer:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.entered.set()
        try:
            await self.gate.wait()
        finally:
            self.active -= 1
        return await super().read(offset, length)


class InlineDevice(GatedDevice):
    """Writes inline (``BlockDevice.write_now``), counting them; one at ``bad`` fails."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.inline = 0
        self.bad = -1

    def read_now(self, offset: int, length: int) -> Buffer | None:
        if offset == self.bad:
            raise BlockError(errno.EIO, "cannot read here")
        if not self.gate.is_set():
            return None  # not now: the gated coroutine
        self.inline += 1
        return bytes(self.data[offset : offset + length])

    def write_now(self, offset: int, data: Buffer) -> bool:
        if offset == self.bad:
            raise BlockError(errno.ENOSPC, "no room here")
        self.data[offset : offset + len(data)] = data
        self.inline += 1
        return True


class HoleyDevice(MemoryDevice):
    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        half = length // 2
        return [Extent(half), Extent(1, hole=True), Extent(length, hole=True, zero=True)]


class ShortDevice(MemoryDevice):
    """Its fast-path reads deliver one byte fewer than asked (a broken device)."""

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        done(None, bytes(self.data[offset : offset + length - 1]))
        return no_cancel


async def serve(sock_dir: Path, exports: dict[str, MemoryDevice], **kw: Any) -> NbdServer:
    server = NbdServer(exports, **kw)
    await server.start(f"unix:{sock_dir / 's.sock'}")
    return server


async def test_every_command(nbd_memory: tuple[NbdServer, Address, Memoryish]) -> None:
    _, address, device = nbd_memory
    async with await NbdClient.connect(address) as c:
        assert c.size == device.size and c.structured and c.context_id
        caps = c.caps
        assert caps.trim and caps.fua and caps.flush and caps.multi_conn and caps.fast_zero
        data = os.urandom(64 << 10)
        await c.write(4096, data, fua=True)
        assert device.data[4096 : 4096 + len(data)] == data
        assert await c.read(4096, len(data)) == data
        await c.flush()
        await c.write_zeroes(4096, 8192, fua=True)
        await c.write_zeroes(4096 + 8192, 100, punch=True, fast=True)
        assert await c.read(4096, 8292) == bytes(8292)
        await c.trim(0, 4096, fua=True)
        await c.cache(0, 1 << 20)
        assert await c.block_status(0, 1 << 20) == [Extent(1 << 20)]
        assert await c.block_status(0, 1 << 20, req_one=True) == [Extent(1 << 20)]
        # a read larger than max_block is split by the client
        c.max_block = 16 << 10
        assert await c.read(4096 + 8292, 40000) == bytes(data[8292 : 8292 + 40000])


async def test_edge_validation(nbd_memory: tuple[NbdServer, Address, Memoryish]) -> None:
    _, address, device = nbd_memory
    async with await NbdClient.connect(address) as c:
        cases = [
            (c.read(device.size - 10, 20), errno.EINVAL),
            (c.write(device.size, b"x"), errno.ENOSPC),
            (c.write_zeroes(device.size - 1, 2), errno.ENOSPC),
            (c.trim(device.size, 1), errno.EINVAL),
            (c.block_status(device.size, 1), errno.EINVAL),
            (c.read(0, 0), errno.EINVAL),
        ]
        for coro, code in cases:
            with pytest.raises(BlockError) as info:
                await coro
            assert info.value.errno == code
        c.max_block = 1 << 30
        with pytest.raises(BlockError) as info:
            await c.read(0, 33 << 20)
        assert info.value.errno == errno.EINVAL
        assert await c.read(0, 4) == bytes(4)  # still usable


async def test_a_short_read_from_the_device_is_an_eio(sock_dir: Path) -> None:
    server = await serve(sock_dir, {"": ShortDevice(1 << 20)})
    (address,) = server.addresses
    try:
        async with await NbdClient.connect(address) as c:
            for _ in range(2):  # the connection goes on
                with pytest.raises(BlockError) as info:
                    await c.read(0, 4096)
                assert info.value.errno == errno.EIO
            await c.write(0, b"x")
    finally:
        await server.close()


def test_allowed_flags_are_plain_ints() -> None:
    """Checked against every request: an IntFlag's operators would run Python code."""
    every = int(TransmissionFlags.SEND_FUA | TransmissionFlags.SEND_DF
                | TransmissionFlags.SEND_FAST_ZERO)  # fmt: skip
    allowed = allowed_flags(every)
    assert all(type(v) is int for v in allowed.values())
    assert allowed[1] == int(CmdFlags.FUA)  # WRITE
    assert allowed[0] == int(CmdFlags.FUA | CmdFlags.DF)  # READ
    assert allowed[6] == int(CmdFlags.FUA | CmdFlags.NO_HOLE | CmdFlags.FAST_ZERO)
    assert allowed_flags(0)[0] == 0


async def test_read_only_and_exports(sock_dir: Path) -> None:
    ro = MemoryDevice(1 << 20, name="ro", read_only=True)
    rw = MemoryDevice(2 << 20, name="rw")
    server = await serve(sock_dir, {"ro": ro, "rw": rw})
    server.default = "rw"
    (address,) = server.addresses
    try:
        assert await list_exports(address) == [("ro", "ro"), ("rw", "rw")]
        async with await NbdClient.connect(address, "ro") as c:
            assert c.caps.read_only
            for coro in (c.write(0, b"x"), c.trim(0, 1), c.write_zeroes(0, 1)):
                with pytest.raises(BlockError) as info:
                    await coro
                assert info.value.errno in (errno.EPERM, errno.ENOTSUP)
        async with await NbdClient.connect(address) as c:
            assert c.size == 2 << 20
        with pytest.raises(ServerRefused, match="nope"):
            await NbdClient.connect(address, "nope")
        rw.size = 3 << 20  # exports may grow between connections
        async with await NbdClient.connect(address, "rw") as c:
            assert c.size == 3 << 20
    finally:
        await server.close()


async def test_pipelining_out_of_order(sock_dir: Path) -> None:
    device = SlowDevice(4 << 20)
    device.data[:] = os.urandom(len(device.data))
    server = await serve(sock_dir, {"": device})
    try:
        async with await NbdClient.connect(server.addresses[0]) as c:
            offsets = [random.randrange(0, (4 << 20) - 4096) for _ in range(400)]
            reads = await asyncio.gather(*(c.read(o, 4096) for o in offsets))
            for o, got in zip(offsets, reads, strict=True):
                assert got == device.data[o : o + 4096]
            blobs = [os.urandom(512) for _ in range(300)]
            await asyncio.gather(*(c.write(i * 512, b) for i, b in enumerate(blobs)))
            assert device.data[: 300 * 512] == b"".join(blobs)
    finally:
        await server.close()


async def test_backpressure_bounds_inflight(sock_dir: Path) -> None:
    device = GatedDevice(1 << 20)
    server = await serve(sock_dir, {"": device}, max_inflight=4)
    try:
        async with await NbdClient.connect(server.addresses[0]) as c:
            reads = [asyncio.ensure_future(c.read(i * 512, 512)) for i in range(50)]
            await device.entered.wait()
            for _ in range(20):  # let the loop deliver whatever the server would take
                await asyncio.sleep(0)
            assert device.active == 4
            device.gate.set()
            assert all(r == bytes(512) for r in await asyncio.gather(*reads))
            assert device.peak == 4
    finally:
        await server.close()


async def test_inline_writes_keep_the_order_and_answer_errors(sock_dir: Path) -> None:
    """A device that writes inline gets every plain WRITE that came whole (small ones
    here: a request of a few hundred bytes is never split between receives)."""
    device = InlineDevice(1 << 20)
    device.gate.set()  # reads go at once
    device.data[:512] = b"o" * 512
    server = await serve(sock_dir, {"": device})
    try:
        async with await NbdClient.connect(server.addresses[0]) as c:
            # sent together, a READ then a WRITE of the same block: served in that order
            old, _ = await asyncio.gather(c.read(0, 512), c.write(0, b"n" * 512))
            assert old == b"o" * 512 and device.data[:512] == b"n" * 512
            _, new = await asyncio.gather(c.write(0, b"m" * 512), c.read(0, 512))
            assert new == b"m" * 512
            n = device.inline
            await c.write(1024, b"i" * 512)
            assert device.inline == n + 1 and device.data[1024:1536] == b"i" * 512
            assert await c.read(1024, 512) == b"i" * 512 and device.inline == n + 2
            await c.write(2048, b"f" * 512, fua=True)  # FUA: the request path
            assert device.inline == n + 2 and device.data[2048:2560] == b"f" * 512
            device.bad = 4096
            with pytest.raises(BlockError) as info:
                await c.write(4096, b"x" * 512)
            assert (info.value.errno, info.value.message) == (errno.ENOSPC, "no room here")
            with pytest.raises(BlockError) as info:
                await c.read(4096, 512)
            assert (info.value.errno, info.value.message) == (errno.EIO, "cannot read here")
            with pytest.raises(BlockError) as info:  # beyond the end: the edge's answer
                await c.write(device.size - 1, b"zz")
            assert info.value.errno == errno.ENOSPC and device.inline == n + 2
            await c.write(0, b"y" * 10)  # the connection goes on
            assert device.inline == n + 3 and device.data[:11] == b"y" * 10 + b"m"
    finally:
        await server.close()


async def test_clean_shutdown(sock_dir: Path) -> None:
    device = InlineDevice(1 << 20)
    device.data[:4] = b"abcd"
    server = await serve(sock_dir, {"": device})
    c = await NbdClient.connect(server.addresses[0])
    inflight = asyncio.ensure_future(c.read(0, 4))
    await device.entered.wait()
    closing = asyncio.ensure_future(server.close(timeout=10))
    await asyncio.sleep(0)  # let close() run its synchronous part
    assert server.closing
    with pytest.raises(BlockError) as info:
        await c.read(0, 4)
    assert info.value.errno == errno.ESHUTDOWN
    with pytest.raises(BlockError) as info:  # not written inline either
        await c.write(0, b"x")
    assert info.value.errno == errno.ESHUTDOWN and device.data[:4] == b"abcd"
    assert not closing.done()
    device.gate.set()
    assert await inflight == b"abcd"
    await closing
    with pytest.raises(ConnectionLost):
        await c.read(0, 4)
    await c.close()


async def test_timeout_and_connection_loss(sock_dir: Path) -> None:
    device = GatedDevice(1 << 20)
    server = await serve(sock_dir, {"": device})
    try:
        c = await NbdClient.connect(server.addresses[0], request_timeout=0.2)
        with pytest.raises(BlockError) as info:
            await c.read(0, 512)
        assert info.value.errno == errno.ETIMEDOUT
        device.entered.clear()
        pending = asyncio.ensure_future(c.read(0, 512))
        await device.entered.wait()
        for conn in list(server.connections):
            conn.abort()
        with pytest.raises(ConnectionLost):
            await pending
        assert not c.connected
        await c.close()
    finally:
        device.gate.set()
        await server.close()


async def test_block_status_clipping(sock_dir: Path) -> None:
    server = await serve(sock_dir, {"": HoleyDevice(1 << 20)})
    try:
        async with await NbdClient.connect(server.addresses[0]) as c:
            assert await c.block_status(0, 8192) == [
                Extent(4096),
                Extent(1, hole=True),
                Extent(4095, hole=True, zero=True),
            ]
            assert await c.block_status(0, 8192, req_one=True) == [Extent(4096)]
    finally:
        await server.close()


async def test_tcp_port_zero() -> None:
    server = NbdServer({"": MemoryDevice(1 << 20)})
    (address,) = await server.start("127.0.0.1:0")
    try:
        assert address.port != 0
        async with await NbdClient.connect(address) as c:
            await c.write(0, b"tcp")
            assert await c.read(0, 3) == b"tcp"
    finally:
        await server.close()


def test_under_uvloop(sock_dir: Path) -> None:
    from dst.net.loop import run

    async def main() -> bytes:
        device = MemoryDevice(1 << 20)
        server = await serve(sock_dir, {"": device})
        try:
            async with await NbdClient.connect(server.addresses[0]) as c:
                await asyncio.gather(*(c.write(i * 4096, bytes([i]) * 4096) for i in range(64)))
                return bytes(await c.read(0, 64 * 4096))
        finally:
            await server.close()

    assert run(main()) == b"".join(bytes([i]) * 4096 for i in range(64))


def test_run_collects_the_young_generation_less_often() -> None:
    """The process shell sets the young generation's threshold (dst.net.loop): a
    request's short-lived objects are freed by reference counting, so a collection
    every 700 allocations cost 3 % of a mirrored write for nothing."""
    import gc

    from dst.net.loop import GC_YOUNG, run

    async def main() -> int:
        return gc.get_threshold()[0]

    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])  # Python's default
    try:
        assert run(main()) == GC_YOUNG
    finally:
        gc.set_threshold(*before)
