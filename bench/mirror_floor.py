#!/usr/bin/env python3
"""The pure-Python floor of a mirror: the least a mirror daemon in Python must do.

Theory of operation
-------------------
Issue 14 asks whether the mirror's write path is bound by Python itself (then a
compiled module is the answer) or by what dst does per request.  This script answers
the first half: it is a mirror of NBD legs reduced to what any mirror must do per
request -- parse the request, send it to every leg, read every leg's reply, reply once
-- with the same event loop (uvloop), the same batching (a receive's replies and a
leg's requests leave in one ``writelines`` per loop turn) and nothing else: no range
lock, no write-intent bitmap, no gates, no timeouts, no error policy beyond "a write
fails if a leg failed", no reconnects.  ``bench/arrays.py --targets python-floor
dst-mirror qemu-quorum`` runs it over the same two ``dst serve`` nodes as
``dst-mirror``; the difference between the two is what dst's design costs per
request.

It is not a product path and never serves real data: it speaks just enough NBD for
fio's nbd engine, nbdinfo and nbdcopy (fixed newstyle, ``NBD_OPT_GO``, simple replies;
READ from the first leg, WRITE and FLUSH to every leg, FUA passed on).  Any other
option is refused (``NBD_REP_ERR_UNSUP``), any other command fails with EINVAL.

Given one ``file:PATH`` instead of legs it is the floor of one server (``dst serve``'s
peer): the same front end, each request served at once with ``os.pwrite``/``os.pread``
on the file (``bench/bench.py --targets python-serve-floor``).

Run ``python bench/mirror_floor.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import struct
from collections.abc import Callable
from functools import partial
from typing import Any

import uvloop

from dst.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    NbdErr,
    Opt,
    TransmissionFlags,
)
from dst.nbd.wire import OPTION, OPTION_REPLY, REQUEST, SIMPLE_REPLY

_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_GO, _ABORT = int(Opt.GO), int(Opt.ABORT)
_REP_ACK, _REP_INFO, _REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
_EINVAL = int(NbdErr.EINVAL)
_FLAGS = int(
    TransmissionFlags.HAS_FLAGS | TransmissionFlags.SEND_FLUSH | TransmissionFlags.SEND_FUA
)
Reply = Callable[[int, Any], None]  # (NBD error, READ data or None)


class Leg(asyncio.BufferedProtocol):
    """One NBD leg after its handshake: requests out, simple replies in."""

    def __init__(self) -> None:
        self.buf = bytearray(1 << 21)
        self.n = 0
        self.pending: dict[int, tuple[int, Reply]] = {}  # handle -> (READ length, reply)
        self.next = 0
        self.out: list[Any] = []
        self.haggling = True  # in the handshake: bytes wait for take()
        self.woken: asyncio.Future[None] | None = None  # take() waits for bytes
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)[self.n :]

    def buffer_updated(self, nbytes: int) -> None:
        self.n += nbytes
        if self.haggling:
            if self.woken is not None and not self.woken.done():
                self.woken.set_result(None)
            return
        buf, n, pos, pending = self.buf, self.n, 0, self.pending
        while n - pos >= 16:
            _, err, handle = SIMPLE_REPLY.unpack_from(buf, pos)
            length, reply = pending[handle]
            if length and not err:
                if n - pos - 16 < length:
                    break
                del pending[handle]
                reply(0, bytes(buf[pos + 16 : pos + 16 + length]))
                pos += 16 + length
            else:
                del pending[handle]
                reply(err, None)
                pos += 16
        if pos:
            buf[: n - pos] = buf[pos:n]
            self.n = n - pos

    def send(self, typ: int, flags: int, offset: int, length: int, data: Any,
             reply: Reply) -> None:  # fmt: skip
        self.next += 1
        self.pending[self.next] = (length if typ == _READ else 0, reply)
        head = REQUEST.pack(REQUEST_MAGIC, flags, typ, self.next, offset, length)
        if not self.out:
            asyncio.get_running_loop().call_soon(self.flush)
        self.out.append(head)
        if data is not None:
            self.out.append(data)

    def flush(self) -> None:
        out, self.out = self.out, []
        assert self.transport is not None
        self.transport.writelines(out)

    async def take(self, n: int) -> bytes:
        """The handshake's next ``n`` bytes."""
        while self.n < n:
            self.woken = asyncio.get_running_loop().create_future()
            await self.woken
        data = bytes(self.buf[:n])
        self.buf[: self.n - n] = self.buf[n : self.n]
        self.n -= n
        return data


