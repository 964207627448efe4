"""nbdfuse exposes a dst export as a file; a loop-mounted ext4 lives on it.

mkfs, write files, unmount, fsck clean, remount and compare checksums; then check
the node's backing file itself holds the same filesystem (debugfs reads the files
straight out of it).  Needs root, /dev/fuse and loop devices.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import NodeFactory
from .helpers import nbdsh, require, require_root_dev, run

MiB = 1 << 20


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait until nbdfuse wrote its pid file (it does so once it serves)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"nbdfuse exited {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise AssertionError("nbdfuse not ready in time")
        time.sleep(0.05)


@pytest.mark.slow
def test_nbdfuse_loop_mounted_ext4(node_factory: NodeFactory, tmp_path: Path) -> None:
    require("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    node = node_factory(size="128M")
    fuse_dir = tmp_path / "fuse"
    fs_dir = tmp_path / "fs"
    fuse_dir.mkdir()
    fs_dir.mkdir()
    image = fuse_dir / "disk"
    pidfile = tmp_path / "nbdfuse.pid"
    fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(image), node.uri])
    mounted = False
    try:
        _wait_for(pidfile, fuse)
        assert image.stat().st_size == 128 * MiB
        run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", image])
        run(["mount", "-o", "loop", image, fs_dir])
        mounted = True
        digests = {}
        for i in range(6):
            data = os.urandom((i + 1) * 700_001)
            (fs_dir / f"f{i}").write_bytes(data)
            digests[f"f{i}"] = hashlib.sha256(data).hexdigest()
        (fs_dir / "dir").mkdir()
        (fs_dir / "dir" / "small").write_text("hello from dst\n")
        run(["umount", fs_dir])
        mounted = False
        run(["e2fsck", "-fn", image])  # exit 0: clean
        run(["mount", "-o", "loop,ro", image, fs_dir])
        mounted = True
        for name, digest in digests.items():
            assert hashlib.sha256((fs_dir / name).read_bytes()).hexdigest() == digest
        assert (fs_dir / "dir" / "small").read_text() == "hello from dst\n"
        run(["umount", fs_dir])
        mounted = False
    finally:
        if mounted:
            run(["umount", "-l", fs_dir], check=False)
        run(["fusermount3", "-u", fuse_dir], check=False)
        try:
            fuse.wait(timeout=20)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
    # Everything reached the node: its backing file is the same clean filesystem.
    nbdsh(node.uri, "h.flush()")
    run(["e2fsck", "-fn", node.path])
    for name, digest in digests.items():
        out = tmp_path / f"dump-{name}"
        run(["debugfs", "-R", f"dump /{name} {out}", node.path])
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
