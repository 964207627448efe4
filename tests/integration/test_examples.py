"""Every spec in examples/ runs, started the way its header says.

An example's header lists the commands that start the servers it needs and the array
(``dst serve ...``, then ``dst up --config examples/NAME.toml`` or ``dst daemon``).
The examples use fixed ports and /var/lib/dst; the test runs the same commands with
their files in a temporary directory and unix sockets instead of the fixed addresses
(the one change), serves any other remote member (qemu-nbd in linear.toml) with a
``dst serve`` node, rewrites the spec's ``listen``, ``uri`` and ``path`` values to
match, runs it with ``dst daemon`` and checks data written through the array reads
back.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from tests.support.cluster import Cluster, unix_uri, write_spec

from .helpers import nbdsh, require

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
COMMAND = re.compile(r"#\s+(dst \w+.*?)\s*(?:&\s*)?(?:#.*)?$")


def header_commands(text: str) -> list[list[str]]:
    """The ``dst ...`` command lines of an example's header comment."""
    return [shlex.split(m.group(1)) for line in text.splitlines() if (m := COMMAND.match(line))]


def start_servers(cluster: Cluster, commands: list[list[str]], tmp: Path) -> dict[str, Path]:
    """Run the header's ``dst serve`` commands (files in ``tmp``, unix sockets);
    returns their ``--listen`` address -> socket."""
    served = {}
    for argv in commands:
        if argv[1] != "serve":
            continue
        path, opts = Path(argv[2]), argv[3:]
        i = opts.index("--listen")
        listen, args = opts[i + 1], opts[:i] + opts[i + 2 :]
        cluster.node(path.stem, None, path=tmp / path.name, args=args)
        served[listen] = cluster.sockets / f"{path.stem}.sock"
    return served


def rewrite(
    target: dict[str, Any], cluster: Cluster, served: dict[str, Path], tmp: Path
) -> dict[str, Any]:
    """``target`` with remote URIs on the started servers and file paths in ``tmp``."""
    t = dict(target)
    if t["type"] == "remote":
        uri = urlsplit(t["uri"])
        export = uri.path.lstrip("/")
        if uri.netloc in served:
            t["uri"] = unix_uri(served[uri.netloc], export)
        else:  # not served by a dst node in the header: any NBD server will do
            node = cluster.node(t["name"], "1G", args=["--name", export] if export else [])
            t["uri"] = node.uri
    elif t["type"] == "file":
        t["path"] = str(tmp / Path(t["path"]).name)
    if "members" in t:
        t["members"] = [rewrite(m, cluster, served, tmp) for m in t["members"]]
    return t


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_as_its_header_says(cluster: Cluster, tmp_path: Path, example: Path) -> None:
    require("nbdsh")
    text = example.read_text()
    commands = header_commands(text)
    relative = str(example.relative_to(ROOT))
    runs = [argv for argv in commands if argv[1] in ("up", "daemon")]
    assert runs, f"{relative}: the header does not say how to run it"
    for argv in runs:
        assert argv[-1] == relative and argv[1:-1] in (["up", "--config"], ["daemon"]), argv
    assert {argv[1] for argv in commands} <= {"serve", "up", "daemon"}, commands
    array = tomllib.loads(text)["array"]
    served = start_servers(cluster, commands, tmp_path)
    target = rewrite(array.pop("target"), cluster, served, tmp_path)
    name, sock = array.pop("name"), cluster.sock("array")
    array.pop("listen")
    spec = write_spec(tmp_path / example.name, name, [f"unix:{sock}"], target, **array)
    daemon = cluster.start_daemon(spec)
    (status,) = daemon.status()["arrays"]
    assert status["name"] == name and status["state"] == "running", status
    states = {m["state"] for m in status["root"]["members"]}
    assert states <= {"in_sync", "connected"}, status["root"]["members"]
    uri = unix_uri(sock, array.get("export", ""))
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
    assert nbdsh(uri, script).strip() == str(status["size"])
    daemon.dst("stop", name)
    assert not os.path.exists(sock)
