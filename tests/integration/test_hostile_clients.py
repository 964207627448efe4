"""Hostile clients of an array, with real processes (issue 11, points 1 and 2).

A mirror of two ``dst serve`` nodes runs under a verifying client
(:class:`~tests.support.pattern_client.PatternClient`) while a hostile client

* floods the export with 128 READs of 32 MiB in one write and never reads a reply:
  the daemon holds at most its budget's share for it, both legs stay in sync (no leg is
  blamed for the flood), the verifying client sees no error, and neither the daemon
  nor the nodes grow beyond the budget;
* opens 50 connections, each sending a WRITE header announcing 32 MiB and a few bytes:
  the daemon's memory does not grow by the announced sizes, connections beyond
  ``--max-connections`` are refused at once, and the verifying client is served.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from dst.meta.layout import member_size_for
from dst.nbd import wire
from dst.nbd.client import encode_go
from dst.nbd.constants import IHAVEOPT, REQUEST_MAGIC, Cmd, Opt, Rep
from tests.support.cluster import Cluster, remote, wait_until
from tests.support.pattern_client import BLOCK, PatternClient

from .helpers import require

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20
DATA = 64 * MiB
BUDGET = 128 * MiB


def rss(pid: int) -> int:
    """Resident memory of process ``pid`` (bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@contextlib.contextmanager
def raw_client(sock: Path) -> Iterator[socket.socket]:
    """A connection to the array export that finished its handshake (GO)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    try:
        s.connect(str(sock))
        _recv(s, 18)  # greeting
        s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        payload = encode_go("")
        s.sendall(wire.OPTION.pack(IHAVEOPT, Opt.GO, len(payload)) + payload)
        while True:
            _, _, rep, n = wire.OPTION_REPLY.unpack(_recv(s, 20))
            _recv(s, n)
            if rep == Rep.ACK:
                break
        yield s
    finally:
        s.close()


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = s.recv(n - len(out))
        assert got, "connection closed"
        out += got
    return out


def request(typ: int, handle: int, offset: int, length: int) -> bytes:
    return wire.REQUEST.pack(REQUEST_MAGIC, 0, typ, handle, offset, length)


def mirror(cluster: Cluster, *options: str) -> tuple[str, Path]:
    require("nbdsh")
    daemon = cluster.start_daemon(options=options)
    nodes = [cluster.node(n, member_size_for(DATA)) for n in ("n0", "n1")]
    members = [remote(n.name, n.uri) for n in nodes]
    uri = cluster.create("a", {"type": "mirror", "name": "m", "members": members,
                               "leg_timeout": "2s"})  # fmt: skip
    del daemon
    return uri, cluster.sock("a")


def states(cluster: Cluster) -> list[str]:
    return [m["state"] for m in cluster.status("a")["root"]["members"]]


def test_a_flood_of_huge_reads_never_read_slows_only_its_client(cluster: Cluster) -> None:
    uri, sock = mirror(cluster, "--memory-budget", "128M")
    c = PatternClient(uri, cluster.work, client=1, first=0, last=DATA // BLOCK, read_every=3)
    c.wait_count(50)
    daemon, nodes = cluster.daemon, list(cluster.nodes.values())
    with raw_client(sock) as flood:
        flood.sendall(b"".join(request(Cmd.READ, i, 0, 32 * MiB) for i in range(128)))
        # served meanwhile, for longer than a leg timeout (2 s) several times over
        before = c.count()
        c.wait_count(before + 1500, timeout=120)
        assert states(cluster) == ["in_sync", "in_sync"]  # no leg blamed for the flood
        assert rss(daemon.pid) < BUDGET + 160 * MiB, rss(daemon.pid)
        for n in nodes:  # a node holds what the daemon asked of it: bounded as well
            assert rss(n.pid) < BUDGET + 160 * MiB, (n.name, rss(n.pid))
    ops = c.finish()  # "done": no error, every read verified in the client
    assert len(ops) > before
    assert states(cluster) == ["in_sync", "in_sync"]


def test_announced_payloads_cost_nothing_and_connections_are_bounded(cluster: Cluster) -> None:
    uri, sock = mirror(cluster, "--memory-budget", "128M", "--max-connections", "40")
    c = PatternClient(uri, cluster.work, client=2, first=0, last=DATA // BLOCK, read_every=2)
    c.wait_count(50)
    daemon = cluster.daemon
    before = rss(daemon.pid)
    with contextlib.ExitStack() as stack:
        accepted = refused = 0
        for i in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stack.callback(s.close)
            s.settimeout(30)
            s.connect(str(sock))
            if s.recv(18):  # greeted: accepted; closed at once: refused
                accepted += 1
                s.sendall(struct.pack(">I", 3))
                payload = encode_go("")
                s.sendall(wire.OPTION.pack(IHAVEOPT, Opt.GO, len(payload)) + payload)
                s.sendall(request(Cmd.WRITE, i, 0, 32 * MiB) + b"x" * 1000)
            else:
                refused += 1
        assert accepted == 39 and refused == 11  # 40 with the verifying client
        now = c.count()
        c.wait_count(now + 300, timeout=60)  # still served
        wait_until(lambda: "refused" in daemon.stderr(), "the refusals to be logged")
        grown = rss(daemon.pid) - before
        assert grown < 64 * MiB, grown  # 39 x 32 MiB announced, 39 KB arrived
    c.finish()
    assert states(cluster) == ["in_sync", "in_sync"]
