"""Parity arrays nest like the other targets: a raid5 of mirrors and a linear of raid6
built from specs; the keeper finds every redundant target; spec() round-trips."""

from __future__ import annotations

import os

import pytest

from dst.array.build import build
from dst.array.keeper import keepers
from dst.array.spec import LinearSpec
from dst.array.specdict import spec_from_dict, target_from_dict
from dst.targets.parity import ParityDevice

pytestmark = pytest.mark.timeout(30)


def mem(name: str, size: str = "2MiB") -> dict[str, object]:
    return {"type": "memory", "name": name, "size": size}


async def test_raid5_of_mirrors_and_linear_of_raid6() -> None:
    r5 = {
        "type": "raid5",
        "name": "r5",
        "chunk_size": "8KiB",
        "members": [
            {"type": "mirror", "name": f"m{i}", "members": [mem(f"a{i}"), mem(f"b{i}")]}
            for i in range(3)
        ],
    }
    r6 = {"type": "raid6", "name": "r6", "members": [mem(f"c{i}") for i in range(4)]}
    doc = {"array": {"name": "x", "target": {"type": "linear", "name": "top",
                                             "members": [r5, r6]}}}  # fmt: skip
    spec = spec_from_dict(doc)
    dev = await build(spec.target, io_timeout=5.0)
    assert sorted(k.mirror.name for k in keepers(dev)) == ["m0", "m1", "m2", "r5", "r6"]
    data = os.urandom(dev.size)
    await dev.write(0, data)
    assert bytes(await dev.read(0, dev.size)) == data
    inner = dev.children()[0]
    assert isinstance(inner, ParityDevice)
    await inner.fail_leg(1)  # a whole mirror of the raid5 taken out
    assert bytes(await dev.read(0, dev.size)) == data
    # The running parity targets' specs rebuild them (every key reported).
    assert isinstance(spec.target, LinearSpec)
    for kid, part in zip(dev.children(), spec.target.members, strict=True):
        assert target_from_dict(kid.spec()) == part.target
    await dev.close()
