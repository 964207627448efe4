"""Control-socket messages: typed, versioned requests and responses.

Theory of operation
-------------------
The wire is newline-delimited JSON, one object per line, at most :data:`MAX_LINE`
bytes (the newline excluded)::

    -> {"v": 1, "id": 7, "op": "stop", "args": {"array": "demo"}}
    <- {"v": 1, "id": 7, "ok": true, "result": null}
    <- {"v": 1, "id": 7, "ok": false,
        "error": {"code": "no-such-array", "message": "...", "field": "array"}}

Each operation is a frozen dataclass (a :class:`Request`) whose fields are its
``args``; :func:`decode_request` checks a line in this order -- JSON object, ``id``,
``v``, ``op``, ``args`` -- and raises :class:`BadRequest` (a
:class:`~dst.errors.ControlError`) carrying the request id when it was readable, so
the error response can be matched by the client.  Argument checking is driven by
the dataclass field types (``str``, ``str | None``, ``int``, ``bool``, ``dict``):
missing, ill-typed and unknown arguments are ``bad-args`` naming the field.

Arguments naming things are consistent: ``array`` is an array name, ``node`` a
node name, ``spec`` a spec dict (the array document of :mod:`dst.array.spec` for
``create``, one node for ``add``/``replace``).  Specs are plain dicts here: this
layer sits below ``array/`` and the daemon validates them.

``events`` is answered by a stream of lines (:mod:`dst.control.stream`).
Ops marked *reserved* are defined for later issues; a daemon that does not
implement one answers ``not-implemented``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeGuard

from dst.errors import ControlError

VERSION = 1
MAX_LINE = 1 << 20  # bytes per message, newline excluded

# Error codes (ControlError.code).  Daemons add their own words, e.g. "exists".
BAD_JSON = "bad-json"  # not JSON, or not an object
BAD_VERSION = "bad-version"
BAD_REQUEST = "bad-request"  # bad envelope: id, op or args of the wrong shape
UNKNOWN_OP = "unknown-op"
BAD_ARGS = "bad-args"
TOO_BIG = "too-big"  # line over MAX_LINE; the server closes the connection
INTERNAL = "internal"  # a bug in the daemon; details are in its log
NOT_IMPLEMENTED = "not-implemented"
NO_SUCH_ARRAY = "no-such-array"
NO_SUCH_NODE = "no-such-node"
BAD_SPEC = "bad-spec"  # field is "spec.<key path>"
UNREACHABLE = "unreachable"  # client side: no daemon at the socket
TIMEOUT = "timeout"  # client side: no reply in time
BAD_RESPONSE = "bad-response"  # client side: the daemon's reply is not understood


class BadRequest(ControlError):
    """A request that could not be decoded; ``request_id`` is its id when known."""

    def __init__(
        self, code: str, message: str, *, field: str = "", request_id: int | None = None
    ) -> None:
        super().__init__(code, message, field=field)
        self.request_id = request_id


class Request:
    """Base of all requests; ``OP`` is the wire name, dataclass fields the args."""

    __slots__ = ()
    OP: ClassVar[str]


@dataclass(frozen=True, slots=True)
class Create(Request):
    """Create an array from a spec document ``{"array": {...}}`` (not started)."""

    OP: ClassVar[str] = "create"
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Start(Request):
    """Assemble and export a created array."""

    OP: ClassVar[str] = "start"
    array: str


@dataclass(frozen=True, slots=True)
class Stop(Request):
    """Flush, stop exporting and close an array."""

    OP: ClassVar[str] = "stop"
    array: str


@dataclass(frozen=True, slots=True)
class Add(Request):
    """Add a node (a node spec dict); for a linear array it is appended."""

    OP: ClassVar[str] = "add"
    array: str
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Remove(Request):
    """Remove a node (for a linear array, the last one)."""

    OP: ClassVar[str] = "remove"
    array: str
    node: str


@dataclass(frozen=True, slots=True)
class Status(Request):
    """Status of one array, or of all when ``array`` is None."""

    OP: ClassVar[str] = "status"
    array: str | None = None


@dataclass(frozen=True, slots=True)
class Fail(Request):
    """Take mirror leg ``node`` out for maintenance (its misses are recorded)."""

    OP: ClassVar[str] = "fail"
    array: str
    node: str


@dataclass(frozen=True, slots=True)
class Readd(Request):
    """Bring failed leg ``node`` back, resyncing what it missed; ``full`` copies
    everything and discards the leg's own data (the way out of a split brain)."""

    OP: ClassVar[str] = "readd"
    array: str
    node: str
    full: bool = False


