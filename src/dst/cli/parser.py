"""The ``dst`` parser: the top level, the node commands, what every command shares.

The texts and options of ``dst``, ``dst serve``, ``dst up`` and ``dst certs``
(:func:`base_parser`); :class:`Parser` (one-line errors, exit status 2),
:func:`formatter` and :func:`add_control` (``--control``), shared with the array
commands (:mod:`dst.cli.array`).
"""

from __future__ import annotations

import argparse
from typing import Any

from dst import __version__

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
  events  stream state changes as JSON lines (--now: the current state first)
  create  create and start an array from a spec file (TOML)
  start, stop      start or stop an array
  add, remove      grow or shrink an array live (linear, stripe, mirror legs)
  replace          replace a node by another, its data copied live
  assemble         rebuild an array from its members' superblocks (after a crash)
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
node-a.img and node-b.img (--size of data each, default 1G, plus room for the
mirror's metadata at their end), starts two "dst serve" nodes on loopback (free
ports) as separate processes, and runs the array daemon here with a mirror "demo"
over them, exported on unix:DIR/dst.sock and 127.0.0.1:10809 (--listen replaces
both).  Prints how to use it, shows live status until Ctrl-C, then stops the array
(in-flight requests finish) and the nodes.

With --tls both hops use TLS with verified client certificates: DIR/pki gets a CA
and certificates for the nodes, the array and a user (DIR/pki/user for your
clients).  With --metrics HOST:PORT the daemon serves Prometheus metrics there and
the two nodes on PORT+1 and PORT+2 (port 0: free ports); the URLs are printed.

Run again on the same DIR, it reuses the member files (--size is ignored) and the
mirror comes back from their metadata: data kept, after a crash only the regions
marked dirty are resynced.  With --config FILE it runs that array spec instead and
starts no nodes (see examples/).

examples:
  dst up
  dst up --tls
  dst up --dir /var/lib/dst --size 20G --listen 127.0.0.1:0
  dst up --config my-array.toml
  dst up --metrics 127.0.0.1:9300     # then: prometheus --config.file=monitoring/prometheus.yml
"""


class Parser(argparse.ArgumentParser):
    """argparse with dst's one-line error convention (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def formatter(prog: str) -> argparse.HelpFormatter:
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


def add_metrics(p: argparse.ArgumentParser) -> None:
    """``--metrics ADDR`` and its TLS and ACL (``dst serve``, ``dst daemon``, ``dst up``)."""
    m = p.add_argument_group("metrics (Prometheus; see docs/monitoring.md)")
    m.add_argument(
        "--metrics",
        metavar="ADDR",
        help="serve /metrics on HOST:PORT (PORT alone: 127.0.0.1; 0: a free port)",
    )
    m.add_argument(
        "--metrics-tls",
        metavar="DIR|off",
        help="HTTPS with DIR's server certificate, client certificates of its CA required; "
        "off: plain HTTP beyond loopback",
    )
    m.add_argument("--metrics-acl", metavar="FILE", help="allow/deny rules for scrapers")


def add_control(p: argparse.ArgumentParser) -> None:
    """The control socket option (the array commands and ``dst up``)."""
    p.add_argument(
        "--control",
        metavar="PATH",
        default=None,
        help="control socket (default $DST_CONTROL or /tmp/dst-<uid>/control.sock)",
    )


def base_parser() -> tuple[argparse.ArgumentParser, Any]:
    """``dst`` with its global options and the node commands; and its subparsers action,
    for more commands (:func:`dst.cli.array.add_array_commands`)."""
    parser = Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more to stderr (-v: info, -vv: debug)",
    )
    parser.add_argument(
        "--memory-budget",
        metavar="SIZE",
        default=None,
        help="bytes of client payload this process holds at most, over all its NBD "
        "clients (default 512M; one client at most an eighth, 64M at most)",
    )
    parser.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        default=None,
        help="NBD clients one export address serves at once; more are refused (default 256)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    serve = sub.add_parser(
        "serve",
        help="export a file or block device over NBD",
        description="Export the file or block device PATH over NBD (a dst storage node).",
        epilog=SERVE_EPILOG,
        formatter_class=formatter,
    )
    serve.add_argument("path", metavar="PATH", help="file or block device to export")
    _add_serve_options(serve, default_size=None)
    add_metrics(serve)

    up = sub.add_parser(
        "up",
        help="a local demo cluster: two nodes, a mirror over them, live status",
        description="Run a local demo cluster in the foreground: two dst serve nodes and\n"
        "the array daemon with a mirror over them, exported over NBD.",
        epilog=UP_EPILOG,
        formatter_class=formatter,
    )
    up.add_argument(
        "--dir", default="dst-data", help="directory of the member files (default ./dst-data)"
    )
    up.add_argument(
        "--size",
        default="1G",
        help="the mirror's size, i.e. data per member (default 1G); new members only",
    )
    up.add_argument("--config", metavar="FILE", help="run this array spec (TOML) instead")
    up.add_argument(
        "--listen",
        metavar="ADDR",
        action="append",
        help="export address, HOST:PORT or unix:PATH; repeatable "
        "(default unix:DIR/dst.sock and 127.0.0.1:10809)",
    )
    up.add_argument("--tls", action="store_true", help="TLS with verified peers on both hops")
    add_control(up)
    add_metrics(up)

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
        formatter_class=formatter,
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
    return parser, sub
