"""Tools for integration tests: third-party tools required, nbdsh scripts, checksums.

Processes (nodes, daemons, other servers) are started by the harness,
:mod:`tests.support.cluster`.  Third-party tools missing from the machine skip the
test, unless ``DST_REQUIRE_TOOLS=1`` (set by scripts/test and CI), where they fail it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.support.cluster import nbd_python, run


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
