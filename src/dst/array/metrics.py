"""The array daemon's metrics: its arrays, their members, resync and replace, read off
the running trees at scrape time.

Theory of operation
-------------------
:func:`collector` returns the function the daemon's ``/metrics`` endpoint calls
(:mod:`dst.net.metricsserver`).  Each scrape walks every array's running tree the way
status does (:func:`dst.array.status.walk`: the same state words) and turns the
counters the devices keep anyway into metric families (:mod:`dst.net.metrics`):

* ``dst_array_*{array}``: the array's state, suspension and degradation, its export's
  I/O (counted by the root gate) and its NBD server's connections;
* ``dst_member_*{array,target,node}``: every storage node as the daemon sees it (the
  client side: counted by the node's gate), its state as an enum gauge, reconnects,
  and for mirror legs failures, timeouts and the regions the leg misses;
* ``dst_mirror_*``, ``dst_resync_*{array,target}``: write intent (dirty regions,
  bitmap writes) and the resync of every redundant target -- done, total, rate, ETA,
  its kind, and the bytes copied by kind;
* ``dst_replace_*{array}``: the running (or last) ``dst replace``.

Nothing here runs on the request path; a scrape of a daemon with a few arrays costs
well under a millisecond.  ``docs/monitoring.md`` lists every metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dst.array.array import Array
from dst.array.keeper import MirrorKeeper
from dst.array.status import walk
from dst.net.metrics import IoRow, io_families, process_families, server_families
from dst.targets.composite import HEALTHY
from dst.targets.gate import GateDevice
from dst.targets.redundant import Redundant

MEMBER_STATES = (
    "in_sync",
    "resyncing",
    "failed",
    "suspended",
    "connected",
    "reconnecting",
    "disconnected",
)
"""The states ``dst_member_state`` always has a series for (another one a member is in
gets its own series too)."""
UP = frozenset({*HEALTHY, "suspended"})  # a node's own health when it is reachable
ARRAY_STATES = ("created", "running", "stopped")
KINDS = ("full", "delta")
MEMBER = ["array", "target", "node"]
TARGET = ["array", "target"]


def collector(arrays: Mapping[str, Array]) -> Callable[[], list[Metric]]:
    """The collect function of a daemon whose arrays are ``arrays`` (read at each
    scrape)."""

    def collect() -> list[Metric]:
        current = list(arrays.values())
        return [*array_families(current), *process_families("daemon")]

    return collect


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def array_families(arrays: Iterable[Array]) -> list[Metric]:
    """Every family of the module docstring for ``arrays``."""
    state = _gauge("dst_array_state", "The array's state (1 for the current one)",
                   ["array", "state"])  # fmt: skip
    size = _gauge("dst_array_size_bytes", "Size of the array's export", ["array"])
    suspended = _gauge("dst_array_suspended", "1 while the array's I/O is held", ["array"])
    held = _gauge("dst_array_held_requests", "Requests held while suspended", ["array"])
    degraded = _gauge(
        "dst_array_degraded", "1 while a redundant target has a member not in sync", ["array"]
    )
    io: list[IoRow] = []
    servers = []
    members = _Members()
    for a in arrays:
        for s in ARRAY_STATES:
            state.add_metric([a.name, s], float(a.state == s))
        root = a.root
        if root is None:
            continue
        size.add_metric([a.name], root.size)
        suspended.add_metric([a.name], float(root.suspended))
        held.add_metric([a.name], root.held)
        io.append(IoRow((a.name,), root.counters, root.inflight))
        if a.server is not None:
            servers.append(((a.name,), a.server))
        degraded.add_metric([a.name], float(members.add(a)))
    return [
        state, size, suspended, held, degraded,
        *io_families("dst_array", "array export", ["array"], io),
        *server_families("dst_array", ["array"], servers),
        *members.families(),
    ]  # fmt: skip


class _Members:
    """The member, mirror, resync and replace families, filled array by array."""

    def __init__(self) -> None:
        self.io: list[IoRow] = []
        self.state = _gauge("dst_member_state", "The member's state (1 for the current one)",
                            [*MEMBER, "state"])  # fmt: skip
        self.up = _gauge(
            "dst_member_up", "1 while the daemon reaches the node (suspended included)", MEMBER
        )
        self.reconnects = _counter(
            "dst_member_reconnects", "Connections to the node found again after a loss", MEMBER
        )
        self.failures = _counter("dst_member_failures", "Times the mirror failed this leg",
                                 MEMBER)  # fmt: skip
        self.timeouts = _counter(
            "dst_member_leg_timeouts", "Requests to this leg not answered within leg_timeout",
            MEMBER,
        )  # fmt: skip
        self.missing = _gauge(
            "dst_member_missing_regions", "Regions this leg misses (to be resynced)", MEMBER
        )
        self.mirror = _Mirrors()
        self.replace = _Replaces()

    def add(self, a: Array) -> bool:
        """Add ``a``'s members; True if a redundant target of it is degraded."""
        assert a.root is not None
        degraded = False
        for dev, parent, state in walk(a.root.inner, keepers=a.keepers):
            if isinstance(dev, Redundant):
                degraded |= self.mirror.add(a, dev, a.keepers.get(dev.name))
                self._legs(a, dev)
            if not dev.node:
                continue
            labels = [a.name, parent.name if parent is not None else "", dev.name]
            for s in (*MEMBER_STATES, *([] if state in MEMBER_STATES else [state])):
                self.state.add_metric([*labels, s], float(state == s))
            if dev.counters is not None:
                inflight = dev.inflight if isinstance(dev, GateDevice) else 0
                self.io.append(IoRow(tuple(labels), dev.counters, inflight))
            health = dev.health()
            self.up.add_metric(labels, float(health.state in UP))
            reconnects = health.detail.get("reconnects")
            if isinstance(reconnects, int):
                self.reconnects.add_metric(labels, reconnects)
        self.replace.add(a)
        return degraded

    def _legs(self, a: Array, mirror: Redundant) -> None:
        rh = mirror.regions
        for leg in mirror.legs:
            labels = [a.name, mirror.name, leg.dev.name]
            self.failures.add_metric(labels, leg.failures)
            self.timeouts.add_metric(labels, leg.timeouts)
            self.missing.add_metric(labels, rh.missing(leg.index))

    def families(self) -> list[Metric]:
        return [
            *io_families("dst_member", "member, as the daemon sees it", MEMBER, self.io),
            self.state, self.up, self.reconnects, self.failures, self.timeouts, self.missing,
            *self.mirror.families(), *self.replace.families(),
        ]  # fmt: skip


