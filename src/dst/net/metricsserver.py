"""The ``/metrics`` endpoint: a tiny HTTP server on the process's event loop.

Theory of operation
-------------------
``--metrics ADDR`` (``dst serve``, ``dst daemon``, ``dst up``) starts a
:class:`MetricsServer`: an asyncio server that answers ``GET /metrics`` with the
Prometheus text format of its registry (:mod:`dst.net.metrics`), rendered on the event
loop itself -- the collectors read the devices' counters where they live,
with no thread and no lock.  One request per connection (``Connection: close``), a
request line and headers of at most 16 KiB read within :data:`READ_TIMEOUT` seconds;
anything else gets 400, 404 or 405.

``ADDR`` is ``HOST:PORT`` (``:PORT`` or ``PORT`` alone: loopback, 127.0.0.1; port 0
picks a free one).  Security, as for NBD (semantics 13): plain HTTP is served on
loopback only, unless ``--metrics-tls off`` says so; ``--metrics-tls DIR`` serves
HTTPS with ``DIR/server-cert.pem`` and ``server-key.pem`` and requires a client
certificate signed by ``DIR/ca-cert.pem`` (nbdkit's layout; ``dst certs`` makes it);
``--metrics-acl FILE`` applies allow/deny rules (``from=CIDR``, ``dn=GLOB``) to every
scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dst.errors import ConfigError
from dst.nbd.server import TlsMode
from dst.net.acl import AccessList, AclFile, Peer
from dst.net.address import DEFAULT_HOST, Address, parse_address
from dst.net.tls import ServerTls, ServerTlsConfig, is_loopback, peer_identity

if TYPE_CHECKING:  # prometheus_client is imported only where metrics are served
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

READ_TIMEOUT = 10.0  # seconds a scraper may take to send its request
MAX_HEAD = 16 << 10  # bytes of request line and headers


@dataclass(frozen=True, slots=True)
class MetricsOptions:
    """``--metrics ADDR [--metrics-tls DIR|off] [--metrics-acl FILE]``, validated."""

    address: Address
    tls: Path | None = None  # certificates directory: HTTPS, verified client certificates
    acl: Path | None = None

    @classmethod
    def from_strings(
        cls, address: str, *, tls: str | None = None, acl: str | None = None
    ) -> MetricsOptions:
        """Raises ConfigError naming the option."""
        text = f"{DEFAULT_HOST}:{address}" if address.isdigit() else address
        addr = parse_address(text, where="--metrics")
        if addr.is_unix or addr.export or ":" not in text:
            raise ConfigError(f"expected HOST:PORT or PORT, not {address!r}", where="--metrics")
        certs = None if tls in (None, "off") else Path(tls)
        if tls is None and not is_loopback(addr):
            raise ConfigError(
                f"{addr} is reachable from the network: give --metrics-tls DIR (HTTPS with "
                "client certificates), or --metrics-tls off to serve plain HTTP",
                where="--metrics",
            )
        return cls(addr, certs, Path(acl) if acl else None)

    def with_port(self, port: int) -> MetricsOptions:
        """The same on another port (``dst up``'s nodes)."""
        return MetricsOptions(Address(self.address.host, port), self.tls, self.acl)


def metrics_options(
    address: str | None, *, tls: str | None, acl: str | None
) -> MetricsOptions | None:
    """``--metrics ADDR`` with ``--metrics-tls``/``--metrics-acl`` (None without an
    address; the others need one).  Raises ConfigError."""
    if address is None:
        if tls is not None or acl is not None:
            raise ConfigError("--metrics-tls and --metrics-acl need --metrics ADDR")
        return None
    return MetricsOptions.from_strings(address, tls=tls, acl=acl)


class MetricsServer:
    """Serves ``registry`` on ``/metrics`` (module docstring).  Raises ConfigError for
    bad credentials or ACL at construction."""

    def __init__(self, registry: CollectorRegistry, options: MetricsOptions) -> None:
        self.registry = registry
        self.options = options
        self.tls: ServerTls | None = None
        if options.tls is not None:
            config = ServerTlsConfig(TlsMode.REQUIRE, certificates=options.tls, verify_peer=True)
            self.tls = ServerTls(config)
        self.acl = AclFile(options.acl) if options.acl is not None else None
        if self.acl is not None:
            self.acl.acl.check(certificates=self.tls is not None, psk=False, where="--metrics-acl")
        self.scrapes = 0
        self.denied = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: Address | None = None

    @property
    def url(self) -> str:
        """``http[s]://HOST:PORT/metrics`` once started."""
        assert self.address is not None
        host = self.address.host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.address.port}/metrics"

    async def start(self) -> str:
        """Listen; returns :attr:`url`.  Raises OSError when binding fails."""
        a = self.options.address
        ssl = self.tls.context(lambda _: None) if self.tls is not None else None
        self._server = await asyncio.start_server(
            self._serve, a.host, a.port, ssl=ssl, reuse_address=True, limit=MAX_HEAD
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = Address(host, port)
        log.info("metrics on %s", self.url)
        return self.url

    async def close(self) -> None:
        """Stop listening; scrapes being answered are cut.  Idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _access(self) -> AccessList | None:
        return self.acl.acl if self.acl is not None else None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._one(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, kind = await asyncio.wait_for(self._answer(reader, writer), READ_TIMEOUT)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, body, kind = "400 Bad Request", b"bad request\n", "text/plain"
        except ConnectionError:
            writer.close()
            return
        except Exception:  # the edge of one scrape: log the bug, answer, go on
            log.exception("metrics: scrape failed")
            status, body, kind = "500 Internal Server Error", b"internal error\n", "text/plain"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str, bytes, str]:
        """Status, body and content type for the request on ``reader``."""
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
        if not self._allowed(writer):
            self.denied += 1
            return "403 Forbidden", b"access denied\n", "text/plain"
        path = target.split("?", 1)[0]
        if method != "GET":
            return "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
        if path != "/metrics":
            return "404 Not Found", b"dst metrics are at /metrics\n", "text/plain"
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.scrapes += 1
        return "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _allowed(self, writer: asyncio.StreamWriter) -> bool:
        acl = self._access()
        if acl is None:
            return True
        sslobj = writer.get_extra_info("ssl_object")
        dn = peer_identity(sslobj) if sslobj is not None else ""
        decision = acl.decide(Peer.from_peername(writer.get_extra_info("peername"), dn=dn))
        if decision is not None and decision.allowed:
            return True
        if not self.denied % 100:  # the first, then every hundredth: scrapers repeat
            peer = writer.get_extra_info("peername")
            log.warning("metrics: %s%s denied; %d so far", peer, f" ({dn})" if dn else "",
                        self.denied + 1)  # fmt: skip
        return False
