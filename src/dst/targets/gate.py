"""The one suspend gate: :class:`Gate` (admission control) and :class:`GateDevice` (a
device behind a gate, which can be suspended, swapped and resumed).

Theory of operation
-------------------
Device-mapper's suspend, reduced to one small object.  A request *enters* the gate
before it touches the device behind it and *leaves* when it completed.  While the gate
is open, entering costs one attribute test and one integer increment (the caller does
both inline, see :meth:`Gate.admit`)::

    if gate.closed:
        await gate.admit()      # may hold the request; raises BlockError when full
    else:
        gate.inflight += 1
    try:
        ...                     # the request
    finally:
        gate.leave()

:meth:`Gate.close` stops admitting and waits until every request in flight has left
(drain).  Requests arriving while closed wait, each on a future of its own, in a FIFO
queue; :meth:`Gate.open` counts them in flight and wakes them in arrival order.  At
most ``max_held`` requests wait: one more fails at once with ``BlockError(EAGAIN)``
naming the gate, instead of queueing without bound (on the NBD wire it is an EIO).
A held request that is cancelled leaves the queue; a cancelled :meth:`close` opens the
gate again, so an abandoned suspend leaves everything as it was.

:class:`GateDevice` puts a device behind a gate and is what both suspend points of an
array are: the array root (live reconfiguration: build the new tree, suspend, swap,
resume, :meth:`GateDevice.reconfigure`) and every storage node
(:class:`dst.targets.member.Member`: suspend one node while the others go on).  A
request crosses it once, by either face of :mod:`dst.device`: the callback form is
taken only while the gate is open (one attribute test, two integer updates and a
closure more than the device inside); the coroutine form waits in the gate's queue.
Both count the request in :class:`~dst.device.IOCounters` and its errors (by errno)
and, when the process serves metrics, time it into the counters' latency histograms
(:mod:`dst.stats`: two clock reads and two integer additions).

A caller that already holds a completion of its own for the request (a mirror's
:class:`~dst.targets.mirror.legs.LegCall`) may take the callback form inline instead,
as the :class:`Gate` protocol allows: while :attr:`GateDevice.gate` is open and the
counters untimed, count the request in flight and in :attr:`GateDevice.counters`, start
it on :attr:`GateDevice.inner`, and on its answer (not before: a stopped request still
holds the gate until the device inside answers it) leave the gate and count its error,
as :meth:`GateDevice.leave_inline` does.  One completion per request instead of two.
"""

from __future__ import annotations

import asyncio
import collections
import errno
from collections.abc import Awaitable, Callable, Sequence
from time import perf_counter_ns
from typing import Any, TypeVar

from dst.aio import bind
from dst.device import (
    BlockDevice,
    Buffer,
    Cancel,
    Capabilities,
    Done,
    Extent,
    Health,
    IOCounters,
)
from dst.errors import BlockError, ConfigError
from dst.stats import Histogram

T = TypeVar("T")

DEFAULT_MAX_HELD = 1024


class Gate:
    """Admission control for one device; ``name`` appears in errors."""

    __slots__ = ("_drained", "_held", "closed", "inflight", "max_held", "name")

    def __init__(self, *, name: str = "", max_held: int | None = DEFAULT_MAX_HELD) -> None:
        if max_held is not None and max_held < 0:
            raise ConfigError("max_held cannot be negative", where="max_held")
        self.name = name
        self.max_held = max_held  # None: unbounded
        self.closed = False
        self.inflight = 0  # admitted and not yet left (held requests are not counted)
        self._held: collections.deque[asyncio.Future[None]] = collections.deque()
        self._drained: asyncio.Future[None] | None = None  # exists only while draining

    @property
    def held(self) -> int:
        """Requests waiting for :meth:`open`."""
        return len(self._held)

    async def admit(self) -> None:
        """Enter a closed gate: wait for :meth:`open` (counted in flight once released).

        Raises BlockError(EAGAIN) if ``max_held`` requests already wait.  Call only when
        ``closed`` (the open fast path is ``inflight += 1``); it also works when open.
        """
        if not self.closed:
            self.inflight += 1
            return
        if self.max_held is not None and len(self._held) >= self.max_held:
            msg = f"{self.name or 'device'} is suspended with {len(self._held)} requests held"
            raise BlockError(errno.EAGAIN, msg)
        fut = asyncio.get_running_loop().create_future()
        self._held.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.leave()  # released (counted in flight) but cancelled before running
            elif fut in self._held:
                self._held.remove(fut)
            raise

    @property
    def draining(self) -> bool:
        """A :meth:`close` waits for the requests in flight."""
        return self._drained is not None

    def leave(self) -> None:
        """A request admitted by the gate completed (successfully or not)."""
        self.inflight -= 1
        if self.inflight == 0:
            self.leave_last()

    def leave_last(self) -> None:
        """The last request in flight left: a waiting :meth:`close` returns."""
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def close(self) -> None:
        """Stop admitting; return once nothing is in flight.

        Raises ConfigError if already closed.  If cancelled while draining, the gate
        opens again (held requests are released) and the cancellation propagates.
        """
        if self.closed:
            raise ConfigError(f"{self.name or 'device'} is already suspended")
        self.closed = True
        if self.inflight == 0:
            return
        self._drained = asyncio.get_running_loop().create_future()
        try:
            await self._drained
        except asyncio.CancelledError:
            self.open()
            raise
        finally:
            self._drained = None

    def open(self) -> None:
        """Admit again; release held requests in arrival order.  Idempotent."""
        self.closed = False
        held = self._held
        while held:
            fut = held.popleft()
            if not fut.done():
                self.inflight += 1
                fut.set_result(None)


