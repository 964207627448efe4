"""The ``dst`` command as a user meets it: errors, lifecycle, listen addresses."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from dst import __version__
from dst.meta.layout import member_size_for
from tests.support.cluster import DST, Cluster, Node, run, start_node

from .helpers import nbdsh, require, require_root_dev

MiB = 1 << 20


def assert_one_line_error(args: Sequence[str], *, cwd: Path | None = None) -> str:
    """Run dst; it must fail with exactly one ``dst: error:`` line and no traceback."""
    proc = subprocess.run([*DST, *args], capture_output=True, text=True, timeout=30, cwd=cwd)
    assert proc.returncode not in (0, None), proc
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dst: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_missing_file_without_size(tmp_path: Path) -> None:
    line = assert_one_line_error(["serve", str(tmp_path / "nope.img")])
    assert "nope.img" in line and "--size" in line
    assert not (tmp_path / "nope.img").exists()


@pytest.mark.parametrize("size", ["abc", "0", "10X", "0.5", "4MB", "", "-5"])
def test_bad_size(tmp_path: Path, size: str) -> None:
    line = assert_one_line_error(["serve", str(tmp_path / "d.img"), f"--size={size}"])
    assert "--size" in line
    assert not (tmp_path / "d.img").exists()


@pytest.mark.parametrize(
    "addr", ["foo", "127.0.0.1", "127.0.0.1:99999", "unix:", ":80", "[::1]", "host:port"]
)
def test_bad_listen(tmp_path: Path, addr: str) -> None:
    line = assert_one_line_error(["serve", str(tmp_path / "d.img"), "--size=1M", "--listen", addr])
    assert "listen" in line


def test_size_mismatch_on_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(b"x" * 4096)
    line = assert_one_line_error(["serve", str(path), "--size", "1M"])
    assert "4096" in line
    assert path.read_bytes() == b"x" * 4096  # untouched


def test_not_a_file(tmp_path: Path) -> None:
    assert_one_line_error(["serve", str(tmp_path)])


def test_unknown_command_and_option() -> None:
    assert_one_line_error(["frobnicate"])
    assert_one_line_error(["serve", "--bogus", "x"])


def test_version_and_help() -> None:
    out = run([*DST, "--version"]).stdout
    assert out.strip() == f"dst {__version__}"
    top = run([*DST, "--help"]).stdout
    assert "serve" in top and "examples:" in top
    serve = run([*DST, "serve", "--help"]).stdout
    for word in ("--size", "--read-only", "--name", "--listen", "unix:", "examples:"):
        assert word in serve, word


def test_port_in_use(tcp_node: Node, tmp_path: Path) -> None:
    uri = tcp_node.uri
    port = uri.split(":")[2].split("/")[0]
    line = assert_one_line_error(
        ["serve", str(tmp_path / "other.img"), "--size=1M", "--listen", f"127.0.0.1:{port}"]
    )
    assert "in use" in line.lower() or port in line


def test_size_creates_sparse_and_extends_empty(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.node("node", "1G")
    assert node.path.stat().st_size == 1 << 30
    assert node.path.stat().st_blocks == 0
    empty = tmp_path / "empty.img"
    empty.touch()
    node2 = cluster.node("node2", "8M", path=empty)
    assert empty.stat().st_size == 8 * MiB
    assert nbdsh(node2.uri, "print(h.get_size())").strip() == str(8 * MiB)


def test_a_node_runs_on_one_thread_after_numpy_is_loaded(cluster: Cluster) -> None:
    """A 512 KiB write is received into a numpy buffer (numpy, and with it OpenBLAS, is
    loaded then): the node still has one thread, no BLAS workers spinning beside it,
    and the data is there."""
    node = cluster.node("node", "8M")
    pid = node.pid
    assert len(list(Path(f"/proc/{pid}/task").iterdir())) == 1
    nbdsh(node.uri, "h.pwrite(b'\\x5a' * (512 << 10), 4096)")
    assert "numpy" in Path(f"/proc/{pid}/maps").read_text()  # the write loaded it
    assert len(list(Path(f"/proc/{pid}/task").iterdir())) == 1
    with node.path.open("rb") as f:
        f.seek(4096)
        assert f.read(512 << 10) == b"\x5a" * (512 << 10)


def test_unix_and_tcp_at_once(cluster: Cluster, sock_dir: Path) -> None:
    require("nbdinfo")
    node = cluster.node(
        "node", "64M", listen=[f"unix:{sock_dir}/a.sock", "tcp", "tcp"], args=["--name", "x"]
    )
    assert len(node.uris) == 3
    assert node.uris[0] == f"nbd+unix:///x?socket={sock_dir}/a.sock"
    assert node.uris[1].startswith("nbd://127.0.0.1:") and node.uris[1].endswith("/x")
    assert node.uris[1] != node.uris[2]
    nbdsh(node.uris[1], "h.pwrite(b'\\x07' * 512, 512); h.flush()")
    for uri in node.uris:
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
        assert info["exports"][0]["export-size"] == 64 * MiB
        assert "ok" in nbdsh(uri, "assert h.pread(512, 512) == b'\\x07' * 512; print('ok')")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(cluster: Cluster, sig: int) -> None:
    node = cluster.node("node", "64M")
    nbdsh(node.uri, "h.pwrite(b'\\x01' * 4096, 0)")
    assert node.stop(sig) == 0
    assert "Traceback" not in node.stderr()
    assert node.path.read_bytes()[:4096] == b"\x01" * 4096


def test_dst_up_default_demo_cluster(tmp_path: Path, sock_dir: Path) -> None:
    """``dst up`` makes two sparse 1 GiB node files, serves a mirror over them, stops on
    SIGTERM.  (tests/integration/test_up.py drives it end to end.)"""
    data = tmp_path / "work" / "dst-data"
    sock, control = sock_dir / "up.sock", sock_dir / "control.sock"
    proc = subprocess.Popen(
        [*DST, "up", "--dir", str(data), "--listen", f"unix:{sock}", "--control", str(control)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("dst is up"):
                break
        else:
            raise AssertionError(f"dst up exited {proc.wait()} before it was up")
        for leg in ("node-a.img", "node-b.img"):
            assert (data / leg).stat().st_size == member_size_for(1 << 30)
            assert (data / leg).stat().st_blocks * 512 < 1 << 20  # sparse: metadata only
        uri = f"nbd+unix:///?socket={sock}"
        assert nbdsh(uri, "print(h.get_size())").strip() == str(1 << 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip().endswith("dst stopped")


def test_start_node_reports_early_exit(tmp_path: Path) -> None:
    """The fixture machinery itself: a node that cannot start is reported, not hung on."""
    with pytest.raises(AssertionError, match="exited"):
        start_node(tmp_path / "missing.img", listen=["tcp"], stderr_path=tmp_path / "e")


def test_sigterm_under_load_exits_cleanly(cluster: Cluster) -> None:
    """SIGTERM while a client is writing: in-flight requests finish, exit status 0."""
    require("fio")
    node = cluster.node("node", "64M")
    fio = subprocess.Popen(
        [
            "fio",
            "--name=load",
            "--ioengine=nbd",
            f"--uri={node.uri}",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=16",
            "--size=64M",
            "--time_based",
            "--runtime=60",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while node.path.stat().st_blocks == 0:  # wait until writes arrive
            assert fio.poll() is None, "fio exited early"
            assert time.monotonic() < deadline, "no writes reached the node"
            time.sleep(0.02)
        assert node.stop(signal.SIGTERM) == 0
        assert "Traceback" not in node.stderr()
        assert fio.wait(timeout=30) is not None  # the client sees the server go away
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()


def test_serves_a_block_device(cluster: Cluster, tmp_path: Path) -> None:
    """A loop device as the backing store: size from the device, data lands on it."""
    require("losetup", "nbdsh")
    require_root_dev("/dev/loop-control")
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(16 * MiB)
    dev = run(["losetup", "-f", "--show", backing]).stdout.strip()
    try:
        node = cluster.node("node", None, path=Path(dev))
        script = "h.pwrite(b'\\xee' * 8192, 4096, nbd.CMD_FLAG_FUA)\nprint(h.get_size())"
        out = nbdsh(node.uri, script)
        assert out.strip() == str(16 * MiB)
        node.stop()
        with open(backing, "rb") as f:
            f.seek(4096)
            assert f.read(8192) == b"\xee" * 8192
    finally:
        run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize(
    "addr",
    ["unix:/nonexistent-dir/x.sock", "unix:/tmp/" + "a" * 150 + ".sock", "192.0.2.1:0"],
)
def test_unbindable_listen_address(tmp_path: Path, addr: str) -> None:
    # --tls off: plaintext beyond loopback must be said (docs/security.md), to reach bind()
    cmd = ["serve", str(tmp_path / "d.img"), "--size=1M", "--listen", addr, "--tls", "off"]
    line = assert_one_line_error(cmd)
    assert f"cannot listen on {addr}" in line
