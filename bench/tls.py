#!/usr/bin/env python3
"""The cost of TLS: dst serve with and without TLS, against nbdkit with and without.

Theory of operation
-------------------
Four servers export the same prefilled file on TCP loopback: ``dst serve`` plain and
with ``--tls require``, ``nbdkit file`` plain and with ``--tls=require`` (both with
the certificates ``dst certs`` made for the run).  fio's nbd engine (libnbd) runs 4 KiB
random reads and writes at queue depth 32 and 1 MiB sequential reads and writes at
queue depth 8 against each, in rounds (every repetition starts every server once), so
drift is spread over all of them.  The TLS client does not verify the server
(``tls-verify-peer=false``; fio's libnbd may not read a certificate directory from a
URI): verification happens once per connection and does not change the cost per I/O
measured here.

The servers are started and stopped by the test suite's harness
(``tests/support/cluster.py``): ready on their own signal, their exit status checked.
Beside throughput it reports server CPU per I/O: user+sys time of the server process
(``/proc/PID/stat``, all threads) over the run divided by the I/Os fio completed.  The
table gives medians and the ratios TLS/plain for each server and dst/nbdkit with TLS.

Run ``python bench/tls.py --help``; ``--quick`` is a one-minute sanity run.  This is
not a test: it prints numbers (and writes them to bench/results/tls-*.json).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the harness, tests/support/cluster.py
from tests.support.cluster import Cluster, Process, free_port  # noqa: E402

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")
WORKLOADS = {
    "randread-4k-qd32": {"rw": "randread", "bs": "4k", "iodepth": "32"},
    "randwrite-4k-qd32": {"rw": "randwrite", "bs": "4k", "iodepth": "32"},
    "seqread-1m-qd8": {"rw": "read", "bs": "1m", "iodepth": "8"},
    "seqwrite-1m-qd8": {"rw": "write", "bs": "1m", "iodepth": "8"},
}
TARGETS = ("dst", "dst-tls", "nbdkit", "nbdkit-tls")


def cpu_seconds(pid: int) -> float:
    """user+sys of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@contextlib.contextmanager
def server(name: str, disk: Path, pki: Path, work: Path) -> Iterator[tuple[str, int]]:
    """Start target ``name`` on 127.0.0.1 (the harness checks its exit); yield (fio URI,
    server pid)."""
    tls = name.endswith("-tls")
    with Cluster(work) as c:
        if name.startswith("dst"):
            args = ["--tls-certificates", str(pki / "node")] if tls else []
            proc: Process = c.node(name, path=disk, listen=["tcp"], args=args)
            uri = c.nodes[name].uri
        else:
            port = free_port()
            cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(disk)]
            if tls:
                cmd[1:1] = ["--tls=require", f"--tls-certificates={pki / 'node'}"]
            proc = c.server(name, cmd, port=port)
            uri = f"{'nbds' if tls else 'nbd'}://127.0.0.1:{port}/"
        yield (uri + "?tls-verify-peer=false" if tls else uri), proc.pid


def fio(uri: str, name: str, *, size: int, runtime: float, pid: int) -> dict[str, float]:
    """One time-bound fio run; throughput and the server's CPU per I/O."""
    opts = WORKLOADS[name]
    cmd = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--size={size}"]
    cmd += ["--time_based", f"--runtime={runtime:g}", "--norandommap", "--randrepeat=0"]
    cmd += ["--output-format=json", *(f"--{k}={v}" for k, v in opts.items())]
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 3 + 60)
    cpu = cpu_seconds(pid) - cpu0
    if out.returncode != 0:
        raise RuntimeError(f"fio {name} on {uri} failed: {out.stderr.strip()}")
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    side = job["write" if "write" in opts["rw"] else "read"]
    ios = max(1, int(side["total_ios"]))
    return {
        "iops": float(side["iops"]),
        "MB/s": float(side["bw_bytes"]) / 1e6,
        "cpu_us_per_io": cpu / ios * 1e6,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        t: {w: [] for w in WORKLOADS} for t in args.targets
    }
    with tempfile.TemporaryDirectory(prefix="dst-bench-tls-", dir=args.dir) as tmp:
        work = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "dst", "certs", str(work / "pki"), "node"],
            check=True,
            capture_output=True,
        )
        disk = work / "disk.img"
        chunk = os.urandom(64 * MiB)
        with open(disk, "wb") as f:
            for _ in range(args.size // len(chunk)):
                f.write(chunk)
            f.write(chunk[: args.size % len(chunk)])
        for rep in range(args.reps):
            for target in args.targets:
                with server(target, disk, work / "pki", work) as (uri, pid):
                    for w in WORKLOADS:
                        r = fio(uri, w, size=args.size, runtime=args.runtime, pid=pid)
                        results[target][w].append(r)
                        unit = "iops" if "4k" in w else "MB/s"
                        print(
                            f"rep {rep + 1}/{args.reps} {target:>10} {w:<18} "
                            f"{r[unit]:>10,.0f} {unit}  {r['cpu_us_per_io']:7.1f} us CPU/IO",
                            flush=True,
                        )
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "params": {"size": args.size, "runtime": args.runtime, "reps": args.reps},
        "results": results,
    }


def table(doc: dict[str, Any]) -> str:
    res = doc["results"]

    def med(t: str, w: str, key: str) -> float:
        return statistics.median(r[key] for r in res[t][w])

    have = set(res)
    ratios = [(a, b) for a, b in (("dst-tls", "dst"), ("nbdkit-tls", "nbdkit"))]
    ratios += [("dst-tls", "nbdkit-tls")]
    ratios = [(a, b) for a, b in ratios if a in have and b in have]
    head = ["workload", *[f"{t}" for t in res], *[f"{a}/{b}" for a, b in ratios]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in WORKLOADS:
        unit = "iops" if "4k" in w else "MB/s"
        cells = [f"{med(t, w, unit):,.0f} {unit}" for t in res]
        cells += [f"{med(a, w, unit) / med(b, w, unit):.2f}x" for a, b in ratios]
        lines.append("| " + " | ".join([w, *cells]) + " |")
        cpu = [f"{med(t, w, 'cpu_us_per_io'):.1f} us" for t in res]
        cpu += [
            f"{med(a, w, 'cpu_us_per_io') / med(b, w, 'cpu_us_per_io'):.2f}x" for a, b in ratios
        ]
        lines.append("| " + " | ".join([f"{w} server CPU/IO", *cpu]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--size", type=int, default=1 << 30, help="file size in bytes (1 GiB)")
    p.add_argument("--runtime", type=float, default=10.0, help="seconds per fio run")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--dir", help="where the backing file goes (default $TMPDIR)")
    p.add_argument("--quick", action="store_true", help="256 MiB, 2 s runs, 1 repetition")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.runtime, args.reps = 256 * MiB, 2.0, 1
    doc = run(args)
    text = table(doc)
    print(text)
    out = ROOT / "bench" / "results" / f"tls-{doc['date'].replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
