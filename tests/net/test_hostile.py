"""A hostile client on raw sockets while a good client keeps working and verifying data."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from dst.nbd import wire
from dst.nbd.client import encode_go
from dst.nbd.constants import (
    IHAVEOPT,
    Cmd,
    NbdErr,
    Opt,
    Rep,
)
from dst.net.address import Address
from dst.net.client import NbdClient
from dst.net.server import NbdServer
from dst.targets.memory import MemoryDevice
from tests.support.fastpath import Memoryish, until
from tests.support.rawnbd import closed, go, greet, opt, option_reply, raw, request, simple_reply

pytestmark = pytest.mark.timeout(60)

# --- the attacks -------------------------------------------------------------------


async def unknown_client_flags(a: Address) -> None:
    async with raw(a) as (r, w):
        await greet(r, w, flags=0xFFFF)
        assert await closed(r)


async def bad_option_magic(a: Address) -> None:
    async with raw(a) as (r, w):
        await greet(r, w)
        w.write(b"BADMAGIC" + bytes(8))
        assert await closed(r)


async def unknown_options_then_go(a: Address) -> None:
    async with raw(a) as (r, w):
        await greet(r, w)
        for o in (0, 4, 11, 12, 999, 0xFFFFFFFF):
            w.write(opt(o, b"some data"))
            assert (await option_reply(r))[:2] == (o, Rep.ERR_UNSUP)
        w.write(opt(Opt.INFO, b"\xff" * 7))
        assert (await option_reply(r))[1] == Rep.ERR_INVALID
        w.write(wire.OPTION.pack(IHAVEOPT, Opt.GO, 1 << 30))  # too big: skipped
        assert (await option_reply(r))[1] == Rep.ERR_TOO_BIG
        w.write(bytes(1 << 16))
        w.transport.abort()


async def bad_requests(a: Address) -> None:
    async with raw(a) as (r, w):
        await go(r, w)
        size = 16 << 20
        w.write(
            request(42, 1, 0, 512)  # unknown command
            + request(Cmd.READ, 2, 0, 0xFFFFFFFF)  # 4 GiB read
            + request(Cmd.READ, 3, size - 1, 2)  # past the end
            + request(Cmd.READ, 4, 0xFFFFFFFFFFFFFFFF, 512)  # offset overflow
            + request(Cmd.READ, 5, 0, 512, flags=0x8000)  # unknown flag
            + request(Cmd.BLOCK_STATUS, 6, 0, 512)  # no meta context
            + request(Cmd.WRITE, 7, size, 4)  # past the end, payload follows
            + b"junk"
            + request(Cmd.WRITE, 8, 0, 64 << 20)  # past the end and over max block: drained
        )
        w.write(bytes(64 << 20))
        w.write(request(Cmd.FLUSH, 9, 0, 0))
        replies = dict([await simple_reply(r) for _ in range(9)])
        assert replies == {
            1: NbdErr.EINVAL,
            2: NbdErr.EINVAL,
            3: NbdErr.EINVAL,
            4: NbdErr.EINVAL,
            5: NbdErr.EINVAL,
            6: NbdErr.EINVAL,
            7: NbdErr.ENOSPC,
            8: NbdErr.ENOSPC,
            9: 0,
        }
        w.write(request(Cmd.WRITE, 10, 0, 1 << 31))  # claims 2 GiB, then hangs up
        w.write(bytes(1000))
        await w.drain()


async def bad_request_magic(a: Address) -> None:
    async with raw(a) as (r, w):
        await go(r, w)
        w.write(b"\x00" * 28)
        assert await closed(r)


async def cut_mid_handshake(a: Address) -> None:
    async with raw(a) as (r, _w):
        await r.readexactly(5)
    async with raw(a) as (r, w):
        await r.readexactly(18)
        w.write(b"\x00\x00")
        await w.drain()


async def cut_mid_option(a: Address) -> None:
    async with raw(a) as (r, w):
        await greet(r, w)
        w.write(opt(Opt.GO, encode_go("a long export name"))[:25])
        await w.drain()


async def cut_mid_write(a: Address) -> None:
    async with raw(a) as (r, w):
        await go(r, w)
        w.write(request(Cmd.WRITE, 1, 0, 1 << 20) + bytes(300_000))
        w.write(request(Cmd.READ, 2, 0, 1 << 20))  # pipelined read, never collected
        await w.drain()


async def cut_with_reads_in_flight(a: Address) -> None:
    async with raw(a) as (r, w):
        await go(r, w)
        w.write(b"".join(request(Cmd.READ, i, 0, 1 << 20) for i in range(64)))
        await w.drain()


async def disc_then_garbage(a: Address) -> None:
    async with raw(a) as (r, w):
        await go(r, w)
        w.write(request(Cmd.DISC, 1, 0, 0) + os.urandom(100))
        assert await closed(r)


async def random_garbage(a: Address) -> None:
    for n in (1, 17, 100, 5000):
        async with raw(a) as (r, w):
            await r.readexactly(18)
            w.write(os.urandom(n))
            await w.drain()


ATTACKS: list[Callable[[Address], Awaitable[None]]] = [
    unknown_client_flags,
    bad_option_magic,
    unknown_options_then_go,
    bad_requests,
    bad_request_magic,
    cut_mid_handshake,
    cut_mid_option,
    cut_mid_write,
    cut_with_reads_in_flight,
    disc_then_garbage,
    random_garbage,
]


async def good_client(address: Address, stop: asyncio.Event) -> int:
    """Writes and verifies data until told to stop; returns rounds completed."""
    rounds = 0
    async with await NbdClient.connect(address) as c:
        while not stop.is_set() or rounds < 3:
            offset = (rounds % 64) * 65536 + (8 << 20)
            data = os.urandom(65536)
            await c.write(offset, data)
            got = await asyncio.gather(*(c.read(offset + i, 4096) for i in range(0, 65536, 4096)))
            assert b"".join(got) == data
            rounds += 1
    return rounds


async def test_hostile_clients_cannot_hurt_the_server(
    nbd_memory: tuple[NbdServer, Address, Memoryish], caplog: pytest.LogCaptureFixture
) -> None:
    _, address, _ = nbd_memory
    caplog.set_level(logging.WARNING)
    stop = asyncio.Event()
    good = asyncio.ensure_future(good_client(address, stop))
    for attack in ATTACKS:
        await attack(address)
        assert not good.done(), f"good client failed during {attack.__name__}"
    stop.set()
    assert await good >= 3
    # the server still answers new clients
    async with await NbdClient.connect(address) as c:
        await c.write(0, b"still alive")
        assert await c.read(0, 11) == b"still alive"
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


async def test_a_payload_trickling_in_over_tcp_is_received_whole() -> None:
    """Over TCP the server asks to be woken only once a good part of a payload's rest
    has come (SO_RCVLOWAT), never for more than is still to come: a 600 KiB WRITE sent
    in 37 KiB pieces (the last one short) completes, reads back, and the connection
    is woken per byte again afterwards (a small request right behind it is served)."""
    dev = MemoryDevice(4 << 20)
    server = NbdServer(dev)
    (address,) = await server.start("127.0.0.1:0")
    try:
        async with raw(address) as (r, w):
            await go(r, w)
            n = 600 << 10
            data = os.urandom(n)
            w.write(request(Cmd.WRITE, 1, 4096, n))
            await w.drain()
            (conn,) = server.connections
            tx = conn.tx
            assert tx is not None
            for at in range(0, n, 37 << 10):
                w.write(data[at : at + (37 << 10)])
                await w.drain()
                if at == 0:  # the header and a first piece came: woken for more
                    await until(lambda: tx.lowat > 1, "SO_RCVLOWAT raised")
                await asyncio.sleep(0.001)  # the trickle itself (not a wait for state)
            assert await simple_reply(r) == (1, 0)
            assert tx.lowat == 1
            w.write(request(Cmd.READ, 2, 4096, n))
            assert await simple_reply(r) == (2, 0)
            assert await r.readexactly(n) == data
    finally:
        await server.close(timeout=1)


async def test_a_payload_stalled_over_tcp_is_dropped_while_others_are_served() -> None:
    """A TCP client that announces a 1 MiB WRITE, sends 300 KiB of it and stops holds
    its socket's wake-up threshold (SO_RCVLOWAT) above what came, but only its own: a
    good client on another TCP connection keeps writing and verifying, and the stalled
    one is dropped by the stall watchdog without a reply (nothing of it was written)."""
    dev = MemoryDevice(16 << 20)
    server = NbdServer(dev, stall_timeout=0.5)
    (address,) = await server.start("127.0.0.1:0")
    stop = asyncio.Event()
    try:
        async with raw(address) as (r, w):
            await go(r, w)
            w.write(request(Cmd.WRITE, 1, 0, 1 << 20) + b"\xaa" * (300 << 10))
            await w.drain()
            (conn,) = server.connections
            tx = conn.tx
            assert tx is not None
            await until(lambda: tx.lowat > 1, "SO_RCVLOWAT raised for the stalled payload")
            good = asyncio.ensure_future(good_client(address, stop))
            with contextlib.suppress(ConnectionResetError):  # aborted: a reset, or EOF
                assert await asyncio.wait_for(r.read(1), 30) == b""  # dropped, no reply
        stop.set()
        assert await good >= 3
        assert dev.data[: 1 << 20] == bytes(1 << 20)  # the stalled write never happened
    finally:
        stop.set()
        await server.close(timeout=1)


async def test_idle_handshake_is_dropped(sock_dir: Path) -> None:
    server = NbdServer(MemoryDevice(1 << 20), handshake_timeout=0.2)
    (address,) = await server.start(f"unix:{sock_dir / 's.sock'}")
    try:
        async with raw(address) as (r, _):
            await r.readexactly(18)
            assert await closed(r)  # never sent client flags
    finally:
        await server.close()


async def _requests_sent_with_go(sock_dir: Path) -> None:
    """Send GO and two requests in one write, before GO's reply: the bytes after GO
    arrive in the handshake's receive and cross to the transmission, which becomes the
    transport's protocol in the middle of that receive; both are served."""
    server = NbdServer(MemoryDevice(1 << 20))
    (address,) = await server.start(f"unix:{sock_dir / 'go.sock'}")
    data = os.urandom(4096)
    try:
        async with raw(address) as (r, w):
            await greet(r, w)
            w.write(opt(Opt.GO, encode_go("")) + request(Cmd.WRITE, 1, 8192, 4096) + data
                    + request(Cmd.READ, 2, 8192, 4096))  # fmt: skip
            while (await option_reply(r))[1] != Rep.ACK:
                pass
            assert await simple_reply(r) == (1, 0)
            assert await simple_reply(r) == (2, 0)
            assert await r.readexactly(4096) == data
            w.write(request(Cmd.READ, 3, 0, 4096))  # and the connection goes on
            assert await simple_reply(r) == (3, 0)
            assert await r.readexactly(4096) == bytes(4096)
    finally:
        await server.close(timeout=1)


