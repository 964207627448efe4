#!/usr/bin/env python3
"""Instructions per mirrored write: the daemon's cost, counted, not timed.

Theory of operation
-------------------
On a small shared machine the timed benchmarks (``arrays.py``) move 10-30 % between
repetitions, more than most single changes to the data path are worth.  This counts
instead: the array's process runs under valgrind's callgrind (which counts the CPU
instructions it executes, the same for the same code and inputs however loaded the
machine is), two ``dst serve`` nodes run natively, and fio's nbd engine writes a fixed
number of 4 KiB blocks at random offsets at a fixed queue depth.  The count is zeroed
after a warm-up (every region's write-intent bit set, the interpreter's caches
specialised) and read after the measured writes; divided by them it is the process's
instructions per write -- the event loop, the system-call wrappers and the Python
above them; the kernel's side of the system calls is not counted.

Subjects (``--subject``, repeatable, run in turn on fresh nodes):

* ``dst-mirror``: ``dst daemon`` with a mirror of the two nodes, as ``arrays.py`` runs it;
* ``dst-mirror-base``: the same with another checkout's daemon (``DST_BASE`` names its
  ``src`` directory, as in ``arrays.py``);
* ``python-floor``: ``bench/mirror_floor.py`` over the same nodes (what any mirror in
  Python must do per request, nothing else);
* ``dst-serve``: one ``dst serve`` node under callgrind, written to directly (a node's
  instructions per request);
* ``python-serve-floor``: ``bench/mirror_floor.py`` serving the node's file itself (the
  least a server in Python does per request);
* ``nbdkit``: the same with nbdkit's file plugin (the peer of ``dst-serve``; every
  thread's instructions counted);
* ``qemu-quorum``: qemu-nbd's quorum (as in ``arrays.py``) under callgrind over two
  native nbdkit nodes (the peer of ``dst-mirror``).

The peers are compiled C: they execute few instructions in user space per request
(nbdkit ~2k per 4 KiB write, qemu-nbd's quorum ~23k) and spend most of their CPU in
the kernel, which callgrind does not count.  Their counts say how much of a peer's
CPU per I/O (``arrays.py``) is its own code; compare dst against them by that timed
figure, and dst's counts with each other.

Under callgrind the subject runs ~50x slower than natively, so batching differs from a
timed run (more requests arrive per receive); compare counts with each other, not with
the timed benchmark's CPU per I/O.  Needs valgrind (Debian package ``valgrind``) and fio.

Run ``python bench/instructions.py --help``.  This is not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from arrays import array_target, leg_paths, node_uris, prepare_legs, quorum_opts
from bench import Context, cluster
from tests.support.cluster import Cluster, start_daemon, start_node, start_server

from dst.net.address import parse_address

HERE = Path(__file__).resolve().parent
SLOW_START = 300.0  # seconds: a process under callgrind starts ~50x slower
SUBJECTS = ("dst-mirror", "dst-mirror-base", "python-floor", "dst-serve",
            "python-serve-floor", "nbdkit", "qemu-quorum")  # fmt: skip


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def start_subject(c: Cluster, ctx: Context, subject: str, out: Path) -> tuple[int, str]:
    """Start ``subject`` under callgrind (over two fresh nodes, or as the one node for
    ``dst-serve`` and ``nbdkit``): its pid and export URI."""
    legs = leg_paths(ctx)
    if subject == "dst-serve":
        node = start_node(legs[0], listen=[f"unix:{c.sockets}/node.sock"],
                          stderr_path=c.sockets / "node.stderr", timeout=SLOW_START,
                          wrapper=callgrind(out))  # fmt: skip
        c.processes.append(node)
        return node.pid, node.uris[0]
    if subject == "python-serve-floor":
        sock = c.sockets / "floor.sock"
        cmd = [*callgrind(out), sys.executable, str(HERE / "mirror_floor.py"), str(sock),
               f"file:{legs[0]}"]  # fmt: skip
        return _slow(c, cmd, sock, "floor", python=True)
    if subject in ("nbdkit", "qemu-quorum"):
        kits = [c.sockets / f"kit{i}.sock" for i in range(len(legs))]
        for i, (sock, leg) in enumerate(zip(kits, legs, strict=True)):
            kit = ["nbdkit", "--foreground", "-U", str(sock), "file", str(leg)]
            if subject == "nbdkit":
                return _slow(c, [*callgrind(out), *kit], sock, "nbdkit")
            c.server(f"kit{i}", kit)
        sock = c.sockets / "quorum.sock"
        cmd = ["qemu-nbd", "-k", str(sock), "--cache=writeback", "-e", "8", "-t",
               "--image-opts", quorum_opts([str(s) for s in kits])]  # fmt: skip
        return _slow(c, [*callgrind(out), *cmd], sock, "quorum")
    uris = node_uris(ctx, c)
    if subject == "python-floor":
        sock = c.sockets / "floor.sock"
        nodes = [f"{a.path}:{a.export}" for a in map(parse_address, uris)]
        cmd = [*callgrind(out), sys.executable, str(HERE / "mirror_floor.py"), str(sock), *nodes]
        return _slow(c, cmd, sock, "floor", python=True)
    env = None
    if subject == "dst-mirror-base":
        env = {"PYTHONPATH": os.environ["DST_BASE"]}
    spec = c.spec("count", array_target("mirror", uris, ctx), export="bench")
    daemon = start_daemon(c.sockets / "control.sock", c.sockets / "daemon.stderr", [spec],
                          env=env, timeout=SLOW_START, wrapper=callgrind(out))  # fmt: skip
    c.processes.append(daemon)
    return daemon.pid, c.uri("count", "bench")


def _slow(c: Cluster, cmd: list[str], sock: Path, name: str, *, python: bool = False
          ) -> tuple[int, str]:  # fmt: skip
    """Start NBD server ``cmd`` (under callgrind) on ``sock``: its pid and URI."""
    server = start_server(cmd, sock, c.sockets / f"{name}.stderr", name=name, python=python,
                          check_exit=False, timeout=SLOW_START)  # fmt: skip
    c.processes.append(server)  # stopped with the cluster
    return server.pid, server.uri


def fio(uri: str, *, writes: int, bs: int, depth: int, rw: str = "randwrite") -> None:
    cmd = ["fio", "--name=count", "--ioengine=nbd", f"--uri={uri}", "--size=64M",
           f"--io_size={writes * bs}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
           "--norandommap", "--randrepeat=0", "--output-format=json"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)


def collected(dump: Path) -> int:
    text = subprocess.run(["callgrind_annotate", str(dump)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    m = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", text)
    if m is None:
        raise RuntimeError(f"no total in callgrind's dump {dump}")
    return int(m.group(1).replace(",", ""))


def count(subject: str, *, writes: int, depth: int) -> float:
    """Instructions per 4 KiB write of ``subject`` (module docstring)."""
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir="/dev/shm")))
        ctx = Context(file=work / "unused.img", workdir=work, size=64 << 20)
        prepare_legs(ctx)
        c = stack.enter_context(cluster(ctx))
        out = work / "callgrind.out"
        pid, uri = start_subject(c, ctx, subject, out)
        fio(uri, writes=64, bs=1 << 20, depth=8, rw="write")  # every region marked
        fio(uri, writes=500, bs=4096, depth=depth)  # warm
        subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
        fio(uri, writes=writes, bs=4096, depth=depth)
        subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
        dumps = [p for p in work.glob("callgrind.out*") if p.stat().st_size]
        return collected(max(dumps, key=lambda p: p.stat().st_mtime)) / writes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--subject", action="append", choices=SUBJECTS,
                   help="what to count (repeatable; default dst-mirror)")  # fmt: skip
    p.add_argument("--writes", type=int, default=4000, help="measured writes (default 4000)")
    p.add_argument("--depth", type=int, default=32, help="fio's queue depth (default 32)")
    args = p.parse_args()
    for subject in args.subject or ["dst-mirror"]:
        if subject == "dst-mirror-base" and "DST_BASE" not in os.environ:
            p.error("dst-mirror-base needs DST_BASE=OTHER/src")
        n = count(subject, writes=args.writes, depth=args.depth)
        print(f"{subject:16} {n:10,.0f} instructions per 4 KiB write (QD{args.depth}, "
              f"{args.writes} writes)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
