"""The ``dst`` command line: argparse onto the node/array entry points, no logic.

Every failure the user can cause ends as one line on stderr (``dst: error: ...``) and
a non-zero exit status; no traceback reaches the user.  Exit statuses: 0 success,
1 runtime error (I/O, refused, ...), 2 bad usage or configuration, 130 interrupted.

The parser is :mod:`dst.cli.parser` (the top level, ``serve``, ``up``, ``certs``) plus
:mod:`dst.cli.array` (the array commands and their runner); :func:`main` is the
``dst`` entry point.

A dst process never multiplies matrices: numpy serves it for element-wise work and
buffers, ISA-L for parity.  So OpenBLAS, which numpy loads, is told to start no worker
threads (``OPENBLAS_NUM_THREADS=1`` unless set): they would spin on a core after
numpy's import, and every thread more makes each ``munmap`` of a received payload
interrupt the cores they ran on (measured: a node's user CPU per 1 MiB write -15 %).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before anything imports numpy

import argparse
import logging
import sys
from collections.abc import Sequence

from dst.cli.array import add_array_commands, run_array
from dst.cli.parser import PROG, base_parser
from dst.errors import ConfigError, DstError


def build_parser() -> argparse.ArgumentParser:
    """The whole ``dst`` parser."""
    parser, sub = base_parser()
    add_array_commands(sub)
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
        return run_array(args)
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
        metrics=args.metrics,
        metrics_tls=args.metrics_tls,
        metrics_acl=args.metrics_acl,
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
        if args.memory_budget is not None or args.max_connections is not None:
            from dst.net import budget
            from dst.units import parse_size

            limit = parse_size(args.memory_budget) if args.memory_budget is not None else None
            budget.configure(limit, max_connections=args.max_connections)
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
