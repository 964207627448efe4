"""Node and mirror-leg maintenance of a running array: the control plane's verbs that do
not change the array's shape.

Theory of operation
-------------------
Each verb is a function of an :class:`~dst.array.array.Array`: fail, readd,
suspend/resume (a linear or stripe node holds its requests in its gate; a mirror leg is
detached and resynced on resume; the whole array holds in its root), verify and the
resync rate.  Legs are found through the keepers of the redundant targets, nodes in the
running tree; every failure is a :class:`~dst.errors.ControlError` naming the field at
fault.  Reshaping verbs (add, remove, replace) are in :mod:`dst.array.reshape`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dst.array.array import Array
from dst.array.keeper import MirrorKeeper
from dst.errors import BlockError, ConfigError, ControlError
from dst.meta.superblock import MetadataError


def leg(array: Array, node: str) -> tuple[MirrorKeeper, int]:
    """The keeper of the mirror that has ``node`` as a leg, and the leg's index."""
    array.running_root()
    for keeper in array.keepers.values():
        for x in keeper.mirror.legs:
            if x.dev.name == node:
                return keeper, x.index
    array.device(node)  # no-such-node if it does not exist at all
    raise ControlError("not-a-leg", f"{node!r} is not a leg of a mirror", field="node")


def mirror_keepers(array: Array, mirror: str | None) -> list[MirrorKeeper]:
    """The keeper of ``mirror``, or of every mirror of the array."""
    array.running_root()
    if mirror is not None:
        if mirror not in array.keepers:
            raise ControlError(
                "no-such-node", f"no mirror {mirror!r} in {array.name!r}", field="mirror"
            )
        return [array.keepers[mirror]]
    if not array.keepers:
        raise ControlError("not-mirror", f"array {array.name!r} has no mirror", field="array")
    return list(array.keepers.values())


def _is_leg(array: Array, node: str) -> bool:
    return any(x.dev.name == node for k in array.keepers.values() for x in k.mirror.legs)


async def fail(array: Array, node: str) -> None:
    keeper, i = leg(array, node)
    try:
        await keeper.fail(i)
    except ConfigError as exc:
        raise ControlError("last-leg", str(exc), field="node") from None


async def readd(array: Array, node: str, *, full: bool) -> dict[str, Any]:
    keeper, i = leg(array, node)
    try:
        return await keeper.readd(i, full=full)
    except MetadataError as exc:
        raise ControlError("refused", str(exc), field="node") from None
    except ConfigError as exc:
        raise ControlError("not-failed", str(exc), field="node") from None
    except BlockError as exc:
        raise ControlError("node-unreachable", str(exc), field="node") from None


async def suspend(array: Array, node: str | None) -> None:
    """Hold I/O to ``node`` (a mirror leg is detached instead), or to the whole array
    when ``node`` is None."""
    root = array.running_root()
    if node is None:
        if root.suspended:
            raise ControlError("busy", f"{array.name!r} is already suspended")
        array.no_node_suspended()
        await root.suspend()
        return
    dev = array.device(node)
    if dev.node and _is_leg(array, node):
        keeper, i = leg(array, node)
        try:
            await keeper.suspend(i)
        except ConfigError as exc:
            raise ControlError("busy", str(exc), field="node") from None
        return
    if not dev.node:
        raise ControlError("not-a-node", f"{node!r} is not a storage node (a leaf)", field="node")
    try:
        # Draining waits for the node's requests in flight: bounded, and a cancelled
        # suspend resumes the node.
        await asyncio.wait_for(dev.suspend(), array.spec.io_timeout)
    except ConfigError as exc:
        raise ControlError("busy", str(exc), field="node") from None
    except TimeoutError:
        raise ControlError(
            "timeout",
            f"{node!r} did not drain within {array.spec.io_timeout:g}s; not suspended",
            field="node",
        ) from None


async def resume(array: Array, node: str | None) -> None:
    root = array.running_root()
    if node is None:
        if not root.suspended:
            raise ControlError("not-suspended", f"{array.name!r} is not suspended")
        root.resume()
        return
    dev = array.device(node)
    if _is_leg(array, node):
        keeper, i = leg(array, node)
        try:
            await keeper.resume(i)
        except ConfigError as exc:
            raise ControlError("not-suspended", str(exc), field="node") from None
        except MetadataError as exc:
            raise ControlError("refused", str(exc), field="node") from None
        except BlockError as exc:
            raise ControlError("node-unreachable", str(exc), field="node") from None
        return
    if not dev.node or not dev.suspended:
        raise ControlError("not-suspended", f"{node!r} is not suspended", field="node")
    dev.resume()


def verify(array: Array, *, repair: bool, source: str | None, mirror: str | None) -> None:
    if source is not None:
        keeper, index = leg(array, source)
        if mirror is not None and keeper.mirror.name != mirror:
            raise ControlError("bad-args", f"{source!r} is not a leg of {mirror!r}", field="source")
        targets: list[tuple[MirrorKeeper, int | None]] = [(keeper, index)]
    else:
        targets = [(k, None) for k in mirror_keepers(array, mirror)]
    if repair and len(targets) > 1:
        raise ControlError(
            "bad-args", "the array has several mirrors: say which (mirror)", field="mirror"
        )
    for keeper, src in targets:
        try:
            keeper.start_verify(repair=repair, source=src)
        except ConfigError as exc:
            raise ControlError("busy", str(exc), field="array") from None


def resync_rate(array: Array, rate: int, min_rate: int, mirror: str | None) -> None:
    if rate < 0:
        raise ControlError("bad-args", "rate must be >= 0", field="rate")
    if min_rate < 0 or (rate and min_rate > rate):
        raise ControlError("bad-args", "min_rate must be between 0 and rate", field="min_rate")
    job = array.replace_job
    if job is not None and job.running and mirror is None:
        job.set_rate(max_rate=rate or None, min_rate=min_rate or None)
        if not array.keepers:
            return
    for keeper in mirror_keepers(array, mirror):
        keeper.set_rate(max_rate=rate or None, min_rate=min_rate or None)
