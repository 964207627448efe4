"""The array commands of the CLI: talk to the daemon's control socket.

Each ``cmd_*`` function takes plain values from argparse, does one control request
and prints the result; errors are :class:`~dst.errors.DstError` for the CLI's edge
to turn into one line.  ``dst status`` draws with :func:`dst.view.render_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from dst.control.client import call
from dst.errors import ControlError, DstError
from dst.units import format_size
from dst.view import render_status

if TYPE_CHECKING:
    from dst.array.daemon import Daemon
    from dst.net.metricsserver import MetricsOptions

log = logging.getLogger(__name__)


def default_control() -> str:
    """``$DST_CONTROL``, else ``/tmp/dst-<uid>/control.sock`` (shared by dst up and dst status)."""
    env = os.environ.get("DST_CONTROL")
    if env:
        return env
    return f"/tmp/dst-{os.getuid()}/control.sock"


def request(control: str, op: str, args: dict[str, Any] | None = None) -> Any:
    """One control request; an unreachable daemon gets a message saying what to do."""
    try:
        return call(control, op, args or {})
    except ControlError as exc:
        raise _no_daemon(control, exc) from None


def _no_daemon(control: str, exc: ControlError) -> DstError:
    if exc.code == "unreachable":
        return DstError(
            f"no array daemon at {control} (start one with 'dst daemon' or 'dst up', "
            "or point --control / $DST_CONTROL at it)"
        )
    return exc


# -- commands ---------------------------------------------------------------------------


def cmd_daemon(
    control: str, spec_files: list[str], *, metrics: MetricsOptions | None = None
) -> int:
    """Run the array daemon in the foreground until SIGTERM/SIGINT (with ``metrics``,
    serving Prometheus metrics; ``metrics on URL`` follows the readiness line)."""
    from dst.array.daemon import run_daemon
    from dst.array.specfile import load_spec
    from dst.net.loop import run

    specs = [load_spec(f) for f in spec_files]
    Path(control).parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(daemon: Daemon) -> None:
            loop.add_signal_handler(signal.SIGHUP, reload_logged, daemon)
            print(f"control socket {control}", flush=True)
            if daemon.metrics is not None:
                print(f"metrics on {daemon.metrics.url}", flush=True)

        await run_daemon(control, specs=specs, stop=stop, on_ready=ready, metrics=metrics)

    run(main())
    return 0


def reload_logged(daemon: Daemon) -> None:
    """SIGHUP: re-read every array's ACL file and TLS credentials; errors are logged
    and the settings in force stay."""
    try:
        done = daemon.reload()
    except ControlError as exc:
        log.error("reload failed, keeping the settings in force: %s", exc)
        return
    log.warning("reloaded ACLs and TLS credentials of %s", ", ".join(done) or "no array")


def cmd_events(control: str, *, now: bool) -> int:
    """Print the daemon's events as JSON lines until it stops (or Ctrl-C)."""
    from dst.control.client import stream

    try:
        for item in stream(control, "events", {"now": now}):
            print(json.dumps(item), flush=True)
    except ControlError as exc:
        raise _no_daemon(control, exc) from None
    except BrokenPipeError:  # | head: the reader is gone
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    return 0


def cmd_reload(control: str, array: str | None) -> int:
    """Re-read ACL files and TLS credentials in the daemon; print what was reloaded."""
    done = request(control, "reload", {"array": array} if array else {})
    for name, what in done.items():
        parts = [f"{what['rules']} ACL rules from {what['acl']}"] if "acl" in what else []
        parts += [f"TLS {what['tls']}"] if "tls" in what else []
        print(f"{name}: reloaded {', '.join(parts) or 'nothing (no ACL, no TLS)'}")
    return 0


def cmd_create(control: str, spec_file: str) -> int:
    from dst.array.speccanon import spec_to_dict
    from dst.array.specfile import load_spec

    spec = load_spec(spec_file)
    result = request(control, "create", {"spec": spec_to_dict(spec)})
    _print_summary(result)
    return 0


