"""The array commands of ``dst``: their parsers and their runner.

:func:`add_array_commands` adds ``daemon``, ``create``, ``start``/``stop``, ``add``,
``remove``, ``replace``, ``assemble``, ``suspend``/``resume``, ``fail``/``readd``,
``verify``, ``resync-rate``, ``reload`` and ``status`` to the ``dst`` parser;
:func:`run_array` hands their arguments to :mod:`dst.admin` (and ``dst up``'s to
:mod:`dst.up`), imported late so that ``dst --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from dst.cli.parser import add_control, add_metrics, formatter

ARRAY_EPILOG = """\
examples:
  dst create examples/mirror.toml
  dst status
  dst status demo --json
  dst stop demo && dst start demo
  dst add big --uri nbd://127.0.0.1:10812/ --name n3
  dst add big --path /var/lib/dst/extra.img --size 10G
  dst remove big n3
  dst assemble nbd://10.0.0.1:10809/ nbd://10.0.0.2:10809/ --listen 127.0.0.1:10900
  dst fail demo node-b && dst readd demo node-b
  dst replace demo node-b --uri nbd://10.0.0.9:10809/ --name node-c
  dst verify demo --repair --source node-a
  dst resync-rate demo 50M --min 5M
"""


def add_array_commands(sub: Any) -> None:
    """Add the array commands to the ``dst`` parser's subparsers ``sub``."""

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=ARRAY_EPILOG,
            formatter_class=formatter,
        )
        add_control(p)
        return p

    p = add("daemon", "run the array daemon", "Run the array daemon in the foreground.")
    p.add_argument("specs", metavar="SPEC", nargs="*", help="array specs to start at once")
    add_metrics(p)
    p = add(
        "events",
        "stream state changes",
        "Print the daemon's state changes as JSON lines as they happen (a leg failed, "
        "re-added, in sync; a resync started or finished; a node added, removed or "
        "replaced; an array suspended...), like drbdsetup events2.  See "
        "docs/monitoring.md.",
    )
    p.add_argument(
        "--now", action="store_true", help="print the current state first (event exists)"
    )
    p = add("create", "create and start an array", "Create an array from a TOML spec and start it.")
    p.add_argument("spec", metavar="SPEC", help="array spec file (TOML; see examples/)")
    for verb in ("start", "stop"):
        p = add(verb, f"{verb} an array", f"{verb.capitalize()} the array NAME.")
        p.add_argument("array", metavar="NAME")
    p = add(
        "add",
        "grow an array by a node",
        "Grow ARRAY by a node, live: appended to a linear array; a new linear segment "
        "after a stripe (no restripe); a new leg of a mirror, resynced in the background.",
    )
    p.add_argument("array", metavar="ARRAY")
    p.add_argument("--uri", help="a remote node: nbd://HOST:PORT/EXPORT or nbd+unix:///?socket=P")
    p.add_argument("--path", help="a local file or disk")
    p.add_argument("--size", help="with --path: create a sparse file of SIZE")
    p.add_argument("--name", help="node name (default: generated)")
    p.add_argument("--start", help="use the node from this offset (default 0)")
    p.add_argument("--length", help="use this many bytes of the node (default: to its end)")
    p = add(
        "remove",
        "shrink an array by a node",
        "Remove NODE, live: the last node of a linear array (it shrinks), or a leg of a "
        "mirror (at least two legs stay; not the last leg in sync).",
    )
    p.add_argument("array", metavar="ARRAY")
    p.add_argument("node", metavar="NODE")
    p = add(
        "replace",
        "replace a node, copying its data live",
        "Replace node OLD of ARRAY by a new node while the array serves I/O: NEW is "
        "filled from the array's data (writes go to both meanwhile), then takes OLD's "
        "place and OLD is released.  A mirror leg is rebuilt from the other legs, so OLD "
        "may be dead.  Waits and shows progress unless --no-wait; Ctrl-C stops waiting, "
        "not the replace ('dst cancel-replace ARRAY' does).",
    )
    p.add_argument("array", metavar="ARRAY")
    p.add_argument("old", metavar="OLD", help="the node to replace")
    p.add_argument("--uri", help="the new node: nbd://HOST:PORT/EXPORT or nbd+unix:///?socket=P")
    p.add_argument("--path", help="the new node: a local file or disk")
    p.add_argument("--size", help="with --path: create a sparse file of SIZE")
    p.add_argument("--name", help="the new node's name (default: generated)")
    p.add_argument("--rate", help="limit the copy to RATE bytes/s, e.g. 50M (default: none)")
    p.add_argument("--no-wait", action="store_true", help="start it and return")
    p = add(
        "cancel-replace",
        "stop a running replace",
        "Stop the running replace of ARRAY: the array goes on with the old node; the new "
        "node is left partly written and unused.",
    )
    p.add_argument("array", metavar="ARRAY")
    p = add(
        "assemble",
        "rebuild an array from its members",
        "Read the superblocks of the members (local paths or NBD URIs), check they are "
        "all the members of one array, and start that array in the daemon with each "
        "member in its role, under its recorded name and export addresses.  Out-of-date "
        "members are resynced from the bitmap; after a crash only the regions marked "
        "dirty are copied.  With --degraded the members given may be a subset (mdadm's "
        "--run): the others stay failed until 'dst replace' puts a node in their place; "
        "refused, saying why, unless the members given hold the newest data.",
    )
    p.add_argument("members", metavar="MEMBER", nargs="+", help="path or NBD URI of a member")
    p.add_argument("--name", help="array name (default: the one the superblocks recorded)")
    p.add_argument(
        "--listen",
        metavar="ADDR",
        action="append",
        default=[],
        help="export address, repeatable (default: the recorded ones)",
    )
    p.add_argument(
        "--export",
        metavar="NAME",
        help="export name (default: the recorded one, or '' and the name)",
    )
    p.add_argument("--degraded", action="store_true", help="start without the members not given")
    p.add_argument("--dry-run", action="store_true", help="print the spec, start nothing")
    p.add_argument(
        "--force",
        action="store_true",
        help="start a raid5/raid6 that is dirty and degraded (the write hole: regions dirty "
        "at the crash may rebuild wrongly; see docs/parity.md)",
    )
    for verb, what in (
        (
            "suspend",
            "Hold the I/O to NODE: on a linear or stripe array, requests that touch it wait "
            "(in order, bounded) while requests to the other nodes go on; a mirror leg is "
            "detached and its missed regions recorded.  Without NODE the whole array is "
            "suspended.  The node can then be disconnected, its disk swapped, reconnected.",
        ),
        (
            "resume",
            "Release what 'dst suspend' held, in arrival order; a mirror leg is re-attached "
            "and resynced (only the regions it missed).",
        ),
    ):
        p = add(verb, f"{verb} a node or the whole array", what)
        p.add_argument("array", metavar="ARRAY")
        p.add_argument("node", metavar="NODE", nargs="?", help="default: the whole array")
    p = add(
        "fail",
        "take a mirror leg out (maintenance)",
        "Mark mirror leg NODE failed: writes go on without it and the regions it misses "
        "are recorded, so 'dst readd' copies only those.  The last leg in sync cannot be "
        "failed.  A leg failed this way is not re-added automatically.",
    )
    p.add_argument("array", metavar="ARRAY")
    p.add_argument("node", metavar="NODE")
    p = add(
        "readd",
        "bring a failed mirror leg back",
        "Re-add failed mirror leg NODE: its superblock is checked, and only the regions "
        "it missed are copied to it (a full copy if its history is unknown).  A leg that "
        "diverged (split brain) is refused unless --full, which discards its data.",
    )
    p.add_argument("array", metavar="ARRAY")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--full", action="store_true", help="copy everything; discard NODE's data")
    p = add(
        "verify",
        "compare mirror legs online",
        "Compare the legs of the array's mirrors region by region while I/O goes on, "
        "and report the regions that differ (exit status 1 if any are left).  With "
        "--repair they are rewritten from --source (default: the first leg in sync).",
    )
    p.add_argument("array", metavar="ARRAY")
    p.add_argument("--repair", action="store_true", help="rewrite differing regions")
    p.add_argument("--source", metavar="NODE", help="with --repair: the leg to copy from")
    p.add_argument("--mirror", metavar="NAME", help="only this mirror of the array")
    p.add_argument("--no-wait", action="store_true", help="start it and return (see status)")
    p = add(
        "resync-rate",
        "limit the background resync",
        "Set the resync rate limit of the array's mirrors, live: at most RATE bytes/s "
        "(0: unlimited); --min lets it go at least that fast even under foreground I/O.",
    )
    p.add_argument("array", metavar="ARRAY")
    p.add_argument("rate", metavar="RATE", help="bytes per second, e.g. 100M (0: unlimited)")
    p.add_argument("--min", dest="min_rate", metavar="RATE", help="floor under foreground I/O")
    p.add_argument("--mirror", metavar="NAME", help="only this mirror of the array")
    p = add(
        "reload",
        "re-read ACL files and TLS credentials",
        "Re-read the ACL file and TLS credentials of ARRAY's export (all arrays without "
        "ARRAY), as SIGHUP to the daemon does.  A bad file is an error and the settings in "
        "force stay.",
    )
    p.add_argument("array", metavar="ARRAY", nargs="?")
    p = add("status", "show arrays and nodes", "Show arrays, their nodes, states and counters.")
    p.add_argument("array", metavar="NAME", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")


def run_array(args: argparse.Namespace) -> int:
    """Run the array command (or ``dst up``) in ``args``; the exit status."""
    from dst import admin
    from dst.net.metricsserver import metrics_options

    control = args.control or admin.default_control()
    cmd = args.command
    if cmd in ("up", "daemon"):
        metrics = metrics_options(args.metrics, tls=args.metrics_tls, acl=args.metrics_acl)
    if cmd == "up":
        from dst import up

        opts = up.options(
            data_dir=args.dir,
            size=args.size,
            listen=args.listen,
            control=control,
            config=args.config,
            tls=args.tls,
            metrics=metrics,
        )
        return up.run(opts)
    if cmd == "daemon":
        return admin.cmd_daemon(control, args.specs, metrics=metrics)
    if cmd == "events":
        return admin.cmd_events(control, now=args.now)
    if cmd == "create":
        return admin.cmd_create(control, args.spec)
    if cmd in ("start", "stop"):
        return admin.cmd_simple(control, cmd, {"array": args.array})
    if cmd == "remove":
        return admin.cmd_simple(control, "remove", {"array": args.array, "node": args.node})
    if cmd == "replace":
        node = admin.node_spec(
            uri=args.uri, path=args.path, size=args.size, name=args.name, verb="put in"
        )
        return admin.cmd_replace(
            control, args.array, args.old, node, wait=not args.no_wait, rate=args.rate
        )
    if cmd == "reload":
        return admin.cmd_reload(control, args.array)
    if cmd == "cancel-replace":
        return admin.cmd_simple(control, "cancel-replace", {"array": args.array})
    if cmd == "assemble":
        return admin.cmd_assemble(
            control,
            args.members,
            name=args.name,
            listen=args.listen,
            export=args.export,
            dry_run=args.dry_run,
            degraded=args.degraded,
            force=args.force,
        )
    if cmd in ("suspend", "resume"):
        node_args = {"array": args.array} | ({"node": args.node} if args.node else {})
        return admin.cmd_simple(control, cmd, node_args)
    if cmd == "fail":
        return admin.cmd_simple(control, "fail", {"array": args.array, "node": args.node})
    if cmd == "readd":
        return admin.cmd_readd(control, args.array, args.node, full=args.full)
    if cmd == "verify":
        return admin.cmd_verify(
            control,
            args.array,
            repair=args.repair,
            source=args.source,
            mirror=args.mirror,
            wait=not args.no_wait,
        )
    if cmd == "resync-rate":
        return admin.cmd_resync_rate(
            control, args.array, args.rate, min_rate=args.min_rate, mirror=args.mirror
        )
    if cmd == "add":
        return admin.cmd_add(
            control,
            args.array,
            uri=args.uri,
            path=args.path,
            size=args.size,
            name=args.name,
            start=args.start,
            length=args.length,
        )
    return admin.cmd_status(control, args.array, as_json=args.json, watch=args.watch)
