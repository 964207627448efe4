"""Data checks for arrays: fill and read back through NBD, placement on the members,
mirror member data and bitmaps, ext4 on nbdfuse.

Data checks compare whole images byte for byte (sha256 for the round trip, slices for
the placement on the members); the processes come from :mod:`tests.support.cluster`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.support.cluster import run, wait_until

MiB = 1 << 20


# -- data -------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_size(uri: str) -> int:
    """The size nbdinfo reports for ``uri``."""
    return int(run(["nbdinfo", "--size", uri]).stdout)


def fill(uri: str, tmp: Path, size: int, *, name: str = "base.bin") -> bytearray:
    """nbdcopy ``size`` random bytes (kept in ``tmp/name``) onto ``uri``; the data."""
    data = bytearray(os.urandom(size))
    (tmp / name).write_bytes(data)
    run(["nbdcopy", "--flush", tmp / name, uri])
    return data


def read_all(uri: str, tmp: Path) -> bytes:
    """Everything ``uri`` holds, read with nbdcopy."""
    run(["nbdcopy", uri, tmp / "out.bin"])
    return (tmp / "out.bin").read_bytes()


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
