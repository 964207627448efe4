"""Latency histograms cheap enough for every request: plain integers, bucketed by bit length.

Theory of operation
-------------------
The hot path keeps its own counters and hands them to the monitoring system only when
it is scraped (:mod:`dst.net.metrics`): a :class:`Histogram` is a list of 64 integers
and a sum, and recording a duration of ``ns`` nanoseconds is::

    h.counts[ns.bit_length()] += 1
    h.total_ns += ns

about 0.2 us in CPython, where a ``prometheus_client`` ``Histogram.observe`` costs
3.4 us.  Slot ``b`` counts the durations of ``b`` bits, ``2**(b-1) <= ns < 2**b``, so
every slot is a bucket whose upper bound is ``2**b - 1`` ns: the buckets double, and
:data:`BOUNDS` exports those of 16 us (``2**14 - 1`` ns) to 17 s (``2**34 - 1`` ns) as
Prometheus buckets (``le`` in seconds, exact: no duration is counted in the wrong
bucket); shorter durations fall in the first one, longer ones only in ``+Inf``.

:class:`Timing` is one histogram per operation.  Timing is off unless the process
serves metrics (``--metrics``): :func:`enable` before the devices are built makes every
:class:`~dst.device.IOCounters` created afterwards carry a :class:`Timing`; without it
nobody reads the clock.
"""

from __future__ import annotations

from collections.abc import Iterator

SLOTS = 64  # bit lengths 0..63: any duration below 292 years
FIRST_BIT = 14  # the first exported bucket: durations of at most 14 bits (< 16.4 us)
LAST_BIT = 34  # the last: at most 34 bits (< 17.2 s)
BOUNDS: tuple[float, ...] = tuple((2**b - 1) / 1e9 for b in range(FIRST_BIT, LAST_BIT + 1))
"""The upper bounds of the exported buckets, in seconds (``+Inf`` comes after)."""

OPS = ("read", "write", "flush", "trim", "zero")
"""The operations timed, in :class:`Timing`'s order."""

_enabled = False


def enable(on: bool = True) -> None:
    """Time the I/O of the devices built from now on (the process serves metrics)."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


class Histogram:
    """Durations in nanoseconds by bit length (module docstring)."""

    __slots__ = ("counts", "total_ns")

    def __init__(self) -> None:
        self.counts = [0] * SLOTS
        self.total_ns = 0

    def observe(self, ns: int) -> None:
        """Record one duration (the hot path inlines these two lines)."""
        self.counts[ns.bit_length()] += 1
        self.total_ns += ns

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative ``(upper bound in seconds, count)`` for :data:`BOUNDS`, then
        ``(inf, total count)``: Prometheus's histogram buckets."""
        counts = self.counts
        cum = sum(counts[: FIRST_BIT + 1])
        out = [(BOUNDS[0], cum)]
        for i, b in enumerate(range(FIRST_BIT + 1, LAST_BIT + 1), start=1):
            cum += counts[b]
            out.append((BOUNDS[i], cum))
        out.append((float("inf"), cum + sum(counts[LAST_BIT + 1 :])))
        return out

    def quantile(self, q: float) -> float:
        """An upper bound of the ``q`` quantile in seconds (the bucket it falls in; 0
        with no observations): for status displays and tests."""
        total = self.count
        if not total:
            return 0.0
        rank = q * total
        seen = 0
        for bound, cum in self.buckets():
            seen = cum
            if seen >= rank:
                return bound
        return float("inf")


class Timing:
    """One :class:`Histogram` per operation of :data:`OPS`."""

    __slots__ = ("flush", "read", "trim", "write", "zero")

    def __init__(self) -> None:
        self.read = Histogram()
        self.write = Histogram()
        self.flush = Histogram()
        self.trim = Histogram()
        self.zero = Histogram()

    def items(self) -> Iterator[tuple[str, Histogram]]:
        for op in OPS:
            yield op, getattr(self, op)


def new_timing() -> Timing | None:
    """A :class:`Timing` when timing is on (:func:`enable`), else None."""
    return Timing() if _enabled else None
