"""Parity arithmetic: P (XOR) and Q (the RAID6 syndrome over GF(2^8)), and the recovery
of up to two lost chunks of a stripe (pure computation on numpy arrays).

Theory of operation
-------------------
A stripe's column of ``k`` data bytes ``D_0 .. D_{k-1}`` has parity ``P = D_0 ^ ... ^
D_{k-1}`` and, for RAID6, ``Q = g^0 D_0 ^ g^1 D_1 ^ ... ^ g^{k-1} D_{k-1}`` in GF(2^8)
with the polynomial 0x11d and generator ``g = 2``: the code of Linux MD's raid6 and of
ISA-L's ``isa_l_rs_vand`` with two parities (its first parity row is all ones, its
second the powers of 2), so P and Q are checked by either.  Both are linear, so the
parity of a change is the parity of the difference (read-modify-write: new parity =
old parity ^ parity of (old data ^ new data), the unchanged chunks taken as zero).

RAID6 encoding uses ISA-L (:mod:`.isal`: the data read where they lie, the parity
written into one new array, no copies) when it loads and agrees with the numpy code on
a known vector (several GB/s against ~1 GB/s for numpy's Horner scheme); P alone is a
numpy XOR.  Recovery of lost data needs a multiplication by a constant: a 256-byte
table lookup per byte (numpy ``take``), used only when an array is degraded.  Chunks
are numpy ``uint8`` arrays of one length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from dst.targets.parity import isal

log = logging.getLogger(__name__)
Chunk = npt.NDArray[np.uint8]
POLY = 0x11D


def _tables() -> tuple[list[int], list[int]]:
    exp, logt = [0] * 510, [0] * 256
    x = 1
    for i in range(255):
        exp[i] = exp[i + 255] = x
        logt[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    return exp, logt


EXP, LOG = _tables()


def gmul(a: int, b: int) -> int:
    """``a * b`` in GF(2^8)."""
    return 0 if a == 0 or b == 0 else EXP[LOG[a] + LOG[b]]


def ginv(a: int) -> int:
    """``1 / a`` in GF(2^8) (``a`` non-zero)."""
    assert a
    return EXP[255 - LOG[a]]


def gpow(i: int) -> int:
    """``g^i`` for the generator 2."""
    return EXP[i % 255]


_MUL = np.array([[gmul(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)
_M7, _M1 = np.uint64(0x7F7F7F7F7F7F7F7F), np.uint64(0x0101010101010101)
_POLY64, _ONE, _SEVEN = np.uint64(POLY & 0xFF), np.uint64(1), np.uint64(7)


def mul(c: int, v: Chunk) -> Chunk:
    """``c * v`` byte by byte (a table lookup)."""
    if c == 1:
        return v.copy()
    return np.take(_MUL[c], v)


def xor(chunks: Sequence[Chunk]) -> Chunk:
    """P of ``chunks`` (at least one)."""
    out = chunks[0].copy()
    for c in chunks[1:]:
        np.bitwise_xor(out, c, out=out)
    return out


def _times2(q: Any, tmp: Any) -> None:
    """``q = 2 * q`` in place, 8 bytes per word (uint64) or byte-wise (uint8)."""
    if q.dtype == np.uint64:
        np.right_shift(q, _SEVEN, out=tmp)
        np.bitwise_and(tmp, _M1, out=tmp)
        np.multiply(tmp, _POLY64, out=tmp)
        np.bitwise_and(q, _M7, out=q)
    else:
        np.right_shift(q, np.uint8(7), out=tmp)
        np.multiply(tmp, np.uint8(POLY & 0xFF), out=tmp)
    np.left_shift(q, _ONE if q.dtype == np.uint64 else np.uint8(1), out=q)
    np.bitwise_xor(q, tmp, out=q)


def syndrome(chunks: Sequence[Chunk]) -> Chunk:
    """Q of ``chunks`` (numpy, Horner's scheme from the last chunk)."""
    wide = len(chunks[0]) % 8 == 0
    vs = [c.view(np.uint64) if wide else c for c in chunks]
    q = vs[-1].copy()
    tmp = np.empty_like(q)
    for v in reversed(vs[:-1]):
        _times2(q, tmp)
        np.bitwise_xor(q, v, out=q)
    return q.view(np.uint8)


class Coder:
    """Parity of stripes with ``data`` data chunks and ``parity`` (1 or 2) parities."""

    def __init__(self, data: int, parity: int) -> None:
        assert parity in (1, 2) and data >= 1
        self.data, self.parity = data, parity
        self._isal = _isal(data) if parity == 2 else None

    def encode(self, chunks: Sequence[Chunk]) -> list[Chunk]:
        """The parity chunks (``[P]`` or ``[P, Q]``) of ``data`` chunks of one length."""
        assert len(chunks) == self.data
        if self.parity == 1:
            return [xor(chunks)]
        if self._isal is not None and len(chunks[0]):
            flat = [np.ascontiguousarray(c) for c in chunks]
            out = np.empty((2, len(flat[0])), dtype=np.uint8)
            self._isal.encode(out.shape[1], [c.ctypes.data for c in flat], out.ctypes.data)
            return [out[0], out[1]]
        return [xor(chunks), syndrome(chunks)]

    def encode_stripes(self, cols: Any) -> Any:
        """The parity of many stripes at once: ``cols`` is a C-contiguous ``(stripes,
        data, n)`` uint8 array; the result a ``(stripes, parity, n)`` one (P, then Q).
        RAID5 is one numpy reduction for all stripes; RAID6 one ISA-L call per stripe,
        reading the data in place."""
        t, k, n = cols.shape
        if self.parity == 1:
            return np.bitwise_xor.reduce(cols, axis=1, keepdims=True)
        if self._isal is None or not n:
            return np.array([self.encode(list(cols[i])) for i in range(t)], dtype=np.uint8)
        assert cols.flags.c_contiguous
        out = np.empty((t, 2, n), dtype=np.uint8)
        src, dst, encode = cols.ctypes.data, out.ctypes.data, self._isal.encode
        for i in range(t):
            a = src + i * k * n
            encode(n, [a + j * n for j in range(k)], dst + i * 2 * n)
        return out

    def recover(self, data: list[Chunk | None], parity: list[Chunk | None]) -> list[Chunk]:
        """``data`` with its missing chunks (None) computed from the others and
        ``parity`` (missing ones None).  Raises ValueError if too much is missing."""
        lost = [i for i, d in enumerate(data) if d is None]
        if not lost:
            return [d for d in data if d is not None]
        n = len(next(c for c in (*data, *parity) if c is not None))
        zero = np.zeros(n, dtype=np.uint8)
        part = self.encode([zero if d is None else d for d in data])  # parity of the rest
        p = parity[0]
        q = parity[1] if self.parity == 2 else None
        out = list(data)
        if len(lost) == 1 and p is not None:
            out[lost[0]] = p ^ part[0]
        elif len(lost) == 1 and q is not None:
            x = lost[0]
            out[x] = mul(ginv(gpow(x)), q ^ part[1])
        elif len(lost) == 2 and p is not None and q is not None:
            x, y = lost
            pxy, qxy = p ^ part[0], q ^ part[1]
            gy = gpow(y)
            dx = mul(ginv(gpow(x) ^ gy), mul(gy, pxy) ^ qxy)
            out[x], out[y] = dx, pxy ^ dx
        else:
            raise ValueError(f"cannot recover {len(lost)} data chunks from {self.parity} parity")
        return [d for d in out if d is not None]


def _isal(data: int) -> isal.Encoder | None:
    """ISA-L's encoder of P and Q for ``data`` chunks (None if ISA-L is missing or its
    parity is not the numpy code's)."""
    lib = isal.load()
    if lib is None:
        log.warning("ISA-L not found: RAID6 parity computed with numpy (slower)")
        return None
    enc = isal.Encoder(lib, [[1] * data, [gpow(i) for i in range(data)]])
    probe = np.stack([np.arange(64, dtype=np.uint8) * (i + 3) for i in range(data)])
    out = np.empty((2, 64), dtype=np.uint8)
    enc.encode(64, [probe.ctypes.data + 64 * i for i in range(data)], out.ctypes.data)
    if out[0].tobytes() != xor(list(probe)).tobytes() or (
        out[1].tobytes() != syndrome(list(probe)).tobytes()
    ):
        log.warning("ISA-L's parity is not MD's: RAID6 parity computed with numpy")
        return None
    return enc
