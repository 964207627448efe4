"""Member metadata layout arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dst.meta.layout import (
    BLOCK,
    DEFAULT_REGION_SIZE,
    SB_SLOT,
    bitmap_bytes,
    layout_for,
    member_size_for,
    region_count,
    sb_offsets,
)

region_sizes = st.sampled_from([4096, 65536, 1 << 20])


def test_small_member() -> None:
    lay = layout_for(1 << 20, 64 << 10)
    assert lay.data_size == (1 << 20) - 3 * BLOCK
    assert lay.nregions == 16
    assert lay.bitmap_offset == lay.data_size
    assert lay.sb_offsets == ((1 << 20) - 2 * SB_SLOT, (1 << 20) - SB_SLOT)


def test_one_tib_member() -> None:
    lay = layout_for(1 << 40, DEFAULT_REGION_SIZE)
    assert lay.bitmap_size == 128 << 10  # 1 Mi regions of 1 MiB, one bit each
    assert lay.data_size == (1 << 40) - (128 << 10) - 2 * SB_SLOT
    assert lay.nregions == region_count(lay.data_size, DEFAULT_REGION_SIZE)


@pytest.mark.parametrize("size", [0, 4096, 3 * 4096, 4 * 4096 - 1])
def test_too_small(size: int) -> None:
    with pytest.raises(ValueError, match="too small"):
        layout_for(size)


@pytest.mark.parametrize("region", [0, 2048, 3 * 4096, 65537])
def test_bad_region_size(region: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        layout_for(1 << 30, region)


@given(st.integers(4 * BLOCK, 1 << 50), region_sizes)
def test_layout_is_consistent(member: int, region: int) -> None:
    lay = layout_for(member, region)
    assert lay.data_size % BLOCK == 0 and lay.data_size >= BLOCK
    assert lay.bitmap_offset == lay.data_size
    assert lay.bitmap_size % BLOCK == 0
    assert lay.bitmap_size >= bitmap_bytes(lay.nregions)
    assert lay.sb_offsets[0] == lay.bitmap_offset + lay.bitmap_size
    assert lay.sb_offsets[1] + SB_SLOT == member - member % BLOCK
    assert lay.sb_offsets == sb_offsets(member)
    # maximal: one more block of data would need more room than there is
    more = lay.data_size + BLOCK
    assert more + bitmap_bytes(region_count(more, region)) + 2 * SB_SLOT > member


@given(st.integers(1, 1 << 50), region_sizes)
def test_member_size_for_round_trips(data: int, region: int) -> None:
    member = member_size_for(data, region)
    assert layout_for(member, region).data_size >= data
    if data > BLOCK:  # minimal: one block less does not hold the data
        assert layout_for(member - BLOCK, region).data_size < data
