"""Mirror maintenance in an in-process daemon: fail/readd/verify/resync-rate over the
control ops, and assembly of a mirror from its members' superblocks."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from dst.array.assemble import AssembleError, assemble_spec, probe_all
from dst.array.daemon import Daemon
from dst.control import operations as op
from dst.errors import ControlError
from dst.meta.layout import layout_for
from dst.net.address import parse_address
from dst.net.client import NbdClient

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
REGION = 64 << 10


def mirror_spec(name: str, tmp: Path, sock: Path, legs: int = 2) -> dict[str, Any]:
    members = [
        {"type": "file", "name": f"leg{i}", "path": str(tmp / f"leg{i}.img"), "size": 4 * MiB}
        for i in range(legs)
    ]
    target = {"type": "mirror", "name": "m", "region_size": REGION, "members": members}
    return {"array": {"name": name, "listen": [f"unix:{sock}"], "target": target}}


async def connect(sock: Path) -> NbdClient:
    return await NbdClient.connect(parse_address(f"unix:{sock}", form="listen"))


def mirror_node(status: dict[str, Any]) -> dict[str, Any]:
    node: dict[str, Any] = status["root"]
    return node


async def wait_for(cond: Any, what: str, limit: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def rot(path: Path, regions: list[int]) -> None:
    """Bit rot: a few bytes changed in each of ``regions`` of the member file."""
    with open(path, "r+b") as f:
        for r in regions:
            f.seek(r * REGION + 100)
            f.write(b"rot")


def leg_data(tmp: Path, i: int) -> bytes:
    size = layout_for(4 * MiB, REGION).data_size
    return (tmp / f"leg{i}.img").read_bytes()[:size]


async def test_fail_write_readd_copies_only_what_was_missed(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(mirror_spec("a", tmp_path, sock)))
        c = await connect(sock)
        await c.write(0, b"\x11" * c.size)
        await c.flush()
        status = await daemon.handle(op.Fail(array="a", node="leg1"))
        legs = mirror_node(status)["members"]
        assert [x["state"] for x in legs] == ["in_sync", "failed"]
        # Three regions written while leg1 is out.
        for r in (1, 5, 9):
            await c.write(r * REGION, bytes([r]) * REGION)
        await c.flush()
        # An operator-failed leg is never re-added automatically.
        await asyncio.sleep(1.5)
        array = daemon.arrays["a"]
        assert array.status()["root"]["members"][1]["state"] == "failed"
        plan = await daemon.handle(op.Readd(array="a", node="leg1"))
        assert (plan["full"], plan["regions"]) == (False, 3)
        keeper = array.keepers["m"]
        await asyncio.wait_for(keeper.resyncer.wait_idle(), 20)
        assert keeper.resyncer.last is not None
        assert keeper.resyncer.last.bytes == 3 * REGION
        status = array.status()
        assert [x["state"] for x in status["root"]["members"]] == ["in_sync", "in_sync"]
        expect = bytearray(b"\x11" * c.size)
        for r in (1, 5, 9):
            expect[r * REGION : (r + 1) * REGION] = bytes([r]) * REGION
        assert bytes(await c.read(0, c.size)) == expect
        await c.close()
        await daemon.handle(op.Stop(array="a"))
        assert leg_data(tmp_path, 0) == expect == leg_data(tmp_path, 1)
    finally:
        await daemon.close()


async def test_maintenance_errors_name_the_problem(tmp_path: Path) -> None:
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(mirror_spec("a", tmp_path, tmp_path / "a.sock")))
        cases: list[tuple[op.Request, str, str]] = [
            (op.Fail(array="a", node="nope"), "no-such-node", "node"),
            (op.Readd(array="a", node="leg0"), "not-failed", "node"),
            (op.ResyncRate(array="a", rate=-1), "bad-args", "rate"),
            (op.ResyncRate(array="a", rate=10, min_rate=20), "bad-args", "min_rate"),
            (op.Verify(array="a", mirror="x"), "no-such-node", "mirror"),
            (op.Fail(array="zz", node="leg0"), "no-such-array", "array"),
        ]
        for req, code, field in cases:
            with pytest.raises(ControlError) as exc:
                await daemon.handle(req)
            assert (exc.value.code, exc.value.field) == (code, field), req
        await daemon.handle(op.Fail(array="a", node="leg1"))
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Fail(array="a", node="leg0"))
        assert exc.value.code == "last-leg"
        await daemon.handle(op.Stop(array="a"))
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Fail(array="a", node="leg0"))
        assert exc.value.code == "not-running"
    finally:
        await daemon.close()


async def test_verify_reports_then_repairs(tmp_path: Path) -> None:
    sock = tmp_path / "v.sock"
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(mirror_spec("v", tmp_path, sock)))
        c = await connect(sock)
        data = os.urandom(c.size)
        await c.write(0, data)
        await c.flush()
        await daemon.handle(op.Stop(array="v"))
        rot(tmp_path / "leg1.img", [2, 7])
        await c.close()
        await daemon.handle(op.Start(array="v"))
        array = daemon.arrays["v"]
        keeper = array.keepers["m"]

        async def verify(**kw: Any) -> dict[str, Any]:
            await daemon.handle(op.Verify(array="v", **kw))
            job = keeper.verify_job
            assert job is not None
            await wait_for(lambda: job.state != "running", "verify")
            st: dict[str, Any] = array.status()["root"]["detail"]["keeper"]["verify"]
            return st

        found = await verify()
        assert (found["state"], found["mismatched"], found["repaired_count"]) == ("done", [2, 7], 0)
        fixed = await verify(repair=True, source="leg0")
        assert (fixed["mismatched"], fixed["repaired_count"]) == ([2, 7], 2)
        clean = await verify()
        assert clean["mismatched"] == []
        await daemon.handle(op.ResyncRate(array="v", rate=50 * MiB, min_rate=MiB))
        limit = array.status()["root"]["detail"]["keeper"]["resync_limit"]
        assert limit == {"max_rate": 50 * MiB, "min_rate": MiB}
        await daemon.handle(op.Stop(array="v"))
        assert leg_data(tmp_path, 0) == leg_data(tmp_path, 1)
        assert leg_data(tmp_path, 0)[: len(data)] == data
    finally:
        await daemon.close()


async def test_assemble_from_members_alone(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(mirror_spec("orig", tmp_path, sock, legs=3)))
        c = await connect(sock)
        data = os.urandom(c.size)
        await c.write(0, data)
        await c.close()
        await daemon.handle(op.Stop(array="orig"))
        # Members given in any order come back in their roles, with their names.
        paths = [str(tmp_path / f"leg{i}.img") for i in (2, 0, 1)]
        doc = assemble_spec(await probe_all(paths), name="back", listen=[f"unix:{sock}"])
        target = doc["array"]["target"]
        assert [x["name"] for x in target["members"]] == ["leg0", "leg1", "leg2"]
        assert [x["path"] for x in target["members"]] == sorted(paths)
        assert (target["name"], target["region_size"]) == ("m", REGION)
        await daemon.handle(op.Create(doc))
        c = await connect(sock)
        assert bytes(await c.read(0, c.size)) == data
        await c.close()
        st = daemon.arrays["back"].status()
        assert [x["state"] for x in st["root"]["members"]] == ["in_sync"] * 3
    finally:
        await daemon.close()


async def test_assemble_refuses_what_does_not_belong_together(tmp_path: Path) -> None:
    daemon = Daemon()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    try:
        await daemon.handle(op.Create(mirror_spec("one", a, a / "s.sock")))
        await daemon.handle(op.Create(mirror_spec("two", b, b / "s.sock")))
        await daemon.handle(op.Stop(array="one"))
        await daemon.handle(op.Stop(array="two"))
    finally:
        await daemon.close()
    (tmp_path / "plain.img").write_bytes(b"\0" * MiB)
    cases = [
        ([a / "leg0.img", b / "leg1.img"], "different arrays"),
        ([a / "leg0.img"], r"member\(s\) 1 of 2 not given.*--degraded"),
        ([a / "leg0.img", a / "leg0.img"], "are both member 0"),
        ([a / "leg0.img", tmp_path / "plain.img"], "not a dst array member"),
        ([a / "leg0.img", tmp_path / "missing.img"], "no such file"),
        ([], "say which members"),
    ]
    for members, message in cases:
        with pytest.raises(AssembleError, match=message):
            assemble_spec(await probe_all([str(p) for p in members]))


@pytest.mark.parametrize("kind", ["mirror", "raid5"])
async def test_assemble_brings_the_array_back_under_its_own_name_and_addresses(
    tmp_path: Path, kind: str
) -> None:
    """Issue 11, point 7: ``dst assemble`` named the array after its mirror target and
    dropped its listeners; the superblocks record the array's name and exports (a
    parity array's too)."""
    sock = tmp_path / "s.sock"
    spec = mirror_spec("demo", tmp_path, sock, legs=2 if kind == "mirror" else 3)
    spec["array"]["target"]["type"] = kind
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(spec))
        c = await connect(sock)
        await c.write(0, b"n" * 4096)  # the first write records the label
        await c.close()
    finally:
        await daemon.close()
    paths = [str(tmp_path / f"leg{i}.img") for i in range(len(spec["array"]["target"]["members"]))]
    array = assemble_spec(await probe_all(paths))["array"]
    assert (array["name"], array["listen"]) == ("demo", [f"unix:{sock}"])
    assert array["target"]["type"] == kind
    daemon = Daemon()
    try:
        await daemon.handle(op.Create({"array": array}))
        c = await connect(sock)
        assert bytes(await c.read(0, 4096)) == b"n" * 4096
        await c.close()
    finally:
        await daemon.close()


