"""Real NBD clients against ``dst serve``; every test checks the data, not just exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, Node, run

from .helpers import nbdsh, random_file, require, sha256_file

MiB = 1 << 20
SIZE = 64 * MiB


# -- nbdinfo -----------------------------------------------------------------------


def _nbdinfo_json(uri: str) -> dict[str, object]:
    require("nbdinfo")
    doc = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    exports = doc["exports"]
    assert len(exports) == 1
    export: dict[str, object] = exports[0]
    return {"protocol": doc["protocol"], "structured": doc["structured"], **export}


def test_nbdinfo_json_unix(node: Node) -> None:
    info = _nbdinfo_json(node.uri)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    assert info["export-size"] == SIZE
    assert info["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert info[flag] is True, flag
    assert "base:allocation" in info["contexts"]  # type: ignore[operator]


def test_nbdinfo_json_tcp(tcp_node: Node) -> None:
    assert tcp_node.uri.startswith("nbd://127.0.0.1:")
    assert not tcp_node.uri.startswith("nbd://127.0.0.1:0/")
    info = _nbdinfo_json(tcp_node.uri)
    assert info["export-size"] == SIZE


def test_nbdinfo_list_shows_name_and_description(cluster: Cluster) -> None:
    require("nbdinfo")
    node = cluster.node("node", "64M", args=["--name", "disk-a", "--description", "test disk A"])
    assert node.uri.startswith("nbd+unix:///disk-a?socket=")
    out = run(["nbdinfo", "--list", "--json", node.uri]).stdout
    exports = json.loads(out)["exports"]
    assert [e["export-name"] for e in exports] == ["disk-a"]
    assert exports[0]["description"] == "test disk A"
    assert exports[0]["export-size"] == SIZE


def test_nbdinfo_map_shows_data_and_holes(node: Node) -> None:
    require("nbdinfo")
    nbdsh(
        node.uri,
        f"h.pwrite(b'\\x5a' * {4 * MiB}, {8 * MiB})\nh.trim({MiB}, {9 * MiB})\nh.flush()",
    )
    extents = json.loads(run(["nbdinfo", "--map", "--json", node.uri]).stdout)
    assert sum(e["length"] for e in extents) == SIZE

    def state(offset: int) -> int:
        for e in extents:
            if e["offset"] <= offset < e["offset"] + e["length"]:
                return int(e["type"])
        raise AssertionError(f"offset {offset} not mapped: {extents}")

    assert state(0) == 3  # never written: hole,zero
    assert state(8 * MiB) == 0  # data
    assert state(9 * MiB) & 1  # trimmed: a hole again
    assert state(10 * MiB) == 0  # data
    assert state(SIZE - 1) == 3
    # The backing file really is sparse where the map says so.
    assert os.stat(node.path).st_blocks * 512 <= 4 * MiB


# -- nbdcopy -----------------------------------------------------------------------


def test_nbdcopy_both_ways(node: Node, tmp_path: Path) -> None:
    require("nbdcopy")
    src = tmp_path / "src.raw"
    digest = random_file(src, SIZE)
    run(["nbdcopy", src, node.uri])
    assert sha256_file(node.path) == digest  # what reached the node's disk
    back = tmp_path / "back.raw"
    run(["nbdcopy", node.uri, back])
    assert sha256_file(back) == digest


def test_nbdcopy_tcp_multi_conn(tcp_node: Node, tmp_path: Path) -> None:
    require("nbdcopy")
    src = tmp_path / "src.raw"
    digest = random_file(src, SIZE)
    run(["nbdcopy", "--connections=4", "--requests=16", src, tcp_node.uri])
    back = tmp_path / "back.raw"
    run(["nbdcopy", "--connections=4", tcp_node.uri, back])
    assert sha256_file(back) == digest


# -- nbdsh -------------------------------------------------------------------------

NBDSH_SCRIPT = """
import errno
size = h.get_size()
assert size == {size}
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()

pattern = bytes(range(256)) * 256  # 64 KiB
h.pwrite(pattern, 4096)
h.pwrite(pattern, size - len(pattern), nbd.CMD_FLAG_FUA)
assert h.pread(len(pattern), 4096) == pattern
assert h.pread(len(pattern), size - len(pattern)) == pattern
assert h.pread(4096, 0) == bytes(4096)
h.flush()

# Unaligned write straddling a block boundary.
h.pwrite(b"hello, dst", 4090)
assert h.pread(20, 4085) == b"\\0" * 5 + b"hello, dst" + pattern[4:9]

