"""Mirror mutations: one fan-out with two faces (dst.targets.mirror.fanout).

Every behaviour is checked through both entry points -- the callback face
(``submit_write``) and the coroutine face (``write``, the callback face plus a wait) --
and with legs that answer on their fast path asynchronously, synchronously, on release,
never, or only as coroutines (:class:`tests.support.fastpath.Disk`).  Data is checked on
every leg.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

from dst.device import Buffer, Cancel, Done
from dst.errors import BlockError, ConfigError
from dst.targets.fault import FaultDevice
from dst.targets.file import FileDevice
from dst.targets.member import Member
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import LegState, MirrorDevice
from dst.targets.mirror.fanout import Mutation
from dst.targets.mirror.legs import LegCall
from dst.targets.mirror.read import MirrorRead
from tests.support.fastpath import Completion, Disk, Mode, disk_log, submit

pytestmark = pytest.mark.timeout(30)
SIZE = 1 << 20
R = 64 << 10  # region size
ZERO = bytes(R)
TIMEOUT = 0.2  # leg_timeout of the timeout tests
Face = Literal["submit", "coro"]
FACES: list[Face] = ["submit", "coro"]


def disks(*modes: Mode) -> list[Disk]:
    return [Disk(SIZE, name=f"d{i}", mode=m) for i, m in enumerate(modes)]


async def mirror(devs: list[Any], **kw: Any) -> MirrorDevice:
    m = MirrorDevice(devs, region_size=R, **kw)
    await m.open()
    return m


async def write(m: MirrorDevice, face: Face, offset: int, data: Buffer) -> None:
    if face == "submit":
        await submit(m, "write", offset, data, False)
    else:
        await m.write(offset, data)


def idle(m: MirrorDevice) -> None:
    """Nothing of ``m`` is in flight any more."""
    assert [leg.inflight for leg in m.legs] == [0] * len(m.legs)
    assert len(m.locks) == 0


LEG_MODES: list[tuple[Mode, Mode]] = [
    ("async", "async"),
    ("sync", "sync"),
    ("sync", "async"),
    ("async", "refuse"),
    ("refuse", "refuse"),
]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("modes", LEG_MODES)
async def test_a_write_reaches_every_leg(face: Face, modes: tuple[Mode, Mode]) -> None:
    ds = disks(*modes)
    m = await mirror(ds)
    await m.write(0, bytes(4096))  # marks region 0
    data = os.urandom(3 * 4096)
    c = Completion()
    if face == "submit":
        m.submit_write(8192, data, False, c)
        if modes == ("sync", "sync"):
            assert c.calls == [(None, None)]  # every leg answered at once: so did the mirror
        assert await c.result() is None
    else:
        await m.write(8192, data)
    for d, mode, leg in zip(ds, modes, m.legs, strict=True):
        assert d.data[8192 : 8192 + len(data)] == data
        assert d.data[:8192] + d.data[8192 + len(data) : R] == ZERO[len(data) :]
        # a leg without a fast path ran its coroutine instead
        assert (len(d.taken), d.coro_writes) == ((0, 2) if mode == "refuse" else (2, 0))
        assert (leg.counters.writes, leg.counters.write_bytes) == (2, 4096 + len(data))
        assert leg.state is LegState.IN_SYNC
    idle(m)


@pytest.mark.parametrize("face", FACES)
async def test_the_first_write_to_a_region_waits_for_its_mark(face: Face) -> None:
    """The callback face takes it too; the legs see it only once the mark is durable."""
    ds = disks("async", "async")
    m = await mirror(ds, metadata=True)
    bitmap = m.regions.tracker.bitmap
    data = os.urandom(8192)
    c = Completion()
    if face == "submit":
        m.submit_write(0, data, False, c)
        assert c.calls == [] and not any(r.offset == 0 for d in ds for r in d.taken)
        assert await c.result() is None
    else:
        await m.write(0, data)
    assert bitmap.test(0) and m.regions.tracker.durable(0)
    layout = disk_log(m).stores[0].layout
    assert layout is not None
    for d in ds:
        assert d.data[:8192] == data
        first = next(i for i, (off, _) in enumerate(d.applied) if off == 0)
        marks = [p for off, p in d.applied[:first] if off == layout.bitmap_offset and p[0] & 1]
        assert marks  # the mark reached this leg before the data
    more = os.urandom(4096)
    c = Completion()
    m.submit_write(8192, more, False, c)  # marked now: no wait at all
    assert await c.result() is None
    assert await m.read(0, 8192 + 4096) == data + more
    idle(m)
    await m.close()


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("mode", ["async", "sync", "refuse"])
async def test_a_failing_leg_degrades_and_records_its_regions(face: Face, mode: Mode) -> None:
    ds = disks("async", mode)
    m = await mirror(ds)
    await m.write(0, bytes(4096))
    ds[1].fail_writes = errno.EIO
    data = os.urandom(4096)
    await write(m, face, 0, data)  # degraded, not lost: leg 0 holds it
    assert m.legs[1].state is LegState.FAILED and "EIO" in m.legs[1].reason
    assert m.legs[0].state is LegState.IN_SYNC and m.health().state == "degraded"
    assert m.regions.missing(1) >= 1 and m.regions.missing(0) == 0
    assert m.legs[1].counters.errors == 1
    assert ds[0].data[:4096] == data and ds[1].data[:4096] == bytes(4096)
    idle(m)
    # the failed leg gets no more writes, and no reads
    before = (len(ds[1].taken), ds[1].coro_writes)
    await write(m, face, 4096, data)
    for _ in range(2):  # whatever the rotation: only leg 0 may serve it
        assert await submit(m, "read", 0, 8192) == data + data
    assert (len(ds[1].taken), ds[1].coro_writes, ds[1].coro_reads) == (*before, 0)
    assert sorted(m.regions.tracker.out_of_sync(1)) == [0]
    idle(m)


@pytest.mark.parametrize("face", FACES)
async def test_every_leg_failing_is_eio_never_a_silent_success(face: Face) -> None:
    ds = disks("async", "sync")
    m = await mirror(ds)
    await m.write(0, bytes(4096))
    for d in ds:
        d.fail_writes = errno.EIO
    with pytest.raises(BlockError) as err:
        await write(m, face, 0, b"x" * 4096)
    assert err.value.errno == errno.EIO
    assert [leg.state for leg in m.legs] == [LegState.FAILED, LegState.FAILED]
    assert m.health().state == "failed"
    assert all(d.data[:4096] == bytes(4096) for d in ds)
    with pytest.raises(BlockError):
        await write(m, face, 8192, b"y")  # no leg left: EIO, not success
    with pytest.raises(BlockError):
        await m.read(0, 1)
    with pytest.raises(BlockError):
        await m.flush()
    idle(m)


class Buggy(Disk):
    """A leg whose write raises something that is not a BlockError (a bug below)."""

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        raise RuntimeError("bug in the layer below")


@pytest.mark.parametrize("face", FACES)
async def test_a_bug_below_fails_that_leg_only(face: Face) -> None:
    """Not a BlockError: logged, and that leg counts as failed with EIO (both faces
    alike); the write succeeds on the other leg and nothing else is out of sync."""
    good, bad = Disk(SIZE, name="good"), Buggy(SIZE, name="bad", mode="refuse")
    m = await mirror([good, bad])
    await m.write(R, bytes(10))  # fails leg 1 already (region 1 marked meanwhile)
    assert m.legs[1].state is LegState.FAILED and "internal error" in m.legs[1].reason
    await write(m, face, 0, b"k" * 4096)
    assert good.data[:4096] == b"k" * 4096
    assert m.legs[0].state is LegState.IN_SYNC and m.regions.missing(0) == 0
    idle(m)


@pytest.mark.parametrize("face", FACES)
async def test_overlapping_writes_reach_every_leg_in_arrival_order(face: Face) -> None:
    ds = disks("manual", "manual")
    m = await mirror(ds)
    for d in ds:
        d.mode = "async"
    await m.write(0, bytes(8192))  # mark region 0
    for d in ds:
        d.mode = "manual"
    a, b, z = b"a" * 8192, b"b" * 4096, b"z" * 4096
    c1 = Completion()
    m.submit_write(0, a, False, c1)
    assert [len(d.queued) for d in ds] == [1, 1]  # in flight on both legs
    # overlapping the one in flight: taken, but waits for it (nothing sent yet)
    if face == "submit":
        c3 = Completion()
        m.submit_write(4096, b, False, c3)
        second: asyncio.Future[Any] = asyncio.ensure_future(c3.result())
    else:
        second = asyncio.ensure_future(m.write(4096, b))
    for _ in range(5):
        await asyncio.sleep(0)
    assert [len(d.queued) for d in ds] == [1, 1] and len(m.locks) == 2
    c2 = Completion()
    m.submit_write(R - 4096, z, False, c2)  # disjoint, same region: at once
    assert [len(d.queued) for d in ds] == [2, 2]
    ds[1].release()  # the legs answer in different orders
    ds[0].release()
    assert await c1.result() is None and await c2.result() is None
    for _ in range(5):
        await asyncio.sleep(0)
    for d in ds:
        d.release()
    await asyncio.wait_for(second, 5)
    for d in ds:
        assert d.data[:8192] == a[:4096] + b and d.data[R - 4096 : R] == z
        landed = [off for off, _ in d.applied[1:]]  # after the marking write
        assert landed.index(0) < landed.index(4096)  # the first before the second
    idle(m)


class Jittery(MemoryDevice):
    """Writes yield a random number of times, so concurrent writes complete in a
    different order on every leg unless the mirror orders them."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__(size, name=f"jittery{seed}")
        self.rng = random.Random(seed)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        for _ in range(self.rng.randint(0, 6)):
            await asyncio.sleep(0)
        await super().write(offset, data, fua=fua)


