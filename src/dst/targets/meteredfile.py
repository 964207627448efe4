"""A file device that counts and times its own I/O: a node's export with ``--metrics``.

Theory of operation
-------------------
``dst serve --metrics`` serves a :class:`MeteredFile` instead of a plain
:class:`~dst.targets.file.FileDevice`: the same device, whose every request goes
through one of its three funnels (``_read``, ``_write``, ``_counted``; the plain file's
callback-face WRITE does its ``pwrite`` inline, so this one routes it back), each counted
here into :class:`~dst.device.IOCounters` -- requests, bytes, errors by errno -- and
timed into its latency histograms (:mod:`dst.stats`).  The time is the device's own:
the syscall of a READ or WRITE (which completes at once, so two clock reads around it
and no closure), the thread hop of a flush, trim, zero or FUA write.  A node's
queueing and network time is in the array daemon's ``dst_member_*`` latency instead.
Without ``--metrics`` a node serves the plain device and pays nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from time import perf_counter_ns
from typing import Any

from dst.device import Buffer, Cancel, Done, IOCounters
from dst.errors import BlockError
from dst.targets.file import FileDevice


class MeteredFile(FileDevice):
    """A :class:`FileDevice` whose I/O is counted in ``counters`` (module docstring)."""

    counters: IOCounters

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counters = IOCounters()

    def _read(self, offset: int, length: int) -> bytes:
        c = self.counters
        t0 = perf_counter_ns()
        try:
            data = FileDevice._read(self, offset, length)
        except BlockError as exc:
            c.failed(exc)
            raise
        c.reads += 1
        c.read_bytes += length
        if (t := c.timing) is not None:
            ns = perf_counter_ns() - t0
            t.read.counts[ns.bit_length()] += 1
            t.read.total_ns += ns
        return data

    def _write(self, offset: int, data: Buffer) -> None:
        c = self.counters
        t0 = perf_counter_ns()
        try:
            FileDevice._write(self, offset, data)
        except BlockError as exc:
            c.failed(exc)
            raise
        c.writes += 1
        c.write_bytes += len(data)
        if (t := c.timing) is not None:
            ns = perf_counter_ns() - t0
            t.write.counts[ns.bit_length()] += 1
            t.write.total_ns += ns

    def write_now(self, offset: int, data: Buffer) -> bool:
        """Through the ``_write`` funnel (the plain file writes inline, unmetered)."""
        if self._read_only:
            return False
        self._write(offset, data)
        return True

    def submit_gather(
        self, offset: int, parts: Sequence[Buffer], fua: bool, done: Done
    ) -> Cancel | None:
        return None  # not taken: joined, it is written (and metered) by _write

    async def _counted(self, op: str, nbytes: int, work: Awaitable[None]) -> None:
        c = self.counters
        h = c.count(op, nbytes)
        t0 = perf_counter_ns()
        try:
            await work
        except BlockError as exc:
            c.failed(exc)
            raise
        finally:
            if h is not None:
                h.observe(perf_counter_ns() - t0)
