"""TLS on both hops with real processes and real clients, data checked.

``dst certs`` makes the PKI; ``dst serve --tls require --tls-verify-peer --acl`` is used
by nbdinfo, nbdcopy, nbdsh and qemu-img with their own TLS options; an array daemon
reaches a dst node, ``nbdkit --tls=require`` and ``qemu-nbd`` with ``tls-creds`` as
nbds:// members and exports over TLS itself; ``dst up --tls`` carries ext4 through
nbdfuse.  Refusals (plaintext, an unknown certificate, an ACL denial, hostile bytes in
the handshake) leave no data behind and no traceback, and good clients keep working.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from dst.meta.layout import member_size_for
from dst.net.tls import PSK_SUPPORTED
from tests.support.cluster import (
    DST,
    Cluster,
    Node,
    nbd_python,
    remote,
    run,
    toml_value,
    wait_until,
    write_spec,
)

from .arrays import check_ext4_image, ext4_on_nbdfuse
from .helpers import random_file, require, require_root_dev, sha256_file

MiB = 1 << 20
IHAVEOPT, STARTTLS = 0x49484156454F5054, 5


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dst certs`` for a node, the array, a user and an intruder (keys owner-only)."""
    root = tmp_path_factory.mktemp("pki")
    out = run([*DST, "certs", str(root), "node", "array", "user", "intruder"]).stdout
    assert "created CA" in out and "CN=intruder,O=dst" in out
    for d in ("ca", "node", "user"):
        assert (root / d).stat().st_mode & 0o777 == 0o700
    for key in ("ca/ca-key.pem", "node/server-key.pem", "user/client-key.pem"):
        assert (root / key).stat().st_mode & 0o777 == 0o600, key
    again = run([*DST, "certs", str(root), "node"], check=False)
    assert again.returncode == 2 and "exists (use --force" in again.stderr
    return root


def nbds(uri: str, creds: Path) -> str:
    return f"{uri}{'&' if '?' in uri else '?'}tls-certificates={creds}"


def nbdsh_tls(uri: str, script: str) -> str:
    """nbdsh connected to ``uri`` (libnbd only reads tls-certificates=DIR from a URI
    when allowed to: nbdsh -u does not)."""
    require("nbdsh")
    connect = f"h.set_uri_allow_local_file(True); h.connect_uri({uri!r})"
    return run([nbd_python(), "-m", "nbd", "-c", connect, "-c", script]).stdout


def tls_node(cluster: Cluster, pki: Path, tmp_path: Path) -> tuple[Node, Path]:
    """A TLS-only dst node admitting CN=user and CN=array: (the node, its ACL file)."""
    acl = tmp_path / "node.acl"
    acl.write_text('allow dn="CN=user,O=dst"\nallow dn="CN=array,O=dst"\n')
    args = ["--tls", "require", "--tls-certificates", str(pki / "node"), "--tls-verify-peer"]
    node = cluster.node("node", "64M", listen=["tcp"], args=[*args, "--acl", str(acl)])
    assert node.uri.startswith("nbds://127.0.0.1:"), node.uri
    return node, acl


def port_of(uri: str) -> int:
    return int(uri.rsplit(":", 1)[1].split("/")[0])


