r"""Array specs from plain dicts: validation into the spec tree, defaults, node names.

Theory of operation
-------------------
Two sources, one validator: a TOML file (:mod:`dst.array.specfile`) and a plain dict of
the same shape (this is how a spec travels as JSON over the control socket, and what
every device reports of itself).  Unknown keys, wrong types and missing required keys
are :class:`~dst.array.spec.SpecError`\ s naming the key path, e.g.
``array.target.members[1].uri`` (the key-by-key reading is :mod:`dst.array.specreader`).
Absent optional keys take their defaults, and unnamed nodes get generated names, so
the tree returned is complete; :mod:`dst.array.speccanon` turns it back into the
canonical dict, and ``spec_from_dict(spec_to_dict(s)) == s``.  The document shape and
the value grammars are described in :mod:`dst.array.spec` and
``docs/spec-reference.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from dst.array.spec import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_IO_TIMEOUT,
    DEFAULT_LEG_TIMEOUT,
    DEFAULT_PARITY_CHUNK,
    KINDS,
    MIN_CHUNK_SIZE,
    NAME_RE,
    ArraySpec,
    FileSpec,
    LinearPart,
    LinearSpec,
    MemorySpec,
    MirrorSpec,
    MissingSpec,
    ParitySpec,
    Raid5Spec,
    Raid6Spec,
    RemoteSpec,
    SpecError,
    StripeSpec,
    TargetSpec,
    children,
)
from dst.array.specreader import REQUIRED, Table, describe
from dst.errors import ConfigError
from dst.meta.layout import DEFAULT_CLEAR_DELAY
from dst.nbd.server import TlsMode
from dst.net.address import Address, parse_address
from dst.net.tls import ServerTlsConfig, check_exposure, parse_mode


def spec_from_dict(data: Mapping[str, Any]) -> ArraySpec:
    """Validate a document ``{"array": {...}}``; raises :class:`SpecError`."""
    doc = Table(data, "")
    doc.allow("array")
    t = Table(doc.raw("array"), "array")
    t.allow("name", "listen", "export", "io_timeout", "target", "tls", "acl")
    name = _name(t, "name", required=True)
    listen = []
    for i, item in enumerate(t.array("listen")):
        if not isinstance(item, str):
            raise SpecError(f"array.listen[{i}]", f"expected a string, got {describe(item)}")
        try:
            listen.append(parse_address(item, form="listen"))
        except ConfigError as e:
            raise SpecError(f"array.listen[{i}]", str(e)) from None
    export = t.text("export", None)
    io_timeout = t.duration("io_timeout", DEFAULT_IO_TIMEOUT)
    tls = _tls(t.raw("tls", None), listen)
    acl = t.text("acl", None)
    if acl == "":
        raise SpecError("array.acl", "empty path")
    target = _target(Table(t.raw("target"), "array.target"))
    return ArraySpec(
        name=name,
        target=_assign_names(target, "array.target"),
        listen=tuple(listen),
        export=export,
        io_timeout=io_timeout,
        tls=tls,
        acl=acl,
    )


def _tls(data: object, listen: list[Address]) -> ServerTlsConfig | None:
    """``[array.tls]``, and the check that a plaintext export stays on loopback."""
    if data is None:
        for i, addr in enumerate(listen):
            try:
                check_exposure([addr], None, where="")
            except ConfigError as e:
                raise SpecError(f"array.listen[{i}]", f"{e} (add [array.tls])") from None
        return None
    t = Table(data, "array.tls")
    t.allow("mode", "certificates", "verify_peer", "psk")
    certificates, psk = t.text("certificates", None), t.text("psk", None)
    mode_text = t.text("mode", None)
    try:
        mode = parse_mode(mode_text, where="") if mode_text is not None else TlsMode.REQUIRE
    except ConfigError as e:
        raise SpecError(t.key("mode"), str(e)) from None
    config = ServerTlsConfig(
        mode=mode,
        certificates=Path(certificates) if certificates else None,
        verify_peer=t.flag("verify_peer", False),
        psk_file=Path(psk) if psk else None,
    )
    try:
        config.check(where="")
    except ConfigError as e:
        raise SpecError("array.tls", str(e)) from None
    return config


def target_from_dict(
    data: Mapping[str, Any], *, taken: Collection[str] = (), path: str = "spec"
) -> TargetSpec:
    """Validate one node dict (for adding a node to a running array).

    Names in ``taken`` (the array's existing nodes) must not be reused; generated
    names avoid them.  Raises :class:`SpecError` with keys under ``path``.
    """
    return _assign_names(_target(Table(data, path)), path, taken=taken)


def linear_part_from_dict(
    data: Mapping[str, Any], *, taken: Collection[str] = (), path: str = "spec"
) -> LinearPart:
    """Like :func:`target_from_dict` for a linear member (may carry ``start``/``length``)."""
    part = _linear_part(Table(data, path))
    return dataclasses.replace(part, target=_assign_names(part.target, path, taken=taken))


def _name(t: Table, k: str, *, required: bool = False) -> str:
    value: str = t.text(k, REQUIRED if required else "")
    if (value or required) and not NAME_RE.fullmatch(value):
        raise SpecError(t.key(k), f"bad name {value!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return value


_KEYS = {
    "file": ("path", "size", "read_only"),
    "memory": ("size",),
    "missing": (),
    "remote": ("uri",),
    "linear": ("members",),
    "stripe": ("members", "chunk_size"),
    "mirror": (
        "members",
        "region_size",
        "metadata",
        "leg_timeout",
        "resync_rate",
        "resync_min_rate",
        "clear_delay",
    ),
}
_PARITY_KEYS = (*_KEYS["mirror"], "chunk_size", "start_dirty_degraded")
_KEYS["raid5"] = _KEYS["raid6"] = _PARITY_KEYS


def _target(t: Table, *extra: str) -> TargetSpec:
    kind = t.text("type")
    if kind not in KINDS:
        raise SpecError(t.key("type"), f"unknown type {kind!r}: use one of {', '.join(KINDS)}")
    t.allow("type", "name", *_KEYS[kind], *extra)
    name = _name(t, "name")
    result: TargetSpec
    if kind == "file":
        path = t.text("path")
        if not path:
            raise SpecError(t.key("path"), "empty path")
        result = FileSpec(
            name=name, path=path, size=t.size("size", None), read_only=t.flag("read_only", False)
        )
    elif kind == "memory":
        result = MemorySpec(name=name, size=t.size("size"))
    elif kind == "missing":
        result = MissingSpec(name=name)
    elif kind == "remote":
        text = t.text("uri")
        try:
            uri = parse_address(text, form="uri")
        except ConfigError as e:
            raise SpecError(t.key("uri"), str(e)) from None
        result = RemoteSpec(name=name, uri=uri)
    elif kind == "linear":
        parts = tuple(_linear_part(m) for m in _members(t, 1))
        result = LinearSpec(name=name, members=parts)
    elif kind == "stripe":
        chunk = _grain(t, "chunk_size", DEFAULT_CHUNK_SIZE)
        result = StripeSpec(
            name=name, members=tuple(_target(m) for m in _members(t, 2)), chunk_size=chunk
        )
    elif kind in ("raid5", "raid6"):
        cls = Raid5Spec if kind == "raid5" else Raid6Spec
        result = cls(
            name=name,
            members=tuple(_target(m) for m in _members(t, cls.PARITY + 2)),
            chunk_size=_grain(t, "chunk_size", DEFAULT_PARITY_CHUNK),
            region_size=_region_size(t),
            metadata=t.flag("metadata", True),
            leg_timeout=t.duration("leg_timeout", DEFAULT_LEG_TIMEOUT),
            resync_rate=t.size("resync_rate", 0),
            resync_min_rate=t.size("resync_min_rate", 0),
            clear_delay=t.duration("clear_delay", DEFAULT_CLEAR_DELAY),
            start_dirty_degraded=t.flag("start_dirty_degraded", False),
        )
    else:
        result = MirrorSpec(
            name=name,
            members=tuple(_target(m) for m in _members(t, 2)),
            region_size=_region_size(t),
            metadata=t.flag("metadata", True),
            leg_timeout=t.duration("leg_timeout", DEFAULT_LEG_TIMEOUT),
            resync_rate=t.size("resync_rate", 0),
            resync_min_rate=t.size("resync_min_rate", 0),
            clear_delay=t.duration("clear_delay", DEFAULT_CLEAR_DELAY),
        )
    return result


def _members(t: Table, minimum: int) -> list[Table]:
    items = t.array("members")
    if len(items) < minimum:
        kind = t.data["type"]
        raise SpecError(
            t.key("members"), f"{kind} needs at least {minimum} members, got {len(items)}"
        )
    return [Table(m, f"{t.key('members')}[{i}]") for i, m in enumerate(items)]


def _linear_part(m: Table) -> LinearPart:
    start = m.size("start", 0)
    length = m.size("length", None)
    if length == 0:
        raise SpecError(m.key("length"), "length must be > 0")
    return LinearPart(target=_target(m, "start", "length"), start=start, length=length)


def _region_size(t: Table) -> int | None:
    """The region size asked for, or None: the members' own (the default for new ones)."""
    return None if t.raw("region_size", None) is None else _grain(t, "region_size", 0)


def _grain(t: Table, k: str, default: int) -> int:
    value: int = t.size(k, default)
    if value < MIN_CHUNK_SIZE or value & (value - 1):
        raise SpecError(t.key(k), f"must be a power of two >= 4KiB, got {value}")
    return value


def _assign_names(root: TargetSpec, path: str, *, taken: Collection[str] = ()) -> TargetSpec:
    """Check explicit names are unique; give unnamed nodes ``node<preorder index>``."""
    used = set(taken)
    nodes = list(_walk_paths(root, path))
    for node, node_path in nodes:
        if node.name:
            if node.name in used:
                raise SpecError(f"{node_path}.name", f"duplicate node name {node.name!r}")
            used.add(node.name)
    names: dict[str, str] = {}  # path -> generated name
    for i, (node, node_path) in enumerate(nodes, start=len(taken)):
        if not node.name:
            while f"node{i}" in used:
                i += 1
            names[node_path] = f"node{i}"
            used.add(f"node{i}")
    return _rename(root, path, names)


def _walk_paths(t: TargetSpec, path: str) -> Iterator[tuple[TargetSpec, str]]:
    yield t, path
    for i, child in enumerate(children(t)):
        yield from _walk_paths(child, f"{path}.members[{i}]")


def _rename(t: TargetSpec, path: str, names: Mapping[str, str]) -> TargetSpec:
    name = names.get(path, t.name)
    sub = [_rename(c, f"{path}.members[{i}]", names) for i, c in enumerate(children(t))]
    if isinstance(t, LinearSpec):
        parts = tuple(dataclasses.replace(p, target=c) for p, c in zip(t.members, sub, strict=True))
        return dataclasses.replace(t, name=name, members=parts)
    if isinstance(t, StripeSpec | MirrorSpec | ParitySpec):
        return dataclasses.replace(t, name=name, members=tuple(sub))
    return dataclasses.replace(t, name=name)
