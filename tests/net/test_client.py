"""The NBD client's callback fast path against a real in-process server: round trips,
errors, cancel, connection loss, close."""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

import pytest

from dst.errors import BlockError
from dst.net.address import Address
from dst.net.client import ConnectionLost, NbdClient
from dst.net.server import NbdServer
from tests.support.fastpath import Completion, Disk, submit, until

pytestmark = pytest.mark.timeout(30)
SIZE = 1 << 20


# -- NBD client and server ----------------------------------------------------------------


async def test_client_submit_roundtrip(served: tuple[NbdServer, Address, Disk]) -> None:
    _, address, disk = served
    c = await NbdClient.connect(address)
    data = os.urandom(65536)
    await submit(c, "write", 8192, data, False)
    assert disk.data[8192 : 8192 + 65536] == data
    assert [r.kind for r in disk.taken] == ["write"]  # the server's fast path too
    assert await submit(c, "read", 8192, 65536) == data
    disk.mode = "sync"
    assert await submit(c, "read", 8192 + 4096, 4096) == data[4096:8192]
    disk.mode = "refuse"  # the server falls back to the device coroutine
    assert await submit(c, "read", 8192, 65536) == data
    assert disk.coro_reads == 1 and len(disk.taken) == 3
    assert c.submit_read(0, c.max_block + 1, Completion()) is None  # to be split: refused
    await c.close()


def _kernel_cap(name: str) -> int:
    """``net.core.NAME``: the most a socket buffer may be set to."""
    with open(f"/proc/sys/net/core/{name}") as f:
        return int(f.read())


