"""The harness for real processes: ``dst serve`` nodes, ``dst daemon``, other NBD servers.

Theory of operation
-------------------
One module starts, waits for and stops processes for both tests/integration (through
pytest fixtures) and every ``bench/*.py`` script (which put the repository root on
``sys.path`` and import ``tests.support.cluster``).  It imports neither pytest nor dst:
the processes are the product under test, started as ``python -m dst``.

Readiness is a line each dst process prints, never a sleep: ``dst serve`` prints one
``listening on URI`` per address once it accepts connections; ``dst daemon`` prints
``control socket PATH`` once its control socket accepts and the arrays of the spec
files it was given run.  A third-party server (nbdkit, qemu-nbd, a bench helper) is
ready when its unix socket accepts.  A process that exits before it is ready is
reported with its stderr.

Stopping is SIGTERM and a bounded wait (a process that does not exit in time is killed
and reported).  Every process's stderr goes to a file in the work directory.
:meth:`Cluster.close` stops the daemons first (their arrays flush to the nodes), then
everything else in reverse start order, and raises AssertionError naming each process
that did not stop cleanly: an exit status other than 0 (unless the test or benchmark
killed it on purpose with SIGKILL) or a Python traceback on stderr.

:class:`Cluster` names everything after the node or array: node ``n0`` serves
``WORK/n0.img`` on ``unix:SOCKETS/n0.sock`` (restarting it reuses both), array ``a``
gets ``WORK/a.toml`` and is exported on ``unix:SOCKETS/a.sock``.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

DST = [sys.executable, "-m", "dst"]
LISTENING = "listening on "
READY = "control socket "
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
DEADLINE = 30.0


# -- small tools ---------------------------------------------------------------------


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


def accepts_tcp(host: str, port: int) -> bool:
    """True when ``host:port`` accepts a TCP connection."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for a server that cannot be given port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
    return port


def unix_uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


@functools.cache
def nbd_python() -> str:
    """A Python that can ``import nbd`` (python3-libnbd; nbdsh is ``python3 -m nbd``),
    or "" when there is none."""
    for py in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if py and subprocess.run([py, "-c", "import nbd"], capture_output=True).returncode == 0:
            return py
    return ""


# -- processes -----------------------------------------------------------------------


