"""Client side of the NBD handshake, sans-IO.

Theory of operation
-------------------
:class:`ClientHandshake` waits for the server greeting, queues the client flags
(FIXED_NEWSTYLE, plus NO_ZEROES when offered) and emits
:class:`~dst.nbd.events.Greeting`.  The shell then sends options one at a time with
:meth:`send_option` and reads :class:`~dst.nbd.events.OptionReply` events until one is
``final``; after NBD_OPT_EXPORT_NAME it gets :class:`~dst.nbd.events.ExportNameReply`.
After an acknowledged NBD_OPT_STARTTLS the shell calls :meth:`begin_tls`, upgrades
its transport and goes on with options over TLS.
The payload helpers (``encode_go``, ``parse_info`` ...) build and read option payloads.
Anything the server sends that the protocol does not allow raises
:class:`dst.errors.ProtocolError`.
"""

from __future__ import annotations

import enum

from dst.errors import ProtocolError
from dst.nbd import wire
from dst.nbd.constants import (
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    ClientFlags,
    HandshakeFlags,
    Info,
    Opt,
    Rep,
    is_error_reply,
)
from dst.nbd.events import ClientEvent, ExportNameReply, Greeting, OptionReply
from dst.nbd.replies import ReplyParser

MAX_REPLY_LENGTH = 1 << 20  # longest option reply accepted
_OLDSTYLE_MAGIC = 0x00420281861253


class _State(enum.Enum):
    GREETING = enum.auto()
    IDLE = enum.auto()  # may send an option
    OPTION = enum.auto()  # waiting for replies to an option
    EXPORT_NAME = enum.auto()  # waiting for the EXPORT_NAME reply
    TRANSMISSION = enum.auto()
    CLOSED = enum.auto()


class ClientHandshake:
    """The client's half of option haggling (see module docstring)."""

    def __init__(self) -> None:
        self._state = _State.GREETING
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._option = 0
        self.no_zeroes = False

    @property
    def in_transmission(self) -> bool:
        return self._state is _State.TRANSMISSION

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def send_option(self, option: int, payload: bytes = b"") -> None:
        """Queue one option; its replies must be read before the next is sent."""
        if self._state is not _State.IDLE:
            raise RuntimeError(f"cannot send an option in state {self._state.name}")
        self._out.append(wire.OPTION.pack(IHAVEOPT, option, len(payload)) + payload)
        self._option = option
        if option == Opt.EXPORT_NAME:
            self._state = _State.EXPORT_NAME
        elif option == Opt.ABORT:
            self._state = _State.CLOSED
        else:
            self._state = _State.OPTION

    def begin_tls(self) -> None:
        """After STARTTLS was acknowledged, before the shell upgrades the transport.

        Raises ProtocolError when the server sent anything after its ACK: those bytes
        would be plaintext posing as part of the TLS session (and asyncio's
        ``start_tls`` would lose them anyway)."""
        if self._state is not _State.IDLE or self._option != Opt.STARTTLS:
            raise RuntimeError("NBD_OPT_STARTTLS was not acknowledged")
        if self._buf:
            raise ProtocolError(f"server sent {len(self._buf)} bytes after the STARTTLS reply")

    def finish(self, structured: bool) -> ReplyParser:
        """After GO's ACK or ExportNameReply: the parser for transmission replies."""
        self._state = _State.TRANSMISSION
        parser = ReplyParser(structured=structured)
        if self._buf:
            parser.feed(bytes(self._buf))
            self._buf.clear()
        return parser

    def next_event(self) -> ClientEvent | None:
        """The next event, or None until more data arrives.  Raises ProtocolError."""
        if self._state is _State.GREETING:
            return self._greeting()
        if self._state is _State.OPTION:
            return self._option_reply()
        if self._state is _State.EXPORT_NAME:
            need = 10 if self.no_zeroes else 134
            if len(self._buf) < need:
                return None
            size, flags = wire.EXPORT_NAME_REPLY.unpack_from(self._buf)
            del self._buf[:need]
            self._state = _State.TRANSMISSION
            return ExportNameReply(size, flags)
        if self._buf and self._state is _State.IDLE:
            raise ProtocolError("server sent data while no option was pending")
        return None

    def _greeting(self) -> Greeting | None:
        if len(self._buf) < wire.GREETING.size:
            return None
        magic, opt_magic, flags = wire.GREETING.unpack_from(self._buf)
        if magic != NBDMAGIC:
            raise ProtocolError("not an NBD server (bad magic)")
        if opt_magic == _OLDSTYLE_MAGIC:
            raise ProtocolError("oldstyle NBD servers are not supported")
        if opt_magic != IHAVEOPT:
            raise ProtocolError(f"bad handshake magic 0x{opt_magic:x}")
        if not flags & HandshakeFlags.FIXED_NEWSTYLE:
            raise ProtocolError("server does not support fixed newstyle negotiation")
        del self._buf[: wire.GREETING.size]
        cflags = ClientFlags.FIXED_NEWSTYLE
        if flags & HandshakeFlags.NO_ZEROES:
            cflags |= ClientFlags.NO_ZEROES
            self.no_zeroes = True
        self._out.append(wire.CLIENT_FLAGS.pack(cflags))
        self._state = _State.IDLE
        return Greeting(flags)

    def _option_reply(self) -> OptionReply | None:
        if len(self._buf) < wire.OPTION_REPLY.size:
            return None
        magic, option, reply, length = wire.OPTION_REPLY.unpack_from(self._buf)
        if magic != OPT_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic 0x{magic:x}")
        if option != self._option:
            raise ProtocolError(f"reply to option {option} while {self._option} was pending")
        if length > MAX_REPLY_LENGTH:
            raise ProtocolError(f"option reply too long ({length} bytes)")
        end = wire.OPTION_REPLY.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[wire.OPTION_REPLY.size : end])
        del self._buf[:end]
        final = reply == Rep.ACK or is_error_reply(reply)
        if final:
            self._state = _State.IDLE
        elif reply not in (Rep.SERVER, Rep.INFO, Rep.META_CONTEXT):
            raise ProtocolError(f"unknown option reply type {reply}")
        return OptionReply(option, reply, payload, final)


