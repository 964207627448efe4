"""The harness itself (tests/support/cluster.py): a process that does not stop cleanly
fails the run, one killed on purpose does not, one that cannot start is reported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.cluster import Cluster

# A server on a unix socket that ends its own way on SIGTERM: exit status 3, or a
# traceback (exit status 1).
SERVER = """
import signal, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
def stop(*_):
    if sys.argv[2] == "status":
        sys.exit(3)
    raise RuntimeError("boom")
signal.signal(signal.SIGTERM, stop)
while True:
    signal.pause()
"""


@pytest.mark.parametrize(("how", "report"), [("status", "exit status 3"), ("raise", "traceback")])
def test_close_fails_on_an_unclean_stop(
    tmp_path: Path, sock_dir: Path, how: str, report: str
) -> None:
    c = Cluster(tmp_path, sock_dir)
    node = c.node("n0", "1M")
    sock = sock_dir / "bad.sock"
    c.server("bad", [sys.executable, "-c", SERVER, str(sock), how], python=True)
    with pytest.raises(AssertionError, match=f"bad: {report}") as e:
        c.close()
    assert "n0" not in str(e.value).split("--- ")[0], e.value  # the node stopped cleanly
    assert not node.alive()


def test_a_process_killed_on_purpose_is_not_a_failure(tmp_path: Path, sock_dir: Path) -> None:
    with Cluster(tmp_path, sock_dir) as c:
        c.node("n0", "1M").kill()
        c.node("n0")  # restarted: same file, same socket, a stderr file of its own
        assert (tmp_path / "n0.2.stderr").exists()


def test_a_daemon_that_cannot_start_is_reported(tmp_path: Path, sock_dir: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[array]\nname = "x"\n')
    with Cluster(tmp_path, sock_dir) as c, pytest.raises(AssertionError, match="exited 2"):
        c.start_daemon(bad)
