"""Run a coroutine eagerly: finish synchronously when it never suspends.

Theory of operation
-------------------
Most device operations on the hot path (a page-cache hit, memory) complete without
awaiting anything.  Creating a Task for each would cost a loop iteration and several
allocations per request.  :func:`start` steps the coroutine once with ``send(None)``:
``StopIteration`` means it finished and its value is returned at once.  Otherwise the
coroutine yielded the future it waits on; :class:`Continuation` is an awaitable that
hands that very future to the Task driving it and then keeps forwarding values and
exceptions to the coroutine, so a Task can take over a half-run coroutine.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Continuation(Generic[T]):
    """The rest of a coroutine that suspended on its first step."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, T], first: Any) -> None:
        self.coro = coro
        self.first = first
        # A future yielded by ``await`` is marked "blocking" until a Task takes it; while
        # marked, another await on it raises "await wasn't used with future".  Several
        # coroutines stepped eagerly in one callback may wait on one future (a shared
        # drain or lock), so unmark it now and mark it again when handing it to the Task.
        if getattr(first, "_asyncio_future_blocking", False):
            first._asyncio_future_blocking = False

    def __await__(self) -> Generator[Any, Any, T]:
        coro = self.coro
        pending = self.first
        if getattr(pending, "_asyncio_future_blocking", None) is False:
            pending._asyncio_future_blocking = True
        while True:
            try:
                value = yield pending
            except BaseException as exc:  # forwarded (cancellation included)
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                continue
            try:
                pending = coro.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