@pytest.mark.parametrize("seed", range(4))
async def test_legs_identical_after_concurrent_overlapping_mutations(seed: int) -> None:
    legs = [Jittery(64 << 10, seed * 10 + i) for i in range(3)]
    m = MirrorDevice(legs, region_size=4096)
    await m.open()
    rng = random.Random(seed)
    ops = []
    for i in range(300):
        off = rng.randrange(0, 4096)  # a small hot area: lots of overlap
        n = rng.randint(1, 2048)
        kind = rng.random()
        if kind < 0.8:
            ops.append(m.write(off, bytes([i % 251 + 1]) * n, fua=rng.random() < 0.1))
        elif kind < 0.9:
            ops.append(m.write_zeroes(off, n))
        else:
            ops.append(m.trim(off, n))
    await asyncio.gather(*ops)
    assert legs[0].data[:8192] != bytes(8192)
    assert legs[0].data == legs[1].data == legs[2].data
    assert len(m.locks) == 0


async def test_unordered_writes_would_diverge() -> None:
    """Sanity check of the workload above: without the mirror's order the legs differ."""
    legs = [Jittery(64 << 10, 1), Jittery(64 << 10, 2)]
    rng = random.Random(0)
    ops = []
    for i in range(200):
        off, n = rng.randrange(0, 4096), rng.randint(1, 2048)
        ops += [leg.write(off, bytes([i % 251 + 1]) * n) for leg in legs]
    await asyncio.gather(*ops)
    assert legs[0].data != legs[1].data


