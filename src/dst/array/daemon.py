"""The array daemon: arrays built from specs, exported over NBD, run over a control socket.

Theory of operation
-------------------
The :class:`Daemon` holds the arrays (:class:`~dst.array.array.Array`) of one process and
answers control requests (:mod:`dst.control.operations`) through one table, :data:`HANDLERS`:
request type -> the function that answers it.  Every failure is a :class:`ControlError`
with a stable code: ``no-such-array``, ``exists``, ``bad-spec``, ``bad-args``,
``cannot-grow``, ``cannot-remove``, ``not-running``, ``node-unreachable``, ``refused``,
``busy``, ``timeout``, ``no-such-node``, ``not-a-node``, ``not-a-leg``, ``not-mirror``,
``last-leg``, ``not-failed``, ``not-suspended``, ``not-replacing``, ``listen-failed``,
``bad-acl``; a
domain error an operation did not map is ``failed`` with its message; only bugs are
``internal``.

Status shape (``status`` op), JSON-able::

    {"arrays": [{"name", "state", "algorithm", "size", "exports": [uri, ...],
                 "suspended", "held", "replace", "spec", "root": NODE}]}

with NODE as in :mod:`dst.array.status`.

The daemon also streams its state changes (``events``, :mod:`dst.array.events`) and,
given ``metrics``, serves Prometheus metrics (:mod:`dst.array.metrics`) on its own
endpoint (:mod:`dst.net.metricsserver`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from dst import stats
from dst.array import ops, reshape
from dst.array.array import Array, bad_spec
from dst.array.events import EventHub
from dst.array.spec import ArraySpec
from dst.array.specdict import spec_from_dict
from dst.control import operations as op
from dst.control.server import ControlServer
from dst.errors import ConfigError, ControlError, DstError
from dst.net.metricsserver import MetricsOptions, MetricsServer

log = logging.getLogger(__name__)


class Daemon:
    """All arrays of this process, and the control socket that manages them."""

    def __init__(
        self, control_path: str | None = None, *, metrics: MetricsOptions | None = None
    ) -> None:
        self.control_path = control_path
        self.arrays: dict[str, Array] = {}
        self._control: ControlServer | None = None
        self.stopping = asyncio.Event()
        self.events = EventHub(self.arrays)
        self.metrics: MetricsServer | None = None
        if metrics is not None:
            from dst.array.metrics import collector
            from dst.net.metrics import registry

            stats.enable()  # time the I/O of the arrays built from now on
            self.metrics = MetricsServer(registry(collector(self.arrays)), metrics)

    async def start(self) -> None:
        """Listen on the control socket and the metrics endpoint.  Raises OSError."""
        if self.metrics is not None:
            await self.metrics.start()
        if self.control_path is not None:
            self._control = ControlServer(self.control_path, self.handle)
            await self._control.start()

    async def close(self) -> None:
        self.events.close()
        if self._control is not None:
            await self._control.close()
            self._control = None
        for array in list(self.arrays.values()):
            await array.stop()
        if self.metrics is not None:
            await self.metrics.close()

    def array(self, name: str) -> Array:
        try:
            return self.arrays[name]
        except KeyError:
            raise ControlError("no-such-array", f"no array named {name!r}", field="array") from None

    async def create(self, spec: ArraySpec, *, start: bool = True) -> Array:
        if spec.name in self.arrays:
            raise ControlError(
                "exists", f"an array named {spec.name!r} exists", field="spec.array.name"
            )
        array = Array(spec)
        self.arrays[spec.name] = array
        if start:
            try:
                await array.start()
            except ControlError:
                del self.arrays[spec.name]
                raise
        return array

    def status(self, name: str | None = None) -> dict[str, Any]:
        arrays: Iterable[Array] = [self.array(name)] if name is not None else self.arrays.values()
        return {"arrays": [a.status() for a in arrays]}

    def reload(self, name: str | None = None) -> dict[str, Any]:
        """Re-read the ACL file and TLS credentials of one array's export, or of all
        (SIGHUP).  Raises ControlError ``bad-acl`` naming the file; the old stay."""
        done: dict[str, Any] = {}
        for array in [self.array(name)] if name is not None else self.arrays.values():
            if array.server is not None:
                try:
                    done[array.name] = array.server.reload()
                except ConfigError as exc:
                    raise ControlError("bad-acl", f"{array.name}: {exc}") from None
        return done

    async def handle(self, req: op.Request) -> Any:
        """Answer one control request.  Raises ControlError."""
        handler = HANDLERS.get(type(req))
        if handler is None:
            raise ControlError("not-implemented", f"operation {req.OP!r} is not implemented")
        try:
            return await handler(self, req)
        except ControlError:
            raise
        except DstError as exc:
            log.warning("%s failed: %s", req.OP, exc)
            raise ControlError("failed", str(exc)) from None
        finally:
            self.events.poke()


# -- the control request table --------------------------------------------------------

Handler = Callable[[Daemon, Any], Awaitable[Any]]


async def _status(d: Daemon, req: op.Status) -> Any:
    return d.status(req.array)


async def _create(d: Daemon, req: op.Create) -> Any:
    try:
        spec = spec_from_dict(req.spec)
    except ConfigError as exc:
        raise bad_spec(exc) from None
    return (await d.create(spec)).status()


async def _reload(d: Daemon, req: op.Reload) -> Any:
    return d.reload(req.array)


async def _events(d: Daemon, req: op.Events) -> Any:
    return d.events.subscribe(now=req.now)


async def _shutdown(d: Daemon, req: op.Shutdown) -> Any:
    d.stopping.set()
    return {}


def _on_array(act: Callable[[Array, Any], Awaitable[Any] | None]) -> Handler:
    """A handler that does ``act(array, req)`` to the request's array and answers with
    the array's status."""

    async def handler(d: Daemon, req: Any) -> Any:
        array = d.array(req.array)
        result = act(array, req)
        if result is not None:
            await result
        return array.status()

    return handler


