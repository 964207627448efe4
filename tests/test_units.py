"""Sizes and durations: the one grammar of dst.units."""

from __future__ import annotations

import math

import pytest

from dst.errors import ConfigError
from dst.units import MAX_SIZE, format_size, parse_duration, parse_size

# -- sizes and durations ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("4k", 4096),
        ("4K", 4096),
        ("64KiB", 65536),
        ("512MiB", 512 << 20),
        ("1GiB", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("2t", 2 << 40),
        ("10B", 10),
        (" 8 MiB ", 8 << 20),
    ],
)
def test_parse_size(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "k",
        "-1",
        -1,
        "1.3k",
        "0.5",
        "4KB",
        "1 GB",
        "12x",
        "8EiB",
        MAX_SIZE + 1,
        True,
        1.5,
        "1e3",
    ],
)
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad)  # type: ignore[arg-type]


def test_parse_size_refuses_decimal_looking_units() -> None:
    """``4MB`` could mean 4*10**6 or 4*2**20 bytes: refused, with a hint."""
    for text, hint in (("4MB", "use MiB"), ("4kb", "use KiB"), ("1GB", "use GiB")):
        with pytest.raises(ConfigError, match=hint):
            parse_size(text)


def test_parse_size_limits() -> None:
    assert parse_size("7EiB") == 7 << 60
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    assert parse_size("1.5K") == 1536


@pytest.mark.parametrize(
    "n", [0, 1, 1000, 4096, 65536, 3 << 29, 1 << 30, (1 << 40) + 4096, 1 << 62]
)
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


def test_format_size_spelling() -> None:
    assert [format_size(n) for n in (0, 1000, 65536, 1 << 30, 3 << 29)] == [
        "0",
        "1000",
        "64KiB",
        "1GiB",
        "1536MiB",
    ]


@pytest.mark.parametrize(
    ("text", "secs"),
    [(30, 30.0), (1.5, 1.5), ("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0)],
)
def test_parse_duration(text: str | float, secs: float) -> None:
    assert parse_duration(text) == secs


@pytest.mark.parametrize("bad", ["", "s", "-1s", -1, math.inf, math.nan, "3 days", True, "1e3"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(bad)  # type: ignore[arg-type]
