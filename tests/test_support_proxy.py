"""The test proxy forwards NBD traffic and its cut really breaks connections."""

from __future__ import annotations

from pathlib import Path

import pytest

from dst.errors import BlockError
from dst.net.address import parse_address
from dst.net.client import NbdClient
from dst.net.server import NbdServer
from dst.targets.memory import MemoryDevice
from tests.support.proxy import CuttableProxy


async def test_proxy_forwards_then_cut_fails_inflight_and_new_connections(sock_dir: Path) -> None:
    server = NbdServer(MemoryDevice(1 << 20))
    await server.start(parse_address(f"unix:{sock_dir}/node.sock"))
    proxy = CuttableProxy(f"{sock_dir}/proxy.sock", f"{sock_dir}/node.sock")
    await proxy.start()
    try:
        client = await NbdClient.connect(parse_address(f"unix:{sock_dir}/proxy.sock"), "")
        await client.write(0, b"through the proxy")
        assert await client.read(0, 17) == b"through the proxy"
        proxy.cut()
        with pytest.raises(BlockError):
            await client.read(0, 17)
        with pytest.raises((BlockError, OSError, ConnectionError)):
            await NbdClient.connect(parse_address(f"unix:{sock_dir}/proxy.sock"), "", timeout=2)
        proxy.restore()
        again = await NbdClient.connect(parse_address(f"unix:{sock_dir}/proxy.sock"), "")
        assert await again.read(0, 17) == b"through the proxy"
        await again.close()
    finally:
        await proxy.close()
        await server.close()
