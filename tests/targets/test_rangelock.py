"""RangeLock's plain API (register/wait/release): the mirror's hot path."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.targets.rangelock import GRAIN, WIDE, Hold, RangeLock

pytestmark = pytest.mark.timeout(10)


async def test_uncontended_needs_no_wait() -> None:
    lock = RangeLock()
    a = lock.register(0, 10)
    b = lock.register(10, 10)  # adjacent: no overlap
    assert a.earlier is None and b.earlier is None and len(lock) == 2
    lock.release(a)
    lock.release(a)  # idempotent
    lock.release(b)
    assert len(lock) == 0


async def test_overlaps_run_in_arrival_order() -> None:
    lock = RangeLock()
    order: list[str] = []
    first = lock.register(0, 100)

    async def later(name: str, off: int, n: int) -> None:
        h = lock.register(off, n)
        try:
            await lock.wait(h)
            order.append(name)
            await asyncio.sleep(0)
        finally:
            lock.release(h)

    tasks = [asyncio.ensure_future(later("b", 50, 100)), asyncio.ensure_future(later("c", 120, 10))]
    await asyncio.sleep(0)
    assert order == []  # b waits for first; c for b (registered before it)
    lock.release(first)
    await asyncio.gather(*tasks)
    assert order == ["b", "c"] and len(lock) == 0


async def test_cancelled_waiter_does_not_disturb_others() -> None:
    lock = RangeLock()
    first = lock.register(0, 10)
    w1 = lock.register(0, 10)
    w2 = lock.register(5, 10)  # waits for first and w1
    t1 = asyncio.ensure_future(lock.wait(w1))
    t2 = asyncio.ensure_future(lock.wait(w2))
    await asyncio.sleep(0)
    t1.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t1
    lock.release(w1)
    await asyncio.sleep(0)
    assert not t2.done()  # still behind first
    lock.release(first)
    await t2
    lock.release(w2)
    assert len(lock) == 0


async def test_range_lock_orders_overlaps_only() -> None:
    lock = RangeLock()
    order: list[str] = []
    gate = asyncio.Event()

    async def hold(name: str, off: int, n: int, wait: bool = False) -> None:
        async with lock.hold(off, n):
            order.append(name + "+")
            if wait:
                await gate.wait()
            order.append(name + "-")

    a = asyncio.ensure_future(hold("a", 0, 10, wait=True))
    b = asyncio.ensure_future(hold("b", 5, 10))  # overlaps a: waits
    c = asyncio.ensure_future(hold("c", 10, 10))  # overlaps b only... and waits for it
    d = asyncio.ensure_future(hold("d", 100, 10))  # independent
    await d
    assert order == ["a+", "d+", "d-"]
    gate.set()
    await asyncio.gather(a, b, c)
    assert order == ["a+", "d+", "d-", "a-", "b+", "b-", "c+", "c-"]
    assert len(lock) == 0


async def test_range_lock_cancelled_waiter_releases() -> None:
    lock = RangeLock()
    gate = asyncio.Event()

    async def holder() -> None:
        async with lock.hold(0, 10):
            await gate.wait()

    h = asyncio.ensure_future(holder())
    await asyncio.sleep(0)
    w = asyncio.ensure_future(holder())
    await asyncio.sleep(0)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert len(lock) == 1
    gate.set()
    await h
    assert len(lock) == 0


@given(
    st.lists(
        st.tuples(
            st.booleans(),  # release an earlier hold (else register a range)
            st.integers(0, 300 * GRAIN),  # offset
            st.sampled_from([0, 1, 4096, GRAIN - 1, GRAIN, 3 * GRAIN, (WIDE + 2) * GRAIN]),
            st.integers(0, 1000),  # which hold to release
        ),
        max_size=60,
    )
)
@settings(max_examples=300, deadline=None)
def test_earlier_is_every_overlapping_hold_whatever_the_index(
    ops: list[tuple[bool, int, int, int]],
) -> None:
    """The bucket index finds exactly what a scan of every hold finds: the earlier
    holds that overlap, small, spanning buckets, empty or too wide to index."""
    lock = RangeLock()
    live: list[Hold] = []
    for release, offset, length, pick in ops:
        if release and live:
            lock.release(live.pop(pick % len(live)))
            continue
        hold = lock.register(offset, length)
        end = offset + length
        want = {id(h) for h in live if h.start < end and offset < h.end}
        assert {id(h) for h in hold.earlier or ()} == want
        live.append(hold)
        assert len(lock) == len(live)
    for h in live:
        lock.release(h)
    assert len(lock) == 0 and not lock._index and not lock._wide  # nothing left indexed
