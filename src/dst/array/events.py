"""``dst events``: the daemon's state changes as a stream of JSON objects.

Theory of operation
-------------------
Like ``drbdsetup events2``, the stream reports *objects* and their state: every array,
every storage node of a running array, every mirror's resync, the array's replace job
and verify jobs.  :func:`snapshot` reads them off the running trees (the state words
of status, :func:`dst.array.status.walk`); :class:`EventHub` keeps the last snapshot
and, whenever something may have changed, takes a new one and sends the differences
to every subscriber, in order:

* ``create`` -- an object appeared (an array created, a node added, a replace started);
* ``change`` -- some of its attributes changed; ``old`` holds their previous values;
* ``destroy`` -- it is gone (a node removed or replaced);
* ``exists`` -- with ``--now``, the current state first, ended by
  ``{"event": "exists", "object": "-"}``.

A leg that fails is a ``change`` of its node to ``state: failed`` (with the reason); a
re-add, ``failed -> resyncing``; a resync that starts or finishes, a ``change`` of the
resync object to ``running`` (with its kind: full or delta) or ``done``; a suspended
array, ``suspended: true``; a replaced member, the replace job's ``change`` to
``finished`` with the old node's ``destroy``.  Every object carries ``seq`` (increasing
per daemon) and ``time`` (Unix time).

"Something may have changed": the code that changes such state calls
:func:`dst.changes.changed` (a leg failing, a re-add, a resync starting or ending, a
connection lost or back, a replace or verify ending), the daemon after every control
request, and a timer every :data:`POLL` seconds catches the rest.  The new snapshot is
taken soon after (``call_soon``: several changes of one loop turn make one diff).
With no subscriber the hub does nothing at all.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dst import changes
from dst.array.array import Array
from dst.array.status import walk
from dst.control.stream import Stream
from dst.targets.redundant import Redundant

POLL = 1.0  # seconds between snapshots taken without being told
Key = tuple[str, ...]
Snapshot = dict[Key, dict[str, Any]]
KEYS = {  # the fields that name an object of each kind, after the kind
    "array": ("array",),
    "node": ("array", "node"),
    "resync": ("array", "target"),
    "verify": ("array", "target"),
    "replace": ("array",),
}


def snapshot(arrays: Iterable[Array]) -> Snapshot:
    """Every object of the module docstring and its attributes, in a stable order."""
    out: Snapshot = {}
    for a in arrays:
        out[("array", a.name)] = {"state": a.state, "suspended": False, "degraded": False}
        root = a.root
        if root is None:
            continue
        mirrors = []
        for dev, parent, state in walk(root.inner, keepers=a.keepers):
            if dev.node:
                out[("node", a.name, dev.name)] = {
                    "target": parent.name if parent is not None else "",
                    "state": state,
                    "reason": _reason(parent, dev),
                }
            if isinstance(dev, Redundant):
                mirrors.append(dev)
        for mirror in mirrors:  # after the nodes: a leg is in sync, then the resync is done
            _keeper_objects(out, a, mirror)
        degraded = any(str(leg.state) != "in_sync" for m in mirrors for leg in m.legs)
        out[("array", a.name)] |= {"suspended": root.suspended, "degraded": degraded}
        job = a.replace_job
        if job is not None:
            out[("replace", a.name)] = {"state": job.state, "node": job.old.name,
                                        "new": job.new.name, "error": job.error}  # fmt: skip
    return out


def _reason(parent: Any, dev: Any) -> str:
    """Why a mirror leg is in its state (empty for other nodes)."""
    if isinstance(parent, Redundant):
        for leg in parent.legs:
            if leg.dev is dev:
                return leg.reason
    return ""


def _keeper_objects(out: Snapshot, a: Array, mirror: Redundant) -> None:
    keeper = a.keepers.get(mirror.name)
    if keeper is None:
        return
    r = keeper.resyncer
    legs = mirror.legs
    if r.current is not None:
        names = [legs[t].dev.name for t in r.current.targets if t < len(legs)]
        resync = {"state": "running", "kind": r.current.kind or r.kind, "targets": names}
    elif r.last is not None:
        names = [legs[t].dev.name for t in r.last.targets if t < len(legs)]
        resync = {"state": r.last.state, "kind": r.kind, "targets": names}
    else:
        resync = {"state": "idle", "kind": "", "targets": []}
    out[("resync", a.name, mirror.name)] = resync
    job = keeper.verify_job
    if job is not None:
        out[("verify", a.name, mirror.name)] = {"state": job.state, "repair": job.repair}


def diff(old: Snapshot, new: Snapshot) -> list[dict[str, Any]]:
    """The events that take ``old`` to ``new`` (without ``seq`` and ``time``): what
    appeared, in the snapshot's order (an array before its nodes); what changed, an
    array's own change last (its nodes' changes are why it changed); what is gone."""
    created: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    arrays: list[dict[str, Any]] = []
    for key, attrs in new.items():
        before = old.get(key)
        if before is None:
            created.append(_event("create", key, attrs))
        elif before != attrs:
            was = {k: before.get(k) for k, v in attrs.items() if before.get(k) != v}
            (arrays if key[0] == "array" else changed).append(
                _event("change", key, attrs) | {"old": was}
            )
    gone = [_event("destroy", key, attrs) for key, attrs in old.items() if key not in new]
    return [*created, *changed, *arrays, *gone]


def _event(event: str, key: Key, attrs: Mapping[str, Any]) -> dict[str, Any]:
    kind = key[0]
    return {"event": event, "object": kind, **dict(zip(KEYS[kind], key[1:], strict=True)),
            **attrs}  # fmt: skip


class EventHub:
    """The daemon's event stream over ``arrays`` (module docstring)."""

    def __init__(self, arrays: Mapping[str, Array]) -> None:
        self.arrays = arrays
        self.streams: list[Stream] = []
        self._seq = itertools.count(1)
        self._last: Snapshot = {}
        self._scheduled = False
        self._unlisten: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def subscribe(self, *, now: bool = False) -> Stream:
        """A new stream of events from now on; with ``now``, the current state first."""
        if not self.streams:
            self._last = snapshot(self.arrays.values())
            self._unlisten = changes.listen(self.poke)
            self._tick()
        else:
            self._update()  # so that "now" is now, and the others hear what led to it
        stream = Stream(on_close=lambda: self._forget(stream))
        if now:
            for key, attrs in self._last.items():
                stream.put(self._stamp(_event("exists", key, attrs)))
            stream.put(self._stamp({"event": "exists", "object": "-"}))
        self.streams.append(stream)
        return stream

    def poke(self) -> None:
        """Something may have changed: diff soon (once per loop turn)."""
        if self.streams and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._update)

    def close(self) -> None:
        for stream in list(self.streams):
            stream.close()

    def _update(self) -> None:
        self._scheduled = False
        if not self.streams:
            return
        new = snapshot(self.arrays.values())
        events = diff(self._last, new)
        self._last = new
        for e in events:
            line = self._stamp(e)
            for stream in list(self.streams):
                stream.put(line)

    def _stamp(self, event: dict[str, Any]) -> dict[str, Any]:
        return {"seq": next(self._seq), "time": round(time.time(), 6), **event}

    def _tick(self) -> None:
        self.poke()
        self._timer = asyncio.get_running_loop().call_later(POLL, self._tick)

    def _forget(self, stream: Stream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
        if not self.streams:
            if self._unlisten is not None:
                self._unlisten()
                self._unlisten = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
