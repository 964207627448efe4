"""nbdfuse exposes a dst export as a file; a loop-mounted ext4 lives on it.

mkfs, write files, unmount, fsck clean, remount and compare checksums; then check
the node's backing file itself holds the same filesystem (debugfs reads the files
straight out of it).  Needs root, /dev/fuse and loop devices.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cluster import Cluster

from .arrays import check_ext4_image, ext4_on_nbdfuse
from .helpers import nbdsh, require, require_root_dev

MiB = 1 << 20


@pytest.mark.slow
def test_nbdfuse_loop_mounted_ext4(cluster: Cluster, tmp_path: Path) -> None:
    require("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    node = cluster.node("node", "128M")
    digests = ext4_on_nbdfuse(node.uri, tmp_path)
    # Everything reached the node: its backing file is the same clean filesystem.
    nbdsh(node.uri, "h.flush()")
    check_ext4_image(Path(node.path), digests, tmp_path)
