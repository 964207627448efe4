"""Parity arrays (issue 15) with real processes: raid5 of 3 and raid6 of 4 ``dst serve``
nodes under a ``dst daemon``.

* data reads back after killing any one member (raid5) or two (raid6), before and after
  they are rebuilt, and the parity on the member files -- P and Q recomputed here
  from the definition (:mod:`tests.support.parity`) -- matches the data;
* ``dst replace`` of a dead member rebuilds it from the others;
* the daemon killed with ``kill -9`` in the middle of writes, then ``dst assemble``:
  the parity of the dirty regions is recomputed, every acknowledged write is there;
  dirty *and* degraded is refused with the regions at risk until the member is back
  (or ``--force``);
* ``dst verify`` finds parity corrupted on purpose in a member file, ``--repair`` fixes it;
* ext4 through nbdfuse, fsck clean after a member was killed and rebuilt.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from dst.meta.layout import layout_for, member_size_for
from tests.support.cluster import (
    Cluster,
    Daemon,
    Node,
    nbd_python,
    remote,
    run,
    unix_uri,
    wait_until,
)
from tests.support.parity import check_members

from .arrays import check_ext4_image, dirty_regions, ext4_on_nbdfuse
from .helpers import require, require_root_dev

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20
REGION = 64 << 10
CHUNK = 32 << 10
DATA = 4 * MiB  # each member's data area (ext4 gets more)
BLOCK = 4096
SHAPES = {"raid5": (3, 1), "raid6": (4, 2)}

# A writer that records how many of its writes were acknowledged, after each one, so a
# crash of the daemon under it leaves a known set of possible images.  Write i puts
# block (i * 7919) % n of [first, last) to the byte i % 251 + 1.
ACK_WRITER = """
import os, sys
ack, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(ack, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
i = 0
while True:
    b = first + (i * 7919) % (last - first)
    h.pwrite(bytes([i % 251 + 1]) * 4096, b * 4096)
    i += 1
    os.pwrite(fd, b"%12d" % i, 0)
"""


def apply_writes(base: bytearray, first: int, last: int, count: int) -> bytearray:
    for i in range(count):
        b = first + (i * 7919) % (last - first)
        base[b * BLOCK : (b + 1) * BLOCK] = bytes([i % 251 + 1]) * BLOCK
    return base


class Parity:
    """The harness's cluster as these tests use it: nodes ``n<i>`` restartable on the
    same socket and file, a daemon, one parity array "a"."""

    def __init__(self, cluster: Cluster, kind: str) -> None:
        self.c, self.tmp, self.kind = cluster, cluster.work, kind
        self.n, self.parity = SHAPES[kind]
        self.nodes: dict[int, Node] = {}
        cluster.start_daemon()
        self.sock = cluster.sock("array")
        self.uri = unix_uri(self.sock)
        self.spec_path = self.tmp / "a.toml"
        self.data = DATA  # each member's data area

    @property
    def daemon(self) -> Daemon:
        return self.c.daemon

    def start_daemon(self) -> Daemon:
        return self.c.start_daemon()

    def node(self, i: int, name: str | None = None) -> Node:
        """Start (or restart) node ``n<i>`` (or ``name``) as member ``i``."""
        n = self.c.node(name or f"n{i}", member_size_for(self.data, REGION))
        self.nodes[i] = n
        return n

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def create(self, **extra: Any) -> None:
        members = [remote(f"n{i}", self.nodes[i].uri) for i in range(self.n)]
        target = {"type": self.kind, "name": "p", "members": members, "region_size": REGION,
                  **extra}  # fmt: skip
        self.spec_path = self.c.spec("a", target, listen=[f"unix:{self.sock}"])
        self.daemon.dst("create", str(self.spec_path))

    def root(self) -> dict[str, Any]:
        root: dict[str, Any] = self.daemon.status("a")["arrays"][0]["root"]
        return root

    def states(self) -> list[str]:
        return [m["state"] for m in self.root()["members"]]

    def wait_in_sync(self, what: str) -> None:
        wait_until(lambda: self.states() == ["in_sync"] * self.n, what, timeout=60)

    def members(self) -> list[bytes]:
        """Each member file's data area."""
        out = []
        for i in range(self.n):
            path = self.nodes[i].path
            size = layout_for(path.stat().st_size, REGION).data_size
            with open(path, "rb") as f:
                out.append(f.read(size))
        return out

    def check(self, image: bytes | None = None) -> None:
        assert check_members(self.members(), self.parity, CHUNK, image) == self.data // CHUNK

    def read_all(self) -> bytes:
        out = self.tmp / "out.bin"
        run(["nbdcopy", self.uri, out])
        return out.read_bytes()

    def fill(self) -> bytearray:
        size = int(run(["nbdinfo", "--size", self.uri]).stdout)
        assert size == (self.n - self.parity) * self.data
        data = os.urandom(size)
        (self.tmp / "fill.bin").write_bytes(data)
        run(["nbdcopy", "--flush", self.tmp / "fill.bin", self.uri])
        return bytearray(data)

    def write(self, image: bytearray, offset: int, data: bytes) -> None:
        src = self.tmp / "w.bin"
        src.write_bytes(data)
        py = nbd_python()
        script = f"h.pwrite(open({str(src)!r}, 'rb').read(), {offset}); h.flush()"
        run([py, "-m", "nbd", "-u", self.uri, "-c", script])
        image[offset : offset + len(data)] = data


@pytest.fixture(params=["raid5", "raid6"])
def cl(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[Parity]:
    require("nbdcopy", "nbdinfo", "nbdsh")
    yield Parity(cluster, request.param)


# -- 1. members killed and rebuilt --------------------------------------------------


def test_data_survives_killed_members_before_and_after_rebuild(cl: Parity) -> None:
    for i in range(cl.n):
        cl.node(i)
    cl.create()
    image = cl.fill()
    cl.check(bytes(image))
    # raid5: each member in turn; raid6: two pairs that together cover every member.
    rounds = [[i] for i in range(cl.n)] if cl.parity == 1 else [[0, 1], [2, 3]]
    for r, dead in enumerate(rounds):
        for i in dead:
            cl.kill(i)
        assert cl.read_all() == image, f"degraded read, {dead} dead"
        # writes while degraded: a whole stripe, and a partial one (rebuilt from parity)
        cl.write(image, r * 5 * MiB // 4, os.urandom(3 * CHUNK + 100))
        assert [cl.states()[i] for i in dead] == ["failed"] * len(dead)
        assert cl.read_all() == image
        for i in dead:
            cl.node(i)  # back on the same socket and file: re-added by itself
        cl.wait_in_sync(f"members {dead} rebuilt")
        resync = cl.root()["detail"]["resync"]
        assert 0 < resync["bytes"] <= 2 * len(dead) * REGION, resync  # what they missed
        assert cl.read_all() == image
        cl.check(bytes(image))


def test_replace_of_a_dead_member_rebuilds_it_from_the_others(cl: Parity) -> None:
    for i in range(cl.n):
        cl.node(i)
    cl.create()
    image = cl.fill()
    cl.kill(1)
    new = cl.node(1, name="spare")  # the dead member's index now names the spare
    uri = new.uri
    out = cl.daemon.dst("replace", "a", "n1", "--uri", uri, "--name", "spare")
    assert "spare" in out.stdout + out.stderr, out
    wait_until(lambda: [m["name"] for m in cl.root()["members"]][1] == "spare", "spare in")
    cl.wait_in_sync("spare rebuilt")
    assert cl.read_all() == image
    cl.check(bytes(image))
    for i in [0, 2][: cl.parity]:  # the spare now carries its share
        cl.kill(i)
    assert cl.read_all() == image


# -- 2. the daemon killed in the middle of writes -----------------------------------


def test_daemon_killed_mid_writes_then_assembled(cl: Parity) -> None:
    for i in range(cl.n):
        cl.node(i)
    cl.create(clear_delay="1s")
    image = cl.fill()
    wait_until(lambda: dirty_regions(cl.nodes[0].path) == 0, "the fill's regions clean")
    ack = cl.tmp / "acked"
    first, last = 64, 64 + 2 * MiB // BLOCK  # the writer's blocks
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
    cl.daemon.kill()
    w.wait(timeout=30)
    count = acked()
    # A new daemon assembles the array from its members alone.
    cl.start_daemon()
    uris = [cl.nodes[i].uri for i in range(cl.n)]
    cl.daemon.dst("assemble", *uris, "--name", "a", "--listen", f"unix:{cl.sock}")
    wait_until(lambda: cl.root()["detail"].get("unsynced_regions") == 0, "parity recomputed")
    resync = cl.root()["detail"]["resync"]  # the writer's regions only (and its neighbours)
    assert 0 < resync["regions_done"] <= (last - first) * BLOCK // REGION // (cl.n - cl.parity) + 2
    done = bytes(apply_writes(bytearray(image), first, last, count))
    maybe = bytes(apply_writes(bytearray(image), first, last, count + 1))
    got = cl.read_all()
    assert got in (done, maybe), "acknowledged writes lost"
    cl.daemon.dst("stop", "a")
    cl.check(got)


def test_dirty_and_degraded_is_refused_then_forced_then_rebuilt(cl: Parity) -> None:
    for i in range(cl.n):
        cl.node(i)
    cl.create(clear_delay="1s")
    image = cl.fill()
    wait_until(lambda: dirty_regions(cl.nodes[0].path) == 0, "the fill's regions clean")
    cl.write(image, 3 * MiB, os.urandom(5000))  # its regions dirty (for a second)
    cl.daemon.kill()
    cl.kill(cl.n - 1)
    cl.start_daemon()
    refused = cl.daemon.dst("create", str(cl.spec_path), check=False)
    assert refused.returncode != 0
    err = refused.stderr
    assert "dirty and degraded" in err and "write hole" in err, err
    region = 3 * MiB // (cl.n - cl.parity) // REGION
    assert "the parity of 1 regions" in err and f"regions {region} (" in err, err
    # The operator accepts the risk for this start: the region is reported at risk.
    text = cl.spec_path.read_text().replace("members = ", "start_dirty_degraded = true, members = ")
    cl.spec_path.write_text(text)
    cl.daemon.dst("create", str(cl.spec_path))
    assert cl.root()["detail"]["at_risk"] == [region]
    assert "at risk" in cl.daemon.dst("status", "a").stdout
    assert cl.read_all() == image  # the write had completed: nothing was lost here
    cl.daemon.dst("stop", "a")  # a clean stop; the spec it keeps is no longer forced
    cl.node(cl.n - 1)
    cl.daemon.dst("start", "a")
    cl.wait_in_sync("the member rebuilt")
    assert cl.read_all() == image
    cl.daemon.dst("stop", "a")
    cl.check(bytes(image))


# -- 3. verify ----------------------------------------------------------------------


def test_verify_finds_corrupted_parity_and_repair_fixes_it(cl: Parity) -> None:
    for i in range(cl.n):
        cl.node(i)
    cl.create()
    image = cl.fill()
    stripe = 70  # its P (raid5) or Q (raid6), corrupted in the member file
    member = (cl.n - 1 - stripe % cl.n + cl.parity - 1) % cl.n
    with open(cl.nodes[member].path, "r+b") as f:
        f.seek(stripe * CHUNK + 123)
        f.write(b"rot")
    with pytest.raises(AssertionError, match=f"{'PQ'[cl.parity - 1]} of stripe 70"):
        cl.check()
    bad = cl.daemon.dst("verify", "a", check=False)
    assert bad.returncode == 1, bad
    region = stripe * CHUNK // REGION
    assert "1 differ" in bad.stdout and f"regions {region}" in bad.stdout, bad.stdout
    fixed = cl.daemon.dst("verify", "a", "--repair")
    assert "1 repaired" in fixed.stdout, fixed.stdout
    assert "0 differ" in cl.daemon.dst("verify", "a").stdout
    assert cl.read_all() == image
    cl.check(bytes(image))


# -- 4. a filesystem ----------------------------------------------------------------


@pytest.mark.slow
def test_ext4_on_nbdfuse_clean_after_a_member_killed_and_rebuilt(cl: Parity) -> None:
    require("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    cl.data = 32 * MiB // (cl.n - cl.parity)  # a 32 MiB filesystem
    for i in range(cl.n):
        cl.node(i)
    cl.create()
    digests = ext4_on_nbdfuse(cl.uri, cl.tmp)
    cl.kill(0)
    snap = cl.tmp / "degraded.img"
    run(["nbdcopy", cl.uri, snap])  # read degraded: rebuilt from parity
    check_ext4_image(snap, digests, cl.tmp)
    cl.node(0)
    cl.wait_in_sync("member 0 rebuilt")
    cl.daemon.dst("stop", "a")
    cl.daemon.dst("start", "a")
    image = cl.tmp / "rebuilt.img"
    run(["nbdcopy", cl.uri, image])
    check_ext4_image(image, digests, cl.tmp)
    cl.check(image.read_bytes())
