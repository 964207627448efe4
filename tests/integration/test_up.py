"""``dst up``: the demo cluster end to end, as a user meets it.

Start it, read its status (table and JSON), put an ext4 filesystem on the mirror via
nbdfuse, Ctrl-C it, and check the two node files: identical legs holding a clean
filesystem with the files written.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from dst.meta.layout import member_size_for
from tests.support.cluster import DST, run, unix_uri, wait_until

from .arrays import check_ext4_image, ext4_on_nbdfuse
from .helpers import require, require_root_dev

UP_TIMEOUT = 30.0


def _node_pids(data_dir: Path) -> list[int]:
    """Pids of the ``dst serve`` processes serving files in ``data_dir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and any(a.startswith(os.fsencode(data_dir)) for a in argv):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_dst_up_demo_mirror(tmp_path: Path, sock_dir: Path) -> None:
    require("nbdinfo", "nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    data_dir, sock, control = tmp_path / "data", sock_dir / "dst.sock", sock_dir / "control.sock"
    cmd = [*DST, "up", "--dir", str(data_dir), "--size", "64M"]
    cmd += ["--listen", f"unix:{sock}", "--control", str(control)]
    proc, lines, out = _start_up(cmd)
    try:
        nodes = _node_pids(data_dir)
        assert len(nodes) == 2, nodes

        base = [*DST, "status", "--control", str(control)]
        table = run(base).stdout
        assert "demo" in table and "mirror" in table and "running" in table
        status = json.loads(run([*base, "--json"]).stdout)
        (array,) = status["arrays"]
        assert array["algorithm"] == "mirror" and array["name"] == "demo"
        assert array["size"] == 64 << 20
        assert array["exports"] == [unix_uri(sock)]
        legs = array["root"]["members"]
        assert [(leg["name"], leg["type"], leg["state"]) for leg in legs] == [
            ("node-a", "remote", "in_sync"),
            ("node-b", "remote", "in_sync"),
        ]

        digests = ext4_on_nbdfuse(unix_uri(sock), tmp_path)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        out.append(line)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert rc == 0, err
    assert out[-1].strip() == "dst stopped", out
    assert "Traceback" not in err and "WARNING" not in err, err
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in nodes), "nodes to exit")
    assert _node_pids(data_dir) == []
    a, b = data_dir / "node-a.img", data_dir / "node-b.img"
    size = 64 << 20
    assert a.stat().st_size == b.stat().st_size == member_size_for(size)
    assert a.read_bytes()[:size] == b.read_bytes()[:size], "mirror legs differ"
    check_ext4_image(a, digests, tmp_path)

    # dst up again on the same directory: the members are reused and the mirror is
    # assembled from their superblocks (the nodes got new ports): the filesystem is there.
    proc, lines, out = _start_up(cmd)
    try:
        assert any(line.startswith(f"reusing {a}") for line in out), out
        status = json.loads(run([*base, "--json"]).stdout)
        legs = status["arrays"][0]["root"]["members"]
        assert [leg["state"] for leg in legs] == ["in_sync", "in_sync"]
        image = tmp_path / "again.img"
        run(["nbdcopy", unix_uri(sock), image])
        check_ext4_image(image, digests, tmp_path)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # dst up killed outright: its nodes do not linger.
    proc, lines, out = _start_up(cmd)
    nodes = _node_pids(data_dir)
    assert len(nodes) == 2, nodes
    proc.kill()  # SIGKILL to dst up alone, not to its process group
    proc.wait()
    wait_until(lambda: _node_pids(data_dir) == [], "nodes to exit after dst up was killed")


def _start_up(cmd: list[str]) -> tuple[subprocess.Popen[str], queue.Queue[str | None], list[str]]:
    """Start ``dst up``; return once it printed "dst is up" (with the lines so far)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()
    stdout, out = proc.stdout, list[str]()

    def reader() -> None:
        for line in stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    try:
        while not out or not out[-1].startswith("dst is up"):
            line = lines.get(timeout=UP_TIMEOUT)
            assert line is not None, f"dst up exited {proc.wait()}: {''.join(out)}"
            out.append(line)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, lines, out
