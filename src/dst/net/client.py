"""asyncio NBD client: the array's way to its members.

Theory of operation
-------------------
:meth:`NbdClient.connect` opens a TCP or unix connection and negotiates with the
sans-IO :class:`~dst.nbd.client.ClientHandshake`: fixed newstyle + NO_ZEROES,
STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, then GO asking for block sizes
(EXPORT_NAME when the server does not know GO).  A refusal raises
:class:`dst.errors.ServerRefused` naming the export and the server's reply.

An ``nbds`` address sends NBD_OPT_STARTTLS first and insists on its ACK (no downgrade:
a server that will not do TLS is a ServerRefused), upgrades the transport with
``loop.start_tls`` (after the codec checked the server sent nothing past its ACK) and
negotiates everything else inside TLS.  A failed TLS handshake (unknown CA, wrong
host name, a refused client certificate) is a ConnectionLost naming the reason.  A
plain client meeting a server that requires TLS gets a ServerRefused saying so.

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
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

from dst.device import Buffer, Cancel, Capabilities, Done, Extent
from dst.errors import BlockError, ProtocolError, ServerRefused
from dst.nbd import client as hsc
from dst.nbd.constants import (
    BASE_ALLOCATION,
    Cmd,
    CmdFlags,
    Info,
    Opt,
    Rep,
    StateFlags,
    TransmissionFlags,
    nbd_to_errno,
)
from dst.nbd.events import ExportNameReply, OptionReply, Reply
from dst.nbd.replies import ReplyParser
from dst.net.address import Address, parse_address
from dst.net.tls import ClientTlsConfig, TlsInfo, client_config, session_info

log = logging.getLogger(__name__)

_TF = TransmissionFlags
_READ, _WRITE, _FUA = int(Cmd.READ), int(Cmd.WRITE), int(CmdFlags.FUA)


class ConnectionLost(BlockError):
    """The connection to the server is gone; in-flight requests failed with EIO."""

    def __init__(self, message: str = "connection to NBD server lost") -> None:
        super().__init__(errno.EIO, message)


class _Protocol(asyncio.Protocol):
    """Byte pump between the transport and the codec of one client."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.hs = hsc.ClientHandshake()
        self.parser: ReplyParser | None = None
        self.waiters: dict[int, asyncio.Future[Reply]] = {}
        self.calls: dict[int, Done] = {}  # submitted requests: handle -> done
        self.idle: asyncio.Future[None] | None = None  # close() waits for calls
        self.wakeup: asyncio.Future[None] | None = None
        self.lost: BlockError | None = None
        self.closed = self.loop.create_future()
        self.out: list[Any] = []
        self.flush_scheduled = False
        self.drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            self.hs.receive_data(data)
            self._wake()
            return
        try:
            replies = self.parser.feed(data)
        except ProtocolError as exc:
            log.error("NBD server broke the protocol: %s; disconnecting", exc)
            self.lost = ConnectionLost(f"NBD server broke the protocol: {exc}")
            assert self.transport is not None
            self.transport.abort()
            return
        waiters, calls = self.waiters, self.calls
        for reply in replies:
            fut = waiters.pop(reply.handle, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(reply)
                continue
            done = calls.pop(reply.handle, None)
            if done is None:
                continue  # expired or cancelled: a late reply
            try:
                if reply.error:
                    done(BlockError(nbd_to_errno(reply.error), reply.message or ""), None)
                else:
                    done(None, reply.data)
            except Exception:
                log.exception("completion of NBD request %d failed", reply.handle)
        if not calls and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    def _fail_calls(self, exc: BaseException) -> None:
        calls, self.calls = self.calls, {}
        for handle, done in calls.items():
            try:
                done(exc, None)
            except Exception:
                log.exception("completion of NBD request %d failed", handle)
        if self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    def cancel(self, handle: int) -> None:
        """The canceller of submitted request ``handle``: its ``done`` gets
        CancelledError now (a reply that comes later is dropped)."""
        done = self.calls.pop(handle, None)
        if done is not None:
            if not self.calls and self.idle is not None and not self.idle.done():
                self.idle.set_result(None)  # close() waits no more for it
            done(asyncio.CancelledError(), None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = ConnectionLost(f"connection to NBD server lost: {exc or 'closed'}")
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(self.lost)
        self.waiters.clear()
        self._fail_calls(self.lost)
        self._wake()
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self.drain is None or self.drain.done():
            self.drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def expire(self, handle: int, cmd: int) -> None:
        """Request ``handle`` timed out: fail it with ETIMEDOUT (a late reply is dropped)."""
        fut = self.waiters.pop(handle, None)
        if fut is not None and not fut.done():
            fut.set_exception(BlockError(errno.ETIMEDOUT, f"NBD command {cmd} timed out"))

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def wait_data(self) -> None:
        if self.lost is not None:
            raise self.lost
        self.wakeup = self.loop.create_future()
        await self.wakeup

    def send(self, *bufs: Any) -> None:
        self.out.extend(bufs)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self.out)
        self.out = []


async def _open(address: str | Address) -> tuple[Address, _Protocol]:
    addr = parse_address(address, where="NBD server address")
    loop = asyncio.get_running_loop()
    try:
        if addr.is_unix:
            _, proto = await loop.create_unix_connection(_Protocol, addr.path)
        else:
            _, proto = await loop.create_connection(_Protocol, addr.host, addr.port)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {addr}: {exc}") from exc
    return addr, proto


async def _event(proto: _Protocol) -> Any:
    while (event := proto.hs.next_event()) is None:
        await proto.wait_data()
    out = proto.hs.data_to_send()
    if out:
        assert proto.transport is not None
        proto.transport.write(out)
    return event


async def _starttls(proto: _Protocol, addr: Address, tls: ClientTlsConfig) -> TlsInfo | None:
    """STARTTLS and the TLS handshake; the protocol object goes on behind TLS."""
    context = tls.context()  # ConfigError for bad credentials, before any traffic
    reply = (await _option(proto, Opt.STARTTLS))[-1]
    if reply.reply != Rep.ACK:
        raise ServerRefused(
            f"NBD server {addr} does not offer TLS ({hsc.error_text(reply)}); "
            "not continuing in plaintext",
            reply=reply.reply,
        )
    proto.hs.begin_tls()
    assert proto.transport is not None
    try:
        transport = await proto.loop.start_tls(
            proto.transport, proto, context, server_hostname=tls.server_hostname(addr)
        )
    except ssl.SSLError as exc:
        why = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else None
        raise ConnectionLost(
            f"TLS handshake with {addr} failed: {why or exc.reason or exc}"
        ) from None
    except (OSError, EOFError) as exc:
        raise ConnectionLost(f"TLS handshake with {addr} failed: {exc or 'closed'}") from None
    if transport is None:
        raise ConnectionLost(f"TLS handshake with {addr} failed: connection closed")
    proto.transport = transport
    return session_info(transport)


async def _option(proto: _Protocol, option: int, payload: bytes = b"") -> list[OptionReply]:
    """Send one option and collect its replies up to the final one."""
    proto.hs.send_option(option, payload)
    assert proto.transport is not None
    proto.transport.write(proto.hs.data_to_send())
    replies: list[OptionReply] = []
    while True:
        reply = await _event(proto)
        assert isinstance(reply, OptionReply)
        replies.append(reply)
        if reply.final:
            return replies


class NbdClient:
    """A connected NBD export (see module docstring).  Create with :meth:`connect`."""

    def __init__(self, proto: _Protocol, address: Address, export_name: str) -> None:
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
    ) -> NbdClient:
        """Connect and negotiate.  ``export_name`` defaults to the address's export.

        Raises ConnectionLost (a BlockError) when the server cannot be reached, hangs
        up or the TLS handshake fails, ServerRefused when it refuses the export or TLS,
        ProtocolError when it breaks the protocol, TimeoutError when negotiation takes
        longer than ``timeout``, ConfigError for unusable TLS credentials.
        """
        addr = parse_address(address, where="NBD server address")
        name = addr.export if export_name is None else export_name
        async with asyncio.timeout(timeout):
            _, proto = await _open(addr)
            self = cls(proto, addr, name)
            try:
                await self._negotiate()
            except ConnectionLost as exc:
                assert proto.transport is not None
                proto.transport.abort()
                if self.tls is None:
                    raise
                raise ConnectionLost(  # TLS 1.3: a refused certificate shows up only now
                    f"{exc}: the server closed the connection after the TLS handshake "
                    "(does it want a client certificate, client-cert.pem in "
                    "tls-certificates=DIR, that it trusts?)"
                ) from None
            except BaseException:
                assert proto.transport is not None
                proto.transport.abort()
                raise
        self.timeout = request_timeout
        return self

    async def _negotiate(self) -> None:
        proto, name = self._proto, self.export_name
        await _event(proto)  # greeting
        tls = client_config(self.address)
        if tls is not None:
            self.tls = await _starttls(proto, self.address, tls)
        reply = (await _option(proto, Opt.STRUCTURED_REPLY))[-1]
        if reply.reply == Rep.ERR_TLS_REQD:
            raise ServerRefused(
                f"NBD server {self.address} requires TLS (use an nbds:// URI)", reply=reply.reply
            )
        self.structured = reply.reply == Rep.ACK
        if self.structured:
            payload = hsc.encode_meta_context(name, (BASE_ALLOCATION,))
            for r in await _option(proto, Opt.SET_META_CONTEXT, payload):
                if r.reply == Rep.META_CONTEXT:
                    ctx, ctx_name = hsc.parse_meta_context(r.payload)
                    if ctx_name == BASE_ALLOCATION:
                        self.context_id = ctx
        try:
            replies = await _option(proto, Opt.GO, hsc.encode_go(name, (Info.BLOCK_SIZE,)))
        except ConnectionLost:
            raise ServerRefused(f"NBD server {self.address} hung up on export {name!r}") from None
        final = replies[-1]
        if final.reply == Rep.ERR_UNSUP:
            await self._export_name()
        elif final.reply != Rep.ACK:
            raise ServerRefused(
                f"NBD server {self.address} refused export {name!r}: {hsc.error_text(final)}",
                reply=final.reply,
            )
        else:
            for r in replies[:-1]:
                self._info(r)
        proto.parser = proto.hs.finish(self.structured)
        proto.parser.context_id = self.context_id

    def _info(self, reply: OptionReply) -> None:
        if reply.reply != Rep.INFO:
            return
        kind, values = hsc.parse_info(reply.payload)
        if kind == Info.EXPORT and isinstance(values, tuple):
            self.size, self.flags = values
        elif kind == Info.BLOCK_SIZE and isinstance(values, tuple):
            self.min_block, self.pref_block, self.max_block = values

    async def _export_name(self) -> None:
        proto = self._proto
        proto.hs.send_option(Opt.EXPORT_NAME, self.export_name.encode("utf-8"))
        assert proto.transport is not None
        proto.transport.write(proto.hs.data_to_send())
        try:
            event = await _event(proto)
        except ConnectionLost:
            raise ServerRefused(
                f"NBD server {self.address} refused export {self.export_name!r} (EXPORT_NAME)"
            ) from None
        assert isinstance(event, ExportNameReply)
        self.size, self.flags = event.size, event.flags

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

    def _submit(
        self, cmd: int, offset: int, length: int, flags: int, data: Buffer | None, done: Done
    ) -> Cancel | None:
        """Queue a request whose reply calls ``done`` (None: not now, use the coroutine
        form -- connection lost, send buffer full, or a per-request timeout to run)."""
        proto = self._proto
        if proto.lost is not None or self.timeout is not None:
            return None
        if proto.drain is not None and not proto.drain.done():
            return None
        assert proto.parser is not None
        handle, header = proto.parser.request(cmd, offset, length, flags)
        proto.calls[handle] = done
        if data is None:
            proto.send(header)
        else:
            proto.send(header, data)
        return partial(proto.cancel, handle)

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        """:meth:`read` with a callback: ``done(None, data)`` or ``done(error, None)``."""
        if length > self.max_block:
            return None
        return self._submit(_READ, offset, length, 0, None, done)

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        """:meth:`write` with a callback: ``done(None, None)`` or ``done(error, None)``."""
        n = len(data)
        if n > self.max_block:
            return None
        flags = 0
        if fua:
            if not self.flags & _TF.SEND_FUA:
                return None
            flags = _FUA
        return self._submit(_WRITE, offset, n, flags, data, done)

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
        addr, proto = await _open(address)
        try:
            await _event(proto)
            tls = client_config(addr)
            if tls is not None:
                await _starttls(proto, addr, tls)
            replies = await _option(proto, Opt.LIST)
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
