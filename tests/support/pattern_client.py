"""A verifying NBD client in its own process, with a log of every acknowledged request.

Theory of operation
-------------------
:class:`PatternClient` starts an nbdsh process (``python3 -m nbd``, libnbd's Python
binding) that loops over a deterministic sequence of 4 KiB requests until told to stop.
Request ``i`` goes to block :func:`pick` ``(i, ...)`` of its range; it is a read when
``read_every`` divides ``i + 1``, otherwise a write of :func:`pattern` ``(client, i,
block)`` -- 16 bytes naming the client, the sequence number and the block, repeated, so
any block read back tells which write put it there.

The process appends one line to its log *after* each request is acknowledged:
``w|r I BLOCK DONE LATENCY`` (``DONE`` on the system-wide monotonic clock, seconds).
Reads are verified in the process against what it wrote, or against ``base`` (the
image the test filled the array with) for blocks it has not written yet; a mismatch
ends it with a ``bad`` line.  An I/O error (the daemon killed, say) ends it with an
``error`` line; a stop request with ``done`` after a final flush.

So the test knows, after the fact: every acknowledged write (to replay onto the base
image), the one request possibly in flight when the connection died (in doubt: the
block may hold either version), and each request's latency and completion time (to
measure a window, e.g. while another node was suspended).
"""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.cluster import nbd_python

BLOCK = 4096

# Shared by the process and the test (exec'd in both).
CORE = """
import struct
def pick(i, first, last, lanes, lane, cb):
    k = (i * 7919) % (last - first)
    c, within = divmod(k, cb)
    return first + (c * lanes + lane) * cb + within
def pattern(client, i, block):
    return struct.pack("<IIQ", client, i + 1, block) * 256
"""

LOOP = """
import os, sys, time
log_path, stop, base_path = sys.argv[1:4]
client, read_every, first, last, lanes, lane, cb = (int(x) for x in sys.argv[4:11])
base = open(base_path, "rb") if base_path else None
fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
written = {}
def expected(b):
    if b in written:
        return pattern(client, written[b], b)
    if base is None:
        return None
    base.seek(b * 4096)
    return base.read(4096)
i = 0
try:
    while not os.path.exists(stop):
        b = pick(i, first, last, lanes, lane, cb)
        t = time.monotonic()
        if read_every and (i + 1) % read_every == 0:
            got = h.pread(4096, b * 4096)
            done = time.monotonic()
            want = expected(b)
            if want is not None and got != want:
                os.write(fd, f"bad {i} {b} {got[:16].hex()} {want[:16].hex()}\\n".encode())
                sys.exit(3)
            kind = "r"
        else:
            h.pwrite(pattern(client, i, b), b * 4096)
            done = time.monotonic()
            written[b] = i
            kind = "w"
        os.write(fd, f"{kind} {i} {b} {done:.6f} {done - t:.6f}\\n".encode())
        i += 1
    h.flush()
except Exception as exc:
    os.write(fd, f"error {i} {exc!r}\\n".replace("\\n", " ").encode() + b"\\n")
    sys.exit(2)
os.write(fd, b"done\\n")
"""

_NS: dict[str, object] = {}
exec(CORE, _NS)


def pick(i: int, first: int, last: int, lanes: int, lane: int, cb: int) -> int:
    f = _NS["pick"]
    assert callable(f)
    block: int = f(i, first, last, lanes, lane, cb)
    return block