class Process:
    """A child process whose stderr goes to ``stderr_path`` and whose stdout lines are
    read by a thread (so a chatty process never blocks on a full pipe)."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        stderr_path: Path,
        *,
        python: bool = True,
        check_exit: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name, self.cmd, self.stderr_path = name, list(cmd), stderr_path
        self.python = python  # a traceback on stderr is a failure
        self.check_exit = check_exit  # exit status 0 is required when stopped by us
        self.killed = False  # SIGKILLed on purpose: any exit status is fine
        self.lines: list[str] = []
        with open(stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                env={**os.environ, **env} if env else None,
            )
        self._queue: queue.Queue[str | None] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None

        def reader() -> None:
            for line in stdout:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        threading.Thread(target=reader, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def next_line(self, timeout: float) -> str | None:
        """The next stdout line (None: stdout closed).  AssertionError after ``timeout``."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no output in {timeout:g} s") from None
        if line is not None:
            self.lines.append(line)
        return line

    def started_or_fail(self, what: str) -> NoReturn:
        """Called when the process ended before it was ready: stop and report it."""
        rc = self.proc.wait()
        raise AssertionError(f"{' '.join(self.cmd)} exited {rc} before {what}:\n{self.stderr()}")

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` and wait; a process that does not exit in time is killed and
        reported (AssertionError).  Returns the exit status (``-N``: killed by signal N)."""
        if self.proc.poll() is None:
            self.killed = self.killed or sig == signal.SIGKILL
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"{self.name} did not stop on signal {sig} in {timeout:g} s\n{self.stderr()}"
                ) from None
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL (a crash, on purpose); the exit status is not checked at close."""
        return self.stop(signal.SIGKILL)

    def problems(self) -> list[str]:
        """Why this (stopped) process did not end cleanly; empty when it did."""
        out = []
        rc = self.proc.poll()
        if rc is None:
            out.append(f"{self.name}: still running")
        elif rc != 0 and self.check_exit and not self.killed:
            out.append(f"{self.name}: exit status {rc}")
        if self.python and "Traceback" in self.stderr():
            out.append(f"{self.name}: traceback on stderr")
        if out:
            out.append(f"--- {self.name} stderr ({self.stderr_path})\n{self.stderr()[-4000:]}")
        return out


class Node(Process):
    """A ``dst serve PATH`` process; ``uris`` in the order of its ``--listen`` options."""

    def __init__(self, name: str, cmd: Sequence[str], stderr_path: Path, path: Path) -> None:
        super().__init__(name, cmd, stderr_path)
        self.path = path
        self.uris: list[str] = []

    @property
    def uri(self) -> str:
        return self.uris[0]


class Daemon(Process):
    """A ``dst daemon --control PATH`` process."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        stderr_path: Path,
        control: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, cmd, stderr_path, env=env)
        self.control = control

    def dst(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``dst ARGS --control PATH`` (AssertionError on failure with ``check``)."""
        return run([*DST, *args, "--control", str(self.control)], check=check, timeout=60)

    def status(self, name: str | None = None) -> dict[str, Any]:
        """``dst status [NAME] --json``."""
        out = self.dst("status", *([name] if name else []), "--json").stdout
        result: dict[str, Any] = json.loads(out)
        return result


class Server(Process):
    """Any NBD server (nbdkit, qemu-nbd, a bench helper) on a unix socket ``sock`` or
    on TCP port ``port`` of 127.0.0.1."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        stderr_path: Path,
        sock: Path | None,
        *,
        port: int | None = None,
        python: bool,
        check_exit: bool,
        export: str = "",
    ) -> None:
        super().__init__(name, cmd, stderr_path, python=python, check_exit=check_exit)
        self.sock, self.port = sock, port
        self.uri = unix_uri(sock, export) if sock else f"nbd://127.0.0.1:{port}/{export}"

    def ready(self) -> bool:
        if self.sock is not None:
            return accepts(self.sock)
        assert self.port is not None
        return accepts_tcp("127.0.0.1", self.port)


def start_node(
    path: Path,
    *,
    listen: Sequence[str],
    args: Sequence[str] = (),
    stderr_path: Path,
    name: str | None = None,
    timeout: float = START_TIMEOUT,
    wrapper: Sequence[str] = (),
) -> Node:
    """Start ``dst serve PATH ARGS`` (under the command ``wrapper``, e.g. valgrind) and
    wait for one ``listening on`` line per address."""
    cmd = [*wrapper, *DST, "serve", str(path), *args]
    for addr in listen:
        cmd += ["--listen", addr]
    node = Node(name or path.stem, cmd, stderr_path, path)
    while len(node.uris) < len(listen):
        try:
            line = node.next_line(timeout)
        except AssertionError:
            node.stop(signal.SIGKILL)
            raise
        if line is None:
            node.started_or_fail("listening")
        elif line.startswith(LISTENING):
            node.uris.append(line[len(LISTENING) :])
    return node


def start_daemon(
    control: Path,
    stderr_path: Path,
    specs: Sequence[Path] = (),
    *,
    name: str = "daemon",
    env: Mapping[str, str] | None = None,
    options: Sequence[str] = (),
    args: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
    wrapper: Sequence[str] = (),
) -> Daemon:
    """Start ``dst OPTIONS daemon --control CONTROL ARGS SPECS`` (``env``: extra
    environment, e.g. PYTHONPATH for another checkout's dst; ``wrapper``: a command to
    run it under, e.g. valgrind) and wait for its readiness line."""
    cmd = [*wrapper, *DST, *options, "daemon", "--control", str(control), *args]
    cmd += map(str, specs)
    daemon = Daemon(name, cmd, stderr_path, control, env)
    try:
        line = daemon.next_line(timeout)
    except AssertionError:
        daemon.stop(signal.SIGKILL)
        raise
    if line is None:
        daemon.started_or_fail("it was ready")
    elif not line.startswith(READY):
        daemon.stop()
        raise AssertionError(f"dst daemon said {line!r}, not {READY!r}:\n{daemon.stderr()}")
    return daemon


def start_server(
    cmd: Sequence[str],
    sock: Path | None,
    stderr_path: Path,
    *,
    name: str,
    port: int | None = None,
    export: str = "",
    python: bool = False,
    check_exit: bool = True,
    timeout: float = START_TIMEOUT,
) -> Server:
    """Start ``cmd`` and wait until its unix socket ``sock`` (or, without one, TCP
    port ``port`` of 127.0.0.1) accepts."""
    if sock is not None:
        sock.unlink(missing_ok=True)
    server = Server(
        name, cmd, stderr_path, sock, port=port, python=python, check_exit=check_exit,
        export=export,
    )  # fmt: skip
    where = sock or f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not server.ready():
        if not server.alive():
            server.started_or_fail(f"{where} accepted")
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise AssertionError(f"{name}: {where} not accepting after {timeout:g} s")
        time.sleep(0.02)
    return server


# -- specs ---------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    """``v`` as a TOML value (inline tables for dicts)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_spec(
    path: Path, name: str, listen: Sequence[str], target: dict[str, Any], **array: Any
) -> Path:
    """Write an array spec: ``[array]`` with ``array`` keys, the target as one inline table."""
    lines = ["[array]", f"name = {toml_value(name)}", f"listen = {toml_value(list(listen))}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in array.items()]
    lines.append(f"target = {toml_value(target)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def remote(name: str, uri: str, **extra: Any) -> dict[str, Any]:
    return {"type": "remote", "name": name, "uri": uri, **extra}


def file_member(name: str, path: Path, size: int, **extra: Any) -> dict[str, Any]:
    return {"type": "file", "name": name, "path": str(path), "size": size, **extra}


# -- a cluster -----------------------------------------------------------------------


class Cluster:
    """The nodes, daemons and other servers of one test or benchmark run.

    Files go to ``work``; unix sockets to ``sockets`` (default ``work``; keep it short,
    a socket path is limited to 107 bytes).  Use as a context manager, or call
    :meth:`close`.
    """

    def __init__(self, work: Path, sockets: Path | None = None) -> None:
        self.work, self.sockets = work, sockets or work
        self.nodes: dict[str, Node] = {}
        self.daemons: list[Daemon] = []
        self.processes: list[Process] = []  # everything started, in order

    def _stderr(self, name: str) -> Path:
        """``WORK/NAME.stderr``, or ``NAME.K.stderr`` for the K-th restart."""
        path, k = self.work / f"{name}.stderr", 1
        while path.exists():
            k += 1
            path = self.work / f"{name}.{k}.stderr"
        return path

    def node(
        self,
        name: str,
        size: int | str | None = None,
        *,
        path: Path | None = None,
        listen: Sequence[str] | None = None,
        args: Sequence[str] = (),
    ) -> Node:
        """Start ``dst serve`` as node ``name`` (or restart it: same file, same socket).

        ``size`` is passed as ``--size`` (None: none); ``listen`` defaults to
        ``unix:SOCKETS/NAME.sock``, and ``"tcp"`` in it means 127.0.0.1 port 0.
        """
        old = self.nodes.get(name)
        if old is not None and old.alive():
            raise AssertionError(f"node {name} is running already")
        if path is None:
            path = old.path if old is not None else self.work / f"{name}.img"
        if listen is None:
            listen = [f"unix:{self.sockets}/{name}.sock"]
        listen = ["127.0.0.1:0" if a == "tcp" else a for a in listen]
        full = [*args, *(["--size", str(size)] if size is not None else [])]
        node = start_node(path, listen=listen, args=full, stderr_path=self._stderr(name), name=name)
        self.nodes[name] = node
        self.processes.append(node)
        return node

    def start_daemon(
        self,
        *specs: Path,
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
        args: Sequence[str] = (),
    ) -> Daemon:
        """Start a ``dst daemon`` (with these spec files, ``env`` added to the
        environment, ``options`` of ``dst`` before the command, ``args`` of the daemon
        after it); :attr:`daemon` is the latest."""
        n = len(self.daemons)
        control = self.sockets / ("control.sock" if n == 0 else f"control{n + 1}.sock")
        name = "daemon" if n == 0 else f"daemon{n + 1}"
        daemon = start_daemon(
            control, self._stderr(name), specs, name=name, env=env, options=options, args=args
        )
        self.daemons.append(daemon)
        self.processes.append(daemon)
        return daemon

    @property
    def daemon(self) -> Daemon:
        if not self.daemons:
            raise AssertionError("no daemon started")
        return self.daemons[-1]

    def server(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        sock: Path | None = None,
        port: int | None = None,
        export: str = "",
        python: bool = False,
        check_exit: bool = True,
    ) -> Server:
        """Start another NBD server on ``sock`` (default ``SOCKETS/NAME.sock``), or on
        TCP port ``port`` of 127.0.0.1 if given."""
        if port is None:
            sock = sock or self.sockets / f"{name}.sock"
        server = start_server(
            cmd, sock, self._stderr(name), name=name, port=port, export=export,
            python=python, check_exit=check_exit,
        )  # fmt: skip
        self.processes.append(server)
        return server

    def sock(self, array: str) -> Path:
        """Where array ``array`` is exported by default."""
        return self.sockets / f"{array}.sock"

    def uri(self, array: str, export: str = "") -> str:
        return unix_uri(self.sock(array), export)

    def spec(
        self,
        array: str,
        target: dict[str, Any],
        *,
        listen: Sequence[str] | None = None,
        **keys: Any,
    ) -> Path:
        """Write ``WORK/ARRAY.toml``, exported on :meth:`sock` unless ``listen`` says."""
        if listen is None:
            listen = [f"unix:{self.sock(array)}"]
        return write_spec(self.work / f"{array}.toml", array, listen, target, **keys)

    def create(self, array: str, target: dict[str, Any], **keys: Any) -> str:
        """:meth:`spec` and ``dst create`` it in :attr:`daemon`; the array's URI."""
        self.daemon.dst("create", str(self.spec(array, target, **keys)))
        return self.uri(array)

    def status(self, array: str) -> dict[str, Any]:
        """The status of array ``array`` (``dst status ARRAY --json``)."""
        result: dict[str, Any] = self.daemon.status(array)["arrays"][0]
        return result

    def close(self, *, check: bool = True) -> None:
        """Stop the daemons, then everything else in reverse start order.  With
        ``check``, AssertionError if any process did not stop cleanly."""
        problems: list[str] = []
        order: list[Process] = [p for p in reversed(self.processes) if isinstance(p, Daemon)]
        order += [p for p in reversed(self.processes) if not isinstance(p, Daemon)]
        for p in order:
            try:
                p.stop()
            except AssertionError as e:
                problems.append(str(e))
            problems += p.problems()
        if check and problems:
            raise AssertionError("processes did not stop cleanly:\n" + "\n".join(problems))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(check=kind is None)
