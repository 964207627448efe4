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
  exporting the array on its own unix socket, all started and stopped by the test
  suite's harness (``tests/support/cluster.py``, see ``bench.py``).  The linear array
  uses the first half of each leg (so fio's range covers both nodes); the stripe uses
  64 KiB chunks; the mirror runs as ``dst up`` runs it (region tracking at the default
  64 KiB grain).
* ``qemu-quorum``, the peer that does the mirror's job: two nbdkit file-plugin nodes and
  ``qemu-nbd --image-opts driver=quorum,vote-threshold=2,read-pattern=fifo,...`` over
  them (every write goes to both children and completes when both acknowledged it, as a
  dst mirror write; fifo reads one child, as a mirror reads one leg -- the default
  ``quorum`` pattern would read both and compare).
* ``python-floor``: ``bench/mirror_floor.py`` over the same two nodes, a mirror that
  does only what every mirror must per request (parse, send to both legs, collect both
  replies, reply): what Python itself costs, so that ``dst-mirror`` minus it is what
  dst's design costs (range lock, write-intent bitmap, gates, timeouts).
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
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import TARGETS, WORKLOADS, Context, MiB, Target, cluster, fill_random, main
from tests.support.cluster import Cluster, remote  # importable once bench is imported

from dst.net.address import parse_address

LEGS = 2
LEG_SLACK = 1 * MiB  # room for a mirror's bitmap and superblocks at the end of a leg


def leg_paths(ctx: Context) -> list[Path]:
    return [ctx.workdir / f"leg{i}.img" for i in range(LEGS)]


def prepare_legs(ctx: Context) -> None:
    """Create the leg files once (random data, so reads are not answered from holes)."""
    for path in leg_paths(ctx):
        if not path.exists():
            fill_random(path, ctx.size + LEG_SLACK)


def array_target(kind: str, uris: list[str], ctx: Context) -> dict[str, Any]:
    """The array's target: ``remote`` members over the nodes."""
    members: list[dict[str, Any]] = [remote(f"n{i}", uri) for i, uri in enumerate(uris)]
    if kind == "linear":  # half of each leg: the array is --size, spread over both nodes
        for m in members:
            m["length"] = ctx.size // LEGS
    return {"type": kind, "members": members}


METRICS = ["--metrics", "127.0.0.1:0"]  # every process serves /metrics (nobody scrapes)


def node_uris(ctx: Context, c: Cluster, *, metrics: bool = False) -> list[str]:
    """Start the two ``dst serve`` nodes on the leg files (serving metrics too, with
    ``metrics``); their URIs."""
    args = METRICS if metrics else []
    nodes = [c.node(f"n{i}", path=leg, args=["--name", f"n{i}", *args]) for i, leg in
             enumerate(leg_paths(ctx))]  # fmt: skip
    return [n.uri for n in nodes]


@contextlib.contextmanager
def _dst_array(
    ctx: Context, kind: str, *, base: str | None = None, metrics: bool = False
) -> Iterator[str]:
    """A ``dst daemon`` over two nodes; with ``base``, that source tree's daemon; with
    ``metrics``, the daemon and the nodes serve metrics (their I/O is timed)."""
    with cluster(ctx) as c:  # stops the daemon first, then the nodes
        name = f"bench-{kind}"
        uris = node_uris(ctx, c, metrics=metrics)
        spec = c.spec(name, array_target(kind, uris, ctx), export="bench")
        c.start_daemon(spec, env={"PYTHONPATH": base} if base is not None else None,
                       args=METRICS if metrics else ())  # fmt: skip
        yield c.uri(name, "bench")


@contextlib.contextmanager
def _bare_mirror(ctx: Context, mode: str) -> Iterator[str]:
    """``bench/mirror_serve.py --mode MODE`` over two ``dst serve`` nodes."""
    with cluster(ctx) as c:
        uris = node_uris(ctx, c)
        name = f"mirror-{mode}"
        here = Path(__file__).resolve().parent
        cmd = [sys.executable, str(here / "mirror_serve.py"), "--mode", mode]
        cmd += ["--listen", f"unix:{c.sockets / name}.sock", *uris]
        yield c.server(name, cmd, export="bench", python=True).uri


@contextlib.contextmanager
def _floor(ctx: Context) -> Iterator[str]:
    """``bench/mirror_floor.py`` over two ``dst serve`` nodes: a mirror that does only
    what every mirror must (no lock, bitmap, gates or timeouts): Python's floor."""
    with cluster(ctx) as c:
        legs = [f"{a.path}:{a.export}" for a in map(parse_address, node_uris(ctx, c))]
        sock = c.sockets / "floor.sock"
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "mirror_floor.py"), str(sock)]
        yield c.server("floor", [*cmd, *legs], sock=sock, python=True).uri


def start_floor(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _floor(ctx)


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
    with cluster(ctx) as c:  # stops qemu-nbd first, then the nbdkit nodes
        socks = []
        for i, leg in enumerate(leg_paths(ctx)):
            sock = c.sockets / f"kit{i}.sock"
            c.server(f"kit{i}", ["nbdkit", "--foreground", "-U", str(sock), "file", str(leg)])
            socks.append(str(sock))
        sock = c.sockets / "quorum.sock"
        # as bench.py's qemu-nbd: writeback cache, -e 8 clients, -t persistent
        cmd = ["qemu-nbd", "-k", str(sock), "--cache=writeback", "-e", "8", "-t"]
        cmd += ["--image-opts", quorum_opts(socks)]
        yield c.server("quorum", cmd).uri


def start_quorum(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _quorum(ctx)


_LEGS_NOTE = "2 dst serve nodes"
ARRAY_TARGETS: list[Target] = [
    Target("dst-linear", start_linear, (), f"dst daemon: linear of {_LEGS_NOTE}", prepare_legs),
    Target("dst-stripe", start_stripe, (), f"dst daemon: stripe of {_LEGS_NOTE}", prepare_legs),
    Target("dst-mirror", start_mirror, (), f"dst daemon: mirror of {_LEGS_NOTE}", prepare_legs),
    Target(
        "python-floor",
        start_floor,
        (),
        f"bench/mirror_floor.py: the least a Python mirror does, over {_LEGS_NOTE}",
        prepare_legs,
    ),
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
