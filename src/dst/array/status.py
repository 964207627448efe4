"""The status tree of an array, read off the running devices.

Shape (JSON-able), one node per device::

    NODE = {"name", "type", "where", "start", "size", "state",
            "counters": {...} | None, "detail": {...}, "members": [NODE, ...]}

``type`` is the device's kind (linear, stripe, mirror, file, memory, remote, replace);
``where`` a node's path or URI; ``start`` a linear member's offset in its parent (else
null); ``state`` one word: connected / in_sync / failed / resyncing / suspended /
reconnecting / ok / degraded (stopped, for an array that is not running).  What a parent
says of a child (a mirror leg's state, a linear member's start) comes from the parent's
:meth:`~dst.device.BlockDevice.member_info`; nothing here names a concrete target.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from dst.array.keeper import MirrorKeeper
from dst.array.spec import TargetSpec, children
from dst.device import BlockDevice, Health


def node_status(
    dev: BlockDevice,
    *,
    keepers: Mapping[str, MirrorKeeper],
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The status of ``dev`` and everything below it; ``info`` is what its parent says
    of it (see :meth:`~dst.device.BlockDevice.member_info`)."""
    info = info or {}
    health = dev.health()
    state = state_of(dev, info, health)
    node: dict[str, Any] = {
        "name": dev.name,
        "type": dev.kind,
        "where": dev.where,
        "start": info.get("start"),
        "size": dev.size,
        "state": state,
        "counters": dev.counters.as_dict() if dev.node and dev.counters is not None else None,
        "detail": jsonable(health.detail),
        "members": [],
    }
    infos = member_infos(dev, keepers)
    keeper = keepers.get(dev.name)
    if keeper is not None and keeper.keeps(dev):
        node["detail"]["keeper"] = jsonable(keeper.status())
    node["members"] = [
        node_status(kid, keepers=keepers, info=kinfo)
        for kid, kinfo in zip(dev.children(), infos, strict=True)
    ]
    return node


def state_of(dev: BlockDevice, info: Mapping[str, Any], health: Health | None = None) -> str:
    """The one word status gives ``dev``, ``info`` being what its parent says of it."""
    if dev.node and dev.suspended:
        return "suspended"
    return str(info.get("state") or (health or dev.health()).state)


def member_infos(dev: BlockDevice, keepers: Mapping[str, MirrorKeeper]) -> list[dict[str, Any]]:
    """What ``dev`` says of each of its children (a leg its keeper suspended: so)."""
    infos = dev.member_info()
    keeper = keepers.get(dev.name)
    if keeper is not None and keeper.keeps(dev):
        for i in keeper.suspended:
            if i < len(infos):
                infos[i] = {**infos[i], "state": "suspended"}
    return infos


def walk(
    root: BlockDevice, *, keepers: Mapping[str, MirrorKeeper]
) -> Iterator[tuple[BlockDevice, BlockDevice | None, str]]:
    """Every device of the tree under ``root`` (root first, depth first) with its parent
    and its state as :func:`node_status` says it."""
    stack: list[tuple[BlockDevice, BlockDevice | None, Mapping[str, Any]]] = [(root, None, {})]
    while stack:
        dev, parent, info = stack.pop()
        yield dev, parent, state_of(dev, info)
        kids = list(zip(dev.children(), member_infos(dev, keepers), strict=True))
        stack.extend((kid, dev, kinfo) for kid, kinfo in reversed(kids))


def stopped_status(t: TargetSpec) -> dict[str, Any]:
    """The status tree of an array that does not run: its spec, every node stopped."""
    return {
        "name": t.name,
        "type": t.KIND,
        "where": "",
        "start": None,
        "size": 0,
        "state": "stopped",
        "counters": None,
        "detail": {},
        "members": [stopped_status(k) for k in children(t)],
    }


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
