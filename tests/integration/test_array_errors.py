"""Array commands on bad input: one line naming what is wrong, non-zero exit, no
traceback, and the daemon unharmed (it keeps serving)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import DST, Daemon, write_spec


def fails(daemon_or_control: Daemon | Path, *args: str) -> str:
    """Run a dst array command that must fail with one ``dst: error:`` line."""
    control = (
        daemon_or_control.control if isinstance(daemon_or_control, Daemon) else daemon_or_control
    )
    proc = subprocess.run(
        [*DST, *args, "--control", str(control)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dst: error: "), proc.stderr
    return lines[0]


MEMORY_LINEAR = {
    "type": "linear",
    "members": [
        {"type": "memory", "name": "m0", "size": "1M"},
        {"type": "memory", "name": "m1", "size": "1M"},
    ],
}
MEMORY_MIRROR = {
    "type": "mirror",
    "members": [
        {"type": "memory", "name": "a", "size": "1M"},
        {"type": "memory", "name": "b", "size": "1M"},
    ],
}


@pytest.mark.parametrize(
    ("body", "line", "key", "reason"),
    [
        ('type = "memory"\nsise = "1M"\n', 6, "array.target.sise", "unknown key"),
        ('type = "memory"\nsize = "12Q"\n', 6, "array.target.size", "not a size"),
        (
            'type = "linear"\nmembers = [\n  { type = "remote", uri = "http://x/" },\n]\n',
            7,
            "array.target.members[0].uri",
            "not an NBD URI",
        ),
    ],
)
def test_bad_spec_file(
    daemon: Daemon, tmp_path: Path, body: str, line: int, key: str, reason: str
) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(f'[array]\nname = "x"\n\n[array.target]\n{body}')
    msg = fails(daemon, "create", str(spec))
    assert f"{spec}:{line}: {key}" in msg and reason in msg, msg
    assert daemon.status() == {"arrays": []}


def test_unreachable_node(daemon: Daemon, tmp_path: Path, sock_dir: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"nbd://127.0.0.1:{port}/"
    target = {"type": "linear", "members": [{"type": "remote", "name": "gone", "uri": uri}]}
    spec = write_spec(tmp_path / "x.toml", "x", [f"unix:{sock_dir}/x.sock"], target)
    msg = fails(daemon, "create", str(spec))
    assert "gone" in msg and uri in msg, msg
    assert daemon.status() == {"arrays": []}
    assert not (sock_dir / "x.sock").exists()


def test_unknown_array(daemon: Daemon) -> None:
    for args in (["stop", "nope"], ["start", "nope"], ["status", "nope"], ["remove", "nope", "n"]):
        assert "no array named 'nope'" in fails(daemon, *args)


def test_no_daemon(sock_dir: Path) -> None:
    control = sock_dir / "none.sock"
    assert f"no array daemon at {control}" in fails(control, "status")


def test_remove_and_add_refused(daemon: Daemon, tmp_path: Path) -> None:
    daemon.dst("create", str(write_spec(tmp_path / "l.toml", "l", [], MEMORY_LINEAR)))
    daemon.dst("create", str(write_spec(tmp_path / "m.toml", "m", [], MEMORY_MIRROR)))
    msg = fails(daemon, "remove", "l", "m0")
    assert "only the last node" in msg and "'m1'" in msg, msg
    assert "no node 'zz'" in fails(daemon, "remove", "l", "zz")
    # a mirror grows by legs, but not by a file that is not there, and keeps two legs
    missing = str(tmp_path / "n.img")
    assert f"{missing}: No such file" in fails(daemon, "add", "m", "--path", missing)
    assert "two legs" in fails(daemon, "remove", "m", "b")
    # an unreachable node is not added; the array keeps its size
    msg = fails(daemon, "add", "l", "--uri", "nbd+unix:///?socket=/nonexistent.sock", "--name", "z")
    assert "nbd+unix:///?socket=/nonexistent.sock" in msg, msg
    assert "duplicate node name 'm0'" in fails(
        daemon, "add", "l", "--uri", "nbd://h/", "--name", "m0"
    )
    (lin,) = daemon.status("l")["arrays"]
    assert lin["size"] == 2 << 20
    assert [k["name"] for k in lin["root"]["members"]] == ["m0", "m1"]
    assert "exists" in fails(daemon, "create", str(tmp_path / "l.toml"))


def _raw(control: Path, payload: bytes) -> list[dict[str, Any]]:
    """Send raw bytes on the control socket; the JSON lines answered."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(control))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_bad_control_requests(daemon: Daemon) -> None:
    replies = _raw(
        daemon.control,
        b"garbage\n"
        b'{"v": 1, "id": 2, "op": "frob", "args": {}}\n'
        b'{"v": 99, "id": 3, "op": "status", "args": {}}\n'
        b'{"v": 1, "id": 4, "op": "stop", "args": {"array": 5}}\n'
        b'{"v": 1, "id": 5, "op": "create", "args": {"spec": {"array": {"name": "q"}}}}\n'
        b'{"v": 1, "id": 6, "op": "status", "args": {}}\n',
    )
    errors = [(r["id"], r["ok"], r.get("error", {}).get("code")) for r in replies]
    assert errors == [
        (None, False, "bad-json"),
        (2, False, "unknown-op"),
        (3, False, "bad-version"),
        (4, False, "bad-args"),
        (5, False, "bad-spec"),
        (6, True, None),
    ], replies
    assert replies[4]["error"]["field"] == "spec.array.target"
    assert replies[5]["result"] == {"arrays": []}
    assert daemon.status() == {"arrays": []}  # still serving new connections
