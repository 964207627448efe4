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


def test_uri_quotes_export_and_socket() -> None:
    addr = Address(path="/tmp/a b/s", export="disk a/1")
    assert addr.uri() == "nbd+unix:///disk%20a%2F1?socket=/tmp/a%20b/s"
    assert parse_address(addr.uri()) == addr


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("nbd://127.0.0.1:10810/", Address("127.0.0.1", 10810)),
        ("nbd://host/disk0", Address("host", 10809, export="disk0")),
        ("nbd://host", Address("host", 10809)),
        ("nbd://[::1]:99/a%20b", Address("::1", 99, export="a b")),
        ("nbd+unix:///e?socket=/run/x.sock", Address(path="/run/x.sock", export="e")),
        ("nbd+unix:///?socket=/s", Address(path="/s")),
    ],
)
def test_uri_form(uri: str, parsed: Address) -> None:
    assert parse_address(uri, form="uri") == parsed
    assert parse_address(parsed.uri(), form="uri") == parsed


@pytest.mark.parametrize(
    "bad",
    [
        "http://x",
        "nbd:/x",
        "h:10809",
        "unix:/s",
        "nbd://",
        "nbd://:10809/",
        "nbd://h:0/",
        "nbd://h:65536/",
        "nbd://h:port/",
        "nbd://::1/",
        "nbd://[::1/",
        "nbd://h/?socket=/x",
        "nbd+unix:///e",
        "nbd+unix://host/e?socket=/x",
        "nbd+unix:///e?socket=/x&bogus=1",
        "nbd+unix:///e?socket=/x&socket=/y",
        "nbd://h/#frag",
    ],
)
def test_uri_form_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match="NBD URI"):
        parse_address(bad, form="uri")


def test_listen_form() -> None:
    assert parse_address("127.0.0.1:0", form="listen") == Address("127.0.0.1", 0)
    assert parse_address("[::1]:10809", form="listen") == Address("::1", 10809)
    assert parse_address("0.0.0.0:10809", form="listen") == Address("0.0.0.0", 10809)
    assert parse_address("unix:/tmp/x.sock", form="listen") == Address(path="/tmp/x.sock")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("localhost", "missing :port"),
        ("[::1]", "missing :port"),
        (":10809", "missing host"),
        ("[]:1", "IPv6"),
        ("unix:", "empty unix socket path"),
        ("h:70000", "port must be 0..65535"),
        ("::1:5", "[ADDR]:PORT"),
        ("nbd://h:1/", "expected HOST:PORT"),
    ],
)
def test_listen_form_rejects(bad: str, reason: str) -> None:
    with pytest.raises(ConfigError, match="bad address") as e:
        parse_address(bad, form="listen", where="--listen")
    assert str(e.value).startswith("--listen: ")
    assert reason in str(e.value)
