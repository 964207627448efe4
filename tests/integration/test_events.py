"""``dst events`` with real processes: a client of the event stream sees a node killed
under writes, re-added when it comes back and resynced, in that order.

Two ``dst serve`` nodes, a ``dst daemon`` with a mirror over them, and ``dst events
--now`` reading the stream as a user would; the writes go through dst's NBD client.
The node is killed with SIGKILL and started again on the same socket and file; the
data is checked on both legs at the end.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from dst.meta.layout import member_size_for
from dst.net.client import NbdClient
from tests.support.cluster import DST, Cluster, remote

from .arrays import member_data

pytestmark = pytest.mark.timeout(120)
MiB, REGION = 1 << 20, 64 << 10
DATA = 8 * MiB
WAIT = 45.0


class Events:
    """``dst events --now`` in a process; :meth:`next` returns its events one by one."""

    def __init__(self, control: Path) -> None:
        cmd = [*DST, "events", "--now", "--control", str(control)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next(self) -> dict[str, Any]:
        line = self.lines.get(timeout=WAIT)
        assert line is not None, f"dst events ended; saw {self.seen}"
        event: dict[str, Any] = json.loads(line)
        self.seen.append(event)
        return event

    def until(self, **want: Any) -> dict[str, Any]:
        """The next event with the fields of ``want`` (the ones before are kept)."""
        while True:
            e = self.next()
            if all(e.get(k) == v for k, v in want.items()):
                return e

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


async def write(uri: str, offset: int, data: bytes) -> None:
    async with await NbdClient.connect(uri) as c:
        await c.write(offset, data)
        await c.flush()


@pytest.mark.slow
def test_events_across_a_node_kill_and_resync(cluster: Cluster) -> None:
    size = str(member_size_for(DATA))
    n0, n1 = cluster.node("leg0", size), cluster.node("leg1", size)
    daemon = cluster.start_daemon()
    events: Events | None = None
    try:
        target = {"type": "mirror", "name": "m", "members": [remote("a", n0.uri),
                                                             remote("b", n1.uri)]}  # fmt: skip
        uri = cluster.create("r", target)
        events = Events(daemon.control)
        now = [events.next() for _ in range(5)]
        assert [(e["event"], e["object"], e.get("node")) for e in now] == [
            ("exists", "array", None), ("exists", "node", "a"), ("exists", "node", "b"),
            ("exists", "resync", None), ("exists", "-", None),
        ]  # fmt: skip
        assert now[2]["state"] == "in_sync" and now[0]["degraded"] is False

        n1.kill()
        asyncio.run(write(uri, 0, b"\x5a" * (3 * REGION)))  # b misses regions 0-2
        failed = events.until(object="node", node="b")
        assert (failed["event"], failed["state"], failed["old"]["state"]) == (
            "change", "failed", "in_sync"
        )  # fmt: skip
        assert "not connected" in failed["reason"]
        degraded = events.until(object="array")
        assert degraded["degraded"] is True

        cluster.node("leg1", size)  # back on the same socket and file: re-added by itself
        readded = events.until(object="node", node="b")
        assert (readded["state"], readded["old"]["state"]) == ("resyncing", "failed")
        started = events.until(object="resync")
        assert (started["state"], started["kind"], started["targets"]) == (
            "running", "delta", ["b"]
        )  # fmt: skip
        in_sync = events.until(object="node", node="b")
        assert in_sync["state"] == "in_sync"
        done = events.until(object="resync")
        assert (done["state"], done["old"]["state"]) == ("done", "running")
        clean = events.until(object="array")
        assert clean["degraded"] is False
        seqs = [e["seq"] for e in events.seen]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        b = [e["state"] for e in events.seen if e.get("node") == "b"]
        assert [s for i, s in enumerate(b) if not i or s != b[i - 1]] == [
            "in_sync", "failed", "resyncing", "in_sync"
        ]  # fmt: skip
    finally:
        if events is not None:
            events.stop()
        cluster.close()  # every process stopped cleanly (the killed node excepted)
    expected = b"\x5a" * (3 * REGION)
    for i in range(2):
        assert member_data(cluster.work / f"leg{i}.img")[: 3 * REGION] == expected, f"leg {i}"
