"""The metrics endpoint and the families every process shares: a node's export counted
and timed through its gate, scraped over HTTP and HTTPS, with an ACL."""

from __future__ import annotations

import asyncio
import errno
import ssl
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from dst import certs, stats
from dst.device import IOCounters
from dst.errors import BlockError, ConfigError
from dst.net.address import Address
from dst.net.client import NbdClient
from dst.net.metrics import node_collector, registry
from dst.net.metricsserver import MetricsOptions, MetricsServer, metrics_options
from dst.net.server import NbdServer
from dst.targets.meteredfile import MeteredFile
from tests.support.scrape import get, matching, scrape, value

pytestmark = pytest.mark.timeout(30)
KiB = 1 << 10


@pytest.fixture
def timing() -> Iterator[None]:
    was = stats.enabled()
    stats.enable()
    yield
    stats.enable(was)


def test_options() -> None:
    assert MetricsOptions.from_strings("9300").address == Address("127.0.0.1", 9300)
    assert MetricsOptions.from_strings(":9300").address == Address("127.0.0.1", 9300)
    assert MetricsOptions.from_strings("[::1]:0").address == Address("::1", 0)
    assert metrics_options(None, tls=None, acl=None) is None
    for bad in ("unix:/tmp/m.sock", "localhost", "nbd://h:1/x"):
        with pytest.raises(ConfigError, match="--metrics"):
            MetricsOptions.from_strings(bad)
    with pytest.raises(ConfigError, match="reachable from the network"):
        MetricsOptions.from_strings("0.0.0.0:9300")
    assert MetricsOptions.from_strings("0.0.0.0:9300", tls="off").tls is None
    assert MetricsOptions.from_strings("0.0.0.0:9300", tls="pki/x").tls == Path("pki/x")
    with pytest.raises(ConfigError, match="need --metrics"):
        metrics_options(None, tls="off", acl=None)


async def test_node_export_counted_timed_and_scraped(
    sock_dir: Path, tmp_path: Path, timing: None
) -> None:
    disk = MeteredFile(tmp_path / "disk.img", size=1 << 20, create=True, name="disk")
    await disk.open()
    server = NbdServer({"n1": disk}, default="n1")
    (address,) = await server.start(f"unix:{sock_dir / 'n.sock'}")
    collect = node_collector("n1", server, disk.counters, lambda: 0)
    metrics = MetricsServer(registry(collect), MetricsOptions.from_strings("0"))
    url = await metrics.start()
    try:
        uri = f"nbd+unix:///n1?socket={address.path}"
        async with await NbdClient.connect(uri) as client:
            for i in range(10):
                await client.write(i * 4 * KiB, bytes(4 * KiB))
            for i in range(3):
                assert await client.read(i * 4 * KiB, 4 * KiB) == bytes(4 * KiB)
            await client.flush()
            await client.write_zeroes(0, 64 * KiB)
            s = await scrape(url)
        node = {"node": "n1"}
        assert value(s, "dst_node_requests_total", op="write", **node) == 10
        assert value(s, "dst_node_requests_total", op="read", **node) == 3
        assert value(s, "dst_node_requests_total", op="flush", **node) == 1
        assert value(s, "dst_node_bytes_total", op="write", **node) == 40 * KiB
        assert value(s, "dst_node_bytes_total", op="read", **node) == 12 * KiB
        assert value(s, "dst_node_bytes_total", op="zero", **node) == 64 * KiB
        assert value(s, "dst_node_errors_total", errno="EIO", **node) == 0
        assert value(s, "dst_node_inflight", **node) == 0
        assert value(s, "dst_node_request_duration_seconds_count", op="write", **node) == 10
        assert value(s, "dst_node_request_duration_seconds_sum", op="write", **node) > 0
        buckets = matching(s, "dst_node_request_duration_seconds_bucket", op="read", **node)
        assert len(buckets) == 22 and max(buckets.values()) == 3
        assert value(s, "dst_node_connections", **node) == 1
        assert value(s, "dst_node_connections_accepted_total", **node) == 1
        assert value(s, "dst_node_handshake_failures_total", reason="tls", **node) == 0
        assert value(s, "dst_info", role="node", version="0.1.0") == 1
        assert value(s, "dst_memory_budget_limit_bytes") > 0
        assert ("process_cpu_seconds_total", frozenset()) in s
        assert metrics.scrapes == 1
        for path, code in (("/", 404), ("/metrics/x", 404)):
            with pytest.raises(urllib.error.HTTPError) as err:
                await asyncio.to_thread(get, url.removesuffix("/metrics") + path)
            assert err.value.code == code
    finally:
        await metrics.close()
        await server.close()
        await disk.close()


