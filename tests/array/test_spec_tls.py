"""The array spec's security keys: [array.tls], acl, nbds members, the secure default."""

from __future__ import annotations

from pathlib import Path

import pytest

from dst.array.spec import SpecError
from dst.array.speccanon import spec_to_dict
from dst.array.specdict import spec_from_dict
from dst.array.specfile import load_spec
from dst.nbd.server import TlsMode
from dst.net.tls import PSK_SUPPORTED

ROOT = Path(__file__).resolve().parents[2]


def doc(**array: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "a", "target": {"type": "memory", "size": "1M"}}
    return {"array": base | array}


def test_example_round_trips() -> None:
    spec = load_spec(ROOT / "examples" / "tls.toml")
    assert spec.tls is not None and spec.tls.mode is TlsMode.REQUIRE and spec.tls.verify_peer
    assert spec.acl == "/etc/dst/array.acl"
    leg = spec_to_dict(spec)["array"]["target"]["members"][0]
    assert leg["uri"] == "nbds://127.0.0.1:10810/?tls-certificates=/etc/dst/pki/array"
    assert spec_from_dict(spec_to_dict(spec)) == spec


def test_plaintext_beyond_loopback_must_be_said() -> None:
    with pytest.raises(SpecError, match=r"array\.listen\[1\]: 0\.0\.0\.0:1 is reachable"):
        spec_from_dict(doc(listen=["unix:/s", "0.0.0.0:1"]))
    spec = spec_from_dict(doc(listen=["0.0.0.0:1"], tls={"mode": "off"}))
    assert spec.tls is not None and spec.tls.mode is TlsMode.OFF
    assert spec_from_dict(spec_to_dict(spec)) == spec  # "off on purpose" is kept
    assert spec_from_dict(doc(listen=["127.0.0.1:1", "[::1]:2", "localhost:3"])).tls is None


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"mode": "maybe"}, r"array\.tls\.mode: 'maybe': use off, on or require"),
        ({"mode": "on"}, r"array\.tls: TLS needs a certificates directory or a PSK file"),
        ({"certificates": "/x", "psk": "/y"}, r"array\.tls: use certificates or a PSK"),
        ({"mode": "off", "verify_peer": True}, r"array\.tls: certificates, PSK or peer"),
        ({"certificates": "/x", "verfy_peer": True}, r"did you mean 'verify_peer'"),
    ],
)
def test_bad_tls_tables(tls: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_from_dict(doc(tls=tls))


def test_psk_where_python_has_it() -> None:
    if PSK_SUPPORTED:
        assert spec_from_dict(doc(tls={"psk": "/y"})).tls is not None
    else:
        with pytest.raises(SpecError, match=r"array\.tls: TLS-PSK needs Python 3\.13"):
            spec_from_dict(doc(tls={"psk": "/y"}))


def test_tls_parameters_need_nbds() -> None:
    member = {"type": "remote", "uri": "nbd://h:1/?tls-certificates=/x"}
    with pytest.raises(SpecError, match="TLS parameters need nbds://"):
        spec_from_dict(doc(target=member))
