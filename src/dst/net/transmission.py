"""The transmission phase of one server connection: requests in, replies out.

Theory of operation
-------------------
Once the handshake has bound an export (:mod:`dst.net.connection`), a
:class:`Transmission` becomes the transport's protocol: received bytes land in the
:class:`~dst.nbd.requests.RequestParser`, which yields every complete request; each is
validated at the edge (command, flags, range, read-only, lengths:
:meth:`dst.net.edge.Binding.check`) and given to the device.  READ and WRITE first try
the device's callback fast path (:meth:`~dst.device.BlockDevice.submit_write`): no
coroutine at all, the reply is queued from the completion callback.  Otherwise the
device coroutine is stepped once eagerly; if it completes without suspending -- the
common case -- its reply is built at once, otherwise a Task finishes it
(:class:`~dst.aio.Continuation`) and the reply goes out whenever it completes, out of
order.  A device that serves inline (a node's file) answers READ and plain WRITE from
the receive buffer with no request object, and whole runs of them in compiled code
where it can (:meth:`~dst.device.BlockDevice.inline_runs`).  Replies produced while
handling one receive (or one loop iteration of completions) are written with a single
``writelines``; READ replies are a small header followed by the device's buffer.  A
WRITE payload that arrives in pieces over plain TCP (a member behind a slow link) sets
the socket's ``SO_RCVLOWAT`` to the smaller of :data:`LOWAT` and what is still to come,
so the loop is woken per 256 KiB, not per segment; never to more than the client must
send, so it cannot wait for bytes that will not come.

Backpressure: at most ``max_inflight`` requests in flight per connection, at most the
memory budget's bytes of payload (:mod:`dst.net.budget`: READ data until its reply left
the transport buffer, WRITE payload from its arrival until completion; per connection
and per process; a request adds its bytes to :attr:`Transmission.delta` and the budget
hears the sum once per batch, before anything reads it), and nothing is parsed while
the transport's write buffer is over its high-water mark; in each case reading from the
socket pauses and unparsed bytes wait in the parser or the kernel.  A client that
neither reads its replies nor finishes a payload for ``stall_timeout`` seconds is
dropped.

Shutdown (:meth:`Transmission.shutdown`): new requests get ESHUTDOWN, in-flight ones
finish, then the transport closes.  Any error on one connection is logged and closes
only it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

from dst.aio import Continuation, bind
from dst.device import BlockDevice, Buffer
from dst.errors import BlockError, ProtocolError
from dst.nbd import requests as rq
from dst.nbd.constants import Cmd, CmdFlags, NbdErr, errno_to_nbd
from dst.nbd.events import Request
from dst.net.budget import Holdings
from dst.net.edge import Binding, device_call
from dst.net.negotiate import Server

log = logging.getLogger(__name__)

_READ, _WRITE = int(Cmd.READ), int(Cmd.WRITE)
_FUA = int(CmdFlags.FUA)
_OUT_HIGH = 1 << 20  # flush queued replies once this many bytes are pending
LOWAT = 256 << 10  # wake for a payload's rest once this much of it came (or all of it)
_ESHUTDOWN = int(NbdErr.ESHUTDOWN)


def _not_now(offset: int, what: Any) -> Any:
    return None


def receive_failed(peer: str, exc: Exception, abort: Callable[[], None]) -> None:
    """Handling a receive raised ``exc``: log it (a client's protocol error in one line,
    anything else with its traceback) and ``abort`` that connection only."""
    if isinstance(exc, ProtocolError):
        log.warning("%s: protocol error: %s; closing", peer, exc)
    else:
        log.error("%s: unexpected error; closing", peer, exc_info=exc)
    abort()


class Owner(Protocol):
    """What a transmission needs of its connection: to hear that it was lost."""

    def connection_lost(self, exc: Exception | None) -> None: ...


class Transmission(asyncio.BufferedProtocol):
    """Serves one client's requests on the export its handshake bound (module
    docstring).  ``tcp``: the socket, to set ``SO_RCVLOWAT`` on (plain TCP only)."""

    def __init__(self, owner: Owner, server: Server, transport: asyncio.Transport, *,
                 peer: str, parser: rq.RequestParser, bound: Binding,
                 tcp: socket.socket | None) -> None:  # fmt: skip
        self.owner = owner
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = transport
        self.peer = peer
        self.parser = parser
        self.bound = bound
        self.lost = False
        self.inline: rq.Inline | None = None  # the bound device serves inline ...
        self.read_now: Callable[[int, int], Buffer | None] = _not_now  # ... so (its
        self.write_now: Callable[[int, Buffer], bool] = _not_now  # read_now, write_now)
        self.runs: rq.Runs | None = None  # ... and perhaps whole runs (inline_runs)
        device = bound.device
        cls = type(device)
        if cls.write_now is not BlockDevice.write_now or cls.read_now is not BlockDevice.read_now:
            self.inline = self._inline
            self.read_now = device.read_now
            self.write_now = device.write_now
            self.runs = device.inline_runs(
                self._queue, size=bound.size, max_block=bound.max_block,
                structured=bound.structured, writable=not bound.read_only,
            )  # fmt: skip
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
        self.holds = Holdings(server.budget, look=self._buffered, stalled=self._stalled,
                              stall_timeout=server.stall_timeout)  # fmt: skip
        self.blocked = False  # over budget: not parsing until bytes are given back
        self.delta = 0  # payload bytes dispatched minus completed, not yet in ``holds``
        self.tcp = tcp  # SO_RCVLOWAT while a payload arrives
        self.lowat = 1

    def start(self) -> None:
        """Serve what came with the handshake's last bytes (the protocol is switched)."""
        self._pump()

    # --- asyncio.BufferedProtocol ------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.tcp = None  # (the connection closes its socket)
        for task in self.tasks:
            task.cancel()
        self.holds.close()
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.holds.output(self._buffered())
        self._pump()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.parser.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            parser = self.parser
            parser.buffer_updated(nbytes)
            runs = self.runs
            if runs is not None and self._lane(parser, runs):
                return
            self._pump()
            if self.holds.pending or parser.pending:
                self._payload_arriving(parser.pending)
            if self.tcp is not None:
                self._wake_at(parser.payload_left)
        except Exception as exc:
            receive_failed(self.peer, exc, self.abort)

    def eof_received(self) -> bool | None:
        return None  # close our side too; in-flight replies are dropped by the peer

    # --- lifecycle ---------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop taking requests (ESHUTDOWN); close once in-flight ones are answered."""
        self.closing = True
        self._pump()

    def _close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- requests ----------------------------------------------------------------------

    def _pump(self) -> None:
        """Parse and dispatch buffered requests as far as backpressure allows."""
        if self.in_receive or self.lost:
            return
        parser = self.parser
        self.in_receive = True
        self.blocked = False
        holds = self.holds
        if self.delta:
            self._settle()
        runs = None if self.closing else self.runs  # (shutting down: ESHUTDOWN to all)
        try:
            limit = self.server.max_inflight
            while not self.disconnected and not self.write_paused and self.inflight < limit:
                want = limit - self.inflight
                allowance, idle = holds.room()
                reqs = parser.requests(want, max(allowance, 0), first_free=idle,
                                       inline=self.inline, runs=runs)  # fmt: skip
                for req in reqs:
                    self._dispatch(req)
                    if self.disconnected:
                        break
                if self.delta:
                    self._settle()
                if parser.blocked:  # over budget: wait for bytes to be given back
                    self.blocked = True
                    holds.short(self._pump)
                    break
                if len(reqs) < want:  # all that was buffered (no parse that finds none)
                    break
                if self.out_bytes > _OUT_HIGH:
                    self._flush()
        finally:
            self.in_receive = False
        self._flush()
        self._update_reading()
        self._maybe_close()

    def _lane(self, parser: rq.RequestParser, runs: rq.Runs) -> bool:
        """The short way through a receive, for a device with inline runs: while nothing
        is in flight, held or paused, offer the runs everything received; True when they
        served all of it (and the replies went out).  Otherwise :meth:`_pump` goes on
        from where they stopped.  A node's every receive comes here: :meth:`_pump`, the
        budget's room and the checks after it are a node's whole cost per receive once
        the runs serve the requests."""
        holds = self.holds
        if (
            self.inflight
            or self.read_paused
            or self.closing
            or self.disconnected
            or holds.out
            or holds.pending
            or self.lowat != 1
        ):
            return False
        b = holds.budget  # (Budget.allowance, inline: nothing held here but in flight)
        served, used = parser.serve(runs, min(b.per_connection - holds.inflight,
                                                  b.limit - b.used))  # fmt: skip
        if served or used:  # (READ data: in the budget before anything more is served)
            self._flush()
        return served

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        busy = self.write_paused or self.blocked or self.inflight >= self.server.max_inflight
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
        bound = self.bound
        err = (_ESHUTDOWN, "server is shutting down") if self.closing else bound.check(req)
        if err is not None:
            self._error(req, err[0], err[1])
            return
        typ = req.type
        device = bound.device
        if typ in (_WRITE, _READ):  # the callback fast path first (dst.device)
            self.inflight += 1
            self.delta += req.length
            done = bind(self._done, req)
            if typ == _WRITE:
                assert req.data is not None
                taken = device.submit_write(req.offset, req.data, bool(req.flags & _FUA), done)
            else:
                taken = device.submit_read(req.offset, req.length, done)
            if taken is not None:
                return
            self.inflight -= 1
            self._release(req)
        coro = device_call(device, req)
        if coro is None:  # DISC
            self.disconnected = True
            return
        if typ in (_WRITE, _READ):
            self.delta += req.length
        try:
            first = coro.send(None)
        except StopIteration as stop:
            self._release(req)
            self._complete(req, stop.value)
            return
        except BaseException as exc:
            self._release(req)
            self._failed(req, exc)
            return
        self.inflight += 1
        task = self.loop.create_task(self._finish(req, Continuation(coro, first)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _inline(self, typ: int, flags: int, handle: int, offset: int, length: int,
                data: memoryview | None) -> bool:  # fmt: skip
        """A READ, or a WRITE whose payload came with it, on a device that serves inline
        (:meth:`BlockDevice.read_now`, :meth:`~BlockDevice.write_now`): served and
        answered at once, with no request object.  False: not taken (anything but a
        valid READ or plain WRITE, shutting down, a short read): the request path
        serves it."""
        bound = self.bound
        if (
            not length
            or offset + length > bound.size
            or length > bound.max_block
            or flags & ~bound.allowed[typ]
            or self.closing
        ):
            return False
        try:
            if typ != _WRITE:
                value = self.read_now(offset, length)
                if value is None or len(value) != length:
                    return False
                self._queue(bound.read_head(handle, offset, length), value)
                return True
            if flags or data is None or not self.write_now(offset, data):
                return False  # (FUA: the request path)
        except BlockError as exc:
            self._queue(bound.error_to(handle, errno_to_nbd(exc.errno), exc.message))
            return True
        head = rq.simple_ok(handle)  # (_queue, inline: every write comes here)
        self.out.append(head)
        self.out_bytes += len(head)
        return True

    def _release(self, req: Request) -> None:
        """Give back what a dispatched request held (its reply, if any, is charged
        again as it sits in the transport buffer)."""
        if req.type in (_WRITE, _READ):
            self.delta -= req.length

    def _done(self, req: Request, exc: BaseException | None, value: Any) -> None:
        """Completion of a READ or WRITE taken by the device's fast path."""
        self.inflight -= 1
        self.delta -= req.length  # (_release, inline: every write ends here)
        if exc is None:
            if req.type == _WRITE:  # its reply is the simple one (Binding.reply, _queue)
                head = rq.simple_ok(req.handle)
                self.out.append(head)
                self.out_bytes += len(head)
            elif len(value) == req.length:  # a READ served whole (Binding.reply's)
                self._queue(self.bound.read_head(req.handle, req.offset, req.length), value)
            else:
                self._complete(req, value)
        elif isinstance(exc, Exception):
            self._failed(req, exc)
        else:  # cancelled below us (a device shutting down)
            self._error(req, errno_to_nbd(errno.EIO), "request cancelled")
        if not self.in_receive:  # (_completed, inline)
            if not self.flush_scheduled:
                self.flush_scheduled = True
                self.loop.call_soon(self._flush)
            if self.read_paused or self.closing or self.disconnected:
                self._pump()

    def _completed(self) -> None:
        """A request answered outside a receive: its reply leaves soon; reading may
        resume.  (Inline in :meth:`_done`.)"""
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
            self._release(req)
        self._completed()

    def _complete(self, req: Request, value: Any) -> None:
        reply = self.bound.reply(req, value)
        if reply is None:
            log.error("%s: device read returned %d of %d bytes", self.peer, len(value), req.length)
            self._error(req, int(NbdErr.EIO), "short read")
        else:
            self._queue(*reply)

    def _failed(self, req: Request, exc: BaseException) -> None:
        if isinstance(exc, BlockError):
            self._error(req, errno_to_nbd(exc.errno), exc.message)
        elif isinstance(exc, Exception):
            log.error("%s: device error on command %d", self.peer, req.type, exc_info=exc)
            self._error(req, errno_to_nbd(errno.EIO), "internal error")
        else:
            raise exc

    def _error(self, req: Request, code: int, message: str) -> None:
        self._queue(self.bound.error(req, code, message))

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

    def _settle(self) -> None:
        """Tell the budget what the requests since the last time changed."""
        self.holds.change(self.delta)
        self.delta = 0

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.delta:
            self._settle()
        if not self.out:
            return
        t = self.transport
        if t is not None and not t.is_closing():
            t.writelines(self.out)
        self.out = []
        self.out_bytes = 0
        buffered = self._buffered()
        if buffered or self.holds.out:  # (all sent, none was waiting: nothing to tell)
            self.holds.output(buffered)

    # --- the budget of replies and payloads --------------------------------------------

    def _buffered(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None and not self.lost else 0

    def _wake_at(self, left: int) -> None:
        """While a WRITE payload arrives over plain TCP, be woken only once a good part
        of the rest is there (SO_RCVLOWAT; never more than is still to come)."""
        want = min(left, LOWAT) if left else 1
        if want != self.lowat and self.tcp is not None:
            self.lowat = want
            with contextlib.suppress(OSError):
                self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)

    def _payload_arriving(self, pending: int) -> None:
        """Bytes of an incomplete WRITE payload came in: charge them; over budget, stop
        reading until bytes are given back."""
        if self.holds.payload(pending, wake=self._unblock):
            self.blocked = True
            self._update_reading()

    def _unblock(self) -> None:
        self.blocked = False
        self._pump()

    def _stalled(self, what: str) -> None:
        log.warning("%s: has not %s for %.0fs; closing", self.peer, what,
                    self.server.stall_timeout)  # fmt: skip
        self.abort()