@pytest.mark.parametrize("face", FACES)
async def test_cancelling_a_write_stops_the_legs_and_records_a_resync(face: Face) -> None:
    ds = disks("manual", "manual")
    m = await mirror(ds)
    for d in ds:
        d.mode = "async"
    await m.write(0, bytes(4096))
    for d in ds:
        d.mode = "manual"
    c = Completion()
    if face == "submit":
        cancel = m.submit_write(0, b"q" * 4096, False, c)
        cancel()
        assert len(c.calls) == 1 and isinstance(c.calls[0][0], asyncio.CancelledError)
        cancel()
        assert len(c.calls) == 1
    else:
        task = asyncio.ensure_future(m.write(0, b"q" * 4096))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [d.cancelled for d in ds] == [1, 1]  # each leg's request was cancelled
    assert ds[0].release() == ds[1].release() == 1  # late: nothing more happens
    # the legs may differ now: the second is resynced from the first; nobody is failed
    assert (m.regions.missing(0), m.regions.missing(1)) == (0, 1) and m.resync_wanted.is_set()
    assert [leg.state for leg in m.legs] == [LegState.IN_SYNC] * 2
    assert m.health().state == "ok"
    idle(m)


async def test_cancelling_a_write_waiting_for_its_range_lets_the_next_one_go() -> None:
    ds = disks("manual", "manual")
    m = await mirror(ds)
    for d in ds:
        d.mode = "async"
    await m.write(0, bytes(4096))
    for d in ds:
        d.mode = "manual"
    first = Completion()
    m.submit_write(0, b"1" * 4096, False, first)
    waiting = Completion()
    cancel = m.submit_write(0, b"2" * 4096, False, waiting)
    third = Completion()
    m.submit_write(0, b"3" * 4096, False, third)
    await asyncio.sleep(0)
    cancel()  # never sent: nothing to resync for it
    exc, _ = await waiting.wait()
    assert isinstance(exc, asyncio.CancelledError)
    for _ in range(100):
        if third.calls:
            break
        for d in ds:
            d.release()
        await asyncio.sleep(0)
    assert await first.result() is None and await third.result() is None
    assert all(d.data[:4096] == b"3" * 4096 for d in ds)
    assert m.regions.missing(1) == 0
    idle(m)


