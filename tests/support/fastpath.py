"""A memory device with a scriptable callback fast path, and a recording ``done``.

:class:`Disk` answers :meth:`~dst.device.BlockDevice.submit_read` and
``submit_write`` the way a test asks: on the next loop iteration (``async``), before
returning (``sync``), when the test releases them (``manual``), never until cancelled
(``hang``), or not at all (``refuse``: the caller must use the coroutine path).  Injected
errors (``fail_reads``/``fail_writes``, an errno) apply to both paths.  A write reaches
``data`` only when it completes, and ``applied`` keeps the order in which writes did.
"""

from __future__ import annotations

import asyncio
import mmap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from dst.device import BlockDevice, Buffer, Cancel, Capabilities, Done, Extent
from dst.errors import BlockError
from dst.net.client import NbdClient
from dst.targets.file import FileDevice
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import MirrorDevice
from dst.targets.mirror.disklog import DiskLog

Mode = Literal["async", "sync", "manual", "refuse"]
Outcome = tuple[BaseException | None, Any]


class Request:
    """One request a :class:`Disk` took on its fast path; it ends exactly once."""

    __slots__ = ("cancelled", "disk", "done", "err", "kind", "length", "offset", "over", "payload")

    def __init__(
        self, disk: Disk, kind: str, offset: int, length: int, payload: bytes | None, done: Done
    ) -> None:
        self.disk = disk
        self.kind = kind
        self.offset = offset
        self.length = length
        self.payload = payload
        self.done = done
        self.err = disk.fail_writes if kind == "write" else disk.fail_reads
        self.over = False
        self.cancelled = False

    def finish(self) -> None:
        if self.over:
            return
        self.over = True
        if self.err:
            self.done(BlockError(self.err, f"{self.disk.name}: injected {self.kind} error"), None)
        elif self.payload is not None:
            self.disk.apply(self.offset, self.payload)
            self.done(None, None)
        else:
            self.done(None, bytes(self.disk.data[self.offset : self.offset + self.length]))

    def cancel(self) -> None:
        if self.over:
            return
        self.over = True
        self.cancelled = True
        self.disk.cancelled += 1
        self.done(asyncio.CancelledError(), None)


class InlineMemory(MemoryDevice):
    """A MemoryDevice served inline (``BlockDevice.read_now``/``write_now``), as a
    file is: the NBD server's inline path over memory."""

    def read_now(self, offset: int, length: int) -> Buffer | None:
        return bytes(self.data[offset : offset + length])

    def write_now(self, offset: int, data: Buffer) -> bool:
        if self.caps.read_only:
            return False
        self.data[offset : offset + len(data)] = data
        return True


class MappedFile(FileDevice):
    """A file that looks like a MemoryDevice: its bytes are also ``data`` (a shared
    mapping of it) and it declares memory's capabilities and reports everything
    allocated, so the tests written against memory run over a file -- which the server
    serves with the compiled inline runs (:mod:`dst._inline`)."""

    data: mmap.mmap

    async def open(self) -> None:
        await super().open()
        self.caps = Capabilities(trim=True, fast_zero=True, cache=True)
        self.data = mmap.mmap(self._fd, self.size)

    async def close(self) -> None:
        if not self.data.closed:
            self.data.close()
        await super().close()

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        return await BlockDevice.block_status(self, offset, length)


Memoryish = MemoryDevice | MappedFile
"""What a test reads and writes through ``data``."""


async def memoryish(kind: str, size: int, where: Path) -> Memoryish:
    """A device of ``size`` bytes served by its callback faces (``callback``), inline
    (``inline``, as a file is in Python) or by the compiled inline runs (``compiled``,
    a file in ``where``)."""
    if kind == "compiled":
        device = MappedFile(where / "memoryish.img", size=size, create=True, name="memory")
        await device.open()
        return device
    return (InlineMemory if kind == "inline" else MemoryDevice)(size)


class Disk(MemoryDevice):
    """A MemoryDevice with a fast path (module docstring)."""

    def __init__(self, size: int, *, name: str = "disk", mode: Mode = "async") -> None:
        super().__init__(size, name=name)
        self.mode: Mode = mode
        self.fail_reads = 0  # an errno: every read fails with it (both paths)
        self.fail_writes = 0
        self.hang = False  # requests never complete (until cancelled), both paths
        self.taken: list[Request] = []  # fast-path requests, in arrival order
        self.queued: list[Request] = []  # manual mode: waiting for release()
        self.coro_reads = 0
        self.coro_writes = 0
        self.cancelled = 0
        self.applied: list[tuple[int, bytes]] = []  # writes, in the order they landed

    def apply(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.applied.append((offset, data))

    def _take(
        self, kind: str, offset: int, length: int, payload: bytes | None, done: Done
    ) -> Cancel | None:
        if self.mode == "refuse":
            return None
        req = Request(self, kind, offset, length, payload, done)
        self.taken.append(req)
        if self.hang:
            pass
        elif self.mode == "sync":
            req.finish()
        elif self.mode == "async":
            asyncio.get_running_loop().call_soon(req.finish)
        else:
            self.queued.append(req)
        return req.cancel

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        return self._take("write", offset, len(data), bytes(data), done)

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        return self._take("read", offset, length, None, done)

    def release(self) -> int:
        """Complete the queued (manual) requests in arrival order; how many."""
        queued, self.queued = self.queued, []
        for req in queued:
            req.finish()
        return len(queued)

    def finish_all(self) -> None:
        """Complete every fast request still open (hung ones included)."""
        self.hang = False
        self.queued = []
        for req in self.taken:
            req.finish()

    async def _wait(self) -> None:
        await asyncio.sleep(0)  # the coroutine path really suspends
        if self.hang:
            await asyncio.get_running_loop().create_future()

    async def read(self, offset: int, length: int) -> Buffer:
        self.coro_reads += 1
        await self._wait()
        if self.fail_reads:
            raise BlockError(self.fail_reads, f"{self.name}: injected read error")
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self.coro_writes += 1
        await self._wait()
        if self.fail_writes:
            raise BlockError(self.fail_writes, f"{self.name}: injected write error")
        self.apply(offset, bytes(data))


class Completion:
    """A ``done`` callback that records every call; a correct device calls it once."""

    def __init__(self) -> None:
        self.calls: list[Outcome] = []
        self._fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __call__(self, exc: BaseException | None, value: Any) -> None:
        self.calls.append((exc, value))
        if not self._fut.done():
            self._fut.set_result(None)

    async def wait(self, timeout: float = 5.0) -> Outcome:  # noqa: ASYNC109
        """The one outcome, once it came (TimeoutError if not within ``timeout``)."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._fut)
        assert len(self.calls) == 1, f"done called {len(self.calls)} times: {self.calls}"
        return self.calls[0]

    async def result(self, timeout: float = 5.0) -> Any:  # noqa: ASYNC109
        """The value, or the error raised."""
        exc, value = await self.wait(timeout)
        if exc is not None:
            raise exc
        return value


async def submit(dev: BlockDevice | NbdClient, op: str, *args: Any) -> Any:
    """``dev.submit_<op>(*args, done)``, which must take the request; its result."""
    c = Completion()
    taken: Callable[[], object] | None = getattr(dev, f"submit_{op}")(*args, c)
    assert taken is not None, f"{type(dev).__name__}.submit_{op} refused"
    return await c.result()


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Poll cheap in-process state until ``cond`` holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def disk_log(m: MirrorDevice) -> DiskLog:
    """The dirty log of a mirror with metadata."""
    log = m.log
    assert isinstance(log, DiskLog)
    return log
