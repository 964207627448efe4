"""Real processes for integration tests: ``dst serve`` nodes and third-party clients.

A node is started as ``python -m dst serve ...``; its stdout is read by a thread and
the ``listening on URI`` lines it prints are the readiness signal (no sleeps).  Every
external command runs with a timeout and, when it fails, the assertion message
carries its command line, exit status and output.

Third-party tools missing from the machine skip the test, unless
``DST_REQUIRE_TOOLS=1`` (set by scripts/test and CI), where they fail it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DST = [sys.executable, "-m", "dst"]
LISTENING = "listening on "
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def require(*tools: str) -> None:
    """Skip (or fail, under DST_REQUIRE_TOOLS=1) unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = f"missing tools: {', '.join(missing)} (apt-get install the packages in .ci/run)"
        if os.environ.get("DST_REQUIRE_TOOLS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def require_root_dev(*paths: str) -> None:
    """Skip (or fail) unless running as root with these device nodes present."""
    missing = [p for p in paths if not os.path.exists(p)]
    if os.geteuid() != 0 or missing:
        msg = f"needs root and {', '.join(paths)}"
        if os.environ.get("DST_REQUIRE_TOOLS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 120,
    check: bool = True,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; with ``check`` an AssertionError carries everything on failure."""
    args = [os.fspath(c) for c in cmd]
    proc = subprocess.run(
        args,
        input=input.decode("latin-1") if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


@functools.cache
def nbd_python() -> str:
    """A Python that can ``import nbd`` (python3-libnbd); nbdsh is ``python3 -m nbd``."""
    candidates = [sys.executable, shutil.which("python3") or "", "/usr/bin/python3"]
    for py in candidates:
        if py and subprocess.run([py, "-c", "import nbd"], capture_output=True).returncode == 0:
            return py
    return ""


def nbdsh(
    uri: str,
    script: str,
    *,
    base_allocation: bool = False,
    timeout: float = 60,
    check: bool = True,
) -> str:
    """Run an nbdsh script connected to ``uri`` (handle ``h``); return its stdout."""
    require("nbdsh")
    py = nbd_python()
    if not py:
        require("python3-libnbd (import nbd)")
    opts = ["--base-allocation"] if base_allocation else []
    proc = run([py, "-m", "nbd", *opts, "-u", uri, "-c", script], timeout=timeout, check=check)
    return proc.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 1 << 20))
            f.write(chunk)
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


@dataclass
class Node:
    """A running ``dst serve`` process."""

    proc: subprocess.Popen[str]
    path: Path
    uris: list[str]
    stderr_path: Path
    lines: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return self.uris[0]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the node and wait; kill it if it does not stop.  Returns the status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"dst serve did not stop on signal {sig}\n{self.stderr()}"
                ) from None
        return self.proc.returncode


def start_node(
    path: Path,
    *,
    listen: Sequence[str],
    args: Sequence[str] = (),
    stderr_path: Path,
    timeout: float = START_TIMEOUT,
) -> Node:
    """Start ``dst serve PATH`` and wait for one ``listening on`` line per address."""
    cmd = [*DST, "serve", str(path), *args]
    for addr in listen:
        cmd += ["--listen", addr]
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    stdout = proc.stdout

    def reader() -> None:
        for line in stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    node = Node(proc=proc, path=path, uris=[], stderr_path=stderr_path)
    while len(node.uris) < len(listen):
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            node.stop(signal.SIGKILL)
            raise AssertionError(f"{cmd}: no 'listening on' line in {timeout}s") from None
        if line is None:
            proc.wait()
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode} before listening:\n{node.stderr()}"
            )
        node.lines.append(line)
        if line.startswith(LISTENING):
            node.uris.append(line[len(LISTENING) :])
    return node