async def test_degraded_assembly_from_one_member_then_a_new_leg_in_the_missing_role(
    tmp_path: Path,
) -> None:
    """``--degraded``: the survivor alone starts the array, the missing leg failed; a
    replace puts a new node in its place and it is resynced; a member that was being
    resynced is refused alone (it is incomplete)."""
    sock = tmp_path / "s.sock"
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(mirror_spec("d", tmp_path, sock)))
        c = await connect(sock)
        data = os.urandom(c.size)
        await c.write(0, data)
        await c.close()
    finally:
        await daemon.close()
    daemon = Daemon()
    try:
        found = await probe_all([str(tmp_path / "leg0.img")])
        with pytest.raises(AssembleError, match="--degraded"):
            assemble_spec(found)
        doc = assemble_spec(found, degraded=True)
        members = doc["array"]["target"]["members"]
        assert members[1] == {"type": "missing", "name": "leg1"}
        await daemon.handle(op.Create(doc))
        st = daemon.arrays["d"].status()
        legs = st["root"]["members"]
        assert [x["state"] for x in legs] == ["in_sync", "failed"]
        assert "dst replace" in st["root"]["detail"]["legs"][1]["reason"]
        c = await connect(sock)
        assert bytes(await c.read(0, c.size)) == data
        await c.write(0, b"after" * 100)
        data = b"after" * 100 + data[500:]
        new = {"type": "file", "name": "leg9", "path": str(tmp_path / "leg9.img"), "size": 4 * MiB}
        await daemon.handle(op.Replace(array="d", node="leg1", spec=new))
        array = daemon.arrays["d"]
        await wait_for(lambda: array.status()["replace"]["state"] == "finished", "the rebuild")
        legs = array.status()["root"]["members"]
        assert [(x["name"], x["state"]) for x in legs] == [("leg0", "in_sync"), ("leg9", "in_sync")]
        assert bytes(await c.read(0, c.size)) == data
        await c.close()
    finally:
        await daemon.close()
    # A member flagged as a resync target is refused on its own.
    from dst.meta.store import MetaStore
    from dst.targets.file import FileDevice

    dev = FileDevice(tmp_path / "leg0.img")
    await dev.open()
    store = MetaStore(dev)
    sb = await store.load()
    await store.write_superblock(dataclasses.replace(sb, inconsistent=True))
    await dev.close()
    with pytest.raises(AssembleError, match="being resynced"):
        assemble_spec(await probe_all([str(tmp_path / "leg0.img")]), degraded=True)


