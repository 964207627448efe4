#!/usr/bin/env python3
"""Benchmark dst arrays (linear, stripe, mirror of two ``dst serve`` nodes) against qemu's quorum.

Theory of operation
-------------------
This is ``bench.py`` with other targets: the driver, the fio workloads, the table and
the JSON output are those of :mod:`bench` (imported, not copied).  Every array target
is two node processes on two leg files plus the thing that combines them, all on unix
sockets:

* ``dst-linear``, ``dst-stripe``, ``dst-mirror``: two ``dst serve`` nodes and a
  ``dst daemon`` running a generated spec (``remote`` members ``nbd+unix:///nI?socket=``),
  exporting the array on its own unix socket.  The linear array uses the first half of
  each leg (so fio's range covers both nodes); the stripe uses 64 KiB chunks; the mirror
  runs as ``dst up`` runs it (region tracking at the default 64 KiB grain).
* ``qemu-quorum``, the peer that does the mirror's job: two nbdkit file-plugin nodes and
  ``qemu-nbd --image-opts driver=quorum,vote-threshold=2,read-pattern=fifo,...`` over
  them (every write goes to both children and completes when both acknowledged it, as a
  dst mirror write; fifo reads one child, as a mirror reads one leg -- the default
  ``quorum`` pattern would read both and compare).
* ``nbdkit`` and ``dst`` (from ``bench.py``): one server on one file, the single-node
  baselines (``dst`` is not in the default set, to keep a run short).
* ``dst-mirror-base`` (only when ``DST_BASE`` names the ``src`` directory of another
  checkout, e.g. an older commit's): ``dst-mirror`` with that checkout's daemon over the
  same two nodes, to compare two versions of the data path in one interleaved run::

      git worktree add /tmp/base d05f197
      DST_BASE=/tmp/base/src python bench/arrays.py --targets dst-mirror dst-mirror-base

The two leg files (``leg0.img``, ``leg1.img``: the size plus 1 MiB of room for a
mirror's metadata at the end, prefilled with random data) are shared by every array
target; fio touches only the first ``--size`` bytes of each export.

Run ``python bench/arrays.py --help``.  This is not a test: it prints numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from bench import TARGETS, WORKLOADS, Context, MiB, Target, _server, fill_random, main

LEGS = 2
LEG_SLACK = 1 * MiB  # room for a mirror's bitmap and superblocks at the end of a leg


def leg_paths(ctx: Context) -> list[Path]:
    return [ctx.workdir / f"leg{i}.img" for i in range(LEGS)]


def prepare_legs(ctx: Context) -> None:
    """Create the leg files once (random data, so reads are not answered from holes)."""
    for path in leg_paths(ctx):
        if not path.exists():
            fill_random(path, ctx.size + LEG_SLACK)


def _toml(value: object) -> str:
    """A TOML value: strings and ints (JSON's escapes are TOML's), inline tables."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def array_spec(kind: str, uris: list[str], listen: str, ctx: Context) -> str:
    members: list[dict[str, object]] = [
        {"type": "remote", "name": f"n{i}", "uri": uri} for i, uri in enumerate(uris)
    ]
    if kind == "linear":  # half of each leg: the array is --size, spread over both nodes
        for m in members:
            m["length"] = ctx.size // LEGS
    lines = [
        "[array]",
        f'name = "bench-{kind}"',
        f"listen = [{_toml(listen)}]",
        'export = "bench"',
        "",
        "[array.target]",
        f'type = "{kind}"',
        "members = [",
        *(f"  {_toml(m)}," for m in members),
        "]",
    ]
    return "\n".join(lines) + "\n"


METRICS = ["--metrics", "127.0.0.1:0"]  # every process serves /metrics (nobody scrapes)


