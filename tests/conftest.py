"""Shared fixtures: short temporary unix-socket paths and an in-process NBD server."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from dst.net.address import Address
from dst.net.server import NbdServer
from tests.support.fastpath import Disk, Memoryish, memoryish

# No wall-clock deadline per example: CI machines are loaded and slow; what a property
# checks is the result, and pytest-timeout bounds every test as a whole.
settings.register_profile("dst", deadline=None)
settings.load_profile("dst")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="dst-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["callback", "inline", "compiled"])
async def nbd_memory(
    sock_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[NbdServer, Address, Memoryish]]:
    """An NbdServer serving a 16 MiB memory-like device as the default export, on a unix
    socket: served by its callback faces, inline (as a file is) or by the compiled
    inline runs (a file, :func:`tests.support.fastpath.memoryish`)."""
    device = await memoryish(request.param, 16 << 20, sock_dir)
    server = NbdServer({"": device})
    (address,) = await server.start(f"unix:{sock_dir / 'nbd.sock'}")
    try:
        yield server, address, device
    finally:
        await server.close(timeout=5)
        await device.close()


@pytest.fixture
async def served(sock_dir: Path) -> AsyncIterator[tuple[NbdServer, Address, Disk]]:
    """An NbdServer exporting a 1 MiB :class:`Disk` (the server takes its fast path first)."""
    disk = Disk(1 << 20, name="served")
    server = NbdServer({"": disk})
    (address,) = await server.start(f"unix:{sock_dir / 'fp.sock'}")
    assert isinstance(address, Address)
    try:
        yield server, address, disk
    finally:
        disk.finish_all()
        await server.close(timeout=1)
