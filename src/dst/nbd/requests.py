"""Server side of the transmission phase, sans-IO: the request parser and reply encoders.

Theory of operation
-------------------
This is the hot path.  The parser owns its receive buffer and speaks the
``BufferedProtocol`` interface: :meth:`RequestParser.get_buffer` says where the socket
should put the next bytes, :meth:`RequestParser.buffer_updated` how many came.
:meth:`RequestParser.requests` walks the buffer with one precompiled
:class:`struct.Struct`, producing many :class:`~dst.nbd.events.Request` objects per
call.  A WRITE payload wholly inside the buffer is copied out as ``bytes`` (the buffer
is reused); one that is not is assembled in a buffer of exactly its announced length --
allocated only after the length was checked against ``max_payload``, and for a large one
from an anonymous mapping whose pages exist only once data lands in them, so a header
announcing 32 MiB costs nothing until the bytes arrive -- and ``get_buffer`` then
returns the rest of that payload, so the kernel copies it straight into place
(:attr:`RequestParser.pending` says how much of it came so far).  A larger payload is
drained (counted, never buffered) and its request is reported with ``data=None`` so the
server can answer EINVAL without losing framing.  Only a bad request magic breaks
framing; it raises :class:`dst.errors.ProtocolError`.

``requests(limit, budget)`` parses at most ``limit`` requests, and stops before a READ
or a complete WRITE whose payload (:func:`cost`) would exceed ``budget`` bytes, so the
shell can apply backpressure in requests and in bytes; the rest stays buffered for the
next call (:attr:`RequestParser.blocked` is the cost of the request it stopped at).
Fewer than ``limit`` requests and not blocked: every complete request buffered was
returned, so another call before more bytes arrive would find none.

Replies are built as small header ``bytes`` to be written followed by the payload
(``transport.writelines([header, data])``), never concatenated with it.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from functools import partial

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
_READ = int(Cmd.READ)
_DONE = int(ReplyFlags.DONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_REQ_SIZE = wire.REQUEST_SIZE
_unpack_request = wire.REQUEST.unpack_from
_pack_simple = wire.SIMPLE_REPLY.pack
_pack_data = wire.CHUNK_DATA.pack
RECV_BUFFER = 256 << 10  # receive buffer size; large WRITE payloads bypass it
MAPPED_PAYLOAD = 1 << 20  # a partial payload this large is received into a mapping ...
EAGER_PAYLOAD = 2 << 20  # ... unless it is at most this large and an eighth has arrived
UNLIMITED = 1 << 62

Inline = Callable[[int, int, int, int, int, memoryview | None], bool]
"""``inline(type, flags, handle, offset, length, payload)``: a READ or WRITE served at
once (True)."""
Runs = Callable[[bytearray, int, int, int], tuple[int, int]]
"""``runs(buffer, pos, end, budget) -> (pos, used)``: the requests from ``pos`` on served at
once, as many as it takes (``dst.device.BlockDevice.inline_runs``); where it stopped, and
the bytes of READ data it served."""


def cost(typ: int, length: int) -> int:
    """The bytes a request holds while it is served: a READ's reply data, a WRITE's
    payload; nothing for the other commands."""
    return length if typ in (_READ, _WRITE) else 0


def payload_buffer(length: int, arrived: int) -> memoryview:
    """A buffer of ``length`` bytes, ``arrived`` of them received with the header.

    A large one costs memory only as it fills (an anonymous mapping: the kernel supplies
    a page when it is first written), so a header alone never allocates its payload;
    but a mapping costs a page fault per page and an munmap, a third of a node's CPU on
    1 MiB writes.  So a payload up to :data:`EAGER_PAYLOAD` that came with an eighth of
    its bytes (an honest client sends them together) gets a heap buffer: a client
    must send 1 byte in 8 to make the process hold the rest.  The heap buffer is not
    zeroed (``numpy.empty``: 8 % more 1 MiB mirrored writes than a ``bytearray``): the
    request is only handed on once every byte of it was received."""
    if length < MAPPED_PAYLOAD or (length <= EAGER_PAYLOAD and arrived * 8 >= length):
        import numpy  # here: a process that never gets one does not load numpy

        return numpy.empty(length, dtype=numpy.uint8).data
    return memoryview(mmap.mmap(-1, length))


class RequestParser:
    """Incremental parser of client requests (see module docstring)."""

    __slots__ = (
        "_end",
        "_fill",
        "_pos",
        "_ready",
        "_rx",
        "_skip",
        "_wbuf",
        "_wreq",
        "blocked",
        "max_payload",
    )

    def __init__(self, *, max_payload: int = 32 << 20, bufsize: int = RECV_BUFFER) -> None:
        self.max_payload = max_payload
        self._rx = bytearray(bufsize)  # receive buffer; [_pos, _end) is unparsed
        self._pos = 0
        self._end = 0
        self._wbuf: memoryview | None = None  # a WRITE payload being received
        self._wreq: Request | None = None
        self._fill = 0
        self._skip = 0  # bytes of an oversized WRITE payload still to drain
        self._ready: Request | None = None  # a WRITE whose payload just completed
        self.blocked = 0  # cost of the request the last requests() stopped at (budget)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed."""
        return self._end - self._pos

    @property
    def pending(self) -> int:
        """Bytes of a WRITE payload received so far while it is incomplete (its buffer
        grows in memory as they come)."""
        return self._fill if self._wbuf is not None else 0

    @property
    def payload_left(self) -> int:
        """Bytes of an incomplete WRITE payload still to come (0: none in progress)."""
        wbuf = self._wbuf
        return len(wbuf) - self._fill if wbuf is not None else 0

    def get_buffer(self) -> memoryview:
        """Where the next received bytes should go (``BufferedProtocol.get_buffer``).

        While a large WRITE payload is arriving this is the rest of the payload
        buffer itself, so the socket fills it without an intermediate copy.
        """
        if self._wbuf is not None:
            return memoryview(self._wbuf)[self._fill :]
        rx = self._rx
        if self._end == len(rx):
            if self._pos:
                n = self._end - self._pos
                rx[:n] = rx[self._pos : self._end]
                self._pos, self._end = 0, n
            else:  # full of unparsed bytes (a reader ignored backpressure): grow
                rx = bytearray(2 * len(rx))
                rx[: self._end] = self._rx
                self._rx = rx
        return memoryview(rx)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last :meth:`get_buffer`."""
        wbuf = self._wbuf
        if wbuf is None:
            self._end += nbytes
            return
        self._fill += nbytes
        if self._fill == len(wbuf):
            req = self._wreq
            assert req is not None
            req.data = wbuf
            self._ready = req
            self._wbuf = self._wreq = None

    def feed(self, data: Payload) -> None:
        """Append received bytes (copying them); convenient for tests and handshakes."""
        mv = memoryview(data).cast("B")
        while mv:
            with self.get_buffer() as buf:
                n = min(len(buf), len(mv))
                buf[:n] = mv[:n]
            self.buffer_updated(n)
            mv = mv[n:]

    def requests(
        self,
        limit: int = 1 << 30,
        budget: int = UNLIMITED,
        *,
        first_free: bool = False,
        inline: Inline | None = None,
        runs: Runs | None = None,
    ) -> list[Request]:
        """Parse up to ``limit`` complete requests holding at most ``budget`` bytes of
        payload (module docstring); with ``first_free`` the first one goes whatever it
        holds.  Raises ProtocolError on bad magic.

        ``inline(type, flags, handle, offset, length, payload)`` is offered every WRITE
        of at most ``max_payload`` bytes whose payload is in the buffer and every READ
        within the budget (it holds its
        bytes as any READ does), while no request was returned yet (so requests are
        still served in the order they came): True, it was served -- a WRITE's
        ``payload``, a view of the buffer, is not kept -- and is not returned.  ``runs``
        is offered the buffer from the next request on, on the same terms, before it is
        parsed here: what it served is not returned, the READ data it served counts
        against the budget."""
        out: list[Request] = []
        self.blocked = 0
        if self._ready is not None:  # its bytes came in, counted as they did
            out.append(self._ready)
            self._ready = None
        if self._wbuf is not None:
            return out
        rx = self._rx
        pos = self._pos
        end = self._end
        if self._skip:
            n = min(self._skip, end - pos)
            self._skip -= n
            pos += n
        view = None
        max_payload = self.max_payload
        while pos + _REQ_SIZE <= end and len(out) < limit:
            if runs is not None and not out:
                pos, used = runs(rx, pos, end, budget)
                if used:  # READs served, their bytes held: no other goes free
                    budget -= used
                    first_free = False
                if pos + _REQ_SIZE > end:
                    break
            magic, flags, typ, handle, offset, length = _unpack_request(rx, pos)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic 0x{magic:08x}")
            if typ == _WRITE and length <= max_payload:
                start = pos + _REQ_SIZE
                stop = start + length
                if stop <= end:  # a WRITE whose payload is here (the common case)
                    if inline is not None and not out:
                        if view is None:
                            view = memoryview(rx)
                        if inline(_WRITE, flags, handle, offset, length, view[start:stop]):
                            pos = stop
                            continue
                    if length > budget and length and (out or not first_free):
                        self.blocked = length  # (a request that holds nothing is never held)
                        break
                    budget -= length
                    out.append(Request(flags, _WRITE, handle, offset, length, rx[start:stop]))
                    pos = stop
                    continue
            if typ == _READ and length <= max_payload:  # (a longer one, refused, holds none)
                if length > budget and length and (out or not first_free):
                    self.blocked = length
                    break
                budget -= length
            pos += _REQ_SIZE
            if typ != _WRITE:
                if (
                    typ == _READ
                    and inline is not None
                    and not out
                    and inline(_READ, flags, handle, offset, length, None)
                ):
                    first_free = False  # served, its bytes held: no other goes free
                else:
                    out.append(Request(flags, typ, handle, offset, length))
                continue
            if length > max_payload:  # drained unserved
                out.append(Request(flags, typ, handle, offset, length, None))
                n = min(length, end - pos)
                pos += n
                self._skip = length - n
                if self._skip:
                    break
                continue
            n = end - pos  # a WRITE whose payload is still arriving
            wbuf = payload_buffer(length, n)
            wbuf[:n] = memoryview(rx)[pos:end]
            pos = end
            self._wbuf, self._fill = wbuf, n
            self._wreq = Request(flags, typ, handle, offset, length, None)
            break
        if pos == end:
            pos = end = 0
        self._pos, self._end = pos, end
        return out

    def serve(self, runs: Runs, budget: int) -> tuple[bool, int]:
        """Offer ``runs`` every buffered request (as :meth:`requests` does, without
        parsing any here): (all of them were served, bytes of READ data served)."""
        if self._wbuf is not None or self._ready is not None or self._skip:
            return False, 0
        end = self._end
        pos, used = runs(self._rx, self._pos, end, budget)
        if pos == end:
            self._pos = self._end = 0
            return True, used
        self._pos = pos
        return False, used


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header (followed by the data for a successful simple READ)."""
    return _pack_simple(SIMPLE_REPLY_MAGIC, error, handle)


simple_ok: Callable[[int], bytes] = partial(_pack_simple, SIMPLE_REPLY_MAGIC, 0)
"""``simple_ok(handle)``: :func:`simple_reply` of a success, with no Python frame (every
WRITE's reply is one)."""


def data_chunk(handle: int, offset: int, length: int, *, done: bool = True) -> bytes:
    """Header of an OFFSET_DATA chunk carrying ``length`` data bytes (written after it)."""
    flags = _DONE if done else 0
    return _pack_data(STRUCTURED_REPLY_MAGIC, flags, _OFFSET_DATA, handle, 8 + length, offset)


data_ok: Callable[[int, int, int], bytes] = partial(
    _pack_data, STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA
)
"""``data_ok(handle, 8 + length, offset)``: :func:`data_chunk` of a whole READ's data, with
no Python frame (a READ's reply when structured replies are on)."""


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
