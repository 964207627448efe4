"""FileDevice on temporary sparse files."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import pytest

from dst.device import Buffer, Extent
from dst.errors import BlockError, ConfigError
from dst.targets.file import FileDevice
from tests.support.fastpath import Completion, submit

MiB = 1 << 20


@pytest.fixture
async def dev(tmp_path: Path) -> AsyncIterator[FileDevice]:
    d = FileDevice(tmp_path / "disk.img", size=8 * MiB, create=True)
    await d.open()
    yield d
    await d.close()


def size_of(path: Path) -> int:
    return os.stat(path).st_size


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


async def test_create_is_sparse(dev: FileDevice, tmp_path: Path) -> None:
    assert dev.size == 8 * MiB
    assert size_of(tmp_path / "disk.img") == 8 * MiB
    assert allocated(tmp_path / "disk.img") == 0
    assert dev.caps.trim and dev.caps.fast_zero and dev.caps.block_status
    assert await dev.block_status(0, dev.size) == [Extent(8 * MiB, hole=True, zero=True)]


async def test_round_trip(dev: FileDevice) -> None:
    data = os.urandom(3 * MiB + 17)
    await dev.write(12345, data)
    assert await dev.read(12345, len(data)) == data
    await dev.write(0, memoryview(data)[:100], fua=True)
    assert await dev.read(0, 100) == data[:100]
    assert await dev.read(2 * MiB + 17, 10) == data[2 * MiB + 17 - 12345 :][:10]
    assert await dev.read(7 * MiB, 10) == bytes(10)


async def test_flush_uses_fdatasync_and_fua_a_dsync_write(dev: FileDevice) -> None:
    with (
        mock.patch("os.fdatasync", wraps=os.fdatasync) as sync,
        mock.patch("os.pwritev", wraps=os.pwritev) as pwritev,
    ):
        await dev.write(4096, b"x" * 8192, fua=True)  # syncs its own range only
        assert (sync.call_count, pwritev.call_count) == (0, 1)
        assert pwritev.call_args.args[3] == os.RWF_DSYNC
        await dev.flush()
        assert sync.call_count == 1
    assert await dev.read(0, 16384) == bytes(4096) + b"x" * 8192 + bytes(4096)


async def test_trim_punches_hole(dev: FileDevice, tmp_path: Path) -> None:
    await dev.write(0, b"\xaa" * (2 * MiB))
    assert await dev.block_status(0, 2 * MiB) == [Extent(2 * MiB)]
    await dev.trim(MiB, MiB)
    assert await dev.read(MiB, MiB) == bytes(MiB)
    ext = await dev.block_status(0, 4 * MiB)
    assert ext == [Extent(MiB), Extent(3 * MiB, hole=True, zero=True)]
    assert sum(e.length for e in await dev.block_status(4096, 4096)) == 4096


async def test_write_zeroes_keeps_allocation_without_punch(dev: FileDevice) -> None:
    await dev.write(0, b"\x55" * MiB)
    await dev.write_zeroes(4096, 8192)
    assert await dev.read(0, 16384) == b"\x55" * 4096 + bytes(8192) + b"\x55" * 4096
    await dev.write_zeroes(65536, 65536, punch=True, fua=True, fast=True)
    assert await dev.read(65536, 65536) == bytes(65536)
    ext = await dev.block_status(0, MiB)
    assert Extent(65536, hole=True, zero=True) in ext


async def test_write_zeroes_fallbacks(dev: FileDevice) -> None:
    await dev.write(0, b"\x11" * 8192)
    dev._zero_range = False
    await dev.write_zeroes(0, 4096)  # punch + allocate
    assert await dev.read(0, 8192) == bytes(4096) + b"\x11" * 4096
    dev.caps = type(dev.caps)(trim=False, fast_zero=False)
    with pytest.raises(BlockError) as ei:
        await dev.write_zeroes(4096, 4096, fast=True)
    assert ei.value.errno == errno.ENOTSUP
    await dev.write_zeroes(4096, 4096)  # plain zero buffers
    assert await dev.read(0, 8192) == bytes(8192)


async def test_cache_and_spec(dev: FileDevice, tmp_path: Path) -> None:
    await dev.cache(0, MiB)
    spec = dev.spec()
    assert spec == {
        "type": "file",
        "name": "file",
        "path": str(tmp_path / "disk.img"),
        "size": 8 * MiB,
        "read_only": False,
    }
    assert dev.health().state == "ok"


async def test_read_only_refuses_writes(tmp_path: Path) -> None:
    p = tmp_path / "ro.img"
    p.write_bytes(b"abc" * 1000)
    d = FileDevice(p, read_only=True)
    await d.open()
    try:
        assert d.size == 3000 and d.caps.read_only
        assert await d.read(3, 3) == b"abc"
        with pytest.raises(BlockError) as ei:
            await d.write(0, b"zzz")
        assert ei.value.errno == errno.EPERM
    finally:
        await d.close()
    assert d.health().state == "closed"


async def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BlockError) as ei:
        await FileDevice(tmp_path / "nope").open()
    assert ei.value.errno == errno.ENOENT
    assert "nope" in str(ei.value)


async def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BlockError) as ei:
        await FileDevice(tmp_path, read_only=True).open()
    assert ei.value.errno in (errno.EINVAL, errno.EISDIR)


async def test_never_shrinks_silently(tmp_path: Path) -> None:
    p = tmp_path / "big.img"
    p.write_bytes(b"\x01" * 10000)
    with pytest.raises(ConfigError) as ei:
        await FileDevice(p, size=4096, create=True).open()
    assert ei.value.where == "size" and "shrink" in str(ei.value)
    assert size_of(p) == 10000
    d = FileDevice(p, size=4096, shrink=True)
    await d.open()
    await d.close()
    assert size_of(p) == 4096


async def test_extend_needs_create(tmp_path: Path) -> None:
    p = tmp_path / "small.img"
    p.write_bytes(b"\x01" * 4096)
    with pytest.raises(ConfigError):
        await FileDevice(p, size=8192).open()
    d = FileDevice(p, size=8192, create=True)
    await d.open()
    assert await d.read(0, 8192) == b"\x01" * 4096 + bytes(4096)
    await d.close()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        FileDevice("x", size=-1)
    with pytest.raises(ConfigError):
        FileDevice("x", create=True, read_only=True)


async def test_io_after_close_is_block_error(dev: FileDevice) -> None:
    await dev.close()
    await dev.close()
    with pytest.raises(BlockError) as ei:
        await dev.read(0, 10)
    assert ei.value.errno == errno.EBADF


async def test_short_read_and_write_are_looped(dev: FileDevice) -> None:
    real_pwrite, real_pread = os.pwrite, os.pread

    def half_pwrite(fd: int, data: bytes, off: int) -> int:
        return real_pwrite(fd, memoryview(data)[: max(1, len(data) // 2)], off)

    def half_pread(fd: int, n: int, off: int) -> bytes:
        return real_pread(fd, max(1, n // 2), off)

    data = os.urandom(1000)
    with mock.patch("os.pwrite", half_pwrite):
        await dev.write(10, data)
    with mock.patch("os.pread", half_pread):
        assert await dev.read(10, 1000) == data


pytestmark = pytest.mark.timeout(30)
SIZE = 1 << 20


# -- file device ---------------------------------------------------------------------------


async def test_file_device_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    f = FileDevice(path, size=SIZE, create=True)
    await f.open()
    data = os.urandom(12288)
    c = Completion()
    assert f.submit_write(4096, data, False, c) is not None
    assert c.calls == [(None, None)]  # synchronous: done before returning
    assert path.read_bytes()[4096 : 4096 + len(data)] == data
    c = Completion()
    assert f.submit_read(4096, len(data), c) is not None
    assert c.calls == [(None, data)]
    assert f.submit_write(0, data, True, Completion()) is None  # FUA: the coroutine
    assert path.read_bytes()[:4096] == bytes(4096)
    assert f.write_now(8192, b"inline") and path.read_bytes()[8192:8198] == b"inline"
    f._fd, fd = -1, f._fd  # a write that fails: its BlockError, by either form
    with pytest.raises(BlockError) as e:
        f.write_now(0, data)
    assert e.value.errno == errno.EBADF
    c = Completion()
    assert f.submit_write(0, data, False, c) is not None
    assert isinstance(c.calls[0][0], BlockError)
    f._fd = fd
    os.truncate(path, 8192)  # shrunk under us: a short read is an error, not short data
    c = Completion()
    assert f.submit_read(4096, 8192, c) is not None
    exc, _ = c.calls[0]
    assert isinstance(exc, BlockError) and exc.errno == errno.EIO
    await f.close()


async def test_file_device_gathers_a_write_from_several_buffers(tmp_path: Path) -> None:
    path = tmp_path / "g.img"
    f = FileDevice(path, size=SIZE, create=True)
    await f.open()
    parts: list[Buffer] = [os.urandom(4096), memoryview(os.urandom(8192)), bytearray(512)]
    c = Completion()
    assert f.submit_gather(4096, parts, False, c) is not None
    assert c.calls == [(None, None)]
    assert path.read_bytes()[4096 : 4096 + 12800] == b"".join(parts)
    assert f.submit_gather(0, parts, True, Completion()) is None  # FUA: joined elsewhere
    f._fd, fd = -1, f._fd  # a write that fails: its error, not an exception
    c = Completion()
    assert f.submit_gather(0, parts, False, c) is not None
    exc, _ = c.calls[0]
    assert isinstance(exc, BlockError) and exc.errno == errno.EBADF
    f._fd = fd
    await f.close()


async def test_read_only_file_device_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    data = os.urandom(8192)
    path.write_bytes(data * 4)
    ro = FileDevice(path, read_only=True)
    await ro.open()
    assert ro.submit_write(0, b"n" * 4096, False, Completion()) is None
    assert not ro.write_now(0, b"n" * 4096)  # not taken: the coroutine says why
    assert path.read_bytes() == data * 4
    with pytest.raises(BlockError) as e:  # the coroutine gives the error
        await ro.write(0, b"n" * 4096)
    assert e.value.errno == errno.EPERM
    assert await submit(ro, "read", 8192, 8192) == data
    await ro.close()
