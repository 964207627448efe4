#!/usr/bin/env python3
"""Benchmark ``dst serve`` against nbdkit's file plugin and qemu-nbd, in one run.

Theory of operation
-------------------
Every *target* is an NBD server started on the same backing file (prefilled with
random data so reads are not answered from holes) and reached over a unix socket.
A target is a name plus a ``start`` function: a context manager that starts the
server and yields its NBD URI, and stops it on exit; an optional ``prepare(ctx)``
creates extra files (the members of an array) once, before the first repetition.
Servers are started and stopped by the test suite's harness
(``tests/support/cluster.py``, imported with the repository root on ``sys.path``):
ready on their own signal, stopped with SIGTERM, their exit status and stderr
checked.
Array targets (a dst array over nodes, qemu's quorum) live in ``bench/arrays.py``,
which reuses this module's driver with its own target list.

Every *workload* runs against every target, in rounds: each repetition starts each
target once and runs all workloads on it, so slow drift of the machine is spread over
all targets.  fio runs with its nbd engine, time-bound (``--runtime``); nbdcopy copies
the whole file into the export and the export out to ``null:``.  The table shows the
median of the repetitions per target and workload and the ratio of the subject
(``dst``) to every other target; the raw results go to ``bench/results/*.json``.

Run ``python bench/bench.py --help``.  This is not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the harness, tests/support/cluster.py
from tests.support.cluster import Cluster  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MiB = 1 << 20
console = Console(width=None if sys.stdout.isatty() else 140)


# -- targets -------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What a target's start function gets: the backing file and a work directory."""

    file: Path
    workdir: Path
    size: int


StartFn = Callable[[Context], contextlib.AbstractContextManager[str]]


@dataclass(frozen=True)
class Target:
    """An NBD server to measure.  ``start(ctx)`` yields its URI while it runs."""

    name: str
    start: StartFn
    tools: tuple[str, ...] = ()
    description: str = ""
    prepare: Callable[[Context], None] | None = None


CLUSTERS: list[Cluster] = []  # the harnesses running now: their processes are the servers


@contextlib.contextmanager
def cluster(ctx: Context) -> Iterator[Cluster]:
    """The harness in ``ctx.workdir``: every process it starts is stopped on exit and
    must have exited cleanly (status 0, no traceback); while it runs, its processes
    count as servers in :func:`server_cpu`."""
    with Cluster(ctx.workdir) as c:
        CLUSTERS.append(c)
        try:
            yield c
        finally:
            CLUSTERS.remove(c)


@contextlib.contextmanager
def _dst(ctx: Context, args: Sequence[str] = ()) -> Iterator[str]:
    with cluster(ctx) as c:
        yield c.node("dst", path=ctx.file, args=args).uri


@contextlib.contextmanager
def _nbdkit(ctx: Context) -> Iterator[str]:
    with cluster(ctx) as c:
        sock = c.sockets / "nbdkit.sock"
        yield c.server("nbdkit", ["nbdkit", "--foreground", "-U", str(sock), "file",
                                  str(ctx.file)]).uri  # fmt: skip


@contextlib.contextmanager
def _qemu_nbd(ctx: Context) -> Iterator[str]:
    # writeback + aio=threads: page cache like dst and nbdkit; -e 8 lets nbdcopy
    # open its several connections; -t keeps serving after a client leaves.
    with cluster(ctx) as c:
        sock = c.sockets / "qemu-nbd.sock"
        cmd = ["qemu-nbd", "-k", str(sock), "-f", "raw", "--cache=writeback", "--aio=threads",
               "-e", "8", "-t", str(ctx.file)]  # fmt: skip
        yield c.server("qemu-nbd", cmd).uri


@contextlib.contextmanager
def _serve_floor(ctx: Context) -> Iterator[str]:
    """``bench/mirror_floor.py`` serving the file: parse, ``os.pwrite``/``os.pread``,
    reply, nothing else -- the least a server in Python does (uvloop, batched replies)."""
    with cluster(ctx) as c:
        sock = c.sockets / "floor.sock"
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "mirror_floor.py"),
               str(sock), f"file:{ctx.file}"]  # fmt: skip
        yield c.server("floor", cmd, sock=sock, python=True).uri


