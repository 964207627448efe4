"""The array spec (the "table"): what an array is made of, parsed and validated.

Theory of operation
-------------------
A spec is a tree of frozen dataclasses.  :class:`ArraySpec` names the array, where
it is exported and its root ``target``; a target is a leaf (:class:`FileSpec`,
:class:`MemorySpec`, :class:`RemoteSpec`) or a composite (:class:`LinearSpec`,
:class:`StripeSpec`, :class:`MirrorSpec`, :class:`Raid5Spec`, :class:`Raid6Spec`) whose
members are targets again, so
arrays nest (DST's "tree-like storages").  Every node has a ``name`` unique in the
array; unnamed nodes get ``node<i>``, ``i`` being the node's position in pre-order
(the root is ``node0``), or the next free number if that is taken.

The tree is validated from a TOML file (:mod:`dst.array.specfile`) or a plain dict of
the same shape by :mod:`dst.array.specdict`, and turned back into one by
:mod:`dst.array.speccanon`; a running array reports its spec from its devices, so it
says exactly what it runs.

Document shape::

    [array]                       name, listen = [...], export, io_timeout, acl
    [array.tls]                   mode, certificates, verify_peer, psk (the export)
    [array.target]                type = mirror|raid5|raid6|linear|stripe|remote|file|memory|missing
    [[array.target.members]]      members of a composite, recursively

Security (:mod:`dst.net.tls`, :mod:`dst.net.acl`): ``[array.tls]`` is the export's
``dst serve --tls*`` (``certificates`` without ``mode`` means ``require``); ``acl`` a
rules file.  Plaintext exports are allowed on loopback and unix sockets only: another
``listen`` address needs ``[array.tls]`` (``mode = "off"`` says plaintext on purpose).
A remote member over TLS is an ``nbds://`` / ``nbds+unix://`` URI whose
``tls-certificates=DIR`` query names its client credentials (libnbd's syntax).

A member of a linear target may carry ``start`` and ``length``: the part of that
member that is used (default: from 0 to its end).  (``length``, not ``size``,
because ``size`` already means the size of a file or memory leaf.)

Values use the shared grammars: sizes and durations of :mod:`dst.units`
(``"64KiB"``, ``"30s"``), addresses of :mod:`dst.net.address` -- ``listen``
entries in its ``listen`` form (host and port written out, or ``unix:PATH``), a
remote member's ``uri`` in its ``uri`` form (``nbd://`` or ``nbd+unix://``).

Errors are :class:`SpecError` (a :class:`~dst.errors.ConfigError`) naming the key
path, e.g. ``array.target.members[1].uri``; :mod:`dst.array.specfile` adds
``file:line`` for specs read from TOML.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from dst.errors import ConfigError
from dst.meta.layout import DEFAULT_CLEAR_DELAY
from dst.net.address import Address
from dst.net.tls import ServerTlsConfig

KiB = 1 << 10
DEFAULT_CHUNK_SIZE = 64 * KiB
DEFAULT_PARITY_CHUNK = 32 * KiB  # ISA-L's RAID6 encoding is fastest at 16-32 KiB
MIN_CHUNK_SIZE = 4 * KiB
DEFAULT_IO_TIMEOUT = 30.0
DEFAULT_LEG_TIMEOUT = 10.0

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

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
class MissingSpec:
    """A mirror leg that is not there (``dst assemble --degraded``): it stays failed
    until ``dst replace`` puts a node in its place."""

    KIND: ClassVar[str] = "missing"
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteSpec:
    """An NBD export: a dst node, nbdkit, qemu-nbd or another array."""

    KIND: ClassVar[str] = "remote"
    name: str
    uri: Address


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
    """Every member holds the same data (RAID 1).

    ``region_size`` is the write-intent bitmap's grain (None: the members' own, fixed
    when they were formatted; 1 MiB for new ones); with ``metadata`` (the default) a
    superblock and the bitmap live at the end of every member, so the array survives
    crashes and is assembled from its members.  ``leg_timeout``: a leg
    that does not answer within it is failed.  ``resync_rate``/``resync_min_rate``
    (bytes/s, 0: unlimited/none) bound the background resync.  ``clear_delay``: how
    long a region stays idle before its write-intent bit is cleared.
    """

    KIND: ClassVar[str] = "mirror"
    name: str
    members: tuple[TargetSpec, ...]
    region_size: int | None = None
    metadata: bool = True
    leg_timeout: float = DEFAULT_LEG_TIMEOUT
    resync_rate: int = 0
    resync_min_rate: int = 0
    clear_delay: float = DEFAULT_CLEAR_DELAY


@dataclass(frozen=True, slots=True, kw_only=True)
class ParitySpec:
    """Members striped with rotating parity: RAID5 (:class:`Raid5Spec`, P) or RAID6
    (:class:`Raid6Spec`, P and Q); ``chunk_size`` bytes per chunk.

    The other keys are the mirror's (metadata at the end of every member, the
    write-intent bitmap, timeouts, resync rates).  ``start_dirty_degraded`` lets an
    array start that crashed while (or then found itself) missing a member, accepting
    that the regions dirty at the crash may rebuild wrongly (the write hole; see
    ``docs/parity.md``); it is a one-shot: the running array reports it false.
    """

    KIND: ClassVar[str] = ""
    PARITY: ClassVar[int] = 0
    name: str
    members: tuple[TargetSpec, ...]
    chunk_size: int = DEFAULT_PARITY_CHUNK
    region_size: int | None = None
    metadata: bool = True
    leg_timeout: float = DEFAULT_LEG_TIMEOUT
    resync_rate: int = 0
    resync_min_rate: int = 0
    clear_delay: float = DEFAULT_CLEAR_DELAY
    start_dirty_degraded: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Raid5Spec(ParitySpec):
    """RAID5: one parity chunk per stripe; 3 or more members."""

    KIND: ClassVar[str] = "raid5"
    PARITY: ClassVar[int] = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Raid6Spec(ParitySpec):
    """RAID6: two parity chunks (P, Q) per stripe; 4 or more members."""

    KIND: ClassVar[str] = "raid6"
    PARITY: ClassVar[int] = 2


TargetSpec: TypeAlias = (
    FileSpec
    | MemorySpec
    | RemoteSpec
    | MissingSpec
    | LinearSpec
    | StripeSpec
    | MirrorSpec
    | Raid5Spec
    | Raid6Spec
)
_ALL = (FileSpec, MemorySpec, RemoteSpec, MissingSpec, LinearSpec, StripeSpec, MirrorSpec,
        Raid5Spec, Raid6Spec)  # fmt: skip
KINDS: dict[str, type[TargetSpec]] = {c.KIND: c for c in _ALL}


@dataclass(frozen=True, slots=True, kw_only=True)
class ArraySpec:
    """One array: its name, NBD export addresses and name, I/O timeout and target tree;
    the export's TLS settings (None: not given) and ACL file."""

    name: str
    target: TargetSpec
    listen: tuple[Address, ...] = ()
    export: str | None = None  # None: serve both "" and ``name``
    io_timeout: float = DEFAULT_IO_TIMEOUT
    tls: ServerTlsConfig | None = None
    acl: str | None = None


def children(target: TargetSpec) -> tuple[TargetSpec, ...]:
    """The direct members of ``target`` (empty for leaves)."""
    if isinstance(target, LinearSpec):
        return tuple(p.target for p in target.members)
    if isinstance(target, StripeSpec | MirrorSpec | ParitySpec):
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
