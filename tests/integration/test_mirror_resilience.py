"""A mirror's resilience with real processes: crashes, bad members, faults, the operator.

* a node killed under load, twice, the second time in the middle of a throttled
  resync: re-added by itself both times, the resync resumes and copies only the regions
  the leg missed;
* the array daemon killed mid-writes, brought back either from the *same spec file*
  or by ``dst assemble`` of the members alone: writes the client saw acknowledged
  survive, only dirty regions are resynced, an ext4 made before the crash checks clean;
* split brain made with processes (each leg written while the other was away): refused
  at re-add and at start, until the operator picks a side with ``readd --full``;
* a member of another array is refused by ``dst create`` and ``dst assemble``, naming
  it; a corrupted superblock copy falls back to the other one; both copies corrupted:
  that leg alone is refused;
* one nbdkit leg with per-method error triggers (every read fails, then every write);
* ``dst fail``/``readd``/``verify --repair`` under a client, the corruption made
  through a second NBD connection to the live node.

The client is :class:`~tests.support.pattern_client.PatternClient`: it checks every
read against the base image or its own writes and logs every acknowledged request, so
the expected image is known exactly.  Every test checks every byte of the array and of
each leg's data area.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from dst.meta.layout import BLOCK, member_size_for, sb_offsets
from dst.meta.superblock import decode, pick
from tests.support.cluster import DST, Cluster, Daemon, Node, remote, run, unix_uri, wait_until
from tests.support.pattern_client import PatternClient, compare

from .arrays import (
    check_ext4_image,
    dirty_regions,
    ext4_on_nbdfuse,
    fill,
    member_data,
    read_all,
)
from .helpers import nbdsh, require, require_root_dev

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20
REGION = 64 << 10
DATA = 32 * MiB  # the array's size
MEMBER = member_size_for(DATA)
NREGIONS = DATA // REGION


# -- helpers -------------------------------------------------------------------------


def leg_data(path: Path) -> bytes:
    """The array's bytes on the leg whose member file is ``path``."""
    return member_data(path, REGION)[:DATA]


def mirror(daemon: Daemon, name: str) -> dict[str, Any]:
    root: dict[str, Any] = daemon.status(name)["arrays"][0]["root"]
    return root


def states(daemon: Daemon, name: str) -> list[str]:
    return [k["state"] for k in mirror(daemon, name)["members"]]


class Mirrors:
    """The harness's cluster as these tests use it: nodes ``leg<i>`` of MEMBER bytes
    (restartable on the same socket and file), a daemon, and mirror arrays (one at a
    time) exported on one socket."""

    def __init__(self, cluster: Cluster) -> None:
        require("nbdcopy", "nbdinfo", "nbdsh")
        self.c, self.tmp = cluster, cluster.work
        cluster.start_daemon()
        self.sock = cluster.sock("array")
        self.uri = unix_uri(self.sock)

    @property
    def daemon(self) -> Daemon:
        return self.c.daemon

    @property
    def nodes(self) -> dict[int, Node]:
        return {int(k[3:]): n for k, n in self.c.nodes.items() if k.startswith("leg")}

    def node(self, i: int) -> Node:
        """Start (or restart) node ``leg<i>``."""
        return self.c.node(f"leg{i}", MEMBER)

    def spec(self, name: str, legs: list[dict[str, Any]], **extra: Any) -> Path:
        target = {"type": "mirror", "name": "m", "members": legs, "region_size": REGION, **extra}
        return self.c.spec(name, target, listen=[f"unix:{self.sock}"])

    def create(self, name: str, legs: list[dict[str, Any]], **extra: Any) -> Path:
        spec = self.spec(name, legs, **extra)
        self.daemon.dst("create", str(spec))
        return spec

    def client(self, first: int, last: int, *, base: Path | None, n: int = 1) -> PatternClient:
        """A verifying client on blocks [first, last): a read every third request;
        running (50 requests done) when this returns."""
        c = PatternClient(self.uri, self.tmp, client=n, first=first, last=last, read_every=3,
                          base=base)  # fmt: skip
        c.wait_count(50)
        return c