h.zero(8192, 8192)                          # may punch
h.zero(4096, 16384, nbd.CMD_FLAG_NO_HOLE)   # must not punch
assert h.pread(16384, 4096) == b" dst" + pattern[4:4096] + bytes(12288)
assert h.pread(4096, 16384) == bytes(4096)

h.trim(65536, 1 << 20)
h.pwrite(b"\\xff" * 65536, 2 << 20)
extents = []
def cb(ctx, offset, entries, err):
    extents.append((ctx, offset, list(entries)))
h.block_status(4 << 20, 0, cb)
assert extents and extents[0][0] == "base:allocation", extents
flat = extents[0][2]
covered = 0
spans = []
for length, flags in zip(flat[0::2], flat[1::2]):
    spans.append((covered, covered + length, flags))
    covered += length
assert 0 < covered <= 4 << 20
for lo, hi, flags in spans:
    if lo <= 2 << 20 < hi:
        assert flags == 0, spans   # just written: data
    if lo <= (2 << 20) + 65536 < hi:
        assert flags & 1, spans    # never written: hole
assert h.pread(65536, 2 << 20) == b"\\xff" * 65536

# The server validates too (libnbd's own checks switched off).
h.set_strict_mode(0)
for off, n in ((size, 1), (size - 1, 2)):
    try:
        h.pread(n, off)
    except nbd.Error as e:
        assert e.errno in ("EINVAL", "ENOSPC", "EIO"), e.errno
    else:
        raise AssertionError("read past the end succeeded")
assert h.pread(4096, 4096) == b" dst" + pattern[4:4096]  # connection still usable
print("nbdsh ok")
"""


def test_nbdsh_script(node: Node) -> None:
    out = nbdsh(node.uri, NBDSH_SCRIPT.format(size=SIZE), base_allocation=True)
    assert "nbdsh ok" in out


def test_readonly_export_refuses_writes_with_eperm(cluster: Cluster) -> None:
    rw = cluster.node("rw", "64M")
    nbdsh(rw.uri, "h.pwrite(b'\\x42' * 4096, 0); h.flush()")
    rw.stop()
    node = cluster.node("ro", None, args=["--read-only"], path=rw.path)
    script = """
assert h.is_read_only()
assert h.pread(4096, 0) == b"\\x42" * 4096
h.set_strict_mode(0)
for op in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(4096, 0),
           lambda: h.zero(4096, 0)):
    try:
        op()
    except nbd.Error as e:
        assert e.errno == "EPERM", (e.errno, e.string)
    else:
        raise AssertionError("write on a read-only export succeeded")
assert h.pread(4096, 0) == b"\\x42" * 4096
print("ro ok")
"""
    assert "ro ok" in nbdsh(node.uri, script)
    assert node.path.read_bytes()[:4096] == b"\x42" * 4096


# -- qemu --------------------------------------------------------------------------


def test_qemu_img_convert_and_compare(node: Node, tmp_path: Path) -> None:
    require("qemu-img")
    src = tmp_path / "src.raw"
    digest = random_file(src, SIZE)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, node.uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, node.uri])
    out = tmp_path / "out.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", node.uri, out])
    run(["qemu-img", "compare", "-F", "raw", out, node.uri])
    back = tmp_path / "back.raw"
    run(["qemu-img", "convert", "-O", "raw", out, back])
    assert sha256_file(back) == digest
    info = json.loads(run(["qemu-img", "info", "--output=json", node.uri]).stdout)
    assert info["virtual-size"] == SIZE


def test_qemu_io_fua_writes(node: Node) -> None:
    require("qemu-io")
    cmds = [
        "write -f -P 0xab 0 1M",  # -f: FUA
        "write -f -P 0xcd 1M 64k",
        "write -z 2M 1M",
        "flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 64k",
        "read -P 0 2M 1M",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = run([*args, node.uri])
    assert "Pattern verification failed" not in out.stdout + out.stderr
    data = node.path.read_bytes()[: 3 * MiB]
    assert data[:MiB] == b"\xab" * MiB
    assert data[MiB : MiB + 65536] == b"\xcd" * 65536
    assert data[2 * MiB :] == bytes(MiB)
    # A failing pattern check is reported (guards the test itself).
    bad = run([*args[:3], "-c", "read -P 0x11 0 4k", node.uri], check=False)
    assert "Pattern verification failed" in bad.stdout + bad.stderr


# -- fio ---------------------------------------------------------------------------


@pytest.mark.slow
def test_fio_nbd_engine_verify(node: Node, tmp_path: Path) -> None:
    require("fio")
    out = run(
        [
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={node.uri}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--do_verify=1",
            "--output-format=json",
        ],
        timeout=180,
        cwd=tmp_path,
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] == 16 * MiB  # the verify pass read everything back
