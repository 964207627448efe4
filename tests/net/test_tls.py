"""TLS between dst's NBD server and client, in process, on real sockets.

Good clients get through with verified certificates; bad ones (plaintext, another
CA, expired, denied by the ACL, garbage or truncation in the TLS handshake, bytes
after STARTTLS) are refused without data, the server logs one line and no traceback,
and a good client keeps working throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import logging
import os
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from dst import certs
from dst.errors import ConfigError, ServerRefused
from dst.nbd import wire
from dst.nbd.client import encode_go
from dst.nbd.constants import IHAVEOPT, Opt, Rep
from dst.nbd.server import TlsMode
from dst.net.acl import AccessList
from dst.net.address import Address
from dst.net.client import ConnectionLost, NbdClient, list_exports
from dst.net.server import NbdServer
from dst.net.tls import ClientTlsConfig, ServerTls, ServerTlsConfig
from dst.targets.memory import MemoryDevice

pytestmark = pytest.mark.timeout(60)


Case = Callable[..., Coroutine[Any, Any, None]]
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def both_loops(case: Case) -> Callable[..., None]:
    """Run ``case`` on asyncio's loop and on uvloop (dst's processes run uvloop, whose
    TLS implementation is its own)."""

    def test(*args: Any, loop: str, **kwargs: Any) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(case(*args, **kwargs))

    sig = inspect.signature(case)
    loop_param = inspect.Parameter("loop", inspect.Parameter.KEYWORD_ONLY, annotation=str)
    test.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[*sig.parameters.values(), loop_param], return_annotation=None
    )
    test.__name__ = case.__name__
    test.__doc__ = case.__doc__
    marked: Callable[..., None] = pytest.mark.parametrize("loop", list(LOOPS))(test)
    return marked


Raw = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA + node/user/intruder; another CA's user (other/user, foreign); an expired
    user certificate."""
    root = tmp_path_factory.mktemp("pki")
    ca, _ = certs.load_or_create_authority(root)
    for name in ("node", "user", "intruder"):
        certs.write_identity(root, ca, name)
    other, _ = certs.load_or_create_authority(root / "other")
    certs.write_identity(root / "other", other, "user")
    foreign = root / "foreign"  # trusts our server, but its certificate is another CA's
    foreign.mkdir()
    certs.write_public(foreign / "ca-cert.pem", certs.cert_pem(ca.cert))
    for f in ("client-cert.pem", "client-key.pem"):
        (foreign / f).write_bytes((root / "other" / "user" / f).read_bytes())
    now = dt.datetime.now(dt.UTC)
    late = certs.issue(
        ca, "late", server=False, not_before=now - dt.timedelta(days=30), not_after=now
    )
    d = root / "expired"
    d.mkdir()
    certs.write_public(d / "ca-cert.pem", certs.cert_pem(ca.cert))
    certs.write_public(d / "client-cert.pem", certs.cert_pem(late.cert))
    certs.write_private(d / "client-key.pem", certs.key_pem(late.key))
    return root


def tls_uri(address: Address, creds: Path, export: str = "", **params: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in {"tls-certificates": str(creds), **params}.items())
    return f"nbds+unix:///{export}?socket={address.path}&{q}"


