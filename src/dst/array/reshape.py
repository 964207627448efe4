"""Reshaping a running array: grow, shrink, replace a node, all live.

Theory of operation
-------------------
Every change is build-new -> suspend -> swap -> resume on the array's root gate, so no
request fails because of it.  The running tree decides what a change means, through
the reconfiguration interface of :class:`~dst.device.BlockDevice` (``add_member``,
``remove_member``, ``replace_child``): a linear target appends or drops its last
segment, a mirror gains or loses a leg (resynced in the background); a target that
cannot grow in place (a stripe of nodes) becomes a linear array of itself and the new
node (no restripe).  ``replace``: see :mod:`dst.array.replacing`.  The array's spec is
the running tree's, so nothing here edits a spec.
"""

from __future__ import annotations

import contextlib
from typing import Any

from dst.array.array import Array, bad_spec
from dst.array.build import construct, index
from dst.array.replacing import ReplaceJob
from dst.array.spec import LinearPart
from dst.array.specdict import linear_part_from_dict, target_from_dict
from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError, ControlError, Unsupported
from dst.meta.superblock import MetadataError
from dst.targets.gate import GateDevice
from dst.targets.linear import LinearDevice
from dst.targets.redundant import Redundant


def _taken(root: GateDevice) -> list[str]:
    return list(index(root.inner))


async def _open(dev: BlockDevice) -> None:
    try:
        await dev.open()
    except BlockError as exc:
        await dev.close()
        raise ControlError("node-unreachable", str(exc), field="spec") from None


async def add(array: Array, node: dict[str, Any]) -> None:
    """Grow the array live by the node ``node`` (a spec dict, see the module docstring)."""
    async with array.lock:
        root = array.running_root()
        array.no_node_suspended()
        tree = root.inner
        redundant = isinstance(tree, Redundant)
        try:
            part = linear_part_from_dict(node, taken=_taken(root))
            dev = construct(part.target, io_timeout=array.spec.io_timeout, replay=not redundant)
        except ConfigError as exc:
            raise bad_spec(exc) from None
        if not redundant:  # a joining leg is opened (and checked) by the mirror itself
            await _open(dev)
        try:
            await root.reconfigure(
                lambda: tree.add_member(dev, start=part.start, length=part.length)
            )
        except (BlockError, MetadataError) as exc:
            await dev.close()
            raise ControlError("node-unreachable", str(exc), field="spec") from None
        except Unsupported as exc:
            if not tree.children() or not all(c.node for c in tree.children()):
                await dev.close()
                raise ControlError("cannot-grow", str(exc), field="array") from None
            await _grow_by_a_segment(array, root, dev, part)
        except ConfigError as exc:
            await dev.close()
            raise ControlError("bad-spec", str(exc), field="spec") from None
        array.refresh_keepers()


async def _grow_by_a_segment(
    array: Array, root: GateDevice, dev: BlockDevice, part: LinearPart
) -> None:
    """Grow a target that cannot grow in place (a stripe of nodes): linear(it, dev).
    Opening the new linear opens its members again, harmless for nodes only."""
    taken = _taken(root)
    name = next(n for n in (f"{array.name}-grown", *(f"grown{i}" for i in range(99)))
                if n not in taken)  # fmt: skip
    grown = LinearDevice(
        [root.inner, dev], starts=[0, part.start], sizes=[None, part.length], name=name
    )

    def swap() -> None:
        root.swap(grown)

    try:
        await grown.open()
        await root.reconfigure(swap)
    except ConfigError as exc:
        await dev.close()
        raise ControlError("bad-spec", str(exc), field="spec") from None


async def remove(array: Array, node: str) -> None:
    """Shrink the array live by ``node``: the last member of a linear array, or a
    mirror leg (two stay)."""
    async with array.lock:
        root = array.running_root()
        array.no_node_suspended()
        tree = root.inner
        if not any(c.name == node for c in tree.children()):
            array.device(node)  # no-such-node
            raise ControlError(
                "cannot-remove", f"{node!r} is not a member of the array's top target",
                field="node",
            )  # fmt: skip
        removed: list[BlockDevice] = []

        async def change() -> None:
            removed.append(await tree.remove_member(node))

        try:
            await root.reconfigure(change)
        except ConfigError as exc:
            raise ControlError("cannot-remove", str(exc), field="node") from None
        for dev in removed:
            with contextlib.suppress(BlockError, OSError):
                await dev.close()
        array.refresh_keepers()


async def replace(array: Array, node: str, new: dict[str, Any], *, rate: int = 0) -> None:
    """Start replacing ``node`` by the node ``new`` (a spec dict), live.

    ``rate`` (bytes/s, 0: none) limits the copy.  For a mirror leg it limits the new
    leg's resync only (the mirror's resync rate, which applies without it, is left as it
    is); a ``resync-rate`` of the whole array changes it while it runs.
    """
    if rate < 0:
        raise ControlError("bad-args", "rate must be >= 0", field="rate")
    async with array.lock:
        root = array.running_root()
        array.no_node_suspended()
        job = array.replace_job
        if job is not None and job.running:
            raise ControlError("busy", f"{job.old.name!r} is being replaced", field="node")
        old = array.device(node)
        parent = array.parent(node)
        if not old.node or parent is None:
            raise ControlError(
                "not-a-node",
                f"{node!r} is not a storage node of a linear, stripe or mirror target",
                field="node",
            )
        redundant = isinstance(parent, Redundant)
        try:
            target = target_from_dict(new, taken=_taken(root))
            dev = construct(target, io_timeout=array.spec.io_timeout, replay=not redundant)
        except ConfigError as exc:
            raise bad_spec(exc) from None
        await _open(dev)
        keeper = array.keepers.get(parent.name)
        resyncer = keeper.resyncer if keeper is not None and keeper.keeps(parent) else None
        hi = lo = 0
        if isinstance(parent, Redundant):
            hi, lo = parent.resync_rate, parent.resync_min_rate
        if resyncer is not None:  # its floor under load as it is now
            lo = int(resyncer.limit.min_rate or 0)
        if rate:
            hi, lo = rate, min(lo, rate)
        try:
            job = ReplaceJob(root, parent, old, dev, on_finished=lambda _: array.refresh_keepers(),
                             max_rate=hi or None, min_rate=lo or None,
                             resyncer=resyncer if rate else None)  # fmt: skip
            await job.start()
        except (ConfigError, BlockError, MetadataError) as exc:
            await dev.close()
            raise ControlError("bad-spec", str(exc), field="spec") from None
        array.refresh_keepers()
        array.replace_job = job


def cancel_replace(array: Array) -> None:
    array.running_root()
    job = array.replace_job
    if job is None or not job.running:
        raise ControlError("not-replacing", f"no replace is running in {array.name!r}")
    job.cancel()
