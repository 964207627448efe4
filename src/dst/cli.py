"""The ``dst`` command line: argparse onto the node/array entry points, no logic.

Every failure the user can cause ends as one line on stderr (``dst: error: ...``) and
a non-zero exit status; no traceback reaches the user.  Exit statuses: 0 success,
1 runtime error (I/O, refused, ...), 2 bad usage or configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from dst import __version__
from dst.errors import ConfigError, DstError

PROG = "dst"

DESCRIPTION = """\
dst: distributed block storage over NBD.

Storage nodes export a file or disk over NBD; an array daemon combines them
(linear, stripe, mirror) into one block device exported over NBD, which any NBD
client (nbdinfo, nbdcopy, qemu, nbdfuse, fio, Linux nbd-client) can use.
"""

EPILOG = """\
commands:
  up      a local demo cluster: two nodes, a mirror over them, live status
  serve   export a file or block device over NBD (a storage node)
  certs   make a CA and TLS certificates for a cluster
  daemon  run the array daemon (control socket) in the foreground
  create  create and start an array from a spec file (TOML)
  start, stop      start or stop an array
  add, remove      grow or shrink an array live (linear, stripe, mirror legs)
  replace          replace a node by another, its data copied live
  assemble         rebuild a mirror from its members' superblocks (after a crash)
  suspend, resume  hold the I/O to one node (or the array) and release it
  fail, readd      take a mirror leg out for maintenance, bring it back (resync)
  verify  compare mirror legs online (--repair rewrites differing regions)
  resync-rate      limit (or free) the background resync
  status  show arrays and their nodes (--json, --watch)

The array commands talk to the daemon's control socket: --control PATH, else
$DST_CONTROL, else /tmp/dst-<uid>/control.sock (where dst up and dst daemon put it).

examples:
  dst up
  dst serve disk.img --size 10G
  dst daemon &  dst create examples/mirror.toml  &&  dst status
  dst add big --uri nbd://10.0.0.3:10809/  &&  dst remove big node3

Run "dst COMMAND --help" for the options of one command.
"""

SERVE_EPILOG = """\
ADDR is HOST:PORT (IPv6 as [HOST]:PORT; port 0 picks a free port) or
unix:PATH.  The default is 127.0.0.1:10809, i.e. loopback only.  For each
address, one line is printed on stdout once it accepts connections:

  listening on nbd://127.0.0.1:10809/EXPORT
  listening on nbd+unix:///EXPORT?socket=PATH

SIZE is a number of bytes with an optional binary suffix: 512K, 64M, 10G, 1T
(or 10GiB).  With --size a missing file is created sparse and an empty file is
extended; an existing file must already have that size.

SIGTERM or Ctrl-C stops the server after in-flight requests finish; SIGHUP
re-reads the --acl file and the TLS credentials.