@contextlib.asynccontextmanager
async def tls_server(
    pki: Path,
    sock_dir: Path,
    *,
    mode: TlsMode = TlsMode.REQUIRE,
    acl: str | None = None,
    tls_only: tuple[str, ...] = (),
    handshake_timeout: float = 30.0,
) -> AsyncIterator[tuple[NbdServer, Address]]:
    config = ServerTlsConfig(mode, certificates=pki / "node", verify_peer=True)
    exports = {"": MemoryDevice(4 << 20), "secret": MemoryDevice(1 << 20, name="secret")}
    server = NbdServer(
        exports,
        tls=ServerTls(config),
        acl=AccessList.parse(acl) if acl is not None else None,
        tls_only=tls_only,
        handshake_timeout=handshake_timeout,
    )
    (address,) = await server.start(f"unix:{sock_dir / 'tls.sock'}")
    try:
        yield server, address
    finally:
        await server.close(timeout=5)


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Fail when anything logged an exception (a traceback) or an error."""
    caplog.set_level(logging.INFO)
    yield caplog
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


async def check_io(client: NbdClient, offset: int) -> None:
    data = os.urandom(8192)
    await client.write(offset, data, fua=True)
    assert await client.read(offset, len(data)) == data


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


@both_loops
async def test_verified_peers_both_ways(
    pki: Path, sock_dir: Path, no_tracebacks: pytest.LogCaptureFixture
) -> None:
    async with tls_server(pki, sock_dir) as (server, address):
        async with await NbdClient.connect(tls_uri(address, pki / "user")) as client:
            await check_io(client, 0)
            assert client.tls is not None and client.tls.dn == "CN=node,O=dst"
            assert client.tls.version in ("TLSv1.2", "TLSv1.3")
            (seen,) = server.clients()
            assert seen["tls"]["peer"] == "CN=user,O=dst"
            assert seen["state"] == "transmission" and seen["export"] == ""
        names = await list_exports(tls_uri(address, pki / "user"))
        assert sorted(n for n, _ in names) == ["", "secret"]


@both_loops
async def test_refusals_leave_a_good_client_working(
    pki: Path, sock_dir: Path, no_tracebacks: pytest.LogCaptureFixture
) -> None:
    acl = 'allow dn="CN=user,O=dst"\nallow dn="CN=late,O=dst"\n'
    async with tls_server(pki, sock_dir, acl=acl) as (_, address):
        good = await NbdClient.connect(tls_uri(address, pki / "user"))
        await check_io(good, 0)
        plain = f"nbd+unix:///?socket={address.path}"
        with pytest.raises(ServerRefused, match="requires TLS"):
            await NbdClient.connect(plain)
        await check_io(good, 1 << 20)
        with pytest.raises(ConnectionLost, match="after the TLS handshake"):
            await NbdClient.connect(tls_uri(address, pki / "foreign"))
        await check_io(good, 1 << 20)
        with pytest.raises(ConnectionLost):
            await NbdClient.connect(tls_uri(address, pki / "expired"))
        await check_io(good, 2 << 20)
        with pytest.raises(ServerRefused, match="access denied"):
            await NbdClient.connect(tls_uri(address, pki / "intruder"))
        await check_io(good, 3 << 20)
        await good.close()
    # one line each, naming why
    assert len(warnings(no_tracebacks, "refused: unable to get local issuer")) == 1
    assert len(warnings(no_tracebacks, "refused: certificate has expired")) == 1
    (denied,) = warnings(no_tracebacks, "access denied")
    assert "CN=intruder,O=dst" in denied


@both_loops
async def test_client_checks_the_server(pki: Path, sock_dir: Path) -> None:
    async with tls_server(pki, sock_dir) as (_, address):
        with pytest.raises(ConnectionLost, match="self-signed certificate in certificate chain"):
            await NbdClient.connect(tls_uri(address, pki / "other" / "user"))
        with pytest.raises(ConnectionLost, match=r"Hostname mismatch|doesn't match"):
            await NbdClient.connect(tls_uri(address, pki / "user", **{"tls-hostname": "evil"}))
    # a plain server: no silent downgrade
    server = NbdServer(MemoryDevice(1 << 20))
    (address,) = await server.start(f"unix:{sock_dir / 'plain.sock'}")
    try:
        with pytest.raises(ServerRefused, match="does not offer TLS"):
            await NbdClient.connect(tls_uri(address, pki / "user"))
    finally:
        await server.close(timeout=5)


@both_loops
async def test_missing_client_credentials_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "client-cert.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"ca-cert\.pem is missing"):
        ClientTlsConfig(certificates=tmp_path).context()


# --- raw, hostile clients -----------------------------------------------------------


@contextlib.asynccontextmanager
async def raw(address: Address) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_unix_connection(address.path)
    try:
        await reader.readexactly(18)
        writer.write(struct.pack(">I", 3))
        yield reader, writer
    finally:
        writer.transport.abort()


def opt(option: int, payload: bytes = b"") -> bytes:
    return wire.OPTION.pack(IHAVEOPT, option, len(payload)) + payload


async def reply(r: asyncio.StreamReader) -> tuple[int, int, bytes]:
    _, option, rep, n = wire.OPTION_REPLY.unpack(await r.readexactly(20))
    return option, rep, await r.readexactly(n)


def client_hello() -> bytes:
    """The first flight of a real TLS client, from a memory BIO."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="node")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    "attack",
    ["garbage", "truncated-hello", "bytes-after-starttls", "export-name-first", "silence"],
)
@both_loops
async def test_hostile_handshakes(
    pki: Path, sock_dir: Path, no_tracebacks: pytest.LogCaptureFixture, attack: str
) -> None:
    async with tls_server(pki, sock_dir, handshake_timeout=2.0) as (server, address):
        good = await NbdClient.connect(tls_uri(address, pki / "user"))
        async with raw(address) as (r, w):
            if attack == "bytes-after-starttls":
                w.write(opt(Opt.STARTTLS) + client_hello())  # one packet, no waiting
            elif attack == "export-name-first":
                w.write(opt(Opt.EXPORT_NAME))  # cannot be refused: the session ends
            else:
                w.write(opt(Opt.STARTTLS))
                assert (await reply(r))[:2] == (Opt.STARTTLS, Rep.ACK)
                if attack == "garbage":
                    w.write(os.urandom(2000))
                elif attack == "truncated-hello":
                    w.write(client_hello()[:60])
                    w.write_eof()
            assert await r.read() == b""  # closed, no data, no ACK for the bad STARTTLS
            await check_io(good, 0)
        assert len(server.connections) == 1  # the good one
        await check_io(good, 4096)
        await good.close()


