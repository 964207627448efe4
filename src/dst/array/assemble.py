"""Assembly: the spec of a mirror or parity array rebuilt from its members' superblocks.

Theory of operation
-------------------
Every member of a mirror or a parity array carries a superblock
(:mod:`dst.meta.superblock`) naming its array (UUID and name), its role (member index),
the member count, the region size and the layout (the kind of array, ``raid5`` and
``raid6`` with their chunk size), including the node names the members had.  :func:`probe` reads the
superblock of one member -- a local path or an NBD URI -- without changing
anything; :func:`assemble_spec` checks the members found belong together (one array
UUID, every role present exactly once) and returns the array spec that rebuilds the
array with each member in its role, wherever it lives now (a node may come back on
another port or path).  Starting that spec does the rest: the array picks the most
recent generation among its members, resyncs out-of-date members from the bitmap, and
after a crash resyncs only the regions marked dirty (a parity array recomputes their
parity; dirty and degraded at once, it is refused unless ``force``:
``start_dirty_degraded``, see ``docs/parity.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError
from dst.meta.store import MetaStore
from dst.meta.superblock import MetadataError, Superblock
from dst.net.address import Address, parse_address
from dst.targets.file import FileDevice
from dst.targets.remote import RemoteDevice


class AssembleError(ConfigError):
    """The members given do not make up one array."""


@dataclass(frozen=True, slots=True)
class Found:
    """One probed member: where it is (a spec node dict without name) and its superblock."""

    location: str
    node: dict[str, Any]
    sb: Superblock


def _is_uri(location: str) -> bool:
    return location.startswith(("nbd://", "nbd+unix://", "nbds://"))


def _member(location: str, connect_timeout: float) -> tuple[BlockDevice, dict[str, Any]]:
    """The (unopened) device at ``location`` and its spec node (without a name)."""
    if _is_uri(location):
        try:
            addr: Address = parse_address(location, form="uri", where=location)
        except ConfigError as e:
            raise AssembleError(str(e)) from None
        remote = RemoteDevice(addr, name=location, timeout=connect_timeout)
        return remote, {"type": "remote", "uri": addr.uri()}
    path = Path(location).absolute()
    if not path.exists():
        raise AssembleError(f"{location}: no such file or device")
    return FileDevice(path, read_only=True, name=location), {"type": "file", "path": str(path)}


async def probe(location: str, *, connect_timeout: float = 10.0) -> Found:
    """Read the superblock of the member at ``location`` (NBD URI or local path).

    Raises AssembleError naming the location when it cannot be read or holds no
    valid dst metadata.
    """
    dev, node = _member(location, connect_timeout)
    try:
        await dev.open()
        try:
            sb = await MetaStore(dev).load()
        finally:
            await dev.close()
    except (BlockError, OSError) as e:
        raise AssembleError(f"{location}: cannot read it: {e}") from None
    except MetadataError as e:
        raise AssembleError(f"{location}: not a dst array member: {e}") from None
    return Found(location, node, sb)


def assemble_spec(
    found: Sequence[Found],
    *,
    name: str | None = None,
    listen: Sequence[str] = (),
    export: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The array spec document (``{"array": ...}``) for the members ``found``;
    ``force`` lets a parity array start dirty and degraded (``start_dirty_degraded``).

    Raises AssembleError if they belong to different arrays, a role is missing or
    given twice, or the members disagree on the array's shape.
    """
    if not found:
        raise AssembleError("no members given")
    arrays = {f.sb.array_uuid for f in found}
    if len(arrays) > 1:
        who = "; ".join(f"{f.location}: {f.sb.array_name!r} {f.sb.array_uuid}" for f in found)
        raise AssembleError(f"the members belong to different arrays ({who})")
    newest = max(found, key=lambda f: (f.sb.events, f.sb.serial)).sb
    count = newest.member_count
    by_role: dict[int, Found] = {}
    for f in found:
        if f.sb.member_count != count:
            raise AssembleError(
                f"{f.location}: stale member (it says the array has {f.sb.member_count} "
                f"members, the newest say {count}): assemble without it, then "
                "'dst replace' or 'dst add' it"
            )
        if f.sb.role in by_role:
            raise AssembleError(f"{f.location} and {by_role[f.sb.role].location} are both "
                                f"member {f.sb.role} of the array")  # fmt: skip
        by_role[f.sb.role] = f
    missing = [str(r) for r in range(count) if r not in by_role]
    if missing:
        raise AssembleError(
            f"member(s) {', '.join(missing)} of {count} not given: the array "
            f"{found[0].sb.array_name!r} needs all its members to be assembled"
        )
    names = newest.spec.get("names")
    legs = []
    for role in range(count):
        node = dict(by_role[role].node)
        if isinstance(names, list) and role < len(names) and isinstance(names[role], str):
            node["name"] = names[role]
        legs.append(node)
    kind = str(newest.spec.get("type", "mirror"))
    mirror_name = newest.array_name or kind
    target: dict[str, Any] = {
        "type": kind,
        "name": mirror_name,
        "region_size": newest.region_size,
        "members": legs,
    }
    if kind in ("raid5", "raid6"):
        target["chunk_size"] = newest.spec.get("chunk_size")
        target["start_dirty_degraded"] = force
    array: dict[str, Any] = {"name": name or mirror_name, "listen": list(listen), "target": target}
    if export is not None:
        array["export"] = export
    return {"array": array}


async def probe_all(locations: Sequence[str], *, connect_timeout: float = 10.0) -> list[Found]:
    """:func:`probe` each location (in order).  Raises AssembleError."""
    if not locations:
        raise AssembleError("say which members to assemble (paths or NBD URIs)")
    return [await probe(loc, connect_timeout=connect_timeout) for loc in locations]
