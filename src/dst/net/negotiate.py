"""The handshake phase of one server connection: options, STARTTLS, access control.

Theory of operation
-------------------
A :class:`Negotiator` drives the sans-IO :class:`~dst.nbd.server.ServerHandshake` for
its connection (:class:`~dst.net.connection.ServerConnection`, typed here by what the
negotiator needs of it, :class:`Negotiating`) and answers its events from the server's
export table, TLS credentials and access list (:class:`Exports`).  When an export is
bound it hands over with :meth:`Negotiating.begin_transmission`.

STARTTLS.  Accepting it pauses reading on the plain transport *before* the ACK is
written, so nothing the client sends next (its TLS ClientHello) can reach the codec as
plaintext; bytes that had already arrived with the STARTTLS are a violation the codec
reports (the connection is closed, nothing is kept or awaited).  A task then runs
``loop.start_tls``; the TLS layer may deliver decrypted options before that task
resumes, so they are held (:attr:`early`) and fed once the codec knows the session is
TLS.  A failed TLS handshake (garbage, truncation, an unknown CA, an expired or revoked
certificate, a timeout) is logged in one line and closes this connection only.

Access control.  At connect time the access list decides from the client address if it
can (a denied address gets ERR_POLICY for every option, TLS included); otherwise the
first option that could reveal or reach an export (LIST, INFO, GO, EXPORT_NAME, meta
contexts) decides with the identity TLS established -- the certificate subject or the
PSK identity.  A refusal is logged once per connection, and no export data is sent.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from dst.device import BlockDevice
from dst.errors import ProtocolError
from dst.nbd.constants import BASE_ALLOCATION, Rep
from dst.nbd.events import (
    Aborted,
    ExportInfo,
    ExportNameRequest,
    InfoRequest,
    ListRequest,
    MetaContextRequest,
    ServerEvent,
    StartTlsRequest,
)
from dst.nbd.server import ServerHandshake, TlsMode
from dst.net import counters
from dst.net.acl import AccessList, Decision, Peer
from dst.net.edge import transmission_flags
from dst.net.tls import ServerTls, TlsInfo, session_info

if TYPE_CHECKING:
    from dst.net.budget import Budget

log = logging.getLogger(__name__)


class Exports(Protocol):
    """What negotiation needs of the server: its export table, TLS and access list."""

    @property
    def tls(self) -> ServerTls | None: ...
    @property
    def closing(self) -> bool: ...
    @property
    def handshake_timeout(self) -> float: ...
    @property
    def counters(self) -> counters.ServerCounters: ...
    def access(self) -> AccessList | None: ...
    def export_list(self) -> list[tuple[str, str]]: ...
    def lookup(self, name: str) -> BlockDevice | None: ...
    def requires_tls(self, name: str) -> bool: ...


class Negotiating(Protocol):
    """What the negotiator needs of its connection."""

    @property
    def server(self) -> Exports: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...
    @property
    def peer(self) -> str: ...
    @property
    def peername(self) -> object: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...
    def bind(self, hs: ServerHandshake, device: BlockDevice, info: ExportInfo) -> None: ...
    def begin_transmission(self, hs: ServerHandshake, *, tls: TlsInfo | None) -> None: ...
    async def start_tls(self, context: ssl.SSLContext) -> bool: ...
    def abort(self) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...


class Negotiator:
    """Option haggling for one connection (see module docstring)."""

    def __init__(self, conn: Negotiating) -> None:
        self.conn = conn
        tls = conn.server.tls
        self.hs = ServerHandshake(tls=tls.mode if tls is not None else TlsMode.OFF)
        self.upgrading = False  # start_tls running: decrypted bytes go to ``early``
        self.early: list[bytes] = []
        self.info: TlsInfo | None = None  # the TLS session, once established
        self.psk = ""
        self.decision: Decision | None = None

    def greeting(self) -> bytes:
        return self.hs.data_to_send()

    def connected(self, peername: object) -> None:
        """Decide from the address alone when the access list can."""
        acl = self.conn.server.access()
        if acl is None:
            return
        known = self.hs.tls_mode is TlsMode.OFF  # no identity will ever come
        decision = acl.decide(Peer.from_peername(peername), identity_known=known)
        if decision is not None:
            self._decided(decision)

    def receive(self, data: bytes) -> None:
        """Bytes from the client.  Raises ProtocolError."""
        if self.upgrading:
            self.early.append(data)
            return
        try:
            self.hs.receive_data(data)
            self._step()
        except ProtocolError:
            self.conn.server.counters.failed(counters.PROTOCOL)
            raise

    # --- driving the codec ------------------------------------------------------------

    def _step(self) -> None:
        hs, conn = self.hs, self.conn
        transport = conn.transport
        assert transport is not None
        upgrade = False
        while (event := hs.next_event()) is not None:
            upgrade = self._answer(event) or upgrade
        if upgrade:
            transport.pause_reading()  # before the ACK: see module docstring
        out = hs.data_to_send()
        if out:
            transport.write(out)
        if hs.closed:
            if hs.close_reason:
                log.info("%s: %s; closing", conn.peer, hs.close_reason)
            transport.close()
        elif upgrade:
            self.upgrading = True
            conn.spawn(self._upgrade())
        elif hs.in_transmission:
            conn.begin_transmission(hs, tls=self.info)

    def _answer(self, event: ServerEvent) -> bool:
        """Answer one event; True when it was an accepted STARTTLS."""
        hs, server = self.hs, self.conn.server
        if isinstance(event, Aborted):
            return False
        if server.closing:
            hs.refuse(Rep.ERR_SHUTDOWN, "server is shutting down")
            return False
        if isinstance(event, StartTlsRequest):
            if self.decision is not None and not self.decision.allowed:
                hs.deny("access denied")
                return False
            hs.accept_starttls()
            return True
        if not self._allowed():
            return False
        tls_ok = hs.tls_active or hs.tls_mode is not TlsMode.ON
        if isinstance(event, ListRequest):
            names = server.export_list()
            hs.send_export_list([e for e in names if tls_ok or not server.requires_tls(e[0])])
            return False
        name = event.export_name if isinstance(event, MetaContextRequest) else event.name
        device = server.lookup(name)
        if device is None:
            log.info("%s: no export %r", self.conn.peer, name)
            hs.refuse(Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return False
        if not tls_ok and server.requires_tls(name):
            hs.refuse(Rep.ERR_TLS_REQD, f"export {name!r} requires TLS")
            return False
        if isinstance(event, MetaContextRequest):
            hs.send_meta_contexts((BASE_ALLOCATION,))
            return False
        caps = device.caps
        flags = transmission_flags(device, structured=hs.structured_replies)
        info = ExportInfo(
            device.size, flags, device.name, caps.min_block, caps.pref_block, caps.max_block
        )
        hs.accept_export(info)
        if isinstance(event, ExportNameRequest) or (isinstance(event, InfoRequest) and event.go):
            self.conn.bind(hs, device, info)
        return False

    # --- access control ---------------------------------------------------------------

    def _allowed(self) -> bool:
        """Decide (once) with the identity known now; deny refuses the pending option."""
        if self.decision is None:
            acl = self.conn.server.access()
            if acl is None:
                return True
            info = self.info
            peer = Peer.from_peername(
                self.conn.peername, dn=info.dn if info else "", psk=info.psk if info else ""
            )
            decision = acl.decide(peer)
            assert decision is not None
            self._decided(decision)
        assert self.decision is not None
        if not self.decision.allowed:
            self.hs.deny("access denied")
        return self.decision.allowed

    def _decided(self, decision: Decision) -> None:
        self.decision = decision
        if decision.allowed:
            return
        self.conn.server.counters.failed(counters.DENIED)
        who = self.conn.peer
        if self.info is not None and (self.info.dn or self.info.psk):
            who += f" ({self.info.dn or 'psk ' + self.info.psk})"
        log.warning("%s: access denied (%s); refusing", who, decision.reason)
        self.hs.deny("access denied")

    # --- STARTTLS -----------------------------------------------------------------------

    def _on_psk(self, identity: str) -> None:
        self.psk = identity

    async def _upgrade(self) -> None:
        conn = self.conn
        tls = conn.server.tls
        assert tls is not None and conn.transport is not None
        try:
            upgraded = await conn.start_tls(tls.context(self._on_psk))
        except (OSError, ssl.SSLError, EOFError) as exc:
            log.warning("%s: TLS handshake failed: %s; closing", conn.peer, _why(exc))
            conn.server.counters.failed(counters.TLS)
            conn.connection_lost(None)
            return
        except Exception:  # a connection edge: a bug, logged; the others go on
            log.exception("%s: unexpected error during the TLS handshake; closing", conn.peer)
            conn.abort()
            conn.connection_lost(None)
            return
        if not upgraded:  # closed meanwhile
            conn.connection_lost(None)
            return
        assert conn.transport is not None
        conn.server.counters.tls_handshakes += 1
        self.upgrading = False
        self.info = session_info(conn.transport, psk=self.psk)
        self.hs.tls_established()
        info = self.info
        if info is not None:
            who = info.dn or (f"psk {info.psk}" if info.psk else "no certificate")
            log.info("%s: %s %s, peer %s", conn.peer, info.version, info.cipher, who)
        early, self.early = self.early, []
        try:
            for chunk in early:
                self.hs.receive_data(chunk)
            self._step()
        except ProtocolError as exc:
            log.warning("%s: protocol error: %s; closing", conn.peer, exc)
            conn.server.counters.failed(counters.PROTOCOL)
            conn.abort()
        except Exception:
            log.exception("%s: unexpected error; closing", conn.peer)
            conn.abort()


def _why(exc: BaseException) -> str:
    """One line: the certificate check that failed, the TLS alert, or the error."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__


class Server(Exports, Protocol):
    """What a connection needs of its server (:class:`~dst.net.server.NbdServer`):
    the export table, TLS and access list (:class:`Exports`), the limits, and the set
    of live connections it joins and leaves."""

    @property
    def max_inflight(self) -> int: ...
    @property
    def max_payload(self) -> int: ...
    @property
    def budget(self) -> Budget: ...
    @property
    def stall_timeout(self) -> float: ...

    def join(self, conn: Any, peer: str) -> bool:
        """Count ``conn`` among the live connections; False (and logged) when the
        server already serves ``max_connections``."""

    def leave(self, conn: Any) -> None: ...
