"""Process fixtures: ``dst serve`` on a temporary unix socket or on TCP port 0.

Every node started through :func:`node_factory` is stopped at teardown with SIGTERM
and must exit 0 without a traceback on stderr (clean shutdown is part of every test).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from .helpers import Node, start_node

NodeFactory = Callable[..., Node]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="dst-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def node_factory(tmp_path: Path, sockdir: Path) -> Iterator[NodeFactory]:
    """``start(size="64M", args=(), listen=None, path=None)`` -> a running Node.

    ``listen`` defaults to one unix socket in ``sockdir``; ``"tcp"`` means
    127.0.0.1:0.  ``size`` is passed as ``--size`` (None: none).
    """
    nodes: list[Node] = []

    def start(
        size: str | None = "64M",
        *,
        args: Sequence[str] = (),
        listen: Sequence[str] | None = None,
        path: Path | None = None,
    ) -> Node:
        n = len(nodes)
        path = path or tmp_path / f"disk{n}.img"
        if listen is None:
            listen = [f"unix:{sockdir}/node{n}.sock"]
        listen = ["127.0.0.1:0" if a == "tcp" else a for a in listen]
        full = list(args) + (["--size", size] if size is not None else [])
        node = start_node(path, listen=listen, args=full, stderr_path=tmp_path / f"node{n}.stderr")
        nodes.append(node)
        return node

    yield start
    errors = []
    for node in nodes:
        rc = node.stop()
        err = node.stderr()
        if rc != 0 or "Traceback" in err:
            errors.append(f"{node.path}: exit status {rc}\n{err}")
    if errors:
        pytest.fail("dst serve did not shut down cleanly:\n" + "\n".join(errors))


@pytest.fixture
def node(node_factory: NodeFactory) -> Node:
    """A 64 MiB sparse file served on a unix socket."""
    return node_factory()


@pytest.fixture
def tcp_node(node_factory: NodeFactory) -> Node:
    """A 64 MiB sparse file served on 127.0.0.1, port chosen by the kernel."""
    return node_factory(listen=["tcp"])
