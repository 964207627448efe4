"""The NBD client's connection and handshake: a byte pump and option haggling.

Theory of operation
-------------------
:func:`open_connection` opens a TCP or unix connection whose asyncio protocol, a
:class:`ClientProtocol`, pumps bytes between the transport and the codec: during the
handshake into the sans-IO :class:`~dst.nbd.client.ClientHandshake` (:func:`next_event`
waits for its next event, :func:`option` sends one option and collects its replies), in
transmission into the :class:`~dst.nbd.replies.ReplyParser`, whose replies resolve the
futures of waiting requests or call the ``done`` of submitted ones.  Requests are
queued with :meth:`ClientProtocol.send` and go out in one ``writelines`` per loop
iteration.  Losing the connection (or a server breaking the protocol) fails every
request in flight with :class:`ConnectionLost`.  :mod:`dst.net.client` builds the
requests on this.

:func:`negotiate` runs the handshake: fixed newstyle + NO_ZEROES, STRUCTURED_REPLY,
SET_META_CONTEXT base:allocation, then GO asking for block sizes (EXPORT_NAME when the
server does not know GO), and returns what it learnt as an :class:`Export`.  A refusal
raises :class:`dst.errors.ServerRefused` naming the export and the server's reply.

An ``nbds`` address sends NBD_OPT_STARTTLS first and insists on its ACK (no downgrade:
a server that will not do TLS is a ServerRefused), upgrades the transport with
``loop.start_tls`` (after the codec checked the server sent nothing past its ACK) and
negotiates everything else inside TLS.  A failed TLS handshake (unknown CA, wrong
host name, a refused client certificate) is a ConnectionLost naming the reason.  A
plain client meeting a server that requires TLS gets a ServerRefused saying so.

A TCP connection can carry :class:`Keepalive` (TCP keepalive with short intervals, and
``TCP_USER_TIMEOUT`` for data left unacknowledged), so a peer cut off by the network is
given up in bounded time even without I/O (:attr:`ClientProtocol.closed` resolves).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from dst.device import Done
from dst.errors import BlockError, ProtocolError, ServerRefused
from dst.nbd import client as hsc
from dst.nbd.constants import BASE_ALLOCATION, Info, Opt, Rep, nbd_to_errno
from dst.nbd.events import ExportNameReply, OptionReply, Reply
from dst.nbd.replies import ReplyParser
from dst.net.address import Address, parse_address
from dst.net.edge import tune_socket
from dst.net.tls import ClientTlsConfig, TlsInfo, client_config, session_info

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Keepalive:
    """TCP keepalive for a connection whose peer may fall silent: the first probe after
    ``idle`` seconds without traffic, then every ``interval`` seconds, ``count`` probes;
    unacknowledged data aborts the connection after the same total (TCP_USER_TIMEOUT)."""

    idle: float = 5.0
    interval: float = 1.0
    count: int = 5

    @property
    def bound(self) -> float:
        """Seconds after which a silent peer is given up (idle or not)."""
        return self.idle + self.interval * self.count

    def apply(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", max(1, round(self.idle))),
            ("TCP_KEEPINTVL", max(1, round(self.interval))),
            ("TCP_KEEPCNT", max(1, self.count)),
            ("TCP_USER_TIMEOUT", max(1, round(self.bound * 1000))),
        ):
            opt = getattr(socket, name, None)
            if opt is not None:  # Linux has them all
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)


MEMBER_KEEPALIVE = Keepalive()  # the array's connections to its nodes


class ConnectionLost(BlockError):
    """The connection to the server is gone; in-flight requests failed with EIO."""

    def __init__(self, message: str = "connection to NBD server lost") -> None:
        super().__init__(errno.EIO, message)


class ClientProtocol(asyncio.Protocol):
    """Byte pump between the transport and the codec of one client (module docstring)."""

    def __init__(self, keepalive: Keepalive | None = None) -> None:
        self.keepalive = keepalive
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
        self.on_lost: list[Callable[[], None]] = []  # told first when the connection goes
        self.out: list[Any] = []
        self.flush_scheduled = False
        self.drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)  # (a mirror's 1 MiB writes: a few in the kernel at once)
            if self.keepalive is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                self.keepalive.apply(sock)

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
        for r in replies:
            if isinstance(r, int):  # its handle: a success with no data (a WRITE's)
                handle, reply = r, None
            else:
                handle, reply = r.handle, r
            if waiters:
                fut = waiters.pop(handle, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(Reply(handle) if reply is None else reply)
                    continue
            done = calls.pop(handle, None)
            if done is None:
                continue  # expired or cancelled: a late reply
            try:
                if reply is None:
                    done(None, None)
                elif reply.error:
                    done(BlockError(nbd_to_errno(reply.error), reply.message or ""), None)
                else:
                    done(None, reply.data)
            except Exception:
                log.exception("completion of NBD request %d failed", handle)
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
        hooks, self.on_lost = self.on_lost, []
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("a connection-lost hook failed")
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


async def open_connection(
    address: str | Address, keepalive: Keepalive | None = None
) -> tuple[Address, ClientProtocol]:
    """Connect to ``address`` (``keepalive`` for TCP).  Raises ConnectionLost when it
    cannot be reached."""
    addr = parse_address(address, where="NBD server address")
    loop = asyncio.get_running_loop()
    factory = partial(ClientProtocol, keepalive)
    try:
        if addr.is_unix:
            _, proto = await loop.create_unix_connection(factory, addr.path)
        else:
            _, proto = await loop.create_connection(factory, addr.host, addr.port)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {addr}: {exc}") from exc
    return addr, proto


async def next_event(proto: ClientProtocol) -> Any:
    """The handshake codec's next event (its answer, if any, sent).  Raises
    ConnectionLost, ProtocolError."""
    while (event := proto.hs.next_event()) is None:
        await proto.wait_data()
    out = proto.hs.data_to_send()
    if out:
        assert proto.transport is not None
        proto.transport.write(out)
    return event


async def starttls(proto: ClientProtocol, addr: Address, tls: ClientTlsConfig) -> TlsInfo | None:
    """STARTTLS and the TLS handshake; the protocol object goes on behind TLS."""
    context = tls.context()  # ConfigError for bad credentials, before any traffic
    reply = (await option_replies(proto, Opt.STARTTLS))[-1]
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


async def option_replies(
    proto: ClientProtocol, opt: int, payload: bytes = b""
) -> list[OptionReply]:
    """Send one option and collect its replies up to the final one."""
    proto.hs.send_option(opt, payload)
    assert proto.transport is not None
    proto.transport.write(proto.hs.data_to_send())
    replies: list[OptionReply] = []
    while True:
        reply = await next_event(proto)
        assert isinstance(reply, OptionReply)
        replies.append(reply)
        if reply.final:
            return replies


@dataclass(slots=True)
class Export:
    """What the handshake learnt of the export: size, transmission flags, structured
    replies, the base:allocation context id (0: none), block sizes, the TLS session."""

    size: int = 0
    flags: int = 0
    structured: bool = False
    context_id: int = 0
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 32 << 20
    tls: TlsInfo | None = None


async def negotiate(proto: ClientProtocol, address: Address, name: str) -> Export:
    """The handshake for export ``name`` (module docstring), from the greeting to
    transmission: the protocol's reply parser is set on return.

    Raises ConnectionLost, ServerRefused, ProtocolError, ConfigError (unusable TLS
    credentials).
    """
    await next_event(proto)  # greeting
    found = Export()
    tls = client_config(address)
    if tls is not None:
        found.tls = await starttls(proto, address, tls)
    try:
        await _options(proto, address, name, found)
    except ConnectionLost as exc:
        if found.tls is None:
            raise
        raise ConnectionLost(  # TLS 1.3: a refused certificate shows up only now
            f"{exc}: the server closed the connection after the TLS handshake "
            "(does it want a client certificate, client-cert.pem in "
            "tls-certificates=DIR, that it trusts?)"
        ) from None
    return found


async def _options(proto: ClientProtocol, address: Address, name: str, found: Export) -> None:
    reply = (await option_replies(proto, Opt.STRUCTURED_REPLY))[-1]
    if reply.reply == Rep.ERR_TLS_REQD:
        raise ServerRefused(
            f"NBD server {address} requires TLS (use an nbds:// URI)", reply=reply.reply
        )
    found.structured = reply.reply == Rep.ACK
    if found.structured:
        payload = hsc.encode_meta_context(name, (BASE_ALLOCATION,))
        for r in await option_replies(proto, Opt.SET_META_CONTEXT, payload):
            if r.reply == Rep.META_CONTEXT:
                ctx, ctx_name = hsc.parse_meta_context(r.payload)
                if ctx_name == BASE_ALLOCATION:
                    found.context_id = ctx
    try:
        replies = await option_replies(proto, Opt.GO, hsc.encode_go(name, (Info.BLOCK_SIZE,)))
    except ConnectionLost:
        raise ServerRefused(f"NBD server {address} hung up on export {name!r}") from None
    final = replies[-1]
    if final.reply == Rep.ERR_UNSUP:
        await _export_name(proto, address, name, found)
    elif final.reply != Rep.ACK:
        raise ServerRefused(
            f"NBD server {address} refused export {name!r}: {hsc.error_text(final)}",
            reply=final.reply,
        )
    else:
        for r in replies[:-1]:
            _info(r, found)
    proto.parser = proto.hs.finish(found.structured)
    proto.parser.context_id = found.context_id


def _info(reply: OptionReply, found: Export) -> None:
    if reply.reply != Rep.INFO:
        return
    kind, values = hsc.parse_info(reply.payload)
    if kind == Info.EXPORT and isinstance(values, tuple):
        found.size, found.flags = values
    elif kind == Info.BLOCK_SIZE and isinstance(values, tuple):
        found.min_block, found.pref_block, found.max_block = values


async def _export_name(proto: ClientProtocol, address: Address, name: str, found: Export) -> None:
    proto.hs.send_option(Opt.EXPORT_NAME, name.encode("utf-8"))
    assert proto.transport is not None
    proto.transport.write(proto.hs.data_to_send())
    try:
        event = await next_event(proto)
    except ConnectionLost:
        raise ServerRefused(f"NBD server {address} refused export {name!r} (EXPORT_NAME)") from None
    assert isinstance(event, ExportNameReply)
    found.size, found.flags = event.size, event.flags
