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

from dst import __version__
from dst.errors import ConfigError, DstError

PROG = "dst"

DESCRIPTION = """\
dst: distributed block storage over NBD.

Storage nodes export a file or disk over NBD; any NBD client (nbdinfo, nbdcopy,
qemu, nbdfuse, fio, Linux nbd-client) can use them.
"""

EPILOG = """\
commands:
  up      start dst on its embedded default (a sparse disk in ./dst-data)
  serve   export a file or block device over NBD (a storage node)

examples:
  dst up
  dst serve disk.img --size 10G
  dst serve /dev/sdb --listen 0.0.0.0:10809 --name sdb
  dst serve disk.img --read-only --listen unix:/run/dst/disk.sock

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

SIGTERM or Ctrl-C stops the server after in-flight requests finish.

examples:
  dst serve disk.img --size 1G
  dst serve disk.img --listen unix:/tmp/disk.sock --listen 127.0.0.1:0
  dst serve base.img --read-only --name base --description "golden image"

  nbdinfo nbd://127.0.0.1:10809/
  nbdcopy image.raw nbd://127.0.0.1:10809/
  qemu-img convert -O raw nbd://127.0.0.1:10809/ copy.raw
"""

UP_EPILOG = """\
Creates DIR/disk.img (sparse, --size, default 1G) if it does not exist and serves
it as "dst serve" does, on 127.0.0.1:10809 unless --listen says otherwise.

examples:
  dst up
  dst up --dir /var/lib/dst --size 20G --listen 127.0.0.1:0
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
    _add_serve_options(up, default_size="1G")
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _run(args: argparse.Namespace) -> int:
    from dst import node  # imported late: "dst --help" stays fast

    listen = args.listen or [node.DEFAULT_LISTEN]
    if args.command == "serve":
        options = node.ServeOptions.from_strings(
            path=args.path,
            size=args.size,
            read_only=args.read_only,
            name=args.name,
            description=args.description,
            listen=listen,
        )
    else:  # up
        options = node.up_options(
            directory=args.dir,
            size=args.size,
            read_only=args.read_only,
            name=args.name,
            description=args.description,
            listen=listen,
        )
    return node.run(options)


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