@pytest.fixture
def cl(cluster: Cluster) -> Mirrors:
    return Mirrors(cluster)


def legs_of(*nodes: Node) -> list[dict[str, Any]]:
    return [remote(f"leg{i}", n.uri) for i, n in enumerate(nodes)]


def writes(ops: list[Any]) -> int:
    return sum(1 for op in ops if op.kind == "w")


# -- 1. a node killed under load, twice ------------------------------------------------


def test_node_killed_twice_under_load_resync_resumes_and_copies_only_dirty_regions(
    cl: Mirrors, tmp_path: Path
) -> None:
    n0, n1 = cl.node(0), cl.node(1)
    # Throttled to 4 regions/s so that the resync of 16 or more regions is caught midway
    # however slowly `dst status` answers on a loaded machine.
    cl.create("r", legs_of(n0, n1), resync_rate="256K")
    image = fill(cl.uri, tmp_path, DATA)
    span = 4 * MiB  # the client's range: 64 regions of the 512
    c = cl.client(0, span // BLOCK, base=tmp_path / "base.bin")
    n1.kill()
    wait_until(lambda: states(cl.daemon, "r")[1] == "failed", "leg1 failed")
    c.wait_count(c.count() + 100)  # degraded: the client goes on, leg1's misses recorded

    def missed() -> int:
        return int(mirror(cl.daemon, "r")["detail"]["legs"][1]["missing_regions"])

    wait_until(lambda: missed() >= 16, "leg1 missing 16 regions")
    assert missed() <= span // REGION, missed()
    n1 = cl.node(1)  # back on the same socket and file: re-added by itself

    def resyncing_midway() -> bool:
        m = mirror(cl.daemon, "r")
        r = m["detail"]["resync"]
        midway = 0 < r.get("regions_done", 0) < r.get("regions_total", 0)
        return bool(m["members"][1]["state"] == "resyncing" and midway)

    wait_until(resyncing_midway, "leg1 resyncing, partly done")
    n1.kill()  # killed again in the middle of its resync
    wait_until(lambda: states(cl.daemon, "r")[1] == "failed", "leg1 failed again")
    c.wait_count(c.count() + 50)
    n1 = cl.node(1)
    cl.daemon.dst("resync-rate", "r", "0")  # unlimited: the rest at once
    wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "leg1 back in sync")
    ops = c.finish()
    assert writes(ops) > 100, len(ops)
    image = c.apply(image, ops)
    m = mirror(cl.daemon, "r")
    keeper, resync = m["detail"]["keeper"], m["detail"]["resync"]
    assert keeper["auto_readds"] >= 2, keeper
    # The last run copied what leg1 still missed: never more than the client's 64
    # regions, far from the 512 of the device.
    assert 0 < resync["bytes"] <= span < DATA // 4, resync
    assert resync["regions_total"] <= span // REGION, resync
    compare(read_all(cl.uri, tmp_path), image, what="array")
    verify = cl.daemon.dst("verify", "r")
    assert "0 differ" in verify.stdout, verify.stdout
    cl.daemon.dst("stop", "r")
    compare(leg_data(n0.path), image, what="leg0")
    compare(leg_data(n1.path), image, what="leg1")


# -- 2. the daemon killed mid-writes, restarted from the spec or assembled --------------


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


