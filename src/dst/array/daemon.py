"""The array daemon: arrays built from specs, exported over NBD, run over a control socket.

Theory of operation
-------------------
An :class:`Array` owns one spec, the device tree built from it (under a
:class:`~dst.array.switch.SwitchDevice`, the gate that makes live reconfiguration
possible) and the :class:`~dst.net.server.NbdServer` exporting it.  Its life is
created -> running -> stopped (and running again on ``start``).  Growing a linear
array is build-new -> suspend -> swap -> resume: the new member is connected and
opened first, so the only pause I/O sees is the swap of a table.

The :class:`Daemon` holds the arrays and answers control requests
(:mod:`dst.control.messages`); every failure is a :class:`ControlError` with a stable
code (``no-such-array``, ``exists``, ``bad-spec``, ``cannot-grow``, ``not-linear``, ``not-last``,
``not-running``, ``node-unreachable``, ``busy``).

Status shape (``status`` op), JSON-able::

    {"arrays": [{"name", "state", "algorithm", "size", "exports": [uri, ...],
                 "suspended", "held", "root": NODE}]}
    NODE = {"name", "type", "where", "start", "size", "state",
            "counters": {...} | None, "detail": {...}, "members": [NODE, ...]}

``type`` is linear|stripe|mirror|file|memory|remote; ``where`` the path or URI of a
leaf; ``start`` a linear member's offset in its parent (else null); ``state`` one
word: connected / in_sync / failed / resyncing / disconnected / ok / degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from dst.array.build import build, construct, index
from dst.array.keeper import MirrorKeeper, keepers
from dst.array.member import Member
from dst.array.replacing import ReplaceJob
from dst.array.spec import (
    ArraySpec,
    LinearPart,
    LinearSpec,
    MemorySpec,
    MirrorSpec,
    SpecError,
    StripeSpec,
    TargetSpec,
    children,
    find_node,
    linear_part_from_dict,
    parent_of,
    replace_node,
    spec_from_dict,
    spec_to_dict,
    target_from_dict,
    walk,
)
from dst.array.switch import SwitchDevice
from dst.control import messages as m
from dst.control.server import ControlServer
from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError, ControlError
from dst.meta.superblock import MetadataError
from dst.net.server import NbdServer
from dst.targets.linear import LinearDevice
from dst.targets.mirror import MirrorDevice
from dst.targets.stripe import StripeDevice

log = logging.getLogger(__name__)

STOP_FLUSH_TIMEOUT = 5.0  # seconds the final flush of a stopping array may take


def _bad_spec(exc: ConfigError) -> ControlError:
    key = exc.key if isinstance(exc, SpecError) else ""
    return ControlError("bad-spec", str(exc), field=f"spec.{key}" if key else "spec")


class Array:
    """One array: spec, device tree, NBD export."""

    def __init__(self, spec: ArraySpec) -> None:
        self.spec = spec
        self.state = "created"
        self.root: SwitchDevice | None = None
        self.server: NbdServer | None = None
        self.exports: list[str] = []
        self.keepers: dict[str, MirrorKeeper] = {}  # by mirror name
        self.replace_job: ReplaceJob | None = None  # the running (or last) replace
        self._lock = asyncio.Lock()  # one reconfiguration at a time

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self) -> None:
        """Build, open and export.  Raises ControlError."""
        async with self._lock:
            if self.state == "running":
                return
            try:
                tree = await build(self.spec.target, io_timeout=self.spec.io_timeout)
            except BlockError as exc:
                raise ControlError("node-unreachable", f"{self.name}: {exc}") from None
            except ConfigError as exc:
                raise _bad_spec(exc) from None
            root = SwitchDevice(tree, name=self.name)
            self.keepers = {k.mirror.name: k for k in keepers(tree, self._resync_rates)}
            for keeper in self.keepers.values():
                keeper.start()
            names = [self.spec.export] if self.spec.export is not None else ["", self.name]
            server = NbdServer(dict.fromkeys(names, root), default=names[0])
            try:
                bound = await server.start(*self.spec.listen)
            except (OSError, ConfigError) as exc:
                await server.close()
                self._stop_keepers()
                await tree.close()
                raise ControlError("listen-failed", f"{self.name}: cannot listen: {exc}") from None
            self.root, self.server, self.state = root, server, "running"
            self.exports = [
                a.uri() if not names[0] else _with_export(a.uri(), names[0]) for a in bound
            ]
            log.info("array %s running, exported at %s", self.name, ", ".join(self.exports))

    async def stop(self) -> None:
        """Stop exporting (in-flight requests finish), flush and close the tree."""
        async with self._lock:
            server, root = self.server, self.root
            self.server = self.root = None
            self.exports = []
            self.state = "stopped"
            if server is not None:
                await server.close()
            job = self.replace_job
            if job is not None and job.running:
                await job.abort()
            self._stop_keepers()
            if root is not None:
                # Bounded: a node that is away must not hold the daemon's shutdown for
                # the whole io_timeout (what was acknowledged was already written).
                with contextlib.suppress(BlockError, TimeoutError):
                    await asyncio.wait_for(root.flush(), STOP_FLUSH_TIMEOUT)
                await root.close()

    def _stop_keepers(self) -> None:
        for keeper in self.keepers.values():
            keeper.stop()
        self.keepers = {}

    def _resync_rates(self, mirror: str) -> tuple[int, int]:
        t = find_node(self.spec, mirror)
        if isinstance(t, MirrorSpec):
            return t.resync_rate, t.resync_min_rate
        return 0, 0

    # -- mirror maintenance ----------------------------------------------------------

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
            await dev.suspend()
        except ConfigError as exc:
            raise ControlError("busy", str(exc), field="node") from None

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

    async def replace(self, node: str, new: dict[str, Any]) -> None:
        """Start replacing ``node`` by the node ``new`` (a spec dict), live."""
        async with self._lock:
            root = self._running_root()
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
                raise _bad_spec(exc) from None
            try:
                await dev.open()
            except BlockError as exc:
                await dev.close()
                raise ControlError("node-unreachable", str(exc), field="spec") from None
            parent = index(root.inner)[parent_spec.name]
            hi, lo = self._resync_rates(parent_spec.name)

            def finished(job: ReplaceJob) -> None:
                if job.state == "finished":
                    self.spec = dataclasses.replace(
                        self.spec, target=replace_node(self.spec.target, node, target)
                    )
                    self._refresh_keepers()

            try:
                job = ReplaceJob(root, parent, old, dev, on_finished=finished,
                                 max_rate=hi or None, min_rate=lo or None)  # fmt: skip
                await job.start()
            except (ConfigError, BlockError) as exc:
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

    def _running_root(self) -> SwitchDevice:
        if self.root is None:
            raise ControlError("not-running", f"array {self.name!r} is not running")
        return self.root

    async def add(self, node: dict[str, Any]) -> None:
        """Grow the array live by the node ``node`` (a spec dict).

        Linear: the node is appended.  Stripe: the array becomes a linear array of the
        stripe and the node (a new segment; the stripe is not restriped).  Mirror: the
        node is a new leg, resynced in the background (the size does not change).
        """
        async with self._lock:
            root = self._running_root()
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
                raise _bad_spec(exc) from None
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
        self, root: SwitchDevice, mirror: MirrorDevice, target: MirrorSpec, node: dict[str, Any]
    ) -> None:
        """A new leg for the mirror at the root, resynced in the background."""
        try:
            leg = target_from_dict(node, taken=[t.name for t in walk(target)])
            dev = construct(leg, io_timeout=self.spec.io_timeout, replay=False)
        except ConfigError as exc:
            raise _bad_spec(exc) from None

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

    async def _remove_leg(self, root: SwitchDevice, mirror: MirrorDevice, node: str) -> None:
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

    def _refresh_keepers(self) -> None:
        for keeper in self.keepers.values():
            keeper.refresh()

    async def _stripe_to_linear(
        self, root: SwitchDevice, dev: BlockDevice, part: LinearPart, taken: list[str]
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

    def status(self) -> dict[str, Any]:
        root = self.root
        devices = index(root.inner) if root is not None else {}
        return {
            "name": self.name,
            "state": self.state,
            "algorithm": self.spec.target.KIND,
            "size": root.size if root is not None else 0,
            "exports": list(self.exports),
            "suspended": root.suspended if root is not None else False,
            "held": root.held if root is not None else 0,
            "replace": self.replace_job.progress() if self.replace_job is not None else None,
            "root": _node_status(
                self.spec.target, devices, start=None, leg_state=None, keepers=self.keepers
            ),
            "spec": spec_to_dict(self.spec),
        }


def _with_export(uri: str, export: str) -> str:
    # Address.uri() of a listen address carries no export; put the name in.
    if uri.startswith("nbd+unix:///"):
        return uri.replace("nbd+unix:///", f"nbd+unix:///{export}", 1)
    return uri.rstrip("/") + "/" + export


def _node_status(
    t: TargetSpec,
    devices: dict[str, BlockDevice],
    *,
    start: int | None,
    leg_state: str | None,
    keepers: dict[str, MirrorKeeper],
) -> dict[str, Any]:
    dev = devices.get(t.name)
    health = dev.health() if dev is not None else None
    state = leg_state or (health.state if health is not None else "stopped")
    if isinstance(dev, Member) and dev.suspended:
        state = "suspended"
    node: dict[str, Any] = {
        "name": t.name,
        "type": t.KIND,
        "where": dev.where if isinstance(dev, Member) else "",
        "start": start,
        "size": dev.size if dev is not None else 0,
        "state": state,
        "counters": dev.counters.as_dict() if isinstance(dev, Member) else None,
        "detail": _jsonable(health.detail) if health is not None else {},
        "members": [],
    }
    kids = children(t)
    starts: list[int | None] = [None] * len(kids)
    legs: list[str | None] = [None] * len(kids)
    if isinstance(t, LinearSpec) and isinstance(dev, LinearDevice):
        pos = 0
        for i, part in enumerate(t.members):
            starts[i] = pos
            kid = devices.get(part.target.name)
            pos += _part_size(part, kid)
    if isinstance(dev, MirrorDevice):
        # The legs as they are now (a replace adds one before the spec names it).
        by_name = {k.name: k for k in kids}
        kids = tuple(by_name.get(leg.dev.name) or _spec_of(leg.dev) for leg in dev.legs)
        starts = [None] * len(kids)
        legs = [leg.state.name.lower() for leg in dev.legs]
        keeper = keepers.get(dev.name)
        if keeper is not None and keeper.mirror is dev:
            node["detail"]["keeper"] = _jsonable(keeper.status())
            for i in keeper.suspended:
                legs[i] = "suspended"
    node["members"] = [
        _node_status(k, devices, start=s, leg_state=ls, keepers=keepers)
        for k, s, ls in zip(kids, starts, legs, strict=True)
    ]
    return node


def _spec_of(dev: BlockDevice) -> TargetSpec:
    """A spec node describing ``dev`` (a leg the array's spec does not name yet)."""
    try:
        return target_from_dict(dev.spec())
    except ConfigError:
        return MemorySpec(name=dev.name, size=dev.size)


def _part_size(part: LinearPart, dev: BlockDevice | None) -> int:
    if part.length is not None:
        return part.length
    return (dev.size - part.start) if dev is not None else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class Daemon:
    """All arrays of this process, and the control socket that manages them."""

    def __init__(self, control_path: str | None = None) -> None:
        self.control_path = control_path
        self.arrays: dict[str, Array] = {}
        self._control: ControlServer | None = None
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        if self.control_path is not None:
            self._control = ControlServer(self.control_path, self.handle)
            await self._control.start()

    async def close(self) -> None:
        if self._control is not None:
            await self._control.close()
            self._control = None
        for array in list(self.arrays.values()):
            await array.stop()

    def _array(self, name: str) -> Array:
        try:
            return self.arrays[name]
        except KeyError:
            raise ControlError("no-such-array", f"no array named {name!r}", field="array") from None

    async def create(self, spec: ArraySpec, *, start: bool = True) -> Array:
        if spec.name in self.arrays:
            raise ControlError(
                "exists", f"an array named {spec.name!r} exists", field="spec.array.name"
            )
        array = Array(spec)
        self.arrays[spec.name] = array
        if start:
            try:
                await array.start()
            except ControlError:
                del self.arrays[spec.name]
                raise
        return array

    def status(self, name: str | None = None) -> dict[str, Any]:
        arrays: Iterable[Array] = [self._array(name)] if name is not None else self.arrays.values()
        return {"arrays": [a.status() for a in arrays]}

    async def handle(self, req: m.Request) -> Any:
        """Answer one control request.  Raises ControlError."""
        if isinstance(req, m.Status):
            return self.status(req.array)
        if isinstance(req, m.Create):
            try:
                spec = spec_from_dict(req.spec)
            except ConfigError as exc:
                raise _bad_spec(exc) from None
            array = await self.create(spec)
            return array.status()
        if isinstance(req, m.Start):
            await self._array(req.array).start()
            return self._array(req.array).status()
        if isinstance(req, m.Stop):
            await self._array(req.array).stop()
            return self._array(req.array).status()
        if isinstance(req, m.Add):
            await self._array(req.array).add(req.spec)
            return self._array(req.array).status()
        if isinstance(req, m.Remove):
            await self._array(req.array).remove(req.node)
            return self._array(req.array).status()
        if isinstance(req, m.Fail):
            await self._array(req.array).fail(req.node)
            return self._array(req.array).status()
        if isinstance(req, m.Readd):
            return await self._array(req.array).readd(req.node, full=req.full)
        if isinstance(req, m.Verify):
            array = self._array(req.array)
            array.verify(repair=req.repair, source=req.source, mirror=req.mirror)
            return array.status()
        if isinstance(req, m.ResyncRate):
            array = self._array(req.array)
            array.resync_rate(req.rate, req.min_rate, req.mirror)
            return array.status()
        if isinstance(req, m.Suspend):
            await self._array(req.array).suspend(req.node)
            return self._array(req.array).status()
        if isinstance(req, m.Resume):
            await self._array(req.array).resume(req.node)
            return self._array(req.array).status()
        if isinstance(req, m.Replace):
            await self._array(req.array).replace(req.node, req.spec)
            return self._array(req.array).status()
        if isinstance(req, m.CancelReplace):
            self._array(req.array).cancel_replace()
            return self._array(req.array).status()
        if isinstance(req, m.Shutdown):
            self.stopping.set()
            return {}
        raise ControlError("not-implemented", f"operation {req.OP!r} is not implemented yet")


async def run_daemon(
    control_path: str | None,
    *,
    specs: Iterable[ArraySpec] = (),
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Daemon], None] | None = None,
) -> None:
    """Run a daemon with ``specs`` started until ``stop`` (or a shutdown request) is set.

    ``on_ready`` is called once the control socket accepts and ``specs`` run.
    """
    daemon = Daemon(control_path)
    await daemon.start()
    try:
        for spec in specs:
            await daemon.create(spec)
        if on_ready is not None:
            on_ready(daemon)
        waiters = [asyncio.ensure_future(daemon.stopping.wait())]
        if stop is not None:
            waiters.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
    finally:
        await daemon.close()
