"""TLS for NBD: credentials in nbdkit's layout, SSL contexts, peer identities.

Theory of operation
-------------------
Both hops use NBD's STARTTLS (the codecs in :mod:`dst.nbd` say when); this module only
turns files into :class:`ssl.SSLContext` objects and certificates into names.

A credentials directory uses the layout nbdkit, qemu and libnbd share (GnuTLS's)::

    ca-cert.pem                  the CA that signs peers (needed to verify them)
    server-cert.pem server-key.pem   a server's certificate and key
    client-cert.pem client-key.pem   a client's certificate and key (optional)
    ca-crl.pem                   optional revocation list, checked for the peer

:class:`ServerTlsConfig` is what ``--tls``/``--tls-certificates``/``--tls-verify-peer``
/``--tls-psk`` (or an array's ``[array.tls]``) say; :class:`ServerTls` is it loaded
(``reload()`` re-reads the files; on error the old credentials stay).
:class:`ClientTlsConfig` is the client side of an ``nbds://`` URI.  Contexts allow TLS
1.2 and later only.  A server verifying peers requires a client certificate signed by
the CA, unexpired and not revoked (OpenSSL checks all of it during the handshake); a
client verifies the server's chain and, on TCP, its name against the URI's host.

TLS-PSK (``username:hexkey`` lines, as nbdkit's ``--tls-psk``) needs the PSK callbacks
of Python 3.13; on older Pythons asking for it is a one-line ConfigError.  A PSK
server context is made per connection so that the identity the client used is known.

Identities: :func:`peer_identity` gives the client certificate's subject as an RFC 4514
string (``CN=array,O=dst``, the form qemu's authz uses), via ``cryptography``.

Every problem with a file is a :class:`~dst.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dst.errors import ConfigError
from dst.nbd.server import TlsMode
from dst.net.address import Address

log = logging.getLogger(__name__)

CA_CERT, CA_CRL = "ca-cert.pem", "ca-crl.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"

PSK_SUPPORTED = hasattr(ssl.SSLContext, "set_psk_server_callback")  # Python 3.13+


def parse_mode(text: str, *, where: str = "--tls") -> TlsMode:
    """``off``, ``on`` or ``require``.  Raises ConfigError."""
    try:
        return TlsMode(text)
    except ValueError:
        raise ConfigError(f"{text!r}: use off, on or require", where=where) from None


def _need_psk(where: str) -> None:
    if not PSK_SUPPORTED:
        v = sys.version_info
        raise ConfigError(
            f"TLS-PSK needs Python 3.13 or later (this is {v.major}.{v.minor}); "
            "use X.509 certificates (--tls-certificates)",
            where=where,
        )


def read_psk_file(path: Path) -> dict[str, bytes]:
    """``username:hexkey`` lines (blank lines and ``#`` comments allowed).

    Raises ConfigError naming the file and line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read PSK file: {e}", where=str(path)) from None
    keys: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hexkey = line.partition(":")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            key = b""
        if not sep or not user or not key:
            raise ConfigError("expected USERNAME:HEXKEY", where=f"{path}:{n}")
        keys[user] = key
    if not keys:
        raise ConfigError("no keys in PSK file", where=str(path))
    return keys


def _file(directory: Path, name: str, *, what: str) -> str:
    path = directory / name
    if not path.is_file():
        raise ConfigError(f"{what} {path} is missing", where=str(directory))
    return str(path)


def _base_context(purpose: int) -> ssl.SSLContext:
    side = ssl.PROTOCOL_TLS_SERVER if purpose == 0 else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def _load_ca(ctx: ssl.SSLContext, directory: Path, *, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=_file(directory, CA_CERT, what=what))
        crl = directory / CA_CRL
        if crl.is_file():
            ctx.load_verify_locations(cafile=str(crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except ssl.SSLError as e:
        raise ConfigError(f"bad CA certificate or CRL: {e}", where=str(directory)) from None


def _load_pair(ctx: ssl.SSLContext, directory: Path, cert: str, key: str) -> None:
    cert_path = _file(directory, cert, what="certificate")
    key_path = _file(directory, key, what="private key")
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as e:
        why = getattr(e, "reason", None) or e.strerror or str(e)
        raise ConfigError(f"cannot load {cert} with {key}: {why}", where=str(directory)) from None


# --- server ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerTlsConfig:
    """A server's TLS settings (validated by :meth:`check`)."""

    mode: TlsMode = TlsMode.OFF
    certificates: Path | None = None
    verify_peer: bool = False
    psk_file: Path | None = None

    def check(self, *, where: str = "--tls") -> None:
        """Raises ConfigError for settings that cannot work together."""
        if self.mode is TlsMode.OFF:
            if self.certificates or self.psk_file or self.verify_peer:
                raise ConfigError("certificates, PSK or peer verification given with TLS off",
                                  where=where)  # fmt: skip
            return
        if self.certificates and self.psk_file:
            raise ConfigError("use certificates or a PSK file, not both", where=where)
        if not self.certificates and not self.psk_file:
            raise ConfigError("TLS needs a certificates directory or a PSK file", where=where)
        if self.psk_file:
            _need_psk(where)
            if self.verify_peer:
                raise ConfigError("peer verification is for certificates, not PSK", where=where)


class ServerTls:
    """Loaded server credentials (see module docstring).  Raises ConfigError."""

    def __init__(self, config: ServerTlsConfig) -> None:
        config.check()
        self.config = config
        self._ctx: ssl.SSLContext | None = None
        self._psk: dict[str, bytes] = {}
        self._load()

    @property
    def mode(self) -> TlsMode:
        return self.config.mode

    def _load(self) -> None:
        c = self.config
        if c.psk_file is not None:
            self._psk = read_psk_file(c.psk_file)
            return
        assert c.certificates is not None
        ctx = _base_context(0)
        _load_pair(ctx, c.certificates, SERVER_CERT, SERVER_KEY)
        if c.verify_peer:
            _load_ca(ctx, c.certificates, what="CA certificate (needed to verify clients)")
            ctx.verify_mode = ssl.CERT_REQUIRED
        self._ctx = ctx

    def reload(self) -> None:
        """Re-read the credentials; on error the old ones stay.  Raises ConfigError."""
        old = self._ctx, self._psk
        try:
            self._load()
        except ConfigError:
            self._ctx, self._psk = old
            raise

    def context(self, on_psk: Callable[[str], None]) -> ssl.SSLContext:
        """The context for one connection; ``on_psk`` hears the PSK identity used."""
        if self._ctx is not None:
            return self._ctx
        ctx = _base_context(0)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # Python's PSK callbacks: TLS 1.2
        ctx.set_ciphers("PSK")
        keys = self._psk

        def lookup(identity: str | None) -> bytes:
            key = keys.get(identity or "", b"")
            if key:
                on_psk(identity or "")
            return key

        getattr(ctx, "set_psk_server_callback")(lookup)  # noqa: B009 (3.13+ only)
        return ctx


# --- client ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientTlsConfig:
    """The client side of an ``nbds://`` URI (libnbd's query parameters)."""

    certificates: Path | None = None  # None: the system's CAs, no client certificate
    verify_peer: bool = True
    hostname: str | None = None  # name to check in the server's certificate
    psk_file: Path | None = None
    username: str = ""

    def context(self) -> ssl.SSLContext:
        """A fresh client context.  Raises ConfigError."""
        ctx = _base_context(1)
        if self.psk_file is not None:
            _need_psk("tls-psk-file")
            keys = read_psk_file(self.psk_file)
            user = self.username or next(iter(keys))
            if user not in keys:
                raise ConfigError(f"no key for user {user!r}", where=str(self.psk_file))
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("PSK")
            psk = (user, keys[user])
            getattr(ctx, "set_psk_client_callback")(lambda hint: psk)  # noqa: B009
            return ctx
        d = self.certificates
        if not self.verify_peer:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif d is None:
            ctx.load_default_certs()
        else:
            _load_ca(ctx, d, what="CA certificate (needed to verify the server)")
        if d is not None and ((d / CLIENT_CERT).exists() or (d / CLIENT_KEY).exists()):
            _load_pair(ctx, d, CLIENT_CERT, CLIENT_KEY)
        return ctx

    def server_hostname(self, address: Address) -> str | None:
        """The name to verify: ``tls-hostname``, else the TCP host; None on a unix
        socket without one (the chain is still verified)."""
        if self.hostname:
            return self.hostname
        return None if address.is_unix else address.host


# --- identities ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What a TLS session says about the peer (for access control and status)."""

    version: str
    cipher: str
    dn: str = ""  # the peer certificate's subject (RFC 4514), "" without one
    psk: str = ""  # the PSK identity used

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": self.version, "cipher": self.cipher}
        if self.dn:
            d["peer"] = self.dn
        if self.psk:
            d["psk"] = self.psk
        return d


def peer_identity(sslobj: Any) -> str:
    """The RFC 4514 subject of the peer's certificate, or "" when it sent none."""
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        return ""
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def session_info(transport: Any, *, psk: str = "") -> TlsInfo | None:
    """:class:`TlsInfo` of a TLS transport (None for a plain one)."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    cipher = sslobj.cipher()
    return TlsInfo(
        version=sslobj.version() or "",
        cipher=cipher[0] if cipher else "",
        dn=peer_identity(sslobj),
        psk=psk,
    )


def is_loopback(address: Address) -> bool:
    """True for unix sockets and loopback hosts (127.0.0.0/8, ::1, localhost)."""
    if address.is_unix or address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False


def check_exposure(listen: Sequence[Address], mode: TlsMode | None, *, where: str) -> TlsMode:
    """The TLS mode to use: refuse plaintext beyond loopback unless said explicitly.

    ``mode`` None means the user did not choose: OFF is fine on loopback and unix
    sockets only.  Raises ConfigError naming the exposed address."""
    if mode is not None:
        return mode
    exposed = [a for a in listen if not is_loopback(a)]
    if exposed:
        raise ConfigError(
            f"{exposed[0]} is reachable from the network without TLS: give TLS "
            "certificates (dst certs makes them), or say TLS off explicitly",
            where=where,
        )
    return TlsMode.OFF


def client_config(address: Address) -> ClientTlsConfig | None:
    """The TLS settings of an ``nbds`` address (None for plain ``nbd``)."""
    if not address.tls:
        return None
    certs, psk = address.param("tls-certificates"), address.param("tls-psk-file")
    return ClientTlsConfig(
        certificates=Path(certs) if certs else None,
        verify_peer=address.param("tls-verify-peer") != "false",
        hostname=address.param("tls-hostname"),
        psk_file=Path(psk) if psk else None,
        username=address.user,
    )


def server_security(
    config: ServerTlsConfig | None, acl: Path | None, *, where: str = ""
) -> dict[str, Any]:
    """``tls``/``acl`` keyword arguments of :class:`~dst.net.server.NbdServer`: the
    credentials loaded and the ACL file read and checked against them.  Raises
    ConfigError."""
    from dst.net.acl import AclFile

    tls = ServerTls(config) if config is not None and config.mode is not TlsMode.OFF else None
    acl_file = AclFile(acl) if acl is not None else None
    if acl_file is not None:
        acl_file.acl.check(
            certificates=config is not None and config.verify_peer,
            psk=config is not None and config.psk_file is not None,
            where=where or "acl",
        )
    return {"tls": tls, "acl": acl_file}
