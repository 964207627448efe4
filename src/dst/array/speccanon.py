"""The canonical form of an array spec: the spec tree back into a plain dict.

Theory of operation
-------------------
Every device reports the spec that rebuilds it, the daemon sends specs as JSON over
the control socket, and ``dst assemble --dry-run`` prints one; all of them are this
dict.  It is canonical: every field is explicit, defaults and generated node names
included, so it says exactly what runs, and :func:`dst.array.specdict.spec_from_dict`
reads it back to the same tree (``spec_from_dict(spec_to_dict(s)) == s``).  Sizes are
ints, or with ``human`` strings such as ``"64KiB"`` that parse back to the same ints.
"""

from __future__ import annotations

from typing import Any

from dst.array.spec import (
    ArraySpec,
    FileSpec,
    LinearPart,
    LinearSpec,
    MemorySpec,
    MissingSpec,
    ParitySpec,
    RemoteSpec,
    StripeSpec,
    TargetSpec,
)
from dst.units import format_size


def spec_to_dict(spec: ArraySpec, *, human: bool = False) -> dict[str, Any]:
    """The canonical document ``{"array": {...}}`` (JSON- and TOML-able).

    Sizes are ints, or with ``human`` strings like ``"64KiB"`` (both parse back).
    """
    array: dict[str, Any] = {"name": spec.name, "listen": [str(a) for a in spec.listen]}
    if spec.export is not None:
        array["export"] = spec.export
    array["io_timeout"] = spec.io_timeout
    if spec.tls is not None:
        tls: dict[str, Any] = {"mode": spec.tls.mode.value, "verify_peer": spec.tls.verify_peer}
        if spec.tls.certificates is not None:
            tls["certificates"] = str(spec.tls.certificates)
        if spec.tls.psk_file is not None:
            tls["psk"] = str(spec.tls.psk_file)
        array["tls"] = tls
    if spec.acl is not None:
        array["acl"] = spec.acl
    array["target"] = target_to_dict(spec.target, human=human)
    return {"array": array}


def target_to_dict(t: TargetSpec, *, human: bool = False) -> dict[str, Any]:
    """One node (and its members) as a dict, as in :func:`spec_to_dict`."""
    size = format_size if human else int
    d: dict[str, Any] = {"type": t.KIND, "name": t.name}
    if isinstance(t, FileSpec):
        d["path"] = t.path
        if t.size is not None:
            d["size"] = size(t.size)
        d["read_only"] = t.read_only
    elif isinstance(t, MemorySpec):
        d["size"] = size(t.size)
    elif isinstance(t, RemoteSpec):
        d["uri"] = t.uri.uri()
    elif isinstance(t, MissingSpec):
        pass
    elif isinstance(t, LinearSpec):
        d["members"] = [_part_to_dict(p, human=human) for p in t.members]
    elif isinstance(t, StripeSpec):
        d["chunk_size"] = size(t.chunk_size)
        d["members"] = [target_to_dict(m, human=human) for m in t.members]
    else:  # a mirror, or a parity target (a mirror's keys and two of its own)
        if isinstance(t, ParitySpec):
            d["chunk_size"] = size(t.chunk_size)
        if t.region_size is not None:  # (None: the members' own)
            d["region_size"] = size(t.region_size)
        d["metadata"] = t.metadata
        d["leg_timeout"] = t.leg_timeout
        d["resync_rate"] = size(t.resync_rate)
        d["resync_min_rate"] = size(t.resync_min_rate)
        d["clear_delay"] = t.clear_delay
        if isinstance(t, ParitySpec):
            d["start_dirty_degraded"] = t.start_dirty_degraded
        d["members"] = [target_to_dict(m, human=human) for m in t.members]
    return d


def _part_to_dict(p: LinearPart, *, human: bool) -> dict[str, Any]:
    d = target_to_dict(p.target, human=human)
    if p.start:
        d["start"] = format_size(p.start) if human else p.start
    if p.length is not None:
        d["length"] = format_size(p.length) if human else p.length
    return d