async def _readd(d: Daemon, req: op.Readd) -> Any:
    return await ops.readd(d.array(req.array), req.node, full=req.full)


HANDLERS: dict[type[op.Request], Handler] = {
    op.Status: _status,
    op.Create: _create,
    op.Shutdown: _shutdown,
    op.Reload: _reload,
    op.Events: _events,
    op.Readd: _readd,
    op.Start: _on_array(lambda a, r: a.start()),
    op.Stop: _on_array(lambda a, r: a.stop()),
    op.Add: _on_array(lambda a, r: reshape.add(a, r.spec)),
    op.Remove: _on_array(lambda a, r: reshape.remove(a, r.node)),
    op.Replace: _on_array(lambda a, r: reshape.replace(a, r.node, r.spec, rate=r.rate)),
    op.CancelReplace: _on_array(lambda a, r: reshape.cancel_replace(a)),
    op.Fail: _on_array(lambda a, r: ops.fail(a, r.node)),
    op.Suspend: _on_array(lambda a, r: ops.suspend(a, r.node)),
    op.Resume: _on_array(lambda a, r: ops.resume(a, r.node)),
    op.Verify: _on_array(
        lambda a, r: ops.verify(a, repair=r.repair, source=r.source, mirror=r.mirror)
    ),
    op.ResyncRate: _on_array(lambda a, r: ops.resync_rate(a, r.rate, r.min_rate, r.mirror)),
}


async def run_daemon(
    control_path: str | None,
    *,
    specs: Iterable[ArraySpec] = (),
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Daemon], None] | None = None,
    metrics: MetricsOptions | None = None,
) -> None:
    """Run a daemon with ``specs`` started until ``stop`` (or a shutdown request) is set.

    ``on_ready`` is called once the control socket accepts and ``specs`` run; with
    ``metrics`` the daemon serves Prometheus metrics there.
    """
    daemon = Daemon(control_path, metrics=metrics)
    await daemon.start()
    try:
        for spec in specs:
            await daemon.create(spec)
        if on_ready is not None:
            on_ready(daemon)
        waiters = [asyncio.ensure_future(daemon.stopping.wait())]
        if stop is not None:
            waiters.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
    finally:
        await daemon.close()
