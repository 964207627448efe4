"""An independent check of parity arrays' members: P and Q recomputed from the
definition (GF(2^8), polynomial 0x11d, Q = sum of 2^i D_i), and the left-symmetric
rotation written out here, not imported from the code under test."""

from __future__ import annotations

from collections.abc import Sequence


def gf_mul(a: int, b: int) -> int:
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return r


# bytes.translate tables: TIMES[c] multiplies every byte by c in GF(2^8).
TIMES = [bytes(gf_mul(c, x) for x in range(256)) for c in range(256)]


def pq(chunks: Sequence[bytes]) -> tuple[bytes, bytes]:
    """P and Q of ``chunks``."""
    n = len(chunks[0])
    p, q, g = 0, 0, 1
    for c in chunks:
        p ^= int.from_bytes(c, "little")
        q ^= int.from_bytes(c.translate(TIMES[g]), "little")
        g = gf_mul(g, 2)
    return p.to_bytes(n, "little"), q.to_bytes(n, "little")


def check_members(
    members: Sequence[bytes], parity: int, chunk: int, image: bytes | None = None
) -> int:
    """Every stripe of the members' data areas ``members`` has the right P (and Q) on
    the right member (P on member n-1-s%n, Q after it, the data after them); with
    ``image``, the data chunks are the array's bytes.  Returns the stripes checked.
    AssertionError naming the first bad stripe."""
    n, k = len(members), len(members) - parity
    stripes = min(len(m) for m in members) // chunk
    for s in range(stripes):
        pd = n - 1 - s % n
        at = slice(s * chunk, (s + 1) * chunk)
        data = [bytes(members[(pd + parity + i) % n][at]) for i in range(k)]
        p, q = pq(data)
        assert members[pd][at] == p, f"P of stripe {s} (member {pd}) is wrong"
        if parity == 2:
            assert members[(pd + 1) % n][at] == q, f"Q of stripe {s} is wrong"
        if image is not None:
            want = image[s * k * chunk : (s + 1) * k * chunk]
            assert b"".join(data) == want, f"data of stripe {s} differs"
    return stripes
