"""One NBD server connection: an asyncio.Protocol over the sans-IO codec.

Theory of operation
-------------------
During the handshake, received bytes go to a :class:`~dst.net.negotiate.Negotiator`
(options, STARTTLS, access control), which answers from the server's export table (the
device's ``size`` is read at GO time, so a grown export is seen by new connections) and
calls :meth:`ServerConnection.begin_transmission` once an export is bound.  After
STARTTLS the same protocol object sits behind the TLS transport.

In transmission, received bytes land in the :class:`~dst.nbd.requests.RequestParser`
and dispatches every complete request: validate at the edge (command, flags, range,
read-only, lengths) and call the device.  READ and WRITE first try the device's
callback fast path (:meth:`~dst.device.BlockDevice.submit_write`): no coroutine at
all, the reply is queued from the completion callback.  Otherwise the device
coroutine is stepped once eagerly; if it completes without suspending -- the common
case -- its reply is built at once, otherwise a Task finishes it
(:class:`~dst.aio.Continuation`) and the reply goes out whenever it completes,
out of order.  Replies produced while handling
one receive (or one loop iteration of completions) are written with a
single ``writelines``; READ replies are a small header followed by the device's buffer.

Backpressure: at most ``max_inflight`` suspended requests per connection, and nothing
is parsed while the transport's write buffer is over its high-water mark; in either
case reading from the socket pauses and unparsed bytes wait in the parser.

Shutdown (:meth:`shutdown`): new requests get ESHUTDOWN, in-flight ones finish, then
the transport closes.  Any error on one connection is logged and closes only it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Coroutine, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from dst.aio import Continuation
from dst.device import BlockDevice, Extent
from dst.errors import BlockError, ProtocolError
from dst.nbd import requests as rq
from dst.nbd.constants import (
    BASE_ALLOCATION,
    Cmd,
    CmdFlags,
    NbdErr,
    StateFlags,
    TransmissionFlags,
    errno_to_nbd,
)
from dst.nbd.events import ExportInfo, Request
from dst.nbd.server import ServerHandshake
from dst.net.negotiate import Negotiator, transmission_flags
from dst.net.tls import TlsInfo

__all__ = ["ServerConnection", "clip_extents", "transmission_flags"]

if TYPE_CHECKING:
    from dst.net.server import NbdServer

log = logging.getLogger(__name__)

_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_TRIM, _CACHE, _ZERO, _BS = (
    int(Cmd.TRIM),
    int(Cmd.CACHE),
    int(Cmd.WRITE_ZEROES),
    int(Cmd.BLOCK_STATUS),
)
_FUA = int(CmdFlags.FUA)
_WRITES = frozenset((_WRITE, _TRIM, _ZERO))
SOCKET_BUFFER = 4 << 20  # SO_SNDBUF/SO_RCVBUF asked for (the kernel caps it)
_OUT_HIGH = 1 << 20  # flush queued replies once this many bytes are pending
_EINVAL, _ESHUTDOWN = int(NbdErr.EINVAL), int(NbdErr.ESHUTDOWN)


def _tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY, and socket buffers big enough for a few 1 MiB replies in flight."""
    with contextlib.suppress(OSError):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


