"""run_all (dst.aio): a fan-out without a Task per coroutine."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dst.aio import run_all

pytestmark = pytest.mark.timeout(10)


async def test_all_start_before_anything_is_awaited_and_all_finish() -> None:
    loop = asyncio.get_running_loop()
    started: list[int] = []
    futs = [loop.create_future() for _ in range(3)]

    async def leg(i: int) -> None:
        started.append(i)
        await futs[i]
        await asyncio.sleep(0)  # parks again, on a bare yield
        await futs[(i + 1) % 3]

    async def sync_leg() -> None:
        started.append(9)

    task = asyncio.ensure_future(run_all([leg(0), leg(1), sync_leg(), leg(2)]))
    await asyncio.sleep(0)
    assert started == [0, 1, 9, 2]
    for f in reversed(futs):
        f.set_result(None)
    assert await task == [None, None, None, None]


async def test_outcomes_are_exceptions_not_raised() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    async def fails_at_once() -> None:
        raise ValueError("now")

    async def fails_later() -> None:
        await fut

    task = asyncio.ensure_future(run_all([fails_at_once(), fails_later()]))
    await asyncio.sleep(0)
    fut.set_exception(OSError("later"))
    a, b = await task
    assert isinstance(a, ValueError) and isinstance(b, OSError)


async def test_limit_times_out_only_the_slow_ones() -> None:
    loop = asyncio.get_running_loop()
    cleaned: list[str] = []

    async def hangs() -> None:
        try:
            await loop.create_future()
        except asyncio.CancelledError:
            cleaned.append("hangs")
            raise

    async def quick() -> None:
        await asyncio.sleep(0)

    t = loop.time()
    a, b = await run_all([hangs(), quick()], limit=0.05)
    assert isinstance(a, TimeoutError) and b is None
    assert cleaned == ["hangs"] and loop.time() - t < 2


async def test_cancelling_the_caller_cancels_the_running_ones() -> None:
    loop = asyncio.get_running_loop()
    cleaned: list[int] = []
    stuck: asyncio.Future[Any] = loop.create_future()

    async def leg(i: int) -> None:
        try:
            await stuck
        finally:
            cleaned.append(i)

    task = asyncio.ensure_future(run_all([leg(0), leg(1)], limit=60))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [0, 1] and not stuck.cancelled()  # futures we do not own stay


async def test_stepped_outside_any_task() -> None:
    """The NBD server steps a device coroutine eagerly from a protocol callback: the
    fan-out must start (and may finish) there, without a current Task."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[list[Any]] = loop.create_future()

    async def leg() -> None:
        return None

    def callback() -> None:
        coro = run_all([leg(), leg()], limit=1.0)
        try:
            coro.send(None)
        except StopIteration as stop:
            done.set_result(stop.value)

    loop.call_soon(callback)
    assert await done == [None, None]
