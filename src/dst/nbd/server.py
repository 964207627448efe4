"""Server side of the NBD handshake, sans-IO.

Theory of operation
-------------------
:class:`ServerHandshake` queues the fixed-newstyle greeting on construction.  The shell
feeds received bytes with :meth:`receive_data`, pulls events with :meth:`next_event`
and sends whatever :meth:`data_to_send` returns.  Options the codec can answer alone
(STRUCTURED_REPLY, unknown or malformed options, oversized options) are answered
internally (:mod:`dst.nbd.options` decodes the payloads); options that need the
server's knowledge of exports become events (:class:`~dst.nbd.events.InfoRequest` ...)
which the shell answers with :meth:`accept_export`, :meth:`refuse`,
:meth:`send_export_list`, :meth:`send_meta_contexts` or :meth:`accept_starttls`.
While an event is unanswered no further option is parsed.

TLS (the spec's "TLS support"): ``tls`` is the server's mode.  ``OFF`` is NOTLS
(STARTTLS gets ERR_POLICY).  ``REQUIRE`` is FORCEDTLS: before TLS every option but
STARTTLS and ABORT gets ERR_TLS_REQD, and an EXPORT_NAME (which cannot be answered with
an error) closes the session.  ``ON`` is SELECTIVETLS: the client may upgrade; which
exports are TLS-only is the shell's business (it refuses them with ERR_TLS_REQD and
leaves them out of LIST while :attr:`tls_active` is false).  STARTTLS becomes a
:class:`~dst.nbd.events.StartTlsRequest`; :meth:`accept_starttls` queues the ACK and
stops parsing until the shell has upgraded the transport and called
:meth:`tls_established`.  The client must wait for the ACK before its TLS handshake, so
bytes received after STARTTLS and before the upgrade are a protocol violation
(ProtocolError), never data to keep or to wait for: asyncio's ``start_tls`` would lose
them anyway (cpython #142352).  After the upgrade, everything negotiated in plaintext
(structured replies, meta contexts) is forgotten, as a man in the middle may have
chosen it; there is no way back to plaintext.

:meth:`deny` refuses the client (access control): the pending option and every later
one get ERR_POLICY, an EXPORT_NAME closes.

After GO or EXPORT_NAME is accepted, :attr:`in_transmission` is true and
:meth:`start_transmission` hands the unparsed bytes to a
:class:`~dst.nbd.requests.RequestParser`.

Peer violations (bad magic, unknown client flags, an EXPORT_NAME that cannot be
answered, data sent during the STARTTLS upgrade) raise
:class:`dst.errors.ProtocolError`; the shell then closes.  When the codec closes on its
own (ABORT, a refused EXPORT_NAME) :attr:`close_reason` says why.
"""

from __future__ import annotations

import enum

from dst.errors import ProtocolError
from dst.nbd import options, wire
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
    StartTlsRequest,
)
from dst.nbd.options import Invalid, select_contexts
from dst.nbd.requests import RequestParser

BASE_ALLOCATION_ID = 1  # the metadata context id we give base:allocation
_SERVER_FLAGS = HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES
_KNOWN_CLIENT_FLAGS = int(ClientFlags.FIXED_NEWSTYLE | ClientFlags.NO_ZEROES)


class TlsMode(enum.Enum):
    """The server's TLS mode (``--tls``): NOTLS, SELECTIVETLS or FORCEDTLS."""

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


class _State(enum.Enum):
    CLIENT_FLAGS = enum.auto()
    OPTIONS = enum.auto()
    TLS_HANDSHAKE = enum.auto()  # STARTTLS acknowledged; the shell is upgrading
    TRANSMISSION = enum.auto()
    CLOSED = enum.auto()


