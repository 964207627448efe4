"""The array spec (the "table"): what an array is made of, parsed and validated.

Theory of operation
-------------------
A spec is a tree of frozen dataclasses.  :class:`ArraySpec` names the array, where
it is exported and its root ``target``; a target is a leaf (:class:`FileSpec`,
:class:`MemorySpec`, :class:`RemoteSpec`) or a composite (:class:`LinearSpec`,
:class:`StripeSpec`, :class:`MirrorSpec`) whose members are targets again, so
arrays nest (DST's "tree-like storages").  Every node has a ``name`` unique in the
array; unnamed nodes get ``node<i>``, ``i`` being the node's position in pre-order
(the root is ``node0``), or the next free number if that is taken.

Two sources, one validator: a TOML file (:func:`load_spec`, :func:`spec_from_toml`)
and a plain dict with the same shape (:func:`spec_from_dict`; this is how the spec
travels as JSON over the control socket).  Unknown keys, wrong types and missing
required keys are errors.  :func:`spec_to_dict` gives the canonical dict -- every
field explicit, generated names included -- so ``spec_from_dict(spec_to_dict(s))
== s`` and a running array can report exactly what it runs.

Document shape::

    [array]                       name, listen = [...], export, io_timeout
    [array.target]                type = mirror|linear|stripe|remote|file|memory
    [[array.target.members]]      members of a composite, recursively

A member of a linear target may carry ``start`` and ``length``: the part of that
member that is used (default: from 0 to its end).  (``length``, not ``size``,
because ``size`` already means the size of a file or memory leaf.)

Errors are :class:`SpecError` (a :class:`~dst.errors.ConfigError`) naming the key
path, e.g. ``array.target.members[1].uri``; from a file also ``file:line``.
``tomllib`` reports no positions, so :func:`_locate` scans the source text
(best effort): it follows ``[table]`` and ``[[array-of-tables]]`` headers, counting
array indices, ``key =`` lines and one-element-per-line inline tables in multi-line
arrays.  A key it cannot find (missing, or inside a one-line inline table) is
reported at the line of its nearest enclosing table or key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, TypeAlias
from urllib.parse import quote, unquote

from dst.errors import ConfigError

KiB = 1 << 10
NBD_PORT = 10809
DEFAULT_CHUNK_SIZE = 64 * KiB
DEFAULT_REGION_SIZE = 64 * KiB
MIN_CHUNK_SIZE = 4 * KiB
DEFAULT_IO_TIMEOUT = 30.0

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# ---------------------------------------------------------------------------
# sizes and durations


_SIZE_UNITS = {"": 1, "b": 1}
for _i, _u in enumerate("kmgtpe", start=1):
    _SIZE_UNITS[_u] = _SIZE_UNITS[_u + "ib"] = 1 << (10 * _i)
_NUMBER_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")  # "1.5 GiB", "500ms"
_DURATION_UNITS: dict[str, int | Fraction] = {
    **{"": 1, "s": 1, "m": 60, "h": 3600},
    **{"ms": Fraction(1, 1000), "us": Fraction(1, 10**6)},
}


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string: ``4096``, ``"4k"``, ``"64KiB"``, ``"1.5GiB"``.

    Units are binary (k = KiB = 1024); ``"KB"``-style units are refused as
    ambiguous.  Raises :class:`ConfigError` for anything else or a negative or
    fractional number of bytes.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"size must not be negative: {value}")
        return value
    m = _NUMBER_RE.fullmatch(value)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        hint = f" (use {unit[0].upper()}iB)" if m and unit in ("kb", "mb", "gb", "tb") else ""
        raise ConfigError(f"not a size: {value!r}{hint}")
    n = Fraction(m.group(1)) * _SIZE_UNITS[unit]
    if n.denominator != 1:
        raise ConfigError(f"not a whole number of bytes: {value!r}")
    return int(n)


def format_size(n: int) -> str:
    """The shortest exact spelling of ``n`` bytes: ``65536 -> "64KiB"``, ``1000 -> "1000"``."""
    if n < 0:
        raise ValueError("size must not be negative")
    for i, u in reversed(list(enumerate("KMGTPE", start=1))):
        unit = 1 << (10 * i)
        if n and n % unit == 0:
            return f"{n // unit}{u}iB"
    return str(n)


def parse_duration(value: str | int | float) -> float:
    """Seconds from a number (seconds) or ``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"``, ``"100us"``.

    Raises :class:`ConfigError` for anything else, negative or non-finite values.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"duration must be finite and >= 0: {value!r}")
        return float(value)
    m = _NUMBER_RE.fullmatch(value)
    if m is None or m.group(2).lower() not in _DURATION_UNITS:
        raise ConfigError(f"not a duration: {value!r} (use e.g. 30s, 500ms, 2m)")
    return float(Fraction(m.group(1)) * _DURATION_UNITS[m.group(2).lower()])