async def test_client_sockets_hold_a_few_large_writes(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    """A client's socket asks for the server's buffer sizes: a mirror's 1 MiB write to
    a leg goes to the kernel at once, not 208 KiB per wakeup (the kernel caps what is
    asked at net.core.wmem_max/rmem_max and reports twice what it gave)."""
    import socket

    from dst.net.edge import SOCKET_BUFFER

    _, address, _ = served
    c = await NbdClient.connect(address)
    sock = c._proto.transport.get_extra_info("socket")  # type: ignore[union-attr]
    for opt, cap in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
        most = _kernel_cap(cap)
        assert sock.getsockopt(socket.SOL_SOCKET, opt) >= 2 * min(SOCKET_BUFFER, most)
    data = os.urandom(1 << 20)
    await submit(c, "write", 0, data, False)
    assert await submit(c, "read", 0, 1 << 20) == data
    await c.close()


async def test_client_gather_sends_the_parts_end_to_end(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    """One WRITE from several buffers as they are (no join), also while the send buffer
    is full: 64 MiB queued at once against a server that answers only when told."""
    _, address, disk = served
    c = await NbdClient.connect(address)
    parts = [os.urandom(n) for n in (4096, 512, 60928)]
    await submit(c, "gather", 4096, [memoryview(p) for p in parts], False)
    assert disk.data[4096 : 4096 + 65536] == b"".join(parts)
    assert [(r.kind, r.length) for r in disk.taken] == [("write", 65536)]  # one request
    disk.mode = "manual"
    chunks = [os.urandom(SIZE // 2) for _ in range(2)]
    dones = [Completion() for _ in range(64)]
    for d in dones:  # far more than the socket takes at once: the transport is paused
        assert c.submit_gather(0, chunks, False, d) is not None
    await until(lambda: disk.release() >= 0 and all(d.calls for d in dones), "every write")
    assert all(d.calls == [(None, None)] for d in dones)
    assert disk.data == b"".join(chunks)
    await c.close()


async def test_client_errors_come_from_the_server(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    _, address, disk = served
    c = await NbdClient.connect(address)
    cases: list[tuple[str, tuple[Any, ...], int]] = [
        ("write", (SIZE - 4096, b"x" * 8192, False), errno.ENOSPC),  # the server's check
        ("read", (SIZE, 4096), errno.EINVAL),
    ]
    for op, args, err in cases:
        with pytest.raises(BlockError) as e:
            await submit(c, op, *args)
        assert e.value.errno == err
    disk.fail_writes = errno.ENOSPC  # the device's own errors, through both fast paths
    with pytest.raises(BlockError) as e:
        await submit(c, "write", 0, b"y" * 4096, False)
    assert e.value.errno == errno.ENOSPC and disk.data[:4096] == bytes(4096)
    disk.fail_reads = errno.EIO
    with pytest.raises(BlockError) as e:
        await submit(c, "read", 0, 4096)
    assert e.value.errno == errno.EIO
    disk.fail_reads = 0
    disk.hang = True  # a request the device cancels: EIO on the wire
    done = Completion()
    assert c.submit_read(0, 4096, done) is not None
    await until(lambda: len(disk.taken) == 3, "the read at the server")
    disk.taken[-1].cancel()
    exc, _ = await done.wait()
    assert isinstance(exc, BlockError) and not isinstance(exc, ConnectionLost)
    assert exc.errno == errno.EIO
    disk.hang = False
    assert await submit(c, "read", 0, 4096) == bytes(4096)  # the stream is in step
    await c.close()


async def test_client_cancel_and_a_late_reply(served: tuple[NbdServer, Address, Disk]) -> None:
    _, address, disk = served
    disk.data[:4096] = b"L" * 4096
    c = await NbdClient.connect(address)
    disk.mode = "manual"
    done = Completion()
    cancel = c.submit_read(0, 4096, done)
    assert cancel is not None
    await until(lambda: len(disk.queued) == 1, "the read at the server")
    cancel()
    assert len(done.calls) == 1 and isinstance(done.calls[0][0], asyncio.CancelledError)
    cancel()
    disk.release()  # the server answers now: the client drops the reply
    disk.mode = "async"
    assert await submit(c, "read", 0, 4096) == b"L" * 4096
    assert len(done.calls) == 1
    await c.close()


async def test_client_connection_loss_fails_submitted_requests(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    server, address, disk = served
    c = await NbdClient.connect(address)
    disk.hang = True
    dones = [Completion() for _ in range(3)]
    assert c.submit_read(0, 4096, dones[0]) is not None
    assert c.submit_write(4096, b"w" * 4096, False, dones[1]) is not None
    assert c.submit_read(8192, 4096, dones[2]) is not None
    await until(lambda: len(disk.taken) == 3, "three requests at the server")
    for conn in list(server.connections):
        conn.abort()
    for d in dones:
        exc, _ = await d.wait()
        assert isinstance(exc, ConnectionLost) and exc.errno == errno.EIO
    assert not c.connected
    assert c.submit_read(0, 4096, Completion()) is None  # lost: not taken
    async with asyncio.timeout(2):
        await c.close()


async def test_client_close_waits_for_submitted_requests(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    _, address, disk = served
    c = await NbdClient.connect(address)
    disk.mode = "manual"
    data = os.urandom(4096)
    done = Completion()
    assert c.submit_write(0, data, False, done) is not None
    await until(lambda: len(disk.queued) == 1, "the write at the server")
    closing = asyncio.ensure_future(c.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done() and done.calls == []
    disk.release()
    await asyncio.wait_for(closing, 5)
    assert done.calls == [(None, None)] and disk.data[:4096] == data


async def test_client_close_does_not_wait_for_a_cancelled_request(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    """A cancelled request is no longer the caller's (as with a cancelled coroutine
    request): close() must not wait for its reply."""
    _, address, disk = served
    c = await NbdClient.connect(address)
    disk.hang = True
    done = Completion()
    cancel = c.submit_read(0, 4096, done)
    assert cancel is not None
    await until(lambda: len(disk.taken) == 1, "the read at the server")
    closing = asyncio.ensure_future(c.close())
    for _ in range(3):
        await asyncio.sleep(0)
    cancel()
    await asyncio.wait_for(closing, 2)
    assert len(done.calls) == 1 and isinstance(done.calls[0][0], asyncio.CancelledError)


async def test_client_with_a_request_timeout_refuses_the_fast_path(
    served: tuple[NbdServer, Address, Disk],
) -> None:
    _, address, disk = served
    c = await NbdClient.connect(address, request_timeout=5)
    assert c.submit_write(0, b"t" * 4096, False, Completion()) is None
    assert c.submit_read(0, 4096, Completion()) is None
    assert disk.taken == []
    await c.close()


# -- a silent peer ------------------------------------------------------------------------


async def test_member_connections_carry_keepalive_and_abort_fails_requests() -> None:
    """TCP keepalive with short intervals and TCP_USER_TIMEOUT on a member connection;
    abort() drops it (requests in flight fail with the reason) and when_lost fires."""
    import socket

    from dst.net.client import MEMBER_KEEPALIVE
    from tests.support.fastpath import Disk

    disk = Disk(SIZE, name="ka", mode="manual")
    server = NbdServer({"": disk}, tls=None)
    (address,) = await server.start("127.0.0.1:0")
    assert isinstance(address, Address)
    try:
        c = await NbdClient.connect(address, keepalive=MEMBER_KEEPALIVE)
        sock = c._proto.transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 5
        user_timeout = getattr(socket, "TCP_USER_TIMEOUT", 18)
        assert sock.getsockopt(socket.IPPROTO_TCP, user_timeout) == 10_000
        lost = asyncio.Event()
        c.when_lost(lost.set)
        pending = asyncio.ensure_future(c.read(0, 4096))
        await until(lambda: len(disk.queued) == 1, "the read to reach the server")
        c.abort("no answer within 10 s")
        with pytest.raises(ConnectionLost, match="no answer within 10 s"):
            await pending
        await asyncio.wait_for(lost.wait(), 5)
        assert not c.connected
        await c.close()
    finally:
        disk.finish_all()
        await server.close(timeout=1)


async def test_when_lost_is_told_before_the_requests_in_flight_fail() -> None:
    """A connection's owner hears of its loss first, then each callback-form request
    gets its ConnectionLost (a mirror leg's completion may ask the owner about the
    connection: it knows already); told after the loss, it hears of it soon."""
    from tests.support.fastpath import Disk

    disk = Disk(SIZE, name="lost", mode="manual")
    server = NbdServer({"": disk}, tls=None)
    (address,) = await server.start("127.0.0.1:0")
    try:
        c = await NbdClient.connect(address)
        events: list[str] = []
        c.when_lost(lambda: events.append("owner"))
        for i in range(2):

            def done(e: BaseException | None, _: object, i: int = i) -> None:
                events.append(f"write {i}: {type(e).__name__}")

            c.submit_write(i * 4096, b"x" * 4096, False, done)
        await until(lambda: len(disk.queued) == 2, "the writes to reach the server")
        c.abort("gone")
        await until(lambda: len(events) == 3, "every completion")
        assert events == ["owner", "write 0: ConnectionLost", "write 1: ConnectionLost"]
        late = asyncio.Event()
        c.when_lost(late.set)
        await asyncio.wait_for(late.wait(), 5)
        await c.close()
    finally:
        disk.finish_all()
        await server.close(timeout=1)
