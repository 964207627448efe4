"""Hypothesis: arbitrary or mutated bytes either parse or raise ProtocolError."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from dst.errors import ProtocolError
from dst.nbd import requests as rq
from dst.nbd import wire
from dst.nbd.client import ClientHandshake, encode_go, encode_meta_context
from dst.nbd.constants import IHAVEOPT, NBDMAGIC, REQUEST_MAGIC, Cmd, Info, Opt, ReplyType
from dst.nbd.events import (
    ExportInfo,
    ExportNameRequest,
    InfoRequest,
    ListRequest,
    MetaContextRequest,
    ServerEvent,
)
from dst.nbd.replies import ReplyParser
from dst.nbd.server import ServerHandshake

SETTINGS = settings(max_examples=300, deadline=None)


def _opt(opt: int, payload: bytes = b"") -> bytes:
    return wire.OPTION.pack(IHAVEOPT, opt, len(payload)) + payload


VALID_HANDSHAKE = (
    struct.pack(">I", 3)
    + _opt(Opt.STRUCTURED_REPLY)
    + _opt(Opt.LIST_META_CONTEXT, encode_meta_context("", ()))
    + _opt(Opt.SET_META_CONTEXT, encode_meta_context("", ("base:allocation",)))
    + _opt(Opt.LIST)
    + _opt(Opt.INFO, encode_go("", (Info.NAME, Info.BLOCK_SIZE)))
    + _opt(Opt.GO, encode_go(""))
    + wire.REQUEST.pack(REQUEST_MAGIC, 1, Cmd.WRITE, 1, 0, 8)
    + bytes(8)
    + wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 2, 0, 8)
)

VALID_REPLIES = (
    rq.data_chunk(1, 0, 8, done=False)
    + bytes(8)
    + rq.hole_chunk(1, 8, 8)
    + rq.done_chunk(1)
    + rq.simple_reply(2, 5)
    + rq.block_status_chunk(3, 1, [(8, 0), (8, 3)])
    + wire.error_chunk(4, 22, "bad", offset=0)
    + rq.simple_reply(5)
)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[: cut % (len(b) + 1)])


_edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6)


def _answer(hs: ServerHandshake, ev: ServerEvent) -> None:
    if isinstance(ev, ListRequest):
        hs.send_export_list([("", "x")])
    elif isinstance(ev, MetaContextRequest):
        hs.send_meta_contexts()
    elif isinstance(ev, (InfoRequest, ExportNameRequest)):
        hs.accept_export(ExportInfo(1 << 20, 1))


def _drive_server(data: bytes, step: int) -> None:
    hs = ServerHandshake()
    parser: rq.RequestParser | None = None
    try:
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            if parser is not None:
                parser.feed(piece)
                parser.requests()
                continue
            hs.receive_data(piece)
            while (ev := hs.next_event()) is not None:
                _answer(hs, ev)
            hs.data_to_send()
            if hs.in_transmission:
                parser = hs.start_transmission(max_payload=4096)
                parser.requests()
    except ProtocolError:
        pass


@SETTINGS
@given(st.binary(max_size=600), st.integers(1, 64))
def test_server_random_bytes(data: bytes, step: int) -> None:
    _drive_server(data, step)


@SETTINGS
@given(_edits, st.integers(0, 1 << 16), st.integers(1, 64))
def test_server_mutated_stream(edits: list[tuple[int, int]], cut: int, step: int) -> None:
    _drive_server(_mutate(VALID_HANDSHAKE, edits, cut), step)


@SETTINGS
@given(st.binary(max_size=600), st.integers(1, 64))
def test_request_parser_random_bytes(data: bytes, step: int) -> None:
    parser = rq.RequestParser(max_payload=256, bufsize=64)
    try:
        for i in range(0, len(data), step):
            parser.feed(data[i : i + step])
            for r in parser.requests():
                assert r.type != Cmd.WRITE or r.data is None or len(r.data) == r.length
    except ProtocolError:
        pass


_requests = st.lists(
    st.tuples(st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.FLUSH]), st.integers(0, 300)),
    min_size=1, max_size=12,
)  # fmt: skip


@SETTINGS
@given(_requests, st.integers(1, 64), st.integers(1, 5), st.integers(0, 700))
def test_request_parser_returns_all_it_can_or_says_why(
    reqs: list[tuple[Cmd, int]], step: int, limit: int, budget: int
) -> None:
    """Every call returns ``limit`` requests, stops at the budget (``blocked``), or
    returns every complete request buffered: the server's pump parses no second time
    to find nothing (Transmission._pump)."""
    stream = b""
    for handle, (cmd, n) in enumerate(reqs):
        length = n if cmd != Cmd.FLUSH else 0
        stream += wire.REQUEST.pack(REQUEST_MAGIC, 0, cmd, handle, 0, length)
        stream += bytes(length) if cmd == Cmd.WRITE else b""
    parser = rq.RequestParser(max_payload=256, bufsize=64)
    got: list[int] = []
    for i in range(0, len(stream), step):
        parser.feed(stream[i : i + step])
        while True:
            out = parser.requests(limit, budget, first_free=True)
            got += [r.handle for r in out]
            if parser.blocked:
                break  # (the server waits for bytes to be given back; here: next feed)
            if len(out) < limit:
                assert parser.requests(limit, budget, first_free=True) == []
                break
    while out := parser.requests():  # what the budget held back
        got += [r.handle for r in out]
    assert got == list(range(len(reqs)))


def _drive_client_replies(data: bytes, structured: bool, step: int) -> None:
    p = ReplyParser(structured=structured, context_id=1)
    p.request(Cmd.READ, 0, 16)
    p.request(Cmd.READ, 0, 16)
    p.request(Cmd.BLOCK_STATUS, 0, 16)
    p.request(Cmd.WRITE, 0, 16)
    p.request(Cmd.FLUSH)
    try:
        for i in range(0, len(data), step):
            for r in p.replies(data[i : i + step]):
                if r.data is not None and not r.error:
                    assert len(r.data) == 16
    except ProtocolError:
        pass


@SETTINGS
@given(st.binary(max_size=400), st.booleans(), st.integers(1, 64))
def test_reply_parser_random_bytes(data: bytes, structured: bool, step: int) -> None:
    _drive_client_replies(data, structured, step)


@SETTINGS
@given(_edits, st.integers(0, 1 << 16), st.integers(1, 64))
def test_reply_parser_mutated_stream(edits: list[tuple[int, int]], cut: int, step: int) -> None:
    _drive_client_replies(_mutate(VALID_REPLIES, edits, cut), True, step)


@SETTINGS
@given(st.binary(max_size=400), st.integers(1, 64))
def test_client_handshake_random_bytes(data: bytes, step: int) -> None:
    c = ClientHandshake()
    stream = wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 3) + data
    try:
        for i in range(0, len(stream), step):
            c.receive_data(stream[i : i + step])
            while (ev := c.next_event()) is not None:
                if getattr(ev, "final", True) and not c.in_transmission:
                    c.send_option(Opt.GO, encode_go(""))
    except ProtocolError:
        pass


def test_reply_type_table_is_complete() -> None:
    assert {int(t) for t in ReplyType} >= {0, 1, 2, 5}
