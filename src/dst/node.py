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
and the array daemon parse that line; ``nbds://`` when TLS is required).  It returns
when ``stop`` is set; the server then refuses new requests and lets in-flight ones
finish before the device closes.

Security (:mod:`dst.net.tls`, :mod:`dst.net.acl`): ``--tls off|on|require`` with
``--tls-certificates DIR`` (nbdkit's layout), ``--tls-verify-peer``, ``--tls-psk FILE``
and ``--acl FILE``.  Certificates or a PSK without ``--tls`` mean ``require``; with
neither, plaintext is allowed on loopback and unix sockets only -- a listener on
another address needs TLS or an explicit ``--tls off``.

Metrics (``--metrics ADDR``, :mod:`dst.net.metricsserver`): the file is served as a
:class:`~dst.targets.meteredfile.MeteredFile`, which counts and times its requests,
and ``metrics on URL`` is printed after the ``listening on`` lines.

:func:`run` is the process shell: one event loop (uvloop), SIGTERM/SIGINT set
``stop``, SIGHUP re-reads the ACL file and the TLS credentials.
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
from typing import TYPE_CHECKING, Any

from dst import stats, units
from dst.errors import ConfigError, DstError
from dst.nbd.constants import DEFAULT_PORT
from dst.nbd.server import TlsMode
from dst.net.address import DEFAULT_HOST, Address, parse_address
from dst.net.loop import run as loop_run
from dst.net.metricsserver import MetricsOptions, metrics_options
from dst.net.tls import ServerTlsConfig, check_exposure, parse_mode

if TYPE_CHECKING:
    from dst.net.metricsserver import MetricsServer
    from dst.net.server import NbdServer
    from dst.targets.meteredfile import MeteredFile

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:10809"
NO_TLS = ServerTlsConfig()


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
    tls: ServerTlsConfig = NO_TLS
    acl: Path | None = None
    metrics: MetricsOptions | None = None

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
        tls: str | None = None,
        tls_certificates: str | None = None,
        tls_verify_peer: bool = False,
        tls_psk: str | None = None,
        acl: str | None = None,
        metrics: str | None = None,
        metrics_tls: str | None = None,
        metrics_acl: str | None = None,
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
        tls_config = server_tls_config(
            addrs,
            mode=tls,
            certificates=tls_certificates,
            verify_peer=tls_verify_peer,
            psk=tls_psk,
        )
        return cls(
            path=Path(path),
            size=None if size is None else parse_size(size),
            read_only=read_only,
            name=name,
            description=description,
            listen=addrs,
            tls=tls_config,
            acl=Path(acl) if acl else None,
            metrics=metrics_options(metrics, tls=metrics_tls, acl=metrics_acl),
        )


def server_tls_config(
    listen: Sequence[Address],
    *,
    mode: str | None,
    certificates: str | None,
    verify_peer: bool,
    psk: str | None,
) -> ServerTlsConfig:
    """The ``--tls*`` options, validated (see module docstring).  Raises ConfigError."""
    chosen = parse_mode(mode) if mode is not None else None
    if chosen is None and (certificates or psk):
        chosen = TlsMode.REQUIRE
    config = ServerTlsConfig(
        mode=check_exposure(listen, chosen, where="--listen"),
        certificates=Path(certificates) if certificates else None,
        verify_peer=verify_peer,
        psk_file=Path(psk) if psk else None,
    )
    config.check(where="--tls")
    return config


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


def security(opts: ServeOptions) -> dict[str, Any]:
    """The NbdServer keyword arguments for TLS and the ACL.  Raises ConfigError."""
    from dst.net.tls import server_security

    return server_security(opts.tls, opts.acl, where="--acl")


async def serve(
    opts: ServeOptions,
    stop: asyncio.Event,
    *,
    on_listen: Callable[[str], None] = lambda uri: _print_line(f"listening on {uri}"),
    on_server: Callable[[NbdServer], None] | None = None,
    on_metrics: Callable[[str], None] = lambda url: _print_line(f"metrics on {url}"),
) -> None:
    """Serve PATH until ``stop`` is set, then shut down cleanly.  ``on_server`` gets
    the server once it listens (the process shell hooks SIGHUP onto it), ``on_metrics``
    the metrics URL (with ``--metrics``).

    Raises ConfigError for bad options, OSError when a file or socket cannot be opened
    or bound, BlockError when the device cannot be opened.
    """
    secure = security(opts)  # bad credentials or ACL: fail before touching the file
    prepare_backing(opts)

    from dst.net.server import NbdServer
    from dst.targets.file import FileDevice
    from dst.targets.meteredfile import MeteredFile

    if opts.metrics is not None:
        stats.enable()
    # The device name is the export description (NBD_INFO_DESCRIPTION, LIST).
    kind = FileDevice if opts.metrics is None else MeteredFile  # counted and timed
    device = kind(opts.path, read_only=opts.read_only, name=opts.description or opts.path.name)
    await device.open()
    try:
        # "" (the default export) also reaches a named export: qemu's nbd:HOST:PORT.
        server = NbdServer({opts.name: device}, default=opts.name, **secure)
        tls = opts.tls.mode is TlsMode.REQUIRE
        metrics = None
        if isinstance(device, MeteredFile) and opts.metrics is not None:
            metrics = _metrics(opts.name or device.name, server, device, opts.metrics)
        try:
            for addr in opts.listen:
                for bound in await _listen(server, addr):
                    on_listen(replace(bound, export=opts.name, tls=tls).uri())  # real port
            if metrics is not None:
                on_metrics(await metrics.start())
            if on_server is not None:
                on_server(server)
            log.info("serving %s (%d bytes)", opts.path, device.size)
            await stop.wait()
            log.info("shutting down")
        finally:
            if metrics is not None:
                await metrics.close()
            await server.close()
    finally:
        await device.close()


def _metrics(
    name: str, server: NbdServer, device: MeteredFile, opts: MetricsOptions
) -> MetricsServer:
    from dst.net.metrics import node_collector, registry
    from dst.net.metricsserver import MetricsServer

    def inflight() -> int:
        return sum(conn.inflight for conn in server.connections)

    return MetricsServer(registry(node_collector(name, server, device.counters, inflight)), opts)


async def _listen(server: NbdServer, addr: Address) -> list[Address]:
    """Bind ``addr``; a failure names the address.  Raises DstError."""
    try:
        return await server.start(addr)
    except (OSError, ValueError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise DstError(f"cannot listen on {addr}: {detail}") from e


def reload(server: NbdServer) -> None:
    """SIGHUP: re-read the ACL file and TLS credentials; a bad file is logged and the
    settings in force stay."""
    try:
        done = server.reload()
    except ConfigError as e:
        log.error("reload failed, keeping the settings in force: %s", e)
        return
    log.warning("reloaded: %s", ", ".join(f"{k} {v}" for k, v in done.items()) or "nothing")


def run(opts: ServeOptions) -> int:
    """Run :func:`serve` in a fresh event loop; SIGTERM/SIGINT stop it.  Exit status 0.

    Raises what :func:`serve` raises.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def on_server(server: NbdServer) -> None:
            loop.add_signal_handler(signal.SIGHUP, reload, server)

        try:
            await serve(opts, stop, on_server=on_server)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

    loop_run(main())
    sys.stdout.flush()
    return 0
