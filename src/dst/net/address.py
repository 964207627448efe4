"""Listen/connect addresses and NBD URIs: one parser for all of dst.

Accepted forms::

    host:port  [::1]:port  :port  host      TCP (default host 127.0.0.1, port 10809)
    unix:/path                                unix socket
    nbd://host[:port][/export]                TCP with an export name
    nbd+unix:///[export]?socket=/path         unix socket with an export name
    nbds://... nbds+unix://...                the same over TLS (STARTTLS required)

``form`` narrows this for callers that need more than "something to connect to":

* ``"listen"`` -- ``host:port``, ``[v6]:port`` or ``unix:/path`` with host and port
  written out, so nothing is exported on every interface, or on a default port, by
  accident (0.0.0.0 or [::] for every interface, port 0 for a free one);
* ``"uri"`` -- an NBD URI (``nbd[s]://`` with a host and a port 1-65535, or
  ``nbd[s]+unix://``), e.g. an array member.

URIs follow the NBD URI standard as far as dst goes: no fragment, the ``socket``
query parameter (on ``+unix``), and on ``nbds`` libnbd's TLS parameters
``tls-certificates=DIR``, ``tls-verify-peer=true|false``, ``tls-hostname=NAME`` and
``tls-psk-file=FILE`` (with ``nbds://USER@HOST/`` naming the PSK user); export names
and paths are percent-decoded, and :meth:`Address.uri` encodes them again.

Bad input raises :class:`dst.errors.ConfigError` naming the text and what is wrong,
prefixed with ``where`` when given (e.g. ``"listen address"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from dst.errors import ConfigError
from dst.nbd.constants import DEFAULT_PORT

DEFAULT_HOST = "127.0.0.1"

Form = Literal["any", "listen", "uri"]

_LISTEN_FORMS = "expected HOST:PORT, [IPV6]:PORT or unix:PATH"
_URI_FORMS = "use nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH"
TLS_PARAMS = ("tls-certificates", "tls-verify-peer", "tls-hostname", "tls-psk-file")


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP (``host``/``port``) or unix-socket (``path``) endpoint, plus an export.

    ``tls``: an ``nbds`` URI; ``tls_params`` its TLS query parameters in URI order,
    ``user`` the PSK user name (both read by :class:`dst.net.tls.ClientTlsConfig`)."""

    host: str = ""
    port: int = 0
    path: str = ""
    export: str = ""
    tls: bool = False
    tls_params: tuple[tuple[str, str], ...] = ()
    user: str = ""

    def param(self, name: str) -> str | None:
        """The TLS query parameter ``name``, or None."""
        return next((v for k, v in self.tls_params if k == name), None)

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def uri(self) -> str:
        """The NBD URI for this address (``nbd[s]://`` or ``nbd[s]+unix://``)."""
        export = quote(self.export, safe="")
        scheme = "nbds" if self.tls else "nbd"
        query = [(k, v) for k, v in self.tls_params]
        if self.path:
            query.insert(0, ("socket", self.path))
        q = "&".join(f"{k}={quote(v, safe='/')}" for k, v in query)
        q = f"?{q}" if q else ""
        if self.path:
            return f"{scheme}+unix:///{export}{q}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{quote(self.user, safe='')}@" if self.user else ""
        return f"{scheme}://{user}{host}:{self.port}/{export}{q}"


class _Bad(ValueError):
    """What is wrong, before it is worded as a ConfigError."""


def parse_address(text: str | Address, *, form: Form = "any", where: str = "") -> Address:
    """Parse an address or NBD URI accepted by ``form``.  Raises ConfigError.

    An :class:`Address` is returned as it is.
    """
    if isinstance(text, Address):
        return text
    is_uri = "://" in text and not (text.startswith("unix:") and text[5:7] != "//")
    try:
        if not text or text != text.strip():
            raise _Bad("empty or surrounded by blanks")
        if form == "uri" and not is_uri:
            raise _Bad(_URI_FORMS)
        if is_uri:
            if form == "listen":
                raise _Bad(_LISTEN_FORMS)
            return _parse_uri(text)
        if text.startswith("unix:"):
            if not text[5:]:
                raise _Bad("empty unix socket path")
            return Address(path=text[5:])
        explicit = form == "listen"
        host, port = _host_port(text, default_host=not explicit, default_port=not explicit)
        return Address(host=host, port=port)
    except _Bad as e:
        if form == "uri" or (form == "any" and is_uri):
            message = f"not an NBD URI: {text!r} ({e})"
        else:
            message = f"bad address {text!r}: {e}"
        raise ConfigError(message, where=where) from None


def _host_port(
    text: str, *, default_host: bool, default_port: bool, min_port: int = 0
) -> tuple[str, int]:
    """``host[:port]`` or ``[v6][:port]``; raises _Bad."""
    port: str | None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise _Bad("bad IPv6 address (expected [ADDR]:PORT)")
        if rest and not rest.startswith(":"):
            raise _Bad("junk after IPv6 address")
        port = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise _Bad("write IPv6 addresses as [ADDR]:PORT")
    else:
        host, sep, port_text = text.partition(":")
        port = port_text if sep else None
    if not host and not default_host:
        raise _Bad("missing host (0.0.0.0 or [::] for every interface)")
    if port is None:
        if not default_port:
            raise _Bad(f"missing :port ({_LISTEN_FORMS})")
        return host or DEFAULT_HOST, DEFAULT_PORT
    if not port.isdigit() or not min_port <= int(port) <= 65535:
        raise _Bad(f"port must be {min_port}..65535, got {port!r}")
    return host or DEFAULT_HOST, int(port)


def _parse_uri(text: str) -> Address:
    try:
        url = urlsplit(text)
        pairs = parse_qsl(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
    except ValueError as e:
        raise _Bad(str(e)) from None
    if url.fragment or "#" in text:
        raise _Bad("fragments are not allowed")
    export = unquote(url.path.removeprefix("/"))
    scheme, unix = url.scheme.removesuffix("+unix"), url.scheme.endswith("+unix")
    if scheme not in ("nbd", "nbds"):
        raise _Bad(_URI_FORMS)
    tls = scheme == "nbds"
    allowed = ({"socket"} if unix else set()) | (set(TLS_PARAMS) if tls else set())
    names = [k for k, _ in pairs]
    for k in names:
        if k not in allowed:
            hint = " (TLS parameters need nbds://)" if k in TLS_PARAMS else ""
            raise _Bad(f"unknown parameter {k!r}{hint}")
        if names.count(k) > 1:
            raise _Bad(f"parameter {k!r} given twice")
    params = tuple((k, v) for k, v in pairs if k != "socket")
    for k, v in params:
        if not v:
            raise _Bad(f"empty {k}")
        if k == "tls-verify-peer" and v not in ("true", "false"):
            raise _Bad("tls-verify-peer must be true or false")
    user, at, hostpart = url.netloc.rpartition("@")
    if not unix:
        if not hostpart:
            raise _Bad("missing host")
        if at and not tls:
            raise _Bad("a user name is for TLS-PSK (nbds://USER@HOST/)")
        host, port = _host_port(hostpart, default_host=False, default_port=True, min_port=1)
        return Address(
            host=host, port=port, export=export, tls=tls, tls_params=params, user=unquote(user)
        )
    if url.netloc:
        raise _Bad("no host in a unix-socket URI: nbd+unix:///EXPORT?socket=PATH")
    sockets = [v for k, v in pairs if k == "socket"]
    if len(sockets) != 1 or not sockets[0]:
        raise _Bad("one socket=PATH is required")
    return Address(path=sockets[0], export=export, tls=tls, tls_params=params)
