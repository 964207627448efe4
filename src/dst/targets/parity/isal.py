"""ISA-L's erasure-code encoder called directly (ctypes): parity written in place from
the data where it lies, no copies.

Theory of operation
-------------------
ISA-L computes ``rows`` parity vectors as dot products of ``k`` data vectors with a
coefficient matrix over GF(2^8) (``ec_encode_data``), after expanding the matrix into
multiplication tables once (``ec_init_tables``).  With the rows ``[1, 1, ..., 1]`` (P)
and ``[g^0, g^1, ..., g^(k-1)]`` (Q, ``g = 2``, polynomial 0x11d: the field ISA-L
uses) that is exactly Linux MD's RAID6.  Its vector code takes unaligned buffers of any
length, reads the data vectors and writes the parity vectors by address: the data stay
in the request's buffer, the parity goes straight into the array the caller gave.

The library is the one ``pyeclib`` ships in its wheel (a dependency, so on every machine
dst installs on), else the system's ``libisal``.  :func:`load` returns None when neither
loads; the caller then computes the parity with numpy (and checks that this one agrees
with its own definition before using it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_vp = ctypes.c_void_p


def _candidates() -> list[str]:
    out = []
    spec = importlib.util.find_spec("pyeclib")
    if spec is not None and spec.origin is not None:
        libs = Path(spec.origin).parent.parent / "pyeclib.libs"
        out += sorted(str(p) for p in libs.glob("libisal*.so*"))
    system = ctypes.util.find_library("isal")
    if system:
        out.append(system)
    return out


@functools.cache
def load() -> ctypes.CDLL | None:
    """The ISA-L library (looked for once), or None."""
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            encode, init = lib.ec_encode_data, lib.ec_init_tables
        except (OSError, AttributeError) as e:
            log.debug("ISA-L at %s not usable: %s", path, e)
            continue
        # void ec_init_tables(int k, int rows, unsigned char *a, unsigned char *gftbls)
        init.argtypes = [ctypes.c_int, ctypes.c_int, _vp, _vp]
        init.restype = None
        # void ec_encode_data(int len, int k, int rows, unsigned char *gftbls,
        #                     unsigned char **data, unsigned char **coding)
        encode.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, _vp, _vp, _vp]
        encode.restype = None
        return lib
    return None


class Encoder:
    """Parity rows ``matrix`` (``rows`` lists of ``k`` GF(2^8) coefficients) of ``k``
    data vectors, with ISA-L ``lib``."""

    def __init__(self, lib: ctypes.CDLL, matrix: Sequence[Sequence[int]]) -> None:
        self.rows, self.k = len(matrix), len(matrix[0])
        a = (ctypes.c_ubyte * (self.rows * self.k))(*[c for row in matrix for c in row])
        self._tables = ctypes.create_string_buffer(32 * self.k * self.rows)
        lib.ec_init_tables(self.k, self.rows, a, self._tables)
        self._encode = lib.ec_encode_data
        # The pointer arrays are made once and refilled per call, and passed by
        # address (a parity run calls this once per stripe: 1.4 us a call, was 4.2
        # building them).  One encoder serves one thread (the event loop's).
        self._src = (_vp * self.k)()
        self._dst = (_vp * self.rows)()
        self._args = (
            ctypes.addressof(self._tables),
            ctypes.addressof(self._src),
            ctypes.addressof(self._dst),
        )

    def encode(self, length: int, data: Sequence[int], out: int) -> None:
        """Write the parity of the ``k`` vectors at addresses ``data`` (``length``
        bytes each) to the ``rows`` vectors laid end to end from address ``out``.  The
        caller keeps every buffer alive, and ``out`` writable and apart from the data."""
        assert len(data) == self.k and length > 0
        src, dst = self._src, self._dst
        for j, a in enumerate(data):
            src[j] = a
        for j in range(self.rows):
            dst[j] = out + j * length
        tables, srcs, dsts = self._args
        self._encode(length, self.k, self.rows, tables, srcs, dsts)
