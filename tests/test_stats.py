"""Latency histograms of plain integers: bucketing by bit length, exact Prometheus
buckets, the timing switch."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dst import stats
from dst.device import IOCounters
from dst.stats import BOUNDS, FIRST_BIT, LAST_BIT, Histogram, Timing


def test_bounds_double_from_16us_to_17s() -> None:
    assert len(BOUNDS) == LAST_BIT - FIRST_BIT + 1 == 21
    assert BOUNDS[0] == pytest.approx(16.383e-6) and BOUNDS[-1] == pytest.approx(17.179869183)
    for a, b in itertools.pairwise(BOUNDS):
        assert (b * 1e9 + 1) == pytest.approx(2 * (a * 1e9 + 1))


@pytest.mark.parametrize(
    ("ns", "le"),
    [
        (0, BOUNDS[0]),
        (1, BOUNDS[0]),
        (2**14 - 1, BOUNDS[0]),  # 16383 ns: the first bucket's bound, included
        (2**14, BOUNDS[1]),  # 16384 ns: just over it
        (100_000, BOUNDS[3]),  # 100 us: (65.5 us, 131 us]
        (2**34 - 1, BOUNDS[-1]),
        (2**34, math.inf),  # over 17 s: only +Inf
        (3600 * 10**9, math.inf),
    ],
)
def test_one_duration_lands_in_its_bucket(ns: int, le: float) -> None:
    h = Histogram()
    h.observe(ns)
    buckets = h.buckets()
    first = next(bound for bound, n in buckets if n)
    assert first == le
    assert buckets[-1] == (math.inf, 1)
    assert h.count == 1 and h.total_ns == ns


@given(st.lists(st.integers(min_value=0, max_value=2**40), max_size=50))
def test_buckets_are_exact_and_cumulative(durations: list[int]) -> None:
    h = Histogram()
    for ns in durations:
        h.observe(ns)
    buckets = h.buckets()
    counts = [n for _, n in buckets]
    assert counts == sorted(counts)  # cumulative
    for bound, n in buckets:  # Prometheus's le: observations <= the bound
        assert n == sum(1 for ns in durations if ns / 1e9 <= bound or bound == math.inf)
    assert h.total_ns == sum(durations)


def test_quantile_is_the_bucket_bound() -> None:
    h = Histogram()
    assert h.quantile(0.99) == 0.0
    for _ in range(99):
        h.observe(50_000)  # 50 us: bucket (32.8 us, 65.5 us]
    h.observe(3 * 10**9)  # 3 s
    assert h.quantile(0.5) == BOUNDS[2]
    assert h.quantile(0.99) == BOUNDS[2]
    assert h.quantile(1.0) == pytest.approx(4.294967295)


def test_timing_is_off_until_enabled() -> None:
    was = stats.enabled()
    try:
        stats.enable(False)
        assert IOCounters().timing is None
        stats.enable()
        c = IOCounters()
        assert isinstance(c.timing, Timing)
        assert [op for op, _ in c.timing.items()] == ["read", "write", "flush", "trim", "zero"]
    finally:
        stats.enable(was)
