"""A real Prometheus server for tests: the Debian package's ``prometheus`` binary, its
configuration and database in a temporary directory, queried over its HTTP API.

Prometheus cannot listen on port 0, so a free port is picked (bound and released) and a
start that loses the race for it is retried.  Readiness is ``/-/ready``; every wait is
for a state seen through the API (polled), never a fixed sleep.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT = 30.0
WAIT = 45.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def config(targets: Sequence[str], rules: Sequence[Path] = (), interval: str = "1s") -> str:
    """A configuration scraping ``targets`` (HOST:PORT) as job ``dst``."""
    lines = [
        "global:",
        f"  scrape_interval: {interval}",
        f"  evaluation_interval: {interval}",
        "rule_files: [" + ", ".join(json.dumps(str(r)) for r in rules) + "]",
        "scrape_configs:",
        "  - job_name: dst",
        "    static_configs:",
        "      - targets: [" + ", ".join(json.dumps(t) for t in targets) + "]",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Prometheus:
    """A running Prometheus (see the module docstring)."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def api(self, path: str, **params: str) -> Any:
        """``data`` of an API call; AssertionError with Prometheus's error if it failed."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=20) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            doc = json.load(e)
        assert doc.get("status") == "success", f"{path} {params}: {doc}"
        return doc["data"]

    def query(self, expr: str, *, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (or at Unix time ``at``);
        AssertionError if it fails."""
        data = self.api("query", query=expr, **({"time": str(at)} if at is not None else {}))
        result: list[dict[str, Any]] = data["result"]
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return result

    def values(self, expr: str, *, at: float | None = None) -> list[float]:
        return [float(r["value"][1]) for r in self.query(expr, at=at)]

    def value(self, expr: str, *, at: float | None = None) -> float | None:
        """The one value of ``expr`` (None when it has no series)."""
        vals = self.values(expr, at=at)
        assert len(vals) <= 1, (expr, vals)
        return vals[0] if vals else None

    def wait(self, expr: str, cond: Callable[[float | None], bool], what: str) -> float | None:
        """Poll ``expr`` (one series) until ``cond(value)``; AssertionError after WAIT."""
        deadline = time.monotonic() + WAIT
        while True:
            v = self.value(expr)
            if cond(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {expr} = {v}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(workdir: Path, targets: Sequence[str], rules: Sequence[Path] = ()) -> Prometheus:
    """Start Prometheus scraping ``targets`` every second, with the rule files ``rules``."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "prometheus.yml"
    conf.write_text(config(targets, rules))
    for attempt in range(3):
        port = free_port()
        log = workdir / f"prometheus-{attempt}.log"
        cmd = [
            "prometheus",
            f"--config.file={conf}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        prom = Prometheus(proc, f"http://127.0.0.1:{port}", log)
        if _ready(prom):
            return prom
        prom.stop()
        if "address already in use" not in log.read_text(errors="replace"):
            break
    raise AssertionError(f"prometheus did not start:\n{log.read_text(errors='replace')}")


def _ready(prom: Prometheus) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if prom.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    return False
