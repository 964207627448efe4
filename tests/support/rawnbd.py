"""A raw-socket NBD client for hostile and greedy-client tests: greet, GO, requests,
replies, by hand."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

from dst.nbd import wire
from dst.nbd.client import encode_go
from dst.nbd.constants import IHAVEOPT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Opt, Rep
from dst.net.address import Address

Raw = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def raw(address: Address) -> AsyncIterator[Raw]:
    if address.is_unix:
        reader, writer = await asyncio.open_unix_connection(address.path)
    else:
        reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


async def greet(r: asyncio.StreamReader, w: asyncio.StreamWriter, flags: int = 3) -> None:
    await r.readexactly(18)
    w.write(struct.pack(">I", flags))


def opt(option: int, payload: bytes = b"") -> bytes:
    return wire.OPTION.pack(IHAVEOPT, option, len(payload)) + payload


async def option_reply(r: asyncio.StreamReader) -> tuple[int, int, bytes]:
    _, option, rep, n = wire.OPTION_REPLY.unpack(await r.readexactly(20))
    return option, rep, await r.readexactly(n)


async def go(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await greet(r, w)
    w.write(opt(Opt.GO, encode_go("")))
    while (await option_reply(r))[1] != Rep.ACK:
        pass


def request(typ: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return wire.REQUEST.pack(REQUEST_MAGIC, flags, typ, handle, offset, length)


async def simple_reply(r: asyncio.StreamReader) -> tuple[int, int]:
    magic, error, handle = wire.SIMPLE_REPLY.unpack(await r.readexactly(16))
    assert magic == SIMPLE_REPLY_MAGIC
    return handle, error


async def closed(r: asyncio.StreamReader) -> bool:
    """True when the server closed the connection (EOF before any byte)."""
    return await r.read(1) == b""
