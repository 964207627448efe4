"""asyncio NBD server: serves BlockDevices by export name on TCP and unix sockets.

Theory of operation
-------------------
:class:`NbdServer` owns an export table (name -> device; ``""`` is the default export)
and any number of listeners.  Each accepted connection is a
:class:`~dst.net.connection.ServerConnection` protocol; the server only keeps the set
of live connections for shutdown.  The table may change while serving
(:meth:`set_export`); a connection binds its device at GO time.

Security: ``tls`` (:class:`~dst.net.tls.ServerTls`) sets the STARTTLS mode and
credentials, ``tls_only`` names exports that need TLS when the mode is ``on`` (they are
left out of LIST before the upgrade), and ``acl`` (an :class:`~dst.net.acl.AccessList`,
or an :class:`~dst.net.acl.AclFile` that :meth:`reload` re-reads) decides who may
connect; :mod:`dst.net.negotiate` applies them.  :meth:`clients` lists the live
connections with their TLS session and peer identity.

Resources: every connection's payload bytes are charged to a :class:`~dst.net.budget.
Budget` (the process's by default), at most ``max_connections`` clients are served at
once (more are closed at accept, logged), and a client that stops reading its replies or
sending a payload it announced for ``stall_timeout`` seconds is dropped.

``await close()``: stop accepting, tell every connection to finish its in-flight
requests (new ones get ESHUTDOWN), wait for them to close -- aborting the stragglers
after ``timeout`` -- and remove unix socket files we created.

Usage::

    server = NbdServer({"disk": device})
    addresses = await server.start("127.0.0.1:0", "unix:/run/dst.sock")
    ...
    await server.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Collection, Mapping
from types import TracebackType
from typing import Any

from dst.device import BlockDevice
from dst.net import budget as budgets
from dst.net.acl import AccessList, AclFile
from dst.net.address import Address, parse_address
from dst.net.budget import DEFAULT_STALL_TIMEOUT, Budget
from dst.net.connection import ServerConnection
from dst.net.counters import ServerCounters
from dst.net.tls import ServerTls

log = logging.getLogger(__name__)


class NbdServer:
    """An NBD server for one or more exports (see module docstring)."""

    def __init__(
        self,
        exports: Mapping[str, BlockDevice] | BlockDevice,
        *,
        default: str | None = None,
        max_inflight: int = 128,
        max_payload: int = 32 << 20,
        handshake_timeout: float = 30.0,
        budget: Budget | None = None,
        max_connections: int | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        tls: ServerTls | None = None,
        tls_only: Collection[str] = (),
        acl: AccessList | AclFile | None = None,
    ) -> None:
        if isinstance(exports, BlockDevice):
            exports = {"": exports}
        self.exports: dict[str, BlockDevice] = dict(exports)
        self.default = default
        self.max_inflight = max_inflight
        self.max_payload = max_payload
        self.handshake_timeout = handshake_timeout  # idle negotiations are dropped
        self.budget = budget if budget is not None else budgets.DEFAULT
        # more clients than this are refused at once
        self.max_connections = max_connections or budgets.MAX_CONNECTIONS
        self.stall_timeout = stall_timeout  # a client that reads or sends nothing more
        self.refused = 0  # connections refused over max_connections
        self.counters = ServerCounters()  # accepted, handshake failures, TLS (metrics)
        self.tls = tls
        self.tls_only = frozenset(tls_only)
        self.acl = acl
        self.connections: set[ServerConnection] = set()
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._addresses: list[Address] = []
        self._unix_paths: list[str] = []

    # --- exports ----------------------------------------------------------------------

    def set_export(self, name: str, device: BlockDevice) -> None:
        """Add or replace an export; existing connections keep their device."""
        self.exports[name] = device

    def remove_export(self, name: str) -> None:
        self.exports.pop(name, None)

    def lookup(self, name: str) -> BlockDevice | None:
        """The device for ``name``; ``""`` falls back to the ``default`` export."""
        device = self.exports.get(name)
        if device is None and name == "" and self.default is not None:
            device = self.exports.get(self.default)
        return device

    def export_list(self) -> list[tuple[str, str]]:
        return [(name, dev.name) for name, dev in sorted(self.exports.items())]

    def requires_tls(self, name: str) -> bool:
        """Whether export ``name`` (``""``: the default) is TLS-only."""
        if name == "" and name not in self.exports and self.default is not None:
            name = self.default
        return name in self.tls_only

    # --- security ---------------------------------------------------------------------

    def access(self) -> AccessList | None:
        """The access list in force (None: everyone may connect)."""
        acl = self.acl
        return acl.acl if isinstance(acl, AclFile) else acl

    def reload(self) -> dict[str, Any]:
        """Re-read the ACL file and the TLS credentials (SIGHUP).  Existing connections
        keep what they negotiated.  Raises ConfigError; what failed to load is left as
        it was."""
        done: dict[str, Any] = {}
        if isinstance(self.acl, AclFile):
            done["acl"] = str(self.acl.path)
            done["rules"] = self.acl.reload()
        if self.tls is not None:
            self.tls.reload()
            done["tls"] = self.tls.mode.value
        return done

    def clients(self) -> list[dict[str, Any]]:
        """Every live connection: peer, export, state and TLS session (or None)."""
        return [c.status() for c in sorted(self.connections, key=lambda c: c.peer)]

    # --- listening --------------------------------------------------------------------

    @property
    def addresses(self) -> list[Address]:
        """The bound addresses (real ports when 0 was asked)."""
        return list(self._addresses)

    async def start(self, *addresses: str | Address) -> list[Address]:
        """Listen on each address ("host:port", "unix:/path", ...).  Returns the bound
        addresses.  Raises ConfigError for bad addresses, OSError when binding fails."""
        loop = asyncio.get_running_loop()
        bound: list[Address] = []
        for spec in addresses:
            addr = parse_address(spec, where="listen address")
            if addr.is_unix:
                _remove_stale_socket(addr.path)
                srv = await loop.create_unix_server(self._factory, addr.path)
                self._unix_paths.append(addr.path)
                bound.append(Address(path=addr.path))
            else:
                srv = await loop.create_server(
                    self._factory, addr.host, addr.port, reuse_address=True
                )
                for sock in srv.sockets:
                    host, port = sock.getsockname()[:2]
                    bound.append(Address(host=host, port=port))
            self._servers.append(srv)
        self._addresses += bound
        log.info("NBD server listening on %s", ", ".join(map(str, bound)))
        return bound

    def join(self, conn: ServerConnection, peer: str) -> bool:
        """A client connected: serve it unless ``max_connections`` are served already
        (then it is refused, logged now and then)."""
        if len(self.connections) < self.max_connections:
            self.connections.add(conn)
            return True
        self.refused += 1
        if self.refused == 1 or self.refused % 100 == 0:
            log.warning("%s: refused: %d clients already (max_connections); %d refused so far",
                        peer, len(self.connections), self.refused)  # fmt: skip
        return False

    def leave(self, conn: ServerConnection) -> None:
        self.connections.discard(conn)

    def _factory(self) -> ServerConnection:
        self.counters.accepted += 1
        return ServerConnection(self)

    async def serve_forever(self) -> None:
        """Wait until :meth:`close` is called."""
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    async def close(self, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Graceful shutdown (see module docstring).  Idempotent."""
        self.closing = True
        for srv in self._servers:
            srv.close()
        conns = list(self.connections)
        for conn in conns:
            conn.shutdown()
        if conns:
            waits = [c.closed for c in conns]
            await asyncio.wait(waits, timeout=timeout)
            for conn in conns:
                if not conn.closed.done():
                    log.warning("%s: did not finish in %.0fs; aborting", conn.peer, timeout)
                    conn.abort()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _remove_stale_socket(path: str) -> None:
    """Remove a leftover socket file nobody listens on (refuse to touch other files)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(f"{path}: another server is listening there")
    finally:
        probe.close()