async def test_suspend_resume_a_mirror_leg_resyncs_what_it_missed(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(mirror_spec("s", tmp_path, sock)))
        c = await connect(sock)
        await c.write(0, b"\x22" * c.size)
        status = await daemon.handle(op.Suspend(array="s", node="leg0"))
        assert [x["state"] for x in status["root"]["members"]] == ["suspended", "in_sync"]
        assert status["root"]["detail"]["keeper"]["suspended"] == [0]
        await c.write(3 * REGION, b"\x33" * 2 * REGION)  # regions 3 and 4, leg0 away
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Suspend(array="s", node="leg1"))  # the last leg in sync
        assert exc.value.code == "busy"
        await daemon.handle(op.Resume(array="s", node="leg0"))
        keeper = daemon.arrays["s"].keepers["m"]
        await asyncio.wait_for(keeper.resyncer.wait_idle(), 20)
        assert keeper.resyncer.last is not None and keeper.resyncer.last.bytes == 2 * REGION
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Resume(array="s", node="leg0"))
        assert exc.value.code == "not-suspended"
        expect = bytearray(b"\x22" * c.size)
        expect[3 * REGION : 5 * REGION] = b"\x33" * 2 * REGION
        assert bytes(await c.read(0, c.size)) == expect
        await c.close()
        await daemon.handle(op.Stop(array="s"))
        assert leg_data(tmp_path, 0) == expect == leg_data(tmp_path, 1)
    finally:
        await daemon.close()


