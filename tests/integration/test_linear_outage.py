"""A linear array hides a short outage of one member from a real client.

Two ``dst serve`` nodes; the daemon reaches node 2 through a cuttable proxy (its own
process).  The verifying client (:class:`~tests.support.pattern_client.PatternClient`)
reads and writes 4 KiB blocks all over the array while the proxy is cut for ~2 s and
restored: it must see no error (it only stalls), no request to the cut node may
complete meanwhile, and afterwards every byte is checked through the array (nbdcopy)
and on the member files.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.cluster import Cluster, remote, wait_until
from tests.support.pattern_client import BLOCK, PatternClient, compare
from tests.support.proxy_process import ProxyProcess

from .arrays import MiB, fill, read_all
from .helpers import require

NODE_SIZE = 8 * MiB
OUTAGE = 2.0


def member_state(cluster: Cluster, name: str) -> str:
    states = {k["name"]: k["state"] for k in cluster.status("lin")["root"]["members"]}
    return str(states[name])


def test_linear_array_hides_a_two_second_cut(cluster: Cluster, tmp_path: Path) -> None:
    require("nbdsh", "nbdcopy")
    n0, n1 = cluster.node("n0", "8M"), cluster.node("n1", "8M")
    proxy = ProxyProcess(cluster.sockets / "p1.sock", cluster.sockets / "n1.sock")
    try:
        target = {
            "type": "linear",
            "members": [remote("n0", n0.uri), remote("n1", cluster.uri("p1"))],
        }
        cluster.start_daemon(cluster.spec("lin", target, io_timeout="10s"))
        uri = cluster.uri("lin")
        image = fill(uri, tmp_path, 2 * NODE_SIZE)
        c = PatternClient(uri, tmp_path, client=1, first=0, last=2 * NODE_SIZE // BLOCK,
                          read_every=3, base=tmp_path / "base.bin")  # fmt: skip
        c.wait_count(200)

        proxy.cut()
        cut_at = time.monotonic()
        wait_until(lambda: member_state(cluster, "n1") == "reconnecting", "n1 reconnecting")
        time.sleep(max(0.0, cut_at + OUTAGE - time.monotonic()))  # the outage itself
        assert c.proc.poll() is None, c.tail()
        before = c.count()
        proxy.restore()
        restored_at = time.monotonic()
        c.wait_count(before + 500)  # going on after the restore
        ops = c.finish()

        outage = restored_at - cut_at
        on_n1 = [op for op in ops if op.block >= NODE_SIZE // BLOCK]
        # sent after the cut (one answered just before it may still reach the client after)
        during = [op for op in on_n1 if cut_at < op.start and op.done < restored_at]
        assert not during, f"requests to n1 completed while it was cut off: {during[:3]}"
        # The client waited for n1 (the backoff adds up to 2 s after the restore), no longer.
        worst = max(op.latency for op in ops)
        assert OUTAGE * 0.8 < worst < outage + 4.0, (worst, outage)
        assert member_state(cluster, "n1") == "connected"

        expected = c.apply(image, ops)
        compare(read_all(uri, tmp_path), expected, what="array")
        cluster.daemon.dst("stop", "lin")  # flushed to the nodes
        log = cluster.daemon.stderr()
        assert "n1: lost connection" in log and "n1: reconnected" in log, log
        compare(n0.path.read_bytes(), expected[:NODE_SIZE], what="n0")
        compare(n1.path.read_bytes(), expected[NODE_SIZE:], what="n1")
    finally:
        proxy.stop()
