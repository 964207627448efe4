"""The BlockDevice interface every target implements.

Theory of operation
-------------------
A block device is a fixed-size array of bytes with asynchronous operations.  The NBD
server validates every request at the edge (range, flags, read-only), so
implementations may *assume* valid arguments: ``0 <= offset``, ``offset + length <=
size`` and ``length > 0``.

Capabilities are declared up front (:class:`Capabilities`); the base class emulates
what a target does not implement natively: FUA becomes write + flush, WRITE_ZEROES
becomes writes of zero buffers, TRIM is a no-op (it is advisory), CACHE is a no-op
and block status reports everything as allocated data.

Lifecycle: construct (validate arguments, no I/O) -> ``await open()`` -> I/O ->
``await close()``.  Composite targets open and close their children.

Errors: operations raise :class:`dst.errors.BlockError` with an errno.

The callback fast path
----------------------
A coroutine per layer per request is the main cost of a deep target tree in Python
(an array's root gate, a mirror, each node's member wrapper, the remote member and its
NBD client).  READ and WRITE therefore have an optional second form:
:meth:`BlockDevice.submit_read` / :meth:`~BlockDevice.submit_write` start the request
and call ``done(error, value)`` exactly once when it finished -- possibly before they
return -- with no coroutine, Task or future in between.  A device that cannot take a
request this way *right now* (a suspended gate, a region whose mark is not durable
yet, a lost connection, a device without a fast path) returns None having started
nothing, and the caller uses the coroutine method instead; so every fast path is an
optimisation of the common case, never a second set of semantics.  A taken request
returns a canceller: calling it makes ``done`` come soon with an exception if it has
not come yet (the request may still reach the device).

A device whose READ and WRITE are one system call on the page cache (a file) offers a
third, inline form, :meth:`BlockDevice.read_now` and :meth:`BlockDevice.write_now`:
served when they return, with no completion at all (a WRITE's data is a view of the
server's receive buffer, valid only during the call); None or False: not taken (use
the other forms).  Such a device may also offer the inline form for a whole run of
requests at once, compiled (:meth:`BlockDevice.inline_runs`, :mod:`dst._inline`): the
server's parse, ``pwrite`` and reply loop in C, stopping at the first request it does
not take, which the Python forms then serve as before.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dst.errors import BlockError, ConfigError, Unsupported
from dst.stats import Histogram, Timing, new_timing

Buffer = bytes | bytearray | memoryview
Done = Callable[[BaseException | None, Any], None]
"""Completion of a submitted request: ``done(None, value)`` or ``done(error, None)``."""
Cancel = Callable[[], object]
"""Returned by a submit that took the request (see the module docstring)."""
InlineRuns = Callable[[bytearray, int, int, int], tuple[int, int]]
"""``runs(buffer, pos, end, budget) -> (pos, used)``: :meth:`BlockDevice.inline_runs`."""


def no_cancel() -> None:
    """The canceller of a request that has already completed."""


ZERO_CHUNK = 1 << 20  # largest zero buffer the WRITE_ZEROES emulation allocates
_ZEROS = bytes(ZERO_CHUNK)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a device supports natively (the NBD server advertises from these)."""

    read_only: bool = False
    flush: bool = True
    fua: bool = True
    trim: bool = False
    zeroes: bool = True
    fast_zero: bool = False
    cache: bool = False
    multi_conn: bool = True
    block_status: bool = False
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 32 << 20


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with the same allocation state (NBD base:allocation)."""

    length: int
    hole: bool = False
    zero: bool = False


@dataclass(slots=True)
class IOCounters:
    """Per-device I/O statistics, reported in status and exported as metrics.

    ``errnos`` counts the errors by errno; ``timing`` holds a latency histogram per
    operation when the process serves metrics (:mod:`dst.stats`), else None.
    """

    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    flushes: int = 0
    trims: int = 0
    zeroes: int = 0
    errors: int = 0
    trim_bytes: int = 0
    zero_bytes: int = 0
    errnos: dict[int, int] = field(default_factory=dict)
    timing: Timing | None = field(default_factory=new_timing)

    def failed(self, exc: BlockError) -> None:
        """Count one error (by its errno too)."""
        self.errors += 1
        self.errnos[exc.errno] = self.errnos.get(exc.errno, 0) + 1

    def count(self, op: str, nbytes: int = 0) -> Histogram | None:
        """Count one request of ``op`` (read, write, flush, trim, zero) of ``nbytes``;
        returns the histogram to time it into (None: not timed).  For the slow paths:
        the hot ones do this inline."""
        if op == "read":
            self.reads, self.read_bytes = self.reads + 1, self.read_bytes + nbytes
        elif op == "write":
            self.writes, self.write_bytes = self.writes + 1, self.write_bytes + nbytes
        elif op == "flush":
            self.flushes += 1
        elif op == "trim":
            self.trims, self.trim_bytes = self.trims + 1, self.trim_bytes + nbytes
        else:
            self.zeroes, self.zero_bytes = self.zeroes + 1, self.zero_bytes + nbytes
        t = self.timing
        return getattr(t, op) if t is not None else None

    def as_dict(self) -> dict[str, int]:
        return {
            "reads": self.reads,
            "writes": self.writes,
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "flushes": self.flushes,
            "trims": self.trims,
            "zeroes": self.zeroes,
            "errors": self.errors,
        }


@dataclass(slots=True)
class Health:
    """A device's state for status: ``state`` is one word (ok, degraded, failed...)."""

    state: str = "ok"
    detail: dict[str, Any] = field(default_factory=dict)