class _Mirrors:
    """Write intent and resync of the redundant targets."""

    def __init__(self) -> None:
        self.dirty = _gauge("dst_mirror_dirty_regions",
                            "Regions marked in the write-intent bitmap", TARGET)  # fmt: skip
        self.region = _gauge("dst_mirror_region_size_bytes", "Write-intent region size", TARGET)
        self.writes = _counter("dst_mirror_bitmap_writes",
                               "Write-intent bitmap batches persisted", TARGET)  # fmt: skip
        self.pages = _counter("dst_mirror_bitmap_pages_written",
                              "Bitmap pages those batches wrote (to every attached leg)",
                              TARGET)  # fmt: skip
        self.legs = _gauge("dst_mirror_legs", "Legs of the mirror by state", [*TARGET, "state"])
        self.active = _gauge("dst_resync_active", "1 while a resync of this kind runs",
                             [*TARGET, "kind"])  # fmt: skip
        self.done = _gauge("dst_resync_done_bytes",
                           "Bytes of the current (or last) resync done", TARGET)  # fmt: skip
        self.total = _gauge("dst_resync_total_bytes",
                            "Bytes the current (or last) resync has to do", TARGET)  # fmt: skip
        self.remaining = _gauge("dst_resync_remaining_bytes",
                                "Bytes the current resync has still to do", TARGET)  # fmt: skip
        self.rate = _gauge("dst_resync_rate_bytes_per_second",
                           "Resync speed over the last seconds", TARGET)  # fmt: skip
        self.eta = _gauge("dst_resync_eta_seconds",
                          "Estimated seconds left (0 when not running or not known)",
                          TARGET)  # fmt: skip
        self.copied = _counter(
            "dst_resync_bytes",
            "Bytes copied by full and by delta resyncs; sparse_skip: bytes "
            "not copied because the source had a hole",
            [*TARGET, "kind"],
        )
        self.runs = _counter("dst_resyncs", "Resyncs finished (or stopped)", TARGET)

    def add(self, a: Array, mirror: Redundant, keeper: MirrorKeeper | None) -> bool:
        """Add one redundant target; True if it is degraded (a leg not in sync)."""
        lv = [a.name, mirror.name]
        rh = mirror.regions
        self.dirty.add_metric(lv, rh.tracker.bitmap.count())
        self.region.add_metric(lv, rh.region_size)
        self.writes.add_metric(lv, rh.bitmap_writes)
        self.pages.add_metric(lv, rh.bitmap_pages)
        states = [str(leg.state) for leg in mirror.legs]
        for s in ("in_sync", "resyncing", "failed"):
            self.legs.add_metric([*lv, s], states.count(s))
        if keeper is not None:
            self._resync(lv, keeper)
        return any(s != "in_sync" for s in states)

    def _resync(self, lv: list[str], keeper: MirrorKeeper) -> None:
        r = keeper.resyncer
        p: dict[str, Any] = r.progress()
        running = r.current is not None
        kind = p.get("kind", r.kind)
        for k in KINDS:
            self.active.add_metric([*lv, k], float(running and kind == k))
        per = p.get("bytes_per_region", 0)
        done, total = p.get("regions_done", 0) * per, p.get("regions_total", 0) * per
        self.done.add_metric(lv, done)
        self.total.add_metric(lv, total)
        self.remaining.add_metric(lv, max(total - done, 0) if running else 0)
        self.rate.add_metric(lv, p.get("rate", 0.0) if running else 0.0)
        self.eta.add_metric(lv, (p.get("eta") or 0.0) if running else 0.0)
        for k, n in r.bytes_by_kind().items():
            self.copied.add_metric([*lv, k], n)
        self.runs.add_metric(lv, r.runs)

    def families(self) -> list[Metric]:
        return [self.dirty, self.region, self.writes, self.pages, self.legs, self.active,
                self.done, self.total, self.remaining, self.rate, self.eta, self.copied,
                self.runs]  # fmt: skip