@pytest.mark.parametrize("face", FACES)
async def test_leg_timeout_degrades_a_write_and_cancels_the_hung_request(face: Face) -> None:
    ds = disks("async", "async")
    m = await mirror(ds, leg_timeout=TIMEOUT)
    await m.write(0, bytes(4096))
    ds[1].hang = True
    data = os.urandom(4096)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await write(m, face, 0, data)
    took = loop.time() - start
    assert took >= TIMEOUT, took  # generous above: CI machines are slow
    assert took < 20 * TIMEOUT, took
    leg = m.legs[1]
    assert leg.state is LegState.FAILED and "ETIMEDOUT" in leg.reason
    assert ds[1].cancelled == 1 and ds[1].taken[-1].cancelled
    assert leg.counters.errors == 1 and m.regions.missing(1) >= 1
    assert ds[0].data[:4096] == data and ds[1].data[:4096] == bytes(4096)
    assert m.legs[0].state is LegState.IN_SYNC
    idle(m)


async def test_a_hung_coroutine_leg_times_out_by_the_same_clock() -> None:
    legs = [FaultDevice(MemoryDevice(SIZE), name=f"leg{i}") for i in range(2)]
    m = await mirror(legs, leg_timeout=TIMEOUT)
    legs[0].kill(hang=True)
    await m.write(R, b"z" * 10)  # waits about leg_timeout, then degrades
    assert m.legs[0].state is LegState.FAILED and "ETIMEDOUT" in m.legs[0].reason
    assert await m.read(R, 10) == b"z" * 10
    legs[0].revive()
    await m.close()


