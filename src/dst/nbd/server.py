"""Server side of the NBD handshake, sans-IO.

Theory of operation
-------------------
:class:`ServerHandshake` queues the fixed-newstyle greeting on construction.  The shell
feeds received bytes with :meth:`receive_data`, pulls events with :meth:`next_event`
and sends whatever :meth:`data_to_send` returns.  Options the codec can answer alone
(STRUCTURED_REPLY, STARTTLS, unknown or malformed options, oversized options) are
answered internally; options that need the server's knowledge of exports become events
(:class:`~dst.nbd.events.InfoRequest` ...) which the shell answers with
:meth:`accept_export`, :meth:`refuse`, :meth:`send_export_list` or
:meth:`send_meta_contexts`.  While an event is unanswered no further option is parsed.

After GO or EXPORT_NAME is accepted, :attr:`in_transmission` is true and
:meth:`start_transmission` hands the unparsed bytes to a
:class:`~dst.nbd.requests.RequestParser`.

Peer violations (bad magic, unknown client flags, an EXPORT_NAME that cannot be
answered) raise :class:`dst.errors.ProtocolError`; the shell then closes.
"""

from __future__ import annotations

import enum

from dst.errors import ProtocolError
from dst.nbd import wire
from dst.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    NBDMAGIC,
    ClientFlags,
    HandshakeFlags,
    Info,
    Opt,
    Rep,
)
from dst.nbd.events import (
    Aborted,
    ExportInfo,
    ExportNameRequest,
    InfoRequest,
    ListRequest,
    MetaContextRequest,
    ServerEvent,
)
from dst.nbd.requests import RequestParser

BASE_ALLOCATION_ID = 1  # the metadata context id we give base:allocation
_SERVER_FLAGS = HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES
_KNOWN_CLIENT_FLAGS = int(ClientFlags.FIXED_NEWSTYLE | ClientFlags.NO_ZEROES)


class _State(enum.Enum):
    CLIENT_FLAGS = enum.auto()
    OPTIONS = enum.auto()
    TRANSMISSION = enum.auto()
    CLOSED = enum.auto()


class _Invalid(Exception):
    """A malformed option payload (answered with ERR_INVALID)."""


