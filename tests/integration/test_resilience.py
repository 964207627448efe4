"""A mirror's resilience with real processes: node and daemon crashes, fault injection.

Every test runs a ``dst daemon`` over ``dst serve`` (or nbdkit) nodes on unix sockets,
writes through the array with a real client (an nbdsh writer process whose writes are
a function of their sequence number, so the expected image is known), breaks
something, and checks every byte of the array and of each leg's data area.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dst.meta.layout import member_size_for

from .arrays import (
    Daemon,
    check_ext4_image,
    dirty_regions,
    ext4_on_nbdfuse,
    member_data,
    remote,
    start_daemon,
    unix_uri,
    wait_until,
    write_spec,
)
from .helpers import DST, Node, nbd_python, require, require_root_dev, run, start_node
from .writer import Writer

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20
BLOCK = 4096
REGION = 64 << 10
DATA = 16 * MiB  # the array's size
MEMBER = member_size_for(DATA)


def leg_data(path: Path) -> bytes:
    """The array's bytes on the leg whose member file is ``path``."""
    return member_data(path, REGION)[:DATA]


def mirror_of(nodes: list[Node], **extra: Any) -> dict[str, Any]:
    legs = [remote(f"leg{i}", n.uri) for i, n in enumerate(nodes)]
    return {"type": "mirror", "name": "m", "members": legs, **extra}


def mirror_status(daemon: Daemon, name: str) -> dict[str, Any]:
    root: dict[str, Any] = daemon.status(name)["arrays"][0]["root"]
    return root


def states(daemon: Daemon, name: str) -> list[str]:
    return [k["state"] for k in mirror_status(daemon, name)["members"]]


@pytest.fixture
def env(tmp_path: Path, sockdir: Path) -> Iterator[dict[str, Any]]:
    """Two ``dst serve`` nodes (restartable on the same socket and file) and a daemon."""
    require("nbdcopy", "nbdinfo", "nbdsh")
    nodes: dict[int, Node] = {}

    def node(i: int) -> Node:
        n = start_node(
            tmp_path / f"leg{i}.img",
            listen=[f"unix:{sockdir}/leg{i}.sock"],
            args=["--size", str(MEMBER)],
            stderr_path=tmp_path / f"leg{i}.stderr",
        )
        nodes[i] = n
        return n

    daemon = start_daemon(sockdir / "control.sock", tmp_path / "daemon.stderr")
    yield {"node": node, "nodes": nodes, "daemon": daemon, "sock": sockdir / "array.sock"}
    daemon.stop()
    for n in nodes.values():
        n.stop()


def create(env: dict[str, Any], tmp: Path, target: dict[str, Any], name: str = "r") -> str:
    spec = write_spec(tmp / f"{name}.toml", name, [f"unix:{env['sock']}"], target)
    env["daemon"].dst("create", str(spec))
    return unix_uri(env["sock"])


def fill(uri: str, tmp: Path) -> bytearray:
    data = os.urandom(DATA)
    (tmp / "fill.bin").write_bytes(data)
    run(["nbdcopy", "--flush", tmp / "fill.bin", uri])
    return bytearray(data)


def read_all(uri: str, tmp: Path) -> bytes:
    run(["nbdcopy", uri, tmp / "out.bin"])
    return (tmp / "out.bin").read_bytes()


