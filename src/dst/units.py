"""Sizes and durations as people write them, for specs and the command line.

Grammar (case-insensitive, blanks around the number and unit allowed)::

    size      = number [unit]      unit: B | K | KiB | M | MiB | G | GiB | T | TiB
                                         | P | PiB | E | EiB
    duration  = number [unit]      unit: us | ms | s | m | h
    number    = digits ["." digits]

Size units are binary (K = KiB = 1024); a bare number is bytes.  ``KB``, ``MB``,
``GB``, ... are refused as ambiguous (1000 or 1024?) with a hint to write ``KiB``.
A fraction is fine when it comes to whole bytes (``1.5GiB``, not ``1.3K``).  A
size must fit in a signed 64-bit offset.  A bare duration is seconds.  Ints (and,
for durations, floats) pass through after a range check.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from dst.errors import ConfigError

MAX_SIZE = (1 << 63) - 1

_SIZE_UNITS = {"": 1, "b": 1}
for _i, _u in enumerate("kmgtpe", start=1):
    _SIZE_UNITS[_u] = _SIZE_UNITS[_u + "ib"] = 1 << (10 * _i)
_AMBIGUOUS = {u + "b" for u in "kmgtpe"}
_DURATION_UNITS: dict[str, int | Fraction] = {
    **{"": 1, "s": 1, "m": 60, "h": 3600},
    **{"ms": Fraction(1, 1000), "us": Fraction(1, 10**6)},
}
_NUMBER_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")  # "1.5 GiB", "500ms"


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string: ``4096``, ``"4k"``, ``"64KiB"``, ``"1.5GiB"``.

    Raises :class:`ConfigError` (message starting ``not a size``) for anything
    outside the grammar, ``"4MB"``-style units, a fractional number of bytes, or a
    value below 0 or above :data:`MAX_SIZE`.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _NUMBER_RE.fullmatch(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _SIZE_UNITS:
            hint = (
                f"use {unit[0].upper()}iB" if m and unit in _AMBIGUOUS else "e.g. 4096, 64K, 10GiB"
            )
            raise ConfigError(f"not a size: {value!r} ({hint})")
        exact = Fraction(m.group(1)) * _SIZE_UNITS[unit]
        if exact.denominator != 1:
            raise ConfigError(f"not a size: {value!r} (not a whole number of bytes)")
        n = int(exact)
    if not 0 <= n <= MAX_SIZE:
        raise ConfigError(f"not a size: {value!r} (must be 0..2**63-1 bytes)")
    return n


def format_size(n: int) -> str:
    """The shortest exact spelling of ``n`` bytes: ``65536 -> "64KiB"``, ``1000 -> "1000"``.

    :func:`parse_size` reads it back.  Raises ValueError for a negative ``n``.
    """
    if n < 0:
        raise ValueError("size must not be negative")
    for i, u in reversed(list(enumerate("KMGTPE", start=1))):
        unit = 1 << (10 * i)
        if n and n % unit == 0:
            return f"{n // unit}{u}iB"
    return str(n)


def parse_duration(value: str | int | float) -> float:
    """Seconds from a number (seconds) or ``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"``, ``"100us"``.

    Raises :class:`ConfigError` for anything else, negative or non-finite values.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"duration must be finite and >= 0: {value!r}")
        return float(value)
    m = _NUMBER_RE.fullmatch(value)
    if m is None or m.group(2).lower() not in _DURATION_UNITS:
        raise ConfigError(f"not a duration: {value!r} (use e.g. 30s, 500ms, 2m)")
    return float(Fraction(m.group(1)) * _DURATION_UNITS[m.group(2).lower()])
