"""Parity arithmetic (dst.targets.parity.gf) against a plain-Python P and Q written here
from the definition, and recovery of every combination of lost chunks."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from dst.targets.parity import gf


def slow_mul(a: int, b: int) -> int:
    """GF(2^8) multiplication, shift and add (polynomial 0x11d)."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return r


def slow_pq(chunks: list[bytes]) -> tuple[bytes, bytes]:
    n = len(chunks[0])
    p, q = bytearray(n), bytearray(n)
    g = 1
    for c in chunks:
        for j in range(n):
            p[j] ^= c[j]
            q[j] ^= slow_mul(g, c[j])
        g = slow_mul(g, 2)
    return bytes(p), bytes(q)


def arr(b: bytes) -> gf.Chunk:
    return np.frombuffer(b, dtype=np.uint8)


def test_field_tables() -> None:
    for a in range(256):
        for b in (0, 1, 2, 3, 29, 128, 255):
            assert gf.gmul(a, b) == slow_mul(a, b)
        if a:
            assert gf.gmul(a, gf.ginv(a)) == 1


@pytest.mark.parametrize("k", [1, 2, 3, 6])
@pytest.mark.parametrize("length", [1, 13, 64, 4096, 4104])
def test_encode_is_p_and_q(k: int, length: int) -> None:
    chunks = [os.urandom(length) for _ in range(k)]
    p, q = slow_pq(chunks)
    for parity in (1, 2):
        got = gf.Coder(k, parity).encode([arr(c) for c in chunks])
        assert [bytes(x) for x in got] == [p, q][:parity]
    assert bytes(gf.syndrome([arr(c) for c in chunks])) == q  # the numpy fallback too


def test_isal_is_used_and_agrees() -> None:
    assert gf.Coder(4, 2)._ec is not None  # pyeclib is a dependency


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_recover_every_combination(k: int) -> None:
    chunks = [os.urandom(257) for _ in range(k)]
    p, q = slow_pq(chunks)
    coder = gf.Coder(k, 2)
    for lost in itertools.chain.from_iterable(
        itertools.combinations(range(k), r) for r in (0, 1, 2)
    ):
        for have_p, have_q in ((True, True), (True, False), (False, True)):
            if len(lost) == 2 and not (have_p and have_q):
                with pytest.raises(ValueError):
                    coder.recover([None if i in lost else arr(c) for i, c in
                                   enumerate(chunks)], [None, arr(q)])  # fmt: skip
                continue
            data = [None if i in lost else arr(c) for i, c in enumerate(chunks)]
            parity = [arr(p) if have_p else None, arr(q) if have_q else None]
            assert [bytes(d) for d in coder.recover(data, parity)] == chunks
    raid5 = gf.Coder(k, 1)
    for x in range(k):
        data = [None if i == x else arr(c) for i, c in enumerate(chunks)]
        assert [bytes(d) for d in raid5.recover(data, [arr(p)])] == chunks