def linear_spec(name: str, tmp: Path, sock: Path, size: int = MiB) -> dict[str, Any]:
    members = [
        {"type": "file", "name": f"n{i}", "path": str(tmp / f"n{i}.img"), "size": size}
        for i in range(2)
    ]
    target = {"type": "linear", "members": members}
    return {"array": {"name": name, "listen": [f"unix:{sock}"], "target": target}}


async def test_suspend_one_node_of_a_linear_array(tmp_path: Path) -> None:
    sock = tmp_path / "l.sock"
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(linear_spec("l", tmp_path, sock)))
        c = await connect(sock)
        status = await daemon.handle(op.Suspend(array="l", node="n1"))
        assert [x["state"] for x in status["root"]["members"]] == ["connected", "suspended"]
        held = [asyncio.ensure_future(c.write(MiB + i * 4096, bytes([i + 1]) * 4096))
                for i in range(3)]  # fmt: skip
        await wait_for(lambda: daemon.arrays["l"].status()["root"]["members"][1]["detail"]
                       ["held"] == 3, "3 held requests")  # fmt: skip
        # The other node keeps serving while n1 holds requests.
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(20):
            await c.write(i * 4096, b"\x7f" * 4096)
        assert loop.time() - t0 < 1.0
        assert not any(f.done() for f in held)
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Suspend(array="l", node="n1"))
        assert exc.value.code == "busy"
        # What would suspend the whole array waits for no held node: refused.
        extra = {"type": "file", "name": "n2", "path": str(tmp_path / "n2.img"), "size": MiB}
        for req in (op.Suspend(array="l"), op.Add(array="l", spec=extra)):
            with pytest.raises(ControlError) as exc:
                await daemon.handle(req)
            assert exc.value.code == "busy" and "n1" in str(exc.value), req
        await daemon.handle(op.Resume(array="l", node="n1"))
        await asyncio.wait_for(asyncio.gather(*held), 5)
        data = bytes(await c.read(0, 2 * MiB))
        assert data[: 20 * 4096] == b"\x7f" * 20 * 4096
        assert data[MiB : MiB + 3 * 4096] == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Resume(array="l", node="n1"))
        assert exc.value.code == "not-suspended"
        # The whole array: everything waits until resume.
        await daemon.handle(op.Suspend(array="l"))
        pending = asyncio.ensure_future(c.write(0, b"\x01" * 4096))
        await asyncio.sleep(0.2)
        assert not pending.done() and daemon.arrays["l"].status()["held"] == 1
        await daemon.handle(op.Resume(array="l"))
        await asyncio.wait_for(pending, 5)
        await c.close()
    finally:
        await daemon.close()


