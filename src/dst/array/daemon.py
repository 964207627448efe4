"""The array daemon: arrays built from specs, exported over NBD, run over a control socket.

Theory of operation
-------------------
An :class:`Array` owns one spec, the device tree built from it (under a
:class:`~dst.targets.gate.GateDevice`, the gate that makes live reconfiguration
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
import logging
from collections.abc import Callable, Iterable
from typing import Any

from dst.array.build import build, export_address, export_security, index
from dst.array.keeper import MirrorKeeper, keepers
from dst.array.ops import bad_spec
from dst.array.replacing import ReplaceJob
from dst.array.reshape import Reshape
from dst.array.spec import (
    ArraySpec,
    LinearPart,
    LinearSpec,
    MemorySpec,
    TargetSpec,
    children,
    spec_from_dict,
    spec_to_dict,
    target_from_dict,
)
from dst.control import messages as m
from dst.control.server import ControlServer
from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError, ControlError, DstError
from dst.meta.superblock import MetadataError
from dst.net.server import NbdServer
from dst.targets.gate import GateDevice
from dst.targets.linear import LinearDevice
from dst.targets.member import Member
from dst.targets.mirror import MirrorDevice

log = logging.getLogger(__name__)

STOP_FLUSH_TIMEOUT = 5.0  # seconds the final flush of a stopping array may take
ROOT_MAX_HELD = 4096  # requests the array root holds while suspended; more get EAGAIN


class Array(Reshape):
    """One array: spec, device tree, NBD export."""

    def __init__(self, spec: ArraySpec) -> None:
        self.spec = spec
        self.state = "created"
        self.root: GateDevice | None = None
        self.server: NbdServer | None = None
        self.exports: list[str] = []
        self.keepers: dict[str, MirrorKeeper] = {}  # by mirror name
        self.replace_job: ReplaceJob | None = None  # the running (or last) replace
        self._lock = asyncio.Lock()  # one reconfiguration at a time

    async def start(self) -> None:
        """Build, open and export.  Raises ControlError."""
        async with self._lock:
            if self.state == "running":
                return
            try:
                security = export_security(self.spec)  # TLS credentials, ACL file
                tree = await build(self.spec.target, io_timeout=self.spec.io_timeout)
            except BlockError as exc:
                raise ControlError("node-unreachable", f"{self.name}: {exc}") from None
            except ConfigError as exc:
                raise bad_spec(exc) from None
            except MetadataError as exc:  # foreign, diverged, inconsistent members
                raise ControlError("refused", f"{self.name}: {exc}") from None
            root = GateDevice(tree, name=self.name, max_held=ROOT_MAX_HELD)
            self.keepers = {k.mirror.name: k for k in keepers(tree, self._resync_rates)}
            for keeper in self.keepers.values():
                keeper.start()
            names = [self.spec.export] if self.spec.export is not None else ["", self.name]
            server = NbdServer(dict.fromkeys(names, root), default=names[0], **security)
            try:
                bound = await server.start(*self.spec.listen)
            except (OSError, ConfigError) as exc:
                await server.close()
                self._stop_keepers()
                await tree.close()
                raise ControlError("listen-failed", f"{self.name}: cannot listen: {exc}") from None
            self.root, self.server, self.state = root, server, "running"
            uris = [export_address(self.spec, a).uri() for a in bound]
            self.exports = [u if not names[0] else _with_export(u, names[0]) for u in uris]
            log.info("array %s running, exported at %s", self.name, ", ".join(self.exports))

    async def stop(self) -> None:
        """Stop exporting (in-flight requests finish), flush and close the tree."""
        async with self._lock:
            server, root = self.server, self.root
            self.server = self.root = None
            self.exports = []
            self.state = "stopped"
            if root is not None:
                _release_held(root)  # or server.close() waits for them forever
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

    def status(self) -> dict[str, Any]:
        root = self.root
        devices = index(root.inner) if root is not None else {}
        return {
            "name": self.name,
            "state": self.state,
            "algorithm": self.spec.target.KIND,
            "size": root.size if root is not None else 0,
            "exports": list(self.exports),
            "clients": self.server.clients() if self.server is not None else [],
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

    def reload(self, name: str | None = None) -> dict[str, Any]:
        """Re-read the ACL file and TLS credentials of one array's export, or of all
        (SIGHUP).  Raises ControlError ``bad-acl`` naming the file; the old stay."""
        done: dict[str, Any] = {}
        for array in [self._array(name)] if name is not None else self.arrays.values():
            if array.server is not None:
                try:
                    done[array.name] = array.server.reload()
                except ConfigError as exc:
                    raise ControlError("bad-acl", f"{array.name}: {exc}") from None
        return done

    async def handle(self, req: m.Request) -> Any:
        """Answer one control request.  Raises ControlError.

        A domain error that an operation did not map to a code of its own (a
        :class:`~dst.errors.DstError`) is still an answer, ``failed``, with its message:
        only bugs are ``internal``.
        """
        try:
            return await self._handle(req)
        except ControlError:
            raise
        except DstError as exc:
            log.warning("%s failed: %s", req.OP, exc)
            raise ControlError("failed", str(exc)) from None

    async def _handle(self, req: m.Request) -> Any:
        if isinstance(req, m.Status):
            return self.status(req.array)
        if isinstance(req, m.Create):
            try:
                spec = spec_from_dict(req.spec)
            except ConfigError as exc:
                raise bad_spec(exc) from None
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
            await self._array(req.array).replace(req.node, req.spec, rate=req.rate)
            return self._array(req.array).status()
        if isinstance(req, m.CancelReplace):
            self._array(req.array).cancel_replace()
            return self._array(req.array).status()
        if isinstance(req, m.Reload):
            return self.reload(req.array)
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


def _release_held(root: GateDevice) -> None:
    """Resume the array and its suspended nodes: held requests go to their nodes and
    complete, so stopping (which waits for the requests in flight) cannot hang."""
    if root.suspended:
        root.resume()
    for dev in index(root.inner).values():
        if isinstance(dev, Member) and dev.suspended:
            dev.resume()