@pytest.mark.parametrize("restart", ["spec", "assemble"])
def test_daemon_killed_mid_writes_comes_back_resyncing_only_dirty_regions(
    cl: Mirrors, tmp_path: Path, restart: str
) -> None:
    """kill -9 of the daemon under a client writing to blocks no file of an ext4 uses;
    a new daemon brings the array back from the same spec file, or ``dst assemble``
    from the members alone (in another order): every acknowledged write is there (the
    one in flight may be), only the regions marked dirty are copied, the filesystem
    checks clean and the legs agree."""
    require("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "dumpe2fs", "mount")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    n0, n1 = cl.node(0), cl.node(1)
    # Bits clear after 1 s idle (not 30): the crash then leaves only the client's
    # regions dirty, and that bound is what the test checks.
    spec = cl.create("r", legs_of(n0, n1), clear_delay="1s")
    digests = ext4_on_nbdfuse(cl.uri, tmp_path)
    snap = tmp_path / "before.img"
    run(["nbdcopy", cl.uri, snap])
    first, last = free_run(snap)
    wait_until(lambda: dirty_regions(n0.path) == 0, "mkfs's regions clean", timeout=20)
    # Blocks no file uses: the client can change them and the filesystem stays clean.
    assert last - first >= 64, (first, last)
    image = bytearray(snap.read_bytes())
    c = cl.client(first, last, base=snap)
    c.wait_count(300)
    cl.daemon.kill()  # the crash, in the middle of writes
    ops = c.finish(expect="error")  # it saw its connection drop
    doubt = c.in_doubt()
    dirty = max(dirty_regions(n0.path), dirty_regions(n1.path))
    assert 0 < dirty <= (last - first) * BLOCK // REGION + 1, dirty
    if restart == "spec":
        cl.c.start_daemon(spec)
    else:
        again = cl.c.start_daemon()
        out = again.dst("assemble", n1.uri, n0.uri, "--name", "r", "--listen", f"unix:{cl.sock}")
        assert "dirty" in out.stdout, out.stdout  # the crash left the members marked dirty
    wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "legs in sync")
    resync = mirror(cl.daemon, "r")["detail"]["resync"]
    # The crash left both legs marked dirty: those regions (only) are copied.
    assert 0 < resync["bytes"] <= dirty * REGION < DATA // 4, (resync, dirty)
    got = read_all(cl.uri, tmp_path)
    compare(got, c.apply(image, ops), doubts=[doubt] if doubt else [], what="array")
    cl.daemon.dst("stop", "r")
    assert leg_data(n0.path) == leg_data(n1.path) == got, "legs differ"
    check_ext4_image(n1.path, digests, tmp_path)


# -- 3. stale, diverged, foreign members; a corrupted superblock ------------------------


def mixed_members(cl: Mirrors) -> subprocess.CompletedProcess[str]:
    """Arrays "one" (leg0, leg1) and "two" (t0, t1), stopped; then a spec "mixed" of
    one's leg0 and two's t1 (named "intruder") created: returns the ``dst create``."""
    nodes = [cl.node(i) for i in range(4)]
    cl.create("one", legs_of(nodes[0], nodes[1]))
    cl.daemon.dst("stop", "one")
    cl.create("two", [remote("t0", nodes[2].uri), remote("t1", nodes[3].uri)])
    cl.daemon.dst("stop", "two")
    mixed = [remote("leg0", nodes[0].uri), remote("intruder", nodes[3].uri)]
    return cl.daemon.dst("create", str(cl.spec("mixed", mixed)), check=False)


def test_member_of_another_array_is_refused(cl: Mirrors) -> None:
    bad = mixed_members(cl)
    assert bad.returncode != 0, bad.stdout
    assert "different arrays" in bad.stderr, bad.stderr
    # The operator needs to know which member is foreign and where it comes from.
    # (The superblock records the mirror's name and the array UUID, not the array's.)
    assert "(intruder): member of 'm'" in bad.stderr and bad.stderr.count("-") >= 8, bad.stderr
    arrays = cl.daemon.status()["arrays"]
    assert all(a["state"] != "running" for a in arrays if a["name"] == "mixed"), arrays
    # Nothing was written to either member: both arrays start again, in sync.
    for name in ("one", "two"):
        cl.daemon.dst("start", name)
        assert states(cl.daemon, name) == ["in_sync", "in_sync"], name
        assert cl.daemon.dst("verify", name).returncode == 0
        cl.daemon.dst("stop", name)
    # dst assemble refuses them too, from NBD URIs and from the member files alike;
    # two members of one array are accepted, under the leg names they recorded.
    nodes = cl.nodes
    for a, b in ((nodes[0].uri, nodes[3].uri), (str(nodes[0].path), str(nodes[3].path))):
        mixed = run([*DST, "assemble", a, b, "--dry-run"], check=False)
        assert mixed.returncode != 0 and "different arrays" in mixed.stderr, mixed
    for a, b in ((nodes[3].uri, nodes[2].uri), (str(nodes[3].path), str(nodes[2].path))):
        ok = run([*DST, "assemble", a, b, "--dry-run"])
        assert '"t0"' in ok.stdout and '"t1"' in ok.stdout, ok.stdout


