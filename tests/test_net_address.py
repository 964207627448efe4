"""Address and NBD URI parsing."""

from __future__ import annotations

import pytest

from dst.errors import ConfigError
from dst.net.address import Address, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host:1234", Address(host="host", port=1234)),
        ("10.0.0.1:0", Address(host="10.0.0.1", port=0)),
        (":10810", Address(host="127.0.0.1", port=10810)),
        ("example.org", Address(host="example.org", port=10809)),
        ("[::1]:99", Address(host="::1", port=99)),
        ("[::1]", Address(host="::1", port=10809)),
        ("unix:/run/dst.sock", Address(path="/run/dst.sock")),
        ("nbd://h", Address(host="h", port=10809)),
        ("nbd://h:7/disk%20a", Address(host="h", port=7, export="disk a")),
        ("nbd://[fe80::1]:7/x", Address(host="fe80::1", port=7, export="x")),
        ("nbd+unix:///disk?socket=/tmp/s", Address(path="/tmp/s", export="disk")),
        ("nbd+unix:///?socket=/tmp/s", Address(path="/tmp/s")),
    ],
)
def test_parse(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " host:1",
        "host:port",
        "host:70000",
        "host:-1",
        "::1:80",
        "[::1",
        "[::1]x",
        "unix:",
        "nbd://",
        "nbd+unix:///disk",
        "nbd+unix://host/disk?socket=/s",
        "http://host/",
    ],
)
def test_bad(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


def test_str_and_uri_roundtrip() -> None:
    for addr in (
        Address(host="::1", port=5, export="e"),
        Address(host="h", port=5),
        Address(path="/tmp/s", export="d"),
    ):
        assert parse_address(addr.uri()) == addr
        assert parse_address(str(addr)) == Address(addr.host, addr.port, addr.path)