def _describe_peer(peername: object) -> str:
    """``host:port`` (``[v6]:port``) for TCP, ``unix`` for a unix socket."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return "unix"


def _allowed_flags(flags: int) -> dict[int, int]:
    fua = _FUA if flags & TransmissionFlags.SEND_FUA else 0
    df = CmdFlags.DF if flags & TransmissionFlags.SEND_DF else 0
    fast = CmdFlags.FAST_ZERO if flags & TransmissionFlags.SEND_FAST_ZERO else 0
    return {
        _READ: fua | df,
        _WRITE: fua,
        _DISC: 0xFFFF,
        _FLUSH: fua,
        _TRIM: fua,
        _CACHE: fua,
        _ZERO: fua | CmdFlags.NO_HOLE | fast,
        _BS: fua | CmdFlags.REQ_ONE,
    }


def clip_extents(raw: Sequence[Extent], length: int, *, req_one: bool) -> list[tuple[int, int]]:
    """Device extents -> wire descriptors: clipped to ``length``, merged, non-empty."""
    out: list[tuple[int, int]] = []
    total = 0
    for e in raw:
        n = min(e.length, length - total)
        if n <= 0:
            if e.length <= 0:
                continue
            break
        f = (StateFlags.HOLE if e.hole else 0) | (StateFlags.ZERO if e.zero else 0)
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + n, f)
        else:
            out.append((n, int(f)))
        total += n
    if not out:
        out = [(length, 0)]
    return out[:1] if req_one else out


class ServerConnection(asyncio.BufferedProtocol):
    """Serves one client (see module docstring)."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peername: object = None
        self.neg: Negotiator | None = Negotiator(self)
        self.export: str | None = None  # bound export
        self.tls: TlsInfo | None = None  # the TLS session, if any
        self.lost = False
        self.parser: rq.RequestParser | None = None
        self.device: BlockDevice | None = None
        self.size = 0
        self.structured = False
        self.context_id = 0
        self.allowed: dict[int, int] = {}
        self.max_block = 32 << 20
        self.inflight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.out: list[Any] = []
        self.out_bytes = 0
        self.flush_scheduled = False
        self.in_receive = False
        self.read_paused = False
        self.write_paused = False
        self.closing = False  # shutting down: ESHUTDOWN to new requests
        self.disconnected = False  # client sent DISC
        self.closed = self.loop.create_future()
        self.scratch = bytearray(4096)  # receive buffer during the handshake
        self.hs_timer: asyncio.TimerHandle | None = None

    # --- asyncio.BufferedProtocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.peername = transport.get_extra_info("peername")
        self.peer = _describe_peer(self.peername)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _tune_socket(sock)
        self.server.connections.add(self)
        self.hs_timer = self.loop.call_later(self.server.handshake_timeout, self._hs_timeout)
        assert self.neg is not None
        self.transport.write(self.neg.greeting())
        self.neg.connected(self.peername)
        if self.server.closing:
            self.shutdown()

    def _hs_timeout(self) -> None:
        if self.parser is None:
            log.warning("%s: handshake not finished in time; closing", self.peer)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:  # a failed STARTTLS may report it twice
            return
        self.lost = True
        self.server.connections.discard(self)
        if self.hs_timer is not None:
            self.hs_timer.cancel()
        for task in self.tasks:
            task.cancel()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._pump()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.parser is not None:
            return self.parser.get_buffer()
        return memoryview(self.scratch)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.parser is not None:
                self.parser.buffer_updated(nbytes)
                self._pump()
            elif self.neg is not None:
                self.neg.receive(bytes(self.scratch[:nbytes]))
        except ProtocolError as exc:
            log.warning("%s: protocol error: %s; closing", self.peer, exc)
            self.abort()
        except Exception:
            log.exception("%s: unexpected error; closing", self.peer)
            self.abort()

    def eof_received(self) -> bool | None:
        return None  # close our side too; in-flight replies are dropped by the peer

    # --- lifecycle ---------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop taking requests (ESHUTDOWN); close once in-flight ones are answered."""
        self.closing = True
        if self.parser is None:  # still haggling: nothing to finish
            self._close()
            return
        self._pump()

    def _close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- handshake (the Negotiator's callbacks) ----------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task of this connection (cancelled when it is lost)."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def bind(self, hs: ServerHandshake, device: BlockDevice, info: ExportInfo) -> None:
        """GO or EXPORT_NAME was accepted for ``device``."""
        self.device = device
        self.size = info.size
        self.structured = hs.structured_replies
        self.context_id = hs.meta_contexts.get(BASE_ALLOCATION, 0)
        self.allowed = _allowed_flags(info.flags)
        self.max_block = min(info.max_block, self.server.max_payload)
        log.debug(
            "%s: export %r size %d flags 0x%x", self.peer, hs.export_name, info.size, info.flags
        )

    def begin_transmission(self, hs: ServerHandshake, *, tls: TlsInfo | None) -> None:
        """The handshake is over: parse requests from now on."""
        self.neg = None
        self.tls = tls
        self.export = hs.export_name
        if self.hs_timer is not None:
            self.hs_timer.cancel()
        self.parser = hs.start_transmission(max_payload=self.max_block)
        self._pump()

    def status(self) -> dict[str, Any]:
        """This client for status displays: peer, export, TLS session."""
        tls = self.tls if self.neg is None else self.neg.info
        return {
            "peer": self.peer,
            "export": self.export,
            "state": "transmission" if self.parser is not None else "handshake",
            "tls": tls.as_dict() if tls is not None else None,
        }

    # --- transmission ----------------------------------------------------------------

    def _pump(self) -> None:
        """Parse and dispatch buffered requests as far as backpressure allows."""
        parser = self.parser
        if parser is None or self.in_receive:
            return
        self.in_receive = True
        try:
            limit = self.server.max_inflight
            while not self.disconnected and not self.write_paused and self.inflight < limit:
                reqs = parser.requests(limit - self.inflight)
                if not reqs:
                    break
                for req in reqs:
                    self._dispatch(req)
                    if self.disconnected:
                        break
                if self.out_bytes > _OUT_HIGH:
                    self._flush()
        finally:
            self.in_receive = False
        self._flush()
        self._update_reading()
        self._maybe_close()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        busy = self.write_paused or self.inflight >= self.server.max_inflight
        if busy and not self.read_paused:
            self.read_paused = True
            t.pause_reading()
        elif not busy and self.read_paused:
            self.read_paused = False
            t.resume_reading()

    def _maybe_close(self) -> None:
        if (self.closing or self.disconnected) and not self.inflight:
            self._close()

    def _dispatch(self, req: Request) -> None:
        err = self._validate(req)
        if err is not None:
            self._error(req, err[0], err[1])
            return
        typ = req.type
        device = self.device
        assert device is not None
        fua = bool(req.flags & _FUA)
        if typ in (_WRITE, _READ):  # the callback fast path first (dst.device)
            self.inflight += 1
            done = partial(self._done, req)
            if typ == _WRITE:
                assert req.data is not None
                taken = device.submit_write(req.offset, req.data, fua, done)
            else:
                taken = device.submit_read(req.offset, req.length, done)
            if taken is not None:
                return
            self.inflight -= 1
        coro: Coroutine[Any, Any, Any]
        if typ == _READ:
            coro = device.read(req.offset, req.length)
        elif typ == _WRITE:
            assert req.data is not None
            coro = device.write(req.offset, req.data, fua=fua)
        elif typ == _FLUSH:
            coro = device.flush()
        elif typ == _TRIM:
            coro = device.trim(req.offset, req.length, fua=fua)
        elif typ == _ZERO:
            punch = not req.flags & CmdFlags.NO_HOLE
            fast = bool(req.flags & CmdFlags.FAST_ZERO)
            coro = device.write_zeroes(req.offset, req.length, fua=fua, punch=punch, fast=fast)
        elif typ == _CACHE:
            coro = device.cache(req.offset, req.length)
        elif typ == _BS:
            coro = device.block_status(req.offset, req.length)
        else:  # DISC
            self.disconnected = True
            return
        try:
            first = coro.send(None)
        except StopIteration as stop:
            self._complete(req, stop.value)
            return
        except BaseException as exc:
            self._failed(req, exc)
            return
        self.inflight += 1
        task = self.loop.create_task(self._finish(req, Continuation(coro, first)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _done(self, req: Request, exc: BaseException | None, value: Any) -> None:
        """Completion of a request taken by the device's fast path."""
        self.inflight -= 1
        if exc is None:
            self._complete(req, value)
        elif isinstance(exc, Exception):
            self._failed(req, exc)
        else:  # cancelled below us (a device shutting down)
            self._error(req, errno_to_nbd(errno.EIO), "request cancelled")
        self._completed()

    def _completed(self) -> None:
        if not self.in_receive:
            self._schedule_flush()
            if self.read_paused or self.closing or self.disconnected:
                self._pump()

    async def _finish(self, req: Request, rest: Continuation[Any]) -> None:
        try:
            value = await rest
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._failed(req, exc)
        else:
            self._complete(req, value)
        finally:
            self.inflight -= 1
        self._completed()

    def _validate(self, req: Request) -> tuple[int, str] | None:
        if self.closing:
            return _ESHUTDOWN, "server is shutting down"
        typ = req.type
        allowed = self.allowed.get(typ)
        if allowed is None:
            return _EINVAL, f"unknown command {typ}"
        if req.flags & ~allowed:
            return _EINVAL, f"flags 0x{req.flags:x} not valid for command {typ}"
        if typ in (_FLUSH, _DISC):
            return None
        device = self.device
        assert device is not None
        if typ in _WRITES and device.caps.read_only:
            return int(NbdErr.EPERM), "export is read-only"
        length = req.length
        if req.offset + length > self.size:
            code = NbdErr.ENOSPC if typ in (_WRITE, _ZERO) else NbdErr.EINVAL
            return int(code), "request beyond the end of the export"
        if length == 0:
            return _EINVAL, "zero-length request"
        if (typ in (_READ, _WRITE)) and length > self.max_block:
            return _EINVAL, f"request longer than {self.max_block} bytes"
        if typ == _BS and not self.context_id:
            return _EINVAL, "base:allocation was not negotiated"
        return None

    def _complete(self, req: Request, value: Any) -> None:
        typ = req.type
        if typ == _READ:
            n = len(value)
            if n != req.length:
                log.error("%s: device read returned %d of %d bytes", self.peer, n, req.length)
                self._error(req, int(NbdErr.EIO), "short read")
                return
            if self.structured:
                self._queue(rq.data_chunk(req.handle, req.offset, n), value)
            else:
                self._queue(rq.simple_reply(req.handle), value)
        elif typ == _BS:
            req_one = bool(req.flags & CmdFlags.REQ_ONE)
            extents = clip_extents(value, req.length, req_one=req_one)
            self._queue(rq.block_status_chunk(req.handle, self.context_id, extents))
        else:
            self._queue(rq.simple_reply(req.handle))

    def _failed(self, req: Request, exc: BaseException) -> None:
        if isinstance(exc, BlockError):
            self._error(req, errno_to_nbd(exc.errno), exc.message)
        elif isinstance(exc, Exception):
            log.error("%s: device error on command %d", self.peer, req.type, exc_info=exc)
            self._error(req, errno_to_nbd(errno.EIO), "internal error")
        else:
            raise exc

    def _error(self, req: Request, code: int, message: str) -> None:
        self._queue(rq.error_reply(req.handle, code, message, structured=self.structured))

    def _queue(self, head: bytes, data: Any = None) -> None:
        out = self.out
        out.append(head)
        n = len(head)
        if data is not None:
            out.append(data)
            n += len(data)
        self.out_bytes += n

    def _schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if not self.out:
            return
        t = self.transport
        if t is not None and not t.is_closing():
            t.writelines(self.out)
        self.out = []
        self.out_bytes = 0