def test_node_killed_under_load_comes_back_with_a_delta_resync(
    env: dict[str, Any], tmp_path: Path
) -> None:
    n0, n1 = env["node"](0), env["node"](1)
    daemon: Daemon = env["daemon"]
    uri = create(env, tmp_path, mirror_of([n0, n1]))
    image = fill(uri, tmp_path)
    # The writer touches 32 regions (2 MiB) only, so what leg1 misses is bounded.
    w = Writer(uri, tmp_path, first=0, last=2 * MiB // BLOCK)
    time.sleep(0.5)
    n1.stop(signal.SIGKILL)
    wait_until(lambda: states(daemon, "r")[1] == "failed", "leg1 failed")
    time.sleep(1.0)  # writes go on, degraded
    env["node"](1)  # back on the same socket and file
    wait_until(lambda: states(daemon, "r") == ["in_sync", "in_sync"], "leg1 back in sync")
    count = w.finish()
    assert count > 100
    image = w.apply(image, count)
    m = mirror_status(daemon, "r")
    keeper, resync = m["detail"]["keeper"], m["detail"]["resync"]
    assert keeper["auto_readds"] >= 1
    # Only what was written while leg1 was away is copied: at most the 32 regions the
    # writer touches, far below the device.
    assert 0 < resync["bytes"] <= 32 * REGION < DATA // 4, resync
    assert read_all(uri, tmp_path) == image
    daemon.dst("stop", "r")
    assert leg_data(n0.path) == image
    assert leg_data(n1.path) == image


def test_daemon_killed_mid_writes_resyncs_only_dirty_regions(
    env: dict[str, Any], tmp_path: Path, sockdir: Path
) -> None:
    require("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    n0, n1 = env["node"](0), env["node"](1)
    daemon: Daemon = env["daemon"]
    uri = create(env, tmp_path, mirror_of([n0, n1]))
    digests = ext4_on_nbdfuse(uri, tmp_path)
    # Rewrite blocks past the filesystem's first 8 MiB... no: the whole device is the
    # filesystem.  Rewrite every block of one 1 MiB span with its own content, so the
    # filesystem stays valid whatever the crash leaves, and kill the daemon meanwhile.
    span = (4 * MiB // BLOCK, 5 * MiB // BLOCK)
    rewrite = f"""
import os
data = h.pread({span[1] - span[0]} * 4096, {span[0]} * 4096)
while not os.path.exists({str(tmp_path / "rw.stop")!r}):
    for i in range(0, len(data), 4096):
        h.pwrite(data[i:i + 4096], {span[0]} * 4096 + i)
"""
    w = subprocess.Popen(
        [nbd_python(), "-m", "nbd", "-u", uri, "-c", rewrite],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    daemon.proc.send_signal(signal.SIGKILL)  # the crash, in the middle of writes
    daemon.proc.wait()
    (tmp_path / "rw.stop").touch()
    w.wait(timeout=30)  # it sees the connection drop: that is expected
    dirty = max(dirty_regions(n0.path), dirty_regions(n1.path))
    assert 0 < dirty < DATA // REGION // 2  # marked dirty: far from the whole device
    # Assemble from the members alone, in a new daemon.
    again = start_daemon(sockdir / "control2.sock", tmp_path / "daemon2.stderr")
    env["daemon"] = again
    try:
        out = again.dst("assemble", n1.uri, n0.uri, "--name", "back", "--listen",
                        f"unix:{sockdir}/back.sock").stdout  # fmt: skip
        assert "dirty" in out, out  # the crash left the members marked dirty
        back = unix_uri(sockdir / "back.sock")
        wait_until(lambda: states(again, "back") == ["in_sync", "in_sync"], "legs in sync")
        resync = mirror_status(again, "back")["detail"].get("resync", {})
        # Only the regions marked dirty are copied, not the device.
        assert resync.get("bytes", 0) <= dirty * REGION, (resync, dirty)
        image = tmp_path / "after.img"
        run(["nbdcopy", back, image])
        check_ext4_image(image, digests, tmp_path)
        again.dst("stop", "back")
        assert leg_data(n0.path) == leg_data(n1.path)
    finally:
        again.stop()


def test_nbdkit_error_filter_read_errors_repaired_write_errors_degrade(
    env: dict[str, Any], tmp_path: Path, sockdir: Path
) -> None:
    require("nbdkit")
    n0 = env["node"](0)
    daemon: Daemon = env["daemon"]
    trigger = tmp_path / "errors.on"
    kit_sock = sockdir / "kit.sock"
    kit = subprocess.Popen(
        ["nbdkit", "--foreground", "-U", str(kit_sock), "--filter=error", "memory",
         str(MEMBER), "error-pread-rate=1", "error-pwrite-rate=0", f"error-file={trigger}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until(kit_sock.exists, "nbdkit socket")
        legs = [remote("good", n0.uri), remote("kit", unix_uri(kit_sock))]
        uri = create(env, tmp_path, {"type": "mirror", "name": "m", "members": legs})
        image = fill(uri, tmp_path)
        # Read errors on one leg: the client sees none, data correct (retried).
        trigger.touch()
        for _ in range(3):  # reads are balanced: some go to the failing leg
            assert read_all(uri, tmp_path) == image
        kit_leg = mirror_status(daemon, "r")["detail"]["legs"][1]
        assert kit_leg["counters"]["errors"] > 0
        assert states(daemon, "r") == ["in_sync", "in_sync"]  # read errors do not fail it
        trigger.unlink()
    finally:
        daemon.dst("stop", "r", check=False)  # nbdkit waits for its clients to go
        kit.terminate()
        kit.wait(timeout=20)
    # Write errors: a new nbdkit whose writes fail while the trigger exists.
    kit2_sock = sockdir / "kit2.sock"
    kit2 = subprocess.Popen(
        ["nbdkit", "--foreground", "-U", str(kit2_sock), "--filter=error", "memory",
         str(MEMBER), "error-pwrite-rate=1", f"error-file={trigger}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until(kit2_sock.exists, "nbdkit socket")
        good = env["node"](2)  # n0 belongs to array "r": a fresh array, a fresh node
        legs = [remote("good2", good.uri), remote("kit2", unix_uri(kit2_sock))]
        spec = write_spec(tmp_path / "w.toml", "w", [f"unix:{env['sock']}"],
                          {"type": "mirror", "name": "m2", "members": legs})  # fmt: skip
        daemon.dst("create", str(spec))
        image = fill(uri, tmp_path)
        trigger.touch()
        w = Writer(uri, tmp_path, first=0, last=MiB // BLOCK)
        wait_until(lambda: states(daemon, "w")[1] == "failed", "the failing leg is failed")
        time.sleep(0.3)
        count = w.finish()  # the client saw no error: the good leg took the writes
        image = w.apply(image, count)
        assert read_all(uri, tmp_path) == image
        trigger.unlink()
        time.sleep(1.5)  # failed by errors on a live connection: not re-added by itself
        assert states(daemon, "w") == ["in_sync", "failed"]
        out = daemon.dst("readd", "w", "kit2").stdout
        assert "re-added" in out, out
        wait_until(lambda: states(daemon, "w") == ["in_sync", "in_sync"], "kit2 resynced")
        resync = mirror_status(daemon, "w")["detail"]["resync"]
        assert 0 < resync["bytes"] <= 16 * REGION, resync  # the 1 MiB written, not 16
        run(["nbdcopy", unix_uri(kit2_sock), tmp_path / "kit.bin"])
        assert (tmp_path / "kit.bin").read_bytes()[:DATA] == image
        verify = daemon.dst("verify", "w")
        assert "0 differ" in verify.stdout, verify.stdout
    finally:
        daemon.dst("stop", "w", check=False)
        kit2.terminate()
        kit2.wait(timeout=20)


def test_cli_fail_readd_verify_repair(env: dict[str, Any], tmp_path: Path) -> None:
    n0, n1 = env["node"](0), env["node"](1)
    daemon: Daemon = env["daemon"]
    uri = create(env, tmp_path, mirror_of([n0, n1]))
    image = fill(uri, tmp_path)
    daemon.dst("fail", "r", "leg1")
    assert states(daemon, "r") == ["in_sync", "failed"]
    w = Writer(uri, tmp_path, first=0, last=2 * MiB // BLOCK)
    time.sleep(0.5)
    count = w.finish()
    image = w.apply(image, count)
    time.sleep(1.5)  # failed by the operator: not re-added by itself
    assert states(daemon, "r") == ["in_sync", "failed"]
    out = daemon.dst("readd", "r", "leg1").stdout
    assert "resyncing" in out and "regions" in out, out
    wait_until(lambda: states(daemon, "r") == ["in_sync", "in_sync"], "leg1 resynced")
    assert mirror_status(daemon, "r")["detail"]["resync"]["bytes"] <= 32 * REGION
    assert daemon.dst("verify", "r").returncode == 0
    # Bit rot in leg1's data area, behind the array's back (node stopped meanwhile).
    daemon.dst("stop", "r")
    n1.stop()
    with open(n1.path, "r+b") as f:
        for region in (3, 11):
            f.seek(region * REGION + 123)
            f.write(b"rot")
    env["node"](1)
    daemon.dst("start", "r")
    bad = daemon.dst("verify", "r", check=False)
    assert bad.returncode == 1 and "2 differ" in bad.stdout and "3 11" in bad.stdout, bad
    fixed = daemon.dst("verify", "r", "--repair", "--source", "leg0")
    assert "2 repaired" in fixed.stdout, fixed.stdout
    assert daemon.dst("verify", "r").returncode == 0
    assert read_all(uri, tmp_path) == image
    daemon.dst("stop", "r")
    assert leg_data(n0.path) == leg_data(n1.path) == image


def test_members_of_another_array_are_refused(env: dict[str, Any], tmp_path: Path) -> None:
    daemon: Daemon = env["daemon"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d, name in ((a, "one"), (b, "two")):
        members = [
            {"type": "file", "name": f"{name}{i}", "path": str(d / f"{i}.img"), "size": MEMBER}
            for i in range(2)
        ]
        spec = write_spec(tmp_path / f"{name}.toml", name, [],
                          {"type": "mirror", "name": name, "members": members})  # fmt: skip
        daemon.dst("create", str(spec))
        daemon.dst("stop", name)
    mixed = [
        {"type": "file", "name": "x0", "path": str(a / "0.img")},
        {"type": "file", "name": "x1", "path": str(b / "1.img")},
    ]
    spec = write_spec(tmp_path / "mixed.toml", "mixed", [],
                      {"type": "mirror", "name": "mixed", "members": mixed})  # fmt: skip
    bad = daemon.dst("create", str(spec), check=False)
    assert bad.returncode != 0 and "different arrays" in bad.stderr, bad.stderr
    bad = run([*DST, "assemble", str(a / "0.img"), str(b / "1.img"), "--dry-run"], check=False)
    assert bad.returncode != 0 and "different arrays" in bad.stderr, bad.stderr
    ok = run([*DST, "assemble", str(b / "1.img"), str(b / "0.img"), "--dry-run"])
    assert '"two0"' in ok.stdout and '"two1"' in ok.stdout, ok.stdout