@contextlib.contextmanager
def _dst_array(
    ctx: Context, kind: str, *, base: str | None = None, metrics: bool = False
) -> Iterator[str]:
    """A ``dst daemon`` over two nodes; with ``base``, that source tree's daemon; with
    ``metrics``, the daemon and the nodes serve metrics (their I/O is timed)."""
    with contextlib.ExitStack() as stack:  # unwinds daemon first, then the nodes
        uris = stack.enter_context(_nodes(ctx, stack, metrics=metrics))
        sock = ctx.workdir / "array.sock"
        spec = ctx.workdir / f"{kind}.toml"
        spec.write_text(array_spec(kind, uris, f"unix:{sock}", ctx))
        control = ctx.workdir / "control.sock"
        cmd = [sys.executable, "-m", "dst", "daemon", "--control", str(control), str(spec)]
        cmd += METRICS if metrics else []
        if base is not None:
            cmd = ["env", f"PYTHONPATH={base}", *cmd]
        log = ctx.workdir / "daemon.log"
        yield stack.enter_context(_server(cmd, sock, f"nbd+unix:///bench?socket={sock}", log))


@contextlib.contextmanager
def _nodes(
    ctx: Context, stack: contextlib.ExitStack, *, metrics: bool = False
) -> Iterator[list[str]]:
    """Start the two ``dst serve`` nodes (on ``stack``); their URIs."""
    uris = []
    for i, leg in enumerate(leg_paths(ctx)):
        sock = ctx.workdir / f"node{i}.sock"
        cmd = [sys.executable, "-m", "dst", "serve", str(leg), "--name", f"n{i}"]
        cmd += ["--listen", f"unix:{sock}", *(METRICS if metrics else [])]
        uri = f"nbd+unix:///n{i}?socket={sock}"
        uris.append(stack.enter_context(_server(cmd, sock, uri, ctx.workdir / f"node{i}.log")))
    yield uris


@contextlib.contextmanager
def _bare_mirror(ctx: Context, mode: str) -> Iterator[str]:
    """``bench/mirror_serve.py --mode MODE`` over two ``dst serve`` nodes."""
    with contextlib.ExitStack() as stack:
        uris = stack.enter_context(_nodes(ctx, stack))
        sock = ctx.workdir / f"mirror-{mode}.sock"
        here = Path(__file__).resolve().parent
        cmd = [sys.executable, str(here / "mirror_serve.py"), "--mode", mode]
        cmd += ["--listen", f"unix:{sock}", *uris]
        log = ctx.workdir / f"mirror-{mode}.log"
        yield stack.enter_context(_server(cmd, sock, f"nbd+unix:///bench?socket={sock}", log))


