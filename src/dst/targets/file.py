"""A local regular file or block device as a BlockDevice.

Theory of operation
-------------------
READ and WRITE call ``os.pread``/``os.pwrite`` directly on the event loop (also as the
callback fast path of :mod:`dst.device`, with no coroutine at all): a page-cache
hit costs a few microseconds, far less than a hop to a worker thread, and writes only
dirty the page cache.  Short transfers are looped.  Everything that may sleep on the
disk (``fdatasync``, ``fallocate``, the zeroing ioctls) runs in the default executor so
the loop keeps serving other requests.  FUA is a ``pwritev`` with ``RWF_DSYNC`` (in
the executor): durable on return, syncing only that range.

Sparse files: TRIM punches a hole (``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``);
WRITE_ZEROES punches when the client allows holes, else uses ``FALLOC_FL_ZERO_RANGE``,
else punch + allocate, else (not ``fast``) writes zero buffers.  BLOCK_STATUS walks the
file with ``SEEK_DATA``/``SEEK_HOLE``.  What works is probed once in :meth:`open` and
declared in ``caps``.  Block devices use ``BLKDISCARD``/``BLKZEROOUT``.  The system
calls themselves (``fallocate``, the ioctls, the extent walk) are
:mod:`dst.targets.fileops`.

Errors: every ``OSError`` becomes :class:`BlockError` with the same errno; sizing
problems at open are :class:`ConfigError` naming ``size``.

Every request goes through :meth:`FileDevice._read`, :meth:`~FileDevice._write` or
:meth:`~FileDevice._counted`, where :class:`~dst.targets.meteredfile.MeteredFile`
counts and times them (``dst serve --metrics``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dst.device import (
    BlockDevice,
    Buffer,
    Cancel,
    Capabilities,
    Done,
    Extent,
    Health,
    InlineRuns,
    no_cancel,
)
from dst.errors import BlockError, ConfigError
from dst.targets.fileops import (
    BLKDISCARD,
    BLKZEROOUT,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    IOV_MAX,
    blk_range,
    block_error,
    extents,
    fallocate,
    unsupported,
)

try:
    from dst import _inline
except ImportError:  # built without a C compiler: the pure-Python inline form serves
    _inline = None  # type: ignore[assignment]

COMPILED = _inline is not None and not os.environ.get("DST_PURE_PYTHON")
"""Offer :meth:`FileDevice.inline_runs` (``DST_PURE_PYTHON=1`` in the environment: no)."""


class FileDevice(BlockDevice):
    kind = "file"
    """``path`` as a device.  ``size`` defaults to the file's size.

    ``create`` creates the file and extends it (sparsely) to ``size``; an existing file
    bigger than ``size`` is refused unless ``shrink`` (which truncates it).  A block
    device bigger than ``size`` exports its first ``size`` bytes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        size: int | None = None,
        create: bool = False,
        read_only: bool = False,
        shrink: bool = False,
        name: str = "file",
    ) -> None:
        if size is not None and size < 0:
            raise ConfigError("size must be >= 0", where="size")
        if create and read_only:
            raise ConfigError("cannot create a read-only file", where="create")
        self.path = os.fspath(path)
        self.name = name
        self.size = size if size is not None else 0
        self._want_size = size
        self._create = create
        self._read_only = read_only
        self._shrink = shrink
        self._fd = -1
        self._runs: weakref.WeakSet[_inline.Inline] = weakref.WeakSet()  # inline_runs'
        self._is_blk = False
        self._zero_range = True  # cleared when FALLOC_FL_ZERO_RANGE proves unsupported
        self.caps = Capabilities(read_only=read_only)

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Open and size the file, probe what works.  Raises BlockError, ConfigError."""
        if self._fd >= 0:
            return
        flags = os.O_CLOEXEC | (os.O_RDONLY if self._read_only else os.O_RDWR)
        if self._create:
            flags |= os.O_CREAT
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise block_error(exc, self.path) from None
        try:
            self._size_up(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.caps = self._probe(fd)

    async def close(self) -> None:
        fd, self._fd = self._fd, -1
        for runs in list(self._runs):  # before the number can be reused
            runs.close()
        if fd >= 0:
            os.close(fd)

    def _size_up(self, fd: int) -> None:
        try:
            st = os.fstat(fd)
            self._is_blk = stat.S_ISBLK(st.st_mode)
            if not (self._is_blk or stat.S_ISREG(st.st_mode)):
                raise BlockError(errno.EINVAL, f"{self.path}: not a regular file or block device")
            have = os.lseek(fd, 0, os.SEEK_END) if self._is_blk else st.st_size
            want = self._want_size
            if want is None:
                self.size = have
            elif want > have:
                if self._is_blk or not self._create:
                    msg = f"{self.path} has {have} bytes, less than size {want}"
                    raise ConfigError(msg + " (use create to extend)", where="size")
                os.ftruncate(fd, want)
            elif want < have and not self._is_blk:
                if not self._shrink:
                    msg = f"{self.path} has {have} bytes, more than size {want}"
                    raise ConfigError(msg + "; refusing to truncate (use shrink)", where="size")
                os.ftruncate(fd, want)
            if want is not None:
                self.size = want
        except OSError as exc:
            raise block_error(exc, self.path) from None

    def _probe(self, fd: int) -> Capabilities:
        if self._read_only:
            return Capabilities(read_only=True, cache=True, block_status=self._seek_works(fd))
        if self._is_blk:
            return Capabilities(trim=True, cache=True)
        try:  # punching past EOF changes nothing but says whether the fs can punch
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, self.size, 1)
            punch = True
        except OSError:
            punch = False
        return Capabilities(
            trim=punch, fast_zero=punch, cache=True, block_status=self._seek_works(fd)
        )

    def _seek_works(self, fd: int) -> bool:
        if self._is_blk:
            return False
        try:
            os.lseek(fd, 0, os.SEEK_DATA)
        except OSError as exc:
            return exc.errno == errno.ENXIO  # ENXIO: no data at all, which is fine
        return True

    # -- hot path --------------------------------------------------------------------

    def _read(self, offset: int, length: int) -> bytes:
        """pread the range: both faces of READ.  Raises BlockError."""
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise block_error(exc, "read") from None
        if len(data) != length:
            return self._read_rest(data, offset, length)
        return data

    def _read_rest(self, first: bytes, offset: int, length: int) -> bytes:
        parts = [first]
        got = len(first)
        try:
            while got < length:
                more = os.pread(self._fd, length - got, offset + got)
                if not more:
                    raise BlockError(errno.EIO, f"read: unexpected end of file at {offset + got}")
                parts.append(more)
                got += len(more)
        except OSError as exc:
            raise block_error(exc, "read") from None
        return b"".join(parts)

    def _write(self, offset: int, data: Buffer) -> None:
        """pwrite the data: both faces of WRITE (but FUA).  Raises BlockError."""
        try:
            n = os.pwrite(self._fd, data, offset)
            if n != len(data):
                self._write_rest(data, offset, n)
        except OSError as exc:
            if self._read_only:
                raise BlockError(errno.EPERM, f"{self.name} is read-only") from None
            raise block_error(exc, "write") from None

    async def read(self, offset: int, length: int) -> Buffer:
        return self._read(offset, length)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        if not fua:
            self._write(offset, data)
            return
        # RWF_DSYNC: durable on return, syncing only this write's range (not every dirty
        # page of the file, as a flush would).
        dsync = self._in_thread(self._write_dsync, data, offset, what="write")
        await self._counted("write", len(data), dsync)

    # The callback fast path (dst.device): the same page-cache I/O, done at once.

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        try:
            data = self._read(offset, length)
        except BlockError as exc:
            done(exc, None)
        else:
            done(None, data)
        return no_cancel

    def read_now(self, offset: int, length: int) -> Buffer | None:
        return self._read(offset, length)

    def write_now(self, offset: int, data: Buffer) -> bool:
        if self._read_only:
            return False  # the coroutine: the read-only error
        try:  # (_write, inline: a node's every write; a MeteredFile goes through _write)
            n = os.pwrite(self._fd, data, offset)
            if n != len(data):
                self._write_rest(data, offset, n)
        except OSError as exc:
            raise block_error(exc, "write") from None
        return True

    def inline_runs(
        self, sink: Callable[[bytes], object], *, size: int, max_block: int, structured: bool,
        writable: bool,
    ) -> InlineRuns | None:  # fmt: skip
        cls = type(self)  # a subclass that does more per request (MeteredFile) gets none
        plain = (cls._read, cls._write, cls.read_now, cls.write_now) == (
            FileDevice._read, FileDevice._write, FileDevice.read_now, FileDevice.write_now,
        )  # fmt: skip
        if not (COMPILED and plain and self._fd >= 0):
            return None
        writable = writable and not self._read_only
        runs = _inline.Inline(self._fd, size, max_block, structured, writable, sink)
        self._runs.add(runs)
        return runs

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        if fua:
            return None  # the coroutine: RWF_DSYNC in a thread
        try:
            if not self.write_now(offset, data):
                return None
        except BlockError as exc:
            done(exc, None)
        else:
            done(None, None)
        return no_cancel

    def submit_gather(
        self, offset: int, parts: Sequence[Buffer], fua: bool, done: Done
    ) -> Cancel | None:
        """``parts`` end to end with one ``pwritev`` (no joined copy)."""
        if fua or self._read_only or len(parts) > IOV_MAX:
            return None
        try:
            n = os.pwritev(self._fd, parts, offset)
            if n != sum(map(len, parts)):
                self._write_rest(b"".join(parts), offset, n)
        except OSError as exc:
            done(block_error(exc, "write"), None)
        else:
            done(None, None)
        return no_cancel

    async def _counted(self, op: str, nbytes: int, work: Awaitable[None]) -> None:
        """Await ``work``: a request of ``op`` (write with FUA, flush, trim, zero)."""
        await work

    def _write_dsync(self, data: Buffer, offset: int) -> None:
        if self._read_only:
            raise OSError(errno.EPERM, "read-only")
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = os.pwritev(self._fd, [view[done:]], offset + done, os.RWF_DSYNC)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            done += n

    def _write_rest(self, data: Buffer, offset: int, done: int) -> None:
        view = memoryview(data).cast("B")
        while done < len(view):
            n = os.pwrite(self._fd, view[done:], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            done += n

    async def flush(self) -> None:
        await self._counted("flush", 0, self._fsync())

    async def _fsync(self) -> None:
        await self._in_thread(os.fdatasync, self._fd, what="flush")

    # -- sparse operations -----------------------------------------------------------

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._counted("trim", length, self._trim(offset, length, fua=fua))

    async def _trim(self, offset: int, length: int, *, fua: bool) -> None:
        if self._is_blk:
            await self._blk_ioctl(BLKDISCARD, offset, length, advisory=True)
        elif self.caps.trim:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            await self._in_thread(fallocate, self._fd, mode, offset, length, what="trim")
        if fua:
            await self._fsync()  # part of this request: not counted as a flush

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        zero = self._zero(offset, length, fua=fua, punch=punch, fast=fast)
        await self._counted("zero", length, zero)

    async def _zero(self, offset: int, length: int, *, fua: bool, punch: bool, fast: bool) -> None:
        if self._is_blk:
            if fast:
                raise BlockError(errno.ENOTSUP, "fast zero not supported on block devices")
            await self._blk_ioctl(BLKZEROOUT, offset, length, advisory=False)
        elif not await self._zero_natively(offset, length, punch):
            await super().write_zeroes(offset, length, fast=fast)
        if fua:
            await self._fsync()

    async def _zero_natively(self, offset: int, length: int, punch: bool) -> bool:
        """Zero with fallocate if the filesystem can; False if it cannot."""
        keep, hole = FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
        if punch and self.caps.trim:
            await self._in_thread(fallocate, self._fd, hole | keep, offset, length, what="zero")
            return True
        if self._zero_range:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, fallocate, self._fd, FALLOC_FL_ZERO_RANGE | keep, offset, length
                )
                return True
            except OSError as exc:
                if not unsupported(exc):
                    raise block_error(exc, "zero") from None
                self._zero_range = False
        if self.caps.trim:  # punch then allocate: zeroed, still allocated
            await self._in_thread(fallocate, self._fd, hole | keep, offset, length, what="zero")
            await self._in_thread(fallocate, self._fd, keep, offset, length, what="zero")
            return True
        return False

    async def _blk_ioctl(self, request: int, offset: int, length: int, *, advisory: bool) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, blk_range, self._fd, request, offset, length
            )
        except OSError as exc:
            if not (advisory and unsupported(exc)):
                raise block_error(exc, "ioctl") from None

    async def cache(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as exc:
            raise block_error(exc, "cache") from None

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        if not self.caps.block_status:
            return [Extent(length)]
        try:
            return extents(self._fd, offset, offset + length)
        except OSError as exc:
            raise block_error(exc, "block_status") from None

    async def _in_thread(self, fn: Callable[..., Any], *args: Any, what: str) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except OSError as exc:
            raise block_error(exc, what) from None

    # -- status ----------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "name": self.name, "path": self.path}
        if self._want_size is not None:  # configured: it creates or checks the size
            out["size"] = self._want_size
        out["read_only"] = self._read_only
        return out

    def health(self) -> Health:
        state = "ok" if self._fd >= 0 else "closed"
        return Health(state, {"path": self.path, "block_device": self._is_blk})
