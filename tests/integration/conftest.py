"""Process fixtures over the harness (:mod:`tests.support.cluster`).

Every process a test starts through :func:`cluster` is stopped at teardown (daemons
first, then nodes) and must have exited 0 -- unless the test killed it on purpose --
without a traceback on stderr: a clean shutdown is part of every test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, Daemon, Node


@pytest.fixture
def cluster(tmp_path: Path, sock_dir: Path) -> Iterator[Cluster]:
    """Nodes and daemons started on demand: files in ``tmp_path``, sockets in ``sock_dir``."""
    c = Cluster(tmp_path, sock_dir)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def daemon(cluster: Cluster) -> Daemon:
    """A ``dst daemon`` with no array yet (its control socket in ``sock_dir``)."""
    return cluster.start_daemon()


@pytest.fixture
def node(cluster: Cluster) -> Node:
    """A 64 MiB sparse file served on a unix socket."""
    return cluster.node("node", "64M")


@pytest.fixture
def tcp_node(cluster: Cluster) -> Node:
    """A 64 MiB sparse file served on 127.0.0.1, port chosen by the kernel."""
    return cluster.node("node", "64M", listen=["tcp"])
