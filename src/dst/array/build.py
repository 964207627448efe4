"""Build a device tree from an array spec (the "table").

Theory of operation
-------------------
:func:`construct` maps each spec node to a target: leaves (file, memory, remote)
are wrapped in a :class:`~dst.targets.member.Member` that counts their I/O; composites
(linear, stripe, mirror, raid5, raid6) are built over their built members.  Nothing is opened
here.  :func:`build` constructs and opens the whole tree (composites open their
members, since their size comes from them); if anything fails, whatever was opened
is closed again and the error propagates, naming the node.  :func:`export_security`
loads what the array's export needs for TLS and access control.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dst.array.spec import (
    ArraySpec,
    FileSpec,
    LinearSpec,
    MemorySpec,
    MirrorSpec,
    MissingSpec,
    ParitySpec,
    RemoteSpec,
    StripeSpec,
    TargetSpec,
)
from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError
from dst.nbd.server import TlsMode
from dst.net.address import Address
from dst.net.tls import server_security
from dst.targets.file import FileDevice
from dst.targets.linear import LinearDevice
from dst.targets.member import Member
from dst.targets.memory import MemoryDevice
from dst.targets.mirror import MirrorDevice
from dst.targets.missing import MissingDevice
from dst.targets.parity import ParityDevice
from dst.targets.remote import RemoteDevice
from dst.targets.stripe import StripeDevice


def construct(
    target: TargetSpec,
    *,
    io_timeout: float,
    replay: bool = True,
    label: Mapping[str, Any] | None = None,
) -> BlockDevice:
    """The unopened device for ``target``.  Raises ConfigError.

    ``label`` (the array's name and export addresses) is recorded in the superblocks of
    a mirror at the top, so ``dst assemble`` brings the array back as it was.

    Remote leaves reconnect in the background.  With ``replay`` (members of linear and
    stripe targets) a request caught by an outage waits up to ``io_timeout`` for the
    reconnect and is replayed; under a mirror (``replay=False``) it fails at once so the
    mirror degrades instead of stalling, and the leg is re-added once it is back.
    """
    if isinstance(target, FileSpec):
        dev: BlockDevice = FileDevice(
            target.path,
            size=target.size,
            create=target.size is not None,
            read_only=target.read_only,
            name=target.name,
        )
        return Member(dev, name=target.name, where=target.path)
    if isinstance(target, MemorySpec):
        mem = MemoryDevice(target.size, name=target.name)
        return Member(mem, name=target.name, where="")
    if isinstance(target, MissingSpec):
        return Member(MissingDevice(name=target.name), name=target.name, where="")
    if isinstance(target, RemoteSpec):
        remote = RemoteDevice(
            target.uri,
            name=target.name,
            timeout=io_timeout,
            reconnect=True,
            io_timeout=io_timeout if replay else 0.0,
        )
        return Member(remote, name=target.name, where=target.uri.uri())
    if isinstance(target, LinearSpec):
        kids = [construct(p.target, io_timeout=io_timeout, replay=replay) for p in target.members]
        return LinearDevice(
            kids,
            starts=[p.start for p in target.members],
            sizes=[p.length for p in target.members],
            name=target.name,
        )
    if isinstance(target, StripeSpec):
        kids = [construct(m, io_timeout=io_timeout, replay=replay) for m in target.members]
        return StripeDevice(kids, chunk=target.chunk_size, name=target.name)
    if isinstance(target, MirrorSpec | ParitySpec):
        kids = [construct(m, io_timeout=io_timeout, replay=False) for m in target.members]
        common: dict[str, Any] = {
            "name": target.name,
            "region_size": target.region_size,
            "metadata": target.metadata,
            "leg_timeout": target.leg_timeout,
            "clear_delay": target.clear_delay,
            "resync_rate": target.resync_rate,
            "resync_min_rate": target.resync_min_rate,
            "label": label,
        }
        if isinstance(target, MirrorSpec):
            return MirrorDevice(kids, **common)
        return ParityDevice(kids, parity=target.PARITY, chunk=target.chunk_size,
                            start_dirty_degraded=target.start_dirty_degraded, **common)  # fmt: skip
    raise ConfigError(f"unknown target type {type(target).__name__}")


async def build(
    target: TargetSpec, *, io_timeout: float, label: Mapping[str, Any] | None = None
) -> BlockDevice:
    """Construct and open the tree for ``target`` (``label``: see :func:`construct`).
    Raises BlockError, ConfigError."""
    dev = construct(target, io_timeout=io_timeout, label=label)
    try:
        await dev.open()
    except BaseException:
        with contextlib.suppress(BlockError, OSError):
            await dev.close()
        raise
    return dev


def index(root: BlockDevice) -> dict[str, BlockDevice]:
    """Every device of the tree by name."""
    found: dict[str, BlockDevice] = {}
    stack = [root]
    while stack:
        dev = stack.pop()
        found.setdefault(dev.name, dev)
        stack.extend(dev.children())
    return found


def label(spec: ArraySpec) -> dict[str, Any]:
    """What a mirror's superblocks record of the array it is the top of."""
    return {"name": spec.name, "listen": [str(a) for a in spec.listen], "export": spec.export}


def export_security(spec: ArraySpec) -> dict[str, Any]:
    """The ``tls``/``acl`` arguments of the array's NbdServer (credentials loaded, ACL
    read and checked).  Raises ConfigError naming the file."""
    acl = Path(spec.acl) if spec.acl is not None else None
    return server_security(spec.tls, acl, where="array.acl")


def export_address(spec: ArraySpec, bound: Address) -> Address:
    """A bound export address as clients should write it: ``nbds`` when TLS is required."""
    tls = spec.tls is not None and spec.tls.mode is TlsMode.REQUIRE
    return dataclasses.replace(bound, tls=tls)