class _Reader:
    """Bounds-checked reads from one option payload; overruns raise _Invalid."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Invalid("option payload too short")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return int(wire.U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(wire.U32.unpack(self.take(4))[0])

    def string(self, n: int) -> str:
        if n > MAX_STRING:
            raise _Invalid("string too long")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid("string is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _Invalid("trailing bytes in option payload")


class ServerHandshake:
    """The server's half of option haggling (see module docstring)."""

    def __init__(self) -> None:
        self._state = _State.CLIENT_FLAGS
        self._buf = bytearray()
        self._out: list[bytes] = [wire.GREETING.pack(NBDMAGIC, IHAVEOPT, _SERVER_FLAGS)]
        self._skip = 0  # bytes of an oversized option still to discard
        self._pending: ServerEvent | None = None
        self._pending_opt = 0
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured_replies = False
        self.meta_contexts: dict[str, int] = {}  # selected contexts -> id
        self._meta_export: str | None = None
        self.export_name: str | None = None  # set when transmission begins

    # --- shell interface ---------------------------------------------------------

    @property
    def in_transmission(self) -> bool:
        return self._state is _State.TRANSMISSION

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is _State.CLOSED:
            return
        self._buf += data

    def next_event(self) -> ServerEvent | None:
        """The next option needing an answer, or None until more data arrives.

        Raises ProtocolError when the client breaks the protocol.
        """
        while self._pending is None and self._state in (_State.CLIENT_FLAGS, _State.OPTIONS):
            if self._state is _State.CLIENT_FLAGS:
                if not self._take_client_flags():
                    return None
                continue
            if self._skip:
                n = min(self._skip, len(self._buf))
                del self._buf[:n]
                self._skip -= n
                if self._skip:
                    return None
                continue
            event = self._take_option()
            if event is False:
                return None
            if event is not True:
                if not isinstance(event, Aborted):
                    self._pending = event
                return event
        return None

    def start_transmission(self, *, max_payload: int) -> RequestParser:
        """The request parser, seeded with bytes received after the final option."""
        if self._state is not _State.TRANSMISSION:
            raise RuntimeError("handshake not finished")
        parser = RequestParser(max_payload=max_payload)
        if self._buf:
            parser.feed(bytes(self._buf))
            self._buf.clear()
        return parser

    # --- answers to events ---------------------------------------------------------

    def accept_export(self, info: ExportInfo) -> None:
        """Answer ExportNameRequest or InfoRequest positively."""
        event = self._answer()
        if isinstance(event, ExportNameRequest):
            self._out.append(wire.EXPORT_NAME_REPLY.pack(info.size, info.flags))
            if not self.no_zeroes:
                self._out.append(bytes(124))
            self._enter_transmission(event.name)
            return
        if not isinstance(event, InfoRequest):
            raise RuntimeError(f"accept_export() does not answer {event!r}")
        opt = self._pending_opt
        rep = Rep.INFO
        self._reply(opt, rep, wire.INFO_EXPORT.pack(Info.EXPORT, info.size, info.flags))
        if Info.NAME in event.infos:
            self._reply(opt, rep, wire.U16.pack(Info.NAME) + wire.encode_str(event.name))
        if Info.DESCRIPTION in event.infos and info.description:
            desc = wire.encode_str(info.description)[:MAX_STRING]
            self._reply(opt, rep, wire.U16.pack(Info.DESCRIPTION) + desc)
        if Info.BLOCK_SIZE in event.infos:
            sizes = (Info.BLOCK_SIZE, info.min_block, info.pref_block, info.max_block)
            self._reply(opt, rep, wire.INFO_BLOCK_SIZE.pack(*sizes))
        self._reply(opt, Rep.ACK)
        if event.go:
            self._enter_transmission(event.name)

    def refuse(self, reply: int = Rep.ERR_UNKNOWN, message: str = "") -> None:
        """Answer the pending option with an error.  Refusing EXPORT_NAME closes."""
        event = self._answer()
        if isinstance(event, ExportNameRequest):
            self._state = _State.CLOSED
            return
        self._reply(self._pending_opt, reply, wire.encode_str(message)[:MAX_STRING])

    def send_export_list(self, exports: list[tuple[str, str]]) -> None:
        """Answer ListRequest with (name, description) pairs."""
        if not isinstance(self._answer(), ListRequest):
            raise RuntimeError("no NBD_OPT_LIST pending")
        for name, description in exports:
            raw = wire.encode_str(name)
            payload = wire.U32.pack(len(raw)) + raw + wire.encode_str(description)
            self._reply(Opt.LIST, Rep.SERVER, payload)
        self._reply(Opt.LIST, Rep.ACK)

    def send_meta_contexts(self, available: tuple[str, ...] = (BASE_ALLOCATION,)) -> None:
        """Answer MetaContextRequest; ``available`` are the contexts the export has."""
        event = self._answer()
        if not isinstance(event, MetaContextRequest):
            raise RuntimeError("no meta context option pending")
        chosen = select_contexts(event.queries, available, list_all=not event.set)
        if event.set:
            self.meta_contexts = {name: BASE_ALLOCATION_ID + i for i, name in enumerate(chosen)}
            self._meta_export = event.export_name
        opt = self._pending_opt
        for name in chosen:
            ctx_id = self.meta_contexts[name] if event.set else 0
            self._reply(opt, Rep.META_CONTEXT, wire.U32.pack(ctx_id) + wire.encode_str(name))
        self._reply(opt, Rep.ACK)

    # --- internals -----------------------------------------------------------------

    def _answer(self) -> ServerEvent:
        event = self._pending
        if event is None:
            raise RuntimeError("no option is waiting for an answer")
        self._pending = None
        return event

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out.append(wire.option_reply(option, reply, payload))

    def _enter_transmission(self, name: str) -> None:
        self._state = _State.TRANSMISSION
        self.export_name = name
        if self._meta_export is not None and self._meta_export != name:
            self.meta_contexts = {}

    def _take_client_flags(self) -> bool:
        if len(self._buf) < 4:
            return False
        (flags,) = wire.CLIENT_FLAGS.unpack_from(self._buf)
        del self._buf[:4]
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise ProtocolError(f"unknown client flags 0x{flags:x}")
        self.fixed_newstyle = bool(flags & ClientFlags.FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & ClientFlags.NO_ZEROES)
        self._state = _State.OPTIONS
        return True

    def _take_option(self) -> ServerEvent | bool:
        """An event, True when the option was answered internally, False for more data."""
        if len(self._buf) < wire.OPTION.size:
            return False
        magic, opt, length = wire.OPTION.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic 0x{magic:x}")
        if length > MAX_OPTION_LENGTH:
            if opt == Opt.EXPORT_NAME or not self.fixed_newstyle:
                raise ProtocolError(f"option {opt} too long ({length} bytes)")
            del self._buf[: wire.OPTION.size]
            self._skip = length
            self._reply(opt, Rep.ERR_TOO_BIG, b"option too long")
            return True
        end = wire.OPTION.size + length
        if len(self._buf) < end:
            return False
        payload = bytes(self._buf[wire.OPTION.size : end])
        del self._buf[:end]
        self._pending_opt = opt
        if opt == Opt.EXPORT_NAME:
            try:
                return ExportNameRequest(_Reader(payload).string(len(payload)))
            except _Invalid as exc:
                raise ProtocolError(f"bad NBD_OPT_EXPORT_NAME: {exc}") from None
        if not self.fixed_newstyle:
            raise ProtocolError(f"option {opt} without fixed newstyle")
        try:
            return self._parse_option(opt, payload)
        except _Invalid as exc:
            self._reply(opt, Rep.ERR_INVALID, str(exc).encode())
            return True

    def _parse_option(self, opt: int, payload: bytes) -> ServerEvent | bool:
        r = _Reader(payload)
        if opt in (Opt.INFO, Opt.GO):
            name = r.string(r.u32())
            infos = tuple(r.u16() for _ in range(r.u16()))
            r.end()
            return InfoRequest(name, infos, go=opt == Opt.GO)
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if not self.structured_replies:
                raise _Invalid("structured replies not negotiated")
            name = r.string(r.u32())
            queries = tuple(r.string(r.u32()) for _ in range(r.u32()))
            r.end()
            return MetaContextRequest(name, queries, set=opt == Opt.SET_META_CONTEXT)
        if opt not in (Opt.LIST, Opt.ABORT, Opt.STRUCTURED_REPLY, Opt.STARTTLS):
            self._reply(opt, Rep.ERR_UNSUP, b"option not supported")
            return True
        r.end()  # the remaining known options have no payload
        if opt == Opt.LIST:
            return ListRequest()
        if opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self._state = _State.CLOSED
            return Aborted()
        if opt == Opt.STRUCTURED_REPLY:
            self.structured_replies = True
            self._reply(opt, Rep.ACK)
        else:
            self._reply(opt, Rep.ERR_POLICY, b"TLS is not configured")
        return True


def select_contexts(
    queries: tuple[str, ...], available: tuple[str, ...], *, list_all: bool
) -> list[str]:
    """Contexts matched by ``queries``: exact names, or ``ns:`` selecting a namespace.

    An empty query list selects everything for LIST and nothing for SET.
    """
    if not queries:
        return list(available) if list_all else []
    chosen: list[str] = []
    for name in available:
        for q in queries:
            if q == name or (q.endswith(":") and name.startswith(q)):
                chosen.append(name)
                break
    return chosen
