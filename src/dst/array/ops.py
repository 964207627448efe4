"""Node and mirror-leg maintenance of a running array (the control plane's verbs).

Theory of operation
-------------------
:class:`ArrayBase` is what every operation needs of an :class:`~dst.array.daemon.Array`:
its spec, running tree (under the root :class:`~dst.targets.gate.GateDevice`), mirror
keepers and the lock that serialises reconfigurations.  :class:`Maintenance` adds the
verbs that act on one node or mirror leg without changing the array's shape: fail,
readd, suspend/resume (a linear/stripe node holds its requests in its member's gate; a
mirror leg is detached and resynced on resume; the whole array holds in the root),
verify and the resync rate.  Reshaping verbs (add, remove, replace) are in
:mod:`dst.array.reshape`.  Every failure is a :class:`~dst.errors.ControlError` naming
the field at fault.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dst.array.build import index
from dst.array.keeper import MirrorKeeper
from dst.array.replacing import ReplaceJob
from dst.array.spec import (
    ArraySpec,
    MirrorSpec,
    SpecError,
    find_node,
)
from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError, ControlError
from dst.meta.superblock import MetadataError
from dst.targets.gate import GateDevice
from dst.targets.member import Member

log = logging.getLogger(__name__)


def bad_spec(exc: ConfigError) -> ControlError:
    key = exc.key if isinstance(exc, SpecError) else ""
    return ControlError("bad-spec", str(exc), field=f"spec.{key}" if key else "spec")


class ArrayBase:
    """The state an array's operations share (set up by ``Array.__init__``)."""

    spec: ArraySpec
    root: GateDevice | None
    keepers: dict[str, MirrorKeeper]  # by mirror name
    replace_job: ReplaceJob | None  # the running (or last) replace
    _lock: asyncio.Lock  # one reconfiguration at a time

    @property
    def name(self) -> str:
        return self.spec.name

    def _running_root(self) -> GateDevice:
        if self.root is None:
            raise ControlError("not-running", f"array {self.name!r} is not running")
        return self.root

    def _resync_rates(self, mirror: str) -> tuple[int, int]:
        t = find_node(self.spec, mirror)
        if isinstance(t, MirrorSpec):
            return t.resync_rate, t.resync_min_rate
        return 0, 0

    def _no_node_suspended(self) -> None:
        """Refuse what suspends the root while a node holds requests: the root's drain
        would wait for them until that node is resumed."""
        for dev in index(self._running_root().inner).values():
            if isinstance(dev, Member) and dev.suspended:
                raise ControlError(
                    "busy", f"node {dev.name!r} is suspended: resume it first", field="node"
                )

    def _refresh_keepers(self) -> None:
        for keeper in self.keepers.values():
            keeper.refresh()


