"""Eager stepping (dst.aio): coroutines that suspend hand over to a Task intact."""

from __future__ import annotations

import asyncio
from typing import Any

from dst.aio import Continuation


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
