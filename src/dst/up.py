"""``dst up``: the embedded default — a local demo cluster in one command.

Theory of operation
-------------------
With no spec, :func:`up` makes a data directory with two sparse member files, starts
two ``dst serve`` storage nodes as separate processes on loopback (port 0; each
prints its URI), and runs the array daemon in this process with a mirror over the
two nodes, exported on ``DATA/dst.sock`` and ``127.0.0.1:10809``.  The member files
are ``--size`` plus room for the mirror's metadata (superblocks and write-intent
bitmap) at their end, so the device has exactly ``--size`` bytes.

On an existing data directory the member files are reused as they are (``--size``
is ignored): the mirror is assembled from the superblocks on its members, whatever
ports the nodes got this time, and after a crash only the regions marked dirty in
the bitmap are resynced.  With ``--config``
it runs that spec instead and starts no nodes.  It prints how to use the device,
then shows live status until SIGINT/SIGTERM, and stops in order: array (in-flight
requests finish, legs flushed), then nodes (SIGTERM, which they answer with a clean
shutdown).  If ``dst up`` itself is killed, the nodes get SIGTERM from the kernel
(``PR_SET_PDEATHSIG``) instead of lingering.

With ``--tls`` both hops run TLS with verified peers: ``DATA/pki`` gets a CA and
certificates (:mod:`dst.certs`; kept and reused) for ``node-a``, ``node-b``, ``array``
and ``user``.  The nodes require TLS, verify client certificates and admit only
``CN=array`` (an ACL); the array connects to them as ``nbds://`` with its own
certificate, and requires TLS with a verified client certificate on its exports --
``DATA/pki/user`` is the one to give clients (the printed URIs say so).

With ``--metrics HOST:PORT`` the daemon serves Prometheus metrics there and the nodes
on ``PORT+1`` and ``PORT+2`` (with port 0, free ports), so one scrape configuration
(``monitoring/prometheus.yml``) finds all three; the URLs are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from dst.array.daemon import Daemon
from dst.array.spec import ArraySpec, MirrorSpec, RemoteSpec
from dst.errors import ControlError, DstError
from dst.meta.layout import member_size_for
from dst.nbd.server import TlsMode
from dst.net.address import Address, parse_address
from dst.net.metricsserver import MetricsOptions
from dst.net.tls import ServerTlsConfig
from dst.units import format_size, parse_size

NODE_START_TIMEOUT = 20.0
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


@dataclass(frozen=True, slots=True)
class UpOptions:
    data_dir: Path
    size: int
    listen: tuple[Address, ...]
    control: str
    config: str | None = None
    live: bool = True
    tls: bool = False
    metrics: MetricsOptions | None = None

    @property
    def pki(self) -> Path:
        return self.data_dir / "pki"


def options(
    *,
    data_dir: str,
    size: str,
    listen: list[str] | None,
    control: str,
    config: str | None,
    tls: bool = False,
    metrics: MetricsOptions | None = None,
) -> UpOptions:
    addrs = listen or [f"unix:{Path(data_dir).absolute() / 'dst.sock'}", "127.0.0.1:10809"]
    return UpOptions(
        data_dir=Path(data_dir).absolute(),
        size=parse_size(size),
        listen=tuple(parse_address(a, form="listen", where="--listen") for a in addrs),
        control=control,
        config=config,
        live=sys.stdout.isatty(),
        tls=tls,
        metrics=metrics,
    )


TLS_NAMES = ("node-a", "node-b", "array", "user")


def make_pki(opts: UpOptions) -> None:
    """The CA and certificates of the demo (existing ones are kept), and the nodes' ACL:
    only the array's certificate may connect to them."""
    from dst import certs

    ca, created = certs.load_or_create_authority(opts.pki)
    for name in TLS_NAMES:
        if not (opts.pki / name).exists():
            certs.write_identity(opts.pki, ca, name)
    acl = opts.pki / "nodes.acl"
    if not acl.exists():
        acl.write_text('allow dn="CN=array,O=dst"\n')
    if created:
        print(f"made a CA and certificates in {opts.pki}", flush=True)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, however it dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Node:
    """A ``dst serve`` child process."""

    def __init__(self, name: str, path: Path, size: int, *, args: tuple[str, ...] = ()) -> None:
        self.name, self.path, self.size = name, path, size
        self.args = args  # more dst serve options (TLS)
        self.proc: asyncio.subprocess.Process | None = None
        self.uri = ""
        self.metrics = ""  # its metrics URL (with --metrics)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dst", "serve", str(self.path),
            "--size", str(self.size), "--name", self.name, "--listen", "127.0.0.1:0",
            *self.args,
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us: we stop the array, then nodes
            preexec_fn=_die_with_parent,  # ... and if we are killed, the nodes stop too
        )  # fmt: skip
        assert self.proc.stdout is not None
        text = await self._line()
        if not text.startswith("listening on "):
            await self.stop()
            raise DstError(f"node {self.name} ({self.path}) did not start")
        self.uri = text.removeprefix("listening on ")
        if "--metrics" in self.args:
            text = await self._line()
            if not text.startswith("metrics on "):
                await self.stop()
                raise DstError(f"node {self.name} did not serve metrics")
            self.metrics = text.removeprefix("metrics on ")

    async def _line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), NODE_START_TIMEOUT)
        except TimeoutError:
            line = b""
        return line.decode(errors="replace").strip()

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def demo_nodes(opts: UpOptions) -> list[Node]:
    """The two demo nodes: existing member files are reused, new ones sized for
    ``opts.size`` bytes of data plus the mirror's metadata."""
    member = member_size_for(opts.size)
    nodes: list[Node] = []
    for c in "ab":
        path = opts.data_dir / f"node-{c}.img"
        size = path.stat().st_size if path.exists() else member
        if path.exists():
            print(f"reusing {path} ({format_size(size)})", flush=True)
        name = f"node-{c}"
        args: tuple[str, ...] = ()
        if opts.tls:
            args = ("--tls", "require", "--tls-certificates", str(opts.pki / name))
            args += ("--tls-verify-peer", "--acl", str(opts.pki / "nodes.acl"))
        m = opts.metrics
        if m is not None:
            port = m.address.port + 1 + len(nodes) if m.address.port else 0
            args += ("--metrics", str(m.with_port(port).address))
            args += ("--metrics-tls", str(m.tls) if m.tls else "off")
            args += ("--metrics-acl", str(m.acl)) if m.acl else ()
        nodes.append(Node(name, path, size, args=args))
    return nodes


