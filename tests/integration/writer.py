"""A real NBD client writing through an array: an nbdsh process whose writes are a
function of their sequence number, so the image it leaves is known exactly."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .helpers import nbd_python, require

BLOCK = 4096

# Write i goes to block pick(i) with a byte derived from i, until STOP exists.  pick: the
# i-th block of the sequence (i * 7919) % n over [first, last), spread over ``lanes``
# (chunk-sized runs of ``cb`` blocks, every lanes-th of them from ``lane``: one stripe
# member's chunks).
PICK = """
def pick(i, first, last, lanes, lane, cb):
    k = (i * 7919) % (last - first)
    c, within = divmod(k, cb)
    return first + (c * lanes + lane) * cb + within
"""
WRITER = (
    PICK
    + """
import os, sys, time
stop, count, lat = sys.argv[1], sys.argv[2], sys.argv[3]
first, last, lanes, lane, cb = (int(x) for x in sys.argv[4:9])
i, worst = 0, 0.0
while not os.path.exists(stop):
    t = time.monotonic()
    h.pwrite(bytes([i % 251 + 1]) * 4096, pick(i, first, last, lanes, lane, cb) * 4096)
    worst = max(worst, time.monotonic() - t)
    i += 1
h.flush()
open(lat, "w").write(repr(worst))
open(count, "w").write(str(i))
"""
)
_NS: dict[str, object] = {}
exec(PICK, _NS)


class Writer:
    """An nbdsh process writing through an array until stopped (see WRITER).

    ``first``/``last`` bound the logical block range; with ``lanes`` > 1 the writes
    land in every ``lanes``-th run of ``chunk_blocks`` blocks from run ``lane``.
    """

    def __init__(
        self,
        uri: str,
        tmp: Path,
        *,
        first: int,
        last: int,
        name: str = "writer",
        lanes: int = 1,
        lane: int = 0,
        chunk_blocks: int = 1,
    ) -> None:
        require("nbdsh")
        self.stop_file = tmp / f"{name}.stop"
        self.count_file, self.lat_file = tmp / f"{name}.count", tmp / f"{name}.lat"
        for f in (self.stop_file, self.count_file, self.lat_file):
            f.unlink(missing_ok=True)
        self.geometry = (first, last, lanes, lane, chunk_blocks)
        files = [str(self.stop_file), str(self.count_file), str(self.lat_file)]
        args = files + [str(x) for x in self.geometry]
        cmd = [nbd_python(), "-m", "nbd", "-u", uri]
        cmd += ["-c", f"import sys; sys.argv = ['w', *{args!r}]", "-c", WRITER]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.worst_latency = 0.0

    def stop(self) -> None:
        """Ask it to stop (it then flushes, which waits for a suspended node)."""
        self.stop_file.touch()

    def finish(self) -> int:
        """Stop; the writer must have seen no error.  Returns how many writes it did."""
        self.stop_file.touch()
        _, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, f"writer failed: {err}"
        self.worst_latency = float(self.lat_file.read_text())
        return int(self.count_file.read_text())

    def apply(self, base: bytearray, count: int) -> bytearray:
        """``base`` after the writer's first ``count`` writes."""
        pick = _NS["pick"]
        assert callable(pick)
        for i in range(count):
            b = pick(i, *self.geometry)
            base[b * BLOCK : (b + 1) * BLOCK] = bytes([i % 251 + 1]) * BLOCK
        return base
