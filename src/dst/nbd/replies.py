"""Client side of the transmission phase, sans-IO: request encoder and reply parser.

Theory of operation
-------------------
:meth:`ReplyParser.request` allocates a unique handle, remembers the command, offset
and length, and returns the 28-byte header (a WRITE's payload is written after it by
the shell).  :meth:`ReplyParser.feed` parses simple replies and structured chunks,
matches them to outstanding handles and returns one :class:`~dst.nbd.events.Reply` per
request once it is complete: READ data reassembled from OFFSET_DATA/OFFSET_HOLE chunks
into one buffer (a single chunk covering the whole request is sliced out directly),
BLOCK_STATUS descriptors, or the first error chunk's errno and message.  The most
common answer, a simple reply of success to a request with no data (every WRITE's), is
returned as its handle alone, an ``int``: no object per reply
(:meth:`ReplyParser.replies` gives objects throughout).  Data chunks spanning received
buffers are copied straight to their place in the read buffer.

The server is checked as it goes: unknown handles, bad magic, chunks outside the
request, malformed payloads or a successful READ that did not cover its range raise
:class:`dst.errors.ProtocolError`.  A handle whose caller gave up (timeout) stays
registered so its late reply is still framed correctly.
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
    is_error_chunk,
)
from dst.nbd.events import Reply

MAX_CHUNK = 4 << 20  # longest non-data chunk payload accepted
_READ = int(Cmd.READ)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_DISC = int(Cmd.DISC)
_SIMPLE_SIZE = wire.SIMPLE_REPLY_SIZE
_unpack_simple = wire.SIMPLE_REPLY.unpack_from
_pack_request = wire.REQUEST.pack
_LAST_HANDLE = 0xFFFF_FFFF_FFFF_FFFF
_DONE = int(ReplyFlags.DONE)


class _Pending:
    __slots__ = ("buf", "cmd", "covered", "data", "error", "extents", "length", "message", "offset")

    def __init__(self, cmd: int, offset: int, length: int) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.buf: bytearray | None = None
        self.data: bytes | None = None
        self.covered = 0
        self.error = 0
        self.message = ""
        self.extents: list[tuple[int, int]] | None = None


class ReplyParser:
    """Tracks outstanding requests and parses the server's replies."""

    def __init__(self, *, structured: bool, context_id: int = 0) -> None:
        self.structured = structured
        self.context_id = context_id  # base:allocation id (0: accept any)
        # handle -> what its reply needs: a READ or BLOCK_STATUS its _Pending; any
        # other command only its number (a reply carries nothing but an error: no
        # object per WRITE; one is made if a structured chunk comes for it)
        self._pending: dict[int, _Pending | int] = {}
        self._next = 1
        self._buf = b""
        self._pos = 0
        # An in-progress copy of data into a read buffer.
        self._dst: bytearray | None = None
        self._dst_pos = 0
        self._left = 0
        self._copy_handle = 0
        self._copy_final = False

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0
    ) -> tuple[int, bytes]:
        """Register a request; returns (handle, header).  DISC is not registered."""
        handle = self._next
        self._next = handle + 1 if handle != _LAST_HANDLE else 1
        if cmd in (_READ, _BLOCK_STATUS):
            self._pending[handle] = _Pending(cmd, offset, length)
        elif cmd != _DISC:
            self._pending[handle] = cmd
        return handle, _pack_request(REQUEST_MAGIC, flags, cmd, handle, offset, length)

    def feed(self, data: bytes) -> list[Reply | int]:
        """Parse received bytes; returns the requests completed by them: a Reply, or the
        handle alone for a simple success with no data (module docstring)."""
        if len(data) == _SIMPLE_SIZE and self._pos == len(self._buf) and not self._left:
            # one simple reply alone (a WRITE's answer at queue depth 1): no loop
            magic, error, handle = _unpack_simple(data)
            pending = self._pending
            if magic == SIMPLE_REPLY_MAGIC and type(pending.get(handle)) is int:
                del pending[handle]
                return [Reply(handle, error) if error else handle]
        if self._pos < len(self._buf):
            data = self._buf[self._pos :] + data
        out: list[Reply | int] = []
        pending = self._pending
        mv = memoryview(data)
        pos = 0
        end = len(data)
        while True:
            if self._left:
                dst = self._dst
                assert dst is not None
                n = min(self._left, end - pos)
                dst[self._dst_pos : self._dst_pos + n] = mv[pos : pos + n]
                self._dst_pos += n
                self._left -= n
                pos += n
                if self._left:
                    break
                self._dst = None
                if self._copy_final:
                    out.append(self._finish(self._copy_handle))
                continue
            while end - pos >= _SIMPLE_SIZE:  # simple replies with no data (the common
                magic, error, handle = _unpack_simple(data, pos)  # case: one unpack each)
                if magic != SIMPLE_REPLY_MAGIC or type(pending.get(handle)) is not int:
                    break
                del pending[handle]
                out.append(Reply(handle, error) if error else handle)
                pos += _SIMPLE_SIZE
            if end - pos < 4:
                break
            (magic,) = wire.U32.unpack_from(data, pos)
            if magic == SIMPLE_REPLY_MAGIC:
                n = self._simple(data, mv, pos, out)
            elif magic == STRUCTURED_REPLY_MAGIC:
                if not self.structured:
                    raise ProtocolError("structured reply without negotiation")
                n = self._chunk(data, mv, pos, out)
            else:
                raise ProtocolError(f"bad reply magic 0x{magic:08x}")
            if not n:
                break
            pos += n
        self._buf = data
        self._pos = pos
        return out

    def _lookup(self, handle: int) -> _Pending:
        p = self._pending.get(handle)
        if p is None:
            raise ProtocolError(f"reply for unknown handle 0x{handle:x}")
        if isinstance(p, int):
            p = self._pending[handle] = _Pending(p, 0, 0)
        return p

    def replies(self, data: bytes) -> list[Reply]:
        """:meth:`feed`, every answer a Reply."""
        return [Reply(r) if isinstance(r, int) else r for r in self.feed(data)]

    def _simple(self, data: bytes, mv: memoryview, pos: int, out: list[Reply | int]) -> int:
        if len(data) - pos < _SIMPLE_SIZE:
            return 0
        _, error, handle = _unpack_simple(data, pos)
        p = self._pending.get(handle)
        if p is None:
            raise ProtocolError(f"reply for unknown handle 0x{handle:x}")
        # nothing follows but for a successful READ (a WRITE's answer: ``p`` an int)
        if isinstance(p, int) or p.cmd != _READ or error:
            del self._pending[handle]
            out.append(handle if isinstance(p, int) and not error else Reply(handle, error))
            return _SIMPLE_SIZE
        pos += _SIMPLE_SIZE
        if len(data) - pos >= p.length:
            del self._pending[handle]
            out.append(Reply(handle, 0, "", bytes(mv[pos : pos + p.length])))
            return _SIMPLE_SIZE + p.length
        p.buf = bytearray(p.length)
        p.covered = p.length
        self._start_copy(p.buf, 0, p.length, handle, final=True)
        return _SIMPLE_SIZE

    def _start_copy(self, dst: bytearray, at: int, n: int, handle: int, *, final: bool) -> None:
        self._dst, self._dst_pos, self._left = dst, at, n
        self._copy_handle, self._copy_final = handle, final

    def _chunk(self, data: bytes, mv: memoryview, pos: int, out: list[Reply | int]) -> int:
        avail = len(data) - pos
        if avail < wire.CHUNK_SIZE:
            return 0
        _, flags, typ, handle, length = wire.CHUNK.unpack_from(data, pos)
        p = self._lookup(handle)
        done = bool(flags & _DONE)
        if typ == ReplyType.OFFSET_DATA:
            if p.cmd != _READ or length < 9:
                raise ProtocolError("bad OFFSET_DATA chunk")
            if avail < wire.CHUNK_DATA.size:
                return 0
            (off,) = wire.U64.unpack_from(data, pos + wire.CHUNK_SIZE)
            n: int = length - 8
            rel = off - p.offset
            if rel < 0 or rel + n > p.length:
                raise ProtocolError("OFFSET_DATA chunk outside the request")
            p.covered += n
            start = pos + wire.CHUNK_DATA.size
            if done and n == p.length and p.buf is None and avail - 28 >= n:
                p.data = bytes(mv[start : start + n])
                out.append(self._finish(handle))
                return wire.CHUNK_DATA.size + n
            if p.buf is None:
                p.buf = bytearray(p.length)
            self._start_copy(p.buf, rel, n, handle, final=done)
            return wire.CHUNK_DATA.size
        if length > MAX_CHUNK:
            raise ProtocolError(f"reply chunk too long ({length} bytes)")
        if avail < wire.CHUNK_SIZE + length:
            return 0
        start = pos + wire.CHUNK_SIZE
        self._chunk_payload(p, typ, done, bytes(mv[start : start + length]))
        if done:
            out.append(self._finish(handle))
        consumed: int = wire.CHUNK_SIZE + length
        return consumed

    def _chunk_payload(self, p: _Pending, typ: int, done: bool, payload: bytes) -> None:
        length = len(payload)
        if typ == ReplyType.NONE:
            if length or not done:
                raise ProtocolError("bad NBD_REPLY_TYPE_NONE chunk")
        elif typ == ReplyType.OFFSET_HOLE:
            if p.cmd != _READ or length != 12:
                raise ProtocolError("bad OFFSET_HOLE chunk")
            off, size = _hole(payload)
            rel = off - p.offset
            if size == 0 or rel < 0 or rel + size > p.length:
                raise ProtocolError("OFFSET_HOLE chunk outside the request")
            p.covered += size
            if p.buf is None:
                p.buf = bytearray(p.length)
        elif typ == ReplyType.BLOCK_STATUS:
            if p.cmd != Cmd.BLOCK_STATUS or length < 12 or (length - 4) % 8:
                raise ProtocolError("bad BLOCK_STATUS chunk")
            (ctx,) = wire.U32.unpack_from(payload)
            extents = [wire.EXTENT.unpack_from(payload, i) for i in range(4, length, 8)]
            if any(n == 0 for n, _ in extents):
                raise ProtocolError("zero-length extent")
            if self.context_id in (0, ctx):
                p.extents = [(int(n), int(f)) for n, f in extents]
        elif is_error_chunk(typ):
            if length < 6:
                raise ProtocolError("error chunk too short")
            error, msglen = wire.ERROR_HEAD.unpack_from(payload)
            tail = 8 if typ == ReplyType.ERROR_OFFSET else 0
            if error == 0 or 6 + msglen + tail > length:
                raise ProtocolError("malformed error chunk")
            if not p.error:
                p.error = error
                p.message = payload[6 : 6 + msglen].decode("utf-8", "replace")
        else:
            raise ProtocolError(f"unknown reply chunk type {typ}")

    def _finish(self, handle: int) -> Reply:
        p = self._pending.pop(handle)
        assert isinstance(p, _Pending)  # a chunk came for it: _lookup made one
        if p.error:
            return Reply(handle, p.error, p.message)
        if p.cmd == _READ:
            if p.covered != p.length:
                raise ProtocolError("READ reply does not cover the request")
            data = p.data if p.data is not None else p.buf
            return Reply(handle, 0, "", data if data is not None else b"")
        if p.cmd == Cmd.BLOCK_STATUS:
            if not p.extents and self.structured:
                raise ProtocolError("BLOCK_STATUS reply without extents")
            return Reply(handle, 0, "", None, p.extents)
        return Reply(handle)


def _hole(payload: bytes) -> tuple[int, int]:
    off, size = wire.HOLE.unpack(payload)
    return int(off), int(size)
