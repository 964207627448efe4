#!/usr/bin/env python3
"""Benchmark parity arrays: raid5 of 3 and raid6 of 4 ``dst serve`` nodes against the
mirror of 2, on the same workloads, in one interleaved run; and the rebuild time of a
member.

Theory of operation
-------------------
The fio/nbdcopy part is ``bench.py``'s driver (imported, not copied) with three
targets, each a ``dst daemon`` over its own ``dst serve`` nodes on unix sockets:

* ``dst-mirror``: a mirror of 2 nodes, each holding the whole array (``--size``);
* ``dst-raid5``: a raid5 of 3 nodes, each holding half of it (plus its parity share);
* ``dst-raid6``: a raid6 of 4 nodes, each holding half of it.

Every target exports ``--size`` bytes; member files are prefilled with random data
(reads are not answered from holes).  Repetitions interleave the targets, so slow
drift of the machine is spread over all three.  1 MiB sequential writes are full
stripes for the parity arrays (no reads); 4 KiB random writes are read-modify-write
or reconstruct-write (a read and two or three writes per write: their honest cost).

``--member-rate RATE`` puts each node in a network namespace of its own, reached over
TCP through a veth pair whose host end sends at most ``RATE`` bytes per second (``tc
tbf``; :mod:`tests.support.netns`): members whose disk or link is the limit rather
than the CPU, where a parity array's smaller share per member shows (a mirror of 2
writes 1 MiB to each member per 1 MiB written; raid5 of 3 and raid6 of 4, 512 KiB).
Choose a rate the CPU can keep up with (64M on a 2-core machine).

``python bench/parity.py rebuild --member 1G`` measures instead how long a member of
that size takes to be rebuilt (``dst readd --full`` after ``dst fail``: every region
recomputed from the other members; for the mirror, copied from the other leg), for
each kind in turn, on members full of random data (no sparse shortcut).

This is not a test: it prints numbers.  Run ``python bench/parity.py --help``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import WORKLOADS, Context, MiB, Target, cluster, fill_random, main, parse_size
from tests.support.cluster import Cluster, remote  # importable once bench is imported
from tests.support.netns import namespace, node_in

SLACK = 1 * MiB  # room for the metadata at the end of a member
KINDS = {"mirror": (2, 1), "raid5": (3, 2), "raid6": (4, 2)}  # members, data shares


def member_paths(ctx: Context, kind: str) -> list[Path]:
    return [ctx.workdir / f"{kind}{i}.img" for i in range(KINDS[kind][0])]


def member_size(ctx: Context, kind: str) -> int:
    return ctx.size // KINDS[kind][1] + SLACK


def target(kind: str, uris: list[str]) -> dict[str, object]:
    members = [remote(f"n{i}", u) for i, u in enumerate(uris)]
    return {"type": kind, "name": "t", "members": members}


MEMBER_RATE: int | None = None  # --member-rate: nodes in namespaces behind this limit


@contextlib.contextmanager
def _array(ctx: Context, kind: str) -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(cluster(ctx))  # stops the daemon first, then the nodes
        uris = []
        for i, path in enumerate(member_paths(ctx, kind)):
            name = f"{kind}-n{i}"
            if MEMBER_RATE is None:
                uris.append(c.node(name, path=path).uri)
            else:  # removed after the cluster stopped (exit order)
                ns = stack.enter_context(namespace(MEMBER_RATE))
                uris.append(node_in(c, name, ns, path=path).uri)
        c.start_daemon(c.spec(kind, target(kind, uris), export="bench"))
        yield c.uri(kind, "bench")


def _prepare(kind: str) -> Target:
    def prepare(ctx: Context) -> None:
        for path in member_paths(ctx, kind):
            if not path.exists():
                fill_random(path, member_size(ctx, kind))

    def start(ctx: Context) -> contextlib.AbstractContextManager[str]:
        return _array(ctx, kind)

    n = KINDS[kind][0]
    return Target(f"dst-{kind}", start, (), f"dst daemon: {kind} of {n} dst serve nodes", prepare)


TARGETS = [_prepare(k) for k in KINDS]
EPILOG = (
    "examples:\n"
    "  python bench/parity.py --size 512M --runtime 5 --reps 3   # about 6 minutes\n"
    "  python bench/parity.py --quick\n"
    "  python bench/parity.py --member-rate 64M --workloads seqwrite-1m-qd8  # link-bound\n"
    "  python bench/parity.py rebuild --member 1G                 # rebuild time per kind\n"
)


# -- rebuild ------------------------------------------------------------------------


def rebuild(member: int, workdir: Path) -> dict[str, dict[str, float]]:
    """Seconds to rebuild one member of ``member`` bytes, per kind."""
    out: dict[str, dict[str, float]] = {}
    paths = [workdir / f"m{i}.img" for i in range(4)]
    for p in paths:
        print(f"preparing {p} ({member // MiB} MiB of random data)", flush=True)
        fill_random(p, member)
    for kind, (n, _) in KINDS.items():
        for p in paths:  # wipe the previous kind's metadata (the last MiB)
            with open(p, "r+b") as f:
                f.truncate(member - SLACK)
                f.truncate(member)
        (workdir / kind).mkdir()
        with Cluster(workdir / kind) as c:
            uris = [c.node(f"n{i}", path=paths[i]).uri for i in range(n)]
            daemon = c.start_daemon()
            c.create("a", target(kind, uris))
            daemon.dst("fail", "a", "n1")
            t0 = time.monotonic()
            daemon.dst("readd", "a", "n1", "--full")
            while True:
                root = c.status("a")["root"]
                if all(m["state"] == "in_sync" for m in root["members"]):
                    break
                time.sleep(0.2)  # a benchmark polling for the end, not a test
            took = time.monotonic() - t0
            resync = root["detail"]["resync"]
            out[kind] = {"seconds": took, "MB/s": resync["bytes"] / took / 1e6,
                         "copier_seconds": resync["elapsed"]}  # fmt: skip
            print(f"{kind}: member of {member // MiB} MiB rebuilt in {took:.1f} s "
                  f"({out[kind]['MB/s']:.0f} MB/s)", flush=True)  # fmt: skip
            daemon.dst("stop", "a")
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["rebuild"]:
        import argparse

        p = argparse.ArgumentParser(prog="parity.py rebuild")
        p.add_argument("--member", type=parse_size, default=1 << 30, help="member size")
        p.add_argument("--dir", help="where to put the member files (default: $TMPDIR)")
        a = p.parse_args(sys.argv[2:])
        with tempfile.TemporaryDirectory(prefix="dst-rebuild-", dir=a.dir) as tmp:
            print(json.dumps(rebuild(a.member, Path(tmp)), indent=2))
        sys.exit(0)
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--member-rate", type=parse_size)
    known, rest = pre.parse_known_args()
    MEMBER_RATE = known.member_rate
    rated = f" behind {MEMBER_RATE // MiB} MiB/s links" if MEMBER_RATE else ""
    sys.exit(
        main(
            rest,
            targets=TARGETS,
            default_targets=[t.name for t in TARGETS],
            default_workloads=[w.name for w in WORKLOADS if w.kind == "fio"],
            subject="dst-mirror",
            ratios=["dst-raid5/dst-mirror", "dst-raid6/dst-mirror"],
            description="Benchmark raid5 of 3 and raid6 of 4 dst serve nodes against the "
            f"mirror of 2 (fio nbd engine, nbdcopy), interleaved{rated}.  --member-rate "
            "RATE: each node in a network namespace, its link limited to RATE bytes/s.",
            epilog=EPILOG,
            prefix=f"parity-rate{MEMBER_RATE // MiB}M-" if MEMBER_RATE else "parity-",
        )
    )
