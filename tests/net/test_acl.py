"""Access lists: syntax, first match, default deny, early decisions, reload."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from dst.errors import ConfigError
from dst.net.acl import AccessList, AclFile, Peer

RULES = """\
# the array and the backup hosts; nothing from the lab network
allow dn="CN=array,O=dst"            # exact
allow dn='CN=backup-*,O=dst' from=10.0.0.0/8
deny  from=192.168.0.0/16
allow psk=alice
allow from=unix
"""


def peer(addr: str | None = "10.1.2.3", dn: str = "", psk: str = "") -> Peer:
    return Peer(address=ipaddress.ip_address(addr) if addr else None, dn=dn, psk=psk)


@pytest.fixture
def acl() -> AccessList:
    return AccessList.parse(RULES, source="acl")


@pytest.mark.parametrize(
    ("who", "allowed", "reason"),
    [
        (peer(dn="CN=array,O=dst"), True, "acl:2"),
        (peer("192.168.1.1", dn="CN=array,O=dst"), True, "acl:2"),  # first match wins
        (peer(dn="CN=backup-7,O=dst"), True, "acl:3"),
        (peer("172.16.0.1", dn="CN=backup-7,O=dst"), False, "no rule matched"),
        (peer("192.168.1.1", dn="CN=backup-7,O=dst"), False, "acl:4"),
        (peer(dn="CN=Array,O=dst"), False, "no rule matched"),  # case sensitive
        (peer(psk="alice"), True, "acl:5"),
        (peer(None), True, "acl:6"),
        (peer("10.1.2.3"), False, "no rule matched"),  # default deny
    ],
)
def test_first_match_and_default_deny(
    acl: AccessList, who: Peer, allowed: bool, reason: str
) -> None:
    decision = acl.decide(who)
    assert decision is not None
    assert (decision.allowed, decision.reason) == (allowed, reason)


def test_no_rules_allow_everyone() -> None:
    decision = AccessList.parse("# nothing\n").decide(peer())
    assert decision is not None and decision.allowed


def test_early_decision_from_the_address_alone(acl: AccessList) -> None:
    # 192.168/16 is denied before any TLS work ... unless rule 2 (dn) could match: it
    # has no address condition, so nothing is decided before the certificate is known.
    assert acl.decide(peer("192.168.1.1"), identity_known=False) is None
    only_addresses = AccessList.parse("deny from=192.168.0.0/16\nallow dn=CN=x\n")
    early = only_addresses.decide(peer("192.168.1.1"), identity_known=False)
    assert early is not None and not early.allowed
    assert only_addresses.decide(peer("10.0.0.1"), identity_known=False) is None
    unix = AccessList.parse("allow from=unix\nallow all\n")
    assert unix.decide(peer(None), identity_known=False) == unix.decide(peer(None))


def test_all_and_ipv4_mapped_addresses() -> None:
    acl = AccessList.parse("allow from=127.0.0.1\ndeny all\n")
    mapped = Peer.from_peername(("::ffff:127.0.0.1", 5, 0, 0))
    assert mapped.address == ipaddress.ip_address("127.0.0.1")
    assert acl.decide(mapped) is not None and acl.decide(mapped).allowed  # type: ignore[union-attr]
    assert Peer.from_peername("").address is None  # a unix socket
    other = acl.decide(Peer.from_peername(("10.0.0.1", 5)))
    assert other is not None and (other.allowed, other.reason) == (False, "<acl>:2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("permit all", "<acl>:1: expected allow or deny, got 'permit'"),
        ("allow", "<acl>:1: allow what?"),
        ("\nallow cn=x", "<acl>:2: bad condition 'cn=x'"),
        ("allow from=10.0.0.300", "<acl>:1: bad address '10.0.0.300'"),
        ("allow dn=", "<acl>:1: empty dn="),
        ("allow dn=a dn=b", "<acl>:1: dn= given twice"),
        ('allow dn="CN=x', "<acl>:1: No closing quotation"),
        ("allow all from=unix", "<acl>:1: bad condition 'all'"),
    ],
)
def test_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        AccessList.parse(text)
    assert str(e.value).startswith(message)


def test_rules_that_can_never_match_are_refused() -> None:
    acl = AccessList.parse("allow from=unix\nallow dn=CN=x\n", source="f")
    with pytest.raises(ConfigError, match="f:2: dn= matches client certificates"):
        acl.check(certificates=False, psk=False)
    acl.check(certificates=True, psk=False)
    with pytest.raises(ConfigError, match="psk= needs"):
        AccessList.parse("allow psk=a").check(certificates=True, psk=False)


def test_reload_keeps_the_old_rules_on_error(tmp_path: Path) -> None:
    path = tmp_path / "acl"
    path.write_text("allow from=unix\n")
    f = AclFile(path)
    assert len(f.acl.rules) == 1
    path.write_text("allow from=unix\ndeny all\n")
    assert f.reload() == 2
    path.write_text("allow frm=unix\n")
    with pytest.raises(ConfigError, match=f"{path}:1"):
        f.reload()
    assert len(f.acl.rules) == 2  # still in force
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read ACL"):
        f.reload()
