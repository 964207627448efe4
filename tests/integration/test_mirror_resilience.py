"""Mirror resilience with real processes, second set: what issue 4 lists, each case
pushed one step further than test_resilience.py.

* a node killed twice under a writer, the second time in the middle of a throttled
  resync: re-added by itself both times, resync resumes, copies only dirty regions;
* the array daemon killed mid-writes and restarted from the *same spec file* (not
  assemble): writes the client saw acknowledged survive, only dirty regions resync, an
  ext4 made before the crash checks clean;
* split brain made with processes (each leg written while the other was away): refused
  at re-add and at start, until the operator picks a side with ``readd --full``;
* a member of another array in a spec is refused; a corrupted superblock copy falls
  back to the other one; both copies corrupted: that leg alone is refused;
* one nbdkit leg with per-method error triggers (reads, then writes);
* ``dst fail``/``readd``/``verify`` under a writer, the corruption made through a second
  NBD connection to the live node.

Every test checks every byte of the array and of each leg's data area.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dst.meta.layout import BLOCK, member_size_for, sb_offsets
from dst.meta.superblock import decode, pick

from .arrays import (
    Daemon,
    check_ext4_image,
    dirty_regions,
    ext4_on_nbdfuse,
    member_data,
    remote,
    start_daemon,
    unix_uri,
    wait_until,
    write_spec,
)
from .helpers import Node, nbd_python, nbdsh, require, require_root_dev, run, start_node
from .writer import PICK, Writer

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20
REGION = 64 << 10
DATA = 32 * MiB  # the array's size
MEMBER = member_size_for(DATA)
NREGIONS = DATA // REGION

# A writer that records how many of its writes were acknowledged (in a file, after each
# one), so a crash of the array daemon under it leaves a known set of possible images.
ACK_WRITER = (
    PICK
    + """
