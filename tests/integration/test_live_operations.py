"""Live operations with real processes: suspend/resume, replace, cancel, crash mid-replace.

A ``dst daemon`` runs linear, stripe and mirror arrays of ``dst serve`` nodes; nbdsh
writer processes (tests/integration/writer.py) keep writing known patterns through the
array while a node is suspended or replaced.  Afterwards every byte is checked through
the array and on the member files.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dst.meta.layout import layout_for, member_size_for

from .arrays import (
    check_ext4_image,
    ext4_on_nbdfuse,
    remote,
    start_daemon,
    unix_uri,
    wait_until,
    write_spec,
)
from .helpers import Node, require, require_root_dev, run, start_node
from .writer import BLOCK, Writer

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20
NODE = 8 * MiB  # data per node (linear, stripe); a mirror's size
CHUNK = 64 << 10
REGION = 64 << 10


class Cluster:
    """``dst serve`` nodes started on demand and one ``dst daemon``."""

    def __init__(self, tmp: Path, sockdir: Path) -> None:
        require("nbdcopy", "nbdsh")
        self.tmp, self.sockdir = tmp, sockdir
        self.nodes: dict[str, Node] = {}
        self.daemon = start_daemon(sockdir / "control.sock", tmp / "daemon.stderr")

    def node(self, name: str, kind: str = "mirror") -> Node:
        # a mirror member holds NODE bytes of data plus the mirror's metadata
        size = member_size_for(NODE) if kind.startswith("mirror") else NODE
        n = start_node(
            self.tmp / f"{name}.img",
            listen=[f"unix:{self.sockdir}/{name}.sock"],
            args=["--size", str(size)],
            stderr_path=self.tmp / f"{name}.stderr",
        )
        self.nodes[name] = n
        return n

    def create(self, kind: str, names: list[str], **extra: Any) -> str:
        members = [remote(n, self.nodes[n].uri) for n in names]
        target = {"type": kind, "name": "t", "members": members, **extra}
        sock = self.sockdir / "a.sock"
        self.daemon.dst("create", str(write_spec(self.tmp / "a.toml", "a", [f"unix:{sock}"],
                                                 target)))  # fmt: skip
        return unix_uri(sock)

    def status(self) -> dict[str, Any]:
        array: dict[str, Any] = self.daemon.status("a")["arrays"][0]
        return array

    def states(self) -> list[str]:
        return [k["state"] for k in self.status()["root"]["members"]]

    def close(self) -> None:
        self.daemon.stop()
        for n in self.nodes.values():
            n.stop()


@pytest.fixture
def cluster(tmp_path: Path, sockdir: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, sockdir)
    yield c
    c.close()


def fill(uri: str, tmp: Path, size: int) -> bytearray:
    data = os.urandom(size)
    (tmp / "fill.bin").write_bytes(data)
    run(["nbdcopy", "--flush", tmp / "fill.bin", uri])
    return bytearray(data)


def read_all(uri: str, tmp: Path) -> bytes:
    run(["nbdcopy", uri, tmp / "out.bin"])
    return (tmp / "out.bin").read_bytes()


def data_of(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def mirror_data(path: Path) -> bytes:
    return data_of(path, layout_for(path.stat().st_size, REGION).data_size)[:NODE]


# The writers: "held" writes to node n1's part of the array, "free" to n0's part.
def lanes(kind: str, node: int) -> dict[str, int]:
    blocks = NODE // BLOCK
    if kind == "linear":
        return {"first": node * blocks, "last": (node + 1) * blocks}
    if kind == "stripe":
        return {
            "first": 0,
            "last": blocks,
            "lanes": 2,
            "lane": node,
            "chunk_blocks": CHUNK // BLOCK,
        }
    return {"first": node * blocks // 2, "last": (node + 1) * blocks // 2}  # mirror


@pytest.mark.parametrize("kind", ["linear", "stripe", "mirror"])
def test_suspend_one_node_under_writers(cluster: Cluster, tmp_path: Path, kind: str) -> None:
    cluster.node("n0", kind)
    cluster.node("n1", kind)
    uri = cluster.create(kind, ["n0", "n1"])
    size = NODE if kind == "mirror" else 2 * NODE
    image = fill(uri, tmp_path, size)
    held = Writer(uri, tmp_path, name="held", **lanes(kind, 1))
    free = Writer(uri, tmp_path, name="free", **lanes(kind, 0))
    time.sleep(0.5)
    cluster.daemon.dst("suspend", "a", "n1")
    assert cluster.states()[1] == "suspended"
    time.sleep(1.5)  # n1 holds (or, in a mirror, misses) writes; n0 goes on
    if kind != "mirror":
        held_now = cluster.status()["root"]["members"][1]["detail"]["held"]
        assert held_now == 1, held_now  # the writer waits on its one request
    free.stop()  # its final flush touches n1 too: it completes after the resume
    time.sleep(0.2)
    cluster.daemon.dst("resume", "a", "n1")
    n_free = free.finish()
    # No write to n0's part waited for n1: the worst one stayed far below the 1.5 s.
    assert n_free > 50 and free.worst_latency < 0.5, (n_free, free.worst_latency)
    wait_until(lambda: cluster.states()[1] in ("connected", "in_sync"), "n1 back")
    n_held = held.finish()
    image = free.apply(image, n_free)
    image = held.apply(image, n_held)
    if kind == "mirror":
        wait_until(lambda: cluster.states() == ["in_sync", "in_sync"], "n1 resynced")
    assert read_all(uri, tmp_path) == image
    cluster.daemon.dst("stop", "a")
    n0, n1 = (cluster.nodes[n].path for n in ("n0", "n1"))
    if kind == "linear":
        assert data_of(n0, NODE) + data_of(n1, NODE) == image
    elif kind == "mirror":
        assert mirror_data(n0) == mirror_data(n1) == image


def replace_and_wait(cluster: Cluster, old: str, new: str, *extra: str) -> dict[str, Any]:
    out = cluster.daemon.dst("replace", "a", old, "--uri", cluster.nodes[new].uri,
                             "--name", new, *extra)  # fmt: skip
    assert f"{old} replaced by {new}" in out.stdout, out
    job: dict[str, Any] = cluster.status()["replace"]
    return job


@pytest.mark.parametrize("kind", ["linear", "stripe", "mirror", "mirror-dead-old"])
def test_replace_a_node_under_a_writer(cluster: Cluster, tmp_path: Path, kind: str) -> None:
    algo = kind.split("-")[0]
    for n in ("n0", "n1", "n2"):
        cluster.node(n, algo)
    uri = cluster.create(algo, ["n0", "n1"])
    size = NODE if algo == "mirror" else 2 * NODE
    image = fill(uri, tmp_path, size)
    w = Writer(uri, tmp_path, first=0, last=size // BLOCK)
    time.sleep(0.3)
    if kind == "mirror-dead-old":
        cluster.nodes["n1"].stop(signal.SIGKILL)
        wait_until(lambda: cluster.states()[1] == "failed", "n1 failed")
    job = replace_and_wait(cluster, "n1", "n2")
    assert job["state"] == "finished" and job["new"] == "n2"
    time.sleep(0.3)  # the writer goes on after the swap
    image = w.apply(image, w.finish())
    st = cluster.status()
    assert [k["name"] for k in st["root"]["members"]] == ["n0", "n2"]
    assert read_all(uri, tmp_path) == image
    cluster.daemon.dst("stop", "a")
    n0, n2 = (cluster.nodes[n].path for n in ("n0", "n2"))
    if algo == "linear":
        assert data_of(n2, NODE) == image[NODE:]
    elif algo == "stripe":
        chunks = [image[i : i + CHUNK] for i in range(0, size, CHUNK)]
        assert data_of(n2, NODE) == b"".join(chunks[1::2])
    else:
        assert mirror_data(n0) == mirror_data(n2) == image
    cluster.daemon.dst("start", "a")  # the spec names n2 now
    assert read_all(uri, tmp_path) == image


def test_cancel_a_replace_midway(cluster: Cluster, tmp_path: Path) -> None:
    for n in ("n0", "n1", "n2"):
        cluster.node(n, "linear")
    uri = cluster.create("linear", ["n0", "n1"])
    image = fill(uri, tmp_path, 2 * NODE)
    w = Writer(uri, tmp_path, first=0, last=2 * NODE // BLOCK)
    # 256 KiB/s: 32 s for the 8 MiB, so the cancel lands midway
    cluster.daemon.dst("replace", "a", "n1", "--uri", cluster.nodes["n2"].uri, "--name", "n2",
                       "--no-wait", "--rate", "256K")  # fmt: skip
    wait_until(lambda: (cluster.status()["replace"] or {}).get("regions_done", 0) >= 1,
               "some progress")  # fmt: skip
    cluster.daemon.dst("cancel-replace", "a")
    wait_until(lambda: cluster.status()["replace"]["state"] == "cancelled", "cancelled")
    time.sleep(0.3)
    image = w.apply(image, w.finish())
    assert [k["name"] for k in cluster.status()["root"]["members"]] == ["n0", "n1"]
    assert read_all(uri, tmp_path) == image
    cluster.daemon.dst("stop", "a")
    n0, n1 = (cluster.nodes[n].path for n in ("n0", "n1"))
    assert data_of(n0, NODE) + data_of(n1, NODE) == image


def test_daemon_crash_mid_replace_then_assemble(
    cluster: Cluster, tmp_path: Path, sockdir: Path
) -> None:
    require("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    for n in ("n0", "n1", "n2"):
        cluster.node(n)
    # small regions, a slow copy: the crash lands mid-copy
    uri = cluster.create("mirror", ["n0", "n1"], region_size="64KiB")
    digests = ext4_on_nbdfuse(uri, tmp_path)
    cluster.daemon.dst("resync-rate", "a", "512K")
    cluster.daemon.dst("replace", "a", "n1", "--uri", cluster.nodes["n2"].uri, "--name", "n2",
                       "--no-wait", "--rate", "512K")  # fmt: skip
    wait_until(lambda: (cluster.status()["replace"] or {}).get("regions_done", 0) >= 2,
               "the copy under way")  # fmt: skip
    cluster.daemon.proc.send_signal(signal.SIGKILL)
    cluster.daemon.proc.wait()
    # The superblocks say: a mirror of n0, n1 and n2 (n2 joining).  Assemble them all.
    again = start_daemon(sockdir / "control2.sock", tmp_path / "daemon2.stderr")
    cluster.daemon = again
    members = [cluster.nodes[n].uri for n in ("n2", "n0", "n1")]
    back = sockdir / "back.sock"
    out = again.dst("assemble", *members, "--name", "a", "--listen", f"unix:{back}")
    assert "member 2" in out.stdout, out.stdout
    legs = json.loads(again.dst("status", "a", "--json").stdout)["arrays"][0]["root"]["members"]
    assert [k["name"] for k in legs] == ["n0", "n1", "n2"]
    wait_until(
        lambda: (
            [k["state"] for k in again.status("a")["arrays"][0]["root"]["members"]]
            == ["in_sync"] * 3
        ),
        "n2 resynced after the crash",
        timeout=60,
    )
    image = tmp_path / "after.img"
    run(["nbdcopy", unix_uri(back), image])
    check_ext4_image(image, digests, tmp_path)
    again.dst("stop", "a")
    paths = [cluster.nodes[n].path for n in ("n0", "n1", "n2")]
    assert mirror_data(paths[0]) == mirror_data(paths[1]) == mirror_data(paths[2])