def test_mirror_starts_degraded_with_a_node_down_and_readds_it(cl: Mirrors, tmp_path: Path) -> None:
    """Semantics 3 and the keeper's periodic retry for a leg never opened."""
    n0, n1 = cl.node(0), cl.node(1)
    cl.create("r", legs_of(n0, n1))
    image = fill(cl.uri, tmp_path, DATA)
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
    cl: Mirrors, tmp_path: Path
) -> None:
    n0, n1, x = cl.node(0), cl.node(1), cl.node(2)
    cl.create("r", legs_of(n0, n1))
    base = fill(cl.uri, tmp_path, DATA)
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
    cl: Mirrors, tmp_path: Path
) -> None:
    """Process level: leg1 taken out, leg0 written alone; then the array restarted with
    leg0's node down, so leg1 is written alone; then both are present."""
    n0, n1 = cl.node(0), cl.node(1)
    cl.create("r", legs_of(n0, n1))
    base = fill(cl.uri, tmp_path, DATA)
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


def test_corrupted_superblock_copy_falls_back_to_the_other(cl: Mirrors, tmp_path: Path) -> None:
    n0, n1 = cl.node(0), cl.node(1)
    cl.create("r", legs_of(n0, n1))
    image = fill(cl.uri, tmp_path, DATA)
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
    cl: Mirrors, tmp_path: Path
) -> None:
    require("nbdkit")
    n0 = cl.node(0)
    rd, wr = tmp_path / "reads.fail", tmp_path / "writes.fail"
    kit = cl.c.server(
        "kit",
        ["nbdkit", "--foreground", "-U", str(cl.c.sockets / "kit.sock"), "--filter=error",
         "memory", str(MEMBER), "error-pread-rate=100%", f"error-pread-file={rd}",
         "error-pwrite-rate=100%", f"error-pwrite-file={wr}"],
    )  # fmt: skip
    cl.create("r", [remote("good", n0.uri), remote("kit", kit.uri)])
    image = fill(cl.uri, tmp_path, DATA)
    # Every read of the kit leg fails: the client sees none, every byte right.
    rd.touch()
    for _ in range(3):  # reads are balanced: some go to the failing leg
        compare(read_all(cl.uri, tmp_path), image, what="array")
    legs = mirror(cl.daemon, "r")["detail"]["legs"]
    assert legs[1]["counters"]["errors"] > 0, legs[1]
    assert states(cl.daemon, "r") == ["in_sync", "in_sync"]  # reads do not fail it
    rd.unlink()
    run(["nbdcopy", kit.uri, tmp_path / "kit.bin"])  # its copy is still whole
    assert (tmp_path / "kit.bin").read_bytes()[:DATA] == image
    # Every write to the kit leg fails: it is failed, the client goes on.
    wr.touch()
    c = cl.client(0, MiB // BLOCK, base=tmp_path / "base.bin")  # 16 regions
    wait_until(lambda: states(cl.daemon, "r")[1] == "failed", "kit leg failed")
    c.wait_count(c.count() + 50)
    ops = c.finish()  # no error: the good leg took every write
    image = c.apply(image, ops)
    leg = mirror(cl.daemon, "r")["detail"]["legs"][1]
    assert leg["reason"] and 0 < leg["missing_regions"] <= 16, leg
    compare(read_all(cl.uri, tmp_path), image, what="array")  # reads now avoid the kit leg
    wr.unlink()
    time.sleep(1.5)  # the window observed: a leg failed by errors on a live connection
    assert states(cl.daemon, "r") == ["in_sync", "failed"]  # is left to the operator
    out = cl.daemon.dst("readd", "r", "kit").stdout
    assert "re-added" in out, out
    wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "kit resynced")
    resync = mirror(cl.daemon, "r")["detail"]["resync"]
    assert 0 < resync["bytes"] <= 16 * REGION, resync  # what it missed, not 32 MiB
    run(["nbdcopy", kit.uri, tmp_path / "kit.bin"])
    assert (tmp_path / "kit.bin").read_bytes()[:DATA] == image
    verify = cl.daemon.dst("verify", "r")
    assert "0 differ" in verify.stdout, verify.stdout
    cl.daemon.dst("stop", "r")
    compare(leg_data(n0.path), image, what="good")