async def test_grow_a_stripe_array_by_a_linear_segment(tmp_path: Path) -> None:
    sock = tmp_path / "g.sock"
    members = [
        {"type": "file", "name": f"s{i}", "path": str(tmp_path / f"s{i}.img"), "size": MiB}
        for i in range(2)
    ]
    target = {"type": "stripe", "name": "st", "members": members}
    daemon = Daemon()
    try:
        await daemon.handle(
            op.Create({"array": {"name": "g", "listen": [f"unix:{sock}"], "target": target}})
        )
        c = await connect(sock)
        old = os.urandom(2 * MiB)
        await c.write(0, old)
        new_node = {"type": "file", "name": "s2", "path": str(tmp_path / "s2.img"), "size": MiB}
        status = await daemon.handle(op.Add(array="g", spec=new_node))
        assert (status["algorithm"], status["size"]) == ("linear", 3 * MiB)
        root = status["root"]
        assert [(k["name"], k["type"], k["start"]) for k in root["members"]] == [
            ("st", "stripe", 0),
            ("s2", "file", 2 * MiB),
        ]
        await c.close()
        c = await connect(sock)  # a new connection sees the new size
        assert c.size == 3 * MiB
        tail = os.urandom(MiB)
        await c.write(2 * MiB, tail)
        assert bytes(await c.read(0, 3 * MiB)) == old + tail
        await c.close()
        # The grown spec is what runs: stop and start rebuild it with the data in place.
        await daemon.handle(op.Stop(array="g"))
        await daemon.handle(op.Start(array="g"))
        c = await connect(sock)
        assert bytes(await c.read(0, 3 * MiB)) == old + tail
        await c.close()
        assert (tmp_path / "s2.img").read_bytes() == tail
    finally:
        await daemon.close()


