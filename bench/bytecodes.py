#!/usr/bin/env python3
"""Bytecodes and calls per mirrored write, function by function: where the daemon's
instructions go.

Theory of operation
-------------------
``instructions.py`` counts how many instructions a mirrored write costs in all; this
says where they are spent.  The daemon's Python runs a tracer (``sys.settrace`` with
opcode events, put in by a ``sitecustomize`` module on its ``PYTHONPATH``) that counts,
per function, the calls and the bytecodes executed; ``SIGUSR1`` switches it on after a
warm-up (every region's write-intent bit set), ``SIGUSR2`` switches it off and writes
the counts.  Between the two, fio's nbd engine writes a fixed number of 4 KiB blocks at
random offsets at a fixed queue depth over two ``dst serve`` nodes (as ``arrays.py``
runs them).  The counts are the same for the same code and inputs however loaded the
machine is; divided by the writes they are each function's share of a write.

In CPython 3.11 a bytecode costs some tens of instructions on average, a Python call a
few hundred more: the two lists together say which function to look at.  The tracer
slows the daemon many times over, so batching differs from a timed run (more requests
arrive per receive), as under callgrind.  ``--lines`` counts per source line instead.

Run ``python bench/bytecodes.py --help``.  This is not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import linecache
import os
import signal
import tempfile
import time
from pathlib import Path

from arrays import array_target, node_uris, prepare_legs
from bench import Context, cluster
from instructions import fio
from tests.support.cluster import start_daemon

TRACER = """\
import collections, json, os, signal, sys
_by = os.environ["DST_BYTECODES_BY"]
_ops, _calls = collections.Counter(), collections.Counter()
def _local(frame, event, arg):
    if event == "opcode":
        code = frame.f_code
        _ops[(code.co_filename, frame.f_lineno if _by == "line" else code.co_firstlineno,
              "" if _by == "line" else code.co_name)] += 1
    return _local
def _call(frame, event, arg):
    frame.f_trace_opcodes = True
    code = frame.f_code
    _calls[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
    return _local
def _on(*_):
    sys.settrace(_call)
def _off(*_):
    sys.settrace(None)
    keys = set(_ops) | (set() if _by == "line" else set(_calls))
    rows = [[*k, _ops[k], _calls[k]] for k in keys]
    with open(os.environ["DST_BYTECODES_OUT"], "w") as f:
        json.dump(rows, f)
signal.signal(signal.SIGUSR1, _on)
signal.signal(signal.SIGUSR2, _off)
"""


def trace(*, writes: int, depth: int, by: str) -> list[tuple[str, int, str, int, int]]:
    """(file, line, function, bytecodes, calls) over ``writes`` writes (module
    docstring); ``by`` is "function" or "line"."""
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir="/dev/shm")))
        site = work / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(TRACER)
        out = work / "bytecodes.json"
        ctx = Context(file=work / "unused.img", workdir=work, size=64 << 20)
        prepare_legs(ctx)
        c = stack.enter_context(cluster(ctx))
        uris = node_uris(ctx, c)
        src = os.environ.get("DST_BASE", str(Path(__file__).resolve().parent.parent / "src"))
        env = {"PYTHONPATH": f"{site}:{src}", "DST_BYTECODES_OUT": str(out),
               "DST_BYTECODES_BY": by}  # fmt: skip
        spec = c.spec("trace", array_target("mirror", uris, ctx), export="bench")
        daemon = start_daemon(c.sockets / "control.sock", c.sockets / "daemon.stderr", [spec],
                              env=env, timeout=60)  # fmt: skip
        c.processes.append(daemon)
        uri = c.uri("trace", "bench")
        fio(uri, writes=64, bs=1 << 20, depth=8, rw="write")  # every region marked
        fio(uri, writes=500, bs=4096, depth=depth)  # warm
        os.kill(daemon.pid, signal.SIGUSR1)
        fio(uri, writes=writes, bs=4096, depth=depth)
        os.kill(daemon.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not out.exists() or not out.stat().st_size:
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon wrote no counts")
            time.sleep(0.1)
        time.sleep(0.2)  # (the dump is one write: let it finish)
        return [tuple(r) for r in json.loads(out.read_text())]  # type: ignore[misc]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--writes", type=int, default=5000, help="measured writes (default 5000)")
    p.add_argument("--depth", type=int, default=32, help="fio's queue depth (default 32)")
    p.add_argument("--lines", action="store_true", help="per source line, not per function")
    p.add_argument("--top", type=int, default=40, help="rows to print (default 40)")
    args = p.parse_args()
    rows = trace(writes=args.writes, depth=args.depth, by="line" if args.lines else "function")
    n = args.writes
    total, calls = sum(r[3] for r in rows), sum(r[4] for r in rows)
    made = "" if args.lines else f" in {calls / n:.1f} Python calls"
    print(f"{total / n:,.0f} bytecodes{made} per 4 KiB write (QD{args.depth}, {n} writes)")
    print(f"{'bytecodes':>9} {'' if args.lines else 'calls':>6}  where")
    for file, line, name, ops, ncalls in sorted(rows, key=lambda r: -r[3])[: args.top]:
        where = f"{os.path.basename(file)}:{line}"
        if args.lines:
            text = linecache.getline(file, line).strip() if line else "(no line: set-up)"
            print(f"{ops / n:9.1f} {'':6}  {where} {text[:80]}")
        else:
            print(f"{ops / n:9.1f} {ncalls / n:6.2f}  {where} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
