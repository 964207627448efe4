"""The rebuild's zero map (dst.targets.parity.sparse): one block status per window, and
never an answer that a write may have made stale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dst.device import Extent
from dst.targets.file import FileDevice
from dst.targets.mirror.legs import Leg
from dst.targets.parity.sparse import ZeroMap

SIZE = 4 << 20


class Counted(FileDevice):
    asked = 0

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        self.asked += 1
        return await super().block_status(offset, length)


@dataclass
class Writes:
    write_epoch: int = 0
    writes_inflight: int = 0
    data_end: int = SIZE


async def test_one_question_per_window_until_a_write(tmp_path: Path) -> None:
    dev = Counted(tmp_path / "m", size=SIZE, create=True)
    await dev.open()
    await dev.write(1 << 20, b"x" * 4096)
    leg, core, zm = Leg(dev, 0), Writes(), ZeroMap()
    assert await zm.all_zero(core, [leg], 0, 65536)
    assert await zm.all_zero(core, [leg], 65536, 65536)
    assert not await zm.all_zero(core, [leg], 1 << 20, 65536)  # the data
    assert dev.asked == 1
    core.write_epoch += 1  # a write started since: ask again
    await dev.write(2 << 20, b"y")
    assert not await zm.all_zero(core, [leg], 2 << 20, 65536)
    assert dev.asked == 2
    core.write_epoch += 1  # asked while a write is in flight: good for that region only
    core.writes_inflight = 1
    assert await zm.all_zero(core, [leg], 3 << 20, 65536)
    assert await zm.all_zero(core, [leg], (3 << 20) + 65536, 65536)
    assert dev.asked == 4
    await dev.close()
