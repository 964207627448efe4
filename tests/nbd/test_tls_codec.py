"""STARTTLS in the sans-IO codecs: NOTLS, SELECTIVETLS and FORCEDTLS, deny, violations."""

from __future__ import annotations

import struct

import pytest

from dst.errors import ProtocolError
from dst.nbd import wire
from dst.nbd.client import ClientHandshake, encode_go
from dst.nbd.constants import IHAVEOPT, OPT_REPLY_MAGIC, Opt, Rep
from dst.nbd.events import Aborted, ExportInfo, InfoRequest, ListRequest, StartTlsRequest
from dst.nbd.server import ServerHandshake, TlsMode

INFO = ExportInfo(size=1 << 20, flags=1)


def option(opt: int, payload: bytes = b"") -> bytes:
    return wire.OPTION.pack(IHAVEOPT, opt, len(payload)) + payload


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, opt, rep, n = wire.OPTION_REPLY.unpack_from(data)
        assert magic == OPT_REPLY_MAGIC
        out.append((opt, rep, data[20 : 20 + n]))
        data = data[20 + n :]
    return out


def server(mode: TlsMode) -> ServerHandshake:
    hs = ServerHandshake(tls=mode)
    hs.data_to_send()  # greeting
    hs.receive_data(struct.pack(">I", 3))
    assert hs.next_event() is None
    return hs


def upgraded(mode: TlsMode = TlsMode.REQUIRE) -> ServerHandshake:
    hs = server(mode)
    hs.receive_data(option(Opt.STARTTLS))
    assert isinstance(hs.next_event(), StartTlsRequest)
    hs.accept_starttls()
    assert replies(hs.data_to_send()) == [(Opt.STARTTLS, Rep.ACK, b"")]
    hs.tls_established()
    return hs


@pytest.mark.parametrize(
    "opt",
    [Opt.LIST, Opt.GO, Opt.INFO, Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, 99],
)
def test_forcedtls_refuses_every_option_before_tls(opt: int) -> None:
    hs = server(TlsMode.REQUIRE)
    payload = encode_go("") if opt in (Opt.GO, Opt.INFO) else b""
    hs.receive_data(option(opt, payload))
    assert hs.next_event() is None
    ((o, rep, msg),) = replies(hs.data_to_send())
    assert (o, rep) == (opt, Rep.ERR_TLS_REQD) and b"TLS" in msg
    assert not hs.closed


def test_forcedtls_export_name_before_tls_closes() -> None:
    hs = server(TlsMode.REQUIRE)
    hs.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    assert hs.next_event() is None
    assert hs.closed and hs.data_to_send() == b""
    assert "EXPORT_NAME" in hs.close_reason


def test_forcedtls_abort_is_acknowledged() -> None:
    hs = server(TlsMode.REQUIRE)
    hs.receive_data(option(Opt.ABORT))
    hs.next_event()
    assert replies(hs.data_to_send()) == [(Opt.ABORT, Rep.ACK, b"")]
    assert hs.closed


def test_upgrade_starts_haggling_afresh() -> None:
    hs = server(TlsMode.ON)
    hs.receive_data(option(Opt.STRUCTURED_REPLY))  # plaintext, before TLS
    assert hs.next_event() is None
    assert hs.structured_replies
    hs.data_to_send()
    hs.receive_data(option(Opt.STARTTLS))
    assert isinstance(hs.next_event(), StartTlsRequest)
    hs.accept_starttls()
    hs.data_to_send()
    hs.tls_established()
    assert hs.tls_active and not hs.structured_replies  # forgotten: a MitM may have chosen
    hs.receive_data(option(Opt.STARTTLS) + option(Opt.GO, encode_go("x")))
    event = hs.next_event()
    assert isinstance(event, InfoRequest) and event.go
    out = replies(hs.data_to_send())
    assert out[0][:2] == (Opt.STARTTLS, Rep.ERR_INVALID)  # no second STARTTLS
    hs.accept_export(INFO)
    assert hs.in_transmission


