"""Opening the disk dirty log: every member's superblock read, every leg judged.

Theory of operation
-------------------
:func:`open_members` reads the superblock of every leg that opened
(:class:`~dst.targets.mirror.stores.MemberStores`), lets the pure functions of
:mod:`dst.meta.members` identify the array, pick the reference superblock and judge
each leg, and returns what the :class:`~dst.targets.mirror.disklog.DiskLog` starts
from (:class:`Opened`):

* No leg has a superblock: if every leg is blank this is a new array (a new UUID and
  generation, every member formatted, all current); otherwise nothing can be trusted
  and it is an error.
* The legs holding the reference's generation are current; the union of their
  bitmaps is the bitmap to start from.  After a crash (``DIRTY``) the dirty regions
  are reported (``Opening.crashed``: a mirror resyncs them from its lowest current
  leg, a parity array recomputes their parity); after a clean shutdown those regions
  may be cleared lazily.
* Every other leg gets its verdict (behind: what the bitmap says, or everything from
  where a resync stopped; diverged or foreign: failed).  A blank member among
  formatted ones is formatted with a new generation and resynced in full.
* Started degraded, or with a blank member in the place of one that is away, the
  survivors must start a new generation (``Opening.stale``), so that the member that
  was there before is known as behind, not as current, if it ever comes back.
* A member that is to be resynced is flagged *inconsistent* on disk first (DRBD's
  Inconsistent): until it adopts the current generation its data is incomplete, and
  neither an assembly nor an open may take it for a member in sync.  If the reference
  itself is inconsistent, no member holds the array's data in full: refused.

The region size is the one the members were formatted with, whatever was asked (a
size asked for that differs is logged; none asked: the default for new members).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dst.device import BlockDevice
from dst.errors import BlockError
from dst.meta.bitmap import PAGE_BITS, Bitmap
from dst.meta.layout import BLOCK, DEFAULT_REGION_SIZE
from dst.meta.members import LegState, identify, reference, verdict
from dst.meta.superblock import MetadataError, State, Superblock
from dst.targets.mirror.dirtylog import Opening
from dst.targets.mirror.stores import MemberStores, layout_of, new_generation

log = logging.getLogger(__name__)

LegStates = list[tuple[LegState, str]]


@dataclass(slots=True)
class Opened:
    """What the members say: the array's identity, region and data size, the
    reference superblock, the current legs, and the :class:`Opening`."""

    opening: Opening
    array_uuid: uuid.UUID
    region_size: int
    size: int
    ref: Superblock
    current: set[int]


async def open_members(
    stores: MemberStores,
    devices: Sequence[BlockDevice],
    opened: Sequence[bool],
    *,
    name: str,
    array_uuid: uuid.UUID | None,
    region_size: int | None,
    label: Mapping[str, Any] | None = None,
) -> Opened:
    """Load or format the metadata of the legs that ``opened`` (module docstring);
    ``label`` goes into the superblocks of members formatted here.

    Raises MetadataError (foreign or inconsistent members, split brain, a leg too
    small) or BlockError (a bitmap or a format that cannot be written or read).
    """
    states: LegStates = [(LegState.IN_SYNC, "") if ok else (LegState.FAILED, "did not open")
                         for ok in opened]  # fmt: skip
    sbs: dict[int, Superblock] = {}
    blank: list[int] = []
    for i in (i for i, ok in enumerate(opened) if ok):
        try:
            if await stores.blank(i):
                blank.append(i)
            else:
                sbs[i] = await stores.load(i)
        except MetadataError as e:
            states[i] = (LegState.FAILED, f"bad metadata: {e}")
        except BlockError as e:
            states[i] = (LegState.FAILED, f"metadata unreadable: {e!r}")
    if not sbs:
        return await _create(stores, devices, blank, states, name, array_uuid,
                             region_size or DEFAULT_REGION_SIZE, label)  # fmt: skip
    names = [d.name for d in devices]
    array_uuid = identify(sbs, expected=array_uuid, names=names, array=name)
    on_disk = next(iter(sbs.values())).region_size
    if region_size is not None and on_disk != region_size:
        log.warning("%s: the members were formatted with %d-byte regions; using that, "
                    "not the %d asked for (a member's region size is fixed when it is "
                    "formatted)", name, on_disk, region_size)  # fmt: skip
    ref = sbs[reference(sbs, array=name)]
    size = int(ref.spec.get("size") or min(sb.data_size for sb in sbs.values()))
    for i in (i for i, ok in enumerate(opened) if ok):  # absent legs: checked on return
        if layout_of(devices[i].size, on_disk).data_size < size:
            raise MetadataError(f"{name}: leg {i} is too small for the array")
    got = Opened(Opening(size, on_disk, states), array_uuid, on_disk, size, ref, set())
    await _classify(stores, got, sbs, blank, label)
    return got


async def _create(
    stores: MemberStores,
    devices: Sequence[BlockDevice],
    blank: list[int],
    states: LegStates,
    name: str,
    array_uuid: uuid.UUID | None,
    region_size: int,
    label: Mapping[str, Any] | None,
) -> Opened:
    if len(blank) != len(devices):
        bad = [f"leg {i}: {why}" for i, (_, why) in enumerate(states) if why]
        raise MetadataError(f"{name}: no leg has valid metadata ({'; '.join(bad)})")
    array_uuid = array_uuid or uuid.uuid4()
    size = min(layout_of(d.size, region_size).data_size for d in devices)
    gen = new_generation()
    ref: Superblock | None = None
    for i in blank:
        ref = await stores.format(i, array_uuid=array_uuid, generation=gen, size=size,
                                  region_size=region_size, label=label)  # fmt: skip
    assert ref is not None
    log.info("%s: new array %s over %d legs", name, array_uuid, len(blank))
    opening = Opening(size, region_size, states)
    return Opened(opening, array_uuid, region_size, size, ref, set(range(len(devices))))


async def _classify(
    stores: MemberStores,
    got: Opened,
    sbs: dict[int, Superblock],
    blank: list[int],
    label: Mapping[str, Any] | None,
) -> None:
    """Judge every leg against ``got.ref``: fills ``got.current`` and ``got.opening``."""
    ref, size, region_size = got.ref, got.size, got.region_size
    states = got.opening.legs
    nregions = -(-size // region_size)
    if ref.inconsistent:
        raise MetadataError(f"{stores.name}: no member holds the array's data in full: "
                            "every one was being resynced")  # fmt: skip
    current = sorted(i for i, sb in sbs.items()
                     if sb.current == ref.current and not sb.inconsistent)  # fmt: skip
    union = 0
    for i in current:
        union |= await stores.raw_bitmap(i, size, region_size)
    npages = -(-nregions // PAGE_BITS)
    bm = Bitmap.from_bytes(nregions, union.to_bytes(npages * BLOCK, "little"))
    nbits = bm.count()  # never a list of the bits: a 1 TiB member has 16 Mi regions
    op = got.opening
    op.bitmap = bm
    got.current = set(current)
    dirty = any(sbs[i].state is State.DIRTY for i in current)
    op.crashed = bm if dirty else None  # what that means is the target's policy (Opening)
    for i, sb in sbs.items():
        if i in got.current:
            continue
        v = verdict(ref, sb, nbits=nbits, nregions=nregions)
        states[i] = (v.state, v.reason)
        if v.state is LegState.RESYNCING:
            try:
                await stores.flag_inconsistent(i)
            except BlockError as e:
                states[i] = (LegState.FAILED, f"metadata unwritable: {e!r}")
        if v.full_from is not None:
            full = Bitmap(nregions)  # the bitmap, and everything from full_from on
            full.update(bm)
            full.set_range(v.full_from, nregions)
            op.missing[i] = full
        elif v.state is LegState.RESYNCING:
            op.missing[i] = bm
    for i in blank:
        gen = new_generation(stores.known())
        await stores.format(i, array_uuid=got.array_uuid, generation=gen, size=size,
                            region_size=region_size, inconsistent=True, label=label)  # fmt: skip
        states[i] = (LegState.RESYNCING, "new member: full resync")
        op.missing[i] = range(nregions)
    failed = [i for i, (s, _) in enumerate(states) if s is LegState.FAILED]
    for i in failed:
        op.missing[i] = bm
    op.settled = () if dirty else bm
    op.stale = bool(failed or blank)  # see the module docstring
