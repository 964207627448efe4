"""The NBD server's edge: what an export advertises and what a request may ask.

Pure functions of the bound export and one request (STYLE 6: validate at the edge,
targets assume valid requests), used by :mod:`dst.net.negotiate` (the flags an export
advertises) and :mod:`dst.net.transmission` (everything after GO):

* :func:`transmission_flags`: the flags advertised for a device;
* :class:`Binding`: what GO bound -- the device, its size, the command flags allowed,
  the largest payload, structured replies and the base:allocation context --
  :meth:`Binding.check`, the request validation (command, flags, read-only, range,
  lengths), answering with the NBD error and message or None, and the replies
  (:meth:`Binding.reply`, :meth:`Binding.error`);
* :func:`device_call`: the device coroutine that serves a request;
* :func:`clip_extents`: a device's extents as wire descriptors;
* :func:`describe_peer` and :func:`tune_socket` (the one function here with I/O: the
  accepted socket's options).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from dst.device import BlockDevice, Extent
from dst.nbd import requests as rq
from dst.nbd.constants import (
    BASE_ALLOCATION,
    Cmd,
    CmdFlags,
    NbdErr,
    StateFlags,
    TransmissionFlags,
)
from dst.nbd.events import ExportInfo, Request
from dst.nbd.server import ServerHandshake

_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_TRIM, _CACHE, _ZERO, _BS = (
    int(Cmd.TRIM),
    int(Cmd.CACHE),
    int(Cmd.WRITE_ZEROES),
    int(Cmd.BLOCK_STATUS),
)
_FUA = int(CmdFlags.FUA)
_WRITES = frozenset((_WRITE, _TRIM, _ZERO))
_EINVAL = int(NbdErr.EINVAL)
SOCKET_BUFFER = 4 << 20  # SO_SNDBUF/SO_RCVBUF asked for (the kernel caps it)


def transmission_flags(device: BlockDevice, *, structured: bool) -> int:
    """The transmission flags advertised for ``device``."""
    caps = device.caps
    f = TransmissionFlags.HAS_FLAGS
    for cond, flag in (
        (caps.read_only, TransmissionFlags.READ_ONLY),
        (caps.flush, TransmissionFlags.SEND_FLUSH),
        (caps.fua, TransmissionFlags.SEND_FUA),
        (caps.trim, TransmissionFlags.SEND_TRIM),
        (caps.zeroes, TransmissionFlags.SEND_WRITE_ZEROES),
        (caps.zeroes and caps.fast_zero, TransmissionFlags.SEND_FAST_ZERO),
        (caps.cache, TransmissionFlags.SEND_CACHE),
        (caps.multi_conn, TransmissionFlags.CAN_MULTI_CONN),
        (structured, TransmissionFlags.SEND_DF),
    ):
        if cond:
            f |= flag
    return int(f)


def allowed_flags(flags: int) -> dict[int, int]:
    """Command -> the command flags a client may send, given the transmission flags
    (plain ints: an ``IntFlag``'s ``&`` and ``~`` run Python code, per request)."""
    fua = _FUA if flags & TransmissionFlags.SEND_FUA else 0
    df = int(CmdFlags.DF) if flags & TransmissionFlags.SEND_DF else 0
    fast = int(CmdFlags.FAST_ZERO) if flags & TransmissionFlags.SEND_FAST_ZERO else 0
    return {
        _READ: fua | df,
        _WRITE: fua,
        _DISC: 0xFFFF,
        _FLUSH: fua,
        _TRIM: fua,
        _CACHE: fua,
        _ZERO: fua | int(CmdFlags.NO_HOLE) | fast,
        _BS: fua | int(CmdFlags.REQ_ONE),
    }


@dataclass(frozen=True, slots=True)
class Binding:
    """The export a connection bound at GO (or EXPORT_NAME), and its limits."""

    device: BlockDevice
    size: int
    allowed: dict[int, int]  # command -> flags allowed
    max_block: int  # the largest READ or WRITE payload
    structured: bool
    context_id: int  # base:allocation's id, 0 when not negotiated
    read_only: bool = False  # as the export was offered (its flags say so)

    @classmethod
    def of(
        cls, hs: ServerHandshake, device: BlockDevice, info: ExportInfo, *, max_payload: int
    ) -> Binding:
        """What ``hs`` negotiated for ``device`` (exported as ``info``)."""
        return cls(
            device=device,
            size=info.size,
            allowed=allowed_flags(info.flags),
            max_block=min(info.max_block, max_payload),
            structured=hs.structured_replies,
            context_id=hs.meta_contexts.get(BASE_ALLOCATION, 0),
            read_only=bool(info.flags & TransmissionFlags.READ_ONLY),
        )

    def reply(self, req: Request, value: Any) -> tuple[bytes, Any] | None:
        """The reply to ``req`` served with ``value`` (the header, and a READ's data);
        None for a READ answered with the wrong length (the caller logs an EIO)."""
        typ = req.type
        if typ == _READ:
            if len(value) != req.length:
                return None
            return self.read_head(req.handle, req.offset, req.length), value
        if typ == _BS:
            req_one = bool(req.flags & CmdFlags.REQ_ONE)
            extents = clip_extents(value, req.length, req_one=req_one)
            return rq.block_status_chunk(req.handle, self.context_id, extents), None
        return rq.simple_reply(req.handle), None

    def read_head(self, handle: int, offset: int, length: int) -> bytes:
        """The header before a whole READ's ``length`` bytes of data."""
        if self.structured:
            return rq.data_ok(handle, 8 + length, offset)
        return rq.simple_ok(handle)

    def error(self, req: Request, code: int, message: str) -> bytes:
        """The error reply to ``req`` (NBD ``code``; the message when structured)."""
        return self.error_to(req.handle, code, message)

    def error_to(self, handle: int, code: int, message: str) -> bytes:
        """The error reply to request ``handle``."""
        return rq.error_reply(handle, code, message, structured=self.structured)

    def check(self, req: Request) -> tuple[int, str] | None:
        """(NBD error, message) when ``req`` may not reach the device, else None."""
        typ = req.type
        if typ in (_WRITE, _READ):  # a valid READ or WRITE, the common case, at once
            length = req.length
            if (
                0 < length <= self.max_block
                and req.offset + length <= self.size
                and not req.flags & ~self.allowed[typ]
                and not (typ == _WRITE and self.read_only)
            ):
                return None
        allowed = self.allowed.get(typ)
        if allowed is None:
            return _EINVAL, f"unknown command {typ}"
        if req.flags & ~allowed:
            return _EINVAL, f"flags 0x{req.flags:x} not valid for command {typ}"
        if typ in (_FLUSH, _DISC):
            return None
        if typ in _WRITES and self.read_only:
            return int(NbdErr.EPERM), "export is read-only"
        length = req.length
        if req.offset + length > self.size:
            code = NbdErr.ENOSPC if typ in (_WRITE, _ZERO) else NbdErr.EINVAL
            return int(code), "request beyond the end of the export"
        if length == 0:
            return _EINVAL, "zero-length request"
        if (typ in (_READ, _WRITE)) and length > self.max_block:
            return _EINVAL, f"request longer than {self.max_block} bytes"
        if typ == _BS and not self.context_id:
            return _EINVAL, "base:allocation was not negotiated"
        return None


def device_call(device: BlockDevice, req: Request) -> Coroutine[Any, Any, Any] | None:
    """The device coroutine (not started) that serves valid request ``req``; None for
    DISC."""
    typ = req.type
    fua = bool(req.flags & _FUA)
    if typ == _READ:
        return device.read(req.offset, req.length)
    if typ == _WRITE:
        assert req.data is not None
        return device.write(req.offset, req.data, fua=fua)
    if typ == _FLUSH:
        return device.flush()
    if typ == _TRIM:
        return device.trim(req.offset, req.length, fua=fua)
    if typ == _ZERO:
        punch = not req.flags & CmdFlags.NO_HOLE
        fast = bool(req.flags & CmdFlags.FAST_ZERO)
        return device.write_zeroes(req.offset, req.length, fua=fua, punch=punch, fast=fast)
    if typ == _CACHE:
        return device.cache(req.offset, req.length)
    if typ == _BS:
        return device.block_status(req.offset, req.length)
    return None  # DISC


def clip_extents(raw: Sequence[Extent], length: int, *, req_one: bool) -> list[tuple[int, int]]:
    """Device extents -> wire descriptors: clipped to ``length``, merged, non-empty."""
    out: list[tuple[int, int]] = []
    total = 0
    for e in raw:
        n = min(e.length, length - total)
        if n <= 0:
            if e.length <= 0:
                continue
            break
        f = (StateFlags.HOLE if e.hole else 0) | (StateFlags.ZERO if e.zero else 0)
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + n, f)
        else:
            out.append((n, int(f)))
        total += n
    if not out:
        out = [(length, 0)]
    return out[:1] if req_one else out


def describe_peer(peername: object) -> str:
    """``host:port`` (``[v6]:port``) for TCP, ``unix`` for a unix socket."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return "unix"


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY, and socket buffers big enough for a few 1 MiB requests or replies in
    flight (a server's connections and a client's: a mirror's to its legs)."""
    with contextlib.suppress(OSError):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
