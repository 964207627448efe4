"""Every spec in examples/ runs, started the way its header says.

An example's header lists, one per ``#   `` line, the shell commands that prepare and
start what it needs (``dst certs``, ``echo RULE > FILE``, ``dst serve ...``), the
command that runs the array (``dst up --config examples/NAME.toml`` or ``dst
daemon``) and, for TLS, a client (``nbdinfo URI``).  The examples use fixed ports and
/etc/dst, /var/lib/dst; the test runs the same commands with those files under a
temporary directory and unix sockets instead of the fixed addresses (the one change),
serves any other remote member (qemu-nbd in linear.toml) with a ``dst serve`` node,
rewrites the spec's addresses and paths to match, runs it with ``dst daemon`` and checks
that data written through the array (as the header's client, over TLS if it says so)
reads back.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from tests.support.cluster import DST, Cluster, nbd_python, run, unix_uri, write_spec

from .helpers import require

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
SYSTEM = ("/etc/", "/var/", "/run/")  # example paths that live under the test's directory
PATH_PARAMS = ("tls-certificates", "tls-psk-file")


class Example:
    """One example, run in ``tmp`` with the processes of ``cluster``."""

    def __init__(self, path: Path, cluster: Cluster, tmp: Path) -> None:
        self.text = path.read_text()
        self.relative = str(path.relative_to(ROOT))
        self.cluster, self.tmp = cluster, tmp
        self.served: dict[str, Path] = {}  # "HOST:PORT" of a header's dst serve -> socket
        self.client: str | None = None  # the header's client URI (nbdinfo)
        lines = [m.group(1) for m in re.finditer(r"^#   (\S.*)$", self.text, re.M)]
        self.commands = [[a for a in shlex.split(c, comments=True) if a != "&"] for c in lines]

    def local(self, path: str) -> str:
        """An example's system path, moved under the test's directory."""
        if not path.startswith(SYSTEM):
            return path
        moved = self.tmp / path.lstrip("/")
        moved.parent.mkdir(parents=True, exist_ok=True)
        return str(moved)

    def prepare(self) -> list[list[str]]:
        """Run the header's commands but the array's; return the array's commands."""
        runs = []
        for argv in self.commands:
            if argv[0] == "dst" and argv[1] in ("up", "daemon"):
                runs.append(argv)
            elif argv[0] == "dst" and argv[1] == "certs":
                run([*DST, "certs", self.local(argv[2]), *argv[3:]])
            elif argv[0] == "dst" and argv[1] == "serve":
                self.serve(argv[2:])
            elif argv[0] == "echo":
                assert argv[2] == ">" and len(argv) == 4, argv
                Path(self.local(argv[3])).write_text(argv[1] + "\n")
            elif argv[0] == "nbdinfo":
                self.client = argv[-1]
            else:  # mkdir (done by local()), qemu-img, qemu-nbd (a dst node instead)
                assert argv[0] in ("mkdir", "qemu-img", "qemu-nbd"), argv
        return runs

    def serve(self, args: list[str]) -> None:
        path, opts = Path(args[0]), args[1:]
        i = opts.index("--listen")
        listen, opts = opts[i + 1], opts[:i] + opts[i + 2 :]
        opts = [self.local(a) for a in opts]
        self.cluster.node(path.stem, None, path=Path(self.local(str(path))), args=opts)
        self.served[listen] = self.cluster.sockets / f"{path.stem}.sock"

    def uri(self, uri: str) -> str:
        """A member's URI on the node serving it here (path parameters moved)."""
        u = urlsplit(uri)
        query = [(k, self.local(v) if k in PATH_PARAMS else v) for k, v in parse_qsl(u.query)]
        if u.netloc in self.served:
            scheme = u.scheme.removesuffix("+unix") + "+unix"
            query = [("socket", str(self.served[u.netloc])), *query]
            return f"{scheme}:///{u.path.lstrip('/')}?{urlencode(query, safe='/')}"
        return uri

    def target(self, t: dict[str, Any]) -> dict[str, Any]:
        t = dict(t)
        if t["type"] == "remote":
            uri = self.uri(t["uri"])
            if uri == t["uri"]:  # not served by a dst node in the header: any NBD server
                export = urlsplit(uri).path.lstrip("/")
                args = ["--name", export] if export else []
                uri = self.cluster.node(t["name"], "1G", args=args).uri
            t["uri"] = uri
        elif t["type"] == "file":
            t["path"] = self.local(t["path"])
        if "members" in t:
            t["members"] = [self.target(m) for m in t["members"]]
        return t


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_as_its_header_says(cluster: Cluster, tmp_path: Path, example: Path) -> None:
    require("nbdsh")
    ex = Example(example, cluster, tmp_path)
    runs = ex.prepare()
    assert runs, f"{ex.relative}: the header does not say how to run it"
    for argv in runs:
        assert argv[-1] == ex.relative and argv[1:-1] in (["up", "--config"], ["daemon"]), argv
    array = tomllib.loads(ex.text)["array"]
    target = ex.target(array.pop("target"))
    name, sock = array.pop("name"), cluster.sock("array")
    array.pop("listen")
    for key in ("acl",):
        if key in array:
            array[key] = ex.local(array[key])
    tls = array.get("tls", {})
    for key in ("certificates", "psk"):
        if key in tls:
            tls[key] = ex.local(tls[key])
    spec = write_spec(tmp_path / example.name, name, [f"unix:{sock}"], target, **array)
    daemon = cluster.start_daemon(spec)
    (status,) = daemon.status()["arrays"]
    assert status["name"] == name and status["state"] == "running", status
    states = {m["state"] for m in status["root"]["members"]}
    assert states <= {"in_sync", "connected"}, status["root"]["members"]
    uri = unix_uri(sock, array.get("export", ""))
    if ex.client is not None:  # the header's client: its scheme and credentials
        client = urlsplit(ex.client)
        uri = f"{client.scheme.removesuffix('+unix')}+unix{uri.removeprefix('nbd+unix')}"
        creds = dict(parse_qsl(client.query)).get("tls-certificates")
        uri += f"&tls-certificates={ex.local(creds)}" if creds else ""
    last = status["size"] - (1 << 16)
    script = (
        "import os\n"
        "data = os.urandom(1 << 16)\n"
        f"for off in (0, {status['size'] // 2}, {last}):\n"
        "    h.pwrite(data, off)\n"
        "h.flush()\n"
        f"for off in (0, {status['size'] // 2}, {last}):\n"
        "    assert h.pread(len(data), off) == data, off\n"
        "print(h.get_size())\n"
    )
    connect = f"h.set_uri_allow_local_file(True); h.connect_uri({uri!r})"
    out = run([nbd_python(), "-m", "nbd", "-c", connect, "-c", script]).stdout
    assert out.strip() == str(status["size"])
    daemon.dst("stop", name)
