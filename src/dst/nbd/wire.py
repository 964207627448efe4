"""Precompiled wire structs and small encoders shared by both sides of the codec.

Everything is big-endian (network order).  The transmission-phase structs are the hot
path: they are module-level :class:`struct.Struct` objects so packing and unpacking do
not re-parse a format string per call.
"""

from __future__ import annotations

import struct

from dst.nbd.constants import (
    OPT_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ReplyFlags,
    ReplyType,
)

# Handshake.
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# Transmission.
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length (28 bytes)
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle (16 bytes)
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, length (20 bytes)
CHUNK_DATA = struct.Struct(">IHHQIQ")  # chunk header + offset (OFFSET_DATA, 28 bytes)
CHUNK_HOLE = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header + error + message length
HOLE = struct.Struct(">QI")  # OFFSET_HOLE payload: offset, size
EXTENT = struct.Struct(">II")  # length, status flags
ERROR_HEAD = struct.Struct(">IH")  # error, message length

REQUEST_SIZE = REQUEST.size
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size
CHUNK_SIZE = CHUNK.size

_DONE = int(ReplyFlags.DONE)


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    """One fixed-newstyle option reply."""
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(payload)) + payload


def encode_str(text: str) -> bytes:
    return text.encode("utf-8")


def error_chunk(handle: int, error: int, message: str = "", *, offset: int | None = None) -> bytes:
    """A final NBD_REPLY_TYPE_ERROR (or ERROR_OFFSET when ``offset`` is given) chunk."""
    msg = message.encode("utf-8", "replace")[:4096]
    if offset is None:
        return (
            CHUNK_ERROR.pack(
                STRUCTURED_REPLY_MAGIC,
                _DONE,
                ReplyType.ERROR,
                handle,
                6 + len(msg),
                error,
                len(msg),
            )
            + msg
        )
    return (
        CHUNK_ERROR.pack(
            STRUCTURED_REPLY_MAGIC,
            _DONE,
            ReplyType.ERROR_OFFSET,
            handle,
            14 + len(msg),
            error,
            len(msg),
        )
        + msg
        + U64.pack(offset)
    )
