"""The parity layout (dst.targets.parity.geometry): every array byte has exactly one
home, parity rotates as MD's left-symmetric, pieces cover a request in order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dst.targets.parity.geometry import Geometry


def md_left_symmetric(n: int, m: int, stripe: int, index: int) -> tuple[int, list[int]]:
    """Written from MD's raid5_compute_sector (ALGORITHM_LEFT_SYMMETRIC), independently:
    the data disk of chunk ``index`` of ``stripe`` and the parity disks (P, then Q)."""
    pd = n - 1 - stripe % n
    if m == 1:
        return (pd + 1 + index) % n, [pd]
    return (pd + 2 + index) % n, [pd, (pd + 1) % n]


def test_rotation_is_md_left_symmetric_exhaustively() -> None:
    for m in (1, 2):
        for n in range(m + 2, 9):
            g = Geometry(n, m, 4096, 100)
            for s in range(3 * n):
                members = set()
                for i in range(n - m):
                    want, parity = md_left_symmetric(n, m, s, i)
                    assert g.data_member(s, i) == want
                    assert g.role(s, want) == (False, i)
                    members.add(want)
                for j, p in enumerate(parity):
                    assert g.parity_member(s, j) == p
                    assert g.role(s, p) == (True, j)
                    members.add(p)
                assert members == set(range(n))  # each member once per stripe


def test_raid5_of_3_picture() -> None:
    g = Geometry(3, 1, 4096, 3)
    rows = []
    for s in range(3):
        row = ["P" if g.role(s, x)[0] else f"D{s * 2 + g.role(s, x)[1]}" for x in range(3)]
        rows.append(" ".join(row))
    assert rows == ["D0 D1 P", "D3 P D2", "P D4 D5"]


@given(
    m=st.integers(1, 2),
    extra=st.integers(0, 4),
    chunk_log=st.integers(0, 4),
    stripes=st.integers(1, 6),
    data=st.data(),
)
def test_pieces_cover_requests_once_in_order(
    m: int, extra: int, chunk_log: int, stripes: int, data: st.DataObject
) -> None:
    g = Geometry(m + 2 + extra, m, 16 << chunk_log, stripes)
    offset = data.draw(st.integers(0, g.size - 1))
    length = data.draw(st.integers(1, g.size - offset))
    pieces = list(g.pieces(offset, length))
    pos = 0
    for p in pieces:
        assert p.pos == pos and p.length > 0 and p.offset + p.length <= g.chunk
        # the piece's array offset, recomputed from its stripe and index
        assert (p.stripe * g.data + p.index) * g.chunk + p.offset == offset + pos
        pos += p.length
    assert pos == length
    assert {p.stripe for p in pieces} == set(g.stripes_of(offset, length))


def test_sizes() -> None:
    g = Geometry(4, 2, 32 << 10, 10)
    assert (g.data, g.width, g.size) == (2, 64 << 10, 640 << 10)
    assert g.member_range(range(3, 5)) == (3 * (32 << 10), 2 * (32 << 10))
