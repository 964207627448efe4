"""Each algorithm through a ``dst daemon`` process: data in and out with nbdcopy, and its
placement checked byte for byte on the member files; nesting; nbdkit and qemu-nbd as
members; ext4 on a stripe via nbdfuse."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .arrays import (
    Daemon,
    MiB,
    accepts,
    check_ext4_image,
    copy_in_out,
    destripe,
    ext4_on_nbdfuse,
    file_member,
    remote,
    start_daemon,
    unix_uri,
    wait_until,
    write_spec,
)
from .conftest import NodeFactory
from .helpers import require, require_root_dev, run

CHUNK = 64 << 10


@pytest.fixture
def daemon(tmp_path: Path, sockdir: Path) -> Iterator[Daemon]:
    require("nbdcopy", "nbdinfo")
    d = start_daemon(sockdir / "control.sock", tmp_path / "daemon.stderr")
    yield d
    rc = d.stop()
    assert rc == 0 and "Traceback" not in d.stderr(), d.stderr()


def create(daemon: Daemon, tmp: Path, sockdir: Path, name: str, target: dict[str, Any]) -> str:
    """Write the spec, ``dst create`` it; return the array's unix URI."""
    sock = sockdir / f"{name}.sock"
    spec = write_spec(tmp / f"{name}.toml", name, [f"unix:{sock}"], target)
    out = daemon.dst("create", str(spec)).stdout
    assert out.startswith(f"{name}: running"), out
    return unix_uri(sock)


def test_linear_placement(
    daemon: Daemon, node_factory: NodeFactory, tmp_path: Path, sockdir: Path
) -> None:
    n0 = node_factory(size="8M")
    n1 = node_factory(size="16M")
    target = {
        "type": "linear",
        "members": [remote("n0", n0.uri), remote("n1", n1.uri, start="4M", length="6M")],
    }
    uri = create(daemon, tmp_path, sockdir, "lin", target)
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


def test_stripe_placement(
    daemon: Daemon, node_factory: NodeFactory, tmp_path: Path, sockdir: Path
) -> None:
    nodes = [node_factory(size="8M") for _ in range(2)]
    target = {
        "type": "stripe",
        "chunk_size": "64K",
        "members": [remote(f"s{i}", n.uri) for i, n in enumerate(nodes)],
    }
    uri = create(daemon, tmp_path, sockdir, "str", target)
    data = copy_in_out(uri, tmp_path, 16 * MiB)
    members = [n.path.read_bytes() for n in nodes]
    for i in range(len(data) // CHUNK):
        off = (i // 2) * CHUNK
        assert members[i % 2][off : off + CHUNK] == data[i * CHUNK : (i + 1) * CHUNK], i


def test_mirror_legs_identical(
    daemon: Daemon, node_factory: NodeFactory, tmp_path: Path, sockdir: Path
) -> None:
    nodes = [node_factory(size="16M") for _ in range(2)]
    target = {"type": "mirror", "members": [remote(f"m{i}", n.uri) for i, n in enumerate(nodes)]}
    uri = create(daemon, tmp_path, sockdir, "mir", target)
    data = copy_in_out(uri, tmp_path)
    assert 15 * MiB < len(data) < 16 * MiB  # the rest holds superblocks and bitmap
    assert nodes[0].path.read_bytes()[: len(data)] == data
    assert nodes[1].path.read_bytes()[: len(data)] == data
    legs = daemon.status("mir")["arrays"][0]["root"]["members"]
    assert [leg["state"] for leg in legs] == ["in_sync", "in_sync"]
    assert all(leg["counters"]["write_bytes"] >= 16 * MiB for leg in legs)


def test_nested_mirror_of_stripes(
    daemon: Daemon, node_factory: NodeFactory, tmp_path: Path, sockdir: Path
) -> None:
    """A mirror of a stripe of two local files and a stripe of two dst nodes."""
    files = [tmp_path / f"f{i}.img" for i in range(2)]
    nodes = [node_factory(size="4M") for _ in range(2)]
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
    uri = create(daemon, tmp_path, sockdir, "tree", target)
    data = copy_in_out(uri, tmp_path)
    local = destripe([p.read_bytes() for p in files], CHUNK, 8 * MiB)
    far = destripe([n.path.read_bytes() for n in nodes], CHUNK, 8 * MiB)
    assert local[: len(data)] == data
    assert far[: len(data)] == data
    root = daemon.status("tree")["arrays"][0]["root"]
    assert [k["name"] for k in root["members"]] == ["local", "far"]
    assert [g["name"] for k in root["members"] for g in k["members"]] == ["f0", "f1", "r0", "r1"]


def _server(cmd: list[str], sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def up() -> bool:
        assert proc.poll() is None, f"{cmd[0]} exited {proc.returncode}"
        return accepts(sock)

    wait_until(up, f"{cmd[0]} on {sock}")
    return proc


def test_nbdkit_and_qemu_nbd_as_members(daemon: Daemon, tmp_path: Path, sockdir: Path) -> None:
    require("nbdkit", "qemu-nbd")
    kit_sock, qemu_sock = sockdir / "kit.sock", sockdir / "qemu.sock"
    qemu_file = tmp_path / "qemu.img"
    with open(qemu_file, "wb") as f:
        f.truncate(8 * MiB)
    procs = [
        _server(["nbdkit", "-U", str(kit_sock), "--foreground", "memory", "8M"], kit_sock),
        _server(["qemu-nbd", "-k", str(qemu_sock), "-f", "raw", "-t", str(qemu_file)], qemu_sock),
    ]
    try:
        target = {
            "type": "mirror",
            "members": [remote("kit", unix_uri(kit_sock)), remote("qemu", unix_uri(qemu_sock))],
        }
        uri = create(daemon, tmp_path, sockdir, "peers", target)
        data = copy_in_out(uri, tmp_path)
        assert qemu_file.read_bytes()[: len(data)] == data
        out = tmp_path / "kit.bin"
        run(["nbdcopy", unix_uri(kit_sock), out])
        assert out.read_bytes()[: len(data)] == data
        daemon.dst("stop", "peers")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)


@pytest.mark.slow
def test_ext4_on_stripe(
    daemon: Daemon, node_factory: NodeFactory, tmp_path: Path, sockdir: Path
) -> None:
    require("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    nodes = [node_factory(size="32M") for _ in range(2)]
    target = {"type": "stripe", "members": [remote(f"s{i}", n.uri) for i, n in enumerate(nodes)]}
    uri = create(daemon, tmp_path, sockdir, "fs", target)
    digests = ext4_on_nbdfuse(uri, tmp_path)
    daemon.dst("stop", "fs")  # flushes every member
    image = tmp_path / "image.img"
    image.write_bytes(destripe([n.path.read_bytes() for n in nodes], CHUNK, 64 * MiB))
    check_ext4_image(image, digests, tmp_path)
