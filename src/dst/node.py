"""The storage node: ``dst serve PATH`` exports one file or block device over NBD.

Theory of operation
-------------------
Options arrive as strings from the CLI and are validated here into a frozen
:class:`ServeOptions` (sizes, listen addresses), raising :class:`ConfigError` with a
message that names the bad value.  :func:`prepare_backing` then makes sure the backing
file exists with the requested size (sparse creation, extension of an empty file)
before any socket is bound.

:func:`serve` opens a :class:`dst.targets.file.FileDevice`, starts the NBD server of
:mod:`dst.net.server` on every listen address and reports each bound address through
the ``on_listen`` callback as an NBD URI (the CLI prints ``listening on URI``; tests
and the array daemon parse that line).  It returns when ``stop`` is set; the server
then refuses new requests and lets in-flight ones finish before the device closes.

:func:`run` is the process shell: one event loop (uvloop), SIGTERM/SIGINT set
``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from dst.errors import ConfigError, DstError
from dst.net.loop import run as loop_run

if TYPE_CHECKING:
    from dst.net.address import Address
    from dst.net.server import NbdServer

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:10809"
UP_IMAGE = "disk.img"

_SUFFIXES = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE_RE = re.compile(r"(\d+)\s*([KMGTPE]?)(?:I?B)?", re.IGNORECASE)
_PORT_MAX = 65535


@dataclass(frozen=True, slots=True)
class ListenAddr:
    """One address to serve on: TCP ``host``/``port`` or a unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def uri(self, export: str, *, port: int | None = None) -> str:
        """The NBD URI of ``export`` on this address (``port`` overrides 0)."""
        name = quote(export, safe="")
        if self.is_unix:
            return f"nbd+unix:///{name}?socket={quote(self.path, safe='/')}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port if port is None else port}/{name}"

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_size(text: str) -> int:
    """``"10G"`` -> 10737418240.  Binary suffixes K..E, optional ``B``/``iB``.

    Raises ConfigError for anything else, zero included.
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ConfigError(
            f"bad size {text!r}: expected a number of bytes with an optional suffix "
            "K, M, G, T (e.g. 512M, 10G)"
        )
    size = int(m.group(1)) << _SUFFIXES[m.group(2).upper()]
    if size <= 0:
        raise ConfigError(f"bad size {text!r}: must be greater than zero")
    if size > (1 << 63) - 1:
        raise ConfigError(f"bad size {text!r}: larger than 2**63-1 bytes")
    return size


def parse_listen(text: str) -> ListenAddr:
    """``host:port``, ``[v6]:port`` or ``unix:PATH`` -> ListenAddr.  Raises ConfigError."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"bad listen address {text!r}: empty unix socket path")
        return ListenAddr(path=path)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.%\w]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text)
    if m is None:
        raise ConfigError(
            f"bad listen address {text!r}: expected HOST:PORT, [IPV6]:PORT or unix:PATH"
        )
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > _PORT_MAX:
        raise ConfigError(f"bad listen address {text!r}: port must be 0..{_PORT_MAX}")
    return ListenAddr(host=host, port=port)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Everything ``dst serve`` needs, validated."""

    path: Path
    size: int | None = None
    read_only: bool = False
    name: str = ""
    description: str = ""
    listen: tuple[ListenAddr, ...] = (ListenAddr(host="127.0.0.1", port=10809),)

    @classmethod
    def from_strings(
        cls,
        *,
        path: str,
        size: str | None = None,
        read_only: bool = False,
        name: str | None = None,
        description: str | None = None,
        listen: Sequence[str] = (DEFAULT_LISTEN,),
    ) -> ServeOptions:
        """Validate command-line strings.  Raises ConfigError naming the bad value."""
        if not path:
            raise ConfigError("empty PATH")
        name = name or ""
        description = description or ""
        for what, value in (("export name", name), ("description", description)):
            if len(value.encode()) > 4096:
                raise ConfigError(f"{what} is longer than 4096 bytes")
        addrs = tuple(parse_listen(a) for a in (listen or (DEFAULT_LISTEN,)))
        seen: set[ListenAddr] = set()
        for a in addrs:
            if a in seen and (a.is_unix or a.port != 0):
                raise ConfigError(f"listen address {a} given twice")
            seen.add(a)
        return cls(
            path=Path(path),
            size=None if size is None else parse_size(size),
            read_only=read_only,
            name=name,
            description=description,
            listen=addrs,
        )


def up_options(
    *,
    directory: str,
    size: str,
    read_only: bool = False,
    name: str | None = None,
    description: str | None = None,
    listen: Sequence[str] = (DEFAULT_LISTEN,),
) -> ServeOptions:
    """Options of ``dst up``: serve DIR/disk.img, created sparse if missing."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create data directory {directory}: {e.strerror}") from e
    image = d / UP_IMAGE
    # An existing disk is served as it is, whatever --size says.
    size_arg = None if image.exists() and image.stat().st_size > 0 else size
    return ServeOptions.from_strings(
        path=str(image),
        size=size_arg,
        read_only=read_only,
        name=name,
        description=description or "dst default disk",
        listen=listen,
    )


