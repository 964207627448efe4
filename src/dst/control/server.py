"""The control-socket server: a unix socket speaking :mod:`dst.control.messages`.

Theory of operation
-------------------
The socket is owner-only.  Its directory is created mode 0700 when missing; the
socket is bound under a temporary name, chmod'ed to 0600 and renamed into place
*before* ``listen()``, so no one ever connects to it with looser permissions.  A
live socket at the path (another daemon) is an error; a stale one (connection
refused) is replaced; a non-socket file there is never touched.

Each connection is served by its own task, one request at a time: read a line,
decode it, ``await handler(request)``, write the response.  Connections run
concurrently.  A :class:`~dst.errors.ControlError` from the handler becomes an
error response; any other exception is logged with its traceback and answered
with code ``internal`` (the client sees no traceback) -- the connection and the
server go on.  A line that is not a valid request gets a typed error and the
connection stays usable; a line over ``MAX_LINE`` breaks the framing, so it gets
``too-big`` and that connection is closed.

A handler that returns a :class:`~dst.control.stream.Stream` (``events``) turns the
connection into that stream: the response says so, then every item is a line, until
the stream ends or the client closes (:mod:`dst.control.stream`).

``close()`` stops listening, cancels the connection tasks (a running handler is
cancelled too), waits for them and removes the socket if it is still ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from dst.control.messages import (
    INTERNAL,
    MAX_LINE,
    TOO_BIG,
    VERSION,
    BadRequest,
    Response,
    decode_request,
    encode_response,
    error_response,
)
from dst.control.operations import Request
from dst.control.stream import Stream
from dst.errors import ControlError

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Any]]


class ControlServer:
    """Serve ``handler`` on the unix socket ``path``.  Use ``async with`` or start/close."""

    def __init__(self, path: str | os.PathLike[str], handler: Handler) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        """Create the socket and accept connections; raises OSError (EADDRINUSE if live)."""
        sock = await asyncio.get_running_loop().run_in_executor(None, self._bind)
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except BaseException:
            sock.close()
            raise
        log.info("control socket listening on %s", self.path)

    async def close(self) -> None:
        """Stop accepting, end every connection and remove the socket; idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._inode is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            self._inode = None

    async def serve_forever(self) -> None:
        """Run until cancelled (then close)."""
        if self._server is None:
            await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- socket setup (blocking; runs in an executor) --------------------------

    def _bind(self) -> socket.socket:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        self._check_stale()
        tmp = os.path.join(directory, f".ctl-{secrets.token_hex(4)}")  # short: sun_path is small
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            try:
                os.chmod(tmp, 0o600)
                os.rename(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _check_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", self.path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.path)
            except ConnectionRefusedError:
                log.info("replacing stale control socket %s", self.path)
                return
        raise OSError(errno.EADDRINUSE, "a daemon is already listening", self.path)

    # -- connections ------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection should end."""
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            err = ControlError(TOO_BIG, f"request longer than {MAX_LINE} bytes; closing")
            await self._send(writer, error_response(None, err))
            return False
        except asyncio.IncompleteReadError:
            return False  # EOF (a partial last line is dropped)
        if not line.strip():
            return True
        try:
            rid, req = decode_request(line)
        except BadRequest as e:
            await self._send(writer, error_response(e.request_id, e))
            return True
        answer = await self._call(rid, req)
        if isinstance(answer, Stream):
            await self._stream(rid, answer, reader, writer)
            return False
        writer.write(answer)
        await writer.drain()
        return True

    async def _stream(
        self, rid: int, stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Send ``stream``'s items until it ends or the client closes (or sends more)."""
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            writer.write(encode_response(Response(rid, {"stream": True})))
            while True:
                item = asyncio.ensure_future(stream.get())
                await asyncio.wait((item, hangup), return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    return
                value = item.result()
                if value is None:
                    return
                line = json.dumps({"v": VERSION, "id": rid, "item": value}, separators=(",", ":"))
                writer.write(line.encode() + b"\n")
                await writer.drain()
        finally:
            hangup.cancel()
            stream.close()

    async def _call(self, rid: int, req: Request) -> bytes | Stream:
        """The encoded response to ``req``, or the stream that answers it."""
        try:
            result = await self.handler(req)
            if isinstance(result, Stream):
                return result
            return encode_response(Response(rid, result))
        except ControlError as e:
            return encode_response(error_response(rid, e))
        except Exception:  # the edge: log the bug, answer, keep serving
            log.exception("control request %s (id %s) failed", req.OP, rid)
            err = ControlError(INTERNAL, f"internal error in {req.OP}; see the daemon log")
            return encode_response(error_response(rid, err))

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, resp: Response) -> None:
        writer.write(encode_response(resp))
        await writer.drain()
