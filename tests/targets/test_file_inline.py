"""A file's compiled inline runs (:mod:`dst._inline`, :meth:`FileDevice.inline_runs`):
a node's parse, ``pwrite`` and reply loop in C, held to the pure-Python inline form it
stands in for -- the same replies, the same requests left over, the same bytes on disk --
for any stream of requests, good or bad."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dst import _inline
from dst.errors import BlockError
from dst.nbd import requests as rq
from dst.nbd.constants import Cmd, CmdFlags
from dst.nbd.events import Request
from dst.net.client import NbdClient
from dst.net.server import NbdServer
from dst.targets import file as filemod
from dst.targets.file import FileDevice
from dst.targets.meteredfile import MeteredFile
from tests.support.rawnbd import request

SIZE = 256 << 10
MAX_BLOCK = 16 << 10


def test_the_compiled_module_is_built() -> None:
    """CI builds it (a C compiler and Python's headers are set up); without it dst
    serves in pure Python, but these tests would test nothing."""
    assert _inline.Inline.__module__ == "dst._inline"
    assert filemod.COMPILED or os.environ.get("DST_PURE_PYTHON")


@dataclass
class Side:
    """One way of serving: a file, its parser, the replies sent, the requests left."""

    device: FileDevice
    parser: rq.RequestParser
    replies: bytearray
    structured: bool
    writable: bool

    def inline(self, typ: int, flags: int, handle: int, offset: int, length: int,
               data: memoryview | None) -> bool:  # fmt: skip
        """The pure-Python inline form, as the server's connection offers it a file
        whose export allows no command flags (dst.net.transmission)."""
        if not length or offset + length > SIZE or length > MAX_BLOCK or flags:
            return False
        if typ == Cmd.READ:
            value = self.device.read_now(offset, length)
            assert value is not None and len(value) == length
            head = (
                rq.data_ok(handle, 8 + length, offset) if self.structured else rq.simple_ok(handle)
            )
            self.replies += head + value
            return True
        if data is None or not self.writable or not self.device.write_now(offset, data):
            return False
        self.replies += rq.simple_ok(handle)
        return True

    def sink(self, replies: bytes) -> object:
        self.replies += replies
        return None


def side(path: Path, seed: bytes, *, structured: bool, writable: bool) -> Side:
    path.write_bytes(seed)
    device = FileDevice(path)
    asyncio.run(device.open())  # (a file opens without waiting: no loop to share)
    return Side(device, rq.RequestParser(max_payload=MAX_BLOCK), bytearray(), structured, writable)


def summary(reqs: list[Request]) -> list[tuple[int, int, int, int, int, bytes | None]]:
    return [
        (r.flags, r.type, r.handle, r.offset, r.length, None if r.data is None else bytes(r.data))
        for r in reqs
    ]


a_request = st.tuples(
    st.sampled_from([Cmd.READ, Cmd.READ, Cmd.WRITE, Cmd.WRITE, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM]),
    st.sampled_from([0, 0, 0, 0, int(CmdFlags.FUA), int(CmdFlags.DF)]),
    st.integers(0, SIZE + 4096),  # offset: beyond the end too
    st.one_of(st.integers(1, 8192), st.sampled_from([0, MAX_BLOCK, MAX_BLOCK + 1])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(a_request, min_size=1, max_size=24),
    cut=st.integers(0, 6000),  # bytes missing at the end (a payload still coming)
    limit=st.integers(1, 40),
    budget=st.integers(0, 64 << 10),
    first_free=st.booleans(),
    structured=st.booleans(),
    writable=st.booleans(),
)
def test_runs_serve_exactly_as_the_python_inline_form(
    tmp_path_factory: pytest.TempPathFactory,
    reqs: list[tuple[int, int, int, int]],
    cut: int,
    limit: int,
    budget: int,
    first_free: bool,
    structured: bool,
    writable: bool,
) -> None:
    where = tmp_path_factory.mktemp("runs")
    seed = os.urandom(SIZE)
    stream = bytearray()
    for handle, (typ, flags, offset, length) in enumerate(reqs):
        stream += request(typ, handle, offset, length, flags)
        if typ == Cmd.WRITE:  # (one too long is sent all the same, and drained)
            stream += bytes([handle % 251 + 1]) * length
    stream = stream[: max(len(stream) - cut, 28)]
    py = side(where / "py", seed, structured=structured, writable=writable)
    c = side(where / "c", seed, structured=structured, writable=writable)
    runs = c.device.inline_runs(
        c.sink, size=SIZE, max_block=MAX_BLOCK, structured=structured, writable=writable
    )
    assert runs is not None
    try:
        for s in (py, c):
            s.parser.feed(stream)
        for _ in range(3):  # the first call as limited, then the rest
            got_py = py.parser.requests(limit, budget, first_free=first_free, inline=py.inline)
            got_c = c.parser.requests(limit, budget, first_free=first_free, inline=c.inline,
                                      runs=runs)  # fmt: skip
            assert summary(got_c) == summary(got_py)
            assert c.parser.blocked == py.parser.blocked
            assert bytes(c.replies) == bytes(py.replies)
            assert c.parser.buffered == py.parser.buffered
            limit, budget = 1 << 30, rq.UNLIMITED
    finally:
        asyncio.run(py.device.close())
        asyncio.run(c.device.close())
    assert (where / "c").read_bytes() == (where / "py").read_bytes()


@pytest.fixture
async def dev(tmp_path: Path) -> AsyncIterator[FileDevice]:
    d = FileDevice(tmp_path / "f.img", size=SIZE, create=True)
    await d.open()
    yield d
    await d.close()


def offer(device: FileDevice, sink: list[bytes], *, writable: bool = True) -> rq.Runs:
    runs = device.inline_runs(
        sink.append, size=SIZE, max_block=MAX_BLOCK, structured=False, writable=writable
    )
    assert runs is not None
    return runs


async def test_a_closed_file_takes_nothing(dev: FileDevice) -> None:
    """Its descriptor's number may be another file's by now: the runs stop at once."""
    sink: list[bytes] = []
    runs = offer(dev, sink)
    buf = bytearray(request(Cmd.WRITE, 1, 0, 4) + b"data")
    assert runs(buf, 0, len(buf), 0) == (len(buf), 0) and len(sink) == 1
    await dev.close()
    assert runs(buf, 0, len(buf), 0) == (0, 0) and len(sink) == 1


async def test_a_short_read_or_failed_write_is_left_to_python(
    dev: FileDevice, tmp_path: Path
) -> None:
    """The run stops before it (Python serves it again and answers the error), with
    what came before it answered."""
    sink: list[bytes] = []
    runs = offer(dev, sink)
    os.truncate(tmp_path / "f.img", 8192)  # shrunk under us
    buf = bytearray(request(Cmd.READ, 1, 0, 4096) + request(Cmd.READ, 2, 4096, 8192))
    assert runs(buf, 0, len(buf), 1 << 20) == (28, 4096)
    assert sink == [rq.simple_ok(1) + bytes(4096)]
    ro = FileDevice(tmp_path / "f.img", read_only=True)
    await ro.open()
    try:  # asked as writable, the read-only file still takes no WRITE
        runs = offer(ro, sink)
        buf = bytearray(request(Cmd.WRITE, 3, 0, 4) + b"data")
        assert runs(buf, 0, len(buf), 0) == (0, 0) and len(sink) == 1
    finally:
        await ro.close()


async def test_bad_arguments_are_refused(dev: FileDevice) -> None:
    runs = offer(dev, [])
    with pytest.raises(ValueError, match="within the buffer"):
        runs(bytearray(10), 0, 11, 0)
    with pytest.raises(TypeError, match="buffer, pos, end, budget"):
        runs(bytearray(10), 0, 10)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        runs("text", 0, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _inline.Inline(dev._fd, SIZE, MAX_BLOCK, False, True, None)  # type: ignore[arg-type]


async def test_only_a_plain_file_offers_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MeteredFile counts every request in Python: no runs; nor with DST_PURE_PYTHON."""
    metered = MeteredFile(tmp_path / "m.img", size=SIZE, create=True)
    await metered.open()
    plain = FileDevice(tmp_path / "p.img", size=SIZE, create=True)
    await plain.open()
    try:
        assert offered(metered) is None
        assert offered(plain) is not None
        monkeypatch.setattr(filemod, "COMPILED", False)
        assert offered(plain) is None
    finally:
        await metered.close()
        await plain.close()


def offered(device: FileDevice) -> rq.Runs | None:
    return device.inline_runs(print, size=SIZE, max_block=MAX_BLOCK, structured=False,
                              writable=True)  # fmt: skip


async def test_a_served_file_answers_by_its_runs_and_python_the_rest(
    sock_dir: Path, tmp_path: Path
) -> None:
    """Through the server: many writes and reads in flight at once, with and without
    structured replies (nbdsh), data verified; a read the shrunk file cannot answer
    gets EIO from Python, a write to a read-only export EPERM, and both connections
    go on."""
    path = tmp_path / "served.img"
    device = FileDevice(path, size=4 << 20, create=True)
    await device.open()
    ro = FileDevice(path, read_only=True)
    await ro.open()
    server = NbdServer({"": device, "ro": ro})
    (address,) = await server.start(f"unix:{sock_dir / 'f.sock'}")
    blocks = [os.urandom(4096) for _ in range(64)]
    try:
        async with await NbdClient.connect(address) as c:
            (conn,) = server.connections
            assert conn.tx is not None and conn.tx.runs is not None and c.structured
            await asyncio.gather(*(c.write(i * 4096, b) for i, b in enumerate(blocks)))
            reads = await asyncio.gather(*(c.read(i * 4096, 4096) for i in range(64)))
            assert reads == blocks and path.read_bytes()[: 64 * 4096] == b"".join(blocks)
            script = (
                "h.set_request_structured_replies(False)\n"
                f"h.connect_uri({address.uri()!r})\n"
                "for i in range(64):\n"
                "    h.aio_pwrite(bytes([i + 1]) * 4096, (64 + i) * 4096)\n"
                "while h.aio_in_flight() > 0:\n"
                "    h.poll(-1)\n"
                "got = [h.pread(4096, (64 + i) * 4096) for i in range(64)]\n"
                "assert got == [bytes([i + 1]) * 4096 for i in range(64)]\n"
                "print(h.get_structured_replies_negotiated())\n"
            )
            assert (await run("nbdsh", "-c", script)).strip() == "False"
            want = b"".join(bytes([i + 1]) * 4096 for i in range(64))
            assert path.read_bytes()[64 * 4096 : 128 * 4096] == want
            os.truncate(path, 2 << 20)  # shrunk under us
            with pytest.raises(BlockError) as info:
                await c.read(3 << 20, 4096)
            assert info.value.errno == errno.EIO
            assert await c.read(0, 8192) == blocks[0] + blocks[1]
        async with await NbdClient.connect(address, "ro") as c:
            with pytest.raises(BlockError) as info:
                await c.write(0, b"no")
            assert info.value.errno == errno.EPERM
            assert await c.read(0, 4096) == blocks[0]
    finally:
        await server.close(timeout=5)
        await device.close()
        await ro.close()


async def run(*argv: str) -> str:
    """A tool's output (nbdsh is the distribution python3's script)."""
    env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv[0]} failed: {err.decode()}"
    return out.decode()
