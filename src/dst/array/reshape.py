"""Reshaping a running array: grow, shrink, replace a node, all live.

Theory of operation
-------------------
Every change is build-new -> suspend -> swap -> resume on the array's root gate, so no
request fails because of it, and the array's spec is updated only once the change is
in place (it always describes what runs).  ``add``: a linear array appends the node; a
stripe becomes a linear array of the stripe and the node (no restripe); a mirror gets a
new leg, resynced in the background.  ``remove``: the last node of a linear array, or a
mirror leg (two stay).  ``replace``: see :mod:`dst.array.replacing`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from dst.array.build import construct, index
from dst.array.ops import Maintenance, bad_spec
from dst.array.replacing import ReplaceJob
from dst.array.spec import (
    LinearPart,
    LinearSpec,
    MirrorSpec,
    StripeSpec,
    TargetSpec,
    linear_part_from_dict,
    parent_of,
    replace_node,
    target_from_dict,
    walk,
)
from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError, ControlError
from dst.meta.superblock import MetadataError
from dst.targets.gate import GateDevice
from dst.targets.linear import LinearDevice
from dst.targets.member import Member
from dst.targets.mirror import MirrorDevice
from dst.targets.stripe import StripeDevice


class Reshape(Maintenance):
    """add, remove, replace, cancel-replace."""

    async def replace(self, node: str, new: dict[str, Any], *, rate: int = 0) -> None:
        """Start replacing ``node`` by the node ``new`` (a spec dict), live.

        ``rate`` (bytes/s, 0: none) limits the copy.  For a mirror leg it limits the
        new leg's resync only (the mirror's resync rate, which applies without it, is
        left as it is); a ``resync-rate`` of the whole array changes it while it runs.
        """
        if rate < 0:
            raise ControlError("bad-args", "rate must be >= 0", field="rate")
        async with self._lock:
            root = self._running_root()
            self._no_node_suspended()
            if self.replace_job is not None and self.replace_job.running:
                raise ControlError(
                    "busy", f"{self.replace_job.old.name!r} is being replaced", field="node"
                )
            old = self._node(node)
            parent_spec = parent_of(self.spec, node)
            if not isinstance(old, Member) or parent_spec is None:
                raise ControlError(
                    "not-a-node",
                    f"{node!r} is not a storage node of a linear, stripe or mirror target",
                    field="node",
                )
            taken = [t.name for t in walk(self.spec.target)]
            try:
                target = target_from_dict(new, taken=taken)
                dev = construct(target, io_timeout=self.spec.io_timeout,
                                replay=not isinstance(parent_spec, MirrorSpec))  # fmt: skip
            except ConfigError as exc:
                raise bad_spec(exc) from None
            try:
                await dev.open()
            except BlockError as exc:
                await dev.close()
                raise ControlError("node-unreachable", str(exc), field="spec") from None
            parent = index(root.inner)[parent_spec.name]
            hi, lo = self._resync_rates(parent_spec.name)
            keeper = self.keepers.get(parent.name)
            resyncer = keeper.resyncer if keeper is not None and keeper.mirror is parent else None
            if resyncer is not None:  # its floor under load as it is now
                lo = int(resyncer.limit.min_rate or 0)
            if rate:
                hi, lo = rate, min(lo, rate)

            def finished(job: ReplaceJob) -> None:
                if job.state == "finished":
                    self.spec = dataclasses.replace(
                        self.spec, target=replace_node(self.spec.target, node, target)
                    )
                    self._refresh_keepers()

            try:
                job = ReplaceJob(root, parent, old, dev, on_finished=finished,
                                 max_rate=hi or None, min_rate=lo or None,
                                 resyncer=resyncer if rate else None)  # fmt: skip
                await job.start()
            except (ConfigError, BlockError, MetadataError) as exc:
                await dev.close()
                raise ControlError("bad-spec", str(exc), field="spec") from None
            self._refresh_keepers()
            self.replace_job = job

    def cancel_replace(self) -> None:
        self._running_root()
        job = self.replace_job
        if job is None or not job.running:
            raise ControlError("not-replacing", f"no replace is running in {self.name!r}")
        job.cancel()

    async def add(self, node: dict[str, Any]) -> None:
        """Grow the array live by the node ``node`` (a spec dict).

        Linear: the node is appended.  Stripe: the array becomes a linear array of the
        stripe and the node (a new segment; the stripe is not restriped).  Mirror: the
        node is a new leg, resynced in the background (the size does not change).
        """
        async with self._lock:
            root = self._running_root()
            self._no_node_suspended()
            tree, target = root.inner, self.spec.target
            if isinstance(tree, MirrorDevice) and isinstance(target, MirrorSpec):
                await self._add_leg(root, tree, target, node)
                return
            grow_stripe = isinstance(target, StripeSpec) and isinstance(tree, StripeDevice)
            if not grow_stripe and not (
                isinstance(tree, LinearDevice) and isinstance(target, LinearSpec)
            ):
                raise ControlError(
                    "cannot-grow",
                    f"array {self.name!r} is a {target.KIND} of targets: only linear, stripe "
                    "and mirror arrays of nodes grow by a node",
                    field="array",
                )
            taken = [t.name for t in walk(target)]
            try:
                part = linear_part_from_dict(node, taken=taken)
                dev = construct(part.target, io_timeout=self.spec.io_timeout)
            except ConfigError as exc:
                raise bad_spec(exc) from None
            try:
                await dev.open()
            except BlockError as exc:
                await dev.close()
                raise ControlError("node-unreachable", str(exc), field="spec") from None
            try:
                if isinstance(tree, LinearDevice) and isinstance(target, LinearSpec):
                    await root.reconfigure(lambda: tree.append(dev, part.start, part.length))
                    new_target: TargetSpec = dataclasses.replace(
                        target, members=(*target.members, part)
                    )
                else:
                    new_target = await self._stripe_to_linear(root, dev, part, taken)
            except ConfigError as exc:
                await dev.close()
                raise ControlError("bad-spec", str(exc), field="spec") from None
            self.spec = dataclasses.replace(self.spec, target=new_target)

    async def _add_leg(
        self, root: GateDevice, mirror: MirrorDevice, target: MirrorSpec, node: dict[str, Any]
    ) -> None:
        """A new leg for the mirror at the root, resynced in the background."""
        try:
            leg = target_from_dict(node, taken=[t.name for t in walk(target)])
            dev = construct(leg, io_timeout=self.spec.io_timeout, replay=False)
        except ConfigError as exc:
            raise bad_spec(exc) from None

        async def add() -> None:
            await mirror.add_leg(dev)

        try:
            await root.reconfigure(add)
        except (BlockError, MetadataError) as exc:
            await dev.close()
            raise ControlError("node-unreachable", str(exc), field="spec") from None
        except ConfigError as exc:
            await dev.close()
            raise ControlError("bad-spec", str(exc), field="spec") from None
        self.spec = dataclasses.replace(
            self.spec, target=dataclasses.replace(target, members=(*target.members, leg))
        )
        self._refresh_keepers()

    async def _remove_leg(self, root: GateDevice, mirror: MirrorDevice, node: str) -> None:
        _, index = self._leg(node)
        removed: list[BlockDevice] = []

        async def remove() -> None:
            removed.append(await mirror.remove_leg(index))

        try:
            await root.reconfigure(remove)
        except ConfigError as exc:
            raise ControlError("cannot-remove", str(exc), field="node") from None
        for dev in removed:
            with contextlib.suppress(BlockError, OSError):
                await dev.close()
        self.spec = dataclasses.replace(
            self.spec, target=replace_node(self.spec.target, node, None)
        )
        self._refresh_keepers()

    async def _stripe_to_linear(
        self, root: GateDevice, dev: BlockDevice, part: LinearPart, taken: list[str]
    ) -> TargetSpec:
        """Grow a stripe array by a linear segment: linear(stripe, dev)."""
        stripe, target = root.inner, self.spec.target
        assert isinstance(target, StripeSpec)
        if not all(isinstance(k, Member) for k in stripe.children()):
            # Opening the new linear re-opens the stripe, harmless only for leaves.
            raise ConfigError("only a stripe of nodes can grow by a segment", where="array")
        name = next(n for n in (f"{self.name}-grown", *(f"grown{i}" for i in range(99)))
                    if n not in taken)  # fmt: skip
        grown = LinearDevice(
            [stripe, dev], starts=[0, part.start], sizes=[None, part.length], name=name
        )
        await grown.open()

        def swap() -> None:
            root.swap(grown)

        await root.reconfigure(swap)
        return LinearSpec(name=name, members=(LinearPart(target=target), part))

    async def remove(self, node: str) -> None:
        """Remove the last member of a linear array (it shrinks), or a mirror leg, live."""
        async with self._lock:
            root = self._running_root()
            self._no_node_suspended()
            linear, target = root.inner, self.spec.target
            if isinstance(linear, MirrorDevice) and isinstance(target, MirrorSpec):
                await self._remove_leg(root, linear, node)
                return
            if not isinstance(linear, LinearDevice) or not isinstance(target, LinearSpec):
                raise ControlError(
                    "not-linear", f"array {self.name!r} is not linear", field="array"
                )
            if target.members[-1].target.name != node:
                if all(p.target.name != node for p in target.members):
                    raise ControlError(
                        "no-such-node", f"no node {node!r} in {self.name!r}", field="node"
                    )
                raise ControlError(
                    "not-last",
                    f"only the last node ({target.members[-1].target.name!r}) can be removed",
                    field="node",
                )
            if len(target.members) == 1:
                raise ControlError(
                    "not-last", "cannot remove the only node of an array", field="node"
                )
            removed: list[BlockDevice] = []
            await root.reconfigure(lambda: removed.append(linear.remove_last()))
            for dev in removed:
                await dev.close()
            self.spec = dataclasses.replace(
                self.spec, target=dataclasses.replace(target, members=target.members[:-1])
            )
