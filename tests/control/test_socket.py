"""Control socket over a real unix socket: round trips, permissions, typed errors."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from dst.control import ControlClient, ControlServer, call
from dst.control import messages as m
from dst.control import operations as op
from dst.errors import ControlError

pytestmark = pytest.mark.timeout(30)


class Daemon:
    """A toy handler: records requests; a few ops misbehave on purpose."""

    def __init__(self) -> None:
        self.seen: list[op.Request] = []
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def handle(self, req: op.Request) -> Any:
        self.seen.append(req)
        match req:
            case op.Status(array=None):
                return {"arrays": ["demo"]}
            case op.Status(array="demo"):
                return {"name": "demo", "state": "ok"}
            case op.Status(array=name):
                raise ControlError("no-such-array", f"no array {name!r}", field="array")
            case op.Start(array="boom"):
                raise RuntimeError("secret traceback detail")
            case op.Start(array="weird"):
                return {"x": object()}
            case op.Stop(array="slow"):
                self.entered.set()
                await self.release.wait()
                return "released"
        return None


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "ctl.sock"


@pytest.fixture
async def daemon(sock_path: Path) -> Any:
    d = Daemon()
    async with ControlServer(sock_path, d.handle):
        yield d


async def raw(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(os.fspath(path), limit=1 << 22)


async def ask(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes | dict[str, Any]
) -> dict[str, Any]:
    if isinstance(data, dict):
        data = json.dumps(data).encode() + b"\n"
    w.write(data)
    await w.drain()
    reply: dict[str, Any] = json.loads(await r.readline())
    return reply


async def test_round_trip(daemon: Daemon, sock_path: Path) -> None:
    async with await ControlClient.connect(sock_path) as c:
        assert await c.call("status") == {"arrays": ["demo"]}
        assert await c.request(op.Status(array="demo")) == {"name": "demo", "state": "ok"}
        assert await c.call("create", {"spec": {"array": {"name": "d"}}}) is None
    assert daemon.seen == [op.Status(), op.Status("demo"), op.Create({"array": {"name": "d"}})]


async def test_sync_call(daemon: Daemon, sock_path: Path) -> None:
    result = await asyncio.to_thread(call, sock_path, "status", {"array": "demo"}, 5)
    assert result == {"name": "demo", "state": "ok"}
    with pytest.raises(ControlError) as e:
        await asyncio.to_thread(call, sock_path, "status", {"array": "nope"}, 5)
    assert (e.value.code, e.value.field, str(e.value)) == (
        "no-such-array",
        "array",
        "no array 'nope'",
    )


async def test_permissions(daemon: Daemon, sock_path: Path) -> None:
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700
    assert [p.name for p in sock_path.parent.iterdir()] == ["ctl.sock"]  # no temporary left


async def test_existing_directory_is_left_alone(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    async with ControlServer(tmp_path / "c.sock", Daemon().handle):
        assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o755
        assert stat.S_IMODE(os.stat(tmp_path / "c.sock").st_mode) == 0o600


async def test_handler_errors(daemon: Daemon, sock_path: Path, caplog: Any) -> None:
    async with await ControlClient.connect(sock_path) as c:
        with pytest.raises(ControlError) as e:
            await c.call("status", {"array": "nope"})
        assert (e.value.code, e.value.field) == ("no-such-array", "array")
        with pytest.raises(ControlError) as e:
            await c.call("start", {"array": "boom"})
        assert e.value.code == "internal"
        assert "secret" not in str(e.value)
        with pytest.raises(ControlError) as e:
            await c.call("start", {"array": "weird"})
        assert e.value.code == "internal"
        assert await c.call("status") == {"arrays": ["demo"]}  # still usable
    assert "secret traceback detail" in caplog.text


@pytest.mark.parametrize(
    ("data", "code", "field"),
    [
        (b"this is not json\n", "bad-json", ""),
        (b'{"v": 1, "id": 5, "op": "frobnicate"}\n', "unknown-op", "op"),
        (b'{"v": 9, "id": 5, "op": "status"}\n', "bad-version", "v"),
        (b'{"v": 1, "id": 5, "op": "start", "args": {}}\n', "bad-args", "array"),
        (b'{"v": 1, "id": 5, "op": "start", "args": {"array": 1}}\n', "bad-args", "array"),
    ],
)
async def test_bad_request_keeps_connection(
    daemon: Daemon, sock_path: Path, data: bytes, code: str, field: str
) -> None:
    r, w = await raw(sock_path)
    reply = await ask(r, w, data)
    assert reply["v"] == 1 and reply["ok"] is False
    assert reply["error"]["code"] == code
    assert reply["error"].get("field", "") == field
    assert reply["id"] == (None if code == "bad-json" else 5)
    reply = await ask(r, w, {"v": 1, "id": 6, "op": "status", "args": {}})
    assert reply == {"v": 1, "id": 6, "ok": True, "result": {"arrays": ["demo"]}}
    w.close()
    await w.wait_closed()


async def test_blank_lines_are_ignored(daemon: Daemon, sock_path: Path) -> None:
    r, w = await raw(sock_path)
    reply = await ask(r, w, b"\n  \n" + m.encode_request(1, op.Status()))
    assert reply["ok"] is True
    w.close()


async def test_oversize_line(daemon: Daemon, sock_path: Path) -> None:
    r, w = await raw(sock_path)
    w.write(b'{"v": 1, "id": 1, "op": "status", "args": {"pad": "' + b"x" * (m.MAX_LINE + 10))
    await w.drain()
    reply = json.loads(await r.readline())
    assert reply["error"]["code"] == "too-big"
    assert await r.read() == b""  # closed by the server
    w.close()
    # the server still serves others, and a line of exactly MAX_LINE bytes is fine
    async with await ControlClient.connect(sock_path) as c:
        assert await c.call("status") == {"arrays": ["demo"]}
    pad = m.MAX_LINE - len(m.encode_request(2, op.Create({"p": ""})))
    big = op.Create({"p": "x" * (pad + 1)})
    assert len(m.encode_request(2, big)) == m.MAX_LINE + 1
    r, w = await raw(sock_path)
    assert (await ask(r, w, m.encode_request(2, big)))["ok"] is True
    w.close()


async def test_connections_are_concurrent(daemon: Daemon, sock_path: Path) -> None:
    async with (
        await ControlClient.connect(sock_path) as slow,
        await ControlClient.connect(sock_path) as fast,
    ):
        pending = asyncio.create_task(slow.call("stop", {"array": "slow"}))
        await daemon.entered.wait()
        assert await fast.call("status") == {"arrays": ["demo"]}
        assert not pending.done()
        daemon.release.set()
        assert await pending == "released"


async def test_sync_call_timeout(daemon: Daemon, sock_path: Path) -> None:
    with pytest.raises(ControlError) as e:
        await asyncio.to_thread(call, sock_path, "stop", {"array": "slow"}, 0.2)
    assert e.value.code == "timeout"
    daemon.release.set()


async def test_unreachable(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    with pytest.raises(ControlError) as e:
        call(path, "status")
    assert e.value.code == "unreachable"
    assert str(e.value).startswith(f"cannot connect to control socket {path}: ")
    with pytest.raises(ControlError) as e:
        await ControlClient.connect(path)
    assert e.value.code == "unreachable"
    # a stale socket: bound, nobody listening
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(path))
        with pytest.raises(ControlError) as e:
            call(path, "status")
        assert e.value.code == "unreachable"


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(path))
    async with ControlServer(path, Daemon().handle):
        assert await asyncio.to_thread(call, path, "status") == {"arrays": ["demo"]}


async def test_live_socket_and_other_files_are_refused(daemon: Daemon, sock_path: Path) -> None:
    with pytest.raises(OSError, match="already listening"):
        await ControlServer(sock_path, Daemon().handle).start()
    assert await asyncio.to_thread(call, sock_path, "status") == {"arrays": ["demo"]}
    plain = sock_path.parent / "file"
    plain.write_text("keep me")
    with pytest.raises(FileExistsError):
        await ControlServer(plain, Daemon().handle).start()
    assert plain.read_text() == "keep me"


async def test_close_ends_connections_and_removes_socket(sock_path: Path) -> None:
    d = Daemon()
    server = ControlServer(sock_path, d.handle)
    await server.start()
    c = await ControlClient.connect(sock_path)
    pending = asyncio.create_task(c.call("stop", {"array": "slow"}))
    await d.entered.wait()
    await server.close()
    with pytest.raises(FileNotFoundError):
        os.stat(sock_path)
    with pytest.raises(ControlError) as e:
        await pending
    assert e.value.code == "bad-response"  # connection closed under the request
    await c.close()
    await server.close()  # idempotent
