"""An in-memory block device (tests, scratch arrays)."""

from __future__ import annotations

from typing import Any

from dst.device import BlockDevice, Buffer, Capabilities


class MemoryDevice(BlockDevice):
    """A bytearray of ``size`` bytes.  Flush is a no-op: memory is as durable as it gets."""

    kind = "memory"

    def __init__(self, size: int, *, name: str = "memory", read_only: bool = False) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.size = size
        self.name = name
        self.data = bytearray(size)
        self.caps = Capabilities(read_only=read_only, trim=True, fast_zero=True, cache=True)

    async def read(self, offset: int, length: int) -> Buffer:
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self.data[offset : offset + len(data)] = data

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        punch: bool = False,
        fast: bool = False,
    ) -> None:
        self.data[offset : offset + length] = bytes(length)

    def spec(self) -> dict[str, Any]:
        return {"type": "memory", "name": self.name, "size": self.size}