class GateDevice(BlockDevice):
    """``inner`` behind a :class:`Gate`: a pass-through that counts its I/O and can be
    suspended (drain, then hold new requests), swapped and resumed.

    ``max_held`` bounds the requests held while suspended (None: unbounded).
    """

    counters: IOCounters
    gate: Gate

    def __init__(
        self, inner: BlockDevice, *, name: str = "", max_held: int | None = DEFAULT_MAX_HELD
    ) -> None:
        self.inner = inner
        self.name = name or inner.name
        self.counters = IOCounters()
        self.gate = Gate(name=self.describe(), max_held=max_held)

    def describe(self) -> str:
        """How errors name this gate."""
        return f"array {self.name!r}"

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.inner.size

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.inner.kind

    @property
    def caps(self) -> Capabilities:  # type: ignore[override]
        return self.inner.caps

    @property
    def suspended(self) -> bool:
        """True between :meth:`suspend` (even while it drains) and :meth:`resume`."""
        return self.gate.closed

    @property
    def held(self) -> int:
        """Requests waiting for :meth:`resume`."""
        return self.gate.held

    @property
    def inflight(self) -> int:
        """Requests running on the device inside."""
        return self.gate.inflight

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    # -- suspend / swap / resume -------------------------------------------------------

    async def suspend(self) -> None:
        """Hold new requests; return when none is in flight any more.

        Raises ConfigError if already suspended.  Cancelled while draining (e.g. by a
        timeout around it), it is resumed again and nothing was held for good.
        """
        await self.gate.close()

    def resume(self) -> None:
        """Release held requests in arrival order.  Raises ConfigError if not suspended."""
        if not self.gate.closed:
            raise ConfigError(f"{self.describe()} is not suspended")
        self.gate.open()

    def swap(self, new: BlockDevice, *, min_size: int = 0) -> BlockDevice:
        """Put ``new`` (already open) inside; return the old device (not closed).

        Only while suspended and drained (after :meth:`suspend` returned), and ``new``
        must hold at least ``min_size`` bytes: raises ConfigError otherwise.  Held
        requests go to ``new`` on :meth:`resume`.
        """
        if not self.gate.closed or self.gate.inflight:
            raise ConfigError(f"{self.describe()} must be suspended to swap its device")
        if new.size < min_size:
            msg = f"{new.name or 'new device'!r} ({new.size} bytes) is smaller than {min_size}"
            raise ConfigError(msg, where=self.name)
        old, self.inner = self.inner, new
        return old

    async def reconfigure(self, change: Callable[[], Awaitable[None] | None]) -> None:
        """suspend -> ``change()`` -> resume, resuming even if ``change`` fails."""
        await self.suspend()
        try:
            result = change()
            if result is not None:
                await result
        finally:
            self.resume()

    # -- I/O ---------------------------------------------------------------------------

    def _error(self, exc: BlockError) -> BlockError:
        self.counters.failed(exc)
        return exc

    async def _through(
        self, op: Callable[[BlockDevice], Awaitable[T]], h: Histogram | None = None
    ) -> T:
        """Run ``op`` on the device inside, through the gate, counting its errors and,
        with ``h``, timing it (the wait in a suspended gate included)."""
        t0 = perf_counter_ns() if h is not None else 0
        g = self.gate
        if g.closed:
            try:
                await g.admit()
            except BlockError as exc:
                raise self._error(exc) from None
        else:
            g.inflight += 1
        try:
            return await op(self.inner)
        except BlockError as exc:
            raise self._error(exc) from None
        finally:
            g.leave()
            if h is not None:
                h.observe(perf_counter_ns() - t0)

    async def read(self, offset: int, length: int) -> Buffer:
        c = self.counters
        c.reads += 1
        c.read_bytes += length
        t = c.timing
        return await self._through(lambda d: d.read(offset, length), t.read if t else None)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        c = self.counters
        c.writes += 1
        c.write_bytes += len(data)
        t = c.timing
        await self._through(lambda d: d.write(offset, data, fua=fua), t.write if t else None)

    def _finisher(self, done: Done, h: Histogram) -> Done:
        """The completion of a timed callback-face request: timed into ``h``, then
        :meth:`_finished` (untimed requests bind that to ``done`` directly: no closure)."""
        finished = self._finished
        t0 = perf_counter_ns()

        def fin(exc: BaseException | None, value: Any) -> None:
            ns = perf_counter_ns() - t0
            h.counts[ns.bit_length()] += 1
            h.total_ns += ns
            finished(done, exc, value)

        return fin

    def leave_inline(self, exc: BaseException | None) -> None:
        """A request taken inline (module docstring), or by the callback form, was
        answered: it leaves the gate, its error is counted."""
        g = self.gate
        g.inflight -= 1
        if not g.inflight:
            g.leave_last()
        if exc is not None and isinstance(exc, BlockError):
            self.counters.failed(exc)

    def _finished(self, done: Done, exc: BaseException | None, value: Any) -> None:
        """A callback-face request completed: it leaves the gate and its error is
        counted, then ``done`` runs."""
        if exc is None:  # (leave_inline, inline: no error to count)
            g = self.gate
            g.inflight -= 1
            if not g.inflight:
                g.leave_last()
        else:
            self.leave_inline(exc)
        done(exc, value)

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        g = self.gate
        if g.closed:
            return None
        g.inflight += 1
        counters = self.counters
        t = counters.timing
        fin = bind(self._finished, done) if t is None else self._finisher(done, t.read)
        cancel = self.inner.submit_read(offset, length, fin)
        if cancel is None:
            g.leave()
            return None
        counters.reads += 1
        counters.read_bytes += length
        return cancel

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        g = self.gate
        if g.closed:
            return None
        g.inflight += 1
        counters = self.counters
        t = counters.timing
        fin = bind(self._finished, done) if t is None else self._finisher(done, t.write)
        cancel = self.inner.submit_write(offset, data, fua, fin)
        if cancel is None:
            g.leave()
            return None
        counters.writes += 1
        counters.write_bytes += len(data)
        return cancel

    def submit_gather(
        self, offset: int, parts: Sequence[Buffer], fua: bool, done: Done
    ) -> Cancel | None:
        """:meth:`submit_write` of ``parts`` (inline there: the mirror's hot path)."""
        g = self.gate
        if g.closed:
            return None
        g.inflight += 1
        counters = self.counters
        t = counters.timing
        fin = bind(self._finished, done) if t is None else self._finisher(done, t.write)
        cancel = self.inner.submit_gather(offset, parts, fua, fin)
        if cancel is None:
            g.leave()
            return None
        counters.writes += 1
        counters.write_bytes += sum(map(len, parts))
        return cancel

    async def flush(self) -> None:
        c = self.counters
        c.flushes += 1
        t = c.timing
        await self._through(lambda d: d.flush(), t.flush if t else None)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        c = self.counters
        c.trims += 1
        c.trim_bytes += length
        t = c.timing
        await self._through(lambda d: d.trim(offset, length, fua=fua), t.trim if t else None)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        c = self.counters
        c.zeroes += 1
        c.zero_bytes += length
        await self._through(
            lambda d: d.write_zeroes(offset, length, fua=fua, punch=punch, fast=fast),
            c.timing.zero if c.timing else None,
        )

    async def cache(self, offset: int, length: int) -> None:
        await self._through(lambda d: d.cache(offset, length))

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        return await self._through(lambda d: d.block_status(offset, length))

    # -- status ------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        return self.inner.spec()

    def health(self) -> Health:
        return self.inner.health()

    def children(self) -> Sequence[BlockDevice]:
        return (self.inner,)