# --- option payloads ---------------------------------------------------------------


def encode_go(name: str, infos: tuple[int, ...] = (Info.BLOCK_SIZE,)) -> bytes:
    """Payload of NBD_OPT_GO / NBD_OPT_INFO."""
    raw = name.encode("utf-8")
    body = b"".join(wire.U16.pack(i) for i in infos)
    return wire.U32.pack(len(raw)) + raw + wire.U16.pack(len(infos)) + body


def encode_meta_context(name: str, queries: tuple[str, ...]) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT."""
    raw = name.encode("utf-8")
    parts = [wire.U32.pack(len(raw)), raw, wire.U32.pack(len(queries))]
    for q in queries:
        rq = q.encode("utf-8")
        parts += [wire.U32.pack(len(rq)), rq]
    return b"".join(parts)


def _text(data: bytes) -> str:
    if len(data) > MAX_STRING:
        raise ProtocolError("string longer than 4096 bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("string is not UTF-8") from None


def parse_info(payload: bytes) -> tuple[int, tuple[int, ...] | str]:
    """An NBD_REP_INFO payload: (info type, values).

    EXPORT gives (size, flags), BLOCK_SIZE (min, preferred, max), NAME/DESCRIPTION
    a string; unknown types give ().
    """
    if len(payload) < 2:
        raise ProtocolError("NBD_REP_INFO too short")
    (kind,) = wire.U16.unpack_from(payload)
    if kind == Info.EXPORT:
        if len(payload) != wire.INFO_EXPORT.size:
            raise ProtocolError("bad NBD_INFO_EXPORT length")
        _, size, flags = wire.INFO_EXPORT.unpack(payload)
        return kind, (size, flags)
    if kind == Info.BLOCK_SIZE:
        if len(payload) != wire.INFO_BLOCK_SIZE.size:
            raise ProtocolError("bad NBD_INFO_BLOCK_SIZE length")
        _, lo, pref, hi = wire.INFO_BLOCK_SIZE.unpack(payload)
        return kind, (lo, pref, hi)
    if kind in (Info.NAME, Info.DESCRIPTION):
        return kind, _text(payload[2:])
    return kind, ()


def parse_server(payload: bytes) -> tuple[str, str]:
    """An NBD_REP_SERVER payload: (export name, description)."""
    if len(payload) < 4:
        raise ProtocolError("NBD_REP_SERVER too short")
    (n,) = wire.U32.unpack_from(payload)
    if n > len(payload) - 4:
        raise ProtocolError("NBD_REP_SERVER name overruns the reply")
    return _text(payload[4 : 4 + n]), _text(payload[4 + n :])


def parse_meta_context(payload: bytes) -> tuple[int, str]:
    """An NBD_REP_META_CONTEXT payload: (context id, name)."""
    if len(payload) < 4:
        raise ProtocolError("NBD_REP_META_CONTEXT too short")
    (ctx,) = wire.U32.unpack_from(payload)
    return ctx, _text(payload[4:])


def error_text(reply: OptionReply) -> str:
    """Human-readable description of an error reply."""
    try:
        name = Rep(reply.reply).name
    except ValueError:
        name = f"error 0x{reply.reply:x}"
    msg = reply.payload.decode("utf-8", "replace")
    return f"{name}: {msg}" if msg else name
