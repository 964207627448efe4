"""The callback fast path (submit_read/submit_write): same data and failure semantics as
the coroutine path, through the mirror, the gates, the NBD client and the file device."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from dst.aio import submit_coro
from dst.device import Buffer, Cancel, Done
from dst.errors import BlockError
from dst.net.address import Address
from dst.net.client import ConnectionLost, NbdClient
from dst.net.server import NbdServer
from dst.targets.file import FileDevice
from dst.targets.gate import GateDevice
from dst.targets.member import Member
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice

pytestmark = pytest.mark.timeout(30)
SIZE = 1 << 20
R = 64 << 10


class Disk(MemoryDevice):
    """Memory with a fast path that completes on the next loop iteration; ``fail``
    makes requests fail with EIO, ``hang`` leaves them pending until cancelled."""

    def __init__(self) -> None:
        super().__init__(SIZE, name="disk")
        self.fail = False
        self.hang = False
        self.taken = 0
        self.cancelled = 0

    def _finish(self, done: Done, value: Any) -> Cancel:
        self.taken += 1
        loop = asyncio.get_running_loop()
        if self.hang:
            state = {"done": False}

            def cancel() -> None:
                if not state["done"]:
                    state["done"] = True
                    self.cancelled += 1
                    done(asyncio.CancelledError(), None)

            return cancel
        if self.fail:
            loop.call_soon(done, BlockError(errno.EIO, "disk failed"), None)
        else:
            loop.call_soon(done, None, value)
        return lambda: None

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        if not self.fail and not self.hang:
            self.data[offset : offset + len(data)] = data
        return self._finish(done, None)

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        return self._finish(done, bytes(self.data[offset : offset + length]))


async def submit(dev: Any, op: str, *args: Any) -> Any:
    """Submit through the fast path (it must be taken) and wait for ``done``."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def done(exc: BaseException | None, value: Any) -> None:
        assert not fut.done(), "done called twice"
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)

    taken = getattr(dev, f"submit_{op}")(*args, done)
    assert taken is not None, f"submit_{op} not taken"
    return await fut


async def tracked(disks: list[Disk], **kw: Any) -> MirrorDevice:
    m = MirrorDevice(disks, region_size=R, **kw)
    await m.open()
    return m


async def test_tracked_write_reaches_every_leg_once_the_region_is_marked() -> None:
    disks = [Disk(), Disk()]
    m = await tracked(disks)
    data = os.urandom(8192)
    seen: list[Any] = []
    # the first write to a region: its mark is not durable yet, the fast path refuses
    assert m.submit_write(0, data, False, lambda e, v: seen.append(e)) is None
    await m.write(0, data)
    await submit(m, "write", 4096, data, False)
    for d in disks:
        assert d.data[4096 : 4096 + 8192] == data
        assert d.taken == 1
    assert [leg.inflight for leg in m.legs] == [0, 0]
    assert len(m.locks) == 0 and seen == []
    assert await submit(m, "read", 4096, 8192) == data


async def test_a_failing_leg_degrades_and_its_regions_are_recorded() -> None:
    disks = [Disk(), Disk()]
    m = await tracked(disks)
    await m.write(0, bytes(4096))  # mark region 0
    disks[1].fail = True
    data = os.urandom(4096)
    await submit(m, "write", 0, data, False)  # succeeds on leg 0: degraded, not lost
    assert m.legs[1].state is LegState.FAILED
    assert m.intent is not None and m.intent.missing(1) >= 1
    assert disks[0].data[:4096] == data
    assert await m.read(0, 4096) == data  # only leg 0 holds it now


async def test_every_leg_failing_is_an_error_not_a_silent_success() -> None:
    disks = [Disk(), Disk()]
    m = await tracked(disks)
    await m.write(0, bytes(4096))
    for d in disks:
        d.fail = True
    with pytest.raises(BlockError) as e:
        await submit(m, "write", 0, b"x" * 4096, False)
    assert e.value.errno == errno.EIO


async def test_plain_mirror_fails_the_write_and_the_leg() -> None:
    disks = [Disk(), Disk()]
    m = MirrorDevice(disks)
    await m.open()
    missed: list[int] = []
    m.leg_missed = lambda leg, offset, length: missed.append(leg.index)  # type: ignore[method-assign]
    disks[0].fail = True
    with pytest.raises(BlockError):
        await submit(m, "write", 0, b"y" * 4096, False)
    assert m.legs[0].state is LegState.FAILED and missed == [0]
    await submit(m, "write", 4096, b"z" * 4096, False)  # leg 0 is skipped now
    assert missed == [0, 0] and disks[1].data[4096:8192] == b"z" * 4096


async def test_overlapping_writes_are_refused_and_keep_the_legs_identical() -> None:
    disks = [Disk(), Disk()]
    m = await tracked(disks)
    await m.write(0, bytes(8192))
    first = asyncio.ensure_future(submit(m, "write", 0, b"a" * 8192, False))
    await asyncio.sleep(0)  # the first is in flight, holding [0, 8192)
    assert m.submit_write(4096, b"b" * 4096, False, lambda e, v: None) is None
    await asyncio.gather(first, m.write(4096, b"b" * 4096))  # the coroutine path waits
    assert disks[0].data[:8192] == disks[1].data[:8192] == b"a" * 4096 + b"b" * 4096


