"""Sans-IO codec: both sides, fed whole, byte by byte and with trailing data."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable

import pytest

from dst.errors import ProtocolError
from dst.nbd import requests as rq
from dst.nbd import wire
from dst.nbd.client import (
    ClientHandshake,
    encode_go,
    encode_meta_context,
    parse_info,
    parse_meta_context,
    parse_server,
)
from dst.nbd.constants import (
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Info,
    NbdErr,
    Opt,
    Rep,
    ReplyType,
)
from dst.nbd.events import (
    Aborted,
    ExportInfo,
    ExportNameReply,
    ExportNameRequest,
    Greeting,
    InfoRequest,
    ListRequest,
    MetaContextRequest,
    OptionReply,
    ServerEvent,
)
from dst.nbd.replies import ReplyParser
from dst.nbd.server import ServerHandshake

INFO = ExportInfo(size=1 << 20, flags=0x1ED, description="disk")


def chunks(data: bytes, mode: str) -> Iterable[bytes]:
    if mode == "whole":
        yield data
    else:
        for i in range(len(data)):
            yield data[i : i + 1]


def option(opt: int, payload: bytes = b"") -> bytes:
    return wire.OPTION.pack(IHAVEOPT, opt, len(payload)) + payload


def server_events(hs: ServerHandshake, data: bytes, mode: str) -> list[ServerEvent]:
    events = []
    for piece in chunks(data, mode):
        hs.receive_data(piece)
        while (ev := hs.next_event()) is not None:
            events.append(ev)
            answer(hs, ev)
    return events


def answer(hs: ServerHandshake, ev: ServerEvent) -> None:
    if isinstance(ev, ListRequest):
        hs.send_export_list([("a", "first"), ("b", "")])
    elif isinstance(ev, MetaContextRequest):
        hs.send_meta_contexts()
    elif isinstance(ev, (InfoRequest, ExportNameRequest)):
        if ev.name == "missing":
            hs.refuse(Rep.ERR_UNKNOWN, "no such export")
        else:
            hs.accept_export(INFO)


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        magic, opt, rep, n = wire.OPTION_REPLY.unpack_from(data, pos)
        assert magic == OPT_REPLY_MAGIC
        out.append((opt, rep, data[pos + 20 : pos + 20 + n]))
        pos += 20 + n
    return out


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_server_handshake_go(mode: str) -> None:
    hs = ServerHandshake()
    greeting = hs.data_to_send()
    assert greeting == wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 3)
    stream = (
        struct.pack(">I", 3)
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.SET_META_CONTEXT, encode_meta_context("x", ("base:allocation",)))
        + option(Opt.STARTTLS)
        + option(99, b"junk")
        + option(Opt.GO, encode_go("x", (Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION)))
    )
    trailing = wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 7, 0, 512)
    events = server_events(hs, stream + trailing, mode)
    assert [type(e) for e in events] == [MetaContextRequest, InfoRequest]
    assert hs.in_transmission and hs.structured_replies and hs.no_zeroes
    assert hs.meta_contexts == {"base:allocation": 1}
    replies = option_replies(hs.data_to_send())
    kinds = [(o, r) for o, r, _ in replies]
    assert kinds[:4] == [
        (Opt.STRUCTURED_REPLY, Rep.ACK),
        (Opt.SET_META_CONTEXT, Rep.META_CONTEXT),
        (Opt.SET_META_CONTEXT, Rep.ACK),
        (Opt.STARTTLS, Rep.ERR_POLICY),
    ]
    assert kinds[4] == (99, Rep.ERR_UNSUP)
    infos = [parse_info(p) for o, r, p in replies if r == Rep.INFO]
    assert (Info.EXPORT, (1 << 20, 0x1ED)) in infos
    assert (Info.BLOCK_SIZE, (1, 4096, 32 << 20)) in infos
    assert (Info.NAME, "x") in infos and (Info.DESCRIPTION, "disk") in infos
    assert kinds[-1] == (Opt.GO, Rep.ACK)
    parser = hs.start_transmission(max_payload=1 << 20)
    (req,) = parser.requests()
    assert (req.type, req.handle, req.length) == (Cmd.READ, 7, 512)


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_server_handshake_export_name_with_zeroes(mode: str) -> None:
    hs = ServerHandshake()
    hs.data_to_send()
    events = server_events(hs, struct.pack(">I", 1) + option(Opt.EXPORT_NAME, b"disk"), mode)
    assert events == [ExportNameRequest("disk")]
    out = hs.data_to_send()
    assert out == wire.EXPORT_NAME_REPLY.pack(1 << 20, 0x1ED) + bytes(124)
    assert hs.in_transmission


def test_server_list_info_abort_and_errors() -> None:
    hs = ServerHandshake()
    hs.data_to_send()
    stream = (
        struct.pack(">I", 1)
        + option(Opt.LIST)
        + option(Opt.LIST, b"x")  # LIST with data: ERR_INVALID
        + option(Opt.INFO, encode_go("missing"))
        + option(Opt.INFO, b"\x00\x00\x00\x09ab")  # name overruns payload
        + option(Opt.LIST_META_CONTEXT, encode_meta_context("a", ()))  # no structured
        + option(Opt.ABORT)
    )
    events = server_events(hs, stream, "whole")
    assert [type(e) for e in events] == [ListRequest, InfoRequest, Aborted]
    assert hs.closed
    replies = option_replies(hs.data_to_send())
    assert [parse_server(p) for _, r, p in replies if r == Rep.SERVER] == [
        ("a", "first"),
        ("b", ""),
    ]
    errors = [(o, r) for o, r, _ in replies if r & (1 << 31)]
    assert errors == [
        (Opt.LIST, Rep.ERR_INVALID),
        (Opt.INFO, Rep.ERR_UNKNOWN),
        (Opt.INFO, Rep.ERR_INVALID),
        (Opt.LIST_META_CONTEXT, Rep.ERR_INVALID),
    ]
    assert replies[-1][:2] == (Opt.ABORT, Rep.ACK)


def test_server_oversized_option_is_skipped() -> None:
    hs = ServerHandshake()
    hs.data_to_send()
    big = MAX_OPTION_LENGTH + 10
    hs.receive_data(struct.pack(">I", 3) + wire.OPTION.pack(IHAVEOPT, Opt.GO, big))
    assert hs.next_event() is None
    assert option_replies(hs.data_to_send()) == [(Opt.GO, Rep.ERR_TOO_BIG, b"option too long")]
    hs.receive_data(bytes(big) + option(Opt.LIST))
    assert isinstance(hs.next_event(), ListRequest)


@pytest.mark.parametrize(
    "stream",
    [
        struct.pack(">I", 0x80),  # unknown client flag
        struct.pack(">I", 1) + b"NOTMAGIC" + bytes(8),  # bad option magic
        struct.pack(">I", 1) + wire.OPTION.pack(IHAVEOPT, Opt.EXPORT_NAME, 1 << 20),
        struct.pack(">I", 1) + option(Opt.EXPORT_NAME, b"\xff\xfe"),  # not UTF-8
        struct.pack(">I", 0) + option(Opt.LIST),  # not fixed newstyle
    ],
)
def test_server_handshake_violations(stream: bytes) -> None:
    hs = ServerHandshake()
    hs.receive_data(stream)
    with pytest.raises(ProtocolError):
        while hs.next_event() is not None:
            pass


def test_client_and_server_handshake_together() -> None:
    client, server = ClientHandshake(), ServerHandshake()

    def pump() -> list[object]:
        events: list[object] = []
        for _ in range(10):
            server.receive_data(client.data_to_send())
            while (ev := server.next_event()) is not None:
                answer(server, ev)
            client.receive_data(server.data_to_send())
            while (cev := client.next_event()) is not None:
                events.append(cev)
        return events

    assert pump() == [Greeting(3)]
    client.send_option(Opt.STRUCTURED_REPLY)
    assert pump() == [OptionReply(Opt.STRUCTURED_REPLY, Rep.ACK, b"", True)]
    client.send_option(Opt.SET_META_CONTEXT, encode_meta_context("a", ("base:",)))
    replies = pump()
    assert isinstance(replies[0], OptionReply)
    assert parse_meta_context(replies[0].payload) == (1, "base:allocation")
    client.send_option(Opt.EXPORT_NAME, b"a")
    assert pump() == [ExportNameReply(1 << 20, 0x1ED)]
    assert client.in_transmission and server.in_transmission


def test_client_rejects_bad_server() -> None:
    for greeting in (b"NOTMAGIC" + bytes(10), wire.GREETING.pack(NBDMAGIC, 0x00420281861253, 0)):
        c = ClientHandshake()
        c.receive_data(greeting)
        with pytest.raises(ProtocolError):
            c.next_event()
    c = ClientHandshake()
    c.receive_data(wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 3))
    c.next_event()
    c.send_option(Opt.LIST)
    c.receive_data(wire.option_reply(Opt.GO, Rep.ACK))  # reply to the wrong option
    with pytest.raises(ProtocolError):
        c.next_event()


# --- transmission: requests ------------------------------------------------------


def req(typ: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return wire.REQUEST.pack(REQUEST_MAGIC, flags, typ, handle, offset, length)


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_request_parser(mode: str) -> None:
    payload = bytes(range(256)) * 40
    stream = (
        req(Cmd.READ, 1, 0, 4096)
        + req(Cmd.WRITE, 2, 4096, len(payload), 1)
        + payload
        + req(Cmd.FLUSH, 3, 0, 0)
        + req(Cmd.WRITE, 4, 0, 100)
        + bytes(100)
        + req(Cmd.DISC, 5, 0, 0)
    )
    parser = rq.RequestParser(max_payload=1 << 20, bufsize=1024)
    got = []
    for piece in chunks(stream + b"\x25\x60", mode):  # trailing partial header
        parser.feed(piece)
        got += parser.requests()
    assert [(r.type, r.handle, r.flags) for r in got] == [
        (Cmd.READ, 1, 0),
        (Cmd.WRITE, 2, 1),
        (Cmd.FLUSH, 3, 0),
        (Cmd.WRITE, 4, 0),
        (Cmd.DISC, 5, 0),
    ]
    assert got[1].data is not None and bytes(got[1].data) == payload
    assert parser.buffered == 2


def test_request_parser_limit_and_oversized_write() -> None:
    parser = rq.RequestParser(max_payload=1000)
    parser.feed(b"".join(req(Cmd.READ, i, 0, 1) for i in range(10)))
    assert [r.handle for r in parser.requests(3)] == [0, 1, 2]
    assert len(parser.requests()) == 7
    # A 5000-byte WRITE over the limit is reported without data and drained.
    parser.feed(req(Cmd.WRITE, 9, 0, 5000) + bytes(3000))
    (big,) = parser.requests()
    assert big.data is None and big.length == 5000
    parser.feed(bytes(2000) + req(Cmd.FLUSH, 10, 0, 0))
    assert [r.handle for r in parser.requests()] == [10]


def test_request_parser_offers_writes_inline_until_one_is_returned() -> None:
    parser = rq.RequestParser()
    parser.feed(
        req(Cmd.WRITE, 1, 0, 3) + b"one" + req(Cmd.WRITE, 2, 8, 3) + b"two"
        + req(Cmd.WRITE, 3, 16, 5) + b"three" + req(Cmd.READ, 4, 0, 3)
        + req(Cmd.WRITE, 5, 24, 4) + b"four" + req(Cmd.WRITE, 6, 32, 10) + b"part"
    )  # fmt: skip
    seen: list[tuple[int, int, int, int, bytes]] = []

    def inline(typ: int, flags: int, handle: int, offset: int, length: int,
               data: memoryview | None) -> bool:  # fmt: skip
        assert typ == Cmd.WRITE and data is not None
        seen.append((flags, handle, offset, length, bytes(data)))
        return handle != 3  # declined: returned as a request, and nothing more inline

    out = parser.requests(inline=inline)
    assert seen == [(0, 1, 0, 3, b"one"), (0, 2, 8, 3, b"two"), (0, 3, 16, 5, b"three")]
    assert [(r.handle, r.data) for r in out] == [(3, b"three"), (4, None), (5, b"four")]
    parser.feed(b"ial!!!")  # the rest of write 6 (it came in two pieces: never inline)
    (last,) = parser.requests(inline=inline)
    assert last.handle == 6 and bytes(last.data or b"") == b"partial!!!" and len(seen) == 3


def test_request_parser_offers_reads_inline_within_the_budget() -> None:
    parser = rq.RequestParser()
    parser.feed(b"".join(req(Cmd.READ, i, i * 100, 100) for i in range(4)))
    seen: list[int] = []

    def inline(typ: int, flags: int, handle: int, offset: int, length: int,
               data: memoryview | None) -> bool:  # fmt: skip
        assert typ == Cmd.READ and data is None
        seen.append(handle)
        return True

    # the first goes free, but once one is served the others count against the budget
    assert parser.requests(budget=50, first_free=True, inline=inline) == []
    assert seen == [0] and parser.blocked == 100
    assert parser.requests(budget=250, inline=inline) == []
    assert seen == [0, 1, 2] and parser.blocked == 100
    assert parser.requests(budget=1000, inline=inline) == [] and seen == [0, 1, 2, 3]


def test_request_parser_bad_magic() -> None:
    parser = rq.RequestParser()
    parser.feed(req(Cmd.READ, 1, 0, 1) + b"\x00" * 28)
    with pytest.raises(ProtocolError):
        parser.requests()


# --- transmission: replies -----------------------------------------------------------


def chunk(typ: int, handle: int, payload: bytes, done: bool = True) -> bytes:
    return wire.CHUNK.pack(STRUCTURED_REPLY_MAGIC, int(done), typ, handle, len(payload)) + payload


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_reply_parser_structured(mode: str) -> None:
    p = ReplyParser(structured=True, context_id=1)
    h_read, _ = p.request(Cmd.READ, 1000, 300)
    h_read2, _ = p.request(Cmd.READ, 0, 64)
    h_bs, _ = p.request(Cmd.BLOCK_STATUS, 0, 8192)
    h_err, _ = p.request(Cmd.WRITE, 0, 10)
    h_flush, _ = p.request(Cmd.FLUSH)
    data = bytes(range(200))
    stream = (
        chunk(ReplyType.OFFSET_DATA, h_read, struct.pack(">Q", 1100) + data, done=False)
        + rq.error_reply(h_err, NbdErr.ENOSPC, "full", structured=True)
        + chunk(ReplyType.OFFSET_HOLE, h_read, struct.pack(">QI", 1000, 100), done=False)
        + rq.data_chunk(h_read2, 0, 64)
        + bytes(64)
        + rq.block_status_chunk(h_bs, 1, [(4096, 0), (4096, 3)])
        + rq.done_chunk(h_read)
        + rq.simple_reply(h_flush)
    )
    got = {}
    for piece in chunks(stream, mode):
        for r in p.replies(piece):
            got[r.handle] = r
    assert got[h_read].data == bytes(100) + data
    assert got[h_read2].data == bytes(64)
    assert got[h_bs].extents == [(4096, 0), (4096, 3)]
    assert (got[h_err].error, got[h_err].message) == (NbdErr.ENOSPC, "full")
    assert got[h_flush].error == 0
    assert p.outstanding == 0


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_reply_parser_simple(mode: str) -> None:
    p = ReplyParser(structured=False)
    h1, _ = p.request(Cmd.READ, 0, 700)
    h2, _ = p.request(Cmd.READ, 0, 10)
    h3, _ = p.request(Cmd.TRIM, 0, 10)
    stream = (
        rq.simple_reply(h2, NbdErr.EIO)
        + rq.simple_reply(h1)
        + b"x" * 700
        + rq.simple_reply(h3)
        + b"\x67\x44"  # trailing partial
    )
    got = [r for piece in chunks(stream, mode) for r in p.feed(piece)]
    # a plain success with no data is its handle alone (no object per WRITE's answer)
    assert got[2] == h3
    replies = [r for r in got if not isinstance(r, int)]
    assert [(r.handle, r.error) for r in replies] == [(h2, NbdErr.EIO), (h1, 0)]
    assert replies[1].data == b"x" * 700


def test_reply_parser_one_reply_per_receive() -> None:
    """Each reply alone in its receive (every answer at queue depth 1)."""
    p = ReplyParser(structured=False)
    w1, _ = p.request(Cmd.WRITE, 0, 10)
    w2, _ = p.request(Cmd.WRITE, 0, 10)
    r, _ = p.request(Cmd.READ, 0, 16)
    assert p.feed(rq.simple_reply(w1)) == [w1]
    [err] = p.feed(rq.simple_reply(w2, NbdErr.ENOSPC))
    assert not isinstance(err, int)
    assert (err.handle, err.error) == (w2, NbdErr.ENOSPC)
    assert p.feed(rq.simple_reply(r)) == []  # a READ's header: its 16 bytes of data follow
    [got] = p.feed(b"y" * 16)
    assert not isinstance(got, int)
    assert (got.handle, got.data) == (r, b"y" * 16)
    assert p.outstanding == 0
    with pytest.raises(ProtocolError):
        p.feed(rq.simple_reply(w1))  # answered already


@pytest.mark.parametrize(
    "reply",
    [
        rq.simple_reply(999),  # unknown handle
        b"\xde\xad\xbe\xef" + bytes(20),  # bad magic
        chunk(ReplyType.OFFSET_DATA, 1, struct.pack(">Q", 4096) + b"x"),  # outside request
        chunk(ReplyType.NONE, 1, b"", done=False),  # NONE without DONE
        chunk(ReplyType.BLOCK_STATUS, 1, b"\x00\x00\x00\x01"),  # BS for a READ, no extents
        chunk(ReplyType.ERROR, 1, struct.pack(">IH", 5, 100) + b"short"),  # msg overruns
        chunk(77, 1, b""),  # unknown non-error type
        chunk(ReplyType.OFFSET_DATA, 1, struct.pack(">Q", 0) + b"x"),  # done, not covered
    ],
)
def test_reply_parser_violations(reply: bytes) -> None:
    p = ReplyParser(structured=True)
    p.request(Cmd.READ, 0, 4096)
    with pytest.raises(ProtocolError):
        p.feed(reply)


@pytest.mark.parametrize(
    ("length", "arrived", "heap"),
    [
        (64 << 10, 0, True),  # small: always a heap buffer
        (1 << 20, 128 << 10, True),  # an eighth came with the header (an honest 1 MiB write)
        (1 << 20, 100, False),  # a header and a few bytes: a mapping, filled as data arrives
        (2 << 20, 1 << 20, True),
        (32 << 20, 256 << 10, False),  # large: always a mapping
    ],
)
def test_payload_buffers_are_sized_by_what_arrived(length: int, arrived: int, heap: bool) -> None:
    buf = rq.payload_buffer(length, arrived)
    assert len(buf) == length and not buf.readonly
    assert isinstance(buf.obj, mmap.mmap) is not heap  # heap: not zeroed, every byte comes
    if not heap:
        assert not any(bytes(buf[-4096:]))  # an anonymous mapping starts zeroed
