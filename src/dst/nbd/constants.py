"""NBD wire constants (doc/proto.md of the NetworkBlockDevice/nbd project).

One errno table maps dst's errors to NBD error codes and back.
"""

from __future__ import annotations

import errno
from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MAX_OPTION_LENGTH = 64 << 10  # options longer than this are refused (ERR_TOO_BIG)
MAX_STRING = 4096  # export names, descriptions, context names
DEFAULT_PORT = 10809
BASE_ALLOCATION = "base:allocation"


class HandshakeFlags(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlags(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlags(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR | 1
    ERR_POLICY = _ERR | 2
    ERR_INVALID = _ERR | 3
    ERR_PLATFORM = _ERR | 4
    ERR_TLS_REQD = _ERR | 5
    ERR_UNKNOWN = _ERR | 6
    ERR_SHUTDOWN = _ERR | 7
    ERR_BLOCK_SIZE_REQD = _ERR | 8
    ERR_TOO_BIG = _ERR | 9
    ERR_EXT_HEADER_REQD = _ERR | 10


def is_error_reply(rep: int) -> bool:
    return bool(rep & _ERR)


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlags(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlags(IntFlag):
    DONE = 1 << 0


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


def is_error_chunk(reply_type: int) -> bool:
    return bool(reply_type & (1 << 15))


class StateFlags(IntFlag):
    """base:allocation extent flags."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class NbdErr(IntEnum):
    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


_TO_NBD: dict[int, NbdErr] = {
    0: NbdErr.OK,
    errno.EPERM: NbdErr.EPERM,
    errno.EACCES: NbdErr.EPERM,
    errno.EROFS: NbdErr.EPERM,
    errno.EIO: NbdErr.EIO,
    errno.ENOMEM: NbdErr.ENOMEM,
    errno.EINVAL: NbdErr.EINVAL,
    errno.ENOSPC: NbdErr.ENOSPC,
    errno.EFBIG: NbdErr.ENOSPC,
    errno.EDQUOT: NbdErr.ENOSPC,
    errno.EOVERFLOW: NbdErr.EOVERFLOW,
    errno.ENOTSUP: NbdErr.ENOTSUP,
    errno.EOPNOTSUPP: NbdErr.ENOTSUP,
    errno.ESHUTDOWN: NbdErr.ESHUTDOWN,
}

_FROM_NBD: dict[int, int] = {
    NbdErr.OK: 0,
    NbdErr.EPERM: errno.EPERM,
    NbdErr.EIO: errno.EIO,
    NbdErr.ENOMEM: errno.ENOMEM,
    NbdErr.EINVAL: errno.EINVAL,
    NbdErr.ENOSPC: errno.ENOSPC,
    NbdErr.EOVERFLOW: errno.EOVERFLOW,
    NbdErr.ENOTSUP: errno.ENOTSUP,
    NbdErr.ESHUTDOWN: errno.ESHUTDOWN,
}


def errno_to_nbd(err: int) -> int:
    """Map a host errno to the NBD wire code; anything unknown is EIO (as nbdkit does)."""
    return int(_TO_NBD.get(err, NbdErr.EIO))


def nbd_to_errno(code: int) -> int:
    """Map an NBD wire error to a host errno; unknown codes are EIO."""
    return _FROM_NBD.get(code, errno.EIO)
