"""The array daemon in process, observed: its metrics scraped over HTTP match the I/O
done, and its event stream tells a leg's failure, re-add and resync in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dst import stats
from dst.array.daemon import Daemon
from dst.control import operations as op
from dst.control.client import ControlClient
from dst.net.client import NbdClient
from dst.net.metricsserver import MetricsOptions
from tests.support.scrape import matching, scrape, value

pytestmark = pytest.mark.timeout(60)
KiB, MiB = 1 << 10, 1 << 20
REGION = 64 * KiB


def mirror_spec(sock: Path) -> dict[str, Any]:
    legs = [{"type": "memory", "name": n, "size": 4 * MiB} for n in ("a", "b")]
    target = {"type": "mirror", "name": "mir", "members": legs, "region_size": REGION}
    return {"array": {"name": "demo", "listen": [f"unix:{sock}"], "target": target}}


@pytest.fixture
async def daemon(sock_dir: Path) -> AsyncIterator[Daemon]:
    was = stats.enabled()
    d = Daemon(str(sock_dir / "control.sock"), metrics=MetricsOptions.from_strings("0"))
    await d.start()
    try:
        await d.handle(op.Create(mirror_spec(sock_dir / "demo.sock")))
        yield d
    finally:
        await d.close()
        stats.enable(was)


async def test_metrics_follow_io_and_leg_state(daemon: Daemon, sock_dir: Path) -> None:
    assert daemon.metrics is not None
    url = daemon.metrics.url
    uri = f"nbd+unix:///?socket={sock_dir / 'demo.sock'}"
    s0 = await scrape(url)  # opening read the members' superblocks
    async with await NbdClient.connect(uri) as client:
        for i in range(8):
            await client.write(i * 32 * KiB, bytes([i]) * 32 * KiB)
        for i in range(4):
            await client.read(i * 8 * KiB, 8 * KiB)
        await client.flush()
        s = await scrape(url)
        arr = {"array": "demo"}
        assert value(s, "dst_array_requests_total", op="write", **arr) == 8
        assert value(s, "dst_array_bytes_total", op="write", **arr) == 256 * KiB
        assert value(s, "dst_array_requests_total", op="read", **arr) == 4
        assert value(s, "dst_array_bytes_total", op="read", **arr) == 32 * KiB
        assert value(s, "dst_array_request_duration_seconds_count", op="write", **arr) == 8
        assert value(s, "dst_array_state", state="running", **arr) == 1
        assert value(s, "dst_array_degraded", **arr) == 0
        assert value(s, "dst_array_connections", **arr) == 1
        for leg in ("a", "b"):
            lb = {"array": "demo", "target": "mir", "node": leg}
            # the data, and the write-intent bitmap pages and superblocks at the end
            assert value(s, "dst_member_bytes_total", op="write", **lb) >= 256 * KiB
            assert value(s, "dst_member_state", state="in_sync", **lb) == 1
            assert value(s, "dst_member_up", **lb) == 1
            assert value(s, "dst_member_request_duration_seconds_count", op="write", **lb) >= 8
        reads = [sum(matching(x, "dst_member_requests_total", op="read").values()) for x in (s0, s)]
        assert reads[1] - reads[0] == 4  # each read goes to one leg
        assert value(s, "dst_mirror_dirty_regions", array="demo", target="mir") == 4
        assert value(s, "dst_mirror_region_size_bytes", array="demo", target="mir") == REGION

        await daemon.handle(op.Fail(array="demo", node="b"))
        await client.write(0, b"x" * (3 * REGION))  # regions 0-2: b misses them
        s = await scrape(url)
        b = {"array": "demo", "target": "mir", "node": "b"}
        assert value(s, "dst_member_state", state="failed", **b) == 1
        assert value(s, "dst_member_state", state="in_sync", **b) == 0
        assert value(s, "dst_member_failures_total", **b) == 1
        assert value(s, "dst_member_missing_regions", **b) == 3
        assert value(s, "dst_array_degraded", **arr) == 1
        assert value(s, "dst_mirror_legs", state="failed", array="demo", target="mir") == 1

        await daemon.handle(op.Readd(array="demo", node="b"))
        keeper = daemon.arrays["demo"].keepers["mir"]
        await asyncio.wait_for(keeper.resyncer.wait_idle(), 30)
        s = await scrape(url)
        t = {"array": "demo", "target": "mir"}
        assert value(s, "dst_member_state", state="in_sync", **b) == 1
        assert value(s, "dst_resync_bytes_total", kind="delta", **t) == 3 * REGION
        assert value(s, "dst_resync_bytes_total", kind="full", **t) == 0
        assert value(s, "dst_resync_done_bytes", **t) == 3 * REGION
        assert value(s, "dst_resync_total_bytes", **t) == 3 * REGION
        assert value(s, "dst_resync_remaining_bytes", **t) == 0
        assert value(s, "dst_resyncs_total", **t) >= 1
        assert value(s, "dst_array_degraded", **arr) == 0


async def next_item(items: AsyncIterator[dict[str, Any]], **want: Any) -> dict[str, Any]:
    """The next event with the fields of ``want``; others are skipped."""
    async with asyncio.timeout(20):
        async for item in items:
            if all(item.get(k) == v for k, v in want.items()):
                return item
    raise AssertionError(f"stream ended before {want}")


async def test_events_tell_failure_readd_and_resync_in_order(
    daemon: Daemon, sock_dir: Path
) -> None:
    control = await ControlClient.connect(sock_dir / "control.sock")
    items = control.stream(op.Events(now=True))
    try:
        now = [await items.__anext__() for _ in range(5)]
        assert [(e["event"], e["object"], e.get("node")) for e in now] == [
            ("exists", "array", None), ("exists", "node", "a"), ("exists", "node", "b"),
            ("exists", "resync", None), ("exists", "-", None),
        ]  # fmt: skip
        seqs = [e["seq"] for e in now]
        assert seqs == sorted(seqs)
        assert {e.get("node"): e.get("state") for e in now if e["object"] == "node"} == {
            "a": "in_sync",
            "b": "in_sync",
        }

        await daemon.handle(op.Fail(array="demo", node="b"))
        failed = await next_item(items, object="node", node="b")
        assert (failed["event"], failed["state"], failed["old"]["state"]) == (
            "change", "failed", "in_sync"
        )  # fmt: skip
        degraded = await next_item(items, object="array")
        assert degraded["degraded"] is True and degraded["seq"] > failed["seq"]
        uri = f"nbd+unix:///?socket={sock_dir / 'demo.sock'}"
        async with await NbdClient.connect(uri) as client:
            await client.write(0, bytes(2 * REGION))  # b misses two regions

        await daemon.handle(op.Readd(array="demo", node="b"))
        readded = await next_item(items, object="node", node="b")
        assert (readded["state"], readded["old"]["state"]) == ("resyncing", "failed")
        started = await next_item(items, object="resync", state="running")
        assert started["kind"] == "delta" and started["targets"] == ["b"]
        in_sync = await next_item(items, object="node", node="b")
        assert in_sync["state"] == "in_sync"
        done = await next_item(items, object="resync")
        assert done["state"] == "done" and done["old"]["state"] == "running"
        clean = await next_item(items, object="array")
        assert clean["degraded"] is False
        order = [readded, started, in_sync, done, clean]
        assert [e["seq"] for e in order] == sorted(e["seq"] for e in order)
    finally:
        await items.aclose()
        await control.close()
