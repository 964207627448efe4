"""Striping over child devices (dm-stripe, RAID 0).

Theory of operation
-------------------
:class:`StripeLayout` deals ``chunk``-byte chunks round-robin over the children.  The
chunks a request touches on one child are contiguous on that child, so each request
costs at most one child I/O per member: a read fetches each member's run and scatters
it into one output buffer; a write gathers each member's chunks into one buffer (a
single piece goes through without a copy).  Members run concurrently.  TRIM, ZEROES,
CACHE and BLOCK_STATUS go per member run / per chunk.

The size is ``members * floor(min(child sizes) / chunk) * chunk``, known once the
children are open.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from dst.aio import gather_all
from dst.device import BlockDevice, Buffer, Cancel, Done, Extent, Health
from dst.errors import BlockError, ConfigError
from dst.targets.composite import combined_health, intersect_caps, status_over
from dst.targets.layout import DEFAULT_CHUNK, StripeLayout


class StripeDevice(BlockDevice):
    """``children`` striped with ``chunk``-byte chunks.  Raises ConfigError if bad."""

    kind = "stripe"

    def __init__(
        self, children: Sequence[BlockDevice], *, chunk: int = DEFAULT_CHUNK, name: str = "stripe"
    ) -> None:
        if not children:
            raise ConfigError("a stripe needs at least one member", where="children")
        if chunk <= 0 or chunk % 512:
            raise ConfigError("chunk size must be a positive multiple of 512", where="chunk")
        if len({id(c) for c in children}) != len(children):
            raise ConfigError("a device may appear only once in a stripe", where="children")
        self._devs = tuple(children)
        self.chunk = chunk
        self.name = name
        self.size = 0
        self.layout = StripeLayout(len(children), chunk, 0)

    async def open(self) -> None:
        """Open the children and compute the size.  Raises BlockError, ConfigError."""
        for dev in self._devs:
            await dev.open()
        self.layout = StripeLayout.for_sizes([d.size for d in self._devs], self.chunk)
        if self.layout.rows == 0:
            raise ConfigError(f"members are smaller than one chunk ({self.chunk})", where="chunk")
        self.size = self.layout.size
        self.caps = intersect_caps(self._devs)

    async def close(self) -> None:
        for dev in self._devs:
            await dev.close()

    def replace_child(self, old: BlockDevice, new: BlockDevice) -> None:
        """Put ``new`` (open, at least as large, holding ``old``'s data) in ``old``'s place.

        The layout is unchanged.  Call with I/O suspended; ``old`` is still open and now
        the caller's.  Raises ConfigError if ``old`` is not a member, ``new`` already is
        one, or ``new`` is smaller.
        """
        if not any(d is old for d in self._devs):
            raise ConfigError(f"{old.name!r} is not a member", where="members")
        if any(d is new for d in self._devs):
            raise ConfigError(f"{new.name!r} is already a member", where="members")
        if new.size < old.size:
            msg = f"{new.name!r} ({new.size} bytes) is smaller than {old.name!r} ({old.size} bytes)"
            raise ConfigError(msg, where="members")
        self._devs = tuple(new if d is old else d for d in self._devs)
        if self.size:  # open: the children's capabilities are known
            self.caps = intersect_caps(self._devs)

    # -- I/O -------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> Buffer:
        runs = self.layout.member_runs(offset, length)
        if len(runs) == 1:
            run = runs[0][0]
            return await self._devs[run.member].read(run.member_offset, length)
        parts = await gather_all(
            [self._devs[r.member].read(r.member_offset, r.length) for r, _ in runs]
        )
        out = bytearray(length)
        for (_, pieces), data in zip(runs, parts, strict=True):
            src = memoryview(data)
            pos = 0
            for p in pieces:
                at = p.array_offset - offset
                out[at : at + p.length] = src[pos : pos + p.length]
                pos += p.length
        return out

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        view = memoryview(data)
        writes = []
        for run, pieces in self.layout.member_runs(offset, len(view)):
            at = [p.array_offset - offset for p in pieces]
            if len(pieces) == 1:
                buf: Buffer = view[at[0] : at[0] + run.length]
            else:
                buf = b"".join(view[a : a + p.length] for a, p in zip(at, pieces, strict=True))
            writes.append(self._devs[run.member].write(run.member_offset, buf, fua=fua))
        await gather_all(writes)

    # The callback fast path (dst.device): a request within one chunk goes to its node.

    def submit_read(self, offset: int, length: int, done: Done) -> Cancel | None:
        runs = self.layout.member_runs(offset, length)
        if len(runs) != 1:
            return None
        run = runs[0][0]
        return self._devs[run.member].submit_read(run.member_offset, length, done)

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> Cancel | None:
        runs = self.layout.member_runs(offset, len(data))
        if len(runs) != 1 or len(runs[0][1]) != 1:
            return None
        run = runs[0][0]
        return self._devs[run.member].submit_write(run.member_offset, data, fua, done)

    async def flush(self) -> None:
        await gather_all([d.flush() for d in self._devs])

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        runs = self.layout.member_runs(offset, length)
        await gather_all(
            [self._devs[r.member].trim(r.member_offset, r.length, fua=fua) for r, _ in runs]
        )

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        if fast and not self.caps.fast_zero:
            raise BlockError(errno.ENOTSUP, "fast zero not supported by every member")
        await gather_all(
            [
                self._devs[r.member].write_zeroes(
                    r.member_offset, r.length, fua=fua, punch=punch, fast=fast
                )
                for r, _ in self.layout.member_runs(offset, length)
            ]
        )

    async def cache(self, offset: int, length: int) -> None:
        runs = self.layout.member_runs(offset, length)
        await gather_all([self._devs[r.member].cache(r.member_offset, r.length) for r, _ in runs])

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        return await status_over(self.layout.split(offset, length), self._devs)

    # -- status ----------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        return {
            "type": "stripe",
            "name": self.name,
            "chunk_size": self.chunk,
            "members": [d.spec() for d in self._devs],
        }

    def health(self) -> Health:
        return combined_health(self._devs)

    def children(self) -> Sequence[BlockDevice]:
        return self._devs