def test_no_tls_reply_goes_out_before_the_upgrade() -> None:
    hs = server(TlsMode.REQUIRE)
    hs.receive_data(option(Opt.STARTTLS))
    hs.next_event()
    hs.accept_starttls()
    hs.data_to_send()
    with pytest.raises(ProtocolError, match="during the STARTTLS upgrade"):
        hs.receive_data(b"\x16\x03\x01")  # plaintext bytes before the shell upgraded


def test_bytes_after_starttls_in_the_same_packet_are_a_violation() -> None:
    hs = server(TlsMode.REQUIRE)
    hs.receive_data(option(Opt.STARTTLS) + b"\x16\x03\x01\x00\x05hello")
    assert isinstance(hs.next_event(), StartTlsRequest)
    with pytest.raises(ProtocolError, match="after NBD_OPT_STARTTLS"):
        hs.accept_starttls()
    assert hs.closed and hs.data_to_send() == b""  # no ACK: nobody starts TLS


def test_starttls_with_payload_is_invalid() -> None:
    hs = server(TlsMode.REQUIRE)
    hs.receive_data(option(Opt.STARTTLS, b"x"))
    assert hs.next_event() is None
    assert replies(hs.data_to_send())[0][:2] == (Opt.STARTTLS, Rep.ERR_INVALID)


def test_notls_answers_starttls_with_policy() -> None:
    hs = server(TlsMode.OFF)
    hs.receive_data(option(Opt.STARTTLS))
    assert hs.next_event() is None
    assert replies(hs.data_to_send())[0][:2] == (Opt.STARTTLS, Rep.ERR_POLICY)


def test_selectivetls_lets_options_through_before_tls() -> None:
    hs = server(TlsMode.ON)
    hs.receive_data(option(Opt.LIST))
    assert isinstance(hs.next_event(), ListRequest)  # the shell filters TLS-only exports


def test_deny_refuses_pending_and_later_options() -> None:
    hs = upgraded()
    hs.receive_data(option(Opt.GO, encode_go("")) + option(Opt.LIST) + option(Opt.ABORT))
    assert isinstance(hs.next_event(), InfoRequest)
    hs.deny("access denied")
    assert isinstance(hs.next_event(), Aborted)
    out = replies(hs.data_to_send())
    assert [(o, r) for o, r, _ in out] == [
        (Opt.GO, Rep.ERR_POLICY),
        (Opt.LIST, Rep.ERR_POLICY),
        (Opt.ABORT, Rep.ACK),
    ]
    assert out[0][2] == b"access denied" and hs.closed


def test_denied_export_name_closes() -> None:
    hs = server(TlsMode.OFF)
    hs.deny("access denied")
    hs.receive_data(option(Opt.EXPORT_NAME, b""))
    assert hs.next_event() is None
    assert hs.closed and hs.data_to_send() == b""


def test_client_refuses_bytes_after_the_starttls_ack() -> None:
    hs = ClientHandshake()
    hs.receive_data(wire.GREETING.pack(0x4E42444D41474943, IHAVEOPT, 3))
    hs.next_event()
    hs.send_option(Opt.STARTTLS)
    ack = wire.option_reply(Opt.STARTTLS, Rep.ACK)
    hs.receive_data(ack + b"plaintext posing as TLS")
    reply = hs.next_event()
    assert reply is not None
    with pytest.raises(ProtocolError, match="after the STARTTLS reply"):
        hs.begin_tls()


def test_client_begin_tls_after_a_clean_ack() -> None:
    hs = ClientHandshake()
    hs.receive_data(wire.GREETING.pack(0x4E42444D41474943, IHAVEOPT, 3))
    hs.next_event()
    hs.send_option(Opt.STARTTLS)
    hs.receive_data(wire.option_reply(Opt.STARTTLS, Rep.ACK))
    hs.next_event()
    hs.begin_tls()  # nothing left over: fine