import os, sys
ack, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(ack, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
i = 0
while True:
    h.pwrite(bytes([i % 251 + 1]) * 4096, pick(i, first, last, 1, 0, 1) * 4096)
    i += 1
    os.pwrite(fd, b"%12d" % i, 0)
"""
)


# -- helpers -------------------------------------------------------------------------


def leg_data(path: Path) -> bytes:
    """The array's bytes on the leg whose member file is ``path``."""
    return member_data(path, REGION)[:DATA]


def read_all(uri: str, tmp: Path) -> bytes:
    run(["nbdcopy", uri, tmp / "out.bin"])
    return (tmp / "out.bin").read_bytes()


def fill(uri: str, tmp: Path) -> bytearray:
    data = os.urandom(DATA)
    (tmp / "fill.bin").write_bytes(data)
    run(["nbdcopy", "--flush", tmp / "fill.bin", uri])
    return bytearray(data)


def mirror(daemon: Daemon, name: str) -> dict[str, Any]:
    root: dict[str, Any] = daemon.status(name)["arrays"][0]["root"]
    return root


def states(daemon: Daemon, name: str) -> list[str]:
    return [k["state"] for k in mirror(daemon, name)["members"]]


def apply_writes(base: bytearray, first: int, last: int, count: int) -> bytearray:
    """``base`` after ``count`` writes of ACK_WRITER (the same sequence as Writer's)."""
    ns: dict[str, Any] = {}
    exec(PICK, ns)
    for i in range(count):
        b = ns["pick"](i, first, last, 1, 0, 1)
        base[b * BLOCK : (b + 1) * BLOCK] = bytes([i % 251 + 1]) * BLOCK
    return base


class Cluster:
    """``dst serve`` nodes restartable on the same socket and file, and one daemon."""

    def __init__(self, tmp: Path, sockdir: Path) -> None:
        self.tmp, self.sockdir = tmp, sockdir
        self.nodes: dict[int, Node] = {}
        self.daemons = [start_daemon(sockdir / "control.sock", tmp / "daemon.stderr")]
        self.sock = sockdir / "array.sock"
        self.uri = unix_uri(self.sock)

    @property
    def daemon(self) -> Daemon:
        return self.daemons[-1]

    def node(self, i: int) -> Node:
        n = start_node(
            self.tmp / f"leg{i}.img",
            listen=[f"unix:{self.sockdir}/leg{i}.sock"],
            args=["--size", str(MEMBER)],
            stderr_path=self.tmp / f"leg{i}.{time.monotonic_ns()}.stderr",
        )
        self.nodes[i] = n
        return n

    def spec(self, name: str, legs: list[dict[str, Any]], **extra: Any) -> Path:
        target = {"type": "mirror", "name": "m", "members": legs, **extra}
        return write_spec(self.tmp / f"{name}.toml", name, [f"unix:{self.sock}"], target)

    def create(self, name: str, legs: list[dict[str, Any]], **extra: Any) -> Path:
        spec = self.spec(name, legs, **extra)
        self.daemon.dst("create", str(spec))
        return spec

    def close(self) -> None:
        for d in self.daemons:
            d.stop()
        for n in self.nodes.values():
            n.stop()


@pytest.fixture
def cl(tmp_path: Path, sockdir: Path) -> Iterator[Cluster]:
    require("nbdcopy", "nbdinfo", "nbdsh")
    c = Cluster(tmp_path, sockdir)
    yield c
    c.close()


def legs_of(*nodes: Node) -> list[dict[str, Any]]:
    return [remote(f"leg{i}", n.uri) for i, n in enumerate(nodes)]


# -- 1. a node killed under load, twice ------------------------------------------------


def test_node_killed_twice_under_load_resync_resumes_and_copies_only_dirty_regions(
    cl: Cluster, tmp_path: Path
) -> None:
    n0, n1 = cl.node(0), cl.node(1)
    # Throttled to 4 MiB/s so the resync of a few MiB is long enough to be caught.
    cl.create("r", legs_of(n0, n1), resync_rate="4M")
    image = fill(cl.uri, tmp_path)
    span = 4 * MiB  # the writer's range: 64 regions of the 512
    w = Writer(cl.uri, tmp_path, first=0, last=span // BLOCK)
    time.sleep(0.3)
    n1.stop(signal.SIGKILL)
    wait_until(lambda: states(cl.daemon, "r")[1] == "failed", "leg1 failed")
    time.sleep(1.0)  # degraded: the writer goes on, leg1's misses are recorded
    missed = mirror(cl.daemon, "r")["detail"]["legs"][1]["missing_regions"]
    assert 0 < missed <= span // REGION, missed
    n1 = cl.node(1)  # back on the same socket and file: re-added by itself

    def resyncing_midway() -> bool:
        m = mirror(cl.daemon, "r")
        r = m["detail"]["resync"]
        midway = 0 < r.get("regions_done", 0) < r.get("regions_total", 0)
        return bool(m["members"][1]["state"] == "resyncing" and midway)

    wait_until(resyncing_midway, "leg1 resyncing, partly done")
    n1.stop(signal.SIGKILL)  # killed again in the middle of its resync
    wait_until(lambda: states(cl.daemon, "r")[1] == "failed", "leg1 failed again")
    time.sleep(0.5)
    n1 = cl.node(1)
    wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "leg1 back in sync")
    count = w.finish()
    assert count > 100, count
    image = apply_writes(image, 0, span // BLOCK, count)
    m = mirror(cl.daemon, "r")
    keeper, resync = m["detail"]["keeper"], m["detail"]["resync"]
    assert keeper["auto_readds"] >= 2, keeper
    # The last run copied what leg1 still missed: never more than the writer's 64
    # regions, far from the 512 of the device.
    assert 0 < resync["bytes"] <= span < DATA // 4, resync
    assert resync["regions_total"] <= span // REGION, resync
    assert read_all(cl.uri, tmp_path) == image
    verify = cl.daemon.dst("verify", "r")
    assert "0 differ" in verify.stdout, verify.stdout
    cl.daemon.dst("stop", "r")
    assert leg_data(n0.path) == image
    assert leg_data(n1.path) == image


# -- 2. the daemon killed mid-writes, restarted from the same spec ---------------------


def free_run(image: Path) -> tuple[int, int]:
    """The longest run of free ext4 blocks in ``image``, as 4 KiB block numbers
    [first, last) of the device, at most 2 MiB long."""
    out = run(["dumpe2fs", str(image)]).stdout
    bsize = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    best = (0, 0)
    for spans in re.findall(r"^\s+(\d+) free blocks?, .*\n\s+Free blocks: (.*)$", out, re.M):
        for part in spans[1].split(","):
            part = part.strip()
            if not part:
                continue
            a, _, b = part.partition("-")
            lo = -(-int(a) * bsize // BLOCK)  # whole 4 KiB blocks inside the run
            hi = (int(b or a) + 1) * bsize // BLOCK
            if hi - lo > best[1] - best[0]:
                best = (lo, hi)
    lo, hi = best
    return lo, min(hi, lo + 2 * MiB // BLOCK)


def test_daemon_killed_mid_writes_restarted_from_same_spec(
    cl: Cluster, tmp_path: Path, sockdir: Path
) -> None:
    require("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "dumpe2fs", "mount")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    n0, n1 = cl.node(0), cl.node(1)
    # Bits clear after 1 s idle (not 30): the crash then leaves only the writer's
    # regions dirty, and that bound is what the test checks.
    spec = cl.create("r", legs_of(n0, n1), clear_delay="1s")
    digests = ext4_on_nbdfuse(cl.uri, tmp_path)
    snap = tmp_path / "before.img"
    run(["nbdcopy", cl.uri, snap])
    first, last = free_run(snap)
    wait_until(lambda: dirty_regions(n0.path) == 0, "mkfs's regions clean", timeout=20)
    # Blocks no file uses: the writer can change them and the filesystem stays clean.
    assert last - first >= 64, (first, last)
    image = bytearray(snap.read_bytes())
    ack = tmp_path / "acked"
    w = subprocess.Popen(
        [nbd_python(), "-m", "nbd", "-u", cl.uri,
         "-c", f"import sys; sys.argv = ['w', {str(ack)!r}, '{first}', '{last}']",
         "-c", ACK_WRITER],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip

    def acked() -> int:
        text = ack.read_text() if ack.exists() else ""
        return int(text) if text.strip() else 0

    wait_until(lambda: acked() >= 300, "300 acknowledged writes")
    cl.daemon.proc.send_signal(signal.SIGKILL)  # the crash, in the middle of writes
    cl.daemon.proc.wait()
    w.wait(timeout=30)
    assert w.returncode != 0  # it saw its connection drop mid-write
    count = acked()
    dirty = max(dirty_regions(n0.path), dirty_regions(n1.path))
    assert 0 < dirty <= (last - first) * BLOCK // REGION + 1, dirty
    # A new daemon started with the same spec file brings the array back.
    cl.daemons.append(start_daemon(sockdir / "control2.sock", tmp_path / "daemon2.stderr", [spec]))
    wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "legs in sync")
    resync = mirror(cl.daemon, "r")["detail"]["resync"]
    # The crash left both legs marked dirty: those regions (only) are copied.
    assert 0 < resync["bytes"] <= dirty * REGION < DATA // 4, (resync, dirty)
    # Every acknowledged write is there; the one in flight at the crash may be too.
    done = bytes(apply_writes(bytearray(image), first, last, count))
    maybe = bytes(apply_writes(bytearray(image), first, last, count + 1))
    got = read_all(cl.uri, tmp_path)
    assert got in (done, maybe), "acknowledged writes lost or legs inconsistent"
    cl.daemon.dst("stop", "r")
    assert leg_data(n0.path) == leg_data(n1.path) == got
    check_ext4_image(n1.path, digests, tmp_path)


# -- 3. stale, diverged, foreign members; a corrupted superblock ------------------------


def mixed_members(cl: Cluster) -> subprocess.CompletedProcess[str]:
    """Arrays "one" (leg0, leg1) and "two" (t0, t1), stopped; then a spec "mixed" of
    one's leg0 and two's t1 (named "intruder") created: returns the ``dst create``."""
    nodes = [cl.node(i) for i in range(4)]
    cl.create("one", legs_of(nodes[0], nodes[1]))
    cl.daemon.dst("stop", "one")
    cl.create("two", [remote("t0", nodes[2].uri), remote("t1", nodes[3].uri)])
    cl.daemon.dst("stop", "two")
    mixed = [remote("leg0", nodes[0].uri), remote("intruder", nodes[3].uri)]
    return cl.daemon.dst("create", str(cl.spec("mixed", mixed)), check=False)


def test_member_of_another_array_is_refused(cl: Cluster) -> None:
    bad = mixed_members(cl)
    assert bad.returncode != 0, bad.stdout
    assert "different arrays" in bad.stderr, bad.stderr
    arrays = cl.daemon.status()["arrays"]
    assert all(a["state"] != "running" for a in arrays if a["name"] == "mixed"), arrays
    # Nothing was written to either member: both arrays start again, in sync.
    for name in ("one", "two"):
        cl.daemon.dst("start", name)
        assert states(cl.daemon, name) == ["in_sync", "in_sync"], name
        assert cl.daemon.dst("verify", name).returncode == 0
        cl.daemon.dst("stop", name)


def test_member_of_another_array_refusal_names_the_member(cl: Cluster) -> None:
    bad = mixed_members(cl)
    assert bad.returncode != 0
    # The operator needs to know which member is foreign and where it comes from.
    # (The superblock records the mirror's name and the array UUID, not the array's.)
    err = bad.stderr
    assert "(intruder): member of 'm'" in err and err.count("-") >= 8, err


def test_mirror_starts_degraded_with_a_node_down_and_readds_it(cl: Cluster, tmp_path: Path) -> None:
    """Semantics 3 and the keeper's periodic retry for a leg never opened."""
    n0, n1 = cl.node(0), cl.node(1)
    cl.create("r", legs_of(n0, n1))
    image = fill(cl.uri, tmp_path)
    cl.daemon.dst("stop", "r")
    n1.stop()
    cl.daemon.dst("start", "r")  # degraded, not down
    assert states(cl.daemon, "r") == ["in_sync", "failed"]
    image[5 * REGION : 5 * REGION + 6] = b"alone!"
    nbdsh(cl.uri, f"h.pwrite(b'alone!', {5 * REGION}); h.flush()")
    n1 = cl.node(1)
    wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "leg1 re-added")
    assert mirror(cl.daemon, "r")["detail"]["resync"]["bytes"] == REGION  # region 5 only
    assert read_all(cl.uri, tmp_path) == image
    cl.daemon.dst("stop", "r")
    assert leg_data(n0.path) == leg_data(n1.path) == image


def test_old_member_returning_after_its_replacement_is_not_silently_merged(
    cl: Cluster, tmp_path: Path
) -> None:
    n0, n1, x = cl.node(0), cl.node(1), cl.node(2)
    cl.create("r", legs_of(n0, n1))
    base = fill(cl.uri, tmp_path)
    a, b = 3 * REGION, 7 * REGION
    cl.daemon.dst("fail", "r", "leg1")
    nbdsh(cl.uri, f"h.pwrite(b'A' * 4096, {a}); h.flush()")  # leg0 only
    cl.daemon.dst("stop", "r")
    # leg0's disk is "replaced": the same array started on leg1 and a blank member.
    cl.daemon.dst("create", str(cl.spec("r2", [remote("leg0", x.uri), remote("leg1", n1.uri)])))
    nbdsh(cl.uri, f"h.pwrite(b'B' * 4096, {b}); h.flush()")  # leg1 and x, not leg0
    wait_until(lambda: states(cl.daemon, "r2") == ["in_sync", "in_sync"], "x resynced")
    cl.daemon.dst("stop", "r2")
    # The old leg0 comes back next to leg1: each holds a write the other lacks.
    start = cl.daemon.dst("start", "r", check=False)
    if start.returncode != 0:
        assert "split brain" in start.stderr, start.stderr  # refused: correct
        return
    wait_until(lambda: "resyncing" not in states(cl.daemon, "r"), "resync done")
    if states(cl.daemon, "r") != ["in_sync", "in_sync"]:
        return  # one leg refused: correct
    verify = cl.daemon.dst("verify", "r", check=False)
    cl.daemon.dst("stop", "r")
    d0, d1 = leg_data(n0.path), leg_data(n1.path)
    assert verify.returncode == 0, verify.stdout  # now: "1 differ: regions 7"
    assert d0 == d1 and d0 != bytes(base)


def test_split_brain_is_refused_until_the_operator_picks_a_side(
    cl: Cluster, tmp_path: Path
) -> None:
    """Process level: leg1 taken out, leg0 written alone; then the array restarted with
    leg0's node down, so leg1 is written alone; then both are present."""
    n0, n1 = cl.node(0), cl.node(1)
    cl.create("r", legs_of(n0, n1))
    base = fill(cl.uri, tmp_path)
    a, b = 3 * REGION, 7 * REGION  # a: written on leg0 only; b: on leg1 only
    cl.daemon.dst("fail", "r", "leg1")
    nbdsh(cl.uri, f"h.pwrite(b'A' * 4096, {a}); h.flush()")
    cl.daemon.dst("stop", "r")
    n0.stop()
    cl.daemon.dst("start", "r")  # leg0's node is away: the array runs on leg1 alone
    assert states(cl.daemon, "r") == ["failed", "in_sync"]
    assert read_all(cl.uri, tmp_path) == bytes(base)  # leg1 never saw the write at a
    nbdsh(cl.uri, f"h.pwrite(b'B' * 4096, {b}); h.flush()")
    n0 = cl.node(0)  # back: the keeper tries to re-add it and must refuse

    def refused() -> bool:
        keeper = mirror(cl.daemon, "r")["detail"]["keeper"]
        return "0" in keeper["refused"]

    wait_until(refused, "leg0's re-add refused")
    m = mirror(cl.daemon, "r")
    assert "split brain" in m["detail"]["keeper"]["refused"]["0"], m["detail"]["keeper"]
    assert "split brain" in m["detail"]["legs"][0]["reason"], m["detail"]["legs"][0]
    assert states(cl.daemon, "r") == ["failed", "in_sync"]
    plain = cl.daemon.dst("readd", "r", "leg0", check=False)
    assert plain.returncode != 0 and "split brain" in plain.stderr, plain
    # Started with both present, the array is refused as a whole, with a clear message.
    cl.daemon.dst("stop", "r")
    start = cl.daemon.dst("start", "r", check=False)
    assert start.returncode != 0, start.stdout
    assert "diverged" in start.stderr and "split brain" in start.stderr, start.stderr
    # Each side kept its own write; neither was touched by the refusals.
    side0, side1 = bytearray(base), bytearray(base)
    side0[a : a + BLOCK] = b"A" * BLOCK
    side1[b : b + BLOCK] = b"B" * BLOCK
    assert leg_data(n0.path) == side0
    assert leg_data(n1.path) == side1
    # The operator picks leg1: run on it alone, then re-add leg0 discarding its data.
    n0.stop()
    cl.daemon.dst("start", "r")
    n0 = cl.node(0)
    wait_until(lambda: "0" in mirror(cl.daemon, "r")["detail"]["keeper"]["refused"], "refused")
    out = cl.daemon.dst("readd", "r", "leg0", "--full").stdout
    assert "re-added" in out, out
    wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "leg0 resynced")
    assert mirror(cl.daemon, "r")["detail"]["resync"]["bytes"] == DATA  # a full copy
    assert read_all(cl.uri, tmp_path) == side1
    cl.daemon.dst("stop", "r")
    assert leg_data(n0.path) == side1
    # Healed: a restart with both legs is accepted again.
    cl.daemon.dst("start", "r")
    assert states(cl.daemon, "r") == ["in_sync", "in_sync"]


def corrupt_slot(path: Path, newest: bool) -> int:
    """Flip bytes inside one superblock slot of the member file ``path`` (its checksum
    then fails; the magic is kept).  Returns the slot index."""
    offs = sb_offsets(path.stat().st_size)
    with open(path, "r+b") as f:
        raws = []
        for off in offs:
            f.seek(off)
            raws.append(f.read(BLOCK))
        _, newer = pick(raws[0], raws[1])
        slot = newer if newest else 1 - newer
        f.seek(offs[slot] + 64)
        f.write(bytes(x ^ 0xFF for x in raws[slot][64:96]))
    return slot


def valid_slots(path: Path) -> list[bool]:
    out = []
    with open(path, "rb") as f:
        for off in sb_offsets(path.stat().st_size):
            f.seek(off)
            try:
                decode(f.read(BLOCK))
                out.append(True)
            except Exception:
                out.append(False)
    return out


def test_corrupted_superblock_copy_falls_back_to_the_other(cl: Cluster, tmp_path: Path) -> None:
    n0, n1 = cl.node(0), cl.node(1)
    cl.create("r", legs_of(n0, n1))
    image = fill(cl.uri, tmp_path)
    for i, newest in ((1, True), (0, False), (0, True)):
        cl.daemon.dst("stop", "r")
        cl.nodes[i].stop()
        slot = corrupt_slot(cl.nodes[i].path, newest)
        assert not valid_slots(cl.nodes[i].path)[slot]
        cl.node(i)
        cl.daemon.dst("start", "r")
        assert states(cl.daemon, "r") == ["in_sync", "in_sync"], (i, slot)
        assert read_all(cl.uri, tmp_path) == image
        image[slot * REGION : slot * REGION + 5] = b"again"  # and it keeps working
        nbdsh(cl.uri, f"h.pwrite(b'again', {slot * REGION}); h.flush()")
    # Both copies of leg1's superblock corrupted: leg1 alone is refused (the array runs
    # on leg0), and a full re-add brings it back.
    n0, n1 = cl.nodes[0], cl.nodes[1]
    cl.daemon.dst("stop", "r")
    n1.stop()
    corrupt_slot(n1.path, True)
    corrupt_slot(n1.path, True)
    assert valid_slots(n1.path) == [False, False]
    n1 = cl.node(1)
    cl.daemon.dst("start", "r")
    m = mirror(cl.daemon, "r")
    assert states(cl.daemon, "r") == ["in_sync", "failed"]
    assert "checksum" in m["detail"]["legs"][1]["reason"], m["detail"]["legs"][1]
    assert read_all(cl.uri, tmp_path) == image
    cl.daemon.dst("readd", "r", "leg1", "--full")
    wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "leg1 resynced")
    assert cl.daemon.dst("verify", "r").returncode == 0
    cl.daemon.dst("stop", "r")
    assert leg_data(n0.path) == leg_data(n1.path) == image
    assert valid_slots(n1.path) == [True, True]


# -- 4. fault injection: nbdkit's error filter, one trigger file per method -------------


def test_nbdkit_leg_read_errors_retried_write_errors_degrade_readd_copies_missed(
    cl: Cluster, tmp_path: Path, sockdir: Path
) -> None:
    require("nbdkit")
    n0 = cl.node(0)
    rd, wr = tmp_path / "reads.fail", tmp_path / "writes.fail"
    kit_sock = sockdir / "kit.sock"
    kit = subprocess.Popen(
        ["nbdkit", "--foreground", "-U", str(kit_sock), "--filter=error", "memory",
         str(MEMBER), "error-pread-rate=50%", f"error-pread-file={rd}",
         "error-pwrite-rate=100%", f"error-pwrite-file={wr}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until(kit_sock.exists, "nbdkit socket")
        kit_uri = unix_uri(kit_sock)
        cl.create("r", [remote("good", n0.uri), remote("kit", kit_uri)])
        image = fill(cl.uri, tmp_path)
        # Half the reads of the kit leg fail: the client sees none, every byte right.
        rd.touch()
        for _ in range(3):
            assert read_all(cl.uri, tmp_path) == image
        legs = mirror(cl.daemon, "r")["detail"]["legs"]
        assert legs[1]["counters"]["errors"] > 0, legs[1]
        assert states(cl.daemon, "r") == ["in_sync", "in_sync"]  # reads do not fail it
        rd.unlink()
        run(["nbdcopy", kit_uri, tmp_path / "kit.bin"])  # its copy is still whole
        assert (tmp_path / "kit.bin").read_bytes()[:DATA] == image
        # Every write to the kit leg fails: it is failed, the writer goes on.
        wr.touch()
        w = Writer(cl.uri, tmp_path, first=0, last=MiB // BLOCK)  # 16 regions
        wait_until(lambda: states(cl.daemon, "r")[1] == "failed", "kit leg failed")
        time.sleep(0.5)
        count = w.finish()  # no error: the good leg took every write
        image = w.apply(image, count)
        leg = mirror(cl.daemon, "r")["detail"]["legs"][1]
        assert leg["reason"] and 0 < leg["missing_regions"] <= 16, leg
        assert read_all(cl.uri, tmp_path) == image  # reads now avoid the kit leg
        wr.unlink()
        time.sleep(1.5)  # failed by errors on a live connection: left to the operator
        assert states(cl.daemon, "r") == ["in_sync", "failed"]
        out = cl.daemon.dst("readd", "r", "kit").stdout
        assert "re-added" in out, out
        wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "kit resynced")
        resync = mirror(cl.daemon, "r")["detail"]["resync"]
        assert 0 < resync["bytes"] <= 16 * REGION, resync  # what it missed, not 32 MiB
        run(["nbdcopy", kit_uri, tmp_path / "kit.bin"])
        assert (tmp_path / "kit.bin").read_bytes()[:DATA] == image
        assert cl.daemon.dst("verify", "r").returncode == 0
        cl.daemon.dst("stop", "r")
        assert leg_data(n0.path) == image
    finally:
        cl.daemon.dst("stop", "r", check=False)  # nbdkit waits for its clients to go
        kit.terminate()
        kit.wait(timeout=20)


# -- 5. the CLI under a writer; corruption through a second connection ------------------


def test_cli_fail_readd_verify_repair_under_a_writer(cl: Cluster, tmp_path: Path) -> None:
    n0, n1 = cl.node(0), cl.node(1)
    cl.create("r", legs_of(n0, n1))
    image = fill(cl.uri, tmp_path)
    span = 2 * MiB // BLOCK  # the writer keeps to regions 0-31
    w = Writer(cl.uri, tmp_path, first=0, last=span)
    time.sleep(0.3)
    cl.daemon.dst("fail", "r", "leg1")
    assert states(cl.daemon, "r") == ["in_sync", "failed"]
    time.sleep(0.7)
    missed = mirror(cl.daemon, "r")["detail"]["legs"][1]["missing_regions"]
    assert 0 < missed <= 32, missed
    out = cl.daemon.dst("readd", "r", "leg1").stdout
    assert "re-added" in out or "resyncing" in out, out
    wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "leg1 resynced")
    resync = mirror(cl.daemon, "r")["detail"]["resync"]
    assert 0 < resync["bytes"] <= 32 * REGION, resync
    # Bit rot on leg1, written through a second NBD connection to its live node (the
    # array does not see it), in regions the writer does not touch.
    rot = (100, 200, NREGIONS - 1)
    nbdsh(n1.uri, "".join(f"h.pwrite(b'rot', {r * REGION + 777})\n" for r in rot) + "h.flush()")
    bad = cl.daemon.dst("verify", "r", check=False)  # the writer still runs
    assert bad.returncode == 1, bad
    assert f"{len(rot)} differ" in bad.stdout, bad.stdout
    found = {int(x) for x in re.findall(r"\d+", bad.stdout.split("differ", 1)[1])}
    assert set(rot) <= found, bad.stdout
    fixed = cl.daemon.dst("verify", "r", "--repair", "--source", "leg0")
    assert f"{len(rot)} repaired" in fixed.stdout, fixed.stdout
    again = cl.daemon.dst("verify", "r")
    assert again.returncode == 0 and "0 differ" in again.stdout, again.stdout
    count = w.finish()
    image = w.apply(image, count)
    assert read_all(cl.uri, tmp_path) == image
    cl.daemon.dst("stop", "r")
    assert leg_data(n0.path) == image
    assert leg_data(n1.path) == image
