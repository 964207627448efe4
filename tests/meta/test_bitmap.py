"""Sparse bitmap: unit tests and a model-based property test against a set."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.meta.bitmap import PAGE_BITS, Bitmap


def test_sparse_allocation_and_free() -> None:
    bm = Bitmap(10 * PAGE_BITS)
    assert bm.allocated_pages() == 0 and bm.count() == 0
    bm.set(3 * PAGE_BITS + 5)
    assert bm.allocated_pages() == 1 and bm.test(3 * PAGE_BITS + 5)
    bm.clear(3 * PAGE_BITS + 5)
    assert bm.allocated_pages() == 0 and list(bm) == []


def test_ranges() -> None:
    bm = Bitmap(200, page_bits=64)
    bm.set_range(10, 20)
    bm.set_range(60, 70)  # crosses a page boundary
    bm.set(199)
    assert list(bm.ranges()) == [(10, 20), (60, 70), (199, 200)]
    assert bm.count() == 21


def test_on_disk_bit_order() -> None:
    bm = Bitmap(PAGE_BITS)
    bm.set(0)
    bm.set(9)
    assert bm.page_bytes(0)[:2] == b"\x01\x02"
    assert len(bm.to_bytes()) == 4096


def test_unallocatable_page_reads_dirty() -> None:
    bm = Bitmap(3 * 64, page_bits=64, max_pages=1)
    bm.set(1)
    bm.set(70)  # page 1 cannot be allocated: the whole page reads as set
    assert bm.is_full(1)
    assert all(bm.test(i) for i in range(64, 128))
    assert not bm.test(128) and not bm.test(2)
    assert bm.count() == 1 + 64
    assert bm.page_bytes(1) == b"\xff" * 8
    bm.clear(70)  # still no room: stays full (conservative)
    assert bm.is_full(1) and bm.test(70)
    bm.clear(1)  # page 0 freed ...
    bm.clear(70)  # ... so page 1 can be materialised: all ones minus bit 70
    assert not bm.is_full(1) and not bm.test(70) and bm.count() == 63


def test_full_last_page_is_clipped_to_nbits() -> None:
    bm = Bitmap(70, page_bits=64, max_pages=0)
    bm.set(65)
    assert bm.count() == 6
    assert bm.page_bytes(1) == b"\x3f" + bytes(7)


def test_changed_pages() -> None:
    bm = Bitmap(4 * 64, page_bits=64)
    bm.set(3)
    bm.set(200)
    bm.set(3)  # no change
    assert bm.changed_pages() == [0, 3]
    snap = bm.take_changed()
    assert sorted(snap) == [0, 3] and snap[0][0] == 0b1000
    assert bm.changed_pages() == []
    bm.clear(5)  # was clear: no change
    assert bm.changed_pages() == []
    bm.clear(3)
    assert bm.take_changed() == {0: bytes(8)}


def test_from_bytes_round_trip_and_masking() -> None:
    bm = Bitmap(100, page_bits=64)
    for i in (0, 63, 64, 99):
        bm.set(i)
    raw = bytearray(bm.to_bytes())
    raw[-1] = 0xFF  # garbage past nbits is ignored
    back = Bitmap.from_bytes(100, raw, page_bits=64)
    assert list(back) == [0, 63, 64, 99]
    assert back.changed_pages() == []
    with pytest.raises(ValueError):
        Bitmap.from_bytes(100, raw[:8], page_bits=64)


def test_from_bytes_without_memory_is_full_and_changed() -> None:
    raw = b"\x01" + bytes(7) + b"\x02" + bytes(7)
    bm = Bitmap.from_bytes(128, raw, page_bits=64, max_pages=1)
    assert bm.test(0) and bm.is_full(1)
    assert bm.changed_pages() == [1]  # the disk does not hold all ones yet


ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "clear", "srange", "crange", "union", "wipe"]),
        st.integers(0, 299),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(ops, st.sampled_from([None, 0, 1, 2]))
def test_model(seq: list[tuple[str, int]], max_pages: int | None) -> None:
    """Against a set: exact without a page limit, a superset (never misses) with one."""
    bm = Bitmap(300, page_bits=64, max_pages=max_pages)
    model: set[int] = set()
    disk = bytearray(bm.npages * bm.page_len)
    for op, i in seq:
        span = range(i, min(300, i + 40)) if op in ("srange", "crange") else range(i, i + 1)
        if op == "union":
            other = Bitmap(300, page_bits=64)
            other.set_range(i, min(300, i + 90))
            other.set((i * 7) % 300)
            bm.update(other)
            model.update(other)
        elif op == "wipe":
            bm.clear_all()
            model.clear()
        elif op in ("set", "srange"):
            bm.set_range(span.start, span.stop)
            model.update(span)
        else:
            bm.clear_range(span.start, span.stop)
            model.difference_update(span)
        for p, data in bm.take_changed().items():
            disk[p * bm.page_len : (p + 1) * bm.page_len] = data
        got = set(bm)
        assert model <= got
        if max_pages is None:
            assert got == model
        assert bm.count() == len(got)
        assert all(bm.test(j) == (j in got) for j in range(300))
        assert [j for a, b in bm.ranges() for j in range(a, b)] == sorted(got)
        assert bm.next_set(i) == min((j for j in got if j >= i), default=None)
        assert bm.next_clear(i, 250) == min((j for j in range(i, 250) if j not in got), default=250)
        assert bytes(disk) == bm.to_bytes()  # changed pages are all the disk needs
        assert set(Bitmap.from_bytes(300, disk, page_bits=64)) == got


def test_bulk_operations_on_a_terabyte_of_regions_are_quick() -> None:
    """16 Mi regions (1 TiB in 64 KiB regions): whole-range operations cost per page."""
    import time

    n = 1 << 24
    bm = Bitmap(n)
    t = time.monotonic()
    assert len(bm.set_range(0, n)) == bm.npages
    assert bm.count() == n and list(bm.ranges()) == [(0, n)]
    other = Bitmap(n)
    other.update(bm)
    bm.clear_range(5, n - 5)
    assert list(bm.ranges()) == [(0, 5), (n - 5, n)]
    assert bm.next_set(5) == n - 5 and bm.next_clear(0) == 5
    assert time.monotonic() - t < 2.0  # a per-bit loop would take tens of seconds


@settings(max_examples=200)
@given(st.lists(st.lists(st.integers(0, 299), max_size=40), min_size=1, max_size=3))
def test_union_runs_and_count(sets: list[list[int]]) -> None:
    from dst.meta.bitmap import union_count, union_run

    bms = []
    for bits in sets:
        bm = Bitmap(300, page_bits=64)
        for i in bits:
            bm.set(i)
        bms.append(bm)
    union = set().union(*map(set, sets))
    assert union_count(bms) == len(union)
    got: list[int] = []
    pos = 0
    while (run := union_run(bms, pos)) is not None:
        got.extend(range(*run))
        assert run[1] == 300 or run[1] not in union
        pos = run[1]
    assert got == sorted(union)
