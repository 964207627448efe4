"""Which members make up an array and what each one misses, from superblocks (pure).

Theory of operation
-------------------
An array is opened (and assembled, :mod:`dst.array.assemble`) from whatever its members'
superblocks say.  The decisions are pure functions of those superblocks, shared by both:

* :func:`identify` -- the members belong to one array (one array UUID, the expected one
  if given) and agree on the region size; every member sits in its own role.
* :func:`reference` -- the member with the newest generation (MD's highest event count
  among the members nobody is ahead of), a consistent one if there is one (a member
  flagged *inconsistent* was a resync target: its data is incomplete, DRBD's
  Inconsistent); split brain (two members that both wrote after a common generation)
  is refused: the operator must pick one.
* :func:`verdict` -- what one member is next to the reference: *current* (same
  generation), a resync target that misses the regions of the bitmap (delta) or
  everything from a resume position on (full), or refused (split brain, ahead).

The caller does the I/O (reading superblocks and bitmaps) and applies the verdicts to its
region tracker; see :class:`dst.targets.mirror.disklog.DiskLog`.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dst.meta.superblock import MetadataError, Relation, Superblock, compare


class LegState(enum.StrEnum):
    """A member's state in a redundant array."""

    IN_SYNC = "in_sync"
    RESYNCING = "resyncing"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one member on open: its state, why, and what it misses --
    nothing (``current``), the reference's bitmap (``delta``), or the bitmap plus every
    region from ``full_from`` on (``full``)."""

    state: LegState
    reason: str
    current: bool = False
    full_from: int | None = None  # None: no full resync


def identify(
    sbs: Mapping[int, Superblock],
    *,
    expected: uuid.UUID | None,
    names: Sequence[str],
    array: str,
) -> uuid.UUID:
    """The array UUID the members ``sbs`` (index -> superblock) share.

    Raises MetadataError if they belong to different arrays, to another one than
    ``expected``, disagree on the region size, or a member sits in another role.
    ``names`` (by index) and ``array`` only word the errors.
    """
    uuids = {sb.array_uuid for sb in sbs.values()}
    gone = [i for i, sb in sbs.items() if sb.spec.get("removed_from")]
    if gone and (len(uuids) > 1 or expected not in (None, *uuids)):
        who = ", ".join(f"leg {i} ({names[i]})" for i in gone)
        raise MetadataError(
            f"{array}: {who} left the array (dst replace or dst remove) and is not a "
            "member any more: start the array from its current members (dst assemble "
            "MEMBER...)"
        )
    if expected is None and len(uuids) > 1:
        who = "; ".join(
            f"leg {i} ({names[i]}): member of {sb.array_name!r} ({sb.array_uuid})"
            for i, sb in sbs.items()
        )
        raise MetadataError(f"{array}: legs belong to different arrays ({who})")
    want = expected if expected is not None else uuids.pop()
    sizes = {sb.region_size for sb in sbs.values()}
    if len(sizes) > 1:
        raise MetadataError(f"{array}: legs disagree on the region size: {sorted(sizes)}")
    for i, sb in sbs.items():
        check_member(sb, index=i, array_uuid=want, name=names[i], array=array)
    return want


def check_member(
    sb: Superblock,
    *,
    index: int,
    array_uuid: uuid.UUID,
    name: str,
    array: str,
    region_size: int | None = None,
) -> None:
    """Raise MetadataError unless ``sb`` is member ``index`` of ``array_uuid`` (with
    ``region_size``, when given)."""
    if sb.array_uuid != array_uuid:
        raise MetadataError(
            f"{array}: leg {index} ({name}) belongs to another array "
            f"{sb.array_name!r} ({sb.array_uuid}), not {array_uuid}: refused"
        )
    if sb.role != index:
        raise MetadataError(f"{array}: leg {index} ({name}) has role {sb.role} on disk")
    if region_size is not None and sb.region_size != region_size:
        raise MetadataError(
            f"{array}: leg {index} ({name}) has region size {sb.region_size}, "
            f"the array {region_size}"
        )


_AHEAD = (Relation.AHEAD, Relation.AHEAD_FULL)


def reference(sbs: Mapping[int, Superblock], *, array: str) -> int:
    """The member (index) with the newest generation; MetadataError on split brain."""
    cands = [i for i in sbs if not any(compare(sbs[i], sbs[j]) in _AHEAD for j in sbs)]
    cands = [i for i in cands if not sbs[i].inconsistent] or cands
    for a in cands:
        for b in cands:
            if a < b and compare(sbs[a], sbs[b]) is Relation.DIVERGED:
                raise MetadataError(
                    f"{array}: legs {a} and {b} diverged (split brain): both "
                    "wrote after a common generation; the operator must pick one"
                )
    return max(cands, key=lambda i: (sbs[i].events, -i))


def verdict(ref: Superblock, sb: Superblock, *, nbits: int, nregions: int) -> Verdict:
    """What the member with superblock ``sb`` is next to the reference ``ref``.

    ``nbits`` is the number of regions set in the reference bitmap (for the reason
    text); a full resync resumes at the reference's ``resync_pos`` when the member
    recorded the same one (it was the target of that resync).
    """
    rel = compare(ref, sb)
    if rel is Relation.SAME and sb.inconsistent:  # a full resync of it was under way
        pos = ref.resync_pos if sb.resync_pos == ref.resync_pos else None
        return Verdict(LegState.RESYNCING, "full resync (it was being resynced)",
                       full_from=min(pos or 0, nregions))  # fmt: skip
    if rel is Relation.SAME:
        return Verdict(LegState.IN_SYNC, "", current=True)
    if rel is Relation.BEHIND:  # it misses at most what the bitmap holds
        return Verdict(LegState.RESYNCING, f"behind: {nbits} regions")
    if rel in (Relation.BEHIND_FULL, Relation.UNRELATED):
        pos = ref.resync_pos if sb.resync_pos == ref.resync_pos else None
        return Verdict(LegState.RESYNCING, "full resync", full_from=min(pos or 0, nregions))
    return Verdict(LegState.FAILED, f"refused: {rel.value} (split brain)")


def readd_relation(ref: Superblock, sb: Superblock, *, full: bool) -> tuple[Relation, bool]:
    """A failed member comes back: its relation to the array and whether it needs a
    full resync.  MetadataError if it holds writes the array does not (diverged or
    ahead) unless ``full`` (the operator discards them)."""
    rel = compare(ref, sb)
    if rel in (Relation.DIVERGED, *_AHEAD) and not full:
        raise MetadataError(
            f"is {rel.value} from the array (split brain): it holds writes the array "
            "does not; re-add it with a full resync to discard them, or assemble the "
            "array from it"
        )
    return rel, full or rel not in (Relation.SAME, Relation.BEHIND)
