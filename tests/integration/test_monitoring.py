"""Monitoring end to end: a real Prometheus scraping a ``dst up --metrics`` cluster.

Known I/O through a real client shows up in Prometheus with the right counts, byte
totals and rates; a node killed under writes shows as a failed leg and a degraded array
(and fires the DstArrayDegraded alert, evaluated by Prometheus from the repository's
rules); the node restarted is re-added and the delta resync copies exactly the regions
written meanwhile.  Every expression of the Grafana dashboard and of the alert rules is
evaluated by the live server: no error, and the series it reads are there.
``promtool`` checks the rules and runs their unit tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from dst.meta.layout import DEFAULT_REGION_SIZE
from dst.net.client import NbdClient
from tests.support.cluster import DST, Cluster, run, unix_uri

from . import prom
from .arrays import member_data
from .helpers import require
from .test_up import _start_up

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
KiB, MiB = 1 << 10, 1 << 20
REGION = DEFAULT_REGION_SIZE  # (dst up's)
WRITES, WSIZE = 48, 64 * KiB  # the known I/O: 3 MiB written ...
READS, RSIZE = 20, 16 * KiB  # ... and 320 KiB read
OUTAGE = 2  # regions written while node-b is down


def pattern(i: int, size: int) -> bytes:
    return bytes([i % 251 + 1]) * size


async def write_and_read(uri: str) -> None:
    async with await NbdClient.connect(uri) as c:
        for i in range(WRITES):
            await c.write(i * WSIZE, pattern(i, WSIZE))
        for i in range(READS):
            assert await c.read(i * RSIZE, RSIZE) == pattern(i * RSIZE // WSIZE, RSIZE)


async def write_outage(uri: str) -> None:
    async with await NbdClient.connect(uri) as c:
        for i in range(OUTAGE):
            await c.write(i * REGION, pattern(100 + i, REGION))


async def read_all(uri: str) -> bytes:
    async with await NbdClient.connect(uri) as c:
        return bytes(await c.read(0, WRITES * WSIZE))


def expected() -> bytes:
    data = bytearray(b"".join(pattern(i, WSIZE) for i in range(WRITES)))
    for i in range(OUTAGE):
        data[i * REGION : (i + 1) * REGION] = pattern(100 + i, REGION)
    return bytes(data)


def serve_pid(data_dir: Path, name: str) -> int:
    """The pid of the ``dst serve`` process (dst up's child) serving ``name``.img."""
    want = os.fsencode(data_dir / f"{name}.img")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in argv and want in argv:
                return int(entry.name)
    raise AssertionError(f"no dst serve for {name}")


def fast_rules(tmp: Path) -> Path:
    """The repository's rules with every ``for`` cut to 0s (an alert fires at the first
    evaluation its condition holds: the test cannot wait minutes)."""
    text = (MONITORING / "dst-alerts.yml").read_text()
    out = tmp / "dst-alerts.yml"
    out.write_text(re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 0s", text))
    return out


def dashboard_exprs() -> list[str]:
    doc = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    return [e.replace("$array", ".*").replace("$__rate_interval", "20s") for e in exprs]


def check_expression(p: prom.Prometheus, expr: str, *, nonempty: bool) -> None:
    """``expr`` evaluates without error; every dst metric it reads has series (and with
    ``nonempty`` so has the expression)."""
    result = p.query(expr)
    for name in set(re.findall(r"\b(?:dst|process)_[a-z_]+\b", expr)):
        assert p.values(f"count({name})"), f"{expr}: no series {name}"
    if nonempty:
        assert result, f"{expr}: no series"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_prometheus_scrapes_a_dst_up_cluster(cluster: Cluster) -> None:
    require("prometheus", "promtool")
    tmp_path, sockdir = cluster.work, cluster.sockets
    data_dir, sock, control = tmp_path / "data", sockdir / "dst.sock", sockdir / "control.sock"
    cmd = [*DST, "up", "--dir", str(data_dir), "--size", "64M", "--listen", f"unix:{sock}"]
    cmd += ["--control", str(control), "--metrics", "127.0.0.1:0"]
    up, _, out = _start_up(cmd)
    p: prom.Prometheus | None = None
    try:
        urls = dict(re.findall(r"metrics on (\S+) \((.+)\)", "".join(out)))
        urls = {name: url for url, name in urls.items()}
        assert set(urls) == {"array daemon", "node-a", "node-b"}, out
        hostports = {n: u.removeprefix("http://").removesuffix("/metrics") for n, u in urls.items()}
        p = prom.start(tmp_path / "prometheus", sorted(hostports.values()), [fast_rules(tmp_path)])
        p.wait('count(up{job="dst"} == 1)', lambda v: v == 3, "three targets up")
        uri = unix_uri(sock)

        # -- known I/O: exact counters, bytes and rates ---------------------------------
        asyncio.run(write_and_read(uri))
        arr = 'array="demo"'
        p.wait(f'dst_array_requests_total{{{arr},op="write"}}', lambda v: v == WRITES, "writes")
        p.wait(f'dst_array_requests_total{{{arr},op="read"}}', lambda v: v == READS, "reads")
        assert p.value(f'dst_array_bytes_total{{{arr},op="write"}}') == WRITES * WSIZE
        assert p.value(f'dst_array_bytes_total{{{arr},op="read"}}') == READS * RSIZE
        for node in ("node-a", "node-b"):  # the data plus the write-intent metadata
            mine = f'dst_node_bytes_total{{node="{node}",op="write"}}'
            theirs = f'dst_member_bytes_total{{{arr},node="{node}",op="write"}}'
            p.wait(mine, lambda v: (v or 0) >= WRITES * WSIZE, f"{node}'s writes")
            # what the daemon sent is what the node got (each scraped on its own clock)
            p.wait(f"{mine} - ignoring(array, target, instance) {theirs}", lambda v: v == 0, node)
        count = p.value(f'dst_array_request_duration_seconds_count{{{arr},op="write"}}')
        assert count == WRITES
        # the window holds the samples from before the I/O (0) and after it: the
        # increase is the count done, give or take Prometheus's extrapolation at its end
        p.wait('count_over_time(dst_array_inflight{array="demo"}[30s])', lambda v: (v or 0) >= 3,
               "three samples")  # fmt: skip
        now = time.time()
        rate = p.value(f'rate(dst_array_bytes_total{{{arr},op="write"}}[30s])', at=now)
        inc = p.value(f'increase(dst_array_bytes_total{{{arr},op="write"}}[30s])', at=now)
        assert rate is not None and inc is not None
        assert WRITES * WSIZE <= inc <= 1.35 * WRITES * WSIZE, inc
        assert rate * 30 == pytest.approx(inc)
        assert p.value(f"dst_resync_done_bytes{{{arr}}}") == 0

        # -- a node killed under writes: failed leg, degraded array, the alert fires ----
        where = json.loads(run([*DST, "status", "--json", "--control", str(control)]).stdout)
        legs = {n["name"]: n["where"] for n in where["arrays"][0]["root"]["members"]}
        os.kill(serve_pid(data_dir, "node-b"), signal.SIGKILL)
        asyncio.run(write_outage(uri))
        b = f'{arr},target="mirror",node="node-b"'
        p.wait(f'dst_member_state{{{b},state="failed"}}', lambda v: v == 1, "node-b failed")
        assert p.value(f'dst_member_state{{{b},state="in_sync"}}') == 0
        p.wait(f"dst_array_degraded{{{arr}}}", lambda v: v == 1, "array degraded")
        p.wait(f"dst_member_missing_regions{{{b}}}", lambda v: v == OUTAGE, "missed regions")
        p.wait('ALERTS{alertname="DstArrayDegraded",alertstate="firing",array="demo"}',
               lambda v: v == 1, "DstArrayDegraded firing")  # fmt: skip
        firing = [a for a in p.api("alerts")["alerts"] if a["state"] == "firing"]
        assert any(a["labels"]["alertname"] == "DstArrayDegraded" for a in firing), firing

        # -- every dashboard panel and alert expression, evaluated by Prometheus --------
        for expr in dashboard_exprs():
            check_expression(p, expr, nonempty=True)
        p.wait("count(dst_array_state)", lambda v: v == 3, "the dashboard's array variable")
        rules = [r for g in p.api("rules")["groups"] for r in g["rules"]]
        names = {r["name"] for r in rules}
        assert {"DstArrayDegraded", "DstResyncStalled", "DstLatencyHigh", "DstLegFlapping"} <= names
        for r in rules:
            assert r["health"] == "ok", r
            check_expression(p, r["query"], nonempty=False)

        # -- back: re-added, delta resync of exactly the regions written meanwhile ------
        port = int(legs["node-b"].rsplit(":", 1)[1].split("/")[0])
        cluster.node(  # stopped, and checked, by the fixture
            "node-b",
            path=data_dir / "node-b.img",
            listen=[f"127.0.0.1:{port}"],
            args=["--name", "node-b", "--metrics", hostports["node-b"], "--metrics-tls", "off"],
        )
        t = f'{arr},target="mirror"'
        p.wait(f'dst_member_state{{{b},state="in_sync"}}', lambda v: v == 1, "node-b in sync")
        p.wait(f'dst_resync_bytes_total{{{t},kind="delta"}}', lambda v: v == OUTAGE * REGION,
               "the delta resync")  # fmt: skip
        assert p.value(f'dst_resync_bytes_total{{{t},kind="full"}}') == 0
        assert p.value(f"dst_resync_done_bytes{{{t}}}") == OUTAGE * REGION
        assert p.value(f"dst_resync_total_bytes{{{t}}}") == OUTAGE * REGION
        assert (p.value(f"dst_resyncs_total{{{t}}}") or 0) >= 1
        assert p.value(f"dst_member_failures_total{{{b}}}") == 1
        assert p.value(f"dst_member_reconnects_total{{{b}}}") == 1
        p.wait(f"dst_array_degraded{{{arr}}}", lambda v: v == 0, "array clean")
        # the progress series went from nothing done to everything done
        assert p.values(f"min_over_time(dst_resync_done_bytes{{{t}}}[5m])") == [0]
        assert asyncio.run(read_all(uri)) == expected()
    finally:
        if p is not None:
            p.stop()
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)
        rc = up.wait(timeout=30)
    assert rc == 0
    size = WRITES * WSIZE
    a, b_img = member_data(data_dir / "node-a.img"), member_data(data_dir / "node-b.img")
    assert a[:size] == b_img[:size] == expected(), "mirror legs differ"


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    require("promtool")
    run(["promtool", "check", "rules", MONITORING / "dst-alerts.yml"])
    run(["promtool", "check", "config", MONITORING / "prometheus.yml"])
    out = run(["promtool", "test", "rules", "dst-alerts.test.yml"], cwd=MONITORING)
    assert "SUCCESS" in out.stdout + out.stderr


def test_dashboard_is_grafana_json() -> None:
    doc = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert doc["uid"] and doc["title"] == "dst"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"] and all(t["expr"] for t in p["targets"])
    assert [v["name"] for v in doc["templating"]["list"]] == ["datasource", "array"]
