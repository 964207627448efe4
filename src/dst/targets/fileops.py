"""The system calls behind :class:`~dst.targets.file.FileDevice` beyond ``pread`` and
``pwrite``: ``fallocate(2)`` (not in :mod:`os`), the zeroing and discard ioctls of
block devices, and the walk of a sparse file's data and holes.

Theory of operation
-------------------
Each is a plain blocking function on a file descriptor: the device decides whether it
runs on the event loop (``lseek`` on the page cache) or in the executor (anything that
may sleep on the disk).  Errors are ``OSError``; :func:`block_error` turns one into the
:class:`~dst.errors.BlockError` a client is answered with, and :func:`unsupported` says
whether it only means "this filesystem cannot" (the device then falls back).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from dst.device import Extent
from dst.errors import BlockError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKDISCARD = 0x1277  # _IO(0x12, 119)
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
MAX_EXTENTS = 1024  # an extent walk answers at most this many per call
IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one pwritev takes

_libc = ctypes.CDLL(None, use_errno=True)  # the process image, libc included
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def blk_range(fd: int, request: int, offset: int, length: int) -> None:
    """A block device range ioctl (``BLKDISCARD``, ``BLKZEROOUT``); raises OSError."""
    fcntl.ioctl(fd, request, struct.pack("=QQ", offset, length))


def extents(fd: int, pos: int, end: int) -> list[Extent]:
    """The data and holes of ``[pos, end)`` (at most :data:`MAX_EXTENTS`, so a huge
    sparse file is walked a bounded piece per call), by ``SEEK_DATA``/``SEEK_HOLE``."""
    out: list[Extent] = []
    while pos < end and len(out) < MAX_EXTENTS:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = end  # only a hole up to end of file
        if data > pos:
            stop = min(data, end)
            out.append(Extent(stop - pos, hole=True, zero=True))
        else:
            stop = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            out.append(Extent(stop - pos))
        pos = stop
    return out


def block_error(exc: OSError, what: str) -> BlockError:
    """``exc`` as the error a client gets (same errno, EIO if it has none)."""
    err = exc.errno or errno.EIO
    return BlockError(err, f"{what}: {os.strerror(err)}")


def unsupported(exc: OSError) -> bool:
    """Does ``exc`` only say the file or filesystem cannot do it?"""
    return exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)