class _Replaces:
    """The running (or last) ``dst replace`` of every array."""

    def __init__(self) -> None:
        self.active = _gauge("dst_replace_active", "1 while a dst replace copies", ["array"])
        self.info = _gauge("dst_replace_info", "The current (or last) replace: nodes and state",
                           ["array", "node", "new", "state"])  # fmt: skip
        self.done = _gauge("dst_replace_done_bytes", "Bytes the replace copied so far", ["array"])
        self.total = _gauge("dst_replace_total_bytes", "Bytes the replace copies", ["array"])
        self.rate = _gauge("dst_replace_rate_bytes_per_second", "Replace copy speed", ["array"])
        self.eta = _gauge("dst_replace_eta_seconds",
                          "Estimated seconds left (0 when not running or not known)",
                          ["array"])  # fmt: skip

    def add(self, a: Array) -> None:
        job = a.replace_job
        running = job is not None and job.running
        p: dict[str, Any] = job.progress() if job is not None else {}
        self.active.add_metric([a.name], float(running))
        if job is not None:
            self.info.add_metric([a.name, p["old"], p["new"], p["state"]], 1)
        self.done.add_metric([a.name], p.get("bytes_done") or 0)
        self.total.add_metric([a.name], p.get("bytes_total") or 0)
        self.rate.add_metric([a.name], (p.get("rate") or 0.0) if running else 0.0)
        self.eta.add_metric([a.name], (p.get("eta") or 0.0) if running else 0.0)

    def families(self) -> list[Metric]:
        return [self.active, self.info, self.done, self.total, self.rate, self.eta]
