"""Layout arithmetic: exhaustive small cases and hypothesis properties."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dst.errors import ConfigError
from dst.targets.layout import LinearLayout, Piece, Segment, StripeLayout


def check_pieces(layout: LinearLayout | StripeLayout, offset: int, length: int) -> list[Piece]:
    """Pieces cover [offset, offset+length) exactly, in order, without overlap."""
    pieces = layout.split(offset, length)
    pos = offset
    seen: list[tuple[int, int, int]] = []
    for p in pieces:
        assert p.length > 0
        assert p.array_offset == pos
        assert layout.to_member(p.array_offset) == (p.member, p.member_offset)
        last = p.array_offset + p.length - 1
        assert layout.to_member(last) == (p.member, p.member_offset + p.length - 1)
        assert layout.to_array(p.member, p.member_offset) == p.array_offset
        seen.append((p.member, p.member_offset, p.member_offset + p.length))
        pos += p.length
    assert pos == offset + length
    seen.sort()
    for (m1, _, end1), (m2, start2, _) in itertools.pairwise(seen):
        assert m1 != m2 or end1 <= start2  # no overlap on a member
    return pieces


# -- linear ----------------------------------------------------------------------------


def test_linear_example() -> None:
    lay = LinearLayout((Segment(100, 10), Segment(0, 5), Segment(7, 20)))
    assert lay.size == 35
    assert lay.split(8, 10) == [Piece(0, 108, 2, 8), Piece(1, 0, 5, 10), Piece(2, 7, 3, 15)]
    assert lay.split(10, 5) == [Piece(1, 0, 5, 10)]
    assert lay.split(0, 0) == []
    assert lay.to_member(34) == (2, 26)
    assert lay.to_array(2, 26) == 34


def test_linear_exhaustive() -> None:
    lay = LinearLayout((Segment(3, 4), Segment(0, 1), Segment(50, 6), Segment(9, 2)))
    for off in range(lay.size + 1):
        for n in range(lay.size - off + 1):
            check_pieces(lay, off, n)
    for a in range(lay.size):
        assert lay.to_array(*lay.to_member(a)) == a


def test_linear_grow_shrink_is_immutable() -> None:
    a = LinearLayout((Segment(0, 10),))
    b = a.append(Segment(0, 5))
    assert (a.size, b.size) == (10, 15)
    assert b.drop_last() == a
    with pytest.raises(ConfigError):
        a.drop_last()


@pytest.mark.parametrize("start,size", [(-1, 5), (0, 0), (0, -3)])
def test_bad_segment(start: int, size: int) -> None:
    with pytest.raises(ConfigError):
        Segment(start, size)


segments = st.lists(
    st.builds(Segment, st.integers(0, 1000), st.integers(1, 300)), min_size=1, max_size=8
)


@given(segments, st.data())
def test_linear_properties(segs: list[Segment], data: st.DataObject) -> None:
    lay = LinearLayout(tuple(segs))
    off = data.draw(st.integers(0, lay.size))
    n = data.draw(st.integers(0, lay.size - off))
    pieces = check_pieces(lay, off, n)
    assert len({p.member for p in pieces}) == len(pieces)  # one piece per segment


# -- stripe ----------------------------------------------------------------------------


def test_stripe_example() -> None:
    lay = StripeLayout.for_sizes([100, 90, 120], chunk=16)
    assert (lay.rows, lay.size, lay.member_size) == (5, 240, 80)
    assert lay.split(10, 30) == [Piece(0, 10, 6, 10), Piece(1, 0, 16, 16), Piece(2, 0, 8, 32)]
    assert lay.split(48, 16) == [Piece(0, 16, 16, 48)]
    assert lay.to_member(239) == (2, 79)
    runs = [r for r, _ in lay.member_runs(8, 100)]
    assert runs == [Piece(0, 8, 36, 8), Piece(1, 0, 32, 16), Piece(2, 0, 32, 32)]


def test_stripe_default_chunk() -> None:
    lay = StripeLayout.for_sizes([1 << 20, (1 << 20) + 5])
    assert lay.chunk == 64 << 10 and lay.size == 2 << 20


def test_stripe_exhaustive() -> None:
    for members in (1, 2, 3):
        for chunk in (1, 2, 3, 4):
            lay = StripeLayout(members, chunk, 3)
            for off in range(lay.size + 1):
                for n in range(lay.size - off + 1):
                    check_pieces(lay, off, n)
                    check_runs(lay, off, n)


@pytest.mark.parametrize("members,chunk,rows", [(0, 4, 1), (2, 0, 1), (2, -1, 1), (2, 4, -1)])
def test_bad_stripe(members: int, chunk: int, rows: int) -> None:
    with pytest.raises(ConfigError):
        StripeLayout(members, chunk, rows)
    with pytest.raises(ConfigError):
        StripeLayout.for_sizes([], 4)
    with pytest.raises(ConfigError):
        StripeLayout.for_sizes([10], 0)


def check_runs(lay: StripeLayout, off: int, n: int) -> None:
    """Runs are the union of each member's pieces, contiguous on the member."""
    pieces = lay.split(off, n)
    runs = {r.member: (r, ps) for r, ps in lay.member_runs(off, n)}
    assert set(runs) == {p.member for p in pieces}
    for m, (run, ps) in runs.items():
        mine = [p for p in pieces if p.member == m]
        assert ps == mine
        for a, b in itertools.pairwise(mine):
            assert a.member_offset + a.length == b.member_offset  # contiguous on member
        assert run.member_offset == mine[0].member_offset
        assert run.array_offset == mine[0].array_offset
        assert run.length == sum(p.length for p in mine)


@given(
    st.integers(1, 6),
    st.integers(1, 64),
    st.integers(0, 20),
    st.data(),
)
def test_stripe_properties(members: int, chunk: int, rows: int, data: st.DataObject) -> None:
    lay = StripeLayout(members, chunk, rows)
    off = data.draw(st.integers(0, lay.size))
    n = data.draw(st.integers(0, lay.size - off))
    check_pieces(lay, off, n)
    check_runs(lay, off, n)
    if lay.size:
        a = data.draw(st.integers(0, lay.size - 1))
        assert lay.to_array(*lay.to_member(a)) == a
        m = data.draw(st.integers(0, members - 1))
        mo = data.draw(st.integers(0, lay.member_size - 1))
        assert lay.to_member(lay.to_array(m, mo)) == (m, mo)
