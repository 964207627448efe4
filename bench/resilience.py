#!/usr/bin/env python3
"""Resync after a node outage, with the write load stopped or still running.

Theory of operation
-------------------
Two ``dst serve`` nodes and a ``dst daemon`` mirror over them on unix sockets, member
files in a temporary directory, all started and stopped by the test suite's harness
(``tests/support/cluster.py``).  First the array's 1 MiB sequential write speed is
measured twice: nbdcopy of a random file (1 MiB requests, its default 64 in flight)
and fio's nbd engine (1 MiB, depth 8).  Then, for each case, fio writes random
``--bs`` blocks (default 4 KiB; ``--load-rate`` caps it) over a hot set of ``--hot``
MiB through the array; one node is SIGKILLed and restarted ``--outage`` seconds later
on the same socket and file.  The daemon re-adds the leg by itself and copies what it
missed.  Reported per case:

* regions dirtied while the node was away (the leg's ``missing_regions`` in status just
  before it returns) and bytes the resync copied (goal: within 2x);
* node restarted -> leg in sync (reconnect backoff + re-add + copy), the copy's own time
  and rate, the rate against the sequential write speed (goal: at least half, when the
  resync runs unthrottled on an idle array: the "stopped" case).

In the "running" case fio goes on writing during the resync (the resync competes with
it; its rate is then not comparable with the goal, which is for an idle array).

The cases of the retired ``bench/outage.py``: ``--size 1024 --load stopped`` (4 KiB
over a 128 MiB hot set), ``--size 1024 --hot 1024 --load stopped`` (the whole device),
``--size 1024 --hot 1024 --bs 64k --load-rate 20m --load stopped``.

Not a test: ``python bench/resilience.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
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


class Mirror:
    """Nodes ``n0``/``n1`` and a daemon exporting the mirror ``m`` on ``m.sock``."""

    def __init__(self, c: Cluster, size: int) -> None:
        from dst.meta.layout import member_size_for

        self.c, self.member = c, member_size_for(size)
        for i in (0, 1):
            self.start_node(i)
        c.start_daemon()
        legs = [remote(f"n{i}", c.nodes[f"n{i}"].uri) for i in (0, 1)]
        self.uri = c.create("m", {"type": "mirror", "name": "m", "members": legs})

    def start_node(self, i: int) -> None:
        """Start (or restart: same file, same socket) node ``n<i>``."""
        self.c.node(f"n{i}", self.member)

    def kill_node(self, i: int) -> None:
        self.c.nodes[f"n{i}"].kill()

    def status(self) -> dict[str, Any]:
        root: dict[str, Any] = self.c.status("m")["root"]
        return root

    def states(self) -> list[str]:
        return [k["state"] for k in self.status()["members"]]


def fio(
    uri: str, size: int, runtime: float, rw: str, bs: str, depth: int, *extra: str
) -> subprocess.Popen[str]:
    cmd = ["fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
           "--time_based", f"--runtime={runtime:g}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={depth}", "--norandommap", "--randrepeat=0",
           "--output-format=json", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fio_write(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, err = proc.communicate()
    if proc.returncode != 0 and '"jobs"' not in out:  # SIGINT: non-zero, still reports
        raise RuntimeError(f"fio failed: {err}")
    job = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    return {"MBps": job["bw_bytes"] / 1e6, "bytes": float(job["io_bytes"])}


def nbdcopy_speed(uri: str, size: int, work: Path) -> float:
    src = work / "random.bin"
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    t = time.monotonic()
    subprocess.run(["nbdcopy", "--flush", f"--request-size={MiB}", str(src), uri], check=True)
    seconds = time.monotonic() - t
    src.unlink()
    return size / seconds / 1e6


def one_case(
    work: Path, size: int, hot: int, outage: float, keep_load: bool, bs: str, rate: str | None
) -> dict[str, Any]:
    with Cluster(work) as cluster:
        c = Mirror(cluster, size)
        seq_copy = nbdcopy_speed(c.uri, size, work)
        seq_fio = fio_write(fio(c.uri, size, 5, "write", "1m", 8))["MBps"]
        lead = 3.0
        tail = 30.0 if keep_load else 0.0  # a long tail: stopped once the leg is in sync
        extra = [f"--rate={rate}"] if rate else []
        load = fio(c.uri, hot, lead + outage + tail, "randwrite", bs, 8, *extra)
        time.sleep(lead)
        c.kill_node(1)
        down = time.monotonic()
        time.sleep(outage)
        missing = int(c.status()["detail"]["legs"][1].get("missing_regions", 0))
        region = int(c.status()["detail"]["region_size"])
        c.start_node(1)
        back = time.monotonic()
        while c.states() != ["in_sync", "in_sync"]:
            time.sleep(0.05)
        synced = time.monotonic()
        if keep_load:
            load.send_signal(signal.SIGINT)  # fio stops early and still reports
        written = fio_write(load)
        resync = c.status()["detail"]["resync"]
    copy_s = float(resync.get("elapsed") or (synced - back))
    load_s = lead + outage + ((synced - down - outage) if keep_load else 0.0)
    return {
        "load": "running" if keep_load else "stopped",
        "bs": bs,
        "hot_MiB": hot // MiB,
        "seq_nbdcopy_MBps": seq_copy,
        "seq_fio_MBps": seq_fio,
        "load_MBps": written["bytes"] / load_s / 1e6,
        "written_during_outage": written["bytes"] * outage / load_s,
        "regions_dirtied": missing,
        "dirtied_bytes": missing * region,
        "copied_bytes": int(resync["bytes"]),
        "back_in_sync_s": synced - back,
        "copy_s": copy_s,
        "copy_MBps": resync["bytes"] / copy_s / 1e6 if copy_s else 0.0,
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=512, help="array size in MiB (default 512)")
    p.add_argument("--hot", type=int, default=128, help="hot set of the load, MiB (128)")
    p.add_argument("--outage", type=float, default=10.0, help="seconds the node is away")
    p.add_argument("--bs", default="4k", help="fio block size of the load (default 4k)")
    p.add_argument("--load-rate", default=None, help="cap the load, fio --rate (e.g. 20m)")
    p.add_argument(
        "--load",
        choices=["stopped", "running", "both"],
        default="both",
        help="the load during the resync: stopped, running or both cases (default both)",
    )
    p.add_argument("--dir", default=None, help="where to put the member files")
    args = p.parse_args()
    rows = []
    cases = {"stopped": [False], "running": [True], "both": [False, True]}[args.load]
    for keep in cases:
        with tempfile.TemporaryDirectory(prefix="dst-resil-", dir=args.dir) as tmp:
            row = one_case(Path(tmp), args.size * MiB, args.hot * MiB, args.outage, keep,
                           args.bs, args.load_rate)  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| load during resync | load bs / hot set | seq write 1M (nbdcopy / fio) | load "
          "| written while away | dirtied | copied | copied/dirtied | back in sync after "
          "| copy time | copy rate | rate/seq (fio) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["copied_bytes"] / r["dirtied_bytes"] if r["dirtied_bytes"] else 0.0
        print(
            f"| {r['load']} | {r['bs']} / {r['hot_MiB']} MiB "
            f"| {r['seq_nbdcopy_MBps']:.0f} / {r['seq_fio_MBps']:.0f} MB/s "
            f"| {r['load_MBps']:.1f} MB/s | {r['written_during_outage'] / MiB:.0f} MiB "
            f"| {r['regions_dirtied']} regions ({r['dirtied_bytes'] / MiB:.0f} MiB) "
            f"| {r['copied_bytes'] / MiB:.0f} MiB | {ratio:.2f}x | {r['back_in_sync_s']:.1f} s "
            f"| {r['copy_s']:.2f} s | {r['copy_MBps']:.0f} MB/s "
            f"| {r['copy_MBps'] / r['seq_fio_MBps']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
