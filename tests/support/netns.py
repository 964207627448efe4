"""Network namespaces for tests and benchmarks: a ``dst serve`` node on a host of its
own, joined to this one by a veth pair, optionally behind a bandwidth limit.

Theory of operation
-------------------
:func:`namespace` makes a namespace and a veth pair, one address of a free /30 of
198.18.0.0/15 (RFC 2544, benchmarking) on each end; names carry the process id and a
counter, so concurrent runs and several namespaces of one run do not collide.  Taking
the inner end down (:meth:`Netns.link`) is a silent partition: packets vanish, TCP
connections stay ESTABLISHED.  ``rate`` puts a token bucket (``tc tbf``) on the host
end, so what the host sends into the namespace -- a member's writes -- goes at most
``rate`` bytes per second: a member whose disk or link is the limit, not the CPU.
Everything is removed on exit, even on failure.  Root only.

:func:`node_in` starts ``dst serve`` inside a namespace, on its address (plain NBD: a
test network), as one of a :class:`~tests.support.cluster.Cluster`'s processes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.cluster import DST, LISTENING, Cluster, Node, run

_serial = itertools.count()


@dataclass
class Netns:
    """A network namespace joined to the host by a veth pair: the host end has
    ``host_ip``, the end inside (``inner``) has ``ip``."""

    name: str
    outer: str
    inner: str
    host_ip: str
    ip: str

    def link(self, up: bool) -> None:
        """Take the namespace's end of the link down (a silent partition) or up."""
        run(["ip", "-n", self.name, "link", "set", "dev", self.inner, "up" if up else "down"])


def _free_subnet() -> int:
    """A /30 of 198.18.0.0/15 no host interface uses."""
    used = run(["ip", "-4", "-o", "addr", "show"]).stdout
    start = (os.getpid() * 7) % 32768
    for k in range(32768):
        idx = (start + k) % 32768
        if f"198.{18 + idx // 16384}.{(idx % 16384) // 64}.{(idx % 64) * 4 + 1}/" not in used:
            return idx
    raise AssertionError("no free 198.18/15 subnet")


@contextlib.contextmanager
def namespace(rate: int | None = None) -> Iterator[Netns]:
    """A namespace for one node (module docstring); ``rate``: bytes per second the
    host may send into it (None: no limit)."""
    tag = f"{os.getpid()}{chr(ord('a') + next(_serial) % 26)}"
    name, outer, inner = f"dst{tag}n", f"dv{tag}a", f"dv{tag}b"
    idx = _free_subnet()
    prefix = f"198.{18 + idx // 16384}.{(idx % 16384) // 64}."
    host_ip, ip = f"{prefix}{(idx % 64) * 4 + 1}", f"{prefix}{(idx % 64) * 4 + 2}"
    try:
        run(["ip", "netns", "add", name])
        run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
        run(["ip", "link", "set", inner, "netns", name])
        for dev, where in ((outer, []), (inner, ["-n", name])):  # jumbo frames, as in a rack
            run(["ip", *where, "link", "set", "dev", dev, "mtu", "9000"])
        run(["ip", "addr", "add", f"{host_ip}/30", "dev", outer])
        run(["ip", "link", "set", outer, "up"])
        run(["ip", "-n", name, "addr", "add", f"{ip}/30", "dev", inner])
        run(["ip", "-n", name, "link", "set", inner, "up"])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        if rate is not None:
            # the bucket holds 10 ms of traffic (at least 64 KiB); a packet waits at
            # most 100 ms for tokens: TCP sees the rate, not losses
            burst = max(rate // 100, 64 << 10)
            run(["tc", "qdisc", "add", "dev", outer, "root", "tbf", "rate", f"{rate * 8}bit",
                 "burst", str(burst), "latency", "100ms"])  # fmt: skip
        yield Netns(name, outer, inner, host_ip, ip)
    finally:
        run(["ip", "link", "del", outer], check=False)
        run(["ip", "netns", "del", name], check=False)


def node_in(
    c: Cluster, name: str, ns: Netns, size: int | None = None, *, path: Path | None = None
) -> Node:
    """``dst serve`` as node ``name`` of ``c`` inside ``ns``, on its address, serving
    ``path`` (default ``c.work/NAME.img``; ``--size size`` unless None)."""
    path = c.work / f"{name}.img" if path is None else path
    cmd = ["ip", "netns", "exec", ns.name, *DST, "serve", str(path)]
    cmd += ["--size", str(size)] if size is not None else []
    cmd += ["--listen", f"{ns.ip}:0", "--tls", "off"]
    node = Node(name, cmd, c.work / f"{name}.stderr", path)
    line = node.next_line(30)
    if line is None or not line.startswith(LISTENING):
        node.started_or_fail("listening")
    assert line is not None
    node.uris.append(line[len(LISTENING) :])
    c.nodes[name] = node
    c.processes.append(node)
    return node
