"""Prometheus metric families from dst's own counters, built at scrape time.

Theory of operation
-------------------
Nothing on the request path calls ``prometheus_client``: the devices keep plain
integers (:class:`~dst.device.IOCounters`, :class:`~dst.stats.Histogram`), the servers
theirs (:class:`~dst.net.counters.ServerCounters`), and a *collector* -- a function
returning metric families -- reads them when ``/metrics`` is scraped
(:class:`Collector`, registered in a ``prometheus_client`` registry; the endpoint is
:mod:`dst.net.metricsserver`).  This module builds the families every process shares:

* :func:`io_families`: the I/O of a set of devices (an array's export, its members, a
  node's export) under one prefix: ``P_requests_total{op}``, ``P_bytes_total{op}``,
  ``P_errors_total{errno}``, ``P_inflight`` and the latency histogram
  ``P_request_duration_seconds{op}`` (buckets of :mod:`dst.stats`, 16 us to 17 s);
* :func:`server_families`: an NBD server's connections, handshake failures and TLS
  sessions under the same prefix;
* :func:`process_families`: the process's memory budget (:mod:`dst.net.budget`) and
  ``dst_info``.

The array daemon's collector (:mod:`dst.array.metrics`) and the node's
(:func:`node_collector`) put them together; ``docs/monitoring.md`` lists every metric.
"""

from __future__ import annotations

import errno as errnos
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector as _Collector
from prometheus_client.registry import CollectorRegistry

from dst import __version__
from dst.device import IOCounters
from dst.net import budget as budgets
from dst.net.server import NbdServer
from dst.stats import Histogram

Labels = Sequence[str]
ERRNOS = (errnos.EIO, errnos.ETIMEDOUT, errnos.ENOSPC)
"""Errors exported even before they happened (0), so rates and alerts see a series."""


@dataclass(frozen=True, slots=True)
class IoRow:
    """One device's I/O: its label values, counters and requests in flight."""

    labels: tuple[str, ...]
    counters: IOCounters
    inflight: int


def errno_name(n: int) -> str:
    """``EIO`` for 5; the number itself for an errno Python does not know."""
    return errnos.errorcode.get(n, str(n))


def histogram_buckets(h: Histogram) -> list[tuple[str, float]]:
    """``h`` as Prometheus buckets (cumulative, ``le`` in seconds, ``+Inf`` last)."""
    return [("+Inf" if le == float("inf") else repr(le), float(n)) for le, n in h.buckets()]


def io_families(prefix: str, what: str, names: Labels, rows: Iterable[IoRow]) -> list[Metric]:
    """The I/O families of ``rows`` (module docstring); ``what`` says whose I/O it is in
    the help texts ("array export", "member")."""
    requests = CounterMetricFamily(
        f"{prefix}_requests", f"Requests completed or failed ({what}), by operation",
        labels=[*names, "op"],
    )  # fmt: skip
    nbytes = CounterMetricFamily(
        f"{prefix}_bytes", f"Bytes read, written, trimmed or zeroed ({what}), by operation",
        labels=[*names, "op"],
    )  # fmt: skip
    errors = CounterMetricFamily(
        f"{prefix}_errors", f"Requests that failed ({what}), by errno", labels=[*names, "errno"]
    )
    inflight = GaugeMetricFamily(
        f"{prefix}_inflight", f"Requests in flight ({what})", labels=list(names)
    )
    latency = HistogramMetricFamily(
        f"{prefix}_request_duration_seconds",
        f"Time from a request's arrival to its answer ({what}), by operation",
        labels=[*names, "op"],
    )
    timed = False
    for row in rows:
        c, lv = row.counters, list(row.labels)
        for op, n in (("read", c.reads), ("write", c.writes), ("flush", c.flushes),
                      ("trim", c.trims), ("zero", c.zeroes)):  # fmt: skip
            requests.add_metric([*lv, op], n)
        for op, n in (("read", c.read_bytes), ("write", c.write_bytes),
                      ("trim", c.trim_bytes), ("zero", c.zero_bytes)):  # fmt: skip
            nbytes.add_metric([*lv, op], n)
        for code, n in sorted((dict.fromkeys(ERRNOS, 0) | c.errnos).items()):
            errors.add_metric([*lv, errno_name(code)], n)
        inflight.add_metric(lv, row.inflight)
        if c.timing is not None:
            timed = True
            for op, h in c.timing.items():
                latency.add_metric([*lv, op], histogram_buckets(h), h.total_ns / 1e9)
    out: list[Metric] = [requests, nbytes, errors, inflight]
    return [*out, latency] if timed else out


def server_families(
    prefix: str, names: Labels, servers: Iterable[tuple[tuple[str, ...], NbdServer]]
) -> list[Metric]:
    """Connections, handshake failures and TLS sessions of NBD servers."""
    conns = GaugeMetricFamily(
        f"{prefix}_connections", "NBD client connections open now", labels=list(names)
    )
    accepted = CounterMetricFamily(
        f"{prefix}_connections_accepted", "NBD client connections accepted", labels=list(names)
    )
    refused = CounterMetricFamily(
        f"{prefix}_connections_refused",
        "NBD client connections closed at once: over max_connections",
        labels=list(names),
    )
    failures = CounterMetricFamily(
        f"{prefix}_handshake_failures",
        "NBD handshakes that failed, by reason (timeout, protocol, denied, tls)",
        labels=[*names, "reason"],
    )
    tls = CounterMetricFamily(
        f"{prefix}_tls_handshakes", "TLS sessions established (STARTTLS)", labels=list(names)
    )
    for labels, server in servers:
        lv = list(labels)
        conns.add_metric(lv, len(server.connections))
        c = server.counters
        accepted.add_metric(lv, c.accepted)
        refused.add_metric(lv, server.refused)
        for reason, n in c.handshake_failures.items():
            failures.add_metric([*lv, reason], n)
        tls.add_metric(lv, c.tls_handshakes)
    return [conns, accepted, refused, failures, tls]


def process_families(role: str) -> list[Metric]:
    """``dst_info`` and the process's memory budget for client payloads."""
    info = GaugeMetricFamily("dst_info", "dst version and process role", labels=["version", "role"])
    info.add_metric([__version__, role], 1)
    b = budgets.DEFAULT
    return [
        info,
        GaugeMetricFamily(
            "dst_memory_budget_limit_bytes",
            "Bytes of client payload this process may hold",
            value=b.limit,
        ),
        GaugeMetricFamily(
            "dst_memory_budget_used_bytes", "Bytes of client payload held now", value=b.used
        ),
        GaugeMetricFamily(
            "dst_memory_budget_peak_bytes",
            "Most bytes of client payload held at once",
            value=b.peak,
        ),
    ]


class Collector(_Collector):
    """A ``prometheus_client`` collector over a function that returns families."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def registry(collect: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry with ``collect`` and the client library's process metrics
    (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ...)."""
    from prometheus_client import PlatformCollector, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    reg.register(Collector(collect))
    return reg


def node_collector(
    name: str, server: NbdServer, counters: IOCounters, inflight: Callable[[], int]
) -> Callable[[], list[Metric]]:
    """What ``dst serve --metrics`` exports: its export's I/O, its server, its process
    (``node`` is the export's name)."""
    labels = (name,)

    def collect() -> list[Metric]:
        row = IoRow(labels, counters, inflight())
        return [
            *io_families("dst_node", "node export", ["node"], [row]),
            *server_families("dst_node", ["node"], [(labels, server)]),
            *process_families("node"),
        ]

    return collect