TLS (STARTTLS): --tls require refuses every option before TLS (FORCEDTLS), --tls
on lets the client choose.  --tls-certificates DIR holds ca-cert.pem,
server-cert.pem, server-key.pem and optionally ca-crl.pem (nbdkit's layout; "dst
certs" makes them); with --tls-verify-peer clients need a certificate signed by
that CA.  Certificates without --tls mean require.  Plaintext is allowed on
loopback and unix sockets; any other listen address needs TLS or --tls off.
--acl FILE: allow/deny rules on the client's certificate name (dn=GLOB), PSK
identity (psk=GLOB) or address (from=CIDR|unix); first match wins, default deny.

examples:
  dst serve disk.img --size 1G
  dst serve disk.img --listen unix:/tmp/disk.sock --listen 127.0.0.1:0
  dst serve base.img --read-only --name base --description "golden image"
  dst certs pki node-a array laptop
  dst serve disk.img --listen 0.0.0.0:10809 --tls-certificates pki/node-a \
      --tls-verify-peer --acl node-a.acl
  nbdinfo 'nbds://node-a:10809/?tls-certificates=pki/laptop'

  nbdinfo nbd://127.0.0.1:10809/
  nbdcopy image.raw nbd://127.0.0.1:10809/
  qemu-img convert -O raw nbd://127.0.0.1:10809/ copy.raw
"""

UP_EPILOG = """\
With no arguments: creates DIR (default ./dst-data) with two sparse member files
(--size each, default 1G), starts two "dst serve" nodes on loopback as separate
processes, and runs the array daemon here with a mirror over them, exported on
unix:DIR/dst.sock and 127.0.0.1:10809 (--listen replaces both).  Prints how to use
it, shows live status until Ctrl-C, then stops the array and the nodes cleanly.
With --config FILE it runs that spec instead (no nodes started).  With --tls both
hops use TLS with verified client certificates: DIR/pki gets a CA and certificates
for the nodes, the array and a user (DIR/pki/user for your clients).

examples:
  dst up
  dst up --tls
  dst up --dir /var/lib/dst --size 20G --listen 127.0.0.1:0
  dst up --config my-array.toml
"""

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


class _Parser(argparse.ArgumentParser):
    """argparse with dst's one-line error convention (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_serve_options(p: argparse.ArgumentParser, *, default_size: str | None) -> None:
    size_help = "create a sparse file of SIZE if missing, or extend an empty one"
    if default_size is not None:
        size_help += f" (default {default_size})"
    p.add_argument("--size", metavar="SIZE", default=default_size, help=size_help)
    p.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    p.add_argument(
        "--name", metavar="EXPORT", default=None, help="export name (default: the empty name)"
    )
    p.add_argument("--description", metavar="TEXT", default=None, help="export description")
    p.add_argument(
        "--listen",
        metavar="ADDR",
        action="append",
        default=None,
        help="HOST:PORT or unix:PATH; repeatable (default 127.0.0.1:10809)",
    )
    t = p.add_argument_group("security")
    t.add_argument("--tls", metavar="MODE", help="off, on or require (see below)")
    t.add_argument("--tls-certificates", metavar="DIR", help="CA, server certificate and key")
    t.add_argument(
        "--tls-verify-peer", action="store_true", help="require client certificates (the CA's)"
    )
    t.add_argument("--tls-psk", metavar="FILE", help="TLS-PSK keys, USER:HEXKEY lines (3.13+)")
    t.add_argument("--acl", metavar="FILE", help="allow/deny rules (re-read on SIGHUP)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more to stderr (-v: info, -vv: debug)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    serve = sub.add_parser(
        "serve",
        help="export a file or block device over NBD",
        description="Export the file or block device PATH over NBD (a dst storage node).",
        epilog=SERVE_EPILOG,
        formatter_class=_formatter,
    )
    serve.add_argument("path", metavar="PATH", help="file or block device to export")
    _add_serve_options(serve, default_size=None)

    up = sub.add_parser(
        "up",
        help="start dst on its embedded default",
        description="Start dst on its embedded default: serve a sparse disk image.",
        epilog=UP_EPILOG,
        formatter_class=_formatter,
    )
    up.add_argument("--dir", default="dst-data", help="data directory (default ./dst-data)")
    up.add_argument("--size", default="1G", help="size of each member file (default 1G)")
    up.add_argument("--config", metavar="FILE", help="run this array spec (TOML) instead")
    up.add_argument("--listen", metavar="ADDR", action="append", help="export address; repeatable")
    up.add_argument("--tls", action="store_true", help="TLS with verified peers on both hops")
    _add_control(up)

    certs = sub.add_parser(
        "certs",
        help="make a CA and TLS certificates",
        description="Make the TLS certificates of a cluster: a CA in DIR/ca (created once, "
        "then reused) and, for each NAME, DIR/NAME with ca-cert.pem and a server and a "
        "client certificate (CN=NAME,O=ORG) in the layout nbdkit, qemu and libnbd read.  "
        "Keys are ECDSA P-256, written owner-only.",
        epilog="examples:\n  dst certs pki node-a node-b array laptop --host 10.0.0.1\n"
        "  dst serve d.img --listen 0.0.0.0:10809 --tls-certificates pki/node-a "
        "--tls-verify-peer\n  nbdinfo 'nbds://10.0.0.1:10809/?tls-certificates=pki/laptop'\n",
        formatter_class=_formatter,
    )
    certs.add_argument("dir", metavar="DIR", help="where the CA and the certificates go")
    certs.add_argument("names", metavar="NAME", nargs="+", help="a node, array or user")
    certs.add_argument(
        "--host", action="append", default=[], help="another DNS name or IP for the servers"
    )
    certs.add_argument("--org", default="dst", help="organization in the subjects (default dst)")
    only = certs.add_mutually_exclusive_group()
    only.add_argument("--server-only", action="store_true", help="no client certificates")
    only.add_argument("--client-only", action="store_true", help="no server certificates")
    certs.add_argument("--force", action="store_true", help="replace existing certificates")
    _add_array_commands(sub)
    return parser


def _add_control(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        metavar="PATH",
        default=None,
        help="control socket (default $DST_CONTROL or /tmp/dst-<uid>/control.sock)",
    )


def _add_array_commands(sub: Any) -> None:
    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=ARRAY_EPILOG,
            formatter_class=_formatter,
        )
        _add_control(p)
        return p

    p = add("daemon", "run the array daemon", "Run the array daemon in the foreground.")
    p.add_argument("specs", metavar="SPEC", nargs="*", help="array specs to start at once")
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
        "rebuild a mirror from its members",
        "Read the superblocks of the members (local paths or NBD URIs), check they are "
        "all the members of one array, and start that array in the daemon with each "
        "member in its role.  Out-of-date members are resynced from the bitmap; after a "
        "crash only the regions marked dirty are copied.",
    )
    p.add_argument("members", metavar="MEMBER", nargs="+", help="path or NBD URI of a member")
    p.add_argument("--name", help="array name (default: the name in the superblocks)")
    p.add_argument(
        "--listen", metavar="ADDR", action="append", default=[], help="export address (repeat)"
    )
    p.add_argument("--export", metavar="NAME", help="export name (default: '' and the name)")
    p.add_argument("--dry-run", action="store_true", help="print the spec, start nothing")
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


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _run(args: argparse.Namespace) -> int:
    from dst import node  # imported late: "dst --help" stays fast

    if args.command == "certs":
        from dst import certs

        return certs.run(
            args.dir,
            args.names,
            hosts=args.host,
            org=args.org,
            server=not args.client_only,
            client=not args.server_only,
            force=args.force,
        )
    if args.command != "serve":
        return _run_array(args)
    listen = args.listen or [node.DEFAULT_LISTEN]
    options = node.ServeOptions.from_strings(
        path=args.path,
        size=args.size,
        read_only=args.read_only,
        name=args.name,
        description=args.description,
        listen=listen,
        tls=args.tls,
        tls_certificates=args.tls_certificates,
        tls_verify_peer=args.tls_verify_peer,
        tls_psk=args.tls_psk,
        acl=args.acl,
    )
    return node.run(options)


def _run_array(args: argparse.Namespace) -> int:
    from dst import admin

    control = args.control or admin.default_control()
    cmd = args.command
    if cmd == "up":
        from dst import up

        opts = up.options(
            data_dir=args.dir,
            size=args.size,
            listen=args.listen,
            control=control,
            config=args.config,
            tls=args.tls,
        )
        return up.run(opts)
    if cmd == "daemon":
        return admin.cmd_daemon(control, args.specs)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dst`` command; return the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        _setup_logging(args.verbose)
        return _run(args)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except DstError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {_describe_oserror(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # process edge: a bug, still one line (-vv for the traceback)
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        print(f"{PROG}: error: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _describe_oserror(e: OSError) -> str:
    """``[Errno 2] No such file...: 'x'`` -> ``x: No such file or directory``."""
    text = e.strerror or str(e)
    if e.filename is not None:
        return f"{e.filename}: {text}"
    return text
