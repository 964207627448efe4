"""Each algorithm through a ``dst daemon`` process: data in and out with nbdcopy, and its
placement checked byte for byte on the member files; nesting; nbdkit and qemu-nbd as
members; ext4 on a stripe via nbdfuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster, Daemon, file_member, remote, run

from .arrays import MiB, check_ext4_image, copy_in_out, destripe, ext4_on_nbdfuse
from .helpers import require, require_root_dev

CHUNK = 64 << 10


@pytest.fixture(autouse=True)
def _tools() -> None:
    require("nbdcopy", "nbdinfo")


def create(cluster: Cluster, name: str, target: dict[str, Any]) -> str:
    """Write the spec, ``dst create`` it; return the array's unix URI."""
    out = cluster.daemon.dst("create", str(cluster.spec(name, target))).stdout
    assert out.startswith(f"{name}: running"), out
    return cluster.uri(name)


def test_linear_placement(daemon: Daemon, cluster: Cluster, tmp_path: Path) -> None:
    n0 = cluster.node("n0", "8M")
    n1 = cluster.node("n1", "16M")
    target = {
        "type": "linear",
        "members": [remote("n0", n0.uri), remote("n1", n1.uri, start="4M", length="6M")],
    }
    uri = create(cluster, "lin", target)
    data = copy_in_out(uri, tmp_path, 14 * MiB)
    a, b = n0.path.read_bytes(), n1.path.read_bytes()
    assert a == data[: 8 * MiB]
    assert b[4 * MiB : 10 * MiB] == data[8 * MiB :]
    assert b[: 4 * MiB] == bytes(4 * MiB) and b[10 * MiB :] == bytes(6 * MiB)  # untouched
    root = daemon.status("lin")["arrays"][0]["root"]
    assert [(k["name"], k["start"], k["size"]) for k in root["members"]] == [
        ("n0", 0, 8 * MiB),
        ("n1", 8 * MiB, 16 * MiB),
    ]


def test_stripe_placement(daemon: Daemon, cluster: Cluster, tmp_path: Path) -> None:
    nodes = [cluster.node(f"n{i}", "8M") for i in range(2)]
    target = {
        "type": "stripe",
        "chunk_size": "64K",
        "members": [remote(f"s{i}", n.uri) for i, n in enumerate(nodes)],
    }
    uri = create(cluster, "str", target)
    data = copy_in_out(uri, tmp_path, 16 * MiB)
    members = [n.path.read_bytes() for n in nodes]
    for i in range(len(data) // CHUNK):
        off = (i // 2) * CHUNK
        assert members[i % 2][off : off + CHUNK] == data[i * CHUNK : (i + 1) * CHUNK], i


def test_mirror_legs_identical(daemon: Daemon, cluster: Cluster, tmp_path: Path) -> None:
    nodes = [cluster.node(f"n{i}", "16M") for i in range(2)]
    target = {"type": "mirror", "members": [remote(f"m{i}", n.uri) for i, n in enumerate(nodes)]}
    uri = create(cluster, "mir", target)
    data = copy_in_out(uri, tmp_path)
    assert 15 * MiB < len(data) < 16 * MiB  # the rest holds superblocks and bitmap
    assert nodes[0].path.read_bytes()[: len(data)] == data
    assert nodes[1].path.read_bytes()[: len(data)] == data
    legs = daemon.status("mir")["arrays"][0]["root"]["members"]
    assert [leg["state"] for leg in legs] == ["in_sync", "in_sync"]
    assert all(leg["counters"]["write_bytes"] >= 16 * MiB for leg in legs)


def test_nested_mirror_of_stripes(daemon: Daemon, cluster: Cluster, tmp_path: Path) -> None:
    """A mirror of a stripe of two local files and a stripe of two dst nodes."""
    files = [tmp_path / f"f{i}.img" for i in range(2)]
    nodes = [cluster.node(f"n{i}", "4M") for i in range(2)]
    target = {
        "type": "mirror",
        "members": [
            {
                "type": "stripe",
                "name": "local",
                "members": [file_member(f"f{i}", p, 4 * MiB) for i, p in enumerate(files)],
            },
            {
                "type": "stripe",
                "name": "far",
                "members": [remote(f"r{i}", n.uri) for i, n in enumerate(nodes)],
            },
        ],
    }
    uri = create(cluster, "tree", target)
    data = copy_in_out(uri, tmp_path)
    local = destripe([p.read_bytes() for p in files], CHUNK, 8 * MiB)
    far = destripe([n.path.read_bytes() for n in nodes], CHUNK, 8 * MiB)
    assert local[: len(data)] == data
    assert far[: len(data)] == data
    root = daemon.status("tree")["arrays"][0]["root"]
    assert [k["name"] for k in root["members"]] == ["local", "far"]
    assert [g["name"] for k in root["members"] for g in k["members"]] == ["f0", "f1", "r0", "r1"]


def test_nbdkit_and_qemu_nbd_as_members(daemon: Daemon, cluster: Cluster, tmp_path: Path) -> None:
    require("nbdkit", "qemu-nbd")
    qemu_file = tmp_path / "qemu.img"
    with open(qemu_file, "wb") as f:
        f.truncate(8 * MiB)
    kit = cluster.server("kit", ["nbdkit", "-U", str(cluster.sockets / "kit.sock"), "--foreground",
                                 "memory", "8M"])  # fmt: skip
    qemu = cluster.server("qemu", ["qemu-nbd", "-k", str(cluster.sockets / "qemu.sock"), "-f",
                                   "raw", "-t", str(qemu_file)])  # fmt: skip
    target = {"type": "mirror", "members": [remote("kit", kit.uri), remote("qemu", qemu.uri)]}
    uri = create(cluster, "peers", target)
    data = copy_in_out(uri, tmp_path)
    assert qemu_file.read_bytes()[: len(data)] == data
    out = tmp_path / "kit.bin"
    run(["nbdcopy", kit.uri, out])
    assert out.read_bytes()[: len(data)] == data
    daemon.dst("stop", "peers")


@pytest.mark.slow
def test_ext4_on_stripe(daemon: Daemon, cluster: Cluster, tmp_path: Path) -> None:
    require("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    nodes = [cluster.node(f"n{i}", "32M") for i in range(2)]
    target = {"type": "stripe", "members": [remote(f"s{i}", n.uri) for i, n in enumerate(nodes)]}
    uri = create(cluster, "fs", target)
    digests = ext4_on_nbdfuse(uri, tmp_path)
    daemon.dst("stop", "fs")  # flushes every member
    image = tmp_path / "image.img"
    image.write_bytes(destripe([n.path.read_bytes() for n in nodes], CHUNK, 64 * MiB))
    check_ext4_image(image, digests, tmp_path)