async def writer(c: NbdClient, size: int, expect: bytearray, stop: asyncio.Event) -> int:
    """Write 4 KiB blocks at pseudo-random offsets until ``stop``; record them in
    ``expect``; return how many."""
    n = 0
    while not stop.is_set():
        off = (n * 7919 % (size // 4096)) * 4096
        block = (n % 251 + 1).to_bytes(1, "little") * 4096
        await c.write(off, block)
        expect[off : off + 4096] = block
        n += 1
        await asyncio.sleep(0)
    return n


async def test_replace_a_linear_node_under_a_writer(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(linear_spec("r", tmp_path, sock)))
        c = await connect(sock)
        expect = bytearray(os.urandom(2 * MiB))
        await c.write(0, bytes(expect))
        stop = asyncio.Event()
        w = asyncio.ensure_future(writer(c, 2 * MiB, expect, stop))
        new = {"type": "file", "name": "n9", "path": str(tmp_path / "n9.img"), "size": 2 * MiB}
        status = await daemon.handle(op.Replace(array="r", node="n1", spec=new))
        assert status["replace"]["state"] in ("copying", "finished")
        array = daemon.arrays["r"]
        await wait_for(lambda: array.status()["replace"]["state"] == "finished", "replace")
        await asyncio.sleep(0.1)  # the writer goes on after the swap
        stop.set()
        assert await w > 0
        assert bytes(await c.read(0, 2 * MiB)) == expect
        st = array.status()
        assert [k["name"] for k in st["root"]["members"]] == ["n0", "n9"]
        assert st["replace"]["regions_done"] == st["replace"]["regions_total"] == 1
        assert [p["name"] for p in st["spec"]["array"]["target"]["members"]] == ["n0", "n9"]
        await c.close()
        await daemon.handle(op.Stop(array="r"))
        assert (tmp_path / "n9.img").read_bytes()[:MiB] == expect[MiB:]
        await daemon.handle(op.Start(array="r"))  # the spec names n9 now
        c = await connect(sock)
        assert bytes(await c.read(0, 2 * MiB)) == expect
        await c.close()
    finally:
        await daemon.close()


async def test_cancel_a_replace_leaves_the_array_as_before(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    daemon = Daemon()
    size = 8 * MiB  # 8 copy regions
    try:
        await daemon.handle(op.Create(linear_spec("c", tmp_path, sock, size)))
        c = await connect(sock)
        expect = bytearray(os.urandom(2 * size))
        await c.write(0, bytes(expect))
        new = {"type": "file", "name": "n9", "path": str(tmp_path / "n9.img"), "size": size}
        await daemon.handle(op.Replace(array="c", node="n0", spec=new))
        # resync-rate applies to a running replace: 64 KiB/s makes the copy take minutes
        await daemon.handle(op.ResyncRate(array="c", rate=64 << 10))
        array = daemon.arrays["c"]
        stop = asyncio.Event()
        w = asyncio.ensure_future(writer(c, 2 * size, expect, stop))
        await asyncio.sleep(0.3)
        assert array.status()["replace"]["state"] == "copying"
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Replace(array="c", node="n1", spec=new))
        assert exc.value.code == "busy"
        await daemon.handle(op.CancelReplace(array="c"))
        await wait_for(lambda: array.status()["replace"]["state"] == "cancelled", "cancel")
        await asyncio.sleep(0.1)
        stop.set()
        await w
        assert bytes(await c.read(0, 2 * size)) == expect
        st = array.status()
        assert [k["name"] for k in st["root"]["members"]] == ["n0", "n1"]
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.CancelReplace(array="c"))
        assert exc.value.code == "not-replacing"
        await c.close()
        await daemon.handle(op.Stop(array="c"))
        assert (tmp_path / "n0.img").read_bytes() == expect[:size]
    finally:
        await daemon.close()


@pytest.mark.parametrize("dead", [False, True])
async def test_replace_a_mirror_leg_under_a_writer(tmp_path: Path, dead: bool) -> None:
    sock = tmp_path / "m.sock"
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(mirror_spec("mr", tmp_path, sock)))
        c = await connect(sock)
        expect = bytearray(os.urandom(c.size))
        await c.write(0, bytes(expect))
        if dead:  # OLD is gone: NEW is rebuilt from the other leg
            await daemon.handle(op.Fail(array="mr", node="leg1"))
        stop = asyncio.Event()
        w = asyncio.ensure_future(writer(c, c.size, expect, stop))
        new = {"type": "file", "name": "leg9", "path": str(tmp_path / "leg9.img"), "size": 4 * MiB}
        await daemon.handle(op.Replace(array="mr", node="leg1", spec=new))
        array = daemon.arrays["mr"]
        await wait_for(lambda: array.status()["replace"]["state"] == "finished", "replace")
        stop.set()
        assert await w > 0
        assert bytes(await c.read(0, c.size)) == expect
        st = array.status()
        assert [(k["name"], k["state"]) for k in st["root"]["members"]] == [
            ("leg0", "in_sync"),
            ("leg9", "in_sync"),
        ]
        await c.close()
        await daemon.handle(op.Stop(array="mr"))
        size = layout_for(4 * MiB, REGION).data_size
        legs = [(tmp_path / f"leg{i}.img").read_bytes()[:size] for i in (0, 9)]
        assert legs[0] == legs[1] == expect
        # The superblocks know the new membership: assembly finds leg0 and leg9.
        found = await probe_all([str(tmp_path / "leg9.img"), str(tmp_path / "leg0.img")])
        doc = assemble_spec(found, listen=[f"unix:{sock}"])
        assert [x["name"] for x in doc["array"]["target"]["members"]] == ["leg0", "leg9"]
    finally:
        await daemon.close()


