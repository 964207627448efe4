"""Events and values the sans-IO codec produces and consumes.

Handshake events are frozen slotted dataclasses.  The transmission-phase
:class:`Request` and :class:`Reply` are slotted but mutable: they are created once per
request on the hot path, where a frozen dataclass's ``object.__setattr__`` costs.
"""

from __future__ import annotations

from dataclasses import dataclass

Payload = bytes | bytearray | memoryview

# --- server side: what the client asked for during option haggling -----------------


@dataclass(frozen=True, slots=True)
class ExportNameRequest:
    """NBD_OPT_EXPORT_NAME: answer with accept_export() or refuse() (which closes)."""

    name: str


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """NBD_OPT_INFO or NBD_OPT_GO (``go``); ``infos`` are the NBD_INFO_* types asked."""

    name: str
    infos: tuple[int, ...]
    go: bool


@dataclass(frozen=True, slots=True)
class ListRequest:
    """NBD_OPT_LIST: answer with send_export_list()."""


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    """NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT (``set``)."""

    export_name: str
    queries: tuple[str, ...]
    set: bool


@dataclass(frozen=True, slots=True)
class StartTlsRequest:
    """NBD_OPT_STARTTLS on a TLS server: answer with accept_starttls() or refuse()."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """NBD_OPT_ABORT: the ACK is queued; send it and close."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server tells a client about an export."""

    size: int
    flags: int
    description: str = ""
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 32 << 20


ServerEvent = (
    ExportNameRequest | InfoRequest | ListRequest | MetaContextRequest | StartTlsRequest | Aborted
)

# --- client side: what the server said during option haggling ------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's handshake flags; client flags are queued in reply."""

    flags: int


@dataclass(frozen=True, slots=True)
class OptionReply:
    """One option reply; ``final`` when it ends the option (ACK or an error)."""

    option: int
    reply: int
    payload: bytes
    final: bool


@dataclass(frozen=True, slots=True)
class ExportNameReply:
    """The server accepted NBD_OPT_EXPORT_NAME; transmission begins."""

    size: int
    flags: int


ClientEvent = Greeting | OptionReply | ExportNameReply

# --- transmission --------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """One transmission request.  ``data`` is the WRITE payload (None when the payload
    was larger than the parser's limit and has been drained instead)."""

    flags: int
    type: int
    handle: int
    offset: int
    length: int
    data: Payload | None = None


@dataclass(slots=True)
class Reply:
    """A complete reply to one request, reassembled from its chunks.

    ``error`` is the NBD wire error (0 on success), ``data`` the READ payload,
    ``extents`` the base:allocation descriptors as (length, flags) pairs.
    """

    handle: int
    error: int = 0
    message: str = ""
    data: bytes | bytearray | None = None
    extents: list[tuple[int, int]] | None = None