# ---------------------------------------------------------------------------
# addresses


@dataclass(frozen=True, slots=True)
class NbdUri:
    """A parsed NBD URI (the NBD project's URI standard, the subset dst uses).

    ``nbd://host[:port]/[export]``, ``nbds://...`` (TLS) and
    ``nbd+unix:///[export]?socket=PATH`` (``nbds+unix`` with TLS).
    """

    host: str = ""  # empty for unix sockets
    port: int = NBD_PORT
    export: str = ""
    socket: str = ""  # non-empty exactly for unix sockets
    tls: bool = False

    def __str__(self) -> str:
        scheme = ("nbds" if self.tls else "nbd") + ("+unix" if self.socket else "")
        path = "/" + quote(self.export, safe="")
        if self.socket:
            return f"{scheme}://{path}?socket={quote(self.socket, safe='/')}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"


def parse_nbd_uri(uri: str) -> NbdUri:
    """Parse and check an NBD URI; raises :class:`ConfigError` saying what is wrong."""
    try:
        return _parse_nbd_uri(uri)
    except ValueError as e:
        raise ConfigError(f"not an NBD URI: {uri!r} ({e})") from None


def _parse_nbd_uri(uri: str) -> NbdUri:
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
        raise ValueError("scheme must be nbd, nbds, nbd+unix or nbds+unix")
    if "#" in rest:
        raise ValueError("fragments are not allowed")
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    params = {unquote(k): unquote(v) for k, v in params.items()}
    allowed = {"socket"} if scheme.endswith("+unix") else set()
    if set(params) - allowed:
        raise ValueError(f"unknown parameter {sorted(set(params) - allowed)[0]!r}")
    tls = scheme.startswith("nbds")
    if scheme.endswith("+unix"):
        if authority:
            raise ValueError("no host in a unix-socket URI: nbd+unix:///export?socket=PATH")
        if not params.get("socket"):
            raise ValueError("socket=PATH is required")
        return NbdUri(export=unquote(path), socket=params["socket"], tls=tls)
    host, port = _split_host_port(authority, default_port=NBD_PORT, min_port=1)
    if not host:
        raise ValueError("missing host")
    return NbdUri(host=host, port=port, export=unquote(path), tls=tls)


