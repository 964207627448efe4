"""Server side of the transmission phase, sans-IO: the request parser and reply encoders.

Theory of operation
-------------------
This is the hot path.  :meth:`RequestParser.feed` keeps a reference to the received
chunk (no copy); :meth:`RequestParser.requests` walks it with one precompiled
:class:`struct.Struct`, producing many :class:`~dst.nbd.events.Request` objects per
call.  A WRITE payload that lies wholly inside the chunk is handed out as a
``memoryview`` slice of it (zero copy); one that spans chunks is assembled into a
``bytearray`` of exactly its announced length -- allocated only after the length was
checked against ``max_payload``.  A larger payload is drained (counted, never
buffered) and its request is reported with ``data=None`` so the server can answer
EINVAL without losing framing.  Only a bad request magic breaks framing; it raises
:class:`dst.errors.ProtocolError`.

``requests(limit)`` parses at most ``limit`` requests so the shell can apply
backpressure; the rest stays buffered for the next call.

Replies are built as small header ``bytes`` to be written followed by the payload
(``transport.writelines([header, data])``), never concatenated with it.
"""

from __future__ import annotations

from dst.errors import ProtocolError
from dst.nbd import wire
from dst.nbd.constants import (
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    ReplyFlags,
    ReplyType,
)
from dst.nbd.events import Payload, Request

_WRITE = int(Cmd.WRITE)
_DONE = int(ReplyFlags.DONE)
_REQ_SIZE = wire.REQUEST_SIZE
_unpack_request = wire.REQUEST.unpack_from
_pack_simple = wire.SIMPLE_REPLY.pack
_pack_data = wire.CHUNK_DATA.pack


class RequestParser:
    """Incremental parser of client requests (see module docstring)."""

    __slots__ = ("_buf", "_fill", "_pos", "_skip", "_wbuf", "_wreq", "max_payload")

    def __init__(self, *, max_payload: int = 32 << 20) -> None:
        self.max_payload = max_payload
        self._buf: bytes = b""
        self._pos = 0
        self._wbuf: bytearray | None = None  # a WRITE payload being assembled
        self._wreq: Request | None = None
        self._fill = 0
        self._skip = 0  # bytes of an oversized WRITE payload still to drain

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Append received bytes (kept by reference; do not mutate them)."""
        if self._pos >= len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos :] + data
        self._pos = 0

    def requests(self, limit: int = 1 << 30) -> list[Request]:
        """Parse up to ``limit`` complete requests.  Raises ProtocolError on bad magic."""
        out: list[Request] = []
        buf = self._buf
        pos = self._pos
        end = len(buf)
        mv = memoryview(buf)
        if self._skip:
            n = min(self._skip, end - pos)
            self._skip -= n
            pos += n
        elif self._wbuf is not None:
            wbuf = self._wbuf
            n = min(len(wbuf) - self._fill, end - pos)
            wbuf[self._fill : self._fill + n] = mv[pos : pos + n]
            self._fill += n
            pos += n
            if self._fill == len(wbuf):
                req = self._wreq
                assert req is not None
                req.data = wbuf
                out.append(req)
                self._wbuf = self._wreq = None
        if self._skip or self._wbuf is not None:
            self._pos = pos
            return out
        while pos + _REQ_SIZE <= end and len(out) < limit:
            magic, flags, typ, handle, offset, length = _unpack_request(buf, pos)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic 0x{magic:08x}")
            pos += _REQ_SIZE
            if typ != _WRITE:
                out.append(Request(flags, typ, handle, offset, length))
                continue
            if length > self.max_payload:
                out.append(Request(flags, typ, handle, offset, length, None))
                n = min(length, end - pos)
                pos += n
                self._skip = length - n
                if self._skip:
                    break
                continue
            if pos + length <= end:
                out.append(Request(flags, typ, handle, offset, length, mv[pos : pos + length]))
                pos += length
                continue
            wbuf = bytearray(length)
            n = end - pos
            wbuf[:n] = mv[pos:end]
            pos = end
            self._wbuf, self._fill = wbuf, n
            self._wreq = Request(flags, typ, handle, offset, length, None)
            break
        self._pos = pos
        return out


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header (followed by the data for a successful simple READ)."""
    return _pack_simple(SIMPLE_REPLY_MAGIC, error, handle)


def data_chunk(handle: int, offset: int, length: int, *, done: bool = True) -> bytes:
    """Header of an OFFSET_DATA chunk carrying ``length`` data bytes (written after it)."""
    flags = _DONE if done else 0
    return _pack_data(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_DATA, handle, 8 + length, offset
    )


def hole_chunk(handle: int, offset: int, length: int, *, done: bool = False) -> bytes:
    """An OFFSET_HOLE chunk: ``length`` bytes at ``offset`` read as zeroes."""
    flags = _DONE if done else 0
    return wire.CHUNK_HOLE.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_HOLE, handle, 12, offset, length
    )


def done_chunk(handle: int) -> bytes:
    """A final NBD_REPLY_TYPE_NONE chunk."""
    return wire.CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.NONE, handle, 0)


def block_status_chunk(handle: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """A final BLOCK_STATUS chunk with (length, flags) descriptors."""
    body = b"".join(wire.EXTENT.pack(n, f) for n, f in extents)
    head = wire.CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.BLOCK_STATUS, handle, 4 + len(body)
    )
    return head + wire.U32.pack(context_id) + body


def error_reply(handle: int, error: int, message: str = "", *, structured: bool) -> bytes:
    """An error reply: an ERROR chunk when structured replies are on, else simple."""
    if structured:
        return wire.error_chunk(handle, error, message)
    return _pack_simple(SIMPLE_REPLY_MAGIC, error, handle)


__all__ = [
    "Payload",
    "RequestParser",
    "block_status_chunk",
    "data_chunk",
    "done_chunk",
    "error_reply",
    "hole_chunk",
    "simple_reply",
]