def cmd_simple(control: str, op: str, args: dict[str, Any]) -> int:
    result = request(control, op, args)
    _print_summary(result)
    return 0


def node_spec(
    *, uri: str | None, path: str | None, size: str | None, name: str | None, verb: str
) -> dict[str, Any]:
    """A node spec dict from the CLI's --uri/--path/--size/--name."""
    node: dict[str, Any]
    if uri is not None:
        node = {"type": "remote", "uri": uri}
    elif path is not None:
        # The daemon may run elsewhere: a relative path means the caller's directory.
        node = {"type": "file", "path": os.path.abspath(path)}
        if size is not None:
            node["size"] = size
    else:
        raise DstError(f"say which node to {verb}: --uri URI or --path PATH")
    if name is not None:
        node["name"] = name
    return node


def cmd_replace(
    control: str, array: str, old: str, node: dict[str, Any], *, wait: bool, rate: str | None
) -> int:
    """Start replacing ``old`` by ``node``; with ``wait`` follow it to the end."""
    from dst.units import parse_size

    args: dict[str, Any] = {"array": array, "node": old, "spec": node}
    if rate is not None:
        args["rate"] = parse_size(rate)
    request(control, "replace", args)
    if not wait:
        print(f"{array}: replacing {old} (see dst status {array}; dst cancel-replace {array})")
        return 0
    console = Console(stderr=True)
    job: dict[str, Any] = {}
    with console.status(f"replacing {old}") as spinner:
        while True:
            job = request(control, "status", {"array": array})["arrays"][0].get("replace") or {}
            done, total = job.get("regions_done") or 0, job.get("regions_total") or 0
            speed = job.get("rate") or 0
            spinner.update(
                f"replacing {old} by {job.get('new')}: {done}/{total} regions, "
                f"{format_size(int(speed))}/s"
            )
            if job.get("state") not in ("starting", "copying"):
                break
            asyncio.run(asyncio.sleep(0.2))
    state = job.get("state")
    if state != "finished":
        raise DstError(f"replace of {old} {state}: {job.get('error') or 'array unchanged'}")
    copied = format_size(int(job.get("bytes") or 0))
    print(f"{array}: {old} replaced by {job.get('new')} ({copied} copied)")
    return 0


def cmd_add(
    control: str,
    array: str,
    *,
    uri: str | None,
    path: str | None,
    size: str | None,
    name: str | None,
    start: str | None,
    length: str | None,
) -> int:
    node = node_spec(uri=uri, path=path, size=size, name=name, verb="add")
    if start is not None:
        node["start"] = start
    if length is not None:
        node["length"] = length
    return cmd_simple(control, "add", {"array": array, "spec": node})


def cmd_assemble(
    control: str,
    members: list[str],
    *,
    name: str | None,
    listen: list[str],
    export: str | None,
    dry_run: bool,
    degraded: bool = False,
    force: bool = False,
) -> int:
    """Rebuild a mirror or parity array from its members' superblocks and start it in
    the daemon (``degraded``: without the members not given; ``force``: a parity array
    may start dirty and degraded)."""
    from dst.array.assemble import assemble_spec, probe_all
    from dst.array.speccanon import spec_to_dict
    from dst.array.specdict import spec_from_dict

    async def probe() -> Any:
        return await probe_all(members)

    found = asyncio.run(probe())
    for f in found:
        state = "dirty" if f.sb.state.name == "DIRTY" else "clean"
        sync = ", being resynced" if f.sb.inconsistent else ""
        print(f"{f.location}: member {f.sb.role} of {f.sb.array_name!r} ({f.sb.array_uuid}), "
              f"events {f.sb.events}, {state}{sync}")  # fmt: skip
    doc = assemble_spec(found, name=name, listen=listen, export=export, degraded=degraded,
                        force=force)  # fmt: skip
    spec = spec_from_dict(doc)  # the same checks as a spec file
    if dry_run:
        print(json.dumps(spec_to_dict(spec, human=True), indent=2))
        return 0
    result = request(control, "create", {"spec": spec_to_dict(spec)})
    _print_summary(result)
    return 0


