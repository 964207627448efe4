"""Array test machinery: a ``dst daemon`` process, spec files, data checks, ext4 on nbdfuse.

The daemon prints ``control socket PATH`` once its socket accepts; that line is the
readiness signal.  Spec files are written as TOML into the test's directory.  Data
checks compare whole files byte for byte (sha256 for the round trip, slices for the
placement on the members).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .helpers import DST, run

MiB = 1 << 20
READY = "control socket "
DEADLINE = 30.0


def wait_until(cond: Callable[[], bool], what: str, *, timeout: float = DEADLINE) -> None:
    """Poll ``cond`` until it holds; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def accepts(path: Path) -> bool:
    """True when a unix socket at ``path`` accepts a connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def unix_uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


@dataclass
class Daemon:
    """A running ``dst daemon --control PATH`` process."""

    proc: subprocess.Popen[str]
    control: Path
    stderr_path: Path

    def dst(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``dst ARGS --control PATH``."""
        return run([*DST, *args, "--control", str(self.control)], check=check, timeout=60)

    def status(self, name: str | None = None) -> dict[str, Any]:
        import json

        out = self.dst("status", *([name] if name else []), "--json").stdout
        result: dict[str, Any] = json.loads(out)
        return result

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"dst daemon did not stop\n{self.stderr()}") from None
        return self.proc.returncode


def start_daemon(control: Path, stderr_path: Path, specs: Sequence[Path] = ()) -> Daemon:
    """Start ``dst daemon`` and wait for its readiness line."""
    cmd = [*DST, "daemon", "--control", str(control), *map(str, specs)]
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    daemon = Daemon(proc, control, stderr_path)
    line = proc.stdout.readline()  # the process prints it, or exits (EOF)
    if not line.startswith(READY):
        daemon.stop()
        raise AssertionError(f"dst daemon did not start: {line!r}\n{daemon.stderr()}")
    return daemon


# -- specs --------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_spec(path: Path, name: str, listen: Sequence[str], target: dict[str, Any]) -> Path:
    """Write an array spec: ``[array]`` then the target as one inline table."""
    lines = [
        "[array]",
        f"name = {toml_value(name)}",
        f"listen = {toml_value(list(listen))}",
        f"target = {toml_value(target)}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def remote(name: str, uri: str, **extra: Any) -> dict[str, Any]:
    return {"type": "remote", "name": name, "uri": uri, **extra}


def file_member(name: str, path: Path, size: int, **extra: Any) -> dict[str, Any]:
    return {"type": "file", "name": name, "path": str(path), "size": size, **extra}


# -- data -------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_size(uri: str) -> int:
    """The size nbdinfo reports for ``uri``."""
    return int(run(["nbdinfo", "--size", uri]).stdout)


def copy_in_out(uri: str, tmp: Path, size: int | None = None) -> bytes:
    """nbdcopy random data into ``uri`` and back out; assert equal; return the data.

    ``size`` defaults to the export's whole size (a mirror keeps its metadata at the
    end of each member, so it is smaller than its members)."""
    data = os.urandom(export_size(uri) if size is None else size)
    src, out = tmp / "in.bin", tmp / "out.bin"
    src.write_bytes(data)
    run(["nbdcopy", "--flush", src, uri])
    run(["nbdcopy", uri, out])
    assert sha256(out.read_bytes()) == sha256(data), "data read back differs"
    return data


def destripe(members: Sequence[bytes], chunk: int, size: int) -> bytes:
    """The array image a stripe of ``members`` holds: chunk i at member i % n."""
    n = len(members)
    parts = []
    for i in range(size // chunk):
        off = (i // n) * chunk
        parts.append(members[i % n][off : off + chunk])
    return b"".join(parts)


# -- mirror members -------------------------------------------------------------------


def member_data(path: Path, region_size: int = 64 << 10) -> bytes:
    """The data area of the mirror member file at ``path`` (metadata sits at its end)."""
    from dst.meta.layout import layout_for

    size = layout_for(path.stat().st_size, region_size).data_size
    with open(path, "rb") as f:
        return f.read(size)


def dirty_regions(path: Path) -> int:
    """Bits set in the write-intent bitmap of the mirror member file at ``path``."""
    import asyncio

    from dst.meta.store import MetaStore
    from dst.targets.file import FileDevice

    async def count() -> int:
        dev = FileDevice(path, read_only=True)
        await dev.open()
        try:
            store = MetaStore(dev)
            await store.load()
            return (await store.read_bitmap()).count()
        finally:
            await dev.close()

    return asyncio.run(count())


# -- ext4 on nbdfuse --------------------------------------------------------------------


def ext4_on_nbdfuse(uri: str, tmp: Path) -> dict[str, str]:
    """mkfs.ext4 on nbdfuse's file for ``uri``, loop-mount, write files, umount,
    e2fsck -fn clean, remount read-only and compare.  Returns {name: sha256}."""
    fuse_dir, fs_dir, pidfile = tmp / "fuse", tmp / "fs", tmp / "nbdfuse.pid"
    fuse_dir.mkdir()
    fs_dir.mkdir()
    image = fuse_dir / "disk"
    fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(image), uri])
    mounted = False
    digests: dict[str, str] = {}
    try:

        def ready() -> bool:
            assert fuse.poll() is None, f"nbdfuse exited {fuse.returncode}"
            return pidfile.exists()

        wait_until(ready, "nbdfuse")
        run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", image])
        run(["mount", "-o", "loop", image, fs_dir])
        mounted = True
        for i in range(4):
            data = os.urandom((i + 1) * 500_003)
            (fs_dir / f"f{i}").write_bytes(data)
            digests[f"f{i}"] = sha256(data)
        (fs_dir / "dir").mkdir()
        (fs_dir / "dir" / "small").write_text("hello from a dst array\n")
        digests["dir/small"] = sha256(b"hello from a dst array\n")
        run(["umount", fs_dir])
        mounted = False
        run(["e2fsck", "-fn", image])
        run(["mount", "-o", "loop,ro", image, fs_dir])
        mounted = True
        for name, digest in digests.items():
            assert sha256((fs_dir / name).read_bytes()) == digest, name
        run(["umount", fs_dir])
        mounted = False
    finally:
        if mounted:
            run(["umount", "-l", fs_dir], check=False)
        run(["fusermount3", "-u", fuse_dir], check=False)
        try:
            fuse.wait(timeout=20)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
    return digests


def check_ext4_image(path: Path, digests: dict[str, str], tmp: Path) -> None:
    """``path`` (a member file) is a clean ext4 holding the files of ``digests``."""
    run(["e2fsck", "-fn", path])
    for i, (name, digest) in enumerate(digests.items()):
        out = tmp / f"dump{i}"
        run(["debugfs", "-R", f"dump /{name} {out}", path])
        assert sha256(out.read_bytes()) == digest, name
