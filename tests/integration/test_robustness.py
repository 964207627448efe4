"""Issue 11 with real processes: a silent partition heals by itself, a 1 TiB sparse
mirror is copied without stalls, degraded assembly, and no timeout zeroes the legs.

Theory of operation
-------------------
* **Partition**: a ``dst serve`` node runs in a network namespace of its own (a veth
  pair, one address on each end; names carry the test's pid so concurrent runs do not
  collide; removed at teardown).  Its link is taken down for 15 s -- a silent
  partition: packets vanish, the TCP connection stays ESTABLISHED -- under a verifying
  writer: the writer sees no error (the leg times out and the mirror degrades), the
  leg's connection is dropped and reconnects by itself once the link is back, the leg
  is re-added and resynced, and the legs hold the same data.  Then the link goes down
  with no I/O at all: keepalive notices the silent peer (the detection time is printed
  for docs/resilience.md).
* **1 TiB**: two nodes serve sparse 1 TiB files (``--size``: truncated, not written);
  ~1 GiB of data is written through the array at scattered offsets.  ``dst readd
  --full`` (after garbage was written to the leg's file) and ``dst replace`` (onto a
  new 1 TiB node) run under a writer: its worst latency stays under 1 s, ``dst status``
  keeps answering, and the target's allocated size (st_blocks) is about the data.
* **Degraded assembly**: the daemon and one node go away; ``dst assemble --degraded``
  starts the array from the survivor alone, the missing leg failed; ``dst replace``
  puts a new node in its place and it is resynced.
* **Never zero**: both nodes are SIGSTOPped longer than ``leg_timeout`` under a writer
  (its writes fail: no leg answers), then SIGCONT: the leg that failed last is
  re-admitted by itself, the other re-added from it, every acknowledged write is there.

Waits are for states (``wait_until``), never sleeps; the only timed spans are the
partition and SIGSTOP windows, which are what is tested.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dst.meta.layout import layout_for, member_size_for
from tests.support.cluster import Cluster, remote, run, wait_until
from tests.support.netns import Netns, namespace, node_in
from tests.support.pattern_client import BLOCK, PatternClient, compare

from .helpers import require

pytestmark = pytest.mark.timeout(240)
MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
NODE = 16 * MiB  # data per leg of the small arrays
ARRAY = "t"


# -- network namespaces -------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A namespace for one node (root only; removed at teardown, even on failure)."""
    require("ip")
    if os.geteuid() != 0:
        if os.environ.get("DST_REQUIRE_TOOLS") == "1":
            pytest.fail("network namespaces need root")
        pytest.skip("network namespaces need root")
    with namespace() as ns:
        yield ns


# -- the cluster ----------------------------------------------------------------------------


def mirror(c: Cluster, names: list[str], **keys: Any) -> str:
    """Create array ``t``, a mirror over the nodes ``names``; its URI."""
    members = [remote(n, c.nodes[n].uri) for n in names]
    return c.create(ARRAY, {"type": "mirror", "name": "m", "members": members, **keys})


def fill(c: Cluster, uri: str, size: int) -> bytearray:
    data = bytearray(os.urandom(size))
    (c.work / "base.bin").write_bytes(data)
    run(["nbdcopy", "--flush", c.work / "base.bin", uri])
    return data


def read_all(c: Cluster, uri: str) -> bytes:
    out = c.work / "out.bin"
    run(["nbdcopy", uri, out])
    return out.read_bytes()


def legs(c: Cluster) -> list[dict[str, Any]]:
    legs: list[dict[str, Any]] = c.status(ARRAY)["root"]["detail"]["legs"]
    return legs


def states(c: Cluster) -> list[str]:
    return [leg["state"] for leg in legs(c)]


def leg_data(c: Cluster, name: str) -> bytes:
    path = c.nodes[name].path
    with open(path, "rb") as f:
        return f.read(layout_for(path.stat().st_size).data_size)


