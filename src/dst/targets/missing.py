"""A member that is not there: the place of a mirror leg that ``dst assemble
--degraded`` was not given.

It never opens (:class:`~dst.errors.BlockError` ``ENODEV`` saying what to do), so the
mirror starts with that leg failed and records what it misses; ``dst replace ARRAY
NAME ...`` puts a new node in its place (rebuilt from the legs in sync).  Its spec
round-trips (``type = "missing"``), so a restarted array still knows the leg's name.
"""

from __future__ import annotations

import errno
from typing import Any

from dst.device import BlockDevice, Health
from dst.errors import BlockError


class MissingDevice(BlockDevice):
    """The place of a member called ``name`` that is not there."""

    kind = "missing"

    def __init__(self, *, name: str) -> None:
        self.name = name
        self.size = 0

    async def open(self) -> None:
        """Raises BlockError (ENODEV): there is nothing to open."""
        raise BlockError(
            errno.ENODEV,
            f"{self.name}: missing (not given to dst assemble --degraded); put a node in "
            f"its place with: dst replace ARRAY {self.name} --uri URI (or --path PATH)",
        )

    def spec(self) -> dict[str, Any]:
        return {"type": "missing", "name": self.name}

    def health(self) -> Health:
        return Health("missing")
