"""Parity arithmetic (dst.targets.parity.gf) against the plain-Python P and Q of
:mod:`tests.support.parity` (written from the definition), and recovery of every
combination of lost chunks."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from dst.targets.parity import gf
from tests.support.parity import gf_mul, pq


def arr(b: bytes) -> gf.Chunk:
    return np.frombuffer(b, dtype=np.uint8)


def test_field_tables() -> None:
    for a in range(256):
        for b in (0, 1, 2, 3, 29, 128, 255):
            assert gf.gmul(a, b) == gf_mul(a, b)
        if a:
            assert gf.gmul(a, gf.ginv(a)) == 1


@pytest.mark.parametrize("k", [1, 2, 3, 6])
@pytest.mark.parametrize("length", [1, 13, 64, 4096, 4104])
def test_encode_is_p_and_q(k: int, length: int) -> None:
    chunks = [os.urandom(length) for _ in range(k)]
    p, q = pq(chunks)
    for parity in (1, 2):
        got = gf.Coder(k, parity).encode([arr(c) for c in chunks])
        assert [bytes(x) for x in got] == [p, q][:parity]
    assert bytes(gf.syndrome([arr(c) for c in chunks])) == q  # the numpy fallback too


def test_isal_is_used() -> None:
    assert gf.Coder(4, 2)._isal is not None  # pyeclib (which ships ISA-L) is a dependency


@pytest.mark.parametrize("parity", [1, 2])
@pytest.mark.parametrize(("k", "n", "skew"), [(2, 4096, 0), (3, 65536, 1), (5, 100, 3)])
def test_encode_stripes_in_place(parity: int, k: int, n: int, skew: int) -> None:
    """Many stripes' parity from one array, read where the data lie (here at an odd
    address: ISA-L takes unaligned buffers): per stripe, the definition's P and Q."""
    t = 3
    raw = os.urandom(skew + t * k * n)
    cols = np.frombuffer(raw, dtype=np.uint8, offset=skew).reshape(t, k, n)
    out = gf.Coder(k, parity).encode_stripes(cols)
    assert out.shape == (t, parity, n)
    for i in range(t):
        want = pq([cols[i, j].tobytes() for j in range(k)])[:parity]
        assert [out[i, j].tobytes() for j in range(parity)] == list(want)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_recover_every_combination(k: int) -> None:
    chunks = [os.urandom(257) for _ in range(k)]
    p, q = pq(chunks)
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