def cmd_readd(control: str, array: str, node: str, *, full: bool) -> int:
    r = request(control, "readd", {"array": array, "node": node, "full": full})
    what = "everything" if r.get("full") else f"{r.get('regions')} regions"
    print(f"{node}: re-added ({r.get('relation')}), resyncing {what}")
    return 0


def cmd_resync_rate(
    control: str, array: str, rate: str, *, min_rate: str | None, mirror: str | None
) -> int:
    from dst.units import parse_size

    args: dict[str, Any] = {"array": array, "rate": parse_size(rate)}
    if min_rate is not None:
        args["min_rate"] = parse_size(min_rate)
    if mirror is not None:
        args["mirror"] = mirror
    return cmd_simple(control, "resync-rate", args)


def cmd_verify(
    control: str,
    array: str,
    *,
    repair: bool,
    source: str | None,
    mirror: str | None,
    wait: bool,
) -> int:
    """Start a verify; with ``wait`` follow it and exit 1 if legs differ unrepaired."""
    args: dict[str, Any] = {"array": array, "repair": repair}
    if source is not None:
        args["source"] = source
    if mirror is not None:
        args["mirror"] = mirror
    request(control, "verify", args)
    if not wait:
        print(f"{array}: verify started (see dst status {array})")
        return 0
    console = Console(stderr=True)
    jobs: dict[str, dict[str, Any]] = {}
    with console.status("verifying") as spinner:
        while True:
            jobs = _verify_jobs(request(control, "status", {"array": array}), mirror)
            running = [j for j in jobs.values() if j["state"] == "running"]
            done = sum(int(j["regions_done"]) for j in jobs.values())
            total = sum(int(j["regions_total"]) for j in jobs.values())
            spinner.update(f"verifying {done}/{total} regions")
            if not running:
                break
            asyncio.run(asyncio.sleep(0.2))
    bad = 0
    for name, j in jobs.items():
        if j["state"] == "failed":
            raise DstError(f"verify of {name} failed: {j['error']}")
        count, fixed = int(j["mismatched_count"]), int(j["repaired_count"])
        line = f"{name}: {j['regions_done']} regions ({format_size(int(j['bytes']))}) checked"
        line += f", {count} differ" + (f", {fixed} repaired" if j["repair"] else "")
        if count:
            line += ": regions " + " ".join(str(r) for r in j["mismatched"])
            line += " ..." if count > len(j["mismatched"]) else ""
        print(line)
        bad += count - fixed
    return 1 if bad else 0


def _verify_jobs(status: dict[str, Any], mirror: str | None) -> dict[str, dict[str, Any]]:
    """The verify job of every mirror (or of ``mirror``) in a status tree."""
    jobs: dict[str, dict[str, Any]] = {}
    stack = [a["root"] for a in status.get("arrays", [])]
    while stack:
        node = stack.pop()
        job = (node.get("detail") or {}).get("keeper", {}).get("verify")
        if job is not None and (mirror is None or node["name"] == mirror):
            jobs[node["name"]] = job
        stack.extend(node.get("members", []))
    return jobs


def cmd_status(control: str, name: str | None, *, as_json: bool, watch: bool) -> int:
    args = {"array": name} if name else {}
    if as_json:
        print(json.dumps(request(control, "status", args), indent=2))
        return 0
    console = Console()
    if not watch:
        console.print(render_status(request(control, "status", args)))
        return 0
    from rich.live import Live

    with contextlib.suppress(KeyboardInterrupt), Live(console=console, auto_refresh=False) as live:
        while True:
            live.update(render_status(request(control, "status", args)), refresh=True)
            asyncio.run(asyncio.sleep(1.0))
    return 0


def _print_summary(result: Any) -> None:
    if isinstance(result, dict) and "name" in result:
        size = format_size(int(result.get("size", 0)))
        line = f"{result['name']}: {result.get('state')}, {result.get('algorithm')}, {size}"
        exports = result.get("exports") or []
        if exports:
            line += ", exported at " + " ".join(exports)
        print(line)