def start_dst(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _dst(ctx)


def start_dst_metrics(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _dst(ctx, ["--metrics", "127.0.0.1:0"])  # its export counted and timed (nobody scrapes)


def start_serve_floor(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _serve_floor(ctx)


def start_nbdkit(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _nbdkit(ctx)


def start_qemu_nbd(ctx: Context) -> contextlib.AbstractContextManager[str]:
    return _qemu_nbd(ctx)


TARGETS: list[Target] = [
    Target("dst", start_dst, (), "dst serve (uvloop)"),
    Target("dst-metrics", start_dst_metrics, (), "dst serve --metrics (its I/O timed)"),
    Target("nbdkit", start_nbdkit, ("nbdkit",), "nbdkit file plugin, default threads"),
    Target("python-serve-floor", start_serve_floor, (), "mirror_floor.py file:FILE (the floor)"),
    Target("qemu-nbd", start_qemu_nbd, ("qemu-nbd",), "qemu-nbd cache=writeback aio=threads"),
]


# -- workloads -----------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "fio" or "nbdcopy"
    metric: str  # "iops" or "MB/s"
    fio: dict[str, str] = field(default_factory=dict)
    direction: str = ""  # nbdcopy: "to" (file -> export) or "from" (export -> null:)


WORKLOADS: list[Workload] = [
    Workload("randread-4k-qd1", "fio", "iops", {"rw": "randread", "bs": "4k", "iodepth": "1"}),
    Workload("randread-4k-qd32", "fio", "iops", {"rw": "randread", "bs": "4k", "iodepth": "32"}),
    Workload("randwrite-4k-qd1", "fio", "iops", {"rw": "randwrite", "bs": "4k", "iodepth": "1"}),
    Workload("randwrite-4k-qd32", "fio", "iops", {"rw": "randwrite", "bs": "4k", "iodepth": "32"}),
    Workload("seqread-1m-qd8", "fio", "MB/s", {"rw": "read", "bs": "1m", "iodepth": "8"}),
    Workload("seqwrite-1m-qd8", "fio", "MB/s", {"rw": "write", "bs": "1m", "iodepth": "8"}),
    Workload("nbdcopy-file-to-export", "nbdcopy", "MB/s", direction="to"),
    Workload("nbdcopy-export-to-null", "nbdcopy", "MB/s", direction="from"),
]


RAMP = 1.0  # fio's --ramp_time: I/O done but not counted in its rates
CLK_TCK = os.sysconf("SC_CLK_TCK")


def server_cpu() -> float:
    """user + system CPU seconds used so far by every server process running now (the
    harnesses' processes: nodes, daemons, peers)."""
    total = 0
    for pid in [p.pid for c in CLUSTERS for p in c.processes if p.alive()]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def run_fio(uri: str, w: Workload, *, size: int, runtime: float) -> dict[str, float]:
    """One fio run; its rates and the servers' CPU per I/O (``cpu_us``, microseconds of
    user+system time of every server process, fio's own excluded, per I/O done)."""
    cpu0 = server_cpu()
    r = _fio(uri, w, size=size, runtime=runtime)
    cpu = server_cpu() - cpu0
    ios = r["iops"] * (runtime + RAMP)  # the ramp's I/O cost CPU too
    r["cpu_us"] = cpu / ios * 1e6 if ios else float("nan")
    return r


def _fio(uri: str, w: Workload, *, size: int, runtime: float) -> dict[str, float]:
    cmd = [
        "fio",
        f"--name={w.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime:g}",
        f"--ramp_time={RAMP:g}",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
        *(f"--{k}={v}" for k, v in w.fio.items()),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 3 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"fio {w.name} failed ({out.returncode}): {out.stderr.strip()}")
    doc = json.loads(out.stdout[out.stdout.index("{") :])
    job = doc["jobs"][0]
    side = job["write" if "write" in w.fio["rw"] else "read"]
    return {
        "iops": float(side["iops"]),
        "MB/s": float(side["bw_bytes"]) / 1e6,
        "lat_mean_us": float(side["lat_ns"]["mean"]) / 1e3,
    }


def run_nbdcopy(uri: str, w: Workload, *, source: Path, size: int) -> dict[str, float]:
    cmd = ["nbdcopy", str(source), uri] if w.direction == "to" else ["nbdcopy", uri, "null:"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"nbdcopy {w.name} failed ({out.returncode}): {out.stderr.strip()}")
    return {"MB/s": size / elapsed / 1e6, "seconds": elapsed}


# -- driver --------------------------------------------------------------------------


def fill_random(path: Path, size: int) -> None:
    """``size`` bytes of random data (generated once, repeated in 64 MiB chunks)."""
    chunk = os.urandom(min(size, 64 * MiB))
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            n = min(remaining, len(chunk))
            f.write(chunk[:n])
            remaining -= n
        f.flush()
        os.fsync(f.fileno())


def check_tools(targets: list[Target], workloads: list[Workload]) -> None:
    needed = {t for target in targets for t in target.tools}
    needed |= {w.kind for w in workloads}
    missing = sorted(t for t in needed if shutil.which(t) is None)
    if missing:
        raise SystemExit(f"bench: missing tools: {', '.join(missing)}")


def run_all(args: argparse.Namespace, all_targets: list[Target] | None = None) -> dict[str, Any]:
    by_name = {t.name: t for t in (TARGETS if all_targets is None else all_targets)}
    targets = [by_name[n] for n in args.targets]
    workloads = [w for w in WORKLOADS if not args.workloads or w.name in args.workloads]
    check_tools(targets, workloads)
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        t.name: {w.name: [] for w in workloads} for t in targets
    }
    base = Path(args.dir) if args.dir else None
    with tempfile.TemporaryDirectory(prefix="dst-bench-", dir=base) as tmp:
        work = Path(tmp)
        disk, source = work / "disk.img", work / "source.img"
        console.print(f"preparing {args.size // MiB} MiB files in {work}")
        fill_random(disk, args.size)
        if any(w.kind == "nbdcopy" and w.direction == "to" for w in workloads):
            fill_random(source, args.size)
        ctx = Context(file=disk, workdir=work, size=args.size)
        for target in targets:
            if target.prepare is not None:
                target.prepare(ctx)
        for rep in range(args.reps):
            for target in targets:
                with target.start(ctx) as uri:
                    if args.warmup:  # steady state: e.g. write-intent bits already set
                        for w in workloads:
                            if w.kind == "fio":
                                run_fio(uri, w, size=args.size, runtime=args.warmup)
                    for w in workloads:
                        if w.kind == "fio":
                            r = run_fio(uri, w, size=args.size, runtime=args.runtime)
                        else:
                            r = run_nbdcopy(uri, w, source=source, size=args.size)
                        results[target.name][w.name].append(r)
                        cpu = f"  {r['cpu_us']:7.1f} us CPU/io" if "cpu_us" in r else ""
                        console.print(
                            f"rep {rep + 1}/{args.reps} {target.name:>12} {w.name:<24}"
                            f" {r[w.metric]:>12,.1f} {w.metric}{cpu}"
                        )
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "params": {
            "size": args.size,
            "runtime": args.runtime,
            "reps": args.reps,
            "warmup": args.warmup,
        },
        "targets": {t.name: t.description for t in targets},
        "workloads": {w.name: asdict(w) for w in workloads},
        "results": results,
    }


def medians(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per target, per row (see :func:`rows`): the median over the repetitions."""
    out: dict[str, dict[str, float]] = {}
    for target, per in doc["results"].items():
        out[target] = {}
        for wname, runs in per.items():
            metric = doc["workloads"][wname]["metric"]
            if runs:
                out[target][wname] = statistics.median(r[metric] for r in runs)
            cpu = [r["cpu_us"] for r in runs if "cpu_us" in r]
            if cpu:
                out[target][f"{wname} cpu"] = statistics.median(cpu)
    return out


def rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's rows: each workload with its unit, then (fio) its server CPU per I/O."""
    out = []
    for wname, w in doc["workloads"].items():
        out.append((wname, w["metric"]))
        if w["kind"] == "fio":
            out.append((f"{wname} cpu", "us/io"))
    return out


def ratio_pairs(
    doc: dict[str, Any], subject: str, ratios: list[str] | None = None
) -> list[tuple[str, str]]:
    """The ratio columns: ``A/B`` strings if given, else the subject to every other target."""
    names = list(doc["results"])
    if ratios:
        pairs = [r.partition("/")[::2] for r in ratios]
        return [(a, b) for a, b in pairs if a in names and b in names]
    return [(subject, o) for o in names if o != subject] if subject in names else []


def print_table(doc: dict[str, Any], subject: str, ratios: list[str] | None = None) -> None:
    med = medians(doc)
    names = list(med)
    pairs = ratio_pairs(doc, subject, ratios)
    table = Table(
        title=f"median of {doc['params']['reps']} runs (higher is better; "
        "cpu: server CPU per I/O, lower is better)"
    )
    table.add_column("workload", no_wrap=True)
    table.add_column("unit")
    for n in names:
        table.add_column(n, justify="right")
    for a, b in pairs:
        table.add_column(f"{a}/{b}", justify="right")
    for wname, unit in rows(doc):
        row = [wname, unit]
        row += [_num(med[n].get(wname, float("nan"))) for n in names]
        for a, b in pairs:
            ref = med[b].get(wname)
            val = med[a].get(wname)
            row.append(f"{val / ref:.2f}x" if ref and val is not None else "-")
        table.add_row(*row)
    console.print(table)


def markdown_table(doc: dict[str, Any], pairs: list[tuple[str, str]]) -> str:
    """The medians and ratios as a GitHub markdown table (for docs/benchmarks.md)."""
    med = medians(doc)
    names = list(med)
    head = ["workload", "unit", *names, *(f"{a}/{b}" for a, b in pairs)]
    lines = ["| " + " | ".join(head) + " |"]
    lines.append("|" + "|".join(["---", "---", *["---:"] * (len(head) - 2)]) + "|")
    for wname, unit in rows(doc):
        row = [wname, unit, *(_num(med[n].get(wname, float("nan"))) for n in names)]
        for a, b in pairs:
            ref, val = med[b].get(wname), med[a].get(wname)
            row.append(f"{val / ref:.2f}x" if ref and val is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


EPILOG = (
    "examples:\n"
    "  python bench/bench.py                     # 1 GiB, 10 s per fio run, 3 reps\n"
    "  python bench/bench.py --quick             # sanity run, ~1 minute\n"
    "  python bench/bench.py --targets dst nbdkit --workloads seqread-1m-qd8\n"
    "  python bench/bench.py --targets dst dst-metrics --ratio dst-metrics/dst  # --metrics\n"
)


def main(
    argv: list[str] | None = None,
    *,
    targets: list[Target] | None = None,
    default_targets: list[str] | None = None,
    default_workloads: list[str] | None = None,
    subject: str = "dst",
    ratios: list[str] | None = None,
    description: str = "Benchmark dst serve against nbdkit and qemu-nbd (fio nbd engine, nbdcopy).",
    epilog: str = EPILOG,
    prefix: str = "",
) -> int:
    """Parse ``argv``, run, print the table, write the JSON.  Reused by ``arrays.py``."""
    all_targets = TARGETS if targets is None else targets
    p = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    p.add_argument("--size", type=parse_size, default=1 << 30, help="file size (default 1G)")
    p.add_argument("--runtime", type=float, default=10.0, help="seconds per fio run")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="seconds of each fio workload, unmeasured, after each target starts (default 0)",
    )
    names = [t.name for t in all_targets]
    p.add_argument(
        "--targets",
        nargs="+",
        default=default_targets or names,
        choices=names,
        metavar="TARGET",
        help="subset of: " + ", ".join(names),
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        default=default_workloads or [],
        choices=[w.name for w in WORKLOADS],
        metavar="WORKLOAD",
        help="subset of: " + ", ".join(w.name for w in WORKLOADS),
    )
    p.add_argument("--subject", default=subject, help="target compared to the others")
    p.add_argument(
        "--ratio",
        action="append",
        metavar="A/B",
        help="ratio column A/B (repeatable; default: the subject to every other target)",
    )
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    p.add_argument("--dir", help="where to put the backing files (default: $TMPDIR)")
    p.add_argument("--quick", action="store_true", help="256M, 2 s runs, 1 repetition")
    p.add_argument("--output", help="JSON results file (default bench/results/<date>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.runtime, args.reps = 256 * MiB, 2.0, 1
    doc = run_all(args, all_targets)
    doc["ratios"] = [f"{a}/{b}" for a, b in ratio_pairs(doc, args.subject, args.ratio or ratios)]
    print_table(doc, args.subject, doc["ratios"])
    if args.markdown:
        print(markdown_table(doc, ratio_pairs(doc, args.subject, doc["ratios"])))
    stamp = doc["date"].replace(":", "")
    out = Path(args.output) if args.output else RESULTS / f"{prefix}{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(default_targets=["dst", "nbdkit", "qemu-nbd"]))
