"""FaultDevice: injected errors, latency, dead and hung modes."""

from __future__ import annotations

import asyncio
import errno

import pytest

from dst.errors import BlockError
from dst.targets.fault import FaultDevice
from dst.targets.memory import MemoryDevice


async def make() -> FaultDevice:
    f = FaultDevice(MemoryDevice(4096), name="f")
    await f.open()
    return f


async def expect(err: int, aw: object) -> None:
    with pytest.raises(BlockError) as ei:
        await aw  # type: ignore[misc]
    assert ei.value.errno == err


async def test_pass_through() -> None:
    f = await make()
    assert f.size == 4096 and f.caps.trim
    await f.write(0, b"abc")
    assert await f.read(0, 3) == b"abc"
    await f.write_zeroes(0, 1)
    await f.trim(1, 1)
    await f.flush()
    await f.cache(0, 10)
    assert sum(e.length for e in await f.block_status(0, 4096)) == 4096
    assert await f.read(0, 3) == b"\0\0c"
    assert f.counters.as_dict()["writes"] == 1
    assert f.spec() == {"type": "fault", "name": "f", "members": [f.child.spec()]}
    assert list(f.children()) == [f.child]


async def test_ranges_and_counts() -> None:
    f = await make()
    f.fail_reads(errno.EIO, ranges=[(100, 10)])
    await f.read(0, 100)
    await f.read(110, 10)
    await expect(errno.EIO, f.read(105, 1))
    await expect(errno.EIO, f.read(0, 4096))
    f.fail_writes(errno.ENOSPC, count=2)
    await expect(errno.ENOSPC, f.write(0, b"x"))
    await expect(errno.ENOSPC, f.write(0, b"x"))
    await f.write(0, b"x")
    f.fail_flushes(errno.EROFS)
    await expect(errno.EROFS, f.flush())
    f.fail("any", errno.EBADMSG, count=1)
    await expect(errno.EBADMSG, f.cache(0, 1))
    f.clear()
    await f.flush()
    await f.read(105, 1)
    assert f.counters.errors == 6


async def test_failed_write_does_not_reach_child() -> None:
    f = await make()
    f.fail_writes()
    await expect(errno.EIO, f.write(0, b"zz"))
    assert await f.child.read(0, 2) == b"\0\0"


async def test_kill_and_revive() -> None:
    f = await make()
    f.kill()
    assert f.health().state == "failed"
    await expect(errno.EIO, f.read(0, 1))
    await expect(errno.EIO, f.flush())
    f.revive()
    assert f.health().state == "ok"
    await f.read(0, 1)


async def test_hang_until_revive() -> None:
    f = await make()
    f.kill(hang=True)
    assert f.health().state == "hung"
    tasks = [asyncio.ensure_future(f.write(i, b"w")) for i in range(3)]
    await f.wait_blocked(3)
    assert not any(t.done() for t in tasks) and f.counters.writes == 0
    f.revive()
    await asyncio.gather(*tasks)
    assert f.counters.writes == 3 and f.blocked == 0


async def test_latency() -> None:
    f = await make()
    f.set_latency(0.02)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await f.read(0, 1)
    assert loop.time() - t0 >= 0.015
    f.set_latency(0)