async def test_a_hung_leg_times_out_is_cancelled_and_the_write_completes() -> None:
    disks = [Disk(), Disk()]
    m = await tracked(disks, leg_timeout=0.2)
    await m.write(0, bytes(4096))
    disks[1].hang = True
    loop = asyncio.get_running_loop()
    start = loop.time()
    await submit(m, "write", 0, b"t" * 4096, False)
    took = loop.time() - start
    assert 0.2 <= took < 0.6, took
    assert m.legs[1].state is LegState.FAILED and "ETIMEDOUT" in m.legs[1].reason
    assert disks[1].cancelled == 1 and m.legs[1].inflight == 0
    assert disks[0].data[:4096] == b"t" * 4096


async def test_a_failed_read_is_retried_and_repaired() -> None:
    disks = [Disk(), Disk()]
    m = await tracked(disks)
    data = os.urandom(4096)
    await m.write(0, data)
    disks[0].data[:4096] = bytes(4096)  # leg 0 will be asked first (rotation starts there)
    m._next = 0
    disks[0].fail = True
    disks[0].write = MemoryDevice.write.__get__(disks[0])  # type: ignore[method-assign]
    assert await submit(m, "read", 0, 4096) == data
    assert disks[0].data[:4096] == data  # the repair rewrote it through the coroutine path


async def test_gates_refuse_while_suspended_and_count_what_they_take() -> None:
    disk = Disk()
    member = Member(disk, name="n0", kind="memory", where="mem")
    root = GateDevice(member)
    await root.open()
    await submit(root, "write", 0, b"c" * 4096, False)
    disk.fail = True
    with pytest.raises(BlockError):
        await submit(root, "write", 0, b"d" * 4096, False)
    c = member.counters
    assert (c.writes, c.write_bytes, c.errors) == (2, 8192, 1)
    assert member.inflight == 0
    await member.suspend()
    assert member.submit_write(0, b"e" * 4096, False, lambda e, v: None) is None
    member.resume()
    await root.suspend()
    assert root.submit_read(0, 4096, lambda e, v: None) is None
    root.resume()
    disk.fail = False
    assert await submit(root, "read", 0, 4096) == b"c" * 4096


async def test_nbd_client_submit_roundtrip_errors_and_connection_loss(sock_dir: Path) -> None:
    device = MemoryDevice(SIZE, read_only=False)
    server = NbdServer({"": device})
    (address,) = await server.start(f"unix:{sock_dir / 's.sock'}")
    assert isinstance(address, Address)
    c = await NbdClient.connect(address)
    data = os.urandom(65536)
    await submit(c, "write", 8192, data, False)
    assert device.data[8192 : 8192 + 65536] == data
    assert await submit(c, "read", 8192, 65536) == data
    with pytest.raises(BlockError) as e:  # beyond the end: the server's error
        await submit(c, "write", SIZE - 4096, b"x" * 8192, False)
    assert e.value.errno == errno.ENOSPC
    # cancel: done comes at once with CancelledError, a late reply is dropped
    got: list[Any] = []
    cancel = c.submit_read(0, 4096, lambda exc, v: got.append(exc))
    assert cancel is not None
    cancel()
    assert len(got) == 1 and isinstance(got[0], asyncio.CancelledError)
    # the connection goes: pending submitted requests fail with ConnectionLost
    pending = asyncio.ensure_future(submit(c, "read", 0, 4096))
    await server.close(timeout=0)
    for conn in list(server.connections):
        conn.abort()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(pending, 5)
    assert c.submit_read(0, 4096, lambda e, v: None) is None  # lost: not taken
    await c.close()


async def test_file_device_submit(tmp_path: Path) -> None:
    f = FileDevice(tmp_path / "f.img", size=SIZE, create=True)
    await f.open()
    data = os.urandom(4096)
    await submit(f, "write", 4096, data, False)
    assert await submit(f, "read", 4096, 4096) == data
    assert (tmp_path / "f.img").read_bytes()[4096:8192] == data
    assert f.submit_write(0, data, True, lambda e, v: None) is None  # FUA: the coroutine
    await f.close()
    ro = FileDevice(tmp_path / "f.img", read_only=True)
    await ro.open()
    assert ro.submit_write(0, data, False, lambda e, v: None) is None
    assert await submit(ro, "read", 4096, 4096) == data
    await ro.close()


async def test_submit_coro_sync_async_and_cancel() -> None:
    got: list[tuple[Any, Any]] = []

    async def now() -> int:
        return 7

    submit_coro(now(), lambda e, v: got.append((e, v)))
    assert got == [(None, 7)]  # finished before submit_coro returned

    async def later() -> int:
        await asyncio.sleep(0.01)
        return 8

    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    submit_coro(later(), lambda e, v: fut.set_result((e, v)))
    assert await fut == (None, 8)

    unwound: list[str] = []

    async def parked() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            unwound.append("finally")

    fut2: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    cancel = submit_coro(parked(), lambda e, v: fut2.set_result(e))
    cancel()  # before the Task took its first step
    assert isinstance(await fut2, asyncio.CancelledError)
    assert unwound == ["finally"]  # the coroutine was unwound, not left parked
