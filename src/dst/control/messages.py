"""Control-socket messages: the versioned wire format of requests and responses.

Theory of operation
-------------------
The wire is newline-delimited JSON, one object per line, at most :data:`MAX_LINE`
bytes (the newline excluded)::

    -> {"v": 1, "id": 7, "op": "stop", "args": {"array": "demo"}}
    <- {"v": 1, "id": 7, "ok": true, "result": null}
    <- {"v": 1, "id": 7, "ok": false,
        "error": {"code": "no-such-array", "message": "...", "field": "array"}}

The requests themselves are the dataclasses of :mod:`dst.control.operations` (``op``
is a request's ``OP``, ``args`` its fields); this module encodes and decodes them and
the responses.  :func:`decode_request` checks a line in this order -- JSON object,
``id``, ``v``, ``op``, ``args`` -- and raises :class:`BadRequest` (a
:class:`~dst.errors.ControlError`) carrying the request id when it was readable, so
the error response can be matched by the client.  Argument checking is driven by
the dataclass field types (``str``, ``str | None``, ``int``, ``bool``, ``dict``):
missing, ill-typed and unknown arguments are ``bad-args`` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from dst.control.operations import REQUESTS, Request
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
