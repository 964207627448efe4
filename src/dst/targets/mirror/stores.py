"""The metadata areas of a mirror's members: one :class:`~dst.meta.store.MetaStore` per
leg, every access bounded in time.

:class:`MemberStores` is the I/O half of the disk dirty log
(:class:`~dst.targets.mirror.disklog.DiskLog` is the policy half): it tells a blank
member from a formatted one, formats, loads, reads raw bitmaps, writes superblocks and
bitmap pages, finds a device that is a member already, and marks a member that left.
Leg indices follow the mirror's (:meth:`grow`, :meth:`swap`, :meth:`drop`).
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from dst.aio import timed
from dst.device import BlockDevice
from dst.errors import BlockError
from dst.meta.bitmap import PAGE_BITS
from dst.meta.layout import BLOCK, MetaLayout, layout_for, sb_offsets
from dst.meta.store import MetaStore
from dst.meta.superblock import MAGIC, MetadataError, State, Superblock

log = logging.getLogger(__name__)
BEST_EFFORT_TIMEOUT = 10.0  # seconds, superblock writes to failed or removed legs


def new_generation(known: Iterable[int] = ()) -> int:
    """A random non-zero generation identifier not in ``known``."""
    avoid = set(known)
    while True:
        g = secrets.randbits(64)
        if g and g not in avoid:
            return g


def layout_of(member_size: int, region_size: int) -> MetaLayout:
    """The metadata layout of a member; MetadataError if it is too small."""
    try:
        return layout_for(member_size, region_size)
    except ValueError as e:
        raise MetadataError(str(e)) from e


def best_effort(limit: float | None) -> float:
    """Time limit for writing to a leg that is not (or no longer) in the array."""
    return min(limit, BEST_EFFORT_TIMEOUT) if limit is not None else BEST_EFFORT_TIMEOUT


def shared(sb: Superblock, ref: Superblock) -> Superblock:
    """``sb`` (one member's identity) with the array-wide fields of ``ref``."""
    return replace(
        sb,
        member_count=ref.member_count,  # a member that missed a membership change
        current=ref.current,
        bitmap=ref.bitmap,
        history=ref.history,
        events=ref.events,
        state=ref.state,
        resync_pos=ref.resync_pos,
        spec=ref.spec,
    )


class MemberStores:
    """The stores of the members ``devices`` (module docstring)."""

    def __init__(
        self,
        devices: Sequence[BlockDevice],
        *,
        name: str,
        leg_timeout: float | None,
        layout: Mapping[str, Any] | None = None,
    ) -> None:
        self.stores = [MetaStore(d) for d in devices]
        self.layout = dict(layout or {"type": "mirror"})  # the array's kind and geometry
        self.name = name
        self.leg_timeout = leg_timeout

    def __getitem__(self, leg: int) -> MetaStore:
        return self.stores[leg]

    def __len__(self) -> int:
        return len(self.stores)

    # -- reading ---------------------------------------------------------------------

    async def blank(self, leg: int) -> bool:
        """True if neither superblock slot of ``leg`` has the dst magic (a new member).
        MetadataError if it is too small for any metadata."""
        dev = self.stores[leg].device
        layout_of(dev.size, BLOCK)
        for off in sb_offsets(dev.size):
            raw = await timed(dev.read(off, BLOCK), self.leg_timeout)
            if bytes(raw[: len(MAGIC)]) == MAGIC:
                return False
        return True

    async def load(self, leg: int) -> Superblock:
        """Read ``leg``'s superblock afresh.  MetadataError, BlockError."""
        store = self.stores[leg] = MetaStore(self.stores[leg].device)
        return await timed(store.load(), self.leg_timeout)

    async def raw_bitmap(self, leg: int, size: int, region_size: int) -> int:
        """The on-disk bitmap of ``leg`` as an integer (bit i = region i)."""
        lay = self.stores[leg].layout
        assert lay is not None
        n = -(-size // region_size)
        length = -(-n // PAGE_BITS) * BLOCK
        raw = await timed(self.stores[leg].device.read(lay.bitmap_offset, length), self.leg_timeout)
        return int.from_bytes(raw, "little") & ((1 << n) - 1)

    def known(self) -> set[int]:
        """Every generation any member's superblock mentions."""
        known: set[int] = set()
        for store in self.stores:
            if store.sb is not None:
                known |= {store.sb.current, store.sb.bitmap, *store.sb.history}
        return known

    async def member_of(self, device: BlockDevice) -> int | None:
        """The leg that ``device`` already is (same array and member UUID: the same disk
        reached another way), else None.  BlockError if it cannot be read."""
        try:
            sb = await timed(MetaStore(device).load(), self.leg_timeout)
        except MetadataError:
            return None  # blank, or not a dst member
        for i, store in enumerate(self.stores):
            mine = store.sb
            if mine is not None and (mine.array_uuid, mine.member_uuid) == (
                sb.array_uuid,
                sb.member_uuid,
            ):
                return i
        return None

    # -- writing ---------------------------------------------------------------------

    async def format(
        self,
        leg: int,
        *,
        array_uuid: uuid.UUID,
        generation: int,
        size: int,
        region_size: int,
        inconsistent: bool = False,
        label: Mapping[str, Any] | None = None,
    ) -> Superblock:
        """Make ``leg`` a new member (role ``leg``) of this array (``inconsistent``: a
        resync target).  MetadataError if it does not fit, BlockError."""
        store = self.stores[leg] = MetaStore(self.stores[leg].device)
        names = [s.device.name for s in self.stores]
        spec = {
            **self.layout,
            "size": size,
            "region_size": region_size,
            "legs": len(names),
            "names": names,
        }  # fmt: skip  (for dst assemble)
        if label:
            spec["array"] = dict(label)
        try:
            return await timed(
                store.format(
                    array_uuid=array_uuid, member_uuid=uuid.uuid4(), role=leg,
                    member_count=len(names), generation=generation, region_size=region_size,
                    array_name=self.name, spec=spec, inconsistent=inconsistent,
                ),
                self.leg_timeout,
            )  # fmt: skip
        except ValueError as e:
            raise MetadataError(f"{self.name}: leg {leg}: {e}") from e

    async def write_sb(self, leg: int, sb: Superblock, *, limit: float | None = None,
                       flush_first: bool = False) -> None:  # fmt: skip
        """Durably write ``sb`` on ``leg`` (after flushing its data, with
        ``flush_first``).  BlockError."""
        store = self.stores[leg]
        limit = self.leg_timeout if limit is None else limit
        if flush_first:
            await timed(store.device.flush(), limit)
        await timed(store.write_superblock(sb), limit)

    async def flag_inconsistent(self, leg: int) -> None:
        """Say on ``leg``'s superblock that it is a resync target (its data incomplete
        until it adopts the current generation), before anything is copied to it."""
        sb = self.stores[leg].sb
        if sb is not None and not sb.inconsistent:
            await self.write_sb(leg, replace(sb, inconsistent=True))

    async def write_pages(
        self, leg: int, pages: Mapping[int, bytes], *, data_durable: bool = False
    ) -> None:
        await timed(
            self.stores[leg].write_bitmap_pages(pages, data_durable=data_durable),
            self.leg_timeout,
        )

    async def retire(self, store: MetaStore | None, *, was: str) -> bool:
        """Mark the member of ``store``, which left the array ``was``, as a one-leg
        array of its own (a new array UUID; ``spec["removed_from"]``), so it is never
        taken for a member again; its data is untouched.  Best effort: False if it could
        not be written (a dead device)."""
        if store is None or store.sb is None:
            return False
        sb = store.sb
        name = store.device.name
        spec = {**sb.spec, "legs": 1, "names": [name], "removed_from": was}
        new = replace(sb, array_uuid=uuid.uuid4(), role=0, member_count=1, spec=spec,
                      state=State.CLEAN, bitmap=0, resync_pos=None)  # fmt: skip
        limit = best_effort(self.leg_timeout)
        try:  # its data as of now stays as it is (not flushed: it is not ours any more)
            await timed(store.write_superblock(new), limit)
        except BlockError as e:
            log.warning("%s: could not mark removed member %s: %r", self.name, name, e)
            return False
        return True

    # -- leg indices -----------------------------------------------------------------

    def grow(self, device: BlockDevice) -> None:
        self.stores.append(MetaStore(device))

    def swap(self, leg: int, device: BlockDevice, keep: MetaStore | None = None) -> MetaStore:
        """``device`` (with ``keep``, or a new store) in place of ``leg``; the old store."""
        old = self.stores[leg]
        self.stores[leg] = keep if keep is not None else MetaStore(device)
        return old

    def drop(self, leg: int) -> MetaStore:
        return self.stores.pop(leg)
