"""Eager stepping (dst.aio): coroutines that suspend hand over to a Task intact."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from dst.aio import Continuation, submit_coro
from dst.device import no_cancel
from dst.errors import BlockError
from tests.support.fastpath import Completion


async def test_eager_waiters_on_one_future() -> None:
    """Several coroutines stepped eagerly in one callback may wait on one future (a
    client's shared drain); each must resume, none may see "await wasn't used"."""
    loop = asyncio.get_running_loop()
    shared: asyncio.Future[None] = loop.create_future()

    async def waiter(i: int) -> int:
        await shared
        return i

    async def finish(rest: Continuation[int]) -> int:
        return await rest

    tasks: list[asyncio.Task[Any]] = []
    for i in range(4):
        coro = waiter(i)
        first = coro.send(None)
        tasks.append(loop.create_task(finish(Continuation(coro, first))))
    await asyncio.sleep(0)
    shared.set_result(None)
    async with asyncio.timeout(5):
        assert await asyncio.gather(*tasks) == [0, 1, 2, 3]


pytestmark = pytest.mark.timeout(30)
SIZE = 1 << 20


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
