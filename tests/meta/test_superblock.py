"""Superblock encoding, slot choice and generation comparison."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dst.meta.layout import SB_SLOT
from dst.meta.superblock import (
    HISTORY_LEN,
    MetadataError,
    Relation,
    State,
    Superblock,
    adopt,
    compare,
    decode,
    encode,
    pick,
    rotate,
    synced,
)

ARRAY = uuid.UUID(int=1)
G1, G2, G3, G4 = 0x11, 0x22, 0x33, 0x44


def sb(**kw: object) -> Superblock:
    base = Superblock(
        array_uuid=ARRAY,
        member_uuid=uuid.UUID(int=2),
        role=0,
        member_count=2,
        data_size=1 << 30,
        region_size=65536,
        array_name="vol0",
        spec={"type": "mirror", "legs": 2},
        current=G1,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


u64 = st.integers(0, (1 << 64) - 1)
gens = st.integers(1, (1 << 64) - 1)
superblocks = st.builds(
    Superblock,
    array_uuid=st.uuids(),
    member_uuid=st.uuids(),
    role=st.integers(0, 255),
    member_count=st.integers(1, 255),
    data_size=u64,
    region_size=st.sampled_from([4096, 65536]),
    array_name=st.text(max_size=40),
    spec=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=5),
    events=u64,
    current=u64,
    bitmap=u64,
    history=st.lists(gens, max_size=HISTORY_LEN).map(tuple),
    state=st.sampled_from(State),
    resync_pos=st.none() | st.integers(0, (1 << 64) - 2),
    serial=u64,
)


@given(superblocks)
def test_round_trip(s: Superblock) -> None:
    raw = encode(s)
    assert len(raw) == SB_SLOT
    assert decode(raw) == s


def test_header_layout() -> None:
    raw = encode(sb(serial=7))
    assert raw[:8] == b"DSTMETA1"
    assert int.from_bytes(raw[16:24], "little") == 7
    assert raw[24:40] == ARRAY.bytes


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XXXXXXXX" + b[8:], "magic"),
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "checksum"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), "checksum"),
        (lambda b: b[:4000], "bytes"),
        (lambda b: bytes(SB_SLOT), "magic"),
    ],
)
def test_decode_rejects(mutate: object, match: str) -> None:
    raw = encode(sb())
    with pytest.raises(MetadataError, match=match):
        decode(mutate(raw))  # type: ignore[operator]


def test_decode_rejects_other_version() -> None:
    import struct
    import zlib

    raw = bytearray(encode(sb()))
    raw[8:12] = struct.pack("<I", 2)
    raw[-4:] = struct.pack("<I", zlib.crc32(raw[:-4]))
    with pytest.raises(MetadataError, match="version 2"):
        decode(raw)


def test_too_big_spec() -> None:
    with pytest.raises(MetadataError, match="do not fit"):
        encode(sb(spec={"x": "y" * 5000}))


def test_pick_newer_and_fallback() -> None:
    a, b = encode(sb(serial=3)), encode(sb(serial=4, events=9))
    assert pick(a, b) == (decode(b), 1)
    assert pick(b, a) == (decode(b), 0)
    torn = b[:2000] + bytes(SB_SLOT - 2000)
    assert pick(a, torn) == (decode(a), 0)
    assert pick(None, a) == (decode(a), 1)
    with pytest.raises(MetadataError, match=r"slot A.*slot B"):
        pick(torn, None)


# --- generations ---------------------------------------------------------------------


def test_rotate_and_sync_rules() -> None:
    s = rotate(sb(current=G1), G2)
    assert (s.current, s.bitmap, s.history) == (G2, G1, (G1,))
    s = rotate(s, G3)  # a second failure keeps the older bitmap generation
    assert (s.current, s.bitmap, s.history) == (G3, G1, (G2, G1))
    assert s.events == 2
    s2 = synced(s)
    assert (s2.current, s2.bitmap, s2.history) == (G3, 0, (G2, G1))
    back = adopt(sb(current=G1, member_uuid=uuid.UUID(int=9)), s)
    assert (back.current, back.bitmap, back.history) == (s.current, s.bitmap, s.history)
    assert back.member_uuid == uuid.UUID(int=9)


def test_history_is_bounded() -> None:
    s = sb(current=1)
    for g in range(2, 10):
        s = rotate(s, g)
    assert s.history == (8, 7, 6, 5) and s.bitmap == 1
    # the bitmap generation fell off the history: it still covers everything since
    assert compare(s, sb(current=1)) is Relation.BEHIND
    assert compare(s, sb(current=6)) is Relation.BEHIND


survivor = rotate(sb(current=G1), G2)  # the array went on without a leg at G1
CASES = [
    ("same", sb(current=G1), sb(current=G1), Relation.SAME),
    ("other array", sb(), sb(array_uuid=uuid.UUID(int=5)), Relation.UNRELATED),
    ("no common generation", sb(current=G1), sb(current=G2), Relation.UNRELATED),
    ("failed leg returns", survivor, sb(current=G1), Relation.BEHIND),
    ("we are the failed leg", sb(current=G1), survivor, Relation.AHEAD),
    ("two failures, older leg", rotate(survivor, G3), sb(current=G1), Relation.BEHIND),
    ("two failures, newer leg", rotate(survivor, G3), survivor, Relation.BEHIND),
    ("bitmap cleared since", synced(survivor), sb(current=G1), Relation.BEHIND_FULL),
    ("we are older, no bitmap", sb(current=G1), synced(survivor), Relation.AHEAD_FULL),
    ("split brain", survivor, rotate(sb(current=G1), G3), Relation.DIVERGED),
    (
        "peer went on after sync",
        synced(survivor),
        rotate(synced(survivor), G4),
        Relation.AHEAD,
    ),
    (
        "both went on after sync",
        rotate(synced(survivor), G3),
        rotate(synced(survivor), G4),
        Relation.DIVERGED,
    ),
    ("adopted", adopt(sb(current=G1), survivor), survivor, Relation.SAME),
]


@pytest.mark.parametrize(
    ("local", "peer", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_compare(local: Superblock, peer: Superblock, want: Relation) -> None:
    assert compare(local, peer) is want


MIRROR = {
    Relation.SAME: Relation.SAME,
    Relation.BEHIND: Relation.AHEAD,
    Relation.AHEAD: Relation.BEHIND,
    Relation.BEHIND_FULL: Relation.AHEAD_FULL,
    Relation.AHEAD_FULL: Relation.BEHIND_FULL,
    Relation.DIVERGED: Relation.DIVERGED,
    Relation.UNRELATED: Relation.UNRELATED,
}


# r: rotate, s: synced; within the history depth (see test_too_old_is_unrelated)
ops = st.lists(st.sampled_from("rs"), max_size=HISTORY_LEN)


@given(ops, ops)
def test_compare_is_antisymmetric(ops_a: list[str], ops_b: list[str]) -> None:
    counter = iter(range(100, 1000))

    def run(s: Superblock, ops: list[str]) -> Superblock:
        for op in ops:
            s = synced(s) if op == "s" else rotate(s, next(counter))
        return s

    a, b = run(sb(current=G1), ops_a), run(sb(current=G1), ops_b)
    r = compare(a, b)
    assert compare(b, a) is MIRROR[r]

    def forgot(ops: list[str]) -> bool:  # bitmap cleared after going on alone
        return "s" in ops[ops.index("r") :]

    if "r" in ops_a and "r" in ops_b:  # both wrote on their own: never silently ordered
        assert r is Relation.DIVERGED
    elif "r" in ops_a:
        assert r is (Relation.BEHIND_FULL if forgot(ops_a) else Relation.BEHIND)
    elif "r" in ops_b:
        assert r is (Relation.AHEAD_FULL if forgot(ops_b) else Relation.AHEAD)
    else:
        assert r is Relation.SAME


def test_too_old_is_unrelated() -> None:
    s = sb(current=1)
    for g in range(2, 3 + HISTORY_LEN):
        s = rotate(s, g)
    assert compare(s, sb(current=1)) is Relation.BEHIND  # the bitmap still covers it
    assert compare(synced(s), sb(current=1)) is Relation.UNRELATED  # forgotten


def _sealed(body: bytes) -> bytes:
    import struct
    import zlib

    raw = (body + bytes(SB_SLOT))[: SB_SLOT - 4]
    return raw + struct.pack("<I", zlib.crc32(raw))


@given(st.binary(min_size=0, max_size=SB_SLOT))
def test_decode_garbage_with_valid_checksum(tail: bytes) -> None:
    """Random content behind a valid magic, version and CRC decodes or is refused."""
    head = encode(sb())[:12]
    with contextlib.suppress(MetadataError):
        decode(_sealed(head + tail))


@pytest.mark.parametrize("spec", [b"[1]", b"[" * 3000, b'"x"', b"\xff"])
def test_decode_rejects_bad_spec(spec: bytes) -> None:
    import struct

    raw = encode(sb(array_name="", spec={}))
    pos = 152 + 2  # fixed header, empty name
    body = raw[:pos] + struct.pack("<H", len(spec)) + spec
    with pytest.raises(MetadataError, match="malformed"):
        decode(_sealed(body))