class BlockDevice:
    """Base class: subclasses set ``size``/``caps`` and override what they support.

    ``kind`` names the target type (its spec's ``type``); ``node`` is True for the
    storage nodes of an array (the leaves the control plane addresses by name), whose
    ``where`` says where they are (path or URI) and ``counters`` count their I/O.
    """

    size: int
    caps: Capabilities = Capabilities()
    name: str = ""
    kind: str = "device"
    node: bool = False
    where: str = ""
    counters: IOCounters | None = None

    async def open(self) -> None:
        """Acquire resources (connect, open files).  Raises BlockError."""

    async def close(self) -> None:
        """Release resources; idempotent."""

    async def read(self, offset: int, length: int) -> Buffer:
        """Return exactly ``length`` bytes at ``offset``."""
        raise BlockError(errno.EOPNOTSUPP, f"{type(self).__name__} cannot read")

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` durably before returning."""
        raise BlockError(errno.EPERM, f"{type(self).__name__} is read-only")

    async def flush(self) -> None:
        """Make every completed write durable."""

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        """Fast path of :meth:`read` (module docstring): ``done(None, data)`` later, or
        None when not taken now.  The default never takes a request."""
        return None

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        """Fast path of :meth:`write` (module docstring): ``done(None, None)`` later, or
        None when not taken now.  The default never takes a request."""
        return None

    def read_now(self, offset: int, length: int) -> Buffer | None:
        """A READ done inline (module docstring): the data, or None when not taken.
        Raises BlockError.  The default never takes one."""
        return None

    def write_now(self, offset: int, data: Buffer) -> bool:
        """A WRITE without FUA done inline (module docstring): True once written --
        ``data`` is not kept --, False when not taken.  Raises BlockError.  The default
        never takes one."""
        return False

    def inline_runs(
        self, sink: Callable[[bytes], object], *, size: int, max_block: int, structured: bool,
        writable: bool,
    ) -> InlineRuns | None:  # fmt: skip
        """The inline form compiled for whole runs of requests (:mod:`dst._inline`),
        offered by a device whose :meth:`read_now` and :meth:`write_now` are one
        ``pread``/``pwrite`` on a descriptor and nothing else; it sends the replies of
        each run to ``sink`` and takes nothing once the device closed.  None: not
        offered (the default; or dst was built without a C compiler)."""
        return None

    def submit_gather(
        self, offset: int, parts: Sequence[Buffer], fua: bool, done: Done
    ) -> Cancel | None:
        """:meth:`submit_write` of the buffers ``parts`` laid end to end, without joining
        them first (a parity member's chunks of consecutive stripes: data from the
        request, parity from the encoder).  None when not taken now; the default never
        takes one (the caller joins them and writes that)."""
        return None

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Advisory discard; the default does nothing (allowed by NBD)."""

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        """Zero a range.  ``punch`` allows deallocation (NBD: no NO_HOLE flag).

        ``fast`` (NBD_CMD_FLAG_FAST_ZERO) asks to fail with ENOTSUP rather than
        fall back to writing zero buffers; the emulation here is never fast.
        """
        if fast:
            raise BlockError(errno.ENOTSUP, "fast zero not supported")
        end = offset + length
        pos = offset
        while pos < end:
            n = min(ZERO_CHUNK, end - pos)
            await self.write(pos, memoryview(_ZEROS)[:n])
            pos += n
        if fua:
            await self.flush()

    async def cache(self, offset: int, length: int) -> None:
        """Advisory prefetch; the default does nothing."""

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        """Allocation of ``[offset, offset+length)``; may cover less than asked."""
        return [Extent(length)]

    def spec(self) -> dict[str, Any]:
        """Enough to rebuild this device, in the array spec's shape (dm's table status:
        the control plane reads the running tree's spec, it keeps no parallel tree)."""
        return {"type": self.kind, "name": self.name}

    def health(self) -> Health:
        """Current state for status."""
        return Health()

    def children(self) -> Sequence[BlockDevice]:
        """Member devices of a composite target, in order."""
        return ()

    def member_info(self) -> list[dict[str, Any]]:
        """What this device says about each of its :meth:`children` in status (a linear
        member's ``start`` in the array, a mirror leg's ``state``); one dict each."""
        return [{} for _ in self.children()]

    def subscribe(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``callback(up)`` when a connection below goes down (False) or comes back
        (True); returns the unsubscribe.  The default listens to every child."""
        stops = [c.subscribe(callback) for c in self.children()]

        def stop() -> None:
            for s in stops:
                s()

        return stop

    def reset(self, reason: str) -> None:
        """A request did not come back in time: drop the connections below (they
        reconnect in the background; requests in flight fail at once).  Nothing for a
        device without one; the default passes it to every child."""
        for c in self.children():
            c.reset(reason)

    # -- suspend and live reconfiguration (dm's lifecycle; the gates suspend) -----------

    @property
    def suspended(self) -> bool:
        """True while I/O to this device is held (see :mod:`dst.targets.gate`)."""
        return False

    async def suspend(self) -> None:
        """Hold new I/O and wait for what is in flight.  Unsupported if it cannot."""
        raise Unsupported(f"a {self.kind} target cannot be suspended")

    def resume(self) -> None:
        """Release held I/O.  ConfigError if not suspended."""
        raise ConfigError(f"a {self.kind} target is not suspended")

    # The rest: call with I/O suspended (the array root does that).

    async def add_member(self, dev: BlockDevice, *, start: int = 0, length: int | None = None
                         ) -> None:  # fmt: skip
        """Grow by ``dev`` (open; ``start``/``length``: the part of it to use).
        Raises Unsupported if this target does not grow in place, ConfigError if the
        member does not fit."""
        raise Unsupported(f"a {self.kind} target does not grow by a member in place")

    async def remove_member(self, name: str) -> BlockDevice:
        """Shrink by the member called ``name``; returns its device (open, the
        caller's).  Raises Unsupported, or ConfigError if that member cannot go."""
        raise Unsupported(f"a {self.kind} target does not shrink by a member")

    def replace_child(self, old: BlockDevice, new: BlockDevice) -> None:
        """Put ``new`` (open, holding ``old``'s data) where ``old`` is.  Raises
        Unsupported if this target cannot, ConfigError if ``new`` does not fit."""
        raise Unsupported(f"a {self.kind} target cannot swap a member")