def demo_spec(nodes: list[Node], listen: tuple[Address, ...], *, pki: Path | None) -> ArraySpec:
    """The mirror over ``nodes``; with ``pki`` TLS on both hops (see module docstring)."""
    legs = []
    for n in nodes:
        uri = parse_address(n.uri, form="uri", where=n.name)
        if pki is not None:
            uri = replace(uri, tls_params=(("tls-certificates", str(pki / "array")),))
        legs.append(RemoteSpec(name=n.name, uri=uri))
    tls = None
    if pki is not None:
        tls = ServerTlsConfig(TlsMode.REQUIRE, certificates=pki / "array", verify_peer=True)
    return ArraySpec(
        name="demo",
        target=MirrorSpec(name="mirror", members=tuple(legs)),
        listen=listen,
        export=None,
        tls=tls,
    )


def _dst_command() -> str:
    """How a shell runs this installation of dst: ``dst`` if that is what PATH finds,
    else its full path (e.g. in a virtualenv that is not activated)."""
    here = Path(sys.executable).parent / "dst"
    found = shutil.which("dst")
    if found is not None and Path(found).resolve() == here.resolve():
        return "dst"
    return str(here) if here.exists() else f"{sys.executable} -m dst"


def usage(exports: list[str], control: str, *, pki: Path | None = None) -> str:
    """How to use the running array: the commands shown once it is up, only those that
    fit its exports (no TCP hints without a TCP export; with ``pki``, the user's TLS
    certificate in every one)."""
    if pki is not None:  # clients need the user's certificate
        u = pki / "user"
        exports = [f"{e}{'&' if '?' in e else '?'}tls-certificates={u}" for e in exports]
    tcp = next((e for e in exports if "+unix" not in e), None)
    unix = next((e for e in exports if "+unix" in e), None)
    any_uri = unix or tcp or ""
    where = "\n  ".join(exports)
    lines = [
        f"  nbdinfo '{any_uri}'",
        f"  nbdcopy disk.raw '{tcp or any_uri}'                # write an image onto it",
        f"  mkdir -p /mnt/dst /mnt/disk && nbdfuse /mnt/dst '{any_uri}' &",
        "      mkfs.ext4 /mnt/dst/nbd && mount -o loop /mnt/dst/nbd /mnt/disk",
    ]
    if tcp is not None:
        addr = parse_address(tcp)
        name = f" -N {addr.export}" if addr.export else ""
        if pki is None:
            lines.append(f"  qemu-system-x86_64 -drive file={tcp},format=raw ...")
            lines.append(
                f"  nbd-client {addr.host} {addr.port}{name} /dev/nbd0"
                "     # with the kernel's nbd module"
            )
        else:
            lines.append(
                f"  qemu-system-x86_64 -object tls-creds-x509,id=tls0,dir={u},endpoint=client "
                f"-drive driver=nbd,host={addr.host},port={addr.port},tls-creds=tls0 ..."
            )
            lines.append(
                f"  nbd-client -cacertfile {u}/ca-cert.pem -certfile {u}/client-cert.pem "
                f"-keyfile {u}/client-key.pem {addr.host} {addr.port}{name} /dev/nbd0"
            )
    lines.append(f"  DST_CONTROL={control} {_dst_command()} status")
    body = "\n".join(lines)
    return f"""\
dst is up: the array is exported at
  {where}

Use it:
{body}
Ctrl-C stops the array, then the nodes.
"""