def in_loop(loop: str, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` under asyncio's own loop or uvloop (what ``dst`` runs on)."""
    if loop == "uvloop":
        from dst.net.loop import run

        run(coro)
    else:
        asyncio.run(coro)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_requests_sent_with_go_are_served(sock_dir: Path, loop: str) -> None:
    in_loop(loop, _requests_sent_with_go(sock_dir))


async def _go_while_replies_pile_up(sock_dir: Path) -> None:
    """Many LISTs and GO in one write, no reply read: the LIST answers (4 KiB each) fill
    the socket and the transport's buffer while that receive is handled, so the
    connection is paused for writing when GO hands it to the transmission, which must
    start paused too (not read on); once the client reads, all is served."""
    long = "x" * 4000
    server = NbdServer({"": MemoryDevice(1 << 20), long: MemoryDevice(4096)})
    (address,) = await server.start(f"unix:{sock_dir / 'pile.sock'}")
    data = os.urandom(4096)
    try:
        async with raw(address) as (r, w):
            await greet(r, w)
            (conn,) = server.connections  # its socket holds little (kernels differ)
            assert conn.transport is not None
            conn.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
            lists = 240  # with GO in the server's first 4 KiB receive; ~1 MiB of answers
            w.write(opt(Opt.LIST) * lists + opt(Opt.GO, encode_go("")))
            w.write(request(Cmd.WRITE, 1, 0, 4096) + data + request(Cmd.READ, 2, 0, 4096))
            await w.drain()
            await until(lambda: conn.tx is not None, "GO handled")
            tx = conn.tx
            assert tx is not None and tx.write_paused and tx.read_paused
            assert tx.inflight == 0  # nothing read past GO while the client reads nothing
            for _ in range(lists):
                while (await option_reply(r))[1] != Rep.ACK:
                    pass
            while (await option_reply(r))[1] != Rep.ACK:  # GO's
                pass
            assert await simple_reply(r) == (1, 0)
            assert await simple_reply(r) == (2, 0)
            assert await r.readexactly(4096) == data
    finally:
        await server.close(timeout=1)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_go_while_replies_pile_up(sock_dir: Path, loop: str) -> None:
    in_loop(loop, _go_while_replies_pile_up(sock_dir))
