"""One array: its configuration, the running device tree, its export and its keepers.

Theory of operation
-------------------
An :class:`Array` is created from a spec and is created -> running -> stopped (and
running again on ``start``).  Running, the device tree built from the spec sits under
the root :class:`~dst.targets.gate.GateDevice` (live reconfiguration: build new ->
suspend -> swap -> resume) and an :class:`~dst.net.server.NbdServer` exports it; every
redundant target gets a :class:`~dst.array.keeper.MirrorKeeper`.

One truth: while the array runs, its spec *is* the running tree's (every device reports
the spec that rebuilds it, as dm's table status), so a reconfiguration never edits a
parallel tree; only the array-level settings (name, listen addresses, export name, I/O
timeout) are kept here.  The operations (:mod:`dst.array.ops`, :mod:`dst.array.reshape`)
are functions of an Array, serialised by its ``lock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dst.array.build import build, export_address, export_security, index, label
from dst.array.keeper import MirrorKeeper, keepers
from dst.array.replacing import ReplaceJob
from dst.array.spec import ArraySpec, SpecError
from dst.array.speccanon import spec_to_dict
from dst.array.specdict import target_from_dict
from dst.array.status import node_status, stopped_status
from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError, ControlError
from dst.meta.superblock import MetadataError
from dst.net.server import NbdServer
from dst.targets.gate import GateDevice

log = logging.getLogger(__name__)

STOP_FLUSH_TIMEOUT = 5.0  # seconds the final flush of a stopping array may take
ROOT_MAX_HELD = 4096  # requests the array root holds while suspended; more get EAGAIN


def bad_spec(exc: ConfigError) -> ControlError:
    key = exc.key if isinstance(exc, SpecError) else ""
    return ControlError("bad-spec", str(exc), field=f"spec.{key}" if key else "spec")


class Array:
    """One array (module docstring)."""

    def __init__(self, spec: ArraySpec) -> None:
        self._spec = spec  # the configuration; its target is the tree's while running
        self.state = "created"
        self.root: GateDevice | None = None
        self.server: NbdServer | None = None
        self.exports: list[str] = []
        self.keepers: dict[str, MirrorKeeper] = {}  # by mirror name
        self.replace_job: ReplaceJob | None = None  # the running (or last) replace
        self.lock = asyncio.Lock()  # one reconfiguration at a time

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> ArraySpec:
        """The array as it runs (the tree's spec), or as it will start."""
        if self.root is None:
            return self._spec
        return dataclasses.replace(self._spec, target=target_from_dict(self.root.inner.spec()))

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Build, open and export.  Raises ControlError."""
        async with self.lock:
            if self.state == "running":
                return
            spec = self._spec
            try:
                security = export_security(spec)  # TLS credentials, ACL file
                tree = await build(spec.target, io_timeout=spec.io_timeout, label=label(spec))
            except BlockError as exc:
                raise ControlError("node-unreachable", f"{self.name}: {exc}") from None
            except ConfigError as exc:
                raise bad_spec(exc) from None
            except MetadataError as exc:  # foreign, diverged, inconsistent members
                raise ControlError("refused", f"{self.name}: {exc}") from None
            root = GateDevice(tree, name=self.name, max_held=ROOT_MAX_HELD)
            self.keepers = {k.mirror.name: k for k in keepers(tree)}
            for keeper in self.keepers.values():
                keeper.start()
            names = [spec.export] if spec.export is not None else ["", self.name]
            server = NbdServer(dict.fromkeys(names, root), default=names[0], **security)
            try:
                bound = await server.start(*spec.listen)
            except (OSError, ConfigError) as exc:
                await server.close()
                self._stop_keepers()
                await tree.close()
                raise ControlError("listen-failed", _listen_failed(self.name, spec, exc)) from None
            self.root, self.server, self.state = root, server, "running"
            uris = [export_address(spec, a).uri() for a in bound]
            self.exports = [u if not names[0] else _with_export(u, names[0]) for u in uris]
            log.info("array %s running, exported at %s", self.name, ", ".join(self.exports))

    async def stop(self) -> None:
        """Stop exporting (in-flight requests finish), flush and close the tree."""
        async with self.lock:
            server, root = self.server, self.root
            if root is not None:
                self._spec = self.spec  # what runs is what starts next time
                self.release_held()  # or server.close() waits for them forever
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

    def refresh_keepers(self) -> None:
        """A mirror's legs changed: its keeper follows them."""
        for keeper in self.keepers.values():
            keeper.refresh()

    def release_held(self) -> None:
        """Resume the array and its suspended nodes: held requests go on to their
        nodes and complete, so stopping (which waits for them) cannot hang."""
        root = self.root
        if root is None:
            return
        if root.suspended:
            root.resume()
        for dev in self.nodes():
            if dev.suspended:
                dev.resume()

    # -- finding things in the tree ------------------------------------------------------

    def running_root(self) -> GateDevice:
        if self.root is None:
            raise ControlError("not-running", f"array {self.name!r} is not running")
        return self.root

    def device(self, name: str) -> BlockDevice:
        """The device called ``name``.  ControlError no-such-node."""
        dev = index(self.running_root().inner).get(name)
        if dev is None:
            raise ControlError("no-such-node", f"no node {name!r} in {self.name!r}", field="node")
        return dev

    def parent(self, name: str) -> BlockDevice | None:
        """The device that has the device called ``name`` as a child (None: the root)."""
        for dev in index(self.running_root().inner).values():
            if any(c.name == name for c in dev.children()):
                return dev
        return None

    def nodes(self) -> Iterator[BlockDevice]:
        """The storage nodes of the running tree."""
        root = self.root
        return iter(()) if root is None else (d for d in index(root.inner).values() if d.node)

    def no_node_suspended(self) -> None:
        """Refuse what suspends the root while a node holds requests: the root's drain
        would wait for them until that node is resumed."""
        for dev in self.nodes():
            if dev.suspended:
                raise ControlError(
                    "busy", f"node {dev.name!r} is suspended: resume it first", field="node"
                )

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        root = self.root
        spec = self.spec
        return {
            "name": self.name,
            "state": self.state,
            "algorithm": spec.target.KIND,
            "size": root.size if root is not None else 0,
            "exports": list(self.exports),
            "clients": self.server.clients() if self.server is not None else [],
            "suspended": root.suspended if root is not None else False,
            "held": root.held if root is not None else 0,
            "replace": self.replace_job.progress() if self.replace_job is not None else None,
            "root": node_status(root.inner, keepers=self.keepers)
            if root is not None
            else stopped_status(spec.target),
            "spec": spec_to_dict(spec),
        }


def _listen_failed(name: str, spec: ArraySpec, exc: Exception) -> str:
    """Why the array cannot listen, naming its addresses (and a missing directory)."""
    where = ", ".join(map(str, spec.listen))
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    for a in spec.listen:
        if a.is_unix and not Path(a.path).parent.is_dir():
            why += f" (the directory {Path(a.path).parent} of unix:{a.path} does not exist)"
    return f"{name}: cannot listen on {where}: {why}"


def _with_export(uri: str, export: str) -> str:
    # Address.uri() of a listen address carries no export; put the name in.
    if uri.startswith("nbd+unix:///"):
        return uri.replace("nbd+unix:///", f"nbd+unix:///{export}", 1)
    return uri.rstrip("/") + "/" + export