async def test_metered_file_counts_every_request(tmp_path: Path, timing: None) -> None:
    path = tmp_path / "f.img"
    dev = MeteredFile(path, size=1 << 20, create=True)
    await dev.open()
    try:
        await dev.write(0, b"a" * 4096)
        await dev.write(4096, b"b" * 4096, fua=True)
        assert await dev.read(0, 8192) == b"a" * 4096 + b"b" * 4096
        await dev.flush()
        await dev.trim(0, 4096)
        await dev.write_zeroes(8192, 8192)
        c = dev.counters
        assert (c.reads, c.writes, c.flushes, c.trims, c.zeroes) == (1, 2, 1, 1, 1)
        assert (c.read_bytes, c.write_bytes, c.trim_bytes, c.zero_bytes) == (8192, 8192, 4096, 8192)
        assert c.timing is not None
        assert [h.count for _, h in c.timing.items()] == [1, 2, 1, 1, 1]
    finally:
        await dev.close()
    ro = MeteredFile(path, read_only=True)
    await ro.open()
    try:
        with pytest.raises(BlockError) as err:
            await ro.write(0, b"x")
        assert err.value.errno == errno.EPERM
        with pytest.raises(BlockError):
            await ro.read(1 << 20, 10)  # beyond the end: a short read
        assert ro.counters.errnos == {errno.EPERM: 1, errno.EIO: 1}
        assert ro.counters.writes == 0 and ro.counters.reads == 0
    finally:
        await ro.close()


def test_errors_by_errno() -> None:
    c = IOCounters()
    c.failed(BlockError(errno.EIO, "x"))
    c.failed(BlockError(errno.EIO, "y"))
    c.failed(BlockError(errno.ENOSPC, "z"))
    assert c.errors == 3 and c.errnos == {errno.EIO: 2, errno.ENOSPC: 1}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    ca, _ = certs.load_or_create_authority(root)
    for name in ("metrics", "prometheus"):
        certs.write_identity(root, ca, name)
    return root


def client_context(creds: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
    ctx.load_cert_chain(str(creds / "client-cert.pem"), str(creds / "client-key.pem"))
    return ctx


async def test_https_with_client_certificates_and_acl(pki: Path, tmp_path: Path) -> None:
    acl = tmp_path / "metrics.acl"
    acl.write_text('allow dn="CN=prometheus,O=dst"\n')
    opts = MetricsOptions.from_strings("127.0.0.1:0", tls=str(pki / "metrics"), acl=str(acl))
    metrics = MetricsServer(registry(lambda: []), opts)
    url = await metrics.start()
    try:
        assert url.startswith("https://127.0.0.1:")
        s = await scrape(url, context=client_context(pki / "prometheus"))
        assert ("process_cpu_seconds_total", frozenset()) in s
        # a certificate the CA signed, but a name the ACL does not allow
        with pytest.raises(urllib.error.HTTPError) as err:
            await scrape(url, context=client_context(pki / "metrics"))
        assert err.value.code == 403 and metrics.denied == 1
        # no client certificate at all: the TLS handshake fails
        bare = ssl.create_default_context(cafile=str(pki / "prometheus" / "ca-cert.pem"))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            await scrape(url, context=bare)
    finally:
        await metrics.close()


async def test_acl_by_address(tmp_path: Path) -> None:
    acl = tmp_path / "metrics.acl"
    acl.write_text("deny from=127.0.0.0/8\n")
    metrics = MetricsServer(registry(lambda: []), MetricsOptions.from_strings("0", acl=str(acl)))
    url = await metrics.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            await scrape(url)
        assert err.value.code == 403
    finally:
        await metrics.close()
