"""What an NBD server counts about its connections, for metrics.

:class:`ServerCounters` lives on the :class:`~dst.net.server.NbdServer` and is counted
where the events happen: a connection accepted (the server), a handshake that failed
(the connection's timeout; the negotiator: a protocol violation, a refused client, a
failed TLS handshake), a TLS session established.  Connections refused for being over
``max_connections`` are the server's own ``refused``.  None of it is on the request path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TIMEOUT = "timeout"  # the handshake did not finish within handshake_timeout
PROTOCOL = "protocol"  # the client broke the protocol during the handshake
DENIED = "denied"  # the access list refused the client
TLS = "tls"  # the TLS handshake failed
REASONS = (TIMEOUT, PROTOCOL, DENIED, TLS)


@dataclass(slots=True)
class ServerCounters:
    """Connections accepted, handshakes failed by reason, TLS sessions established."""

    accepted: int = 0
    tls_handshakes: int = 0
    handshake_failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def failed(self, reason: str) -> None:
        """A handshake failed for ``reason`` (one of :data:`REASONS`)."""
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1
