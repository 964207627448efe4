#!/usr/bin/env python3
"""Resync after a node outage: time, bytes copied versus bytes dirtied, resync rate.

Theory of operation
-------------------
Two ``dst serve`` nodes and a ``dst daemon`` mirror over them (unix sockets, member
files in a temporary directory).  For each write workload: the array's sequential write
speed is measured first (fio, 1 MiB, depth 8); then fio runs the workload, one node is
killed (SIGKILL) a few seconds in and restarted ``--outage`` seconds later, on the same
socket and file.  The daemon notices, re-adds the leg by itself and copies what it
missed.  The load stops when the node is back, so the resync runs unthrottled on an idle
array; we then report

* bytes written through the array while the node was away (fio's rate times the
  outage), the regions they dirtied (the leg's ``missing_regions`` in status just before
  it came back) and the bytes the resync copied;
* the resync's time (node restarted -> leg in sync) and rate, against the sequential
  write speed.

Not a test: ``python bench/outage.py --help``.
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

MiB = 1 << 20
DST = [sys.executable, "-m", "dst"]
REGION = 64 << 10


def member_size(data: int) -> int:
    from dst.meta.layout import member_size_for

    return member_size_for(data)


class Cluster:
    """Two nodes and a daemon with a mirror ``m`` exported on ``array.sock``."""

    def __init__(self, work: Path, size: int) -> None:
        self.work, self.size = work, size
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        for i in (0, 1):
            self.start_node(i)
        self.control = work / "control.sock"
        with open(work / "daemon.log", "wb") as log:
            self.daemon = subprocess.Popen(
                [*DST, "daemon", "--control", str(self.control)],
                stdout=subprocess.PIPE, stderr=log,
            )  # fmt: skip
        assert self.daemon.stdout is not None
        self.daemon.stdout.readline()  # "control socket ..."
        legs = ", ".join(
            f'{{ type = "remote", name = "leg{i}", uri = "nbd+unix:///?socket={work}/n{i}.sock" }}'
            for i in (0, 1)
        )
        spec = work / "m.toml"
        spec.write_text(
            f'[array]\nname = "m"\nlisten = ["unix:{work}/array.sock"]\n'
            f'target = {{ type = "mirror", name = "m", members = [{legs}] }}\n'
        )
        self.dst("create", str(spec))
        self.uri = f"nbd+unix:///?socket={work}/array.sock"

    def start_node(self, i: int) -> None:
        sock = self.work / f"n{i}.sock"
        sock.unlink(missing_ok=True)
        img, size = self.work / f"n{i}.img", str(member_size(self.size))
        with open(self.work / f"n{i}.log", "ab") as log:
            proc = subprocess.Popen(
                [*DST, "serve", str(img), "--size", size, "--listen", f"unix:{sock}"],
                stdout=subprocess.PIPE, stderr=log,
            )  # fmt: skip
        assert proc.stdout is not None
        proc.stdout.readline()  # "listening on ..."
        self.nodes[i] = proc

    def kill_node(self, i: int) -> None:
        self.nodes[i].send_signal(signal.SIGKILL)
        self.nodes[i].wait()

    def dst(self, *args: str) -> str:
        cmd = [*DST, *args, "--control", str(self.control)]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    def mirror(self) -> dict[str, Any]:
        root: dict[str, Any] = json.loads(self.dst("status", "m", "--json"))["arrays"][0]["root"]
        return root

    def close(self) -> None:
        self.daemon.send_signal(signal.SIGTERM)
        self.daemon.wait(timeout=60)
        for p in self.nodes.values():
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)


def fio(
    uri: str, size: int, runtime: float, rw: str, bs: str, depth: int, *extra: str
) -> subprocess.Popen[str]:
    cmd = ["fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
           "--time_based", f"--runtime={runtime:g}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={depth}", "--norandommap", "--randrepeat=0",
           "--output-format=json", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fio_result(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed: {err}")
    job = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    return {"MB/s": job["bw_bytes"] / 1e6, "bytes": float(job["io_bytes"])}


def run_one(
    work: Path, size: int, outage: float, name: str, load_size: int, bs: str, *extra: str
) -> dict[str, Any]:
    c = Cluster(work, size)
    try:
        seq = fio_result(fio(c.uri, size, 5, "write", "1m", 8))["MB/s"]
        lead = 3.0
        # ends when the node comes back
        load = fio(c.uri, load_size, lead + outage, "randwrite", bs, 8, *extra)
        time.sleep(lead)
        c.kill_node(1)
        down = time.monotonic()
        written = fio_result(load)
        time.sleep(max(0.0, outage - (time.monotonic() - down)))
        missing = c.mirror()["detail"]["legs"][1].get("missing_regions", 0)
        c.start_node(1)
        back = time.monotonic()
        while [k["state"] for k in c.mirror()["members"]] != ["in_sync", "in_sync"]:
            time.sleep(0.05)
        synced = time.monotonic()
        resync = c.mirror()["detail"]["resync"]
        during = written["bytes"] * outage / (lead + outage)  # while the node was away
        seconds = synced - back  # restart -> in sync: reconnect (backoff), re-add, copy
        copy_s = float(resync.get("elapsed") or seconds)
        return {
            "workload": name,
            "seq_write_MBps": seq,
            "outage_s": outage,
            "written_during_outage": during,
            "regions_dirtied": missing,
            "dirtied_bytes": missing * REGION,
            "copied_bytes": resync["bytes"],
            "resync_s": seconds,
            "copy_s": copy_s,
            "resync_MBps": resync["bytes"] / copy_s / 1e6 if copy_s else 0.0,
        }
    finally:
        c.close()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=1024, help="array size in MiB (default 1024)")
    p.add_argument("--outage", type=float, default=10.0, help="seconds the node is away")
    p.add_argument("--dir", default=None, help="where to put the member files")
    args = p.parse_args()
    rows = []
    size = args.size * MiB
    workloads: list[tuple[str, int, str, list[str]]] = [
        ("4k random writes, 128 MiB hot set", 128 * MiB, "4k", []),
        ("64k random writes at 20 MB/s", size, "64k", ["--rate=20m"]),
        ("4k random writes, whole device", size, "4k", []),
    ]
    for name, load_size, bs, extra in workloads:
        with tempfile.TemporaryDirectory(prefix="dst-outage-", dir=args.dir) as tmp:
            rows.append(run_one(Path(tmp), size, args.outage, name, load_size, bs, *extra))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        "| workload | seq write | written while away | regions dirtied (x64 KiB) "
        "| copied | copied/dirtied | back in sync after | copy time | copy rate | rate/seq |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["copied_bytes"] / r["dirtied_bytes"] if r["dirtied_bytes"] else 0.0
        print(
            f"| {r['workload']} | {r['seq_write_MBps']:.0f} MB/s "
            f"| {r['written_during_outage'] / MiB:.0f} MiB "
            f"| {r['regions_dirtied']} ({r['dirtied_bytes'] / MiB:.0f} MiB) "
            f"| {r['copied_bytes'] / MiB:.0f} MiB | {ratio:.2f}x | {r['resync_s']:.1f} s "
            f"| {r['copy_s']:.1f} s "
            f"| {r['resync_MBps']:.0f} MB/s | {r['resync_MBps'] / r['seq_write_MBps']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
