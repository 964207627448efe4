"""The disk dirty log: a superblock and the region bitmap at the end of every member.

Theory of operation
-------------------
Every member carries a superblock (two slots) and the bitmap (:mod:`dst.meta.layout`,
``docs/on-disk-format.md``); :class:`~dst.targets.mirror.stores.MemberStores` does that
I/O, :class:`DiskLog` decides what to write when.  Durability rules (DESIGN.md 1-3, 5):

* The first mutation after a clean start writes ``State.DIRTY`` on every current leg.
* A write proceeds only once its regions' bits are on every attached leg (the region
  hash sends the bitmap pages through :meth:`DiskLog.write_pages`).
* When a current leg fails, the survivors rotate their generation (the failed leg's
  generation becomes the bitmap generation, so its missed regions stay in the persisted
  bitmap until it is resynced); until that is durable (:meth:`DiskLog.settle`) nothing
  the failed leg missed is acknowledged.
* A clean shutdown persists the bitmap and writes ``State.CLEAN``.

Opening (:meth:`DiskLog.open`, :mod:`dst.targets.mirror.diskopen`) reads every
superblock, lets the pure functions of :mod:`dst.meta.members` pick the reference and
judge each leg, and returns what every leg misses: after a crash (``DIRTY``) the dirty
regions on every current leg but the lowest, which is the resync source.  Blank
members are formatted; a set of blank members is a new array.

A member becomes a resync target (re-added, joining, or found behind on open) only
after its superblock says *inconsistent* (DRBD's Inconsistent): until it adopts the
current generation its data is incomplete, and neither an assembly nor an open may
take it for a member in sync.

Metadata I/O is bounded by ``leg_timeout``; a leg whose metadata write fails is reported
to ``on_fail``.  Writes to a member that is failed or left are best effort.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from dst.aio import timed
from dst.device import BlockDevice
from dst.errors import BlockError
from dst.meta.bitmap import Bitmap
from dst.meta.members import check_member, readd_relation
from dst.meta.store import MetaStore
from dst.meta.superblock import MetadataError, State, Superblock, adopt, rotate, synced
from dst.targets.mirror.dirtylog import DirtyLog, Opening
from dst.targets.mirror.diskopen import open_members
from dst.targets.mirror.stores import MemberStores, best_effort, new_generation, shared

log = logging.getLogger(__name__)


class DiskLog(DirtyLog):
    """Region state and generations on the members (module docstring)."""

    persistent = True

    def __init__(self, devices: Sequence[BlockDevice], **kw: Any) -> None:
        super().__init__(devices, **kw)
        self.stores = MemberStores(devices, name=self.name, leg_timeout=self.leg_timeout,
                                   layout=self.layout)  # fmt: skip
        self.size = 0
        self._ref: Superblock | None = None
        self._stale = False  # a current leg failed: rotation not yet persisted

    # --- open ------------------------------------------------------------------------

    async def open(self, opened: Sequence[bool]) -> Opening:
        """Load or format the metadata; what every leg is and misses
        (:func:`~dst.targets.mirror.diskopen.open_members`).

        Raises MetadataError (foreign or inconsistent members, split brain) or
        BlockError (no leg usable).
        """
        self._need_one(opened)
        got = await open_members(
            self.stores,
            self.devices,
            opened,
            name=self.name,
            array_uuid=self.array_uuid,
            region_size=self.asked,
            label=self.label,
        )
        _check_layout(self.name, got.ref, self.layout)
        self.array_uuid, self.region_size, self.size = got.array_uuid, got.region_size, got.size
        self.ref, self.current = got.ref, got.current
        if self.label is not None and self.ref.spec.get("array") != self.label:
            # recorded with the next superblock write (the first write marks dirty)
            self.ref = replace(self.ref, spec={**self.ref.spec, "array": self.label})
        self._stale = got.opening.stale
        if self._stale:
            self.unsettled = True
        return got.opening

    async def adopt_bitmap(self, legs: Iterable[int], bitmap: Bitmap) -> None:
        pages = {p: bitmap.page_bytes(p) for p in range(bitmap.npages)}
        await self._each(legs, lambda i: self.stores.write_pages(i, pages))

    async def close(self) -> None:
        if self.ref is not None and self.ref.state is State.DIRTY and self.current:
            async with self.lock:
                await self.flush_legs(sorted(self.current))  # clean: the data is durable
                await self._write_current(replace(self.ref, state=State.CLEAN))

    # --- writes and bitmap batches ---------------------------------------------------

    @property
    def ref(self) -> Superblock | None:
        """The array's shared superblock fields (as last written)."""
        return self._ref

    @ref.setter
    def ref(self, ref: Superblock | None) -> None:
        self._ref = ref
        self.needs_mark = ref is not None and ref.state is State.CLEAN

    async def mark_dirty(self) -> None:
        async with self.lock:
            assert self.ref is not None
            if self.ref.state is State.CLEAN:
                await self._write_current(replace(self.ref, state=State.DIRTY))

    async def write_pages(self, pages: Mapping[int, bytes], legs: Iterable[int]) -> None:
        await self._each(legs, lambda i: self.stores.write_pages(i, pages, data_durable=True))

    async def flush_legs(self, legs: Iterable[int]) -> None:
        await self._each(legs, self._flush)

    async def _flush(self, leg: int) -> None:
        await timed(self.devices[leg].flush(), self.leg_timeout)

    # --- leg failures and generations --------------------------------------------------

    def leg_down(self, leg: int) -> None:
        if leg in self.current:
            self._stale = True
            self.unsettled = True
        super().leg_down(leg)

    async def settle(self) -> None:
        async with self.lock:
            while self._stale and self.current:
                self._stale = False  # a leg failing meanwhile sets it again: rotate again
                assert self.ref is not None
                ref = rotate(self.ref, new_generation(self.stores.known()))
                await self._write_current(replace(ref, resync_pos=None))
            await super().settle()  # EIO if no current leg is left
            self.unsettled = False

    async def leg_synced(self, leg: int, *, everyone: bool) -> None:
        """The leg counts as current *before* its superblock says so, so that a failure
        racing the adoption rotates the survivors' generation (see :meth:`settle`)."""
        async with self.lock:
            sb = self.stores[leg].sb
            assert sb is not None and self.ref is not None
            self.current.add(leg)
            try:
                await self.stores.write_sb(leg, adopt(sb, self.ref), flush_first=True)
            except BlockError as e:
                self.on_fail(leg, e)
            else:
                if everyone:
                    await self._write_current(synced(self.ref))
        if self.unsettled:
            await self.settle()

    async def set_resync_pos(self, pos: int | None, targets: Sequence[int]) -> None:
        """Only recorded when every leg not current is one of ``targets`` (otherwise a
        later full resync could skip what an absent leg lacks)."""
        if self.ref is None:
            return
        others = set(range(len(self.devices))) - self.current
        if pos is not None and not others <= set(targets):
            pos = None
        if pos == self.ref.resync_pos:
            return
        async with self.lock:
            for leg in targets:
                sb = self.stores[leg].sb
                if leg in self.current or sb is None:
                    continue
                try:
                    await self.stores.write_sb(leg, replace(sb, resync_pos=pos), flush_first=True)
                except BlockError as e:
                    self.on_fail(leg, e)
            await self._write_current(replace(self.ref, resync_pos=pos))

    # --- returning, joining and leaving legs -----------------------------------------

    async def readd(self, leg: int, *, full: bool) -> tuple[str, bool]:
        """Raises MetadataError for a foreign member (another array), a member with
        another role, a diverged member (split brain) or one ahead of the array,
        unless ``full`` (the operator discards that member's data).  A delta is exact:
        since the leg failed (or, if it was absent when the array started, since
        every bit then set) no region it misses was cleared."""
        assert self.ref is not None and self.array_uuid is not None
        if await self.stores.blank(leg):
            await self._format(leg, new_generation(self.stores.known()), inconsistent=True)
            return "new", True
        try:
            sb = await self.stores.load(leg)
        except MetadataError as e:
            if not full:
                raise MetadataError(f"{self.name}: leg {leg}: {e}; re-add with full resync "
                                    "to overwrite it") from e  # fmt: skip
            await self._format(leg, new_generation(self.stores.known()), inconsistent=True)
            return "new", True
        name = self.devices[leg].name
        check_member(sb, index=leg, array_uuid=self.array_uuid, name=name, array=self.name,
                     region_size=self.region_size)  # fmt: skip
        try:
            rel, whole = readd_relation(self.ref, sb, full=full)
        except MetadataError as e:
            raise MetadataError(f"{self.name}: leg {leg} ({name}) {e}") from None
        await self.stores.flag_inconsistent(leg)
        return rel.value, whole

    async def readmit(self, leg: int) -> None:
        """Raises MetadataError unless ``leg`` still carries the array's current
        generation (it is the member that failed last, untouched since); it becomes
        current and the next :meth:`settle` starts a new generation, so every other
        member is behind it (a delta, by the bitmap)."""
        assert self.ref is not None and self.array_uuid is not None
        sb = await self.stores.load(leg)
        name = self.devices[leg].name
        check_member(sb, index=leg, array_uuid=self.array_uuid, name=name, array=self.name,
                     region_size=self.region_size)  # fmt: skip
        # A rotation the last leg failed in the middle of may not have reached it.
        if sb.current not in (self.ref.current, *self.ref.history[:1]):
            raise MetadataError(f"{self.name}: leg {leg} ({name}) does not hold the "
                                "generation it failed with: not taken back")  # fmt: skip
        async with self.lock:
            self.current.add(leg)
            self._stale = True
            self.unsettled = True

    async def format_new(self, leg: int) -> None:
        await self._format(leg, new_generation(self.stores.known()), inconsistent=True)

    async def member_of(self, device: BlockDevice) -> int | None:
        return await self.stores.member_of(device)

    def grow(self, device: BlockDevice) -> None:
        super().grow(device)
        self.stores.grow(device)

    def swap(self, leg: int, device: BlockDevice, keep: MetaStore | None = None) -> MetaStore:
        super().swap(leg, device)
        return self.stores.swap(leg, device, keep)

    def drop(self, leg: int) -> MetaStore:
        super().drop(leg)
        return self.stores.drop(leg)

    async def write_members(self, attached: Iterable[int], *, everyone: bool) -> None:
        """Every member's superblock gets its role (its index), the member count and
        the leg names; the bitmap generation is dropped when ``everyone`` is in sync.
        A failed leg is written if it can be (best effort)."""
        if self.ref is None:
            return
        live = set(attached)
        n = len(self.devices)
        spec = {**self.ref.spec, "legs": n, "names": [d.name for d in self.devices]}
        ref = replace(self.ref, member_count=n, spec=spec, events=self.ref.events + 1)
        if len(self.current) == n and everyone:
            ref = synced(ref)
        self.ref = ref = replace(ref, resync_pos=None)

        def one(i: int) -> Awaitable[None]:
            sb = self.stores[i].sb
            assert sb is not None
            sb = replace(sb, role=i, member_count=n, spec=spec)
            sb = shared(sb, ref) if i in self.current else sb
            limit = self.leg_timeout if i in live else best_effort(self.leg_timeout)
            return self.stores.write_sb(i, sb, limit=limit)

        written = [i for i in range(len(self.stores)) if self.stores[i].sb is not None]
        await self._each(written, one, live=live)

    async def retire(self, old: MetaStore | None) -> bool:
        return await self.stores.retire(old, was=str(self.array_uuid))

    # --- internals -------------------------------------------------------------------

    async def _each(
        self,
        legs: Iterable[int],
        job: Callable[[int], Awaitable[Any]],
        *,
        live: Collection[int] | None = None,
    ) -> None:
        """Run ``job(i)`` for every leg at once; a leg that fails is reported to
        ``on_fail`` (only if in ``live``, when given: the others are best effort)."""
        order = list(legs)
        results = await asyncio.gather(*(job(i) for i in order), return_exceptions=True)
        for i, res in zip(order, results, strict=True):
            if isinstance(res, BlockError):
                if live is None or i in live:
                    self.on_fail(i, res)
                else:
                    log.warning("%s: failed leg %d keeps its old superblock: %r",
                                self.name, i, res)  # fmt: skip
            elif isinstance(res, BaseException):
                raise res

    async def _write_current(self, ref: Superblock) -> None:
        """Write ``ref``'s shared fields on every current leg (hold ``lock``); a leg
        that fails is reported (and then rotated away from in :meth:`settle`)."""
        self.ref = ref

        def one(i: int) -> Awaitable[None]:
            sb = self.stores[i].sb
            assert sb is not None
            return self.stores.write_sb(i, shared(sb, ref))

        await self._each(sorted(self.current), one)

    async def _format(self, leg: int, generation: int, *, inconsistent: bool = False
                      ) -> Superblock:  # fmt: skip
        assert self.array_uuid is not None
        return await self.stores.format(leg, array_uuid=self.array_uuid, generation=generation,
                                        size=self.size, region_size=self.region_size,
                                        inconsistent=inconsistent, label=self.label)  # fmt: skip


def _check_layout(name: str, ref: Superblock, layout: Mapping[str, Any]) -> None:
    """MetadataError unless the members are the kind of array (and geometry) asked for:
    a mirror's legs are never opened as a raid5, nor a raid5 as a raid6."""
    on_disk = {k: ref.spec.get(k, "mirror" if k == "type" else None) for k in layout}
    if on_disk != layout:
        raise MetadataError(
            f"{name}: the members are {_describe(on_disk)}, not {_describe(layout)}"
        )


def _describe(layout: Mapping[str, Any]) -> str:
    extra = ", ".join(f"{k} {v}" for k, v in layout.items() if k != "type" and v is not None)
    return f"a {layout.get('type')}" + (f" ({extra})" if extra else "")