async def test_no_timeout_fires_for_answered_requests() -> None:
    ds = disks("async", "sync")
    m = await mirror(ds, leg_timeout=TIMEOUT)
    await m.write(0, bytes(4096))
    c = Completion()
    m.submit_write(0, b"k" * 4096, False, c)
    assert await c.result() is None
    await asyncio.sleep(2 * TIMEOUT)  # past every sweep that could expire it
    assert len(c.calls) == 1 and m.health().state == "ok"
    assert [d.cancelled for d in ds] == [0, 0]


def fault_legs(n: int) -> list[FaultDevice]:
    return [FaultDevice(MemoryDevice(SIZE), name=f"leg{i}") for i in range(n)]


def data_of(leg: FaultDevice) -> bytearray:
    child = leg.child
    assert isinstance(child, MemoryDevice)
    return child.data


async def test_every_mutation_fans_out() -> None:
    legs = fault_legs(3)
    m = await mirror(legs)
    assert m.size == SIZE and m.caps.trim and m.caps.fast_zero
    await m.write(100, b"abc" * 100, fua=True)
    assert all(data_of(leg)[100:400] == b"abc" * 100 for leg in legs)
    assert await m.read(100, 300) == b"abc" * 100
    await m.write_zeroes(150, 50, fast=True)
    await m.trim(300, 10)
    await m.flush()
    assert all(data_of(leg)[150:200] == bytes(50) for leg in legs)
    assert all(leg.counters.flushes == 1 for leg in legs)
    assert all(leg.counters.zeroes == 1 and leg.counters.trims == 1 for leg in legs)
    await m.cache(0, 10)


async def test_a_failing_flush_fails_that_leg_only() -> None:
    legs = fault_legs(3)
    m = await mirror(legs)
    legs[2].fail_flushes(errno.EIO, count=1)
    await m.flush()  # two legs hold everything: the flush succeeded
    assert [leg.state for leg in m.legs] == [LegState.IN_SYNC, LegState.IN_SYNC, LegState.FAILED]
    for leg in legs[:2]:
        leg.fail_flushes(errno.EIO, count=1)
    with pytest.raises(BlockError) as err:
        await m.flush()
    assert err.value.errno == errno.EIO
    assert m.health().state == "failed"


async def test_a_fast_zero_some_legs_cannot_do_fails_no_leg() -> None:
    legs = fault_legs(2)
    m = await mirror(legs)
    await m.write(0, b"w" * 100)
    legs[0].fail("zeroes", errno.ENOTSUP, count=1)
    with pytest.raises(BlockError) as err:
        await m.write_zeroes(0, 10, fast=True)
    assert err.value.errno == errno.ENOTSUP
    assert all(leg.state is LegState.IN_SYNC for leg in m.legs)
    # leg 1 zeroed, leg 0 did not: leg 0 misses the range (resynced from leg 1)
    assert m.regions.missing(0) == 1 and m.resync_wanted.is_set()


async def test_spec_health_caps_and_bad_arguments() -> None:
    a = MemoryDevice(SIZE)
    b = MemoryDevice(SIZE + 100, read_only=True)
    m = MirrorDevice([a, b], name="m0", region_size=R)
    await m.open()
    assert m.size == SIZE and m.caps.read_only
    spec = m.spec()
    assert spec["type"] == "mirror" and spec["name"] == "m0"
    assert spec["members"] == [a.spec(), b.spec()] and spec["region_size"] == R
    h = m.health()
    assert h.state == "ok" and [leg["state"] for leg in h.detail["legs"]] == ["in_sync"] * 2
    assert list(m.children()) == [a, b]
    with pytest.raises(ConfigError):
        MirrorDevice([a])
    with pytest.raises(ConfigError):
        MirrorDevice([a, a])
    with pytest.raises(ConfigError):
        MirrorDevice([a, b], region_size=1000)
    with pytest.raises(ConfigError):
        MirrorDevice([a, b], leg_timeout=0)


