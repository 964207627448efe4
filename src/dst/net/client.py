"""asyncio NBD client: the array's way to its members.

Theory of operation
-------------------
:meth:`NbdClient.connect` opens a TCP or unix connection and negotiates
(:mod:`dst.net.clientproto`: the handshake, STARTTLS for an ``nbds`` address, and
the byte pump under both phases).  A refusal raises :class:`dst.errors.ServerRefused`
naming the export and the server's reply.

In transmission every call registers a request with the
:class:`~dst.nbd.replies.ReplyParser` (unique handle), queues its bytes -- requests
issued in one loop iteration go out in one ``writelines`` -- and awaits a future that
``data_received`` resolves when the reply is complete.  Any number of requests may be
in flight; replies come back in any order.  :meth:`NbdClient.submit_read` and
:meth:`~NbdClient.submit_write` are the same without a future: the reply calls the
caller's ``done`` directly from ``data_received`` (see :mod:`dst.device`).  Errors
become :class:`BlockError` with the mapped errno; a per-request ``timeout`` gives
ETIMEDOUT; losing the connection (or a server breaking the protocol) fails every
in-flight request with :class:`ConnectionLost`.  Reads and writes longer than the
server's maximum block size are split.

A silent peer: a TCP connection can be given :class:`~dst.net.clientproto.Keepalive`
(a peer cut off by the network is given up in bounded time even without I/O);
:meth:`NbdClient.abort` drops a connection whose peer did not answer in time, and
:meth:`NbdClient.when_lost` tells the owner as soon as a connection is gone, idle or
not.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Sequence
from typing import Any

from dst.aio import bind
from dst.device import Buffer, Cancel, Capabilities, Done, Extent
from dst.errors import BlockError, ServerRefused
from dst.nbd import client as hsc
from dst.nbd.constants import Cmd, CmdFlags, Opt, Rep, StateFlags, TransmissionFlags, nbd_to_errno
from dst.nbd.events import Reply
from dst.net.address import Address, parse_address
from dst.net.clientproto import (
    MEMBER_KEEPALIVE,
    ClientProtocol,
    ConnectionLost,
    Export,
    Keepalive,
    negotiate,
    next_event,
    open_connection,
    option_replies,
    starttls,
)
from dst.net.tls import TlsInfo, client_config

__all__ = ["MEMBER_KEEPALIVE", "ConnectionLost", "Keepalive", "NbdClient", "list_exports"]

_TF = TransmissionFlags
_READ, _WRITE, _FUA = int(Cmd.READ), int(Cmd.WRITE), int(CmdFlags.FUA)
_SEND_FUA = int(TransmissionFlags.SEND_FUA)


class NbdClient:
    """A connected NBD export (see module docstring).  Create with :meth:`connect`."""

    def __init__(self, proto: ClientProtocol, address: Address, export_name: str) -> None:
        self._proto = proto
        self.address = address
        self.export_name = export_name
        self.size = 0
        self.flags = 0
        self.structured = False
        self.context_id = 0
        self.min_block, self.pref_block, self.max_block = 1, 4096, 32 << 20
        self.timeout: float | None = None
        self.tls: TlsInfo | None = None  # the TLS session (server certificate subject)

    @classmethod
    async def connect(
        cls,
        address: str | Address,
        export_name: str | None = None,
        *,
        timeout: float | None = 30.0,  # noqa: ASYNC109
        request_timeout: float | None = None,
        keepalive: Keepalive | None = None,
    ) -> NbdClient:
        """Connect and negotiate.  ``export_name`` defaults to the address's export;
        ``keepalive`` applies to TCP connections.

        Raises ConnectionLost (a BlockError) when the server cannot be reached, hangs
        up or the TLS handshake fails, ServerRefused when it refuses the export or TLS,
        ProtocolError when it breaks the protocol, TimeoutError when negotiation takes
        longer than ``timeout``, ConfigError for unusable TLS credentials.
        """
        addr = parse_address(address, where="NBD server address")
        name = addr.export if export_name is None else export_name
        async with asyncio.timeout(timeout):
            _, proto = await open_connection(addr, keepalive)
            try:
                found = await negotiate(proto, addr, name)
            except BaseException:
                assert proto.transport is not None
                proto.transport.abort()
                raise
        self = cls(proto, addr, name)
        self._adopt(found)
        self.timeout = request_timeout
        return self

    def _adopt(self, found: Export) -> None:
        self.size, self.flags = found.size, found.flags
        self.structured, self.context_id = found.structured, found.context_id
        self.min_block, self.pref_block = found.min_block, found.pref_block
        self.max_block = found.max_block
        self.tls = found.tls

    # --- properties -------------------------------------------------------------------

    @property
    def caps(self) -> Capabilities:
        """Capabilities derived from the transmission flags and block sizes."""
        f = self.flags
        return Capabilities(
            read_only=bool(f & _TF.READ_ONLY),
            flush=bool(f & _TF.SEND_FLUSH),
            fua=bool(f & _TF.SEND_FUA),
            trim=bool(f & _TF.SEND_TRIM),
            zeroes=bool(f & _TF.SEND_WRITE_ZEROES),
            fast_zero=bool(f & _TF.SEND_FAST_ZERO),
            cache=bool(f & _TF.SEND_CACHE),
            multi_conn=bool(f & _TF.CAN_MULTI_CONN),
            block_status=self.context_id != 0,
            min_block=self.min_block,
            pref_block=self.pref_block,
            max_block=self.max_block,
        )

    @property
    def connected(self) -> bool:
        return self._proto.lost is None

    @property
    def lost(self) -> BlockError | None:
        """Why the connection is gone (None while connected)."""
        return self._proto.lost

    def when_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the connection is gone (lost, aborted or closed):
        at once, before any request in flight gets its ConnectionLost (so what a
        request's completion asks of the connection's owner already knows of the loss);
        soon, if it is gone already."""
        proto = self._proto
        if proto.closed.done():
            proto.loop.call_soon(callback)
        else:
            proto.on_lost.append(callback)

    def abort(self, reason: str) -> None:
        """Drop the connection now (its peer did not answer in time): requests in
        flight fail with :class:`ConnectionLost` carrying ``reason``."""
        proto = self._proto
        if proto.lost is None:
            proto.lost = ConnectionLost(f"connection dropped: {reason}")
        if proto.transport is not None:
            proto.transport.abort()

    # --- requests -----------------------------------------------------------------

    async def _request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: Buffer | None = None
    ) -> Reply:
        proto = self._proto
        if proto.lost is not None:
            raise proto.lost
        assert proto.parser is not None
        handle, header = proto.parser.request(cmd, offset, length, flags)
        fut: asyncio.Future[Reply] = proto.loop.create_future()
        proto.waiters[handle] = fut
        if data is None:
            proto.send(header)
        else:
            proto.send(header, data)
        if proto.drain is not None and not proto.drain.done():
            await proto.drain
        timer = None
        if self.timeout is not None:  # a timer, not asyncio.timeout: works without a Task
            timer = proto.loop.call_later(self.timeout, proto.expire, handle, cmd)
        try:
            reply = await fut
        finally:
            if timer is not None:
                timer.cancel()
        if reply.error:
            raise BlockError(nbd_to_errno(reply.error), reply.message or "")
        return reply

    def submit(
        self, cmd: int, offset: int, length: int, fua: bool, data: Buffer | None, done: Done,
        parts: Sequence[Buffer] = (),
    ) -> Cancel | None:  # fmt: skip
        """Queue a READ or WRITE of ``length`` bytes whose reply calls ``done``; a WRITE's
        payload is ``data``, or else the buffers ``parts`` end to end.  None: not now,
        use the coroutine form -- longer than the server takes, FUA it cannot do, the
        connection lost, or a per-request timeout to run.  A full send buffer does not
        refuse it: the coroutine form would queue it all the same (its wait for the
        buffer to drain cannot end the request sooner than its reply), and nothing is
        copied."""
        proto = self._proto
        parser = proto.parser
        if (
            proto.lost is not None
            or parser is None
            or self.timeout is not None
            or length > self.max_block
        ):
            return None
        flags = 0
        if fua:
            if not self.flags & _SEND_FUA:
                return None
            flags = _FUA
        handle, header = parser.request(cmd, offset, length, flags)
        proto.calls[handle] = done
        out = proto.out  # (proto.send, inline: every leg's part of a mirrored write)
        out.append(header)
        if data is None:
            out.extend(parts)
        else:
            out.append(data)
        if not proto.flush_scheduled:
            proto.flush_scheduled = True
            proto.loop.call_soon(proto.flush)
        return bind(proto.cancel, handle)

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        """:meth:`read` with a callback: ``done(None, data)`` or ``done(error, None)``."""
        return self.submit(_READ, offset, length, False, None, done)

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        """:meth:`write` with a callback: ``done(None, None)`` or ``done(error, None)``
        (a remote device calls :meth:`submit`: one call less per write)."""
        return self.submit(_WRITE, offset, len(data), fua, data, done)

    def submit_gather(
        self, offset: int, parts: Sequence[Buffer], fua: bool, done: Done
    ) -> Cancel | None:
        """:meth:`submit_write` of ``parts`` end to end: one request whose payload is
        sent from the buffers as they are."""
        return self.submit(_WRITE, offset, sum(map(len, parts)), fua, None, done, parts)

    def _fua(self, fua: bool) -> int:
        return int(CmdFlags.FUA) if fua and self.flags & _TF.SEND_FUA else 0

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Read ``length`` bytes.  Raises BlockError."""
        if length > self.max_block:
            parts = await asyncio.gather(
                *(
                    self.read(o, min(self.max_block, offset + length - o))
                    for o in range(offset, offset + length, self.max_block)
                )
            )
            return b"".join(parts)
        reply = await self._request(Cmd.READ, offset, length)
        assert reply.data is not None
        return reply.data

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` durably.  Raises BlockError."""
        n = len(data)
        if n > self.max_block:
            mv = memoryview(data)
            step = self.max_block
            await asyncio.gather(
                *(self.write(offset + i, mv[i : i + step], fua=fua) for i in range(0, n, step))
            )
            return
        await self._request(Cmd.WRITE, offset, n, self._fua(fua), data)
        if fua and not self.flags & _TF.SEND_FUA:
            await self.flush()

    async def flush(self) -> None:
        if self.flags & _TF.SEND_FLUSH:
            await self._request(Cmd.FLUSH)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self.flags & _TF.SEND_TRIM:
            await self._request(Cmd.TRIM, offset, length, self._fua(fua))

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        """Zero a range.  Raises BlockError (ENOTSUP when ``fast`` cannot be honoured)."""
        if not self.flags & _TF.SEND_WRITE_ZEROES:
            raise BlockError(errno.ENOTSUP, "server does not support WRITE_ZEROES")
        flags = self._fua(fua)
        if not punch:
            flags |= CmdFlags.NO_HOLE
        if fast:
            if not self.flags & _TF.SEND_FAST_ZERO:
                raise BlockError(errno.ENOTSUP, "server does not support fast zero")
            flags |= CmdFlags.FAST_ZERO
        await self._request(Cmd.WRITE_ZEROES, offset, length, flags)

    async def cache(self, offset: int, length: int) -> None:
        if self.flags & _TF.SEND_CACHE:
            await self._request(Cmd.CACHE, offset, length)

    async def block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> Sequence[Extent]:
        """base:allocation extents from ``offset``, clipped to ``length`` (may cover less)."""
        if not self.context_id:
            return [Extent(length)]
        flags = int(CmdFlags.REQ_ONE) if req_one else 0
        reply = await self._request(Cmd.BLOCK_STATUS, offset, length, flags)
        out: list[Extent] = []
        left = length
        for n, f in reply.extents or ():
            n = min(n, left)
            if n <= 0:
                break
            out.append(Extent(n, hole=bool(f & StateFlags.HOLE), zero=bool(f & StateFlags.ZERO)))
            left -= n
        return out

    async def close(self) -> None:
        """Wait for in-flight requests, send DISC and close.  Idempotent."""
        proto = self._proto
        if proto.lost is None and proto.parser is not None:
            pending: list[asyncio.Future[Any]] = [f for f in proto.waiters.values() if not f.done()]
            if proto.calls:
                proto.idle = proto.loop.create_future()
                pending.append(proto.idle)
            if pending:
                await asyncio.wait(pending, timeout=self.timeout or 30.0)
            if proto.lost is None:
                _, header = proto.parser.request(Cmd.DISC)
                proto.send(header)
                proto.flush()
        if proto.transport is not None:
            proto.transport.close()
        await asyncio.wait([proto.closed], timeout=5.0)

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def list_exports(
    address: str | Address,
    *,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> list[tuple[str, str]]:
    """(name, description) of every export the server lists (NBD_OPT_LIST).

    Raises ConnectionLost, ServerRefused (the server refused to list), ProtocolError.
    """
    async with asyncio.timeout(timeout):
        addr, proto = await open_connection(address)
        try:
            await next_event(proto)
            tls = client_config(addr)
            if tls is not None:
                await starttls(proto, addr, tls)
            replies = await option_replies(proto, Opt.LIST)
            if replies[-1].reply != Rep.ACK:
                raise ServerRefused(
                    f"NBD server {addr} refused to list exports: {hsc.error_text(replies[-1])}",
                    reply=replies[-1].reply,
                )
            exports = [hsc.parse_server(r.payload) for r in replies if r.reply == Rep.SERVER]
            proto.hs.send_option(Opt.ABORT)
            assert proto.transport is not None
            proto.transport.write(proto.hs.data_to_send())
            return exports
        finally:
            assert proto.transport is not None
            proto.transport.close()
