"""Assembly: the spec of a mirror or parity array rebuilt from its members' superblocks.

Theory of operation
-------------------
Every member of a mirror or a parity array carries a superblock
(:mod:`dst.meta.superblock`) naming its array (UUID and name), its role (member index),
the member count, the region size and the layout (the kind of array, ``raid5`` and
``raid6`` with their chunk size), including the node names the members had, and the
array's own name and export addresses.  :func:`probe` reads the superblock of one
member -- a local path or an NBD URI -- without changing anything; :func:`assemble_spec`
checks the members found belong together (one array UUID, every role present exactly
once) and returns the array spec that rebuilds the array with each member in its role,
wherever it lives now (a node may come back on another port or path), under the array's
recorded name and listen addresses unless told otherwise.  Starting that spec does the
rest: the array picks the most recent generation among its members, resyncs
out-of-date members from the bitmap, and after a crash resyncs only the regions marked
dirty (a parity array recomputes their parity; dirty and degraded at once, it is
refused unless ``force``: ``start_dirty_degraded``, see ``docs/parity.md``).

Degraded assembly (mdadm's ``--run``): with ``degraded`` the members given may be a
subset; the others take their roles as ``missing`` members (failed until ``dst
replace`` puts a node in their place).  It is refused, saying why, unless the members
given hold the newest data the array's superblocks know of: the pure classification
of :mod:`dst.meta.members` picks the reference among them (split brain is refused), and
the reference must be *consistent* -- a member that was a resync target is incomplete.
A member left out that wrote on its own afterwards is told apart when it comes back
(split brain, refused), never merged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError
from dst.meta.members import reference
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
    degraded: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """The array spec document (``{"array": ...}``) for the members ``found``; the
    array's recorded name, listen addresses and export name unless given.  ``force``
    lets a parity array start dirty and degraded (``start_dirty_degraded``).

    Raises AssembleError if they belong to different arrays, a role is given twice, a
    role is missing (unless ``degraded``), the members disagree on the array's shape,
    or (``degraded``) they cannot guarantee the newest data.
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
    array_name = found[0].sb.array_name
    missing = [r for r in range(count) if r not in by_role]
    if missing and not degraded:
        raise AssembleError(
            f"member(s) {', '.join(map(str, missing))} of {count} not given: the array "
            f"{array_name!r} needs all its members to be assembled (--degraded starts it "
            "without them, if those given hold the newest data)"
        )
    if missing:
        _check_degraded(by_role, array_name)
    names = newest.spec.get("names")
    legs = []
    for role in range(count):
        recorded = names[role] if isinstance(names, list) and role < len(names) else None
        leg_name = recorded if isinstance(recorded, str) else f"leg{role}"
        if role in by_role:
            legs.append({**by_role[role].node, "name": leg_name})
        else:
            legs.append({"type": "missing", "name": leg_name})
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
    label = newest.spec.get("array")
    label = label if isinstance(label, dict) else {}
    recorded_listen = [a for a in label.get("listen") or () if isinstance(a, str)]
    array: dict[str, Any] = {
        "name": name or label.get("name") or mirror_name,
        "listen": list(listen) or recorded_listen,
        "target": target,
    }
    export = export if export is not None else label.get("export")
    if isinstance(export, str):
        array["export"] = export
    return {"array": array}


def _check_degraded(by_role: dict[int, Found], array: str) -> None:
    """Refuse a degraded start unless the members given hold the newest data."""
    sbs = {role: f.sb for role, f in by_role.items()}
    try:
        ref = reference(sbs, array=array)
    except MetadataError as e:
        raise AssembleError(f"not started degraded: {e}") from None
    if sbs[ref].inconsistent:
        who = ", ".join(f.location for f in by_role.values())
        raise AssembleError(
            f"not started degraded: no member given holds {array!r}'s data in full "
            f"({who}: being resynced when last written, so incomplete); give a member "
            "that was in sync"
        )


async def probe_all(locations: Sequence[str], *, connect_timeout: float = 10.0) -> list[Found]:
    """:func:`probe` each location (in order).  Raises AssembleError."""
    if not locations:
        raise AssembleError("say which members to assemble (paths or NBD URIs)")
    return [await probe(loc, connect_timeout=connect_timeout) for loc in locations]
