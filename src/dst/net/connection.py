"""One NBD server connection: the asyncio protocol of its handshake and its life.

Theory of operation
-------------------
During the handshake, received bytes go to a :class:`~dst.net.negotiate.Negotiator`
(options, STARTTLS, access control), which answers from the server's export table (the
device's ``size`` is read at GO time, so a grown export is seen by new connections),
binds the export (:meth:`ServerConnection.bind`) and calls
:meth:`ServerConnection.begin_transmission`.  After STARTTLS the same protocol object
sits behind the TLS transport.  The connection knows its server only as a
:class:`~dst.net.negotiate.Server`: what it needs of it.

At the start of transmission a :class:`~dst.net.transmission.Transmission` becomes the
transport's protocol (``set_protocol``): requests, replies and backpressure are its
part, with nothing of the handshake on their way; it tells this connection when the
transport is lost.  The connection stays what the server knows of the client: it is
shut down, aborted and described (:meth:`status`) here, in either phase, and it
closes the socket it duplicated for ``SO_RCVLOWAT`` when the client goes.  A client
that has not finished its handshake in ``handshake_timeout`` seconds is dropped.

Shutdown (:meth:`ServerConnection.shutdown`): a connection still in its handshake
closes at once; one in transmission answers new requests with ESHUTDOWN and closes once
the ones in flight are answered.  Any error on one connection is logged and closes only
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Coroutine
from typing import Any, cast

from dst.device import BlockDevice
from dst.nbd.events import ExportInfo
from dst.nbd.server import ServerHandshake
from dst.net.counters import TIMEOUT
from dst.net.edge import Binding, describe_peer, tune_socket
from dst.net.negotiate import Negotiator, Server
from dst.net.tls import TlsInfo
from dst.net.transmission import Transmission, receive_failed

log = logging.getLogger(__name__)


class ServerConnection(asyncio.BufferedProtocol):
    """Serves one client (see module docstring)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peername: object = None
        self.neg: Negotiator | None = Negotiator(self)
        self.export: str | None = None  # bound export
        self.tls: TlsInfo | None = None  # the TLS session, if any
        self.lost = False
        self.bound: Binding | None = None  # the export bound at GO
        self.tx: Transmission | None = None  # the transmission phase, once begun
        self.tasks: set[asyncio.Task[None]] = set()
        self.read_paused = False  # (the client does not read the handshake's replies)
        self.closed = self.loop.create_future()
        self.scratch = bytearray(4096)  # receive buffer during the handshake
        self.hs_timer: asyncio.TimerHandle | None = None
        self.tcp: socket.socket | None = None  # for SO_RCVLOWAT (plain TCP)

    @property
    def inflight(self) -> int:
        """Requests in flight (none before transmission)."""
        return self.tx.inflight if self.tx is not None else 0

    # --- asyncio.BufferedProtocol (the handshake's; transmission has its own) ----------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.peername = transport.get_extra_info("peername")
        self.peer = describe_peer(self.peername)
        if not self.server.join(self, self.peer):
            self.lost = True
            self.transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # a socket object of our own on a duplicate of the descriptor (the
                # transport's stand-in makes a new one per call): closed when lost
                with contextlib.suppress(OSError):
                    self.tcp = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
        self.hs_timer = self.loop.call_later(self.server.handshake_timeout, self._hs_timeout)
        assert self.neg is not None
        self.transport.write(self.neg.greeting())
        self.neg.connected(self.peername)
        if self.server.closing:
            self.shutdown()

    def _hs_timeout(self) -> None:
        if self.tx is None:
            log.warning("%s: handshake not finished in time; closing", self.peer)
            self.server.counters.failed(TIMEOUT)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """The transport is gone (told by the transmission once it has begun)."""
        if self.lost:  # a failed STARTTLS may report it twice
            return
        self.lost = True
        self.server.leave(self)
        if self.tcp is not None:
            self.tcp.close()  # our duplicate only
            self.tcp = None
        if self.hs_timer is not None:
            self.hs_timer.cancel()
        for task in self.tasks:
            task.cancel()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.scratch)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.neg is not None:
                self.neg.receive(bytes(self.scratch[:nbytes]))
        except Exception as exc:
            receive_failed(self.peer, exc, self.abort)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # --- lifecycle ---------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop taking requests (ESHUTDOWN); close once in-flight ones are answered."""
        if self.tx is not None:
            self.tx.shutdown()
        elif self.transport is not None:  # still haggling: nothing to finish
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
        self.bound = Binding.of(hs, device, info, max_payload=self.server.max_payload)
        log.debug(
            "%s: export %r size %d flags 0x%x", self.peer, hs.export_name, info.size, info.flags
        )

    def begin_transmission(self, hs: ServerHandshake, *, tls: TlsInfo | None) -> None:
        """The handshake is over: the transmission serves the transport from now on."""
        self.neg = None
        self.tls = tls
        self.export = hs.export_name
        if self.hs_timer is not None:
            self.hs_timer.cancel()
        assert self.bound is not None and self.transport is not None
        tx = self.tx = Transmission(
            self, self.server, self.transport, peer=self.peer, bound=self.bound,
            parser=hs.start_transmission(max_payload=self.bound.max_block),
            tcp=self.tcp if tls is None else None,
        )  # fmt: skip
        self.transport.set_protocol(tx)
        if self.read_paused:  # the client has not read the handshake's answers: the
            tx.write_paused = tx.read_paused = True  # transport stays paused for it
        tx.start()

    async def start_tls(self, context: ssl.SSLContext) -> bool:
        """Put this protocol behind TLS (server side, the server's handshake timeout).
        False: the connection closed meanwhile.  Raises OSError, ssl.SSLError, EOFError."""
        assert self.transport is not None
        timeout = self.server.handshake_timeout
        transport = await self.loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
        )
        if transport is None:
            return False
        self.transport = transport
        self.read_paused = False  # (a pause of the plain transport is TLS's now)
        return True

    def status(self) -> dict[str, Any]:
        """This client for status displays: peer, export, TLS session."""
        tls = self.tls if self.neg is None else self.neg.info
        return {
            "peer": self.peer,
            "export": self.export,
            "state": "transmission" if self.tx is not None else "handshake",
            "tls": tls.as_dict() if tls is not None else None,
        }
