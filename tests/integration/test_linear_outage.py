"""A linear array hides a short outage of one member from a real client.

Two ``dst serve`` nodes; the daemon reaches node 2 through a cuttable proxy (its own
process).  An nbdsh writer fills the whole array with known patterns, pass after
pass, while the proxy is cut for ~2 s and restored: the writer must see no error (it
only stalls), and afterwards every byte is checked through the array (nbdcopy) and
on the member files.
"""

from __future__ import annotations

import struct
import subprocess
import time
from pathlib import Path

from tests.support.proxy_process import ProxyProcess

from .arrays import Daemon, MiB, accepts, remote, start_daemon, toml_value, unix_uri, wait_until
from .conftest import NodeFactory
from .helpers import nbd_python, require, run

BLOCK = 256 << 10
NODE_SIZE = 8 * MiB
OUTAGE = 2.0

WRITER = """
import os, struct, sys, time
size = h.get_size()
gen = done = 0
worst = 0.0
while True:
    gen += 1
    for off in range(0, size, BLOCK):
        data = struct.pack("<QQ", gen, off) * (BLOCK // 16)
        t0 = time.monotonic()
        h.pwrite(data, off)
        worst = max(worst, time.monotonic() - t0)
        done += 1
        with open(PROGRESS + ".tmp", "w") as f:
            f.write(str(done))
        os.replace(PROGRESS + ".tmp", PROGRESS)
    t0 = time.monotonic()
    h.flush()
    worst = max(worst, time.monotonic() - t0)
    if os.path.exists(STOP):
        break
print(gen, worst)
"""


def image(gen: int, size: int) -> bytes:
    """What the writer's pass ``gen`` leaves on an array of ``size`` bytes."""
    return b"".join(struct.pack("<QQ", gen, off) * (BLOCK // 16) for off in range(0, size, BLOCK))


def progress(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except FileNotFoundError:
        return 0


def member_state(daemon: Daemon, name: str) -> str:
    root = daemon.status("lin")["arrays"][0]["root"]
    states = {k["name"]: k["state"] for k in root["members"]}
    return str(states[name])


def test_linear_array_hides_a_two_second_cut(
    tmp_path: Path, sockdir: Path, node_factory: NodeFactory
) -> None:
    require("nbdsh", "nbdcopy")
    if not nbd_python():
        require("python3-libnbd (import nbd)")
    n0 = node_factory(size="8M", listen=[f"unix:{sockdir}/n0.sock"])
    n1 = node_factory(size="8M", listen=[f"unix:{sockdir}/n1.sock"])
    proxy = ProxyProcess(sockdir / "p1.sock", sockdir / "n1.sock")
    spec = tmp_path / "lin.toml"
    target = {
        "type": "linear",
        "members": [remote("n0", n0.uri), remote("n1", unix_uri(sockdir / "p1.sock"))],
    }
    spec.write_text(
        "[array]\n"
        'name = "lin"\n'
        f"listen = {toml_value([f'unix:{sockdir}/lin.sock'])}\n"
        'io_timeout = "10s"\n'
        f"target = {toml_value(target)}\n"
    )
    daemon = start_daemon(sockdir / "control.sock", tmp_path / "daemon.stderr", [spec])
    writer: subprocess.Popen[str] | None = None
    try:
        wait_until(lambda: accepts(sockdir / "lin.sock"), "the array's socket")
        uri = unix_uri(sockdir / "lin.sock")
        blocks = 2 * NODE_SIZE // BLOCK
        done, stop = tmp_path / "progress", tmp_path / "stop"
        script = f"BLOCK = {BLOCK}\nPROGRESS = {str(done)!r}\nSTOP = {str(stop)!r}\n" + WRITER
        writer = subprocess.Popen(
            [nbd_python(), "-m", "nbd", "-u", uri, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: progress(done) >= 2 * blocks, "two passes before the cut")

        proxy.cut()
        cut_at = time.monotonic()
        wait_until(lambda: member_state(daemon, "n1") == "reconnecting", "n1 to be reconnecting")
        stalled_at = progress(done)
        time.sleep(max(0.0, cut_at + OUTAGE - time.monotonic()))  # the outage itself
        assert progress(done) == stalled_at, "writes to n1 completed while it was cut off"
        assert writer.poll() is None, writer.communicate()
        proxy.restore()
        outage = time.monotonic() - cut_at

        wait_until(lambda: progress(done) >= stalled_at + blocks, "a full pass after restore")
        stop.touch()
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, f"the client saw an error:\n{err}"
        gen_text, worst_text = out.split()
        gen, worst = int(gen_text), float(worst_text)
        # it waited for n1 (the backoff adds up to 2 s after the restore), and no longer
        assert OUTAGE * 0.8 < worst < outage + 4.0, (worst, outage)
        assert member_state(daemon, "n1") == "connected"

        expected = image(gen, 2 * NODE_SIZE)
        copy = tmp_path / "out.bin"
        run(["nbdcopy", uri, copy])
        assert copy.read_bytes() == expected, "data read back through the array differs"
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.communicate()
        rc = daemon.stop()
        proxy.stop()
    log = daemon.stderr()
    assert rc == 0 and "Traceback" not in log, log
    assert "n1: lost connection" in log and "n1: reconnected" in log, log
    assert n0.path.read_bytes() == expected[:NODE_SIZE]
    assert n1.path.read_bytes() == expected[NODE_SIZE:]