def writer(c: Cluster, uri: str, n: int, first: int, last: int, **kw: Any) -> PatternClient:
    pc = PatternClient(uri, c.work, client=n, first=first, last=last, **kw)
    pc.wait_count(50)
    return pc


@pytest.fixture
def tools() -> None:
    require("nbdcopy", "nbdsh", "nbdinfo")


# -- a silent partition -----------------------------------------------------------------


def test_a_silent_partition_heals_by_itself(cluster: Cluster, netns: Netns, tools: None) -> None:
    """Node b is cut off for 15 s under a verifying writer: no error, b comes back by
    itself and is resynced; idle, a silent b is detected by keepalive."""
    size = member_size_for(NODE)
    cluster.start_daemon()
    cluster.node("a", size)
    node_in(cluster, "b", netns, size)
    uri = mirror(cluster, ["a", "b"], leg_timeout="3s")
    image = fill(cluster, uri, NODE)
    w = writer(cluster, uri, 1, 0, NODE // BLOCK, read_every=3, base=cluster.work / "base.bin")
    netns.link(False)
    cut = time.monotonic()
    wait_until(lambda: states(cluster)[1] == "failed", "b to time out", timeout=30)
    failed_after = time.monotonic() - cut
    before = w.count()
    wait_until(lambda: w.count() > before + 100, "the writer going on degraded")
    time.sleep(max(0.0, 15 - (time.monotonic() - cut)))  # the partition lasts 15 s
    netns.link(True)
    back = time.monotonic()
    wait_until(lambda: states(cluster) == ["in_sync", "in_sync"], "b back in sync", timeout=60)
    healed_after = time.monotonic() - back
    keeper = cluster.status(ARRAY)["root"]["detail"]["keeper"]
    assert keeper["auto_readds"] >= 1, keeper
    ops = w.finish()
    worst = max(op.latency for op in ops)
    expected = w.apply(image, ops)
    compare(read_all(cluster, uri), expected, what="array")
    # Idle: no I/O at all; keepalive gives the silent peer up in bounded time.
    netns.link(False)
    idle_cut = time.monotonic()
    wait_until(lambda: legs(cluster)[1]["health"] != "connected", "keepalive", timeout=60)
    detected_after = time.monotonic() - idle_cut
    netns.link(True)
    wait_until(lambda: legs(cluster)[1]["health"] == "connected", "b reconnected", timeout=60)
    cluster.daemon.dst("stop", ARRAY)
    compare(leg_data(cluster, "a"), expected, what="leg a")
    compare(leg_data(cluster, "b"), expected, what="leg b")
    print(
        f"\npartition: b failed {failed_after:.1f} s after the cut (leg_timeout 3 s), back "
        f"in sync {healed_after:.1f} s after the link returned; writer's worst latency "
        f"{worst:.1f} s; idle silent peer detected after {detected_after:.1f} s"
    )
    assert detected_after < 30, detected_after  # keepalive: about 10 s


# -- a 1 TiB sparse mirror --------------------------------------------------------------


DATA_CHUNK = 64 * MiB
CHUNKS = 16  # ~1 GiB of data


def write_data(uri: str, size: int, seed: int) -> list[tuple[int, bytes]]:
    """~1 GiB in 64 MiB pieces scattered over the device, written with dst's NBD client."""
    from dst.net.address import parse_address
    from dst.net.client import NbdClient

    rng = random.Random(seed)
    step = size // CHUNKS // DATA_CHUNK * DATA_CHUNK
    pieces = [(k * step, rng.randbytes(DATA_CHUNK)) for k in range(CHUNKS)]

    async def go() -> None:
        c = await NbdClient.connect(parse_address(uri, form="uri"))
        for off, data in pieces:
            await c.write(off, data)
        await c.flush()
        await c.close()

    asyncio.run(go())
    return pieces


def check_data(uri: str, pieces: list[tuple[int, bytes]]) -> None:
    from dst.net.address import parse_address
    from dst.net.client import NbdClient

    async def go() -> None:
        c = await NbdClient.connect(parse_address(uri, form="uri"))
        for off, data in pieces:
            assert bytes(await c.read(off, len(data))) == data, f"data at {off}"
        await c.close()

    asyncio.run(go())


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def data_extents(path: Path, end: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    with open(path, "rb") as f:
        fd = f.fileno()
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            out.append((start, stop))
            pos = stop
    return out


def same_sparse(a: Path, b: Path, end: int) -> None:
    """The data areas of two sparse member files read the same (holes read zeroes)."""
    spans = sorted(data_extents(a, end) + data_extents(b, end))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, stop in spans:
            for pos in range(start, stop, 16 * MiB):
                n = min(16 * MiB, stop - pos)
                fa.seek(pos)
                fb.seek(pos)
                assert fa.read(n) == fb.read(n), f"{a.name} and {b.name} differ near {pos}"


def watch_status(c: Cluster, done: Any) -> float:
    """Poll ``dst status`` until ``done()``; the slowest answer (seconds)."""
    slowest = 0.0
    while not done():
        t = time.monotonic()
        c.daemon.dst("status", ARRAY, "--json")
        slowest = max(slowest, time.monotonic() - t)
    return slowest


def test_full_copies_of_a_terabyte_mirror_are_sparse_and_never_stall(
    cluster: Cluster, tools: None
) -> None:
    """``dst readd --full`` and ``dst replace`` of a 1 TiB leg holding ~1 GiB, under a
    writer: worst latency under 1 s, the control socket answering, the target's
    allocation about the data."""
    cluster.start_daemon()
    cluster.node("a", TiB)
    cluster.node("b", TiB)
    uri = mirror(cluster, ["a", "b"])
    size = int(run(["nbdinfo", "--size", uri]).stdout)
    pieces = write_data(uri, size, 5)
    data = CHUNKS * DATA_CHUNK
    first = size // 2 // BLOCK + 7  # the writer's blocks: between the data pieces
    w = writer(cluster, uri, 1, first, first + 1024)  # a 4 MiB working set
    w.wait_count(2000)  # its regions are marked dirty (they stay so for clear_delay)
    end = layout_for(TiB).data_size
    results = {}
    for how in ("readd", "replace"):
        start = w.count()
        t0 = time.monotonic()
        if how == "readd":
            cluster.daemon.dst("fail", ARRAY, "b")
            with open(cluster.nodes["b"].path, "r+b") as f:  # garbage the copy must punch
                for k in range(8):
                    f.seek((2 * k + 1) * (end // 16))
                    f.write(os.urandom(MiB))
            cluster.daemon.dst("readd", ARRAY, "b", "--full")
            target = cluster.nodes["b"].path
        else:
            cluster.node("c", TiB)
            cluster.daemon.dst("replace", ARRAY, "b", "--uri", cluster.nodes["c"].uri,
                               "--name", "c", "--no-wait")  # fmt: skip
            target = cluster.nodes["c"].path

        def done(how: str = how) -> bool:
            if how == "readd":
                return states(cluster) == ["in_sync", "in_sync"]
            return (cluster.status(ARRAY).get("replace") or {}).get("state") == "finished"

        slowest = watch_status(cluster, done)
        took = time.monotonic() - t0
        ops = w.ops()[start:]
        worst = max(op.latency for op in ops)
        results[how] = (took, allocated(target), worst, slowest, len(ops))
        assert worst < 1.0, f"{how}: a write waited {worst:.2f} s"
        assert slowest < 10.0, f"{how}: dst status took {slowest:.1f} s"
        assert allocated(target) < data + data // 4 + 16 * MiB, (how, allocated(target))
    w.finish()
    check_data(uri, pieces)
    cluster.daemon.dst("stop", ARRAY)
    same_sparse(cluster.nodes["a"].path, cluster.nodes["c"].path, end)
    for how, (took, alloc, worst, slowest, n) in results.items():
        print(f"\n{how} of a 1 TiB leg holding {data // MiB} MiB: {took:.1f} s, target "
              f"allocated {alloc / MiB:.0f} MiB; writer {n} requests, worst "
              f"{worst * 1000:.0f} ms; dst status at most {slowest:.2f} s")  # fmt: skip


# -- degraded assembly ----------------------------------------------------------------


def test_degraded_assembly_from_one_member_then_a_new_node(cluster: Cluster, tools: None) -> None:
    size = member_size_for(NODE)
    cluster.start_daemon()
    cluster.node("a", size)
    cluster.node("b", size)
    uri = mirror(cluster, ["a", "b"])
    image = fill(cluster, uri, NODE)
    cluster.daemon.kill()  # the daemon and node b are gone for good
    cluster.nodes["b"].kill()
    cluster.start_daemon()
    refused = cluster.daemon.dst("assemble", cluster.nodes["a"].uri, check=False)
    assert refused.returncode != 0 and "--degraded" in refused.stderr, refused.stderr
    cluster.daemon.dst("assemble", cluster.nodes["a"].uri, "--degraded")
    st = cluster.status(ARRAY)  # the array came back under its name, on its socket
    assert [(x["name"], x["state"]) for x in legs(cluster)] == [("a", "in_sync"), ("b", "failed")]
    assert "missing" in legs(cluster)[1]["reason"], st
    compare(read_all(cluster, uri), image, what="degraded")
    w = writer(cluster, uri, 1, 0, NODE // BLOCK)
    cluster.node("c", size)
    cluster.daemon.dst("replace", ARRAY, "b", "--uri", cluster.nodes["c"].uri, "--name", "c")
    assert [(x["name"], x["state"]) for x in legs(cluster)] == [("a", "in_sync"), ("c", "in_sync")]
    expected = w.apply(image, w.finish())
    compare(read_all(cluster, uri), expected, what="after the rebuild")
    cluster.daemon.dst("stop", ARRAY)
    compare(leg_data(cluster, "c"), expected, what="leg c")


# -- never zero in-sync legs by timeouts ------------------------------------------------


def test_both_legs_time_out_and_the_last_one_comes_back_by_itself(
    cluster: Cluster, tools: None
) -> None:
    """Both nodes SIGSTOPped past leg_timeout under a writer (its write fails: no leg
    answers), then SIGCONT: the leg that failed last is re-admitted, the other re-added
    from it; every acknowledged write is on both."""
    size = member_size_for(NODE)
    cluster.start_daemon()
    cluster.node("a", size)
    cluster.node("b", size)
    uri = mirror(cluster, ["a", "b"], leg_timeout="2s")
    image = fill(cluster, uri, NODE)
    w = writer(cluster, uri, 1, 0, NODE // BLOCK)
    try:
        for n in ("a", "b"):
            cluster.nodes[n].proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: w.proc.poll() is not None, "the writer's write to fail", timeout=60)
        st = cluster.status(ARRAY)
        assert st["root"]["state"] == "failed", st["root"]
        last = st["root"]["detail"]["last_standing"]  # whichever timed out last
        reasons = {leg["name"]: leg["reason"] for leg in legs(cluster)}
        assert [n for n, why in reasons.items() if "failed last" in why] == [last], reasons
    finally:
        for n in ("a", "b"):
            cluster.nodes[n].proc.send_signal(signal.SIGCONT)
    wait_until(lambda: states(cluster) == ["in_sync", "in_sync"], "both legs back", timeout=60)
    detail = cluster.status(ARRAY)["root"]["detail"]
    assert detail["readmitted"] == 1, detail
    ops = w.finish(expect="error")
    doubt = w.in_doubt()
    expected = w.apply(image, ops)
    compare(read_all(cluster, uri), expected, doubts=[doubt] if doubt else [], what="array")
    cluster.daemon.dst("stop", ARRAY)
    a, b = leg_data(cluster, "a"), leg_data(cluster, "b")
    assert a == b, "legs differ"
    compare(a, expected, doubts=[doubt] if doubt else [], what="legs")
    print(json.dumps(detail.get("keeper", {})))