def pattern(client: int, i: int, block: int) -> bytes:
    return struct.pack("<IIQ", client, i + 1, block) * (BLOCK // 16)


@dataclass(frozen=True, slots=True)
class Op:
    kind: str  # "w" or "r"
    i: int
    block: int
    done: float
    latency: float

    @property
    def start(self) -> float:
        return self.done - self.latency


class PatternClient:
    """One nbdsh process doing the requests of the module docstring on ``uri``.

    ``first``/``last`` bound the logical block range; with ``lanes`` > 1 the requests
    land in every ``lanes``-th run of ``chunk_blocks`` blocks from run ``lane`` (one
    stripe member's chunks).  ``base``: the file the array was filled from, to verify
    reads of blocks not written yet (None: those reads are not checked).
    """

    def __init__(
        self,
        uri: str,
        tmp: Path,
        *,
        client: int,
        first: int,
        last: int,
        lanes: int = 1,
        lane: int = 0,
        chunk_blocks: int = 1,
        read_every: int = 0,
        base: Path | None = None,
    ) -> None:
        py = nbd_python()
        assert py, "no Python with the nbd module (python3-libnbd)"
        self.client = client
        self.log_path, self.stop_path = tmp / f"client{client}.log", tmp / f"client{client}.stop"
        for f in (self.log_path, self.stop_path):
            f.unlink(missing_ok=True)
        self.geometry = (first, last, lanes, lane, chunk_blocks)
        self.read_every = read_every
        args = [str(self.log_path), str(self.stop_path), str(base or "")]
        args += [str(x) for x in (client, read_every, *self.geometry)]
        cmd = [py, "-m", "nbd", "-u", uri, "-c", f"import sys; sys.argv = ['c', *{args!r}]"]
        cmd += ["-c", CORE + LOOP]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr = ""

    # -- while it runs ----------------------------------------------------------------

    def lines(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return self.log_path.read_text().splitlines()

    def count(self) -> int:
        """Requests acknowledged so far."""
        return sum(1 for line in self.lines() if line[:2] in ("w ", "r "))

    def wait_count(self, n: int, *, timeout: float = 30.0) -> None:
        """Wait until ``n`` requests were acknowledged (the client is up and running)."""
        deadline = time.monotonic() + timeout
        while self.count() < n:
            assert self.proc.poll() is None, f"client {self.client} exited: {self.tail()}"
            assert time.monotonic() < deadline, f"client {self.client}: < {n} requests"
            time.sleep(0.02)

    def tail(self) -> str:
        _, err = self.proc.communicate() if self.proc.poll() is not None else ("", "")
        self.stderr += err or ""
        return f"log: {self.lines()[-3:]} stderr: {self.stderr[-2000:]}"

    # -- afterwards -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask it to stop; its final flush may wait (for a suspended node, say)."""
        self.stop_path.touch()

    def finish(self, *, expect: str = "done", timeout: float = 120) -> list[Op]:
        """Stop, wait, check its last line is ``expect`` ("done" or "error"); its ops."""
        self.stop_path.touch()
        _, err = self.proc.communicate(timeout=timeout)
        self.stderr += err
        lines = self.lines()
        assert lines, f"client {self.client} logged nothing: {self.stderr[-2000:]}"
        last = lines[-1].split(" ", 1)[0]
        assert last == expect, f"client {self.client} ended {lines[-1]!r}: {self.stderr[-2000:]}"
        return self.ops()

    def ops(self) -> list[Op]:
        out = []
        for line in self.lines():
            f = line.split()
            if f[0] in ("w", "r"):
                out.append(Op(f[0], int(f[1]), int(f[2]), float(f[3]), float(f[4])))
        return out

    def apply(self, image: bytearray, ops: Sequence[Op] | None = None) -> bytearray:
        """``image`` after this client's acknowledged writes, in order."""
        for op in self.ops() if ops is None else ops:
            if op.kind == "w":
                image[op.block * BLOCK : (op.block + 1) * BLOCK] = pattern(
                    self.client, op.i, op.block
                )
        return image

    def in_doubt(self) -> tuple[int, bytes] | None:
        """The request after the last acknowledged one when it ended on an error: the
        block and what that write would have put there (None: it was a read)."""
        ops = self.ops()
        i = ops[-1].i + 1 if ops else 0
        if self.read_every and (i + 1) % self.read_every == 0:
            return None
        block = pick(i, *self.geometry)
        return block, pattern(self.client, i, block)


def window(ops: Sequence[Op], t0: float, t1: float) -> list[Op]:
    """The ops that were outstanding at some moment of [t0, t1]."""
    return [op for op in ops if op.start <= t1 and op.done >= t0]


def compare(
    actual: bytes | bytearray,
    expected: bytes | bytearray,
    *,
    doubts: Sequence[tuple[int, bytes]] = (),
    what: str = "",
) -> None:
    """``actual`` == ``expected`` byte for byte, except that a block of ``doubts`` may
    hold its in-doubt version instead.  The assertion names the blocks that differ."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} != {len(expected)} bytes"
    if actual == expected:
        return
    allowed = dict(doubts)
    bad = []
    for b in range(len(actual) // BLOCK):
        got = actual[b * BLOCK : (b + 1) * BLOCK]
        if got != expected[b * BLOCK : (b + 1) * BLOCK] and got != allowed.get(b):
            bad.append((b, got[:16].hex(), expected[b * BLOCK : b * BLOCK + 16].hex()))
    assert not bad, f"{what}: {len(bad)} blocks differ (block, got, want): {bad[:8]}"