class FileLeg:
    """The floor of one server: a file served at once, in the caller's turn."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)

    def send(self, typ: int, flags: int, offset: int, length: int, data: Any,
             reply: Reply) -> None:  # fmt: skip
        if typ == _WRITE:
            os.pwrite(self.fd, data, offset)
            reply(0, None)
        elif typ == _READ:
            reply(0, os.pread(self.fd, length, offset))
        else:  # FLUSH
            reply(0, None)


async def connect_leg(path: str, export: str) -> tuple[Leg, int]:
    """Connect to a leg's unix socket and negotiate ``export`` (NBD_OPT_GO); the leg and
    its size."""
    _, leg = await asyncio.get_running_loop().create_unix_connection(Leg, path)
    assert leg.transport is not None
    await leg.take(18)  # NBDMAGIC, IHAVEOPT, handshake flags
    name = export.encode()
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    leg.transport.write(struct.pack(">I", 1) + OPTION.pack(IHAVEOPT, _GO, len(go)) + go)
    size = -1
    while True:
        _, _, typ, length = OPTION_REPLY.unpack(await leg.take(OPTION_REPLY.size))
        body = await leg.take(length)
        if typ == _REP_INFO and body[:2] == b"\0\0":
            size = struct.unpack_from(">Q", body, 2)[0]
        elif typ == _REP_ACK:
            break
        elif typ & (1 << 31):
            raise SystemExit(f"leg {path}: export {export!r} refused ({typ:#x})")
    leg.haggling = False
    return leg, size


class Front(asyncio.BufferedProtocol):
    """One client of the mirror."""

    def __init__(self, legs: list[Any], size: int) -> None:
        self.legs, self.size = legs, size
        self.one = legs[0] if len(legs) == 1 else None  # one leg: no fan-out
        self.buf = bytearray(1 << 24)
        self.n = 0
        self.greeted = False  # the client's flags came
        self.haggling = True  # options until GO
        self.out: list[Any] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1))  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)[self.n :]

    def buffer_updated(self, nbytes: int) -> None:
        self.n += nbytes
        buf, n, pos = self.buf, self.n, 0
        if self.haggling:
            pos = self._options()
        while not self.haggling and n - pos >= 28:
            _, flags, typ, cookie, offset, length = REQUEST.unpack_from(buf, pos)
            if typ == _WRITE:
                if n - pos - 28 < length:
                    break
                data = bytes(buf[pos + 28 : pos + 28 + length])
                if self.one is not None:
                    self.one.send(_WRITE, flags, offset, length, data, partial(self._reply, cookie))
                else:
                    self._all(cookie, _WRITE, flags, offset, length, data)
                pos += 28 + length
                continue
            pos += 28
            if typ == _READ:
                self.legs[0].send(_READ, 0, offset, length, None, partial(self._reply, cookie))
            elif typ == _FLUSH:
                self._all(cookie, _FLUSH, 0, 0, 0, None)
            elif typ == _DISC:
                assert self.transport is not None
                self.transport.close()
                break
            else:
                self._reply(cookie, _EINVAL, None)
        if pos:
            buf[: n - pos] = buf[pos:n]
            self.n = n - pos

    def _options(self) -> int:
        """The handshake: the client's flags, then options until GO; bytes used."""
        buf, n, pos = self.buf, self.n, 0
        assert self.transport is not None
        if not self.greeted:
            if n < 4:
                return 0
            pos, self.greeted = 4, True
        while n - pos >= 16:
            _, opt, length = OPTION.unpack_from(buf, pos)
            if n - pos < 16 + length:
                break
            pos += 16 + length
            if opt == _GO:
                info = struct.pack(">HQH", 0, self.size, _FLAGS)
                self.transport.write(
                    OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, _REP_INFO, len(info)) + info
                )
                self.transport.write(OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, _REP_ACK, 0))
                self.haggling = False
                break
            if opt == _ABORT:
                self.transport.close()
                break
            self.transport.write(OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, _REP_ERR_UNSUP, 0))
        return pos

    def _all(self, cookie: int, typ: int, flags: int, offset: int, length: int, data: Any) -> None:
        """Send to every leg; reply once all answered (the first error, if any)."""
        left = [len(self.legs), 0]

        def answered(err: int, _: Any) -> None:
            left[0] -= 1
            left[1] = left[1] or err
            if not left[0]:
                self._reply(cookie, left[1], None)

        for leg in self.legs:
            leg.send(typ, flags, offset, length, data, answered)

    def _reply(self, cookie: int, err: int, data: Any) -> None:
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie))
        if data is not None:
            self.out.append(data)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)


async def serve(listen: str, legs: list[str]) -> None:
    conns: list[tuple[Any, int]]
    if len(legs) == 1 and legs[0].startswith("file:"):
        path = legs[0].removeprefix("file:")
        leg = FileLeg(path)
        conns = [(leg, os.fstat(leg.fd).st_size)]
    else:
        conns = [await connect_leg(*spec.split(":", 1)) for spec in legs]
    size = min(s for _, s in conns)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: Front([c for c, _ in conns], size), listen)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("listen", help="the unix socket to serve on")
    p.add_argument("legs", nargs="+", help="each leg as SOCKET:EXPORT, or one file:PATH")
    args = p.parse_args()
    uvloop.run(serve(args.listen, args.legs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