async def up(opts: UpOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    Path(opts.control).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    nodes: list[Node] = []
    daemon = Daemon(opts.control, metrics=opts.metrics)
    try:
        if opts.config is not None:
            from dst.array.specfile import load_spec

            spec = load_spec(opts.config)
        else:
            if opts.tls:
                make_pki(opts)
            nodes = demo_nodes(opts)
            for n in nodes:
                await n.start()
            spec = demo_spec(nodes, opts.listen, pki=opts.pki if opts.tls else None)
        await daemon.start()
        from dst.admin import reload_logged

        loop.add_signal_handler(signal.SIGHUP, reload_logged, daemon)
        try:
            array = await daemon.create(spec)
        except ControlError as exc:
            if opts.config is not None or exc.code != "refused":
                raise
            raise DstError(
                f"{exc}\n{opts.data_dir} holds the members dst up started last time "
                "(node-a.img, node-b.img); after dst replace, add or remove the array's "
                "members are others: start it from them with dst daemon and dst assemble "
                "MEMBER..., or give dst up another --dir for a new cluster"
            ) from None
        pki = opts.pki if opts.tls and opts.config is None else None
        if daemon.metrics is not None:
            urls = [f"metrics on {daemon.metrics.url} (array daemon)"]
            urls += [f"metrics on {n.metrics} ({n.name})" for n in nodes]
            print("\n".join(urls), flush=True)
        print(usage(array.exports, opts.control, pki=pki), flush=True)
        await _show(daemon, stop, live=opts.live)
    finally:
        await daemon.close()
        for n in nodes:
            await n.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    print("dst stopped", flush=True)
    return 0


async def _show(daemon: Daemon, stop: asyncio.Event, *, live: bool) -> None:
    from rich.console import Console

    from dst.view import render_status

    console = Console()
    if not live:
        console.print(render_status(daemon.status()))
        await stop.wait()
        return
    from rich.live import Live

    with Live(render_status(daemon.status()), console=console, auto_refresh=False) as view:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            view.update(render_status(daemon.status()), refresh=True)


def run(opts: UpOptions) -> int:
    from dst.net.loop import run as loop_run

    if opts.config is None:
        print(f"data in {opts.data_dir} ({format_size(opts.size)} mirrored)", flush=True)
    return loop_run(up(opts))