@both_loops
async def test_plaintext_gets_tls_reqd_and_no_data(pki: Path, sock_dir: Path) -> None:
    async with tls_server(pki, sock_dir) as (_, address), raw(address) as (r, w):
        for option in (Opt.LIST, Opt.STRUCTURED_REPLY, Opt.INFO, Opt.GO):
            payload = encode_go("") if option in (Opt.INFO, Opt.GO) else b""
            w.write(opt(option, payload))
            assert (await reply(r))[:2] == (option, Rep.ERR_TLS_REQD)
        w.write(opt(Opt.ABORT))
        assert (await reply(r))[:2] == (Opt.ABORT, Rep.ACK)


@both_loops
async def test_selective_tls_hides_tls_only_exports(pki: Path, sock_dir: Path) -> None:
    async with tls_server(pki, sock_dir, mode=TlsMode.ON, tls_only=("secret",)) as (_, address):
        plain = f"nbd+unix:///?socket={address.path}"
        assert [n for n, _ in await list_exports(plain)] == [""]
        async with await NbdClient.connect(plain) as client:
            await check_io(client, 0)
        with pytest.raises(ServerRefused, match="ERR_TLS_REQD"):
            await NbdClient.connect(f"nbd+unix:///secret?socket={address.path}")
        names = await list_exports(tls_uri(address, pki / "user"))
        assert sorted(n for n, _ in names) == ["", "secret"]
        async with await NbdClient.connect(tls_uri(address, pki / "user", "secret")) as c:
            await check_io(c, 0)


@both_loops
async def test_denied_address_is_refused_before_tls(pki: Path, sock_dir: Path) -> None:
    acl = "deny from=unix\nallow all\n"
    async with tls_server(pki, sock_dir, acl=acl) as (_, address), raw(address) as (r, w):
        w.write(opt(Opt.STARTTLS))
        option, rep, message = await reply(r)
        assert (option, rep, message) == (Opt.STARTTLS, Rep.ERR_POLICY, b"access denied")
