"""The control operations: one frozen dataclass per request the daemon answers.

Theory of operation
-------------------
This is the catalogue of what can be asked of a daemon; how a request travels (the
envelope, the version, the error codes) is :mod:`dst.control.messages`.  Each
operation is a :class:`Request` whose ``OP`` is its wire name and whose dataclass
fields are its ``args``.  The field types are the contract: the decoder checks
arguments against them (``str``, ``str | None``, ``int``, ``bool``, ``dict``), and a
field with a default is optional.  :data:`REQUESTS` maps every wire name to its class;
an operation is added here and answered in :data:`dst.array.daemon.HANDLERS`.

Arguments naming things are consistent: ``array`` is an array name, ``node`` a
node name, ``spec`` a spec dict (the array document of :mod:`dst.array.spec` for
``create``, one node for ``add``/``replace``).  Specs are plain dicts here: this
layer sits below ``array/`` and the daemon validates them.

``events`` is answered by a stream of lines (:mod:`dst.control.stream`).
Ops marked *reserved* are defined for later issues; a daemon that does not
implement one answers ``not-implemented``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


class Request:
    """Base of all requests; ``OP`` is the wire name, dataclass fields the args."""

    __slots__ = ()
    OP: ClassVar[str]


@dataclass(frozen=True, slots=True)
class Create(Request):
    """Create an array from a spec document ``{"array": {...}}`` (not started)."""

    OP: ClassVar[str] = "create"
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Start(Request):
    """Assemble and export a created array."""

    OP: ClassVar[str] = "start"
    array: str


@dataclass(frozen=True, slots=True)
class Stop(Request):
    """Flush, stop exporting and close an array."""

    OP: ClassVar[str] = "stop"
    array: str


@dataclass(frozen=True, slots=True)
class Add(Request):
    """Add a node (a node spec dict); for a linear array it is appended."""

    OP: ClassVar[str] = "add"
    array: str
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Remove(Request):
    """Remove a node (for a linear array, the last one)."""

    OP: ClassVar[str] = "remove"
    array: str
    node: str


@dataclass(frozen=True, slots=True)
class Status(Request):
    """Status of one array, or of all when ``array`` is None."""

    OP: ClassVar[str] = "status"
    array: str | None = None


@dataclass(frozen=True, slots=True)
class Fail(Request):
    """Take mirror leg ``node`` out for maintenance (its misses are recorded)."""

    OP: ClassVar[str] = "fail"
    array: str
    node: str


@dataclass(frozen=True, slots=True)
class Readd(Request):
    """Bring failed leg ``node`` back, resyncing what it missed; ``full`` copies
    everything and discards the leg's own data (the way out of a split brain)."""

    OP: ClassVar[str] = "readd"
    array: str
    node: str
    full: bool = False


@dataclass(frozen=True, slots=True)
class Suspend(Request):
    """Reserved: hold I/O to one node, or to the whole array when ``node`` is None."""

    OP: ClassVar[str] = "suspend"
    array: str
    node: str | None = None


@dataclass(frozen=True, slots=True)
class Resume(Request):
    """Reserved: undo :class:`Suspend`."""

    OP: ClassVar[str] = "resume"
    array: str
    node: str | None = None


@dataclass(frozen=True, slots=True)
class Replace(Request):
    """Replace ``node`` by the node ``spec``, copying its data live (in the background:
    progress under ``replace`` in the array's status)."""

    OP: ClassVar[str] = "replace"
    array: str
    node: str
    spec: dict[str, Any]
    rate: int = 0  # bytes/s the copy may take (0: the mirror's resync rate, or unlimited)


@dataclass(frozen=True, slots=True)
class CancelReplace(Request):
    """Stop the running replace of the array; it goes back to the old node."""

    OP: ClassVar[str] = "cancel-replace"
    array: str


@dataclass(frozen=True, slots=True)
class Verify(Request):
    """Start comparing mirror legs in the background (progress in status); with
    ``repair`` rewrite differing regions from leg ``source`` (default: the first in
    sync).  ``mirror`` names the mirror when the array has several."""

    OP: ClassVar[str] = "verify"
    array: str
    repair: bool = False
    source: str | None = None
    mirror: str | None = None


@dataclass(frozen=True, slots=True)
class ResyncRate(Request):
    """Limit resync to ``rate`` bytes per second (0: unlimited), and when the array
    is idle let it go at least ``min_rate`` (0: no floor); every mirror of the
    array, or only ``mirror``."""

    OP: ClassVar[str] = "resync-rate"
    array: str
    rate: int
    min_rate: int = 0
    mirror: str | None = None


@dataclass(frozen=True, slots=True)
class Reload(Request):
    """Re-read the ACL file and TLS credentials of ``array``'s export (all when None)."""

    OP: ClassVar[str] = "reload"
    array: str | None = None


@dataclass(frozen=True, slots=True)
class Shutdown(Request):
    """Reserved: stop every array and exit the daemon."""

    OP: ClassVar[str] = "shutdown"


@dataclass(frozen=True, slots=True)
class Events(Request):
    """Stream state changes as JSON lines (``now``: the current state first)."""

    OP: ClassVar[str] = "events"
    now: bool = False


REQUESTS: dict[str, type[Request]] = {
    c.OP: c
    for c in (
        Create,
        Start,
        Stop,
        Add,
        Remove,
        Status,
        Fail,
        Readd,
        Suspend,
        Resume,
        Replace,
        CancelReplace,
        Reload,
        Verify,
        ResyncRate,
        Shutdown,
        Events,
    )
}
