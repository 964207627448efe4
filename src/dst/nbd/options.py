"""The option payloads a server receives, decoded (sans-IO, pure).

Every read is bounds-checked against the payload (:class:`Reader`); strings are at
most ``MAX_STRING`` bytes of UTF-8; a payload must be consumed exactly.  A malformed
payload raises :class:`Invalid`, which :class:`~dst.nbd.server.ServerHandshake`
answers with ERR_INVALID (or, for EXPORT_NAME, which has no error reply, turns into a
ProtocolError).  :func:`select_contexts` is the meta context query rule.
"""

from __future__ import annotations

from dst.nbd import wire
from dst.nbd.constants import MAX_STRING
from dst.nbd.events import InfoRequest, MetaContextRequest


class Invalid(Exception):
    """A malformed option payload (answered with ERR_INVALID)."""


class Reader:
    """Bounds-checked reads from one option payload; overruns raise Invalid."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise Invalid("option payload too short")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return int(wire.U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(wire.U32.unpack(self.take(4))[0])

    def string(self, n: int) -> str:
        if n > MAX_STRING:
            raise Invalid("string too long")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("string is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise Invalid("trailing bytes in option payload")


def export_name(payload: bytes) -> str:
    """NBD_OPT_EXPORT_NAME: the whole payload is the name.  Raises Invalid."""
    return Reader(payload).string(len(payload))


def info_request(payload: bytes, *, go: bool) -> InfoRequest:
    """NBD_OPT_INFO or NBD_OPT_GO: a name and the information asked for.  Raises
    Invalid."""
    r = Reader(payload)
    name = r.string(r.u32())
    infos = tuple(r.u16() for _ in range(r.u16()))
    r.end()
    return InfoRequest(name, infos, go=go)


def meta_context_request(payload: bytes, *, set: bool) -> MetaContextRequest:
    """NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT (``set``): an export name
    and the context queries.  Raises Invalid."""
    r = Reader(payload)
    name = r.string(r.u32())
    queries = tuple(r.string(r.u32()) for _ in range(r.u32()))
    r.end()
    return MetaContextRequest(name, queries, set=set)


def no_payload(payload: bytes) -> None:
    """The options that carry nothing (LIST, ABORT, STRUCTURED_REPLY, STARTTLS).
    Raises Invalid."""
    Reader(payload).end()


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