@dataclass(frozen=True, slots=True)
class Suspend(Request):
    """Reserved: hold I/O to one node, or to the whole array when ``node`` is None."""

    OP: ClassVar[str] = "suspend"
    array: str
    node: str | None = None


@dataclass(frozen=True, slots=True)
class Resume(Request):
    """Reserved: undo :class:`Suspend`."""

    OP: ClassVar[str] = "resume"
    array: str
    node: str | None = None


@dataclass(frozen=True, slots=True)
class Replace(Request):
    """Replace ``node`` by the node ``spec``, copying its data live (in the background:
    progress under ``replace`` in the array's status)."""

    OP: ClassVar[str] = "replace"
    array: str
    node: str
    spec: dict[str, Any]
    rate: int = 0  # bytes/s the copy may take (0: the mirror's resync rate, or unlimited)


@dataclass(frozen=True, slots=True)
class CancelReplace(Request):
    """Stop the running replace of the array; it goes back to the old node."""

    OP: ClassVar[str] = "cancel-replace"
    array: str


@dataclass(frozen=True, slots=True)
class Verify(Request):
    """Start comparing mirror legs in the background (progress in status); with
    ``repair`` rewrite differing regions from leg ``source`` (default: the first in
    sync).  ``mirror`` names the mirror when the array has several."""

    OP: ClassVar[str] = "verify"
    array: str
    repair: bool = False
    source: str | None = None
    mirror: str | None = None


@dataclass(frozen=True, slots=True)
class ResyncRate(Request):
    """Limit resync to ``rate`` bytes per second (0: unlimited), and when the array
    is idle let it go at least ``min_rate`` (0: no floor); every mirror of the
    array, or only ``mirror``."""

    OP: ClassVar[str] = "resync-rate"
    array: str
    rate: int
    min_rate: int = 0
    mirror: str | None = None


@dataclass(frozen=True, slots=True)
class Reload(Request):
    """Re-read the ACL file and TLS credentials of ``array``'s export (all when None)."""

    OP: ClassVar[str] = "reload"
    array: str | None = None


@dataclass(frozen=True, slots=True)
class Shutdown(Request):
    """Reserved: stop every array and exit the daemon."""

    OP: ClassVar[str] = "shutdown"


@dataclass(frozen=True, slots=True)
class Events(Request):
    """Stream state changes as JSON lines (``now``: the current state first)."""

    OP: ClassVar[str] = "events"
    now: bool = False


REQUESTS: dict[str, type[Request]] = {
    c.OP: c
    for c in (
        Create,
        Start,
        Stop,
        Add,
        Remove,
        Status,
        Fail,
        Readd,
        Suspend,
        Resume,
        Replace,
        CancelReplace,
        Reload,
        Verify,
        ResyncRate,
        Shutdown,
        Events,
    )
}


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The ``error`` object of a failed response."""

    code: str
    message: str
    field: str = ""

    def exception(self) -> ControlError:
        return ControlError(self.code, self.message, field=self.field)


@dataclass(frozen=True, slots=True)
class Response:
    """A reply: ``error`` is None on success, then ``result`` is the value."""

    id: int | None
    result: Any = None
    error: ErrorInfo | None = field(default=None)

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------------------
# requests


def request_args(req: Request) -> dict[str, Any]:
    """The ``args`` object of ``req`` (None-valued optional args left out)."""
    assert dataclasses.is_dataclass(req)
    return {
        f.name: getattr(req, f.name)
        for f in dataclasses.fields(req)
        if getattr(req, f.name) is not None
    }


def encode_request(request_id: int, req: Request) -> bytes:
    """One wire line for ``req``."""
    msg = {"v": VERSION, "id": request_id, "op": req.OP, "args": request_args(req)}
    return _line(msg)


def decode_request(line: bytes | str) -> tuple[int, Request]:
    """Parse one line (newline optional) into ``(id, request)``; raises :class:`BadRequest`."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(BAD_JSON, f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise BadRequest(BAD_JSON, "a request is a JSON object")
    rid = msg.get("id")
    if not _is_int(rid):
        raise BadRequest(BAD_REQUEST, "id must be an integer", field="id")
    if msg.get("v") != VERSION:
        raise BadRequest(
            BAD_VERSION,
            f"unsupported protocol version {msg.get('v')!r}, this daemon speaks {VERSION}",
            field="v",
            request_id=rid,
        )
    extra = sorted(set(msg) - {"v", "id", "op", "args"})
    if extra:
        raise BadRequest(BAD_REQUEST, f"unknown key {extra[0]!r}", field=extra[0], request_id=rid)
    op, args = msg.get("op"), msg.get("args", {})
    if not isinstance(op, str):
        raise BadRequest(BAD_REQUEST, "op must be a string", field="op", request_id=rid)
    if not isinstance(args, dict):
        raise BadRequest(BAD_REQUEST, "args must be an object", field="args", request_id=rid)
    cls = REQUESTS.get(op)
    if cls is None:
        raise BadRequest(UNKNOWN_OP, f"unknown operation {op!r}", field="op", request_id=rid)
    try:
        return rid, request_from_args(cls, args)
    except BadRequest as e:
        e.request_id = rid
        raise