async def test_a_steady_write_creates_no_task_even_outside_a_task() -> None:
    """The callback face from a plain callback (as the NBD server submits) with legs
    answering on their fast path: no coroutine is run, no Task created."""
    ds = disks("async", "async")
    m = await mirror(ds, leg_timeout=5.0)
    await m.write(0, b"w" * 8192)  # marks the region: the steady state follows
    loop = asyncio.get_running_loop()
    created: list[object] = []

    def counting(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        created.append(coro)
        return asyncio.Task(coro, loop=lp, **kw)

    factory = loop.get_task_factory()
    loop.set_task_factory(counting)
    try:
        c = Completion()
        loop.call_soon(lambda: m.submit_write(4096, b"x" * 4096, False, c))
        assert await c.result() is None
    finally:
        loop.set_task_factory(factory)
    assert created == []
    for d in ds:
        assert d.data[:8192] == b"w" * 4096 + b"x" * 4096
        assert d.coro_writes == 0
    idle(m)


async def test_steady_writes_and_reads_leave_no_cycle_for_the_collector() -> None:
    """A request's objects die by reference count once it is answered: a cycle per
    request (a mutation and its leg calls) had the garbage collector walk the young
    objects every few hundred writes, 6 % of a mirrored write's instructions."""
    ds = disks("async", "async")
    m = await mirror(ds, leg_timeout=5.0)
    await m.write(0, bytes(8192))  # marks the region: the steady state follows
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept in gc.garbage
    try:
        for i in range(20):
            await submit(m, "write", 4096 * (i % 2), bytes([i]) * 4096, False)
            assert await submit(m, "read", 4096 * (i % 2), 4096) == bytes([i]) * 4096
        for d in ds:
            d.taken.clear()  # (the test disks keep what they took)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, Mutation | LegCall | MirrorRead)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cyclic == []
    idle(m)


async def test_a_mirror_of_files_completes_before_returning(tmp_path: Path) -> None:
    files = [FileDevice(tmp_path / f"{i}.img", size=SIZE, create=True) for i in range(2)]
    m = await mirror(files)
    await m.write(R, bytes(8192))  # marks the region
    data = os.urandom(8192)
    c = Completion()
    m.submit_write(R, data, False, c)
    assert c.calls == [(None, None)]
    for i in range(2):
        assert (tmp_path / f"{i}.img").read_bytes()[R : R + 8192] == data
    c = Completion()
    m.submit_read(R, 8192, c)
    assert c.calls == [(None, data)]
    idle(m)
    await m.close()


async def test_a_busy_leg_that_keeps_answering_is_not_timed_out() -> None:
    """Blame only a silent leg: a write queued behind others on a leg that answers
    something every fraction of the timeout waits longer than ``leg_timeout`` and
    still succeeds on both legs."""
    ds = disks("async", "async")
    m = await mirror(ds, leg_timeout=TIMEOUT)
    await m.write(0, bytes(4096))
    ds[1].mode = "manual"
    held = Completion()
    m.submit_write(R, b"h" * 4096, False, held)  # leg 1 holds it for 3 timeouts
    loop = asyncio.get_running_loop()
    end = loop.time() + 3 * TIMEOUT
    while loop.time() < end:  # leg 1 answers other requests meanwhile
        c = Completion()
        m.submit_write(2 * R, b"o" * 4096, False, c)
        for req in [r for r in ds[1].queued if r.offset != R]:
            ds[1].queued.remove(req)
            req.finish()
        assert await c.result() is None
        await asyncio.sleep(TIMEOUT / 5)
    assert not held.calls and m.legs[1].state is LegState.IN_SYNC
    ds[1].release()
    assert await held.result() is None
    assert ds[1].data[R : R + 4096] == b"h" * 4096
    assert m.health().state == "ok"
    idle(m)


async def test_a_request_stuck_on_an_answering_leg_times_out_in_the_end() -> None:
    from dst.targets.mirror.legs import STUCK_FACTOR

    ds = disks("async", "async")
    m = await mirror(ds, leg_timeout=TIMEOUT)
    await m.write(0, bytes(4096))
    ds[1].mode = "manual"
    held = Completion()
    m.submit_write(R, b"h" * 4096, False, held)
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not held.calls:
        c = Completion()
        m.submit_write(2 * R, b"o" * 4096, False, c)
        for req in [r for r in ds[1].queued if r.offset != R]:
            ds[1].queued.remove(req)
            req.finish()
        await c.result()
        await asyncio.sleep(TIMEOUT / 5)
    assert loop.time() - start >= STUCK_FACTOR * TIMEOUT
    assert await held.result() is None  # leg 0 held it: degraded, not failed
    assert m.legs[1].state is LegState.FAILED and "ETIMEDOUT" in m.legs[1].reason


async def test_a_held_event_loop_does_not_time_legs_out() -> None:
    """The daemon's own loop stalls longer than leg_timeout while a write is out: the
    legs answered meanwhile, nobody read it; no leg is failed for the daemon's stall."""
    import time

    ds = disks("async", "async")
    m = await mirror(ds, leg_timeout=TIMEOUT)
    await m.write(0, bytes(4096))
    ds[1].mode = "manual"
    c = Completion()
    m.submit_write(R, b"s" * 4096, False, c)
    await asyncio.sleep(0)
    time.sleep(3 * TIMEOUT)  # noqa: ASYNC251 -- the loop is held on purpose: a stall
    await asyncio.sleep(TIMEOUT / 2)  # late sweeps run now
    assert m.legs[1].state is LegState.IN_SYNC
    ds[1].release()
    assert await c.result() is None
    assert m.health().state == "ok"


class _LateCancel(Disk):
    """A disk whose cancellers take effect only when the test runs them (a node that is
    slow to answer a cancel)."""

    def __init__(self, size: int, *, name: str) -> None:
        super().__init__(size, name=name)
        self.cancels: list[Callable[[], object]] = []

    def _take(
        self, kind: str, offset: int, length: int, payload: bytes | None, done: Done
    ) -> Cancel | None:
        cancel = super()._take(kind, offset, length, payload, done)
        if cancel is None:
            return None
        return lambda: self.cancels.append(cancel)


async def test_a_timed_out_leg_call_holds_its_nodes_gate_until_the_node_answers() -> None:
    """Legs that are nodes: a leg call enters the node's gate inline and leaves it on
    the answer from below -- not when it times out -- so suspending that node drains
    what is really still in flight on it."""
    ds = [_LateCancel(SIZE, name=f"d{i}") for i in range(2)]
    nodes = [Member(d, name=f"n{i}", where="memory") for i, d in enumerate(ds)]
    m = await mirror(nodes, leg_timeout=TIMEOUT)
    await m.write(0, b"a" * 4096)
    assert [n.counters.writes for n in nodes] == [1, 1]
    assert [n.inflight for n in nodes] == [0, 0]
    ds[1].hang = True
    await m.write(0, b"b" * 4096)  # leg 1 times out: failed, the write succeeds on leg 0
    assert m.legs[1].state is LegState.FAILED and "ETIMEDOUT" in m.legs[1].reason
    assert ds[1].cancels and nodes[1].inflight == 1  # cancelled, not yet answered
    suspend = asyncio.ensure_future(nodes[1].suspend())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not suspend.done()  # the node's request is still in flight
    for cancel in ds[1].cancels:
        cancel()  # the node answers (CancelledError)
    await asyncio.wait_for(suspend, 5)
    assert nodes[1].inflight == 0 and nodes[1].counters.errors == 0
    nodes[1].resume()
    assert [n.counters.writes for n in nodes] == [2, 2]  # each took both writes
    assert ds[0].data[:4096] == b"b" * 4096 and ds[1].data[:4096] == b"a" * 4096
    await m.write(R, b"c" * 4096)  # goes on with leg 0
    assert ds[0].data[R : R + 4096] == b"c" * 4096
