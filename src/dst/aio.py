"""Coroutine plumbing shared by every layer: eager stepping, submitted requests, task
sets, timeouts.  One meaning per name:

* :class:`Continuation` -- the rest of a coroutine stepped once by hand, for a Task to
  finish (the NBD server steps every request eagerly: most complete without waiting).
* :func:`submit_coro` -- run a coroutine as a *submitted* request (the callback form of
  :mod:`dst.device`): ``done(error, value)`` exactly once, synchronously if it never
  suspends, else from a Task; returns a canceller.
* :func:`wait_done` -- the other direction: await a submitted request (the coroutine
  form is the callback form plus a wait, as libnbd's blocking calls are its async calls
  plus a wait).
* :func:`gather_all` -- await several awaitables; if any failed, raise the first failure
  only once *all* ended (no child I/O is left in flight when a request fails).
* :class:`TaskSet` -- background tasks owned by one object; :func:`timed` -- an awaitable
  bounded in time, failing with ``BlockError(ETIMEDOUT)``.
* :data:`bind` -- ``bind(f, x)`` calls ``f(x, ...)``: a completion bound to its request
  (``types.MethodType``, so ``x`` must not be None: one small object; a
  ``functools.partial`` costs three times as much to make and call on Python 3.11, and
  the hot paths make one per request).

Theory of eager stepping
------------------------
A page-cache hit or a memory device completes without awaiting anything, and a Task per
request would cost a loop iteration and several allocations.  So a coroutine is stepped
once with ``send(None)``: ``StopIteration`` means it finished.  Otherwise it yielded the
future it waits on (or None, a bare yield); :class:`Continuation` is an awaitable that a
Task drives from there: it waits for that future *with a future of its own* (public
asyncio API only: the foreign future may be awaited by several stepped coroutines at
once; the future is *taken* as a Task takes it, see :func:`_take`), then resumes the
coroutine, and forwards cancellation by cancelling the future
the coroutine waits on -- exactly what a Task does when it is cancelled.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from types import MethodType
from typing import Any, Generic, TypeVar

from dst.device import Cancel, Done, no_cancel
from dst.errors import BlockError

T = TypeVar("T")
log = logging.getLogger(__name__)
bind: Callable[[Callable[..., Any], object], Callable[..., Any]] = MethodType  # (above)
_running: set[asyncio.Task[None]] = set()  # submit_coro's Tasks (the loop keeps weak refs)


def _wait_for(pending: Any) -> Awaitable[None]:
    """An awaitable that returns when ``pending`` (a future, or None: one loop turn)
    is done, without consuming its result."""
    if pending is None:
        return asyncio.sleep(0)
    waiter = asyncio.get_running_loop().create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    pending.add_done_callback(wake)
    return waiter


class Continuation(Generic[T]):
    """The rest of ``coro`` after its first step yielded ``first`` (module docstring)."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, T], first: Any) -> None:
        self.coro = coro
        self.first = _take(first)

    def __await__(self) -> Generator[Any, Any, T]:
        coro = self.coro
        pending = self.first
        while True:
            try:
                yield from _wait_for(pending).__await__()
            except BaseException as exc:  # forwarded (cancellation included)
                if pending is not None:
                    pending.cancel()  # as a Task cancels the future its coroutine awaits
                try:
                    pending = _take(coro.throw(exc))
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                continue
            try:
                pending = _take(coro.send(None))
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


def _take(yielded: Any) -> Any:
    """Take the future a stepped coroutine yielded, as a Task takes it: clear its
    ``_asyncio_future_blocking`` mark (the Future-like protocol of
    :func:`asyncio.isfuture`).  Until then, another coroutine awaiting the same pending
    future fails with "await wasn't used with future"."""
    if getattr(yielded, "_asyncio_future_blocking", False):
        yielded._asyncio_future_blocking = False
    return yielded


def submit_coro(coro: Coroutine[Any, Any, Any], done: Done) -> Cancel:
    """Run ``coro`` and report its outcome to ``done(error, value)`` exactly once.

    Stepped eagerly: if it never suspends, ``done`` is called before this returns.
    Otherwise a Task finishes it; the canceller returned cancels that Task (``done`` then
    gets the CancelledError, even if the Task had not started yet).
    """
    try:
        first = coro.send(None)
    except StopIteration as stop:
        done(None, stop.value)
        return no_cancel
    except (Exception, asyncio.CancelledError) as exc:
        done(exc, None)
        return no_cancel
    run = _Submitted(coro, done)
    task = asyncio.get_running_loop().create_task(run.finish(Continuation(coro, first)))
    _running.add(task)
    task.add_done_callback(run.ended)
    return task.cancel


class _Submitted:
    """The Task half of :func:`submit_coro`: ``done`` once, however the Task ends."""

    __slots__ = ("coro", "done", "reported")

    def __init__(self, coro: Coroutine[Any, Any, Any], done: Done) -> None:
        self.coro = coro
        self.done = done
        self.reported = False

    def report(self, exc: BaseException | None, value: Any) -> None:
        if not self.reported:
            self.reported = True
            self.done(exc, value)

    async def finish(self, rest: Continuation[Any]) -> None:
        try:
            value = await rest
        except (Exception, asyncio.CancelledError) as exc:
            self.report(exc, None)
        else:
            self.report(None, value)

    def ended(self, task: asyncio.Task[None]) -> None:
        _running.discard(task)
        if not self.reported:  # cancelled before its first step: the coroutine never
            try:  # saw it; let it unwind now
                self.coro.throw(asyncio.CancelledError())
            except BaseException:  # its outcome is the cancel, reported below
                pass
            else:
                self.coro.close()
            self.report(asyncio.CancelledError(), None)


async def wait_done(submit: Callable[[Done], Cancel]) -> Any:
    """Start a request with ``submit(done)`` and wait for its ``done``: its value, or
    its error raised.  Cancelled, the request's canceller is called (and the request's
    own outcome, if it still comes, is dropped)."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def done(exc: BaseException | None, value: Any) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)

    cancel = submit(done)
    if fut.done():
        return fut.result()
    try:
        return await fut
    except asyncio.CancelledError:
        if not fut.done() or fut.cancelled():
            cancel()
        raise


async def gather_all(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Results of ``aws`` in order; if any failed, raise the first failure after all end."""
    if len(aws) == 1:
        return [await aws[0]]
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


class TaskSet:
    """Background tasks owned by one object; failures are logged, :meth:`close` cancels."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str = "") -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def timed(op: Awaitable[T], seconds: float | None) -> T:
    """``op``, failing with ``BlockError(ETIMEDOUT)`` after ``seconds`` (None: no limit).

    Works outside a task too (a request stepped eagerly has no task to cancel): there
    ``op`` runs as a task of its own.
    """
    if seconds is None:
        return await op
    if asyncio.current_task() is None:
        return await asyncio.ensure_future(timed(op, seconds))
    try:
        async with asyncio.timeout(seconds):
            return await op
    except TimeoutError:
        raise BlockError(errno.ETIMEDOUT, f"no answer within {seconds} s") from None
