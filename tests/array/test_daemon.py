"""The array daemon in process: status tree, create/stop/start, errors as codes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dst.array.daemon import Daemon
from dst.control import operations as op
from dst.control.client import ControlClient
from dst.errors import ControlError
from dst.meta.layout import layout_for
from dst.net.client import NbdClient

pytestmark = pytest.mark.timeout(30)
MiB = 1 << 20
NODE_KEYS = {"name", "type", "where", "start", "size", "state", "counters", "detail", "members"}


def spec(name: str, target: dict[str, Any], sock: Path | None = None) -> dict[str, Any]:
    listen = [f"unix:{sock}"] if sock is not None else []
    return {"array": {"name": name, "listen": listen, "target": target}}


def linear_of_files(tmp: Path) -> dict[str, Any]:
    return {
        "type": "linear",
        "members": [
            {"type": "file", "name": "f0", "path": str(tmp / "f0.img"), "size": 2 * MiB},
            {
                "type": "file",
                "name": "f1",
                "path": str(tmp / "f1.img"),
                "size": 4 * MiB,
                "start": MiB,
            },
        ],
    }


MIRROR = {
    "type": "mirror",
    "members": [{"type": "memory", "size": MiB}, {"type": "memory", "size": MiB}],
}


def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for kid in node["members"] for n in walk(kid))]


async def test_status_tree_shape(tmp_path: Path, sock_dir: Path) -> None:
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(spec("lin", linear_of_files(tmp_path), sock_dir / "l.sock")))
        await daemon.handle(op.Create(spec("mir", MIRROR)))
        status = daemon.status()
        lin, mir = status["arrays"]
        assert (lin["name"], lin["state"], lin["algorithm"]) == ("lin", "running", "linear")
        assert lin["size"] == 5 * MiB
        assert lin["exports"] == [f"nbd+unix:///?socket={sock_dir / 'l.sock'}"]
        assert lin["suspended"] is False and lin["held"] == 0
        for node in walk(lin["root"]) + walk(mir["root"]):
            assert set(node) == NODE_KEYS, node
        kids = lin["root"]["members"]
        assert [(k["name"], k["type"], k["start"], k["size"], k["state"]) for k in kids] == [
            ("f0", "file", 0, 2 * MiB, "connected"),
            ("f1", "file", 2 * MiB, 4 * MiB, "connected"),
        ]
        assert kids[1]["where"] == str(tmp_path / "f1.img")
        assert kids[0]["counters"]["writes"] == 0
        assert lin["root"]["counters"] is None  # composites have no counters of their own
        # the mirror's metadata (superblocks, bitmap) sits at the end of each member
        assert mir["algorithm"] == "mirror" and mir["size"] == layout_for(MiB).data_size
        assert [k["name"] for k in walk(mir["root"])] == ["node0", "node1", "node2"]
        assert [k["state"] for k in mir["root"]["members"]] == ["in_sync", "in_sync"]
        assert daemon.status("mir") == {"arrays": [mir]}
        assert lin["spec"]["array"]["target"]["members"][1]["start"] == MiB
    finally:
        await daemon.close()


async def test_create_stop_start_keeps_data(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "l.sock"
    daemon = Daemon(str(sock_dir / "control.sock"))
    await daemon.start()
    try:
        async with await ControlClient.connect(sock_dir / "control.sock") as ctl:
            created = await ctl.call(
                "create", {"spec": spec("lin", linear_of_files(tmp_path), sock)}
            )
            assert created["state"] == "running"
            data = os.urandom(2 * MiB)
            async with await NbdClient.connect(created["exports"][0]) as c:
                assert c.size == 5 * MiB
                await c.write(MiB, data, fua=True)  # across the member boundary
            stopped = await ctl.call("stop", {"array": "lin"})
            assert (stopped["state"], stopped["exports"], stopped["size"]) == ("stopped", [], 0)
            assert not sock.exists()
            f0, f1 = (tmp_path / "f0.img").read_bytes(), (tmp_path / "f1.img").read_bytes()
            assert f0[MiB:] == data[:MiB] and f1[MiB : 2 * MiB] == data[MiB:]
            started = await ctl.call("start", {"array": "lin"})
            assert started["state"] == "running"
            async with await NbdClient.connect(started["exports"][0]) as c:
                assert await c.read(MiB, 2 * MiB) == data
            with pytest.raises(ControlError) as exc:
                await ctl.call("create", {"spec": spec("lin", MIRROR)})
            assert exc.value.code == "exists"
            with pytest.raises(ControlError) as exc:
                await ctl.call("stop", {"array": "other"})
            assert (exc.value.code, exc.value.field) == ("no-such-array", "array")
    finally:
        await daemon.close()
    assert not (sock_dir / "control.sock").exists()


async def test_duplicate_name_and_bad_spec() -> None:
    daemon = Daemon()
    try:
        await daemon.handle(op.Create(spec("a", MIRROR)))
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Create(spec("a", MIRROR)))
        assert exc.value.code == "exists"
        bad = {"type": "stripe", "chunk_size": 3000, "members": MIRROR["members"]}
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Create(spec("b", bad)))
        assert (exc.value.code, exc.value.field) == ("bad-spec", "spec.array.target.chunk_size")
        assert [a["name"] for a in daemon.status()["arrays"]] == ["a"]
    finally:
        await daemon.close()


async def test_live_add_and_remove_in_process(tmp_path: Path) -> None:
    daemon = Daemon()
    try:
        target = {"type": "linear", "members": [{"type": "memory", "name": "m0", "size": MiB}]}
        await daemon.handle(op.Create(spec("g", target)))
        grown = await daemon.handle(
            op.Add(array="g", spec={"type": "memory", "name": "m1", "size": "2M"})
        )
        assert grown["size"] == 3 * MiB
        assert [(k["name"], k["start"]) for k in grown["root"]["members"]] == [
            ("m0", 0),
            ("m1", MiB),
        ]
        shrunk = await daemon.handle(op.Remove(array="g", node="m1"))
        assert shrunk["size"] == MiB
        with pytest.raises(ControlError) as exc:
            await daemon.handle(op.Remove(array="g", node="m0"))
        assert exc.value.code == "cannot-remove" and "only node" in str(exc.value)
    finally:
        await daemon.close()
