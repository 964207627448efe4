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
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from dst import units
from dst.errors import ConfigError, DstError
from dst.nbd.constants import DEFAULT_PORT
from dst.net.address import DEFAULT_HOST, Address, parse_address
from dst.net.loop import run as loop_run

if TYPE_CHECKING:
    from dst.net.server import NbdServer

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:10809"


def parse_size(text: str) -> int:
    """``--size``: a :func:`dst.units.parse_size` size greater than zero.

    Raises ConfigError naming the value.
    """
    try:
        size = units.parse_size(text)
    except ConfigError as e:
        raise ConfigError(str(e), where="--size") from None
    if size == 0:
        raise ConfigError(f"not a size: {text!r} (must be greater than zero)", where="--size")
    return size


def parse_listen(text: str) -> Address:
    """``--listen``: ``host:port``, ``[v6]:port`` or ``unix:PATH``.  Raises ConfigError."""
    return parse_address(text, form="listen", where="--listen")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Everything ``dst serve`` needs, validated."""

    path: Path
    size: int | None = None
    read_only: bool = False
    name: str = ""
    description: str = ""
    listen: tuple[Address, ...] = (Address(host=DEFAULT_HOST, port=DEFAULT_PORT),)

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
        seen: set[Address] = set()
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
                    on_listen(replace(bound, export=opts.name).uri())  # real port if 0
            log.info("serving %s (%d bytes)", opts.path, device.size)
            await stop.wait()
            log.info("shutting down")
        finally:
            await server.close()
    finally:
        await device.close()


async def _listen(server: NbdServer, addr: Address) -> list[Address]:
    """Bind ``addr``; a failure names the address.  Raises DstError."""
    try:
        return await server.start(addr)
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
