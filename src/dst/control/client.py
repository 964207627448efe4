"""Control-socket clients: an asyncio one and a blocking :func:`call` for the CLI.

Both send one request at a time and return the ``result`` of the response, or raise
:class:`~dst.errors.ControlError` with the daemon's code, message and field.  Client
side failures have their own codes: ``unreachable`` (no daemon at the socket),
``timeout`` and ``bad-response``.  ``call(path, op, args)`` sends ``op`` and
``args`` as given -- the daemon checks them; :meth:`ControlClient.request` takes a
typed :class:`~dst.control.operations.Request`.  A streamed request (``events``) is read
with :meth:`ControlClient.stream` or, blocking, :func:`stream`: its items one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
from collections.abc import AsyncGenerator, Iterator, Mapping
from typing import Any

from dst.control.messages import (
    BAD_RESPONSE,
    TIMEOUT,
    UNREACHABLE,
    VERSION,
    Response,
    decode_response,
    encode_request,
)
from dst.control.operations import Request
from dst.errors import ControlError

MAX_RESPONSE = 64 << 20  # status of a big daemon can be large; still bounded


def _unreachable(path: str, e: OSError) -> ControlError:
    hint = " (is the daemon running?)" if isinstance(e, FileNotFoundError | ConnectionError) else ""
    why = e.strerror or str(e)
    return ControlError(UNREACHABLE, f"cannot connect to control socket {path}: {why}{hint}")


def _encode(request_id: int, op: str, args: Mapping[str, Any] | None) -> bytes:
    msg = {"v": VERSION, "id": request_id, "op": op, "args": dict(args or {})}
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def _result(resp: Response, request_id: int) -> Any:
    if resp.id != request_id and resp.id is not None:
        raise ControlError(BAD_RESPONSE, f"reply to request {resp.id}, expected {request_id}")
    if resp.error is not None:
        raise resp.error.exception()
    return resp.result


class ControlClient:
    """One connection to a daemon's control socket."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.path = path
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> ControlClient:
        """Connect; raises ControlError("unreachable")."""
        p = os.fspath(path)
        try:
            reader, writer = await asyncio.open_unix_connection(p, limit=MAX_RESPONSE)
        except OSError as e:
            raise _unreachable(p, e) from None
        return cls(p, reader, writer)

    async def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """Send ``op`` with ``args``; the result, or raises ControlError."""
        async with self._lock:
            rid = next(self._ids)
            return await self._roundtrip(rid, _encode(rid, op, args))

    async def request(self, req: Request) -> Any:
        """Send a typed request; the result, or raises ControlError."""
        async with self._lock:
            rid = next(self._ids)
            return await self._roundtrip(rid, encode_request(rid, req))

    async def _roundtrip(self, rid: int, line: bytes) -> Any:
        try:
            self._writer.write(line)
            await self._writer.drain()
            reply = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise ControlError(BAD_RESPONSE, "the daemon closed the connection") from None
        except asyncio.LimitOverrunError:
            raise ControlError(BAD_RESPONSE, "reply too large") from None
        except OSError as e:
            raise ControlError(BAD_RESPONSE, f"control connection failed: {e}") from None
        return _result(decode_response(reply), rid)

    async def stream(self, req: Request) -> AsyncGenerator[dict[str, Any], None]:
        """Send a streamed request and yield its items until the daemon ends the stream
        (the connection is used up).  Raises ControlError."""
        async with self._lock:
            rid = next(self._ids)
            await self._roundtrip(rid, encode_request(rid, req))
            while line := await self._reader.readline():
                yield _item(line, rid)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def call(
    socket_path: str | os.PathLike[str],
    op: str,
    args: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> Any:
    """Blocking one-shot request (for the CLI): the result, or raises ControlError.

    ``unreachable`` when no daemon listens at ``socket_path``, ``timeout`` when it
    does not answer within ``timeout`` seconds, else the daemon's own error.
    """
    path = os.fspath(socket_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError:
            raise ControlError(
                TIMEOUT, f"control socket {path} did not accept in {timeout}s"
            ) from None
        except OSError as e:
            raise _unreachable(path, e) from None
        try:
            sock.sendall(_encode(1, op, args))
            reply = _read_line(sock)
        except TimeoutError:
            raise ControlError(TIMEOUT, f"no reply from {path} within {timeout}s") from None
        except OSError as e:
            raise ControlError(BAD_RESPONSE, f"control connection failed: {e}") from None
    return _result(decode_response(reply), 1)


def stream(
    socket_path: str | os.PathLike[str], op: str, args: Mapping[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Blocking streamed request (``dst events``): its items until the daemon ends the
    stream.  Raises ControlError as :func:`call`."""
    path = os.fspath(socket_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as e:
            raise _unreachable(path, e) from None
        sock.sendall(_encode(1, op, args))
        with sock.makefile("rb") as f:
            _result(decode_response(f.readline()), 1)
            while line := f.readline():
                yield _item(line, 1)


def _item(line: bytes, rid: int) -> dict[str, Any]:
    try:
        msg = json.loads(line)
        item = msg["item"] if msg.get("id") == rid else None
    except (ValueError, TypeError, KeyError, AttributeError):
        item = None
    if not isinstance(item, dict):
        raise ControlError(BAD_RESPONSE, f"not a stream item: {line[:200]!r}")
    return item


def _read_line(sock: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ControlError(BAD_RESPONSE, "the daemon closed the connection")
        buf += chunk
        if len(buf) > MAX_RESPONSE:
            raise ControlError(BAD_RESPONSE, "reply too large")
    return bytes(buf)
