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

:func:`run_all` is the same idea for a fan-out (a mirror write to every leg): instead of
a Task per coroutine (``asyncio.gather``), one caller steps all of them at once -- so
every request is issued before anything is awaited -- and then resumes each one when
the future it parked on is done, waiting on a single future of its own in between.
A deadline is one timer for the whole fan-out, not a Task or a timeout per coroutine;
nothing else is ever cancelled (the futures the coroutines wait on are not ours).

:func:`submit_coro` runs a device coroutine as a submitted request (the callback fast
path of :mod:`dst.device`): the fallback of a layer whose child has no fast path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator, Sequence
from typing import Any, Generic, TypeVar

from dst.device import Cancel, Done, no_cancel

T = TypeVar("T")
_running: set[asyncio.Task[None]] = set()  # submit_coro's Tasks (the loop keeps weak refs)


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


Outcome = BaseException | None


def _step(coro: Coroutine[Any, Any, Any], exc: BaseException | None) -> tuple[bool, Any]:
    """Resume ``coro`` (throwing ``exc`` in); ``(True, outcome)`` once it finished,
    ``(False, awaited)`` while it waits on ``awaited``."""
    try:
        awaited = coro.send(None) if exc is None else coro.throw(exc)
    except StopIteration:
        return True, None
    except BaseException as err:  # its outcome, whatever it is: the caller decides
        return True, err
    if getattr(awaited, "_asyncio_future_blocking", False):
        awaited._asyncio_future_blocking = False  # taken, as a Task takes it
    return False, awaited


def _stop(coro: Coroutine[Any, Any, Any], exc: BaseException) -> Outcome:
    """Throw ``exc`` into a parked ``coro``; close it if it still does not finish."""
    done, outcome = _step(coro, exc)
    if not done:
        coro.close()
        return exc
    return outcome  # type: ignore[no-any-return]


async def run_all(
    coros: Sequence[Coroutine[Any, Any, Any]], *, limit: float | None = None
) -> list[Outcome]:
    """Run ``coros`` concurrently without a Task each; per coroutine, the exception it
    raised, or None if it returned (its value is dropped).

    Every coroutine takes its first step before this returns or awaits anything.  With
    ``limit`` (seconds), the coroutines still running then get ``CancelledError``
    thrown in and their outcome is :class:`TimeoutError`.  If the caller is cancelled,
    the running coroutines are cancelled the same way and CancelledError propagates.
    """
    out: list[Outcome] = [None] * len(coros)
    parked: dict[int, Any] = {}  # index -> the future (or None: a bare yield) it awaits
    for i, coro in enumerate(coros):
        done, value = _step(coro, None)
        if done:
            out[i] = value
        else:
            parked[i] = value
    if not parked:
        return out
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle | None = None
    expired = False
    join: asyncio.Future[None] | None = None

    def wake(_: object = None) -> None:
        if join is not None and not join.done():
            join.set_result(None)

    def expire() -> None:
        nonlocal expired
        expired = True
        wake()

    if limit is not None:
        timer = loop.call_later(limit, expire)
    try:
        while parked:
            if expired:
                for i in parked:
                    stopped = _stop(coros[i], asyncio.CancelledError())
                    out[i] = (
                        TimeoutError() if isinstance(stopped, asyncio.CancelledError) else stopped
                    )
                break
            ready = [i for i, f in parked.items() if f is None or f.done()]
            if not ready:
                join = loop.create_future()
                futs = list(parked.values())
                for f in futs:
                    f.add_done_callback(wake)
                try:
                    await join
                finally:
                    for f in futs:
                        f.remove_done_callback(wake)
                continue
            if any(parked[i] is None for i in ready):
                await asyncio.sleep(0)  # a bare yield: let the loop run once first
            for i in ready:
                done, value = _step(coros[i], None)
                if done:
                    del parked[i]
                    out[i] = value
                else:
                    parked[i] = value
    except asyncio.CancelledError as exc:
        for i in parked:
            _stop(coros[i], asyncio.CancelledError())
        parked.clear()
        raise exc
    finally:
        if timer is not None:
            timer.cancel()
    return out


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
            _stop(self.coro, asyncio.CancelledError())  # saw it; let it unwind now
            self.report(asyncio.CancelledError(), None)