class Maintenance(ArrayBase):
    """fail, readd, suspend, resume, verify, resync-rate."""

    def _leg(self, node: str) -> tuple[MirrorKeeper, int]:
        """The keeper of the mirror that has ``node`` as a leg, and the leg's index."""
        self._running_root()
        for keeper in self.keepers.values():
            for leg in keeper.mirror.legs:
                if leg.dev.name == node:
                    return keeper, leg.index
        if find_node(self.spec, node) is None:
            raise ControlError("no-such-node", f"no node {node!r} in {self.name!r}", field="node")
        raise ControlError(
            "not-a-leg", f"{node!r} is not a leg of a mirror with metadata", field="node"
        )

    def _keepers(self, mirror: str | None) -> list[MirrorKeeper]:
        self._running_root()
        if mirror is not None:
            if mirror not in self.keepers:
                raise ControlError(
                    "no-such-node", f"no mirror {mirror!r} in {self.name!r}", field="mirror"
                )
            return [self.keepers[mirror]]
        if not self.keepers:
            raise ControlError(
                "not-mirror", f"array {self.name!r} has no mirror with metadata", field="array"
            )
        return list(self.keepers.values())

    async def fail(self, node: str) -> None:
        keeper, i = self._leg(node)
        try:
            await keeper.fail(i)
        except ConfigError as exc:
            raise ControlError("last-leg", str(exc), field="node") from None

    async def readd(self, node: str, *, full: bool) -> dict[str, Any]:
        keeper, i = self._leg(node)
        try:
            return await keeper.readd(i, full=full)
        except MetadataError as exc:
            raise ControlError("refused", str(exc), field="node") from None
        except ConfigError as exc:
            raise ControlError("not-failed", str(exc), field="node") from None
        except BlockError as exc:
            raise ControlError("node-unreachable", str(exc), field="node") from None

    async def suspend(self, node: str | None) -> None:
        """Hold I/O to ``node`` (a mirror leg is detached instead), or to the whole
        array when ``node`` is None."""
        root = self._running_root()
        if node is None:
            if root.suspended:
                raise ControlError("busy", f"{self.name!r} is already suspended")
            self._no_node_suspended()
            await root.suspend()
            return
        dev = self._node(node)
        if isinstance(dev, Member) and self._is_leg(node):
            keeper, i = self._leg(node)
            try:
                await keeper.suspend(i)
            except ConfigError as exc:
                raise ControlError("busy", str(exc), field="node") from None
            return
        if not isinstance(dev, Member):
            raise ControlError(
                "not-a-node", f"{node!r} is not a storage node (a leaf)", field="node"
            )
        try:
            # Draining waits for the node's requests in flight: bounded, and a
            # cancelled suspend resumes the node.
            await asyncio.wait_for(dev.suspend(), self.spec.io_timeout)
        except ConfigError as exc:
            raise ControlError("busy", str(exc), field="node") from None
        except TimeoutError:
            raise ControlError(
                "timeout",
                f"{node!r} did not drain within {self.spec.io_timeout:g}s; not suspended",
                field="node",
            ) from None

    async def resume(self, node: str | None) -> None:
        root = self._running_root()
        if node is None:
            if not root.suspended:
                raise ControlError("not-suspended", f"{self.name!r} is not suspended")
            root.resume()
            return
        dev = self._node(node)
        if self._is_leg(node):
            keeper, i = self._leg(node)
            try:
                await keeper.resume(i)
            except ConfigError as exc:
                raise ControlError("not-suspended", str(exc), field="node") from None
            except MetadataError as exc:
                raise ControlError("refused", str(exc), field="node") from None
            except BlockError as exc:
                raise ControlError("node-unreachable", str(exc), field="node") from None
            return
        if not isinstance(dev, Member) or not dev.suspended:
            raise ControlError("not-suspended", f"{node!r} is not suspended", field="node")
        dev.resume()

    def _node(self, node: str) -> BlockDevice:
        root = self._running_root()
        dev = index(root.inner).get(node)
        if dev is None:
            raise ControlError("no-such-node", f"no node {node!r} in {self.name!r}", field="node")
        return dev

    def _is_leg(self, node: str) -> bool:
        return any(leg.dev.name == node for k in self.keepers.values() for leg in k.mirror.legs)

    def verify(self, *, repair: bool, source: str | None, mirror: str | None) -> None:
        if source is not None:
            keeper, index = self._leg(source)
            if mirror is not None and keeper.mirror.name != mirror:
                raise ControlError(
                    "bad-args", f"{source!r} is not a leg of {mirror!r}", field="source"
                )
            targets: list[tuple[MirrorKeeper, int | None]] = [(keeper, index)]
        else:
            targets = [(k, None) for k in self._keepers(mirror)]
        if repair and len(targets) > 1:
            raise ControlError(
                "bad-args", "the array has several mirrors: say which (mirror)", field="mirror"
            )
        for keeper, src in targets:
            try:
                keeper.start_verify(repair=repair, source=src)
            except ConfigError as exc:
                raise ControlError("busy", str(exc), field="array") from None

    def resync_rate(self, rate: int, min_rate: int, mirror: str | None) -> None:
        if rate < 0:
            raise ControlError("bad-args", "rate must be >= 0", field="rate")
        if min_rate < 0 or (rate and min_rate > rate):
            raise ControlError("bad-args", "min_rate must be between 0 and rate", field="min_rate")
        job = self.replace_job
        if job is not None and job.running and mirror is None:
            job.set_rate(max_rate=rate or None, min_rate=min_rate or None)
            if not self.keepers:
                return
        for keeper in self._keepers(mirror):
            keeper.set_rate(max_rate=rate or None, min_rate=min_rate or None)
