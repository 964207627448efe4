"""The member superblock: encoding, slot choice and generation comparison (pure).

Theory of operation
-------------------
Every member carries two superblock slots (:mod:`dst.meta.layout`).  Writers alternate
between them, each write carrying ``serial + 1``; a torn or corrupted write therefore
leaves the other slot intact and :func:`pick` returns the newest valid copy.

Slot format (4096 bytes, little endian)::

    off  size  field
      0     8  magic b"DSTMETA1"
      8     4  format version (1)
     12     4  header length (bytes of fixed header: 152)
     16     8  serial             (which slot is newer)
     24    16  array UUID
     40    16  member UUID
     56     4  role (index of this member in the array)
     60     4  member count
     64     8  data size
     72     8  region size
     80     8  events             (bumped on every meaningful change, as MD's)
     88     8  current generation
     96     8  bitmap generation  (0: the bitmap is write intent only)
    104    32  history: 4 previous generations, newest first, 0-padded
    136     4  flags              (bit 0: dirty; bit 1: inconsistent, a resync target)
    140     4  reserved (0)
    144     8  resync position    (region index; all ones: none)
    152     2  name length N, then N bytes UTF-8 array name
       2 + ..  spec length J, then J bytes of compact JSON (algorithm and layout)
         ...   zero padding
   4092     4  CRC32 (zlib) of bytes 0..4092

Generations (after DRBD's generation identifiers, with MD's event counter)
--------------------------------------------------------------------------
A generation is a random non-zero 64-bit identifier of "the data as it is now on the
in-sync members".  All live members of an array carry the same ``current``.

* When the array goes on without some leg (a leg fails, or the array is started
  degraded), the survivors start a new generation (:func:`rotate`): the old ``current``
  is pushed on ``history`` and, unless a bitmap generation is already set, becomes
  ``bitmap`` — from then on the on-disk bitmap keeps every region written since
  ``bitmap`` (bits of regions an absent leg misses are never cleared).
* When every leg is back in sync, the bitmap generation is cleared (:func:`synced`).
  A leg brought up to date takes its source's generations (:func:`adopt`).

:func:`compare` classifies a peer against the local member; the local member's bitmap
covers the generations from ``bitmap`` up to ``current`` (``bitmap`` and the history
entries newer than it).  A peer whose ``current`` is covered is BEHIND by exactly the
regions of the local bitmap (delta resync); a peer whose ``current`` is older but not
covered is BEHIND_FULL (full resync); two members that share an ancestor but where
neither ``current`` is known to the other have both written on their own: DIVERGED
(split brain, refused until the operator picks one).  No common generation (or another
array UUID): UNRELATED — also a member more than ``HISTORY_LEN`` generations old once
the bitmap generation is cleared (its ancestry is forgotten).
"""

from __future__ import annotations

import enum
import json
import struct
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dst.errors import DstError
from dst.meta.layout import SB_SLOT

MAGIC = b"DSTMETA1"
VERSION = 1
HISTORY_LEN = 4
NO_RESYNC = (1 << 64) - 1
_HDR = struct.Struct(f"<8sIIQ16s16sIIQQQQQ{HISTORY_LEN}QIIQ")
_CRC_OFF = SB_SLOT - 4
_FLAG_DIRTY = 1
_FLAG_INCONSISTENT = 2  # the member is a resync target: its data is incomplete


class MetadataError(DstError):
    """Member metadata is missing, corrupt, of another version, or inconsistent."""


class State(enum.Enum):
    CLEAN = "clean"
    DIRTY = "dirty"


class Relation(enum.Enum):
    """What a peer member is, seen from the local one (see :func:`compare`)."""

    SAME = "same"
    BEHIND = "behind"  # peer misses the regions of the local bitmap: delta resync to it
    BEHIND_FULL = "behind-full"  # peer is older, regions unknown: full resync to it
    AHEAD = "ahead"  # the local member misses the peer's bitmap: delta resync from it
    AHEAD_FULL = "ahead-full"  # the local member is older: full resync from the peer
    DIVERGED = "diverged"  # split brain: both wrote after a common generation
    UNRELATED = "unrelated"  # another array, or no common generation


@dataclass(frozen=True, slots=True)
class Superblock:
    """One member's metadata.  ``spec`` is the array spec minus members' addresses."""

    array_uuid: uuid.UUID
    member_uuid: uuid.UUID
    role: int
    member_count: int
    data_size: int
    region_size: int
    array_name: str = ""
    spec: Mapping[str, Any] = field(default_factory=dict)
    events: int = 0
    current: int = 0
    bitmap: int = 0
    history: tuple[int, ...] = ()
    state: State = State.CLEAN
    resync_pos: int | None = None
    inconsistent: bool = False  # a resync target until it adopts the current generation
    serial: int = 0


def encode(sb: Superblock) -> bytes:
    """One slot of bytes.  Raises MetadataError if name or spec do not fit."""
    name = sb.array_name.encode()
    spec = json.dumps(dict(sb.spec), sort_keys=True, separators=(",", ":")).encode()
    if len(sb.history) > HISTORY_LEN:
        raise MetadataError(f"history longer than {HISTORY_LEN}")
    hist = tuple(sb.history) + (0,) * (HISTORY_LEN - len(sb.history))
    head = _HDR.pack(
        MAGIC, VERSION, _HDR.size, sb.serial, sb.array_uuid.bytes, sb.member_uuid.bytes,
        sb.role, sb.member_count, sb.data_size, sb.region_size, sb.events, sb.current,
        sb.bitmap, *hist,
        (_FLAG_DIRTY if sb.state is State.DIRTY else 0)
        | (_FLAG_INCONSISTENT if sb.inconsistent else 0), 0,
        NO_RESYNC if sb.resync_pos is None else sb.resync_pos,
    )  # fmt: skip
    body = head + struct.pack("<H", len(name)) + name + struct.pack("<H", len(spec)) + spec
    if len(body) > _CRC_OFF:
        raise MetadataError("array name and spec do not fit in a superblock")
    slot = body + bytes(_CRC_OFF - len(body))
    return slot + struct.pack("<I", zlib.crc32(slot))


