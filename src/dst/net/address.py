"""Listen/connect addresses and NBD URIs.

Accepted forms::

    host:port  [::1]:port  :port  host      TCP (default host 127.0.0.1, port 10809)
    unix:/path                                unix socket
    nbd://host[:port][/export]                TCP with an export name
    nbd+unix:///export?socket=/path           unix socket with an export name

Bad input raises :class:`dst.errors.ConfigError` naming what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from dst.errors import ConfigError
from dst.nbd.constants import DEFAULT_PORT

DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP (``host``/``port``) or unix-socket (``path``) endpoint, plus an export."""

    host: str = ""
    port: int = 0
    path: str = ""
    export: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def uri(self) -> str:
        """The NBD URI for this address (``nbd://`` or ``nbd+unix://``)."""
        if self.path:
            return f"nbd+unix:///{self.export}?socket={self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"bad port {text!r} (expected 0-65535)", where=where)
    return int(text)


def _host_port(text: str, where: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise ConfigError(f"bad IPv6 address {text!r} (expected [addr]:port)", where=where)
        if not rest:
            return host, DEFAULT_PORT
        if not rest.startswith(":"):
            raise ConfigError(f"junk after IPv6 address in {text!r}", where=where)
        return host, _port(rest[1:], where)
    if text.count(":") > 1:
        raise ConfigError(f"IPv6 address {text!r} must be written [addr]:port", where=where)
    host, sep, port = text.partition(":")
    return host or DEFAULT_HOST, _port(port, where) if sep else DEFAULT_PORT


def parse_address(text: str | Address, *, where: str = "") -> Address:
    """Parse an address or NBD URI.  Raises ConfigError."""
    if isinstance(text, Address):
        return text
    where = where or "address"
    if not text or text != text.strip():
        raise ConfigError(f"bad address {text!r}", where=where)
    if text.startswith("unix:") and not text.startswith("unix://"):
        path = text[5:]
        if not path:
            raise ConfigError("unix: address needs a path", where=where)
        return Address(path=path)
    if "://" in text:
        return _parse_uri(text, where)
    host, port = _host_port(text, where)
    return Address(host=host, port=port)


def _parse_uri(text: str, where: str) -> Address:
    try:
        url = urlsplit(text)
    except ValueError as exc:
        raise ConfigError(f"bad URI {text!r}: {exc}", where=where) from None
    export = unquote(url.path[1:]) if url.path.startswith("/") else unquote(url.path)
    if url.scheme == "nbd":
        if not url.netloc:
            raise ConfigError(f"nbd:// URI {text!r} needs a host", where=where)
        host, port = _host_port(url.netloc, where)
        return Address(host=host, port=port, export=export)
    if url.scheme == "nbd+unix":
        if url.netloc:
            raise ConfigError(f"nbd+unix URI {text!r} must not name a host", where=where)
        sockets = parse_qs(url.query).get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise ConfigError(f"nbd+unix URI {text!r} needs one ?socket=/path", where=where)
        return Address(path=sockets[0], export=export)
    raise ConfigError(
        f"unsupported scheme {url.scheme!r} in {text!r} (nbd://, nbd+unix://)", where=where
    )
