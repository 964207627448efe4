"""The callback fast path (dst.device: submit_read/submit_write) layer by layer, with
data checks: the mirror's fan-out (plain and tracked, degraded, every leg failing,
overlap, leg timeouts, cancel, read repair), the member and root gates, the NBD client
against a real in-process server, the remote member's replay, the file device and
submit_coro.  Legs are :class:`tests.support.fastpath.Disk`: memory whose fast path
completes asynchronously, synchronously, on release, never, or refuses."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.fastpath import Completion, Disk, Mode, submit, until

from dst.aio import submit_coro
from dst.device import no_cancel
from dst.errors import BlockError
from dst.net.address import Address
from dst.net.client import ConnectionLost, NbdClient
from dst.net.server import NbdServer
from dst.targets.file import FileDevice
from dst.targets.gate import GateDevice
from dst.targets.member import Member
from dst.targets.mirror import Leg, LegState, MirrorDevice
from dst.targets.remote import RemoteDevice

pytestmark = pytest.mark.timeout(30)
SIZE = 1 << 20
R = 64 << 10  # region size of the tracked mirrors
ZERO = bytes(R)
TIMEOUT = 0.2  # leg_timeout of the timeout tests
SLACK = 0.15  # scheduling slack on top of the sweeper's 1.25 x leg_timeout


class Plain(MirrorDevice):
    """A plain mirror recording its ``leg_missed`` hook."""

    def __init__(self, disks: list[Disk], **kw: Any) -> None:
        super().__init__(disks, **kw)
        self.missed: list[tuple[int, int, int]] = []

    def leg_missed(self, leg: Leg, offset: int, length: int) -> None:
        self.missed.append((leg.index, offset, length))


def disks(*modes: Mode) -> list[Disk]:
    return [Disk(SIZE, name=f"d{i}", mode=m) for i, m in enumerate(modes)]


async def plain(ds: list[Disk], **kw: Any) -> Plain:
    m = Plain(ds, **kw)
    await m.open()
    return m


async def tracked(ds: list[Disk], **kw: Any) -> MirrorDevice:
    m = MirrorDevice(ds, region_size=R, **kw)
    await m.open()
    return m


def idle(m: MirrorDevice) -> None:
    """Nothing of ``m`` is in flight any more."""
    assert [leg.inflight for leg in m.legs] == [0] * len(m.legs)
    assert len(m.locks) == 0


# -- mirror: writes ----------------------------------------------------------------------

LEG_MODES: list[tuple[Mode, Mode]] = [
    ("async", "async"),
    ("sync", "sync"),
    ("sync", "async"),
    ("async", "refuse"),
    ("refuse", "refuse"),
]


@pytest.mark.parametrize("modes", LEG_MODES)
async def test_plain_write_reaches_every_leg(modes: tuple[Mode, Mode]) -> None:
    ds = disks(*modes)
    m = await plain(ds)
    data = os.urandom(3 * 4096)
    c = Completion()
    assert m.submit_write(8192, data, False, c) is not None
    if modes == ("sync", "sync"):
        assert c.calls == [(None, None)]  # every leg answered at once: so did the mirror
    assert await c.result() is None
    for d, mode, leg in zip(ds, modes, m.legs, strict=True):
        assert d.data[8192 : 8192 + len(data)] == data
        assert d.data[:8192] + d.data[8192 + len(data) : R] == ZERO[len(data) :]
        # a leg without a fast path ran its coroutine instead (submit_coro)
        assert (len(d.taken), d.coro_writes) == ((0, 1) if mode == "refuse" else (1, 0))
        assert (leg.counters.writes, leg.counters.write_bytes) == (1, len(data))
        assert leg.state is LegState.IN_SYNC
    assert m.missed == [] and len(c.calls) == 1
    idle(m)


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_plain_failing_leg_fails_the_write_and_the_leg(mode: Mode) -> None:
    ds = disks(mode, mode)
    m = await plain(ds)
    ds[0].fail_writes = errno.EIO
    data = os.urandom(8192)
    c = Completion()
    assert m.submit_write(4096, data, False, c) is not None
    exc, _ = await c.wait()
    assert isinstance(exc, BlockError) and exc.errno == errno.EIO
    assert m.legs[0].state is LegState.FAILED and m.legs[1].state is LegState.IN_SYNC
    assert m.missed == [(0, 4096, 8192)]
    assert m.legs[0].counters.errors == 1 and m.legs[1].counters.errors == 0
    assert ds[1].data[4096 : 4096 + 8192] == data and ds[0].data[:R] == ZERO
    idle(m)
    # the failed leg gets nothing more: the next write succeeds and the hook hears it
    await submit(m, "write", 0, b"z" * 4096, False)
    assert len(ds[0].taken) == 1 and ds[1].data[:4096] == b"z" * 4096
    assert m.missed == [(0, 4096, 8192), (0, 0, 4096)]
    idle(m)


async def test_tracked_first_write_to_a_region_goes_the_coroutine_way() -> None:
    ds = disks("async", "async")
    m = await tracked(ds)
    intent = m.intent
    assert intent is not None
    bitmap = intent.tracker.bitmap
    data = os.urandom(8192)
    c = Completion()
    # region 0 is not marked yet: refused, and nothing registered or started
    assert m.submit_write(0, data, False, c) is None
    assert c.calls == [] and bitmap.count() == 0 and all(not d.taken for d in ds)
    idle(m)
    await m.write(0, data)  # the coroutine path marks region 0 (durably) first
    assert bitmap.test(0) and [d.coro_writes for d in ds] == [1, 1]
    more = os.urandom(4096)
    await submit(m, "write", 8192, more, False)  # marked: taken
    assert [[r.kind for r in d.taken] for d in ds] == [["write"], ["write"]]
    for d in ds:
        assert d.data[: 8192 + 4096] == data + more
    assert m.submit_write(R, more, False, Completion()) is None  # region 1: not yet
    assert not bitmap.test(1) and [len(d.taken) for d in ds] == [1, 1]
    assert await submit(m, "read", 0, 8192 + 4096) == data + more
    idle(m)


@pytest.mark.parametrize("mode", ["async", "sync", "refuse"])
async def test_tracked_failing_leg_degrades_and_records_its_regions(mode: Mode) -> None:
    ds = disks("async", mode)
    m = await tracked(ds)
    intent = m.intent
    assert intent is not None
    await m.write(0, bytes(4096))  # mark region 0
    ds[1].fail_writes = errno.EIO
    data = os.urandom(4096)
    c = Completion()
    assert m.submit_write(0, data, False, c) is not None
    assert await c.result() is None  # degraded, not lost: leg 0 holds it
    assert m.legs[1].state is LegState.FAILED and "EIO" in m.legs[1].reason
    assert m.legs[0].state is LegState.IN_SYNC and m.health().state == "degraded"
    assert intent.missing(1) >= 1 and intent.missing(0) == 0
    assert m.legs[1].counters.errors == 1
    assert ds[0].data[:4096] == data and ds[1].data[:4096] == bytes(4096)
    idle(m)
    # the failed leg gets no more writes, and no reads
    before = (len(ds[1].taken), ds[1].coro_writes)
    await submit(m, "write", 4096, data, False)
    for _ in range(2):  # whatever the rotation: only leg 0 may serve it
        assert await submit(m, "read", 0, 8192) == data + data
    assert (len(ds[1].taken), ds[1].coro_writes, ds[1].coro_reads) == (*before, 0)
    idle(m)


async def test_tracked_every_leg_failing_is_eio() -> None:
    ds = disks("async", "sync")
    m = await tracked(ds)
    await m.write(0, bytes(4096))
    for d in ds:
        d.fail_writes = errno.EIO
    c = Completion()
    assert m.submit_write(0, b"x" * 4096, False, c) is not None
    exc, _ = await c.wait()
    assert isinstance(exc, BlockError) and exc.errno == errno.EIO  # never a silent success
    assert [leg.state for leg in m.legs] == [LegState.FAILED, LegState.FAILED]
    assert m.health().state == "failed"
    assert all(d.data[:4096] == bytes(4096) for d in ds)
    idle(m)


async def test_overlapping_writes_are_refused_and_the_legs_stay_identical() -> None:
    ds = disks("manual", "manual")
    m = await tracked(ds)
    await m.write(0, bytes(8192))  # mark region 0 (the coroutine path does not queue)
    a, b, z = b"a" * 8192, b"b" * 4096, b"z" * 4096
    c1 = Completion()
    assert m.submit_write(0, a, False, c1) is not None
    assert [len(d.queued) for d in ds] == [1, 1]  # in flight on both legs
    # overlapping the one in flight: refused, nothing registered or sent
    assert m.submit_write(4096, b, False, Completion()) is None
    assert [len(d.queued) for d in ds] == [1, 1] and len(m.locks) == 1
    # disjoint, same region: taken at once
    c2 = Completion()
    assert m.submit_write(R - 4096, z, False, c2) is not None
    # the refused one goes the coroutine way, and waits for the first
    second = asyncio.ensure_future(m.write(4096, b))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not second.done() and [d.coro_writes for d in ds] == [1, 1]
    ds[1].release()  # the legs answer in different orders
    ds[0].release()
    assert await c1.result() is None and await c2.result() is None
    await asyncio.wait_for(second, 5)
    for d in ds:
        assert d.data[:8192] == a[:4096] + b and d.data[R - 4096 : R] == z
        landed = [off for off, _ in d.applied[1:]]  # after the marking write
        assert landed.index(0) < landed.index(4096)  # the first before the second
    idle(m)


async def test_cancelling_a_tracked_write_stops_the_legs_and_records_a_resync() -> None:
    ds = disks("manual", "manual")
    m = await tracked(ds)
    intent = m.intent
    assert intent is not None
    await m.write(0, bytes(4096))
    c = Completion()
    cancel = m.submit_write(0, b"q" * 4096, False, c)
    assert cancel is not None
    cancel()
    assert len(c.calls) == 1 and isinstance(c.calls[0][0], asyncio.CancelledError)
    assert [d.cancelled for d in ds] == [1, 1]  # each leg's request was cancelled
    assert ds[0].release() == ds[1].release() == 1  # late: nothing more happens
    cancel()
    assert len(c.calls) == 1
    # the legs may differ now: the second is resynced from the first (as the coroutine
    # path does); nobody is failed for a cancel
    assert (intent.missing(0), intent.missing(1)) == (0, 1) and m.resync_wanted.is_set()
    assert [leg.state for leg in m.legs] == [LegState.IN_SYNC] * 2
    idle(m)


async def test_cancelling_a_plain_write_fails_no_leg() -> None:
    """The coroutine path, cancelled, leaves the legs as they are; so must the fast
    path (a cancel from above is no leg failure)."""
    ds = disks("manual", "manual")
    m = await plain(ds)
    for d in ds:
        d.hang = True  # both paths: nothing answers until cancelled
    task = asyncio.ensure_future(m.write(0, b"p" * 4096))
    for _ in range(3):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [leg.state for leg in m.legs] == [LegState.IN_SYNC] * 2
    c = Completion()
    cancel = m.submit_write(0, b"q" * 4096, False, c)
    assert cancel is not None
    cancel()
    assert len(c.calls) == 1 and isinstance(c.calls[0][0], asyncio.CancelledError)
    assert [d.cancelled for d in ds] == [1, 1]
    assert [leg.state for leg in m.legs] == [LegState.IN_SYNC] * 2
    assert m.health().state == "ok"
    idle(m)
    for d in ds:
        d.hang, d.mode = False, "async"
    await submit(m, "write", 0, b"r" * 4096, False)  # the mirror still works
    assert ds[0].data[:4096] == ds[1].data[:4096] == b"r" * 4096


# -- mirror: leg timeout ----------------------------------------------------------------


async def test_leg_timeout_degrades_a_tracked_write_and_cancels_the_hung_request() -> None:
    ds = disks("async", "async")
    m = await tracked(ds, leg_timeout=TIMEOUT)
    intent = m.intent
    assert intent is not None
    await m.write(0, bytes(4096))
    ds[1].hang = True
    data = os.urandom(4096)
    loop = asyncio.get_running_loop()
    start = loop.time()
    c = Completion()
    assert m.submit_write(0, data, False, c) is not None
    assert await c.result() is None
    took = loop.time() - start
    assert TIMEOUT <= took <= 1.25 * TIMEOUT + SLACK, took
    leg = m.legs[1]
    assert leg.state is LegState.FAILED and "ETIMEDOUT" in leg.reason
    assert ds[1].cancelled == 1 and ds[1].taken[-1].cancelled
    assert leg.counters.errors == 1 and intent.missing(1) >= 1
    assert ds[0].data[:4096] == data and ds[1].data[:4096] == bytes(4096)
    assert m.legs[0].state is LegState.IN_SYNC and len(c.calls) == 1
    idle(m)


async def test_leg_timeout_fails_a_plain_write() -> None:
    ds = disks("async", "async")
    m = await plain(ds, leg_timeout=TIMEOUT)
    ds[0].hang = True
    loop = asyncio.get_running_loop()
    start = loop.time()
    c = Completion()
    assert m.submit_write(0, b"h" * 4096, False, c) is not None
    exc, _ = await c.wait()
    took = loop.time() - start
    assert isinstance(exc, BlockError) and exc.errno == errno.EIO
    assert TIMEOUT <= took <= 1.25 * TIMEOUT + SLACK, took
    assert m.legs[0].state is LegState.FAILED and "ETIMEDOUT" in m.legs[0].reason
    assert m.missed == [(0, 0, 4096)] and ds[0].cancelled == 1
    assert ds[1].data[:4096] == b"h" * 4096
    idle(m)


async def test_leg_timeout_retries_a_hung_read_on_the_other_leg() -> None:
    ds = disks("async", "async")
    m = await tracked(ds, leg_timeout=TIMEOUT)
    data = os.urandom(4096)
    await m.write(0, data)
    ds[0].hang = True
    m._next = 0  # the rotation asks leg 0 first
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await submit(m, "read", 0, 4096) == data
    took = loop.time() - start
    assert TIMEOUT <= took <= 1.25 * TIMEOUT + SLACK, took
    assert m.legs[0].state is LegState.FAILED and "ETIMEDOUT" in m.legs[0].reason
    assert ds[0].cancelled == 1 and ds[1].coro_reads == 1
    idle(m)


async def test_no_timeout_fires_for_answered_requests() -> None:
    ds = disks("async", "sync")
    m = await tracked(ds, leg_timeout=TIMEOUT)
    await m.write(0, bytes(4096))
    c = Completion()
    assert m.submit_write(0, b"k" * 4096, False, c) is not None
    assert await c.result() is None
    await asyncio.sleep(2 * TIMEOUT)  # past every sweep that could expire it
    assert len(c.calls) == 1 and m.health().state == "ok"
    assert [d.cancelled for d in ds] == [0, 0]


# -- mirror: reads -----------------------------------------------------------------------


async def test_a_read_is_served_by_one_leg_and_reads_rotate() -> None:
    ds = disks("async", "async")
    m = await plain(ds)
    data = os.urandom(8192)
    await submit(m, "write", 0, data, False)
    assert await submit(m, "read", 0, 8192) == data
    assert [[r.kind for r in d.taken].count("read") for d in ds] in ([1, 0], [0, 1])
    assert await submit(m, "read", 4096, 4096) == data[4096:]
    assert [[r.kind for r in d.taken].count("read") for d in ds] == [1, 1]
    assert sum(leg.counters.reads for leg in m.legs) == 2
    assert sum(leg.counters.read_bytes for leg in m.legs) == 8192 + 4096
    # a leg that refuses its fast path refuses the mirror's read (the coroutine reads)
    ds[0].mode = "refuse"
    m._next = 0
    assert m.submit_read(0, 4096, Completion()) is None
    idle(m)


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_failed_read_is_retried_and_the_bad_leg_repaired(mode: Mode) -> None:
    ds = disks(mode, mode)
    m = await tracked(ds)
    data = os.urandom(4096)
    await m.write(0, data)
    ds[0].data[:4096] = b"\xee" * 4096  # leg 0 lost it
    ds[0].fail_reads = errno.EIO
    m._next = 0
    assert await submit(m, "read", 0, 4096) == data
    assert ds[0].data[:4096] == data  # read repair wrote the good data back
    assert [r.kind for r in ds[0].taken] == ["read"] and ds[0].coro_writes == 2
    assert ds[1].coro_reads == 1  # the retry, on the coroutine path under the lock
    assert m.legs[0].counters.errors == 1 and m.legs[0].state is LegState.IN_SYNC
    idle(m)


async def test_a_read_failing_on_every_leg_is_an_error() -> None:
    ds = disks("async", "async")
    m = await plain(ds)
    for d in ds:
        d.fail_reads = errno.EIO
    c = Completion()
    assert m.submit_read(0, 4096, c) is not None
    exc, _ = await c.wait()
    assert isinstance(exc, BlockError) and exc.errno == errno.EIO
    assert [leg.counters.errors for leg in m.legs] == [1, 1]
    idle(m)


async def test_cancelling_a_read_whose_retry_runs_ends_it() -> None:
    """Leg 0 fails, the retry on leg 1 hangs (no leg_timeout): the canceller must still
    make ``done`` come (the device contract), as cancelling the coroutine read would."""
    ds = disks("async", "async")
    m = await plain(ds)
    ds[0].fail_reads = errno.EIO
    ds[1].hang = True
    m._next = 0
    c = Completion()
    cancel = m.submit_read(0, 4096, c)
    assert cancel is not None
    await until(lambda: ds[1].coro_reads == 1, "the retry on leg 1")
    cancel()
    exc, _ = await c.wait(timeout=2)
    assert isinstance(exc, asyncio.CancelledError)
    await until(lambda: m.legs[1].inflight == 0, "the retry to unwind")
    idle(m)


# -- gates --------------------------------------------------------------------------------


async def test_member_gate_counts_drains_and_refuses_while_suspended() -> None:
    disk = Disk(SIZE, mode="manual")
    member = Member(disk, name="n0", kind="memory", where="mem")
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
    member = Member(disk, name="n0", kind="memory", where="mem")
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


# -- NBD client and server ----------------------------------------------------------------


@pytest.fixture
async def served(sock_dir: Path) -> AsyncIterator[tuple[NbdServer, Address, Disk]]:
    """An NbdServer exporting a :class:`Disk` (the server takes its fast path first)."""
    disk = Disk(SIZE, name="served")
    server = NbdServer({"": disk})
    (address,) = await server.start(f"unix:{sock_dir / 'fp.sock'}")
    assert isinstance(address, Address)
    try:
        yield server, address, disk
    finally:
        disk.finish_all()
        await server.close(timeout=1)


async def test_client_submit_roundtrip(served: tuple[NbdServer, Address, Disk]) -> None:
    _, address, disk = served
    c = await NbdClient.connect(address)
    data = os.urandom(65536)
    await submit(c, "write", 8192, data, False)
    assert disk.data[8192 : 8192 + 65536] == data
    assert [r.kind for r in disk.taken] == ["write"]  # the server's fast path too
    assert await submit(c, "read", 8192, 65536) == data
    disk.mode = "sync"
    assert await submit(c, "read", 8192 + 4096, 4096) == data[4096:8192]
    disk.mode = "refuse"  # the server falls back to the device coroutine
    assert await submit(c, "read", 8192, 65536) == data
    assert disk.coro_reads == 1 and len(disk.taken) == 3
    assert c.submit_read(0, c.max_block + 1, Completion()) is None  # to be split: refused
    await c.close()


async def test_client_errors_come_from_the_server(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    _, address, disk = served
    c = await NbdClient.connect(address)
    cases: list[tuple[str, tuple[Any, ...], int]] = [
        ("write", (SIZE - 4096, b"x" * 8192, False), errno.ENOSPC),  # the server's check
        ("read", (SIZE, 4096), errno.EINVAL),
    ]
    for op, args, err in cases:
        with pytest.raises(BlockError) as e:
            await submit(c, op, *args)
        assert e.value.errno == err
    disk.fail_writes = errno.ENOSPC  # the device's own errors, through both fast paths
    with pytest.raises(BlockError) as e:
        await submit(c, "write", 0, b"y" * 4096, False)
    assert e.value.errno == errno.ENOSPC and disk.data[:4096] == bytes(4096)
    disk.fail_reads = errno.EIO
    with pytest.raises(BlockError) as e:
        await submit(c, "read", 0, 4096)
    assert e.value.errno == errno.EIO
    disk.fail_reads = 0
    disk.hang = True  # a request the device cancels: EIO on the wire
    done = Completion()
    assert c.submit_read(0, 4096, done) is not None
    await until(lambda: len(disk.taken) == 3, "the read at the server")
    disk.taken[-1].cancel()
    exc, _ = await done.wait()
    assert isinstance(exc, BlockError) and not isinstance(exc, ConnectionLost)
    assert exc.errno == errno.EIO
    disk.hang = False
    assert await submit(c, "read", 0, 4096) == bytes(4096)  # the stream is in step
    await c.close()


async def test_client_cancel_and_a_late_reply(served: tuple[NbdServer, Address, Disk]) -> None:
    _, address, disk = served
    disk.data[:4096] = b"L" * 4096
    c = await NbdClient.connect(address)
    disk.mode = "manual"
    done = Completion()
    cancel = c.submit_read(0, 4096, done)
    assert cancel is not None
    await until(lambda: len(disk.queued) == 1, "the read at the server")
    cancel()
    assert len(done.calls) == 1 and isinstance(done.calls[0][0], asyncio.CancelledError)
    cancel()
    disk.release()  # the server answers now: the client drops the reply
    disk.mode = "async"
    assert await submit(c, "read", 0, 4096) == b"L" * 4096
    assert len(done.calls) == 1
    await c.close()


async def test_client_connection_loss_fails_submitted_requests(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    server, address, disk = served
    c = await NbdClient.connect(address)
    disk.hang = True
    dones = [Completion() for _ in range(3)]
    assert c.submit_read(0, 4096, dones[0]) is not None
    assert c.submit_write(4096, b"w" * 4096, False, dones[1]) is not None
    assert c.submit_read(8192, 4096, dones[2]) is not None
    await until(lambda: len(disk.taken) == 3, "three requests at the server")
    for conn in list(server.connections):
        conn.abort()
    for d in dones:
        exc, _ = await d.wait()
        assert isinstance(exc, ConnectionLost) and exc.errno == errno.EIO
    assert not c.connected
    assert c.submit_read(0, 4096, Completion()) is None  # lost: not taken
    async with asyncio.timeout(2):
        await c.close()


async def test_client_close_waits_for_submitted_requests(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    _, address, disk = served
    c = await NbdClient.connect(address)
    disk.mode = "manual"
    data = os.urandom(4096)
    done = Completion()
    assert c.submit_write(0, data, False, done) is not None
    await until(lambda: len(disk.queued) == 1, "the write at the server")
    closing = asyncio.ensure_future(c.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done() and done.calls == []
    disk.release()
    await asyncio.wait_for(closing, 5)
    assert done.calls == [(None, None)] and disk.data[:4096] == data


async def test_client_close_does_not_wait_for_a_cancelled_request(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    """A cancelled request is no longer the caller's (as with a cancelled coroutine
    request): close() must not wait for its reply."""
    _, address, disk = served
    c = await NbdClient.connect(address)
    disk.hang = True
    done = Completion()
    cancel = c.submit_read(0, 4096, done)
    assert cancel is not None
    await until(lambda: len(disk.taken) == 1, "the read at the server")
    closing = asyncio.ensure_future(c.close())
    for _ in range(3):
        await asyncio.sleep(0)
    cancel()
    await asyncio.wait_for(closing, 2)
    assert len(done.calls) == 1 and isinstance(done.calls[0][0], asyncio.CancelledError)


async def test_client_with_a_request_timeout_refuses_the_fast_path(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    _, address, disk = served
    c = await NbdClient.connect(address, request_timeout=5)
    assert c.submit_write(0, b"t" * 4096, False, Completion()) is None
    assert c.submit_read(0, 4096, Completion()) is None
    assert disk.taken == []
    await c.close()


# -- remote member -----------------------------------------------------------------------


def remote(address: Address, *, io_timeout: float | None) -> RemoteDevice:
    return RemoteDevice(
        address, name="node", reconnect=True, io_timeout=io_timeout, backoff_min=0.01,
        backoff_max=0.05,
    )  # fmt: skip


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


# -- file device ---------------------------------------------------------------------------


async def test_file_device_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    f = FileDevice(path, size=SIZE, create=True)
    await f.open()
    data = os.urandom(12288)
    c = Completion()
    assert f.submit_write(4096, data, False, c) is not None
    assert c.calls == [(None, None)]  # synchronous: done before returning
    assert path.read_bytes()[4096 : 4096 + len(data)] == data
    c = Completion()
    assert f.submit_read(4096, len(data), c) is not None
    assert c.calls == [(None, data)]
    assert f.submit_write(0, data, True, Completion()) is None  # FUA: the coroutine
    assert path.read_bytes()[:4096] == bytes(4096)
    os.truncate(path, 8192)  # shrunk under us: a short read is an error, not short data
    c = Completion()
    assert f.submit_read(4096, 8192, c) is not None
    exc, _ = c.calls[0]
    assert isinstance(exc, BlockError) and exc.errno == errno.EIO
    await f.close()


async def test_read_only_file_device_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    data = os.urandom(8192)
    path.write_bytes(data * 4)
    ro = FileDevice(path, read_only=True)
    await ro.open()
    assert ro.submit_write(0, b"n" * 4096, False, Completion()) is None
    assert path.read_bytes() == data * 4
    with pytest.raises(BlockError) as e:  # the coroutine gives the error
        await ro.write(0, b"n" * 4096)
    assert e.value.errno == errno.EPERM
    assert await submit(ro, "read", 8192, 8192) == data
    await ro.close()


async def test_mirror_of_files_completes_before_returning(tmp_path: Path) -> None:
    files = [FileDevice(tmp_path / f"{i}.img", size=SIZE, create=True) for i in range(2)]
    m = MirrorDevice(files)
    await m.open()
    data = os.urandom(8192)
    c = Completion()
    assert m.submit_write(R, data, False, c) is not None
    assert c.calls == [(None, None)]
    for i in range(2):
        assert (tmp_path / f"{i}.img").read_bytes()[R : R + 8192] == data
    c = Completion()
    assert m.submit_read(R, 8192, c) is not None
    assert c.calls == [(None, data)]
    idle(m)
    await m.close()


# -- submit_coro ---------------------------------------------------------------------------


async def test_submit_coro_completes_synchronously_when_it_can() -> None:
    got: list[tuple[Any, Any]] = []

    async def now() -> int:
        return 7

    assert submit_coro(now(), lambda e, v: got.append((e, v))) is no_cancel
    assert got == [(None, 7)]

    async def fails() -> None:
        raise BlockError(errno.EROFS, "no")

    submit_coro(fails(), lambda e, v: got.append((e, v)))
    assert len(got) == 2 and isinstance(got[1][0], BlockError) and got[1][0].errno == errno.EROFS


async def test_submit_coro_finishes_a_suspended_coroutine_in_a_task() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def later() -> int:
        return await fut + 1

    c = Completion()
    submit_coro(later(), c)
    assert c.calls == []
    fut.set_result(41)
    assert await c.result() == 42

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise BlockError(errno.EIO, "later")

    c = Completion()
    submit_coro(fails_later(), c)
    with pytest.raises(BlockError):
        await c.result()


@pytest.mark.parametrize("steps", [0, 2])
async def test_submit_coro_cancel(steps: int) -> None:
    """Cancelled before the Task took a step, or while parked later: ``done`` gets
    CancelledError once and the coroutine unwinds."""
    unwound: list[str] = []

    async def parked() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            unwound.append("finally")

    c = Completion()
    cancel = submit_coro(parked(), c)
    for _ in range(steps):
        await asyncio.sleep(0)
    cancel()
    exc, _ = await c.wait()
    assert isinstance(exc, asyncio.CancelledError)
    assert unwound == ["finally"]
    cancel()  # after the end: nothing more
    await asyncio.sleep(0)
    assert len(c.calls) == 1