def decode(slot: bytes | bytearray | memoryview) -> Superblock:
    """Parse one slot.  Raises MetadataError on bad size, magic, CRC, version or content."""
    b = bytes(slot)
    if len(b) != SB_SLOT:
        raise MetadataError(f"superblock slot is {len(b)} bytes, not {SB_SLOT}")
    if b[:8] != MAGIC:
        raise MetadataError("no dst superblock (bad magic)")
    if zlib.crc32(b[:_CRC_OFF]) != struct.unpack_from("<I", b, _CRC_OFF)[0]:
        raise MetadataError("superblock checksum mismatch")
    f = _HDR.unpack_from(b)
    if f[1] != VERSION:
        raise MetadataError(f"superblock format version {f[1]} is not supported")
    try:
        pos = f[2]
        (n,) = struct.unpack_from("<H", b, pos)
        name = b[pos + 2 : pos + 2 + n].decode()
        pos += 2 + n
        (j,) = struct.unpack_from("<H", b, pos)
        spec = json.loads(b[pos + 2 : pos + 2 + j])
        if not isinstance(spec, dict):
            raise ValueError("spec is not a JSON object")
    except (struct.error, ValueError, RecursionError) as e:
        raise MetadataError(f"superblock content is malformed: {e}") from e
    hist = f[13 : 13 + HISTORY_LEN]
    flags, resync = f[13 + HISTORY_LEN], f[15 + HISTORY_LEN]
    return Superblock(
        serial=f[3], array_uuid=uuid.UUID(bytes=f[4]), member_uuid=uuid.UUID(bytes=f[5]),
        role=f[6], member_count=f[7], data_size=f[8], region_size=f[9], events=f[10],
        current=f[11], bitmap=f[12], history=tuple(h for h in hist if h),
        state=State.DIRTY if flags & _FLAG_DIRTY else State.CLEAN,
        resync_pos=None if resync == NO_RESYNC else resync, array_name=name, spec=spec,
        inconsistent=bool(flags & _FLAG_INCONSISTENT),
    )  # fmt: skip


def pick(slot_a: bytes | None, slot_b: bytes | None) -> tuple[Superblock, int]:
    """The newer valid copy and its slot index (0 or 1).

    Raises MetadataError (naming both failures) if neither slot is valid.
    """
    found: list[tuple[Superblock, int]] = []
    errors: list[str] = []
    for i, raw in enumerate((slot_a, slot_b)):
        try:
            if raw is None:
                raise MetadataError("unreadable")
            found.append((decode(raw), i))
        except MetadataError as e:
            errors.append(f"slot {'AB'[i]}: {e}")
    if not found:
        raise MetadataError("; ".join(errors))
    return max(found, key=lambda t: t[0].serial)


# --- generations -------------------------------------------------------------------


def rotate(sb: Superblock, new_gen: int) -> Superblock:
    """Start generation ``new_gen`` because the array goes on without some leg."""
    assert new_gen and new_gen not in (sb.current, *sb.history)
    return replace(
        sb,
        current=new_gen,
        bitmap=sb.bitmap or sb.current,
        history=((sb.current, *sb.history))[:HISTORY_LEN],
        events=sb.events + 1,
    )


def synced(sb: Superblock) -> Superblock:
    """Every leg holds ``current``: the bitmap is write intent only again."""
    return replace(sb, bitmap=0, resync_pos=None, events=sb.events + 1)


def adopt(sb: Superblock, source: Superblock) -> Superblock:
    """This member was brought up to date from ``source``: take its generations (it is
    consistent again)."""
    return replace(
        sb,
        current=source.current,
        bitmap=source.bitmap,
        history=source.history,
        resync_pos=None,
        inconsistent=False,
        events=max(sb.events, source.events) + 1,
    )


def _covered(sb: Superblock) -> set[int]:
    """Generations whose changes up to ``current`` are all in ``sb``'s bitmap."""
    if not sb.bitmap:
        return set()
    h = sb.history
    newer = h[: h.index(sb.bitmap)] if sb.bitmap in h else h
    return {sb.bitmap, *newer}


def _known(sb: Superblock) -> set[int]:
    return {g for g in (sb.current, sb.bitmap, *sb.history) if g}


def compare(local: Superblock, peer: Superblock) -> Relation:
    """Classify ``peer`` relative to ``local`` (see the module docstring)."""
    if local.array_uuid != peer.array_uuid:
        return Relation.UNRELATED
    if local.current == peer.current:
        return Relation.SAME
    if peer.current in _covered(local):
        return Relation.BEHIND
    if local.current in _covered(peer):
        return Relation.AHEAD
    if peer.current in local.history:
        return Relation.BEHIND_FULL
    if local.current in peer.history:
        return Relation.AHEAD_FULL
    if _known(local) & _known(peer):
        return Relation.DIVERGED
    return Relation.UNRELATED