def hostile(port: int, first: bytes, then: bytes = b"") -> bytes:
    """Greet, send ``first``; after the server's first reply send ``then``; half-close;
    return everything the server sent until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        assert len(s.recv(18, socket.MSG_WAITALL)) == 18
        s.sendall(struct.pack(">I", 3) + first)
        got = b""
        if then:
            got = s.recv(20, socket.MSG_WAITALL)
            s.sendall(then)
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(4096):
            got += chunk
        return got


STARTTLS_OPT = struct.pack(">QII", IHAVEOPT, STARTTLS, 0)
ACK = struct.pack(">QIII", 0x3E889045565A9, STARTTLS, 1, 0)


def test_dst_serve_with_real_clients(cluster: Cluster, pki: Path, tmp_path: Path) -> None:
    require("nbdinfo", "nbdcopy", "nbdsh", "qemu-img")
    node, acl = tls_node(cluster, pki, tmp_path)
    uri, port = node.uri, port_of(node.uri)
    user = nbds(uri, pki / "user")
    info = json.loads(run(["nbdinfo", "--json", user]).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 64 * MiB

    data = tmp_path / "data.bin"
    digest = random_file(data, 4 * MiB)
    run(["nbdcopy", data, user])
    nbdsh_tls(user, "h.pwrite(b'tls!' * 1024, 60 * 1024 * 1024)")
    back = tmp_path / "back.raw"
    creds = f"tls-creds-x509,id=tls0,dir={pki / 'user'},endpoint=client"
    opts = f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"
    run(["qemu-img", "convert", "-O", "raw", "--object", creds, "--image-opts", opts, back])
    raw = back.read_bytes()
    assert len(raw) == 64 * MiB and raw[60 * MiB : 60 * MiB + 4096] == b"tls!" * 1024
    (tmp_path / "head.bin").write_bytes(raw[: 4 * MiB])
    assert sha256_file(tmp_path / "head.bin") == digest

    # Refusals: no data, one line each, and the node keeps serving.
    plain = run(["nbdinfo", uri.replace("nbds://", "nbd://")], check=False)
    assert plain.returncode != 0 and "export-size" not in plain.stdout
    denied = run(["nbdinfo", nbds(uri, pki / "intruder")], check=False)
    assert denied.returncode != 0 and "export-size" not in denied.stdout
    assert hostile(port, STARTTLS_OPT + b"\x16\x03\x01 in the same packet") == b""
    assert hostile(port, STARTTLS_OPT, then=os.urandom(3000)) == ACK  # garbage for TLS
    assert hostile(port, STARTTLS_OPT, then=b"\x16\x03\x01\x02") == ACK  # truncated
    nbdsh_tls(user, "assert h.pread(4096, 60 * 1024 * 1024) == b'tls!' * 1024")

    # The ACL is re-read on SIGHUP: the intruder is let in.
    acl.write_text(acl.read_text() + 'allow dn="CN=intruder,O=dst"\n')
    node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded: acl" in node.stderr(), "the node to reload its ACL")
    run(["nbdinfo", nbds(uri, pki / "intruder")])
    err = node.stderr()
    assert err.count("access denied") == 1 and "(CN=intruder,O=dst)" in err, err
    assert "TLS handshake failed" in err and "Traceback" not in err


def test_plaintext_beyond_loopback_needs_saying_so(cluster: Cluster, tmp_path: Path) -> None:
    cmd = [*DST, "serve", str(tmp_path / "d.img"), "--size", "1M"]
    refused = run([*cmd, "--listen", "0.0.0.0:0"], check=False)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "without TLS" in refused.stderr
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + "ab" * 16 + "\n")
    if not PSK_SUPPORTED:  # Python < 3.13: one clear line
        no_psk = run([*cmd, "--tls-psk", str(psk)], check=False)
        assert no_psk.returncode == 2 and no_psk.stderr.count("\n") == 1
        assert "Python 3.13" in no_psk.stderr
    nocreds = run([*cmd, "--tls", "require"], check=False)
    assert nocreds.returncode == 2 and "certificates directory" in nocreds.stderr
    node = cluster.node("open", "64M", listen=["0.0.0.0:0"], args=["--tls", "off"])
    assert node.uri.startswith("nbd://0.0.0.0:")


@pytest.fixture
def third_party_members(pki: Path, tmp_path: Path, cluster: Cluster) -> dict[str, Path]:
    """nbdkit --tls=require and qemu-nbd with tls-creds, both verifying client
    certificates, each on a 64 MiB file: {name: (socket, file)}."""
    require("nbdkit", "qemu-nbd")
    k_img, q_img = tmp_path / "k.img", tmp_path / "q.img"
    for f in (k_img, q_img):
        with open(f, "wb") as fh:
            fh.truncate(64 * MiB)
    k_sock, q_sock = cluster.sockets / "k.sock", cluster.sockets / "q.sock"
    nbdkit = ["nbdkit", "-f", "-U", str(k_sock), "--tls=require"]
    nbdkit += [f"--tls-certificates={pki / 'node'}", "--tls-verify-peer", "file", str(k_img)]
    creds = f"tls-creds-x509,id=tls0,dir={pki / 'node'},endpoint=server,verify-peer=on"
    qemu = ["qemu-nbd", "--object", creds, "--tls-creds", "tls0", "-f", "raw", "-t"]
    qemu += ["--shared=8", "-k", str(q_sock), str(q_img)]
    cluster.server("nbdkit", nbdkit, sock=k_sock)  # stopped by the cluster, after the array
    cluster.server("qemu", qemu, sock=q_sock)
    return {"k_sock": k_sock, "k_img": k_img, "q_sock": q_sock, "q_img": q_img}


def test_array_over_tls_members(
    cluster: Cluster, third_party_members: dict[str, Path], pki: Path, tmp_path: Path
) -> None:
    """A mirror over a dst node, nbdkit and qemu-nbd, all nbds:// with the array's
    certificate, exported over TLS to verified users only; data checked on every leg."""
    require("nbdcopy")
    node, _ = tls_node(cluster, pki, tmp_path)
    m = third_party_members
    array_creds = pki / "array"
    legs = [
        remote("dst", nbds(node.uri, array_creds)),
        remote("nbdkit", nbds(f"nbds+unix:///?socket={m['k_sock']}", array_creds)),
        remote("qemu", nbds(f"nbds+unix:///?socket={m['q_sock']}", array_creds)),
    ]
    sock = cluster.sock("array")
    acl = tmp_path / "array.acl"
    acl.write_text('allow dn="CN=user,O=dst"\n')
    target = {"type": "mirror", "name": "m", "members": legs, "metadata": False}
    spec = write_spec(tmp_path / "tls.toml", "secure", [f"unix:{sock}"], target)
    tls = {"certificates": str(array_creds), "verify_peer": True}
    spec.write_text(spec.read_text() + f"tls = {toml_value(tls)}\nacl = {toml_value(str(acl))}\n")
    daemon = cluster.start_daemon()
    created = daemon.dst("create", str(spec)).stdout
    assert f"nbds+unix:///?socket={sock}" in created, created
    export = nbds(f"nbds+unix:///?socket={sock}", pki / "user")
    data = tmp_path / "data.bin"
    random_file(data, 8 * MiB)
    run(["nbdcopy", data, export])
    back = tmp_path / "back.bin"
    run(["nbdcopy", export, back])
    with open(back, "rb") as f:
        assert f.read(8 * MiB) == data.read_bytes()
    assert back.stat().st_size == 64 * MiB

    # dst status, while a verified user is connected: both hops, their identities
    script = "import sys; print('connected', flush=True); sys.stdin.read()"
    connect = f"h.set_uri_allow_local_file(True); h.connect_uri({export!r})"
    holder = subprocess.Popen(
        [nbd_python(), "-m", "nbd", "-c", connect, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "connected\n"
        (array,) = daemon.status("secure")["arrays"]
        table = daemon.dst("status", "secure").stdout
    finally:
        holder.communicate("", timeout=30)
    (client,) = array["clients"]
    assert client["tls"]["peer"] == "CN=user,O=dst" and client["state"] == "transmission"
    for leg in array["root"]["members"]:
        assert leg["state"] == "in_sync"
        assert leg["detail"]["tls"]["peer"] == "CN=node,O=dst", leg
    assert "client unix: TLSv1." in table and "CN=user,O=dst" in table

    # a plaintext client of the array, and another user, get nothing
    assert run(["nbdinfo", f"nbd+unix:///?socket={sock}"], check=False).returncode != 0
    intruder = nbds(f"nbds+unix:///?socket={sock}", pki / "intruder")
    assert run(["nbdinfo", intruder], check=False).returncode != 0
    # dst reload: the ACL file again (a bad one is refused, the old rules stay)
    reloaded = daemon.dst("reload", "secure").stdout
    assert reloaded == f"secure: reloaded 1 ACL rules from {acl}, TLS require\n"
    acl.write_text("allow dn=\n")
    broken = daemon.dst("reload", check=False)
    assert broken.returncode != 0 and f"{acl}:1: empty dn=" in broken.stderr
    assert broken.stderr.count("\n") == 1
    daemon.dst("stop", "secure")
    for leg_file in (node.path, m["k_img"], m["q_img"]):
        with open(leg_file, "rb") as f:
            head = f.read(8 * MiB)
        assert head == data.read_bytes(), leg_file

    # a member named without TLS: a clear error, naming it
    plain = [remote("dst", node.uri.replace("nbds://", "nbd://"))]
    target = {"type": "linear", "name": "l", "members": plain}
    bad = write_spec(tmp_path / "plain.toml", "plain", [], target)
    refused = daemon.dst("create", str(bad), check=False)
    assert refused.returncode != 0 and "requires TLS (use an nbds:// URI)" in refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert daemon.stop() == 0
    err = daemon.stderr()
    assert "Traceback" not in err, err
    assert err.count("access denied") == 1 and "CN=intruder,O=dst" in err, err


@pytest.mark.slow
def test_dst_up_tls_cluster_carries_ext4(cluster: Cluster, tmp_path: Path, sock_dir: Path) -> None:
    """dst up --tls: both hops verified; ext4 through nbdfuse over nbds+unix."""
    require("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount", "nbdinfo")
    require("nbdkit")
    require_root_dev("/dev/fuse", "/dev/loop-control")
    data_dir, sock, control = tmp_path / "data", sock_dir / "dst.sock", sock_dir / "control.sock"
    cmd = [*DST, "up", "--tls", "--dir", str(data_dir), "--size", "64M"]
    cmd += ["--listen", f"unix:{sock}", "--control", str(control)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    out: list[str] = []
    try:
        while not out or not out[-1].startswith("dst is up"):
            line = proc.stdout.readline()
            assert line, f"dst up exited {proc.wait()}: {''.join(out)}{proc.stderr.read()}"
            out.append(line)
        user = data_dir / "pki" / "user"
        export = f"nbds+unix:///?socket={sock}&tls-certificates={user}"
        status = json.loads(run([*DST, "status", "--json", "--control", str(control)]).stdout)
        (array,) = status["arrays"]
        assert array["exports"] == [f"nbds+unix:///?socket={sock}"]
        assert array["spec"]["array"]["tls"]["verify_peer"] is True
        legs = array["root"]["members"]
        assert [(g["name"], g["state"]) for g in legs] == [
            ("node-a", "in_sync"),
            ("node-b", "in_sync"),
        ]
        assert [g["detail"]["tls"]["peer"] for g in legs] == ["CN=node-a,O=dst", "CN=node-b,O=dst"]
        # the nodes admit only the array: the user's own certificate is refused there
        node_uri = legs[0]["where"].split("?")[0]
        assert node_uri.startswith("nbds://127.0.0.1:")
        assert run(["nbdinfo", f"{node_uri}?tls-certificates={user}"], check=False).returncode
        assert run(["nbdinfo", f"nbd+unix:///?socket={sock}"], check=False).returncode

        # libnbd 1.14's nbdfuse cannot read tls-certificates=DIR from a URI, so the TLS
        # client on the user's hop is nbdkit's nbd plugin (libnbd) in front of nbdfuse.
        proxy_sock = sock_dir / "proxy.sock"
        tls = ["tls=require", f"tls-certificates={user}"]
        cmd = ["nbdkit", "-f", "-U", str(proxy_sock), "nbd", f"socket={sock}", *tls]
        proxy = cluster.server("proxy", cmd, sock=proxy_sock)
        digests = ext4_on_nbdfuse(proxy.uri, tmp_path)
        proxy.stop()
        run(["nbdinfo", export])  # and directly, with libnbd's TLS
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == 0, err
    assert "Traceback" not in err, err
    a, b = data_dir / "node-a.img", data_dir / "node-b.img"
    size = 64 * MiB
    assert a.stat().st_size == member_size_for(size)
    assert a.read_bytes()[:size] == b.read_bytes()[:size], "mirror legs differ"
    check_ext4_image(a, digests, tmp_path)
