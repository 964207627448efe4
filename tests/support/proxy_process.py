"""A :class:`~tests.support.proxy.CuttableProxy` in its own process, for tests that
drive real processes synchronously.

Run as ``python -m tests.support.proxy_process LISTEN TARGET`` (from the repository
root): it prints ``ready`` once LISTEN accepts, then reads commands from stdin, one a
line -- ``cut``, ``restore`` -- and answers each with ``ok`` once it is done.  EOF on
stdin closes the proxy and exits.  :class:`ProxyProcess` is the test side.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tests.support.proxy import CuttableProxy

ROOT = Path(__file__).resolve().parents[2]


async def serve(listen: str, target: str) -> None:
    proxy = CuttableProxy(listen, target)
    await proxy.start()
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    try:
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            if line == "cut":
                proxy.cut()
            elif line == "restore":
                proxy.restore()
            else:
                print(f"unknown command {line!r}", file=sys.stderr, flush=True)
                continue
            print("ok", flush=True)
    finally:
        await proxy.close()


class ProxyProcess:
    """The test's handle on a proxy subprocess from ``listen`` to ``target``."""

    def __init__(self, listen: Path, target: Path) -> None:
        self.listen = listen
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.proxy_process", str(listen), str(target)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self._expect("ready")

    def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != word:
            self.stop()
            raise AssertionError(f"proxy said {line!r}, expected {word!r}")

    def _command(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        self._expect("ok")

    def cut(self) -> None:
        """Drop every connection through the proxy and refuse new ones."""
        self._command("cut")

    def restore(self) -> None:
        """Let connections through again."""
        self._command("restore")

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
