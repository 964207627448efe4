#!/usr/bin/env python3
"""Resync after a 10-second node outage, with the write load stopped or still running.

Theory of operation
-------------------
Two ``dst serve`` nodes and a ``dst daemon`` mirror over them on unix sockets, member
files in a temporary directory.  First the array's 1 MiB sequential write speed is
measured twice: nbdcopy of a random file (1 MiB requests, its default 64 in flight)
and fio's nbd engine (1 MiB, depth 8).  Then, for each case, fio writes 4 KiB random
blocks over a hot set through the array; one node is SIGKILLed and restarted
``--outage`` seconds later on the same socket and file.  The daemon re-adds the leg by
itself and copies what it missed.  Reported per case:

* regions dirtied while the node was away (the leg's ``missing_regions`` in status just
  before it returns) and bytes the resync copied (goal: within 2x);
* node restarted -> leg in sync (reconnect backoff + re-add + copy), the copy's own time
  and rate, the rate against the sequential write speed (goal: at least half, when the
  resync runs unthrottled on an idle array: the "stopped" case).

In the "running" case fio goes on writing during the resync (the resync competes with
it; its rate is then not comparable with the goal, which is for an idle array).

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

MiB = 1 << 20
DST = [sys.executable, "-m", "dst"]


class Mirror:
    """Nodes ``n0``/``n1`` and a daemon exporting the mirror ``m`` on ``array.sock``."""

    def __init__(self, work: Path, size: int) -> None:
        from dst.meta.layout import member_size_for

        self.work, self.member = work, member_size_for(size)
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        for i in (0, 1):
            self.start_node(i)
        self.control = work / "control.sock"
        with open(work / "daemon.log", "wb") as log:
            self.daemon = subprocess.Popen(
                [*DST, "daemon", "--control", str(self.control)], stdout=subprocess.PIPE, stderr=log
            )
        assert self.daemon.stdout is not None
        self.daemon.stdout.readline()  # "control socket ...": ready
        legs = ", ".join(
            f'{{ type = "remote", name = "n{i}", uri = "nbd+unix:///?socket={work}/n{i}.sock" }}'
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
        sock, img = self.work / f"n{i}.sock", self.work / f"n{i}.img"
        sock.unlink(missing_ok=True)
        with open(self.work / f"n{i}.log", "ab") as log:
            proc = subprocess.Popen(
                [*DST, "serve", str(img), "--size", str(self.member), "--listen", f"unix:{sock}"],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert proc.stdout is not None
        proc.stdout.readline()  # "listening on ...": ready
        self.nodes[i] = proc

    def kill_node(self, i: int) -> None:
        self.nodes[i].send_signal(signal.SIGKILL)
        self.nodes[i].wait()

    def dst(self, *args: str) -> str:
        cmd = [*DST, *args, "--control", str(self.control)]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    def status(self) -> dict[str, Any]:
        out = json.loads(self.dst("status", "m", "--json"))
        root: dict[str, Any] = out["arrays"][0]["root"]
        return root

    def states(self) -> list[str]:
        return [k["state"] for k in self.status()["members"]]

    def close(self) -> None:
        self.daemon.send_signal(signal.SIGTERM)
        self.daemon.wait(timeout=60)
        for p in self.nodes.values():
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)


def fio(uri: str, size: int, runtime: float, rw: str, bs: str, depth: int) -> subprocess.Popen[str]:
    cmd = ["fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
           "--time_based", f"--runtime={runtime:g}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={depth}", "--norandommap", "--randrepeat=0",
           "--output-format=json"]  # fmt: skip
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


def one_case(work: Path, size: int, hot: int, outage: float, keep_load: bool) -> dict[str, Any]:
    c = Mirror(work, size)
    try:
        seq_copy = nbdcopy_speed(c.uri, size, work)
        seq_fio = fio_write(fio(c.uri, size, 5, "write", "1m", 8))["MBps"]
        lead = 3.0
        tail = 30.0 if keep_load else 0.0  # a long tail: killed once the leg is in sync
        load = fio(c.uri, hot, lead + outage + tail, "randwrite", "4k", 8)
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
    finally:
        c.close()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=512, help="array size in MiB (default 512)")
    p.add_argument("--hot", type=int, default=128, help="hot set of the load, MiB (128)")
    p.add_argument("--outage", type=float, default=10.0, help="seconds the node is away")
    p.add_argument("--dir", default=None, help="where to put the member files")
    args = p.parse_args()
    rows = []
    for keep in (False, True):
        with tempfile.TemporaryDirectory(prefix="dst-resil-", dir=args.dir) as tmp:
            row = one_case(Path(tmp), args.size * MiB, args.hot * MiB, args.outage, keep)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| load during resync | seq write 1M (nbdcopy / fio) | load | written while away "
          "| dirtied | copied | copied/dirtied | back in sync after | copy time | copy rate "
          "| rate/seq (fio) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["copied_bytes"] / r["dirtied_bytes"] if r["dirtied_bytes"] else 0.0
        print(
            f"| {r['load']} | {r['seq_nbdcopy_MBps']:.0f} / {r['seq_fio_MBps']:.0f} MB/s "
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