def start_mirror_memory(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _bare_mirror(ctx, "memory")


def start_mirror_meta(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _bare_mirror(ctx, "meta")


def start_linear(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _dst_array(ctx, "linear")


def start_stripe(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _dst_array(ctx, "stripe")


def start_mirror(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _dst_array(ctx, "mirror")


def start_mirror_metrics(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _dst_array(ctx, "mirror", metrics=True)


def start_mirror_base(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _dst_array(ctx, "mirror", base=os.environ["DST_BASE"])


def quorum_opts(sockets: list[str]) -> str:
    opts = ["driver=quorum", f"vote-threshold={len(sockets)}", "read-pattern=fifo"]
    for i, sock in enumerate(sockets):
        c = f"children.{i}"
        opts += [f"{c}.driver=nbd", f"{c}.server.type=unix", f"{c}.server.path={sock}"]
    return ",".join(opts)


@contextlib.contextmanager
def _quorum(ctx: Context) -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        socks = []
        for i, leg in enumerate(leg_paths(ctx)):
            sock = ctx.workdir / f"kit{i}.sock"
            cmd = ["nbdkit", "--foreground", "-U", str(sock), "file", str(leg)]
            log = ctx.workdir / f"kit{i}.log"
            stack.enter_context(_server(cmd, sock, f"nbd+unix:///?socket={sock}", log))
            socks.append(str(sock))
        sock = ctx.workdir / "quorum.sock"
        # as bench.py's qemu-nbd: writeback cache, -e 8 clients, -t persistent
        cmd = ["qemu-nbd", "-k", str(sock), "--cache=writeback", "-e", "8", "-t"]
        cmd += ["--image-opts", quorum_opts(socks)]
        log = ctx.workdir / "quorum.log"
        yield stack.enter_context(_server(cmd, sock, f"nbd+unix:///?socket={sock}", log))


def start_quorum(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _quorum(ctx)


_LEGS_NOTE = "2 dst serve nodes"
ARRAY_TARGETS: list[Target] = [
    Target("dst-linear", start_linear, (), f"dst daemon: linear of {_LEGS_NOTE}", prepare_legs),
    Target("dst-stripe", start_stripe, (), f"dst daemon: stripe of {_LEGS_NOTE}", prepare_legs),
    Target("dst-mirror", start_mirror, (), f"dst daemon: mirror of {_LEGS_NOTE}", prepare_legs),
    Target(
        "dst-mirror-metrics",
        start_mirror_metrics,
        (),
        f"dst-mirror with --metrics on the daemon and the {_LEGS_NOTE} (I/O timed)",
        prepare_legs,
    ),
    Target(
        "dst-mirror-memory",
        start_mirror_memory,
        (),
        f"bench/mirror_serve.py: mirror of {_LEGS_NOTE}, region tracking in memory",
        prepare_legs,
    ),
    Target(
        "dst-mirror-meta",
        start_mirror_meta,
        (),
        f"bench/mirror_serve.py: mirror of {_LEGS_NOTE}, on-disk write-intent bitmap",
        prepare_legs,
    ),
    Target(
        "qemu-quorum",
        start_quorum,
        ("qemu-nbd", "nbdkit"),
        "qemu-nbd quorum (vote-threshold=2, fifo reads) of 2 nbdkit file nodes",
        prepare_legs,
    ),
]
if os.environ.get("DST_BASE"):
    ARRAY_TARGETS.append(
        Target(
            "dst-mirror-base",
            start_mirror_base,
            (),
            f"dst daemon from $DST_BASE ({os.environ['DST_BASE']}): mirror of {_LEGS_NOTE}",
            prepare_legs,
        )
    )
ALL_TARGETS = TARGETS + ARRAY_TARGETS
DEFAULT_TARGETS = ["nbdkit", "dst-linear", "dst-stripe", "dst-mirror", "qemu-quorum"]
RATIOS = [
    "dst-mirror/qemu-quorum",
    "dst-mirror-metrics/dst-mirror",
    "dst-metrics/dst",
    "dst-mirror/dst-mirror-base",
    "dst-mirror-meta/dst-mirror-memory",
    "dst-mirror/nbdkit",
    "dst-stripe/nbdkit",
    "dst-linear/nbdkit",
]
EPILOG = (
    "examples:\n"
    "  python bench/arrays.py --size 1G --runtime 5 --reps 3   # about 11 minutes\n"
    "  python bench/arrays.py --quick                          # sanity run\n"
    "  python bench/arrays.py --targets dst-mirror qemu-quorum --workloads randwrite-4k-qd32\n"
    "  python bench/arrays.py --targets dst dst-mirror --ratio dst-mirror/dst\n"
    "  python bench/arrays.py --targets dst-mirror dst-mirror-metrics dst dst-metrics \\\n"
    "      --ratio dst-mirror-metrics/dst-mirror dst-metrics/dst   # --metrics' cost\n"
    "  python bench/arrays.py --targets dst-mirror-memory dst-mirror-meta \\\n"
    "      --workloads randwrite-4k-qd32          # the write-intent bitmap's cost\n"
)

if __name__ == "__main__":
    sys.exit(
        main(
            targets=ALL_TARGETS,
            default_targets=DEFAULT_TARGETS,
            default_workloads=[w.name for w in WORKLOADS if w.kind == "fio"],
            subject="dst-mirror",
            ratios=RATIOS,
            description="Benchmark dst arrays (linear, stripe, mirror of 2 dst serve nodes) "
            "against qemu-nbd's quorum of 2 nbdkit nodes, and nbdkit on one file.",
            epilog=EPILOG,
            prefix="arrays-",
        )
    )