class ServerHandshake:
    """The server's half of option haggling (see module docstring)."""

    def __init__(self, *, tls: TlsMode = TlsMode.OFF) -> None:
        self.tls_mode = tls
        self.tls_active = False  # the session runs over TLS
        self._denied = ""  # access refused: the ERR_POLICY message
        self.close_reason = ""
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
        """Take received bytes.  Raises ProtocolError for bytes that arrive while the
        transport is being upgraded to TLS."""
        if self._state is _State.CLOSED:
            return
        if self._state is _State.TLS_HANDSHAKE and data:
            raise ProtocolError("data received during the STARTTLS upgrade")
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
            self._close(f"NBD_OPT_EXPORT_NAME {event.name!r} refused: {message or reply}")
            return
        self._reply(self._pending_opt, reply, wire.encode_str(message)[:MAX_STRING])

    def accept_starttls(self) -> None:
        """Answer StartTlsRequest with ACK: the shell must now upgrade the transport
        and call :meth:`tls_established`.  Raises ProtocolError when the client sent
        bytes after STARTTLS without waiting for the ACK."""
        if not isinstance(self._answer(), StartTlsRequest):
            raise RuntimeError("no NBD_OPT_STARTTLS pending")
        if self._buf:
            n = len(self._buf)
            self._close("data after NBD_OPT_STARTTLS")
            raise ProtocolError(f"{n} bytes sent after NBD_OPT_STARTTLS before its reply")
        self._reply(Opt.STARTTLS, Rep.ACK)
        self._state = _State.TLS_HANDSHAKE

    def tls_established(self) -> None:
        """The transport is TLS now: option haggling starts afresh (see docstring)."""
        if self._state is not _State.TLS_HANDSHAKE:
            raise RuntimeError("no STARTTLS upgrade in progress")
        self._state = _State.OPTIONS
        self.tls_active = True
        self.structured_replies = False
        self.meta_contexts = {}
        self._meta_export = None

    def deny(self, message: str) -> None:
        """Refuse this client: the pending option (if any) and every later one but
        ABORT get ERR_POLICY ``message``; an EXPORT_NAME closes the session."""
        self._denied = message or "access denied"
        if self._pending is not None:
            self.refuse(Rep.ERR_POLICY, self._denied)

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

    def _close(self, reason: str) -> None:
        self._state = _State.CLOSED
        self.close_reason = reason
        self._pending = None

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
        if opt != Opt.EXPORT_NAME and not self.fixed_newstyle:
            raise ProtocolError(f"option {opt} without fixed newstyle")
        if opt != Opt.ABORT and (refusal := self._policy_refusal(opt)) is not None:
            if opt == Opt.EXPORT_NAME:  # cannot be answered with an error: hang up
                self._close(f"NBD_OPT_EXPORT_NAME refused: {refusal[1]}")
                return True
            self._reply(opt, refusal[0], refusal[1].encode())
            return True
        if opt == Opt.EXPORT_NAME:
            try:
                return ExportNameRequest(options.export_name(payload))
            except Invalid as exc:
                raise ProtocolError(f"bad NBD_OPT_EXPORT_NAME: {exc}") from None
        try:
            return self._parse_option(opt, payload)
        except Invalid as exc:
            self._reply(opt, Rep.ERR_INVALID, str(exc).encode())
            return True

    def _parse_option(self, opt: int, payload: bytes) -> ServerEvent | bool:
        """Raises Invalid for a malformed payload."""
        if opt in (Opt.INFO, Opt.GO):
            return options.info_request(payload, go=opt == Opt.GO)
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if not self.structured_replies:
                raise Invalid("structured replies not negotiated")
            return options.meta_context_request(payload, set=opt == Opt.SET_META_CONTEXT)
        if opt not in (Opt.LIST, Opt.ABORT, Opt.STRUCTURED_REPLY, Opt.STARTTLS):
            self._reply(opt, Rep.ERR_UNSUP, b"option not supported")
            return True
        options.no_payload(payload)  # the remaining known options have none
        if opt == Opt.LIST:
            return ListRequest()
        if opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self._close("client sent NBD_OPT_ABORT")
            return Aborted()
        if opt == Opt.STRUCTURED_REPLY:
            self.structured_replies = True
            self._reply(opt, Rep.ACK)
        elif self.tls_mode is TlsMode.OFF:
            self._reply(opt, Rep.ERR_POLICY, b"TLS is not configured")
        elif self.tls_active:
            self._reply(opt, Rep.ERR_INVALID, b"TLS is already negotiated")
        else:
            return StartTlsRequest()
        return True

    def _policy_refusal(self, opt: int) -> tuple[int, str] | None:
        """(reply, message) when policy refuses option ``opt`` before parsing it."""
        if self._denied:
            return Rep.ERR_POLICY, self._denied
        if self.tls_mode is TlsMode.REQUIRE and not self.tls_active and opt != Opt.STARTTLS:
            return Rep.ERR_TLS_REQD, "TLS is required (NBD_OPT_STARTTLS first)"
        return None