def prepare_backing(opts: ServeOptions) -> int:
    """Make sure PATH exists with the requested size; return its size.

    A missing file is created sparse with --size; an empty regular file is extended.
    Raises ConfigError when PATH is missing without --size, is not a regular file or
    block device, or has a different size than --size.  OSError on I/O failure.
    """
    path = opts.path
    try:
        st = path.stat()
    except FileNotFoundError:
        if opts.size is None:
            raise ConfigError(f"{path}: no such file (use --size SIZE to create it)") from None
        if opts.read_only:
            raise ConfigError(f"{path}: no such file (--read-only cannot create it)") from None
        if not path.parent.is_dir():
            raise ConfigError(f"{path}: directory {path.parent} does not exist") from None
        with open(path, "xb") as f:
            f.truncate(opts.size)
        log.info("created sparse file %s of %d bytes", path, opts.size)
        return opts.size
    if stat.S_ISBLK(st.st_mode):
        actual = _block_device_size(path)
    elif stat.S_ISREG(st.st_mode):
        actual = st.st_size
        if actual == 0 and opts.size is not None and not opts.read_only:
            os.truncate(path, opts.size)
            log.info("extended empty file %s to %d bytes", path, opts.size)
            return opts.size
    else:
        raise ConfigError(f"{path}: not a regular file or block device")
    if opts.size is not None and opts.size != actual:
        raise ConfigError(
            f"{path}: exists with size {actual}, not {opts.size} (omit --size to serve it as is)"
        )
    if actual == 0:
        raise ConfigError(f"{path}: is empty (use --size SIZE to extend it)")
    return actual


def _block_device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _print_line(line: str) -> None:
    print(line, flush=True)


async def serve(
    opts: ServeOptions,
    stop: asyncio.Event,
    *,
    on_listen: Callable[[str], None] = lambda uri: _print_line(f"listening on {uri}"),
) -> None:
    """Serve PATH until ``stop`` is set, then shut down cleanly.

    Raises ConfigError for bad options, OSError when a file or socket cannot be opened
    or bound, BlockError when the device cannot be opened.
    """
    prepare_backing(opts)

    from dst.net.server import NbdServer
    from dst.targets.file import FileDevice

    # The device name is the export description (NBD_INFO_DESCRIPTION, LIST).
    device = FileDevice(
        opts.path, read_only=opts.read_only, name=opts.description or opts.path.name
    )
    await device.open()
    try:
        # "" (the default export) also reaches a named export: qemu's nbd:HOST:PORT.
        server = NbdServer({opts.name: device}, default=opts.name)
        try:
            for addr in opts.listen:
                for bound in await _listen(server, addr):
                    if bound.is_unix:
                        on_listen(addr.uri(opts.name))
                    else:
                        on_listen(ListenAddr(host=bound.host, port=bound.port).uri(opts.name))
            log.info("serving %s (%d bytes)", opts.path, device.size)
            await stop.wait()
            log.info("shutting down")
        finally:
            await server.close()
    finally:
        await device.close()


async def _listen(server: NbdServer, addr: ListenAddr) -> list[Address]:
    """Bind ``addr``; a failure names the address.  Raises DstError."""
    try:
        return await server.start(str(addr))
    except (OSError, ValueError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise DstError(f"cannot listen on {addr}: {detail}") from e


def run(opts: ServeOptions) -> int:
    """Run :func:`serve` in a fresh event loop; SIGTERM/SIGINT stop it.  Exit status 0.

    Raises what :func:`serve` raises.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(opts, stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

    loop_run(main())
    sys.stdout.flush()
    return 0
