"""Access control for NBD exports: allow/deny rules on who the client is.

Theory of operation
-------------------
A rules file has one rule per line; ``#`` starts a comment, values with blanks are
quoted (shell-like)::

    allow dn="CN=array,O=dst"                  # the client certificate's subject
    allow dn="CN=backup-*,O=dst" from=10.0.0.0/8
    allow psk=alice                            # a TLS-PSK identity
    deny  from=192.168.0.0/16
    allow from=unix                            # clients on a unix socket
    deny  all

A rule is ``allow`` or ``deny`` and conditions that must all hold: ``dn=GLOB`` (RFC 4514
subject, e.g. ``CN=node-a,O=dst``; ``*``, ``?`` and ``[...]`` are globs, matched case
sensitively), ``psk=GLOB``, ``from=CIDR`` (a bare address is a /32 or /128) or
``from=unix``, or the single word ``all``.  The first rule that matches decides; when no
rule matches the client is denied.  A file without rules allows everyone (logged).

:meth:`AccessList.decide` is pure: it takes a :class:`Peer` and returns a
:class:`Decision`.  With ``identity_known=False`` (TLS not negotiated yet) it decides
from the address alone when it can -- a rule whose ``from`` fails is skipped, a rule that
needs the certificate and could match leaves the decision open (None) -- so a denied
address is refused before any TLS work.  :class:`AclFile` is the file behind a list:
``reload()`` re-reads it (SIGHUP, the control socket) and keeps the old rules when the
new file is bad.  Errors are ConfigError naming ``file:line``.
"""

from __future__ import annotations

import ipaddress
import logging
import shlex
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from dst.errors import ConfigError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is connecting: ``address`` None for a unix socket; ``dn``/``psk`` "" when
    the client presented no certificate / PSK identity."""

    address: IPAddress | None = None
    dn: str = ""
    psk: str = ""

    @classmethod
    def from_peername(cls, peername: object, *, dn: str = "", psk: str = "") -> Peer:
        """From a transport's ``peername`` (a tuple for TCP, a string or None for unix)."""
        address: IPAddress | None = None
        if isinstance(peername, tuple) and peername:
            try:
                address = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
            except ValueError:
                address = None
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
        return cls(address=address, dn=dn, psk=psk)


@dataclass(frozen=True, slots=True)
class Rule:
    """One line: ``allow`` and its conditions (empty: ``all``)."""

    allow: bool
    dn: str | None = None
    psk: str | None = None
    network: IPNetwork | None = None
    unix: bool = False
    where: str = ""  # file:line

    @property
    def needs_identity(self) -> bool:
        return self.dn is not None or self.psk is not None

    def address_matches(self, address: IPAddress | None) -> bool:
        if self.unix:
            return address is None
        if self.network is not None:
            return address is not None and address in self.network
        return True

    def identity_matches(self, peer: Peer) -> bool:
        if self.dn is not None and not (peer.dn and fnmatchcase(peer.dn, self.dn)):
            return False
        return self.psk is None or bool(peer.psk and fnmatchcase(peer.psk, self.psk))


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # the rule that decided ("acl:3") or "no rule matched"


class AccessList:
    """Rules in order (see module docstring)."""

    def __init__(self, rules: tuple[Rule, ...] = (), *, source: str = "") -> None:
        self.rules = rules
        self.source = source

    @classmethod
    def parse(cls, text: str, *, source: str = "<acl>") -> AccessList:
        """Parse rules.  Raises ConfigError naming ``source:line``."""
        rules = []
        for n, line in enumerate(text.splitlines(), 1):
            rule = _parse_line(line, f"{source}:{n}")
            if rule is not None:
                rules.append(rule)
        return cls(tuple(rules), source=source)

    def decide(self, peer: Peer, *, identity_known: bool = True) -> Decision | None:
        """Allow or deny ``peer``; None when it depends on an identity not known yet."""
        if not self.rules:
            return Decision(True, "no rules")
        for rule in self.rules:
            if not rule.address_matches(peer.address):
                continue
            if rule.needs_identity:
                if not identity_known:
                    return None
                if not rule.identity_matches(peer):
                    continue
            return Decision(rule.allow, rule.where)
        return Decision(False, "no rule matched")

    def check(self, *, certificates: bool, psk: bool, where: str = "") -> None:
        """Refuse rules that can never match how clients authenticate here:
        ``dn=`` needs verified client certificates, ``psk=`` a PSK server.
        Raises ConfigError naming the rule."""
        for rule in self.rules:
            if rule.dn is not None and not certificates:
                raise ConfigError(
                    f"{rule.where}: dn= matches client certificates, which needs TLS with "
                    "peer verification (--tls-verify-peer)",
                    where=where,
                )
            if rule.psk is not None and not psk:
                raise ConfigError(f"{rule.where}: psk= needs a TLS-PSK server", where=where)


def _parse_line(line: str, where: str) -> Rule | None:
    try:
        words = shlex.split(line, comments=True)
    except ValueError as e:
        raise ConfigError(str(e), where=where) from None
    if not words:
        return None
    action, conds = words[0], words[1:]
    if action not in ("allow", "deny"):
        raise ConfigError(f"expected allow or deny, got {action!r}", where=where)
    if not conds:
        raise ConfigError(f"{action} what? add dn=, psk=, from= or all", where=where)
    if conds == ["all"]:
        return Rule(action == "allow", where=where)
    fields: dict[str, str] = {}
    for cond in conds:
        key, sep, value = cond.partition("=")
        if not sep or key not in ("dn", "psk", "from"):
            raise ConfigError(f"bad condition {cond!r}: use dn=, psk=, from= or all", where=where)
        if key in fields:
            raise ConfigError(f"{key}= given twice", where=where)
        if not value:
            raise ConfigError(f"empty {key}=", where=where)
        fields[key] = value
    network = None
    source = fields.get("from")
    if source is not None and source != "unix":
        try:
            network = ipaddress.ip_network(source, strict=False)
        except ValueError:
            raise ConfigError(f"bad address {source!r}: use CIDR or unix", where=where) from None
    return Rule(
        action == "allow",
        dn=fields.get("dn"),
        psk=fields.get("psk"),
        network=network,
        unix=source == "unix",
        where=where,
    )


class AclFile:
    """An :class:`AccessList` read from ``path``; :meth:`reload` re-reads it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acl = self._read()

    def _read(self) -> AccessList:
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read ACL: {e}", where=str(self.path)) from None
        acl = AccessList.parse(text, source=str(self.path))
        if not acl.rules:
            log.warning("%s: no rules: every client is allowed", self.path)
        return acl

    def reload(self) -> int:
        """Re-read the file; returns the number of rules.  Raises ConfigError (the old
        rules stay in force)."""
        self.acl = self._read()
        log.info("%s: %d ACL rules loaded", self.path, len(self.acl.rules))
        return len(self.acl.rules)
