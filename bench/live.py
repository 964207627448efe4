#!/usr/bin/env python3
"""Live replace of a 1 GiB ``dst serve`` node under a steady load: its time, and what
the foreground load gets during it compared with before.

Theory of operation
-------------------
For a linear array (two nodes of SIZE) and a mirror (two legs of SIZE of data), one
run each: three ``dst serve`` nodes and a ``dst daemon`` on unix sockets, started and
stopped by the test suite's harness (``tests/support/cluster.py``).  The array is
first written end to end (fio, 1 MiB sequential) so the copy moves real data, not holes
(a linear replace zeroes holes instead of copying them).  Then one long fio job (nbd
engine, 4 KiB random writes, depth 8) runs with an IOPS log averaged over 250 ms
windows; after a baseline of BASELINE seconds ``dst replace`` moves node n1 to the new
node n2 (no rate limit: the worst case for the load), its status polled every 0.1 s;
a second after it finished, fio is stopped.  The log is then cut at the replace's start
and end: the load's IOPS before and during, and the replace's time and copy rate.

Not a test: ``python bench/live.py --help``.  Needs fio with its nbd engine.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for the harness
from tests.support.cluster import Cluster, remote

MiB = 1 << 20
BASELINE = 8.0  # seconds of load before the replace
LOG_MS = 250


class Bench:
    """Nodes n0, n1, n2 and a daemon (the harness's cluster); array "a" over n0 and n1."""

    def __init__(self, c: Cluster, kind: str, size: int) -> None:
        from dst.meta.layout import member_size_for

        self.c, self.work, self.kind, self.size = c, c.work, kind, size
        node_size = member_size_for(size) if kind == "mirror" else size
        for n in ("n0", "n1", "n2"):
            c.node(n, node_size)
        c.start_daemon()
        legs = [remote(n, c.nodes[n].uri) for n in ("n0", "n1")]
        self.array_uri = c.create("a", {"type": kind, "name": "t", "members": legs})
        self.array_size = 2 * size if kind == "linear" else size

    def dst(self, *args: str) -> str:
        return self.c.daemon.dst(*args).stdout

    def job(self) -> dict[str, Any]:
        job: dict[str, Any] = self.c.status("a")["replace"]
        return job

    def fio(self, *args: str) -> subprocess.Popen[str]:
        cmd = ["fio", "--name=load", "--ioengine=nbd", f"--uri={self.array_uri}"]
        cmd += [f"--size={self.array_size}", *args]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def iops_log(path: Path) -> list[tuple[float, float]]:
    """fio's averaged IOPS log: (seconds since the job started, IOPS) per window."""
    out = []
    for line in path.read_text().splitlines():
        f = [x.strip() for x in line.split(",")]
        out.append((int(f[0]) / 1000, float(f[1])))
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run_one(work: Path, kind: str, size: int) -> dict[str, Any]:
    with Cluster(work) as c:
        b = Bench(c, kind, size)
        fill = b.fio("--rw=write", "--bs=1M", "--iodepth=8")
        _, err = fill.communicate()
        assert fill.returncode == 0, err
        prefix = work / "load"
        load = b.fio("--rw=randwrite", "--bs=4k", "--iodepth=8", "--time_based",
                     "--runtime=600", f"--write_iops_log={prefix}",
                     f"--log_avg_msec={LOG_MS}")  # fmt: skip
        t_fio = time.monotonic()  # fio's log clock starts about here (+ its set-up)
        time.sleep(BASELINE)
        t0 = time.monotonic()
        n2 = c.nodes["n2"].uri
        b.dst("replace", "a", "n1", "--uri", n2, "--name", "n2", "--no-wait")
        while (job := b.job())["state"] in ("starting", "copying"):
            time.sleep(0.1)
        t1 = time.monotonic()
        time.sleep(1.0)
        load.send_signal(signal.SIGINT)  # fio stops and writes its log
        _, err = load.communicate(timeout=60)
        assert load.returncode in (0, 128), (load.returncode, err)  # 128: stopped by signal
        assert job["state"] == "finished", job
    log = iops_log(Path(f"{prefix}_iops.1.log"))
    s0, s1 = t0 - t_fio, t1 - t_fio
    before = [v for t, v in log if 1.0 <= t <= s0]  # the first second: ramp-up
    during = [v for t, v in log if s0 + LOG_MS / 1000 <= t <= s1]
    return {
        "kind": kind,
        "node_mib": size // MiB,
        "replace_s": t1 - t0,
        "copy_mb_s": size / (t1 - t0) / 1e6,
        "iops_before": mean(before),
        "iops_during": mean(during),
        "windows": [len(before), len(during)],
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=1024, help="node size in MiB (default 1024)")
    p.add_argument("--dir", default=None, help="where to put the node files")
    p.add_argument("--kinds", default="linear,mirror", help="comma-separated (default both)")
    args = p.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        with tempfile.TemporaryDirectory(prefix="dst-live-", dir=args.dir) as tmp:
            rows.append(run_one(Path(tmp), kind, args.size * MiB))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print("| array | node | replace time | copy rate | load before | load during | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['node_mib']} MiB | {r['replace_s']:.1f} s "
            f"| {r['copy_mb_s']:.0f} MB/s | {r['iops_before']:,.0f} IOPS "
            f"| {r['iops_during']:,.0f} IOPS | {r['iops_during'] / r['iops_before']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
