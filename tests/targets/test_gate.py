"""The array root (a GateDevice): suspend drains, holds new I/O in order, swap, resume."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Sequence

import pytest

from dst.device import Buffer, Cancel, Done
from dst.errors import BlockError
from dst.targets.gate import GateDevice
from dst.targets.member import Member
from dst.targets.memory import MemoryDevice
from tests.support.fastpath import Completion, Disk, submit


class SlowWrites(MemoryDevice):
    """Writes wait for a gate, so a test controls when they complete."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()
        self.order: list[int] = []

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self.gate.wait()
        self.order.append(offset)
        await super().write(offset, data)


async def test_suspend_waits_for_inflight_and_holds_new_requests() -> None:
    dev = SlowWrites(1 << 20)
    sw = GateDevice(dev)
    first = asyncio.create_task(sw.write(0, b"a" * 512))
    await asyncio.sleep(0)  # let it start and block on the gate
    suspending = asyncio.create_task(sw.suspend())
    await asyncio.sleep(0)
    assert not suspending.done(), "suspend returned with a write in flight"
    dev.gate.set()
    await first
    await suspending
    held = [asyncio.create_task(sw.write(4096 * i, bytes([i]) * 512)) for i in range(1, 5)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert sw.held == 4
    assert dev.order == [0]
    sw.resume()
    await asyncio.gather(*held)
    assert dev.order == [0, 4096, 8192, 12288, 16384]
    assert sw.held == 0


async def test_swap_sends_held_requests_to_the_new_tree() -> None:
    old, new = MemoryDevice(1 << 16), MemoryDevice(1 << 16)
    sw = GateDevice(old)
    await sw.write(0, b"old!")
    await sw.suspend()
    pending = asyncio.create_task(sw.write(0, b"new!"))
    await asyncio.sleep(0)
    assert sw.swap(new) is old
    sw.resume()
    await pending
    assert bytes(old.data[:4]) == b"old!"
    assert bytes(new.data[:4]) == b"new!"
    assert await sw.read(0, 4) == b"new!"


async def test_reconfigure_resumes_even_when_the_change_fails() -> None:
    sw = GateDevice(MemoryDevice(4096))

    def boom() -> None:
        raise RuntimeError("bad change")

    try:
        await sw.reconfigure(boom)
    except RuntimeError:
        pass
    else:  # pragma: no cover - the change must propagate
        raise AssertionError("error swallowed")
    assert not sw.suspended
    await asyncio.wait_for(sw.write(0, b"x"), 1)


async def test_cancelled_suspend_of_the_root_resumes_it() -> None:
    """The root is the one cancel-safe gate: a suspend abandoned while draining (a
    timeout around a reconfiguration) leaves it serving, nothing held for good."""
    dev = SlowWrites(1 << 20)
    sw = GateDevice(dev)
    first = asyncio.create_task(sw.write(0, b"a" * 512))
    await asyncio.sleep(0)
    suspending = asyncio.create_task(sw.suspend())
    await asyncio.sleep(0)
    held = asyncio.create_task(sw.write(4096, b"b" * 512))
    await asyncio.sleep(0)
    assert sw.held == 1
    suspending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await suspending
    assert not sw.suspended
    dev.gate.set()
    await asyncio.wait_for(asyncio.gather(first, held), 5)
    assert dev.order == [0, 4096]
    await asyncio.wait_for(sw.write(8192, b"c"), 5)


async def test_root_bounds_held_requests() -> None:
    sw = GateDevice(MemoryDevice(1 << 16), name="arr", max_held=2)
    await sw.suspend()
    held = [asyncio.create_task(sw.write(0, b"x")) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(BlockError) as err:
        await sw.write(0, b"y")
    assert err.value.errno == errno.EAGAIN and "arr" in err.value.message
    sw.resume()
    await asyncio.gather(*held)


pytestmark = pytest.mark.timeout(30)
SIZE = 1 << 20


# -- gates --------------------------------------------------------------------------------


async def test_member_gate_counts_drains_and_refuses_while_suspended() -> None:
    disk = Disk(SIZE, mode="manual")
    member = Member(disk, name="n0", where="mem")
    await member.open()
    data = os.urandom(8192)
    c = Completion()
    assert member.submit_write(0, data, False, c) is not None
    assert member.inflight == 1
    assert (member.counters.writes, member.counters.write_bytes) == (1, 8192)
    suspending = asyncio.ensure_future(member.suspend())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not suspending.done()  # the drain waits for the fast request too
    assert member.submit_read(0, 4096, Completion()) is None  # suspended: refused
    assert member.counters.reads == 0 and member.inflight == 1
    disk.release()
    await asyncio.wait_for(suspending, 5)
    assert await c.result() is None and member.inflight == 0
    assert disk.data[:8192] == data
    member.resume()
    disk.mode = "async"
    disk.fail_reads = errno.EIO
    c = Completion()
    assert member.submit_read(0, 4096, c) is not None
    exc, _ = await c.wait()
    assert isinstance(exc, BlockError) and exc.errno == errno.EIO
    assert (member.counters.reads, member.counters.errors, member.inflight) == (1, 1, 0)
    disk.fail_reads = 0
    disk.hang = True
    c = Completion()
    cancel = member.submit_read(0, 4096, c)
    assert cancel is not None and member.inflight == 1
    cancel()
    assert isinstance(c.calls[0][0], asyncio.CancelledError)
    assert (member.counters.errors, member.inflight) == (1, 0)  # a cancel is no error
    disk.hang = False
    disk.mode = "refuse"
    assert member.submit_write(0, data, False, Completion()) is None
    assert (member.counters.writes, member.inflight) == (1, 0)  # nothing counted
    disk.mode = "sync"
    assert await submit(member, "read", 0, 8192) == data
    assert member.counters.reads == 3  # the failed and the cancelled one too


async def test_root_switch_refuses_while_suspended_and_drains_fast_requests() -> None:
    disk = Disk(SIZE, mode="manual")
    member = Member(disk, name="n0", where="mem")
    root = GateDevice(member)
    await root.open()
    data = os.urandom(4096)
    c = Completion()
    assert root.submit_write(4096, data, False, c) is not None
    suspending = asyncio.ensure_future(root.suspend())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not suspending.done()
    assert root.submit_write(0, data, False, Completion()) is None
    assert root.submit_read(0, 4096, Completion()) is None
    assert len(disk.taken) == 1
    disk.release()
    await asyncio.wait_for(suspending, 5)
    assert await c.result() is None and disk.data[4096:8192] == data
    root.resume()
    # failures and refusals below give the in-flight count back: suspend returns at once
    disk.mode = "async"
    disk.fail_writes = errno.ENOSPC
    c = Completion()
    assert root.submit_write(0, data, False, c) is not None
    exc, _ = await c.wait()
    assert isinstance(exc, BlockError) and exc.errno == errno.ENOSPC
    disk.mode = "refuse"
    assert root.submit_read(0, 4096, Completion()) is None
    await asyncio.wait_for(root.suspend(), 1)
    root.resume()
    assert member.inflight == 0 and member.counters.errors == 1
    disk.mode = "sync"
    assert await submit(root, "read", 4096, 4096) == data


class GatherDisk(Disk):
    """A disk whose fast path also takes gathered writes (as a remote node's does)."""

    def submit_gather(self, offset: int, parts: Sequence[Buffer], fua: bool, done: Done
                      ) -> Cancel | None:  # fmt: skip
        return self.submit_write(offset, b"".join(parts), fua, done)


async def test_member_gate_passes_gathered_writes_and_counts_them_once() -> None:
    parts = [os.urandom(4096), os.urandom(8192)]
    plain = Member(Disk(SIZE, mode="sync"), name="n0", where="mem")
    await plain.open()
    assert plain.submit_gather(0, parts, False, Completion()) is None  # not taken here
    assert (plain.counters.writes, plain.inflight) == (0, 0)
    disk = GatherDisk(SIZE, mode="async")
    member = Member(disk, name="n1", where="mem")
    await member.open()
    assert await submit(member, "gather", 4096, parts, False) is None
    assert disk.data[4096 : 4096 + 12288] == b"".join(parts)
    assert (member.counters.writes, member.counters.write_bytes, member.inflight) == (1, 12288, 0)
    await member.suspend()
    assert member.submit_gather(0, parts, False, Completion()) is None  # suspended: refused
    member.resume()