# -- 5. the CLI under a client; corruption through a second connection ------------------


def test_cli_fail_readd_verify_repair_under_a_client(cl: Mirrors, tmp_path: Path) -> None:
    n0, n1 = cl.node(0), cl.node(1)
    cl.create("r", legs_of(n0, n1))
    image = fill(cl.uri, tmp_path, DATA)
    span = 2 * MiB // BLOCK  # the client keeps to regions 0-31
    c = cl.client(0, span, base=tmp_path / "base.bin")
    cl.daemon.dst("fail", "r", "leg1")
    assert states(cl.daemon, "r") == ["in_sync", "failed"]
    assert mirror(cl.daemon, "r")["detail"]["keeper"]["manual"] == [1]
    c.wait_count(c.count() + 100)  # writes leg1 misses
    time.sleep(1.5)  # the window observed: a leg failed by the operator ...
    assert states(cl.daemon, "r") == ["in_sync", "failed"]  # ... is not re-added by itself
    missed = mirror(cl.daemon, "r")["detail"]["legs"][1]["missing_regions"]
    assert 0 < missed <= 32, missed
    out = cl.daemon.dst("readd", "r", "leg1").stdout
    m = re.fullmatch(r"leg1: re-added \(\S+\), resyncing (\d+) regions\n", out)
    assert m and missed <= int(m.group(1)) <= 32, out
    wait_until(lambda: states(cl.daemon, "r") == ["in_sync", "in_sync"], "leg1 resynced")
    resync = mirror(cl.daemon, "r")["detail"]["resync"]
    assert 0 < resync["bytes"] <= 32 * REGION, resync
    # Bit rot on leg1, written through a second NBD connection to its live node (the
    # array does not see it), in regions the client does not touch.
    rot = (100, 200, NREGIONS - 1)
    nbdsh(n1.uri, "".join(f"h.pwrite(b'rot', {r * REGION + 777})\n" for r in rot) + "h.flush()")
    bad = cl.daemon.dst("verify", "r", check=False)  # the client still runs
    assert bad.returncode == 1, bad
    assert f"{len(rot)} differ" in bad.stdout, bad.stdout
    found = {int(x) for x in re.findall(r"\d+", bad.stdout.split("differ", 1)[1])}
    assert found == set(rot), bad.stdout
    fixed = cl.daemon.dst("verify", "r", "--repair", "--source", "leg0")
    assert f"{len(rot)} repaired" in fixed.stdout, fixed.stdout
    again = cl.daemon.dst("verify", "r")
    assert again.returncode == 0 and "0 differ" in again.stdout, again.stdout
    image = c.apply(image, c.finish())
    compare(read_all(cl.uri, tmp_path), image, what="array")
    cl.daemon.dst("stop", "r")
    compare(leg_data(n0.path), image, what="leg0")
    compare(leg_data(n1.path), image, what="leg1")
