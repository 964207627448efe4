"""Live replace of one device by another: a temporary write-blocking mirror (pvmove).

Theory of operation
-------------------
A :class:`ReplaceDevice` stands in for OLD in its parent while NEW is filled.  Reads go
to OLD.  Every mutation (write, zeroes, trim) goes to OLD *and* NEW and completes when
both did (QEMU's "write-blocking" mirror), and flush goes to both, so whatever the copy
has passed stays identical on NEW.  :meth:`ReplaceDevice.run` copies the source (OLD,
or ``source``) to NEW region by region in increasing order; each region is copied
holding its byte range in a :class:`~dst.targets.rangelock.RangeLock` that every
mutation also takes, so a write racing the copy of its region is applied after the
copy on NEW (never overwritten by stale data), and overlapping writes reach OLD and NEW
in the same order.  Regions the source reports as zero (block status) are zeroed on
NEW instead of read and written.  The copy converges because new writes go to both:
once the last region is copied, NEW equals OLD and stays so.

Failure and cancel: an error from NEW (in the copy or a foreground mutation) aborts the
replace: state ``failed`` with the error, the copy stops, and from then on everything
goes to OLD alone; :meth:`~ReplaceDevice.run` raises the error.  Foreground requests
never fail because of NEW.  :meth:`~ReplaceDevice.cancel` stops the same way (state
``cancelled``).  In both cases NEW is partly written and must not be used; the parent
may keep the ReplaceDevice (it behaves as OLD) or put OLD back under a suspend.

Reads: OLD answers; if OLD fails a read, the read is retried on NEW when the range is
already copied (and the replace has not failed), else on ``source`` if one was given.

Finishing (the caller, with the array root a :class:`~dst.targets.gate.GateDevice`)::

    await new.open()
    rep = ReplaceDevice(old, new)
    await root.reconfigure(lambda: parent.replace_child(old, rep))
    await rep.run()                      # in the daemon's task group; raises on failure
    await root.reconfigure(lambda: parent.replace_child(rep, rep.take_new()))
    await old.close()                    # OLD is released

Pacing: ``limit`` is any object with ``async pace(nbytes, busy)``, normally a
:class:`dst.targets.copier.RateLimit` (``busy``: foreground requests arrived since the
last region).  The copy runs on the shared region copier (:mod:`dst.targets.copier`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from dst.device import BlockDevice, Buffer, Extent, Health
from dst.errors import BlockError, ConfigError
from dst.targets.composite import intersect_caps
from dst.targets.copier import Copier
from dst.targets.copyplan import Moved, Span, copy_sparse, plan
from dst.targets.rangelock import RangeLock

log = logging.getLogger(__name__)
DEFAULT_REGION = 1 << 20
Op = Callable[[BlockDevice], Awaitable[None]]
T = TypeVar("T")


COPY_DEPTH = 4  # regions copied at once


class Pacer(Protocol):
    """What the copy needs of a rate limit (:class:`dst.targets.copier.RateLimit`)."""

    async def pace(self, nbytes: int, busy: bool) -> None: ...


class ReplaceDevice(BlockDevice):
    """OLD (open) mirrored onto NEW (open, at least as large) while :meth:`run` copies.

    ``source`` (default OLD) is what the copy reads: a device with OLD's data at the same
    offsets, for when OLD itself cannot be read.  ``name`` defaults to
    ``replace-<old name>`` so that OLD's name keeps naming OLD in the tree.  Raises
    ConfigError if NEW or ``source`` is smaller than OLD or ``region_size`` is not
    positive.
    """

    kind = "replace"

    def __init__(
        self,
        old: BlockDevice,
        new: BlockDevice,
        *,
        source: BlockDevice | None = None,
        region_size: int = DEFAULT_REGION,
        limit: Pacer | None = None,
        name: str = "",
    ) -> None:
        self.old, self.new = old, new
        self.source = source if source is not None else old
        for dev in (new, self.source):
            if dev.size < old.size:
                msg = f"{dev.name!r} ({dev.size} bytes) is smaller than {old.name!r}"
                raise ConfigError(f"{msg} ({old.size} bytes)", where="new")
        if region_size <= 0:
            raise ConfigError("region size must be positive", where="region_size")
        self.region_size = region_size
        self.limit = limit
        self.name = name or f"replace-{old.name}"  # distinct: OLD keeps its own name
        self.size = old.size
        self.caps = intersect_caps([old, new])
        self.state = "pending"  # copying, done; or cancelled, failed, finished
        self.error: BlockError | None = None
        self.regions_total = -(-self.size // region_size)
        self.regions_done = 0
        self.bytes_copied = 0
        self.bytes_zeroed = 0
        self.advanced = asyncio.Event()  # set after every region and on stop (watchers)
        self._mirroring = True  # mutations go to NEW too
        self._spans_done: dict[int, int] = {}  # copied spans past the prefix: first -> stop
        self._copied_to = 0  # regions below this are on NEW
        self._lock = RangeLock()
        self._task: asyncio.Task[None] | None = None
        self._ops = 0  # foreground requests (the pacer's "busy")
        self._paced_ops = 0
        self._copier = Copier(name=self.name, depth=COPY_DEPTH, pace=self._pace,
                              stop_on_error=True, region_size=region_size)  # fmt: skip

    # -- control ---------------------------------------------------------------------

    async def run(self) -> None:
        """Copy every region to NEW; return when done (state ``done``) or cancelled.

        Raises BlockError (naming OLD and NEW) if the replace failed, ConfigError if it
        already ran.  Cancelled from outside, the replace ends as ``cancelled``.
        """
        if self.state != "pending":
            raise ConfigError(f"replace of {self.old.name!r} is {self.state}")
        self.state = "copying"
        task = self._task = asyncio.current_task()
        assert task is not None
        try:
            await self._copy_all()
        except asyncio.CancelledError:
            if self.state == "copying":  # cancelled from outside, not by _stop
                self._stop("cancelled", None)
                raise
            if task.uncancel():  # also cancelled from outside meanwhile
                raise
        except BlockError as exc:
            self._stop("failed", exc)
        finally:
            self._task = None
        if self.state == "copying":
            self.state = "done"
            self.advanced.set()
            log.info("%s: copy to %r complete", self.name, self.new.name)
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Stop copying and mirroring; OLD alone serves from now on.  NEW is left
        partly written and unused.  A no-op once cancelled, failed or finished."""
        self._stop("cancelled", None)

    def take_new(self) -> BlockDevice:
        """NEW, for the caller to put in this device's place; state ``finished``.

        Raises ConfigError unless the copy is done.  Mutations keep going to both
        devices until this device is out of the tree, so it is safe to call before the
        suspend; from now on a failure of NEW fails the request (NEW is the member of
        record) instead of aborting, and :meth:`cancel` does nothing.  OLD is the
        caller's to close after the swap.
        """
        if self.state != "done":
            raise ConfigError(f"replace of {self.old.name!r} is {self.state}, not done")
        self.state = "finished"
        return self.new

    def progress(self) -> dict[str, Any]:
        """State, regions done/total, bytes copied and zeroed, rate (B/s), ETA (s)."""
        rate = self._copier.meter.rate()
        left = (self.regions_total - self.regions_done) * self.region_size
        copying = self.state in ("pending", "copying")
        return {
            "state": self.state,
            "old": self.old.name,
            "new": self.new.name,
            "regions_done": self.regions_done,
            "regions_total": self.regions_total,
            "percent": 100.0 * self.regions_done / self.regions_total
            if self.regions_total
            else 100.0,
            "bytes_copied": self.bytes_copied,
            "bytes_zeroed": self.bytes_zeroed,
            "rate": rate,
            "eta": left / rate if copying and rate and left else None,
            "error": None if self.error is None else self.error.message,
        }

    def _stop(self, state: str, error: BlockError | None) -> None:
        if self.state not in ("pending", "copying", "done"):
            return
        self.state, self.error, self._mirroring = state, error, False
        self.advanced.set()
        if error is not None:
            log.error("%s: replace by %r aborted: %s", self.name, self.new.name, error.message)
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _new_failed(self, exc: BlockError) -> None:
        msg = f"replace of {self.old.name!r} by {self.new.name!r} failed: {exc.message}"
        self._stop("failed", BlockError(exc.errno, msg))

    # -- the copy --------------------------------------------------------------------

    async def _copy_all(self) -> None:
        """Copy every region with the shared copier (up to ``COPY_DEPTH`` spans at
        once, each under its range lock, in increasing order); the first error stops
        the copy and is raised."""
        copier = self._copier
        copier.kind, copier.total = "full", self.regions_total
        status = self._status if self.source.caps.block_status else None
        spans = plan([(0, self.regions_total)], status, region_size=self.region_size,
                     size=self.size, data_bytes=self.region_size)  # fmt: skip
        await copier.run(spans, self._span)

    async def _status(self, offset: int, length: int) -> Sequence[Extent]:
        return await self._reading(self.source.block_status(offset, length))

    async def _span(self, span: Span) -> Moved:
        rs = self.region_size
        start = span.first * rs
        n = min(span.stop * rs, self.size) - start
        async with self._lock.hold(start, n):
            if not self._mirroring:
                return Moved()
            status = self._status if self.source.caps.block_status else None
            moved = await copy_sparse(status, self._read, self._write, self._zero, start, n)
        self.regions_done += span.count
        self._spans_done[span.first] = span.stop
        while self._copied_to in self._spans_done:  # the prefix NEW holds
            self._copied_to = self._spans_done.pop(self._copied_to)
        self.bytes_copied += moved.copied
        self.bytes_zeroed += moved.skipped
        self.advanced.set()
        return moved

    async def _read(self, pos: int, length: int) -> Buffer:
        return await self._reading(self.source.read(pos, length))

    async def _write(self, pos: int, data: Buffer) -> None:
        await self._writing(self.new.write(pos, data))

    async def _zero(self, pos: int, length: int) -> None:
        await self._writing(self.new.write_zeroes(pos, length, punch=True))

    async def _pace(self, region: int, nbytes: int) -> None:
        if self.limit is not None:
            busy, self._paced_ops = self._ops != self._paced_ops, self._ops
            await self.limit.pace(nbytes, busy)

    async def _reading(self, aw: Awaitable[T]) -> T:
        try:
            return await aw
        except BlockError as exc:
            msg = f"replace of {self.old.name!r}: reading {self.source.name!r} failed"
            raise BlockError(exc.errno, f"{msg}: {exc.message}") from None

    async def _writing(self, aw: Awaitable[None]) -> None:
        try:
            await aw
        except BlockError as exc:
            self._new_failed(exc)
            raise self.error or exc from None

    # -- I/O -------------------------------------------------------------------------

    async def _both(self, offset: int, length: int, op: Op) -> None:
        """Apply ``op`` to OLD and NEW, holding the range; NEW's failure only aborts."""
        self._ops += 1
        if not self._mirroring:
            return await op(self.old)
        async with self._lock.hold(offset, length):
            if not self._mirroring:
                return await op(self.old)
            await self._pair(op)
        return None

    async def _pair(self, op: Op) -> None:
        r_old, r_new = await asyncio.gather(op(self.old), op(self.new), return_exceptions=True)
        if isinstance(r_new, BlockError) and self.state != "finished":
            self._new_failed(r_new)
        elif isinstance(r_new, BaseException):
            raise r_new
        if isinstance(r_old, BaseException):
            raise r_old

    async def read(self, offset: int, length: int) -> Buffer:
        self._ops += 1
        try:
            return await self.old.read(offset, length)
        except BlockError:
            if self._mirroring and offset + length <= self._copied_to * self.region_size:
                return await self.new.read(offset, length)
            if self.source is not self.old:
                return await self.source.read(offset, length)
            raise

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self._both(offset, len(data), lambda d: d.write(offset, data, fua=fua))

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._both(offset, length, lambda d: d.trim(offset, length, fua=fua))

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        if fast and not (self.old.caps.fast_zero and self.new.caps.fast_zero):
            raise BlockError(errno.ENOTSUP, "fast zero not supported by old and new")
        await self._both(
            offset,
            length,
            lambda d: d.write_zeroes(offset, length, fua=fua, punch=punch, fast=fast),
        )

    async def flush(self) -> None:
        self._ops += 1
        if not self._mirroring:
            return await self.old.flush()
        return await self._pair(lambda d: d.flush())

    async def cache(self, offset: int, length: int) -> None:
        await self.old.cache(offset, length)

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        return await self.old.block_status(offset, length)

    # -- lifecycle and status --------------------------------------------------------

    async def open(self) -> None:
        """Nothing: OLD and NEW are open when the replace starts."""

    async def close(self) -> None:
        """Stop the replace and close OLD and NEW (the array is shutting down).

        Once ``finished`` (:meth:`take_new`) it closes nothing: NEW is in the tree and
        OLD is the caller's."""
        if self.state == "finished":
            return
        self.cancel()
        await self.old.close()
        await self.new.close()

    def spec(self) -> dict[str, Any]:
        """OLD's spec: until the swap, OLD is the member of record."""
        return self.old.spec()

    def member_info(self) -> list[dict[str, Any]]:
        return [{"role": "old"}, {"role": "new", "state": "copying"}]

    def health(self) -> Health:
        h = self.old.health()
        return Health(h.state, {**h.detail, "replace": self.progress()})

    def children(self) -> Sequence[BlockDevice]:
        return (self.old, self.new)