async def test_grow_a_mirror_to_three_legs_and_back(tmp_path: Path) -> None:
    sock = tmp_path / "g.sock"
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(mirror_spec("g", tmp_path, sock)))
        c = await connect(sock)
        expect = bytearray(os.urandom(c.size))
        await c.write(0, bytes(expect))
        stop = asyncio.Event()
        w = asyncio.ensure_future(writer(c, c.size, expect, stop))
        leg2 = {"type": "file", "name": "leg2", "path": str(tmp_path / "leg2.img"), "size": 4 * MiB}
        status = await daemon.handle(op.Add(array="g", spec=leg2))
        assert [k["name"] for k in status["root"]["members"]] == ["leg0", "leg1", "leg2"]
        array = daemon.arrays["g"]

        def states() -> list[str]:
            return [k["state"] for k in array.status()["root"]["members"]]

        await wait_for(lambda: states() == ["in_sync"] * 3, "leg2 in sync")
        stop.set()
        await w
        assert bytes(await c.read(0, c.size)) == expect
        # Shrink back: leg0 leaves; two legs stay, and fewer is refused.
        status = await daemon.handle(op.Remove(array="g", node="leg0"))
        assert [k["name"] for k in status["root"]["members"]] == ["leg1", "leg2"]
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Remove(array="g", node="leg1"))
        assert exc.value.code == "cannot-remove"
        assert bytes(await c.read(0, c.size)) == expect
        await c.close()
        await daemon.handle(op.Stop(array="g"))
        for i in (1, 2):
            assert leg_data(tmp_path, i) == expect
        await daemon.handle(op.Start(array="g"))  # the spec has leg1 and leg2 now
        st = array.status()
        assert [(k["name"], k["state"]) for k in st["root"]["members"]] == [
            ("leg1", "in_sync"),
            ("leg2", "in_sync"),
        ]
    finally:
        await daemon.close()


@pytest.mark.parametrize("end", ["finish", "cancel"])
async def test_replace_rate_paces_only_the_new_leg(tmp_path: Path, end: str) -> None:
    """``replace --rate`` of a mirror leg limits the new leg's resync, not the mirror's
    resync rate (8 MiB/s here, which would copy the 4 MiB leg at once); a resync-rate of
    the mirror meanwhile stays in force, and when the replace ends only the leg's own
    limit is gone."""
    sock = tmp_path / "rr.sock"
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(mirror_spec("rr", tmp_path, sock)))
        c = await connect(sock)
        expect = os.urandom(c.size)
        await c.write(0, expect)
        array = daemon.arrays["rr"]

        def keeper() -> dict[str, Any]:
            st: dict[str, Any] = array.status()["root"]["detail"]["keeper"]
            return st

        def job() -> dict[str, Any]:
            st: dict[str, Any] = array.status()["replace"]
            return st

        await daemon.handle(op.ResyncRate(array="rr", rate=8 * MiB, mirror="m"))
        new = {"type": "file", "name": "leg9", "path": str(tmp_path / "leg9.img"), "size": 4 * MiB}
        await daemon.handle(op.Replace(array="rr", node="leg1", spec=new, rate=REGION))
        assert keeper()["leg_limits"] == {"leg9": {"max_rate": REGION, "min_rate": None}}
        await asyncio.sleep(0.5)  # at REGION bytes/s: the first span, not yet a second
        assert job()["state"] == "copying" and job()["regions_done"] <= 16, job()
        await daemon.handle(op.ResyncRate(array="rr", rate=16 * MiB, mirror="m"))
        st = keeper()
        assert st["resync_limit"] == {"max_rate": 16 * MiB, "min_rate": None}
        assert st["leg_limits"]["leg9"]["max_rate"] == REGION  # only the mirror's changed
        if end == "cancel":
            await daemon.handle(op.CancelReplace(array="rr"))
            await wait_for(lambda: job()["state"] == "cancelled", "cancel")
            legs = ["leg0", "leg1"]
            limit = {"max_rate": 16 * MiB, "min_rate": None}
        else:  # the whole array's resync-rate changes the running replace too
            await daemon.handle(op.ResyncRate(array="rr", rate=0))
            await wait_for(lambda: job()["state"] == "finished", "replace")
            legs = ["leg0", "leg9"]
            limit = {"max_rate": None, "min_rate": None}
        st = keeper()
        assert (st["leg_limits"], st["resync_limit"]) == ({}, limit)
        assert [(k["name"], k["state"]) for k in array.status()["root"]["members"]] == [
            (legs[0], "in_sync"),
            (legs[1], "in_sync"),
        ]
        assert bytes(await c.read(0, c.size)) == expect
        await c.close()
    finally:
        await daemon.close()