def request_from_args(cls: type[Request], args: dict[str, Any]) -> Request:
    """Build ``cls`` from an ``args`` object, checking it; raises :class:`BadRequest`."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if args.get(f.name) is None:
            if f.default is dataclasses.MISSING:
                raise BadRequest(BAD_ARGS, f"{cls.OP}: missing argument {f.name!r}", field=f.name)
            continue
        problem = _check(args[f.name], hints[f.name])
        if problem:
            raise BadRequest(BAD_ARGS, f"{cls.OP}: {f.name!r} {problem}", field=f.name)
        values[f.name] = args[f.name]
    extra = sorted(set(args) - set(values) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    if extra:
        raise BadRequest(BAD_ARGS, f"{cls.OP}: unknown argument {extra[0]!r}", field=extra[0])
    return cls(**values)


def _check(value: object, tp: object) -> str:
    """Why ``value`` is not a valid ``tp`` argument, or ""."""
    if isinstance(tp, types.UnionType):  # X | None: None was handled by the caller
        (tp,) = (t for t in typing.get_args(tp) if t is not type(None))
    if tp is str:
        ok = isinstance(value, str) and value != ""
        return "" if ok else "must be a non-empty string"
    if tp is int:
        return "" if _is_int(value) and value >= 0 else "must be an integer >= 0"
    if tp is bool:
        return "" if isinstance(value, bool) else "must be true or false"
    if typing.get_origin(tp) is dict:
        return "" if isinstance(value, dict) else "must be an object"
    raise AssertionError(f"unsupported argument type {tp!r}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# responses


def encode_response(resp: Response) -> bytes:
    """One wire line for ``resp``; raises TypeError/ValueError if the result is not JSON-able."""
    msg: dict[str, Any] = {"v": VERSION, "id": resp.id, "ok": resp.ok}
    if resp.error is None:
        msg["result"] = resp.result
    else:
        msg["error"] = {"code": resp.error.code, "message": resp.error.message}
        if resp.error.field:
            msg["error"]["field"] = resp.error.field
    return _line(msg)


def error_response(request_id: int | None, err: ControlError) -> Response:
    return Response(request_id, error=ErrorInfo(err.code, str(err), err.field))


def decode_response(line: bytes | str) -> Response:
    """Parse one response line; raises ControlError("bad-response") if malformed."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ControlError(BAD_RESPONSE, f"reply is not JSON: {e}") from None
    if not isinstance(msg, dict) or msg.get("v") != VERSION:
        raise ControlError(BAD_RESPONSE, f"reply is not a version {VERSION} response")
    rid = msg.get("id")
    if rid is not None and not _is_int(rid):
        raise ControlError(BAD_RESPONSE, "reply has a bad id")
    if msg.get("ok") is True:
        return Response(rid, msg.get("result"))
    err = msg.get("error")
    if msg.get("ok") is not False or not isinstance(err, dict):
        raise ControlError(BAD_RESPONSE, "reply has neither a result nor an error")
    code, message, fld = err.get("code"), err.get("message"), err.get("field", "")
    if not (isinstance(code, str) and isinstance(message, str) and isinstance(fld, str)):
        raise ControlError(BAD_RESPONSE, "reply has a malformed error")
    return Response(rid, error=ErrorInfo(code, message, fld))


def _line(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\n"
