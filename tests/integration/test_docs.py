"""The reference pages match the code: docs/spec-reference.md (every key, its default,
every example) and docs/on-disk-format.md (superblock offsets, layout examples)."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dst.array.spec import KINDS, ArraySpec, LinearPart
from dst.array.specdict import spec_from_dict, target_from_dict
from dst.array.specfile import spec_from_toml
from dst.meta.layout import layout_for
from dst.meta.superblock import _HDR
from dst.units import format_size

DOCS = Path(__file__).resolve().parents[2] / "docs"
SPEC_DOC = (DOCS / "spec-reference.md").read_text()
DISK_DOC = (DOCS / "on-disk-format.md").read_text()


def section(doc: str, header: str) -> str:
    """The text under the heading line starting with ``header``, to the next heading."""
    start = doc.index("\n" + header) + 1
    end = re.compile(r"^#{1,3} ", re.M).search(doc, start + len(header))
    return doc[start : end.start() if end else len(doc)]


def rows(text: str) -> dict[str, list[str]]:
    """Table rows keyed by their first cell (backquotes stripped)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0].strip("`")] = cells
    return out


SHARED = {"raid5": "### `raid5`, `raid6`", "raid6": "### `raid5`, `raid6`"}  # one table
SECTIONS: list[tuple[type[Any], str]] = [
    (ArraySpec, "## `[array]`"),
    (LinearPart, "### `linear`"),
    *((cls, SHARED.get(kind, f"### `{kind}`")) for kind, cls in KINDS.items()),
]


def expected_default(value: Any) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f'`"{value:g}s"`'
    return f'`"{format_size(value)}"`' if value else "`0`"


@pytest.mark.parametrize(("cls", "header"), SECTIONS, ids=lambda x: getattr(x, "__name__", x))
def test_every_spec_key_is_documented_with_its_default(cls: type[Any], header: str) -> None:
    table = rows(section(SPEC_DOC, header))
    for f in dataclasses.fields(cls):
        if (f.name == "name" and cls is not ArraySpec) or (cls, f.name) == (LinearPart, "target"):
            continue  # a target's name: the rules; a linear part's target: the member
        assert f.name in table, f"{header}: no row for {f.name!r}"
        default = table[f.name][2]
        if f.default is dataclasses.MISSING:
            assert default.startswith("required"), (f.name, default)
        elif f.default not in (None, ()):
            assert expected_default(f.default) in default, (f.name, f.default, default)


def test_every_spec_example_is_valid() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", SPEC_DOC, re.S)
    assert len(blocks) >= 7
    for block in blocks:
        if block.startswith("[array]\n"):
            spec_from_toml(block)
        elif block.startswith("[array.target]"):
            spec_from_toml('[array]\nname = "x"\n\n' + block)
        else:
            target_from_dict(tomllib.loads("t = " + block)["t"])
    (canonical,) = re.findall(r"```json\n(.*?)```", SPEC_DOC, re.S)
    spec_from_dict(json.loads(canonical))


def test_superblock_offsets_match_the_code() -> None:
    documented = []  # (offset, size) of the rows with both written as numbers
    for line in section(DISK_DOC, "## Superblock slot").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0].isdigit() and cells[1].isdigit():
            documented.append((int(cells[0]), int(cells[1])))
    sizes = [struct.calcsize("<" + f) for f in re.findall(r"\d*[a-zA-Z]", _HDR.format[1:])]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    assert documented[: len(sizes)] == list(zip(offsets, sizes, strict=True))
    assert documented[len(sizes)] == (_HDR.size, 2)  # name length, after the fixed header
    assert documented[-1] == (4092, 4)  # the CRC


def test_layout_examples_match_the_code() -> None:
    text = section(DISK_DOC, "## Layout")
    found = 0
    for line in text.splitlines():
        m = re.match(r"\| ([\d,]+) .*?\| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| "
                     r"([\d,]+) \| ([\d,]+) \|", line)  # fmt: skip
        if not m:
            continue
        member, data, regions, bitmap, bm_off, sb_a, sb_b = (
            int(x.replace(",", "")) for x in m.groups()
        )
        lay = layout_for(member)
        assert (lay.data_size, lay.nregions, lay.bitmap_size, lay.bitmap_offset) == (
            data,
            regions,
            bitmap,
            bm_off,
        ), line
        assert lay.sb_offsets == (sb_a, sb_b), line
        found += 1
    assert found == 4