def _split_host_port(text: str, *, default_port: int | None, min_port: int) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; raises ValueError."""
    port_text: str | None
    if text.startswith("["):
        host, close, tail = text[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise ValueError("unbalanced [ ]")
        port_text = tail[1:] if tail else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError("write IPv6 addresses as [addr]:port")
    else:
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise ValueError("missing :port")
        return host, default_port
    if not port_text.isdigit() or not min_port <= int(port_text) <= 65535:
        raise ValueError(f"port must be {min_port}..65535")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """``host:port`` to listen on; port 0 picks a free port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """``unix:/path`` to listen on."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


ListenAddress: TypeAlias = TcpAddress | UnixAddress


def parse_listen(text: str) -> ListenAddress:
    """``"127.0.0.1:10809"``, ``"[::1]:0"``, ``"0.0.0.0:10809"`` or ``"unix:/run/x.sock"``.

    Raises :class:`ConfigError`.
    """
    if text.startswith("unix:"):
        if not text[5:]:
            raise ConfigError(f"bad address {text!r}: empty socket path")
        return UnixAddress(text[5:])
    try:
        host, port = _split_host_port(text, default_port=None, min_port=0)
        if not host:  # explicit, so nothing is exported on every interface by accident
            raise ValueError("missing host (0.0.0.0 or [::] for every interface)")
    except ValueError as e:
        raise ConfigError(f"bad address {text!r}: {e}") from None
    return TcpAddress(host, port)


# ---------------------------------------------------------------------------
# the spec tree


@dataclass(frozen=True, slots=True, kw_only=True)
class FileSpec:
    """A local file or block device; ``size`` creates (sparse) or checks its size."""

    KIND: ClassVar[str] = "file"
    name: str
    path: str
    size: int | None = None
    read_only: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MemorySpec:
    """An in-memory device (tests, scratch)."""

    KIND: ClassVar[str] = "memory"
    name: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteSpec:
    """An NBD export: a dst node, nbdkit, qemu-nbd or another array."""

    KIND: ClassVar[str] = "remote"
    name: str
    uri: NbdUri


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearPart:
    """A member of a linear target: ``length`` bytes of ``target`` from ``start``."""

    target: TargetSpec
    start: int = 0
    length: int | None = None  # None: to the end of the member


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearSpec:
    """Members concatenated in order."""

    KIND: ClassVar[str] = "linear"
    name: str
    members: tuple[LinearPart, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StripeSpec:
    """Members interleaved every ``chunk_size`` bytes (RAID 0)."""

    KIND: ClassVar[str] = "stripe"
    name: str
    members: tuple[TargetSpec, ...]
    chunk_size: int = DEFAULT_CHUNK_SIZE


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorSpec:
    """Every member holds the same data (RAID 1); ``region_size`` is the bitmap grain."""

    KIND: ClassVar[str] = "mirror"
    name: str
    members: tuple[TargetSpec, ...]
    region_size: int = DEFAULT_REGION_SIZE


TargetSpec: TypeAlias = FileSpec | MemorySpec | RemoteSpec | LinearSpec | StripeSpec | MirrorSpec
KINDS: dict[str, type[TargetSpec]] = {
    c.KIND: c for c in (FileSpec, MemorySpec, RemoteSpec, LinearSpec, StripeSpec, MirrorSpec)
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ArraySpec:
    """One array: its name, NBD export addresses and name, I/O timeout and target tree."""

    name: str
    target: TargetSpec
    listen: tuple[ListenAddress, ...] = ()
    export: str | None = None  # None: serve both "" and ``name``
    io_timeout: float = DEFAULT_IO_TIMEOUT


def children(target: TargetSpec) -> tuple[TargetSpec, ...]:
    """The direct members of ``target`` (empty for leaves)."""
    if isinstance(target, LinearSpec):
        return tuple(p.target for p in target.members)
    if isinstance(target, StripeSpec | MirrorSpec):
        return target.members
    return ()


def walk(target: TargetSpec) -> Iterator[TargetSpec]:
    """``target`` and all its descendants in pre-order."""
    yield target
    for child in children(target):
        yield from walk(child)


def find_node(spec: ArraySpec | TargetSpec, name: str) -> TargetSpec | None:
    """The node called ``name``, or None."""
    root = spec.target if isinstance(spec, ArraySpec) else spec
    return next((t for t in walk(root) if t.name == name), None)


# ---------------------------------------------------------------------------
# errors


class SpecError(ConfigError):
    """A bad spec.  ``key`` is the key path, ``reason`` what is wrong with it;
    ``file``/``line`` are set when the spec came from a file (line is best effort)."""

    def __init__(self, key: str, reason: str, *, file: str = "", line: int | None = None):
        place = f"{file}:{line}" if file and line else file
        where = f"{place}: {key}" if place and key else (place or key)
        super().__init__(reason, where=where)
        self.key = key
        self.reason = reason
        self.file = file
        self.line = line


def _describe(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    if type(value) in names:
        return f"{names[type(value)]} {value!r}"
    return "an array" if isinstance(value, list | tuple) else "a table"


_MISSING: Any = object()


class _Table:
    """A mapping being validated: typed getters and a check that no key is left over."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise SpecError(path, f"expected a table, got {_describe(data)}")
        self.data: Mapping[str, object] = data
        self.path = path

    def allow(self, *keys: str) -> None:
        """Reject keys not in ``keys`` (first, so a typo is not reported as missing)."""
        for k in self.data:
            if k not in keys:
                close = difflib.get_close_matches(str(k), keys, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpecError(self.key(str(k)), f"unknown key{hint}")

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def raw(self, k: str, default: Any = _MISSING) -> Any:
        value = self.data.get(k)
        if value is None:
            if default is _MISSING:
                raise SpecError(self.key(k), "missing required key")
            return default
        return value

    def text(self, k: str, default: Any = _MISSING) -> Any:
        value = self.raw(k, default)
        if value is not default and not isinstance(value, str):
            raise SpecError(self.key(k), f"expected a string, got {_describe(value)}")
        return value

    def flag(self, k: str, default: bool) -> bool:
        value = self.raw(k, default)
        if not isinstance(value, bool):
            raise SpecError(self.key(k), f"expected true or false, got {_describe(value)}")
        return value

    def size(self, k: str, default: Any = _MISSING) -> Any:
        value = self.raw(k, default)
        if value is default:
            return value
        try:
            return parse_size(value)
        except ConfigError as e:
            raise SpecError(self.key(k), str(e)) from None

    def array(self, k: str) -> list[object]:
        value = self.raw(k, [])
        if not isinstance(value, list | tuple):
            raise SpecError(self.key(k), f"expected an array, got {_describe(value)}")
        return list(value)


# ---------------------------------------------------------------------------
# dict -> spec


def spec_from_dict(data: Mapping[str, Any]) -> ArraySpec:
    """Validate a document ``{"array": {...}}``; raises :class:`SpecError`."""
    doc = _Table(data, "")
    doc.allow("array")
    t = _Table(doc.raw("array"), "array")
    t.allow("name", "listen", "export", "io_timeout", "target")
    name = _name(t, "name", required=True)
    listen = []
    for i, item in enumerate(t.array("listen")):
        if not isinstance(item, str):
            raise SpecError(f"array.listen[{i}]", f"expected a string, got {_describe(item)}")
        try:
            listen.append(parse_listen(item))
        except ConfigError as e:
            raise SpecError(f"array.listen[{i}]", str(e)) from None
    export = t.text("export", None)
    io_timeout = t.raw("io_timeout", DEFAULT_IO_TIMEOUT)
    try:
        io_timeout = parse_duration(io_timeout)
    except ConfigError as e:
        raise SpecError("array.io_timeout", str(e)) from None
    target = _target(_Table(t.raw("target"), "array.target"))
    return ArraySpec(
        name=name,
        target=_assign_names(target, "array.target"),
        listen=tuple(listen),
        export=export,
        io_timeout=io_timeout,
    )


def target_from_dict(
    data: Mapping[str, Any], *, taken: Collection[str] = (), path: str = "spec"
) -> TargetSpec:
    """Validate one node dict (for adding a node to a running array).

    Names in ``taken`` (the array's existing nodes) must not be reused; generated
    names avoid them.  Raises :class:`SpecError` with keys under ``path``.
    """
    return _assign_names(_target(_Table(data, path)), path, taken=taken)


def linear_part_from_dict(
    data: Mapping[str, Any], *, taken: Collection[str] = (), path: str = "spec"
) -> LinearPart:
    """Like :func:`target_from_dict` for a linear member (may carry ``start``/``length``)."""
    part = _linear_part(_Table(data, path))
    return dataclasses.replace(part, target=_assign_names(part.target, path, taken=taken))


def _name(t: _Table, k: str, *, required: bool = False) -> str:
    value: str = t.text(k, _MISSING if required else "")
    if (value or required) and not NAME_RE.fullmatch(value):
        raise SpecError(t.key(k), f"bad name {value!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return value


_KEYS = {
    "file": ("path", "size", "read_only"),
    "memory": ("size",),
    "remote": ("uri",),
    "linear": ("members",),
    "stripe": ("members", "chunk_size"),
    "mirror": ("members", "region_size"),
}


def _target(t: _Table, *extra: str) -> TargetSpec:
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
    elif kind == "remote":
        text = t.text("uri")
        try:
            uri = parse_nbd_uri(text)
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
    else:
        region = _grain(t, "region_size", DEFAULT_REGION_SIZE)
        result = MirrorSpec(
            name=name, members=tuple(_target(m) for m in _members(t, 2)), region_size=region
        )
    return result


def _members(t: _Table, minimum: int) -> list[_Table]:
    items = t.array("members")
    if len(items) < minimum:
        kind = t.data["type"]
        raise SpecError(
            t.key("members"), f"{kind} needs at least {minimum} members, got {len(items)}"
        )
    return [_Table(m, f"{t.key('members')}[{i}]") for i, m in enumerate(items)]


def _linear_part(m: _Table) -> LinearPart:
    start = m.size("start", 0)
    length = m.size("length", None)
    if length == 0:
        raise SpecError(m.key("length"), "length must be > 0")
    return LinearPart(target=_target(m, "start", "length"), start=start, length=length)


def _grain(t: _Table, k: str, default: int) -> int:
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
    if isinstance(t, StripeSpec | MirrorSpec):
        return dataclasses.replace(t, name=name, members=tuple(sub))
    return dataclasses.replace(t, name=name)


# ---------------------------------------------------------------------------
# spec -> dict


def spec_to_dict(spec: ArraySpec, *, human: bool = False) -> dict[str, Any]:
    """The canonical document ``{"array": {...}}`` (JSON- and TOML-able).

    Sizes are ints, or with ``human`` strings like ``"64KiB"`` (both parse back).
    """
    array: dict[str, Any] = {"name": spec.name, "listen": [str(a) for a in spec.listen]}
    if spec.export is not None:
        array["export"] = spec.export
    array["io_timeout"] = spec.io_timeout
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
        d["uri"] = str(t.uri)
    elif isinstance(t, LinearSpec):
        d["members"] = [_part_to_dict(p, human=human) for p in t.members]
    elif isinstance(t, StripeSpec):
        d["chunk_size"] = size(t.chunk_size)
        d["members"] = [target_to_dict(m, human=human) for m in t.members]
    else:
        d["region_size"] = size(t.region_size)
        d["members"] = [target_to_dict(m, human=human) for m in t.members]
    return d


def _part_to_dict(p: LinearPart, *, human: bool) -> dict[str, Any]:
    d = target_to_dict(p.target, human=human)
    if p.start:
        d["start"] = format_size(p.start) if human else p.start
    if p.length is not None:
        d["length"] = format_size(p.length) if human else p.length
    return d


# ---------------------------------------------------------------------------
# TOML -> spec, with line numbers


def load_spec(path: str | os.PathLike[str]) -> ArraySpec:
    """Read and validate a TOML spec file; raises :class:`ConfigError`."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read spec: {e}", where=os.fspath(path)) from None
    return spec_from_toml(text, filename=os.fspath(path))


def spec_from_toml(text: str, *, filename: str = "<spec>") -> ArraySpec:
    """Parse and validate TOML text; errors name ``filename:line: key``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        where = f"{filename}:{m.group(1)}" if m else filename
        raise ConfigError(f"TOML syntax error: {e}", where=where) from None
    try:
        return spec_from_dict(data)
    except SpecError as e:
        raise SpecError(e.key, e.reason, file=filename, line=_line_of(text, e.key)) from None


def _line_of(text: str, key: str) -> int | None:
    lines = _locate(text)
    while key:
        if key in lines:
            return lines[key]
        key = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
    return None


_KEY_RE = re.compile(
    r"""\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)
_HEADER_RE = re.compile(r"\s*(\[\[?)([^\[\]]+)(\]\]?)\s*$")
_PART_RE = re.compile(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""")


def _parts(dotted: str) -> list[str]:
    return [p.strip("\"'") for p in _PART_RE.findall(dotted)]


def _locate(text: str) -> dict[str, int]:
    """Map key paths (``array.target.members[1].uri``) to 1-based line numbers."""
    found: dict[str, int] = {}
    aot: dict[str, int] = {}  # array-of-tables path -> elements seen
    table = ""
    open_array = ""  # key path of a multi-line array being read
    element = depth = 0
    in_string = ""
    for lineno, line in enumerate(text.splitlines(), start=1):
        code, in_string = _code(line, in_string)
        if open_array:
            stripped = code.strip()
            if depth == 1 and stripped and stripped[0] not in "],":
                found.setdefault(f"{open_array}[{element}]", lineno)
            depth, commas = _brackets(code, depth)
            element += commas
            open_array = open_array if depth > 0 else ""
            continue
        header = _HEADER_RE.match(code)
        if header:
            table = _resolve(_parts(header.group(2)), aot, array=header.group(1) == "[[")
            found.setdefault(table, lineno)
            if header.group(1) == "[[":
                found.setdefault(table.rsplit("[", 1)[0], lineno)
            continue
        key = _KEY_RE.match(code)
        if key:
            path = ".".join([table, *_parts(key.group(1))]).lstrip(".")
            found.setdefault(path, lineno)
            value = code[key.end() :].lstrip()
            if value.startswith("["):
                depth, element = _brackets(value, 0)
                open_array = path if depth > 0 else ""
    return found


def _brackets(code: str, depth: int) -> tuple[int, int]:
    """Bracket depth after ``code`` and the commas directly inside the outer array."""
    commas = 0
    for c in code:
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 1:
            commas += 1
    return depth, commas


def _resolve(parts: list[str], aot: dict[str, int], *, array: bool) -> str:
    path = ""
    for i, part in enumerate(parts):
        path = f"{path}.{part}" if path else part
        if array and i == len(parts) - 1:
            aot[path] = aot.get(path, 0) + 1
        if path in aot:
            path = f"{path}[{aot[path] - 1}]"
    return path


def _code(line: str, in_string: str) -> tuple[str, str]:
    """The line with comments dropped and string contents neutralised (no brackets,
    quotes or ``#`` left in them); ``in_string`` carries a multi-line string over."""
    out = []
    i = 0
    while i < len(line):
        if in_string:
            if line.startswith(in_string, i):
                i += len(in_string)
                out.append('"')
                in_string = ""
            else:
                if len(in_string) == 1:  # keep a harmless copy: quoted keys stay findable
                    out.append(line[i] if line[i].isalnum() or line[i] in "_-." else "_")
                i += 2 if in_string == '"' and line[i] == "\\" else 1
            continue
        c = line[i]
        if c == "#":
            break
        if c in "\"'":
            in_string = c * 3 if line.startswith(c * 3, i) else c
            i += len(in_string)
            out.append('"')
            continue
        out.append(c)
        i += 1
    if in_string in ('"', "'"):
        in_string = ""  # a one-line string never continues (it was a syntax error)
    return "".join(out), in_string
