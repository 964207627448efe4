"""What every part of a parity array shares: the mirror's core plus the geometry, the
parity coder and the write-hole policy.

Theory of operation
-------------------
A parity array keeps the state a mirror keeps -- members (:class:`~dst.targets.mirror.
legs.Leg`), the region hash over the dirty log (superblocks and the write-intent bitmap
at the end of every member), the range lock, the one leg-timeout clock and the task set
-- so :class:`ParityCore` *is* a :class:`~dst.targets.mirror.core.MirrorCore` with the
parity's geometry (:mod:`.geometry`) and coder (:mod:`.gf`), and its own answers to two
questions the mirror's core asks its kind:

* **after a crash** (:meth:`ParityCore.crashed`): the regions that were dirty are
  *unsynced*: their parity may not match their data, so the background resync
  recomputes it (the data is the truth, as MD's resync);
* **dirty and degraded at once** (:meth:`ParityCore.opening`): a stripe caught by the
  crash in the middle of a write may have new data and old parity, and with a member
  missing, its chunk rebuilt from that parity is silently wrong (the *write hole*).
  The start is refused, naming the regions at risk, unless ``start_dirty_degraded``
  (MD's ``start_dirty_degraded``): then the regions are accepted as they are, logged
  and reported in status (``at_risk``).

Regions, the range lock and the region hash work in *member space*: stripe ``s`` is the
member range ``[s * chunk, (s + 1) * chunk)`` on every member, so locking a stripe's
member range orders every write to that stripe (one write at a time per stripe, on
every member in the same order) and a region is a run of stripes.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

from dst.device import BlockDevice
from dst.errors import ConfigError
from dst.meta.bitmap import Bitmap
from dst.meta.members import LegState
from dst.meta.superblock import MetadataError
from dst.targets.mirror.core import MirrorCore
from dst.targets.mirror.dirtylog import Opening
from dst.targets.parity.geometry import Geometry
from dst.targets.parity.gf import Coder
from dst.targets.parity.sparse import ZeroMap

log = logging.getLogger(__name__)
LAYOUT = "left-symmetric"
SHOWN = 20  # regions named in a refusal


class ParityCore(MirrorCore):
    """The shared state of one parity array (see :class:`~dst.targets.parity.device.
    ParityDevice` for the arguments)."""

    def __init__(
        self,
        devices: Sequence[BlockDevice],
        *,
        parity: int,
        chunk: int,
        name: str,
        region_size: int | None,
        metadata: bool,
        clear_delay: float,
        leg_timeout: float | None,
        array_uuid: uuid.UUID | None,
        start_dirty_degraded: bool,
        label: Mapping[str, Any] | None = None,
    ) -> None:
        kind = "raid5" if parity == 1 else "raid6"
        if len(devices) < parity + 2:
            raise ConfigError(f"a {kind} needs at least {parity + 2} members", where="members")
        if chunk < 4096 or chunk & (chunk - 1):
            raise ConfigError(f"must be a power of two >= 4KiB, got {chunk}", where="chunk_size")
        layout = {"type": kind, "chunk_size": chunk, "layout": LAYOUT}
        super().__init__(
            devices, name=name, region_size=region_size, metadata=metadata,
            clear_delay=clear_delay, leg_timeout=leg_timeout, array_uuid=array_uuid,
            layout=layout, label=label,
        )  # fmt: skip
        self.kind = kind
        self.parity, self.chunk = parity, chunk
        self.coder = Coder(len(devices) - parity, parity)
        self.geometry = Geometry(len(devices), parity, chunk, 0)
        self.start_dirty_degraded = start_dirty_degraded
        self.forced = False  # started dirty and degraded on purpose
        self.at_risk: Bitmap | None = None  # the regions that start accepted as they were
        self.write_epoch = 0  # foreground writes to members started so far ...
        self.writes_inflight = 0  # ... and not ended (a rebuild's zero map, .sparse)
        self.zeroes = ZeroMap()

    @property
    def data_end(self) -> int:
        """Where the whole stripes end on every member."""
        return self.geometry.stripes * self.chunk

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around every write to members but a rebuild's (their block status changes)."""
        self.write_epoch += 1
        self.writes_inflight += 1
        try:
            yield
        finally:
            self.writes_inflight -= 1

    async def open(self) -> None:
        """The mirror's open; then the geometry of the members' data areas.  Raises
        MetadataError for a dirty and degraded start (module docstring)."""
        await super().open()
        self.geometry = Geometry(len(self.legs), self.parity, self.chunk, self.size // self.chunk)
        if self.at_risk is not None:
            self.regions.settled(self.at_risk)

    def opening(self, op: Opening) -> None:
        crashed = op.crashed
        if crashed is None or crashed.empty():
            return
        away = [self.legs[i].dev.name for i, (s, _) in enumerate(op.legs)
                if s is not LegState.IN_SYNC]  # fmt: skip
        if not away:
            return
        count = crashed.count()
        shown = " ".join(str(r) for r in islice(crashed, SHOWN))
        more = " ..." if count > SHOWN else ""
        what = (
            f"{self.name}: dirty and degraded: the daemon stopped with writes in flight "
            f"and {', '.join(away)} {'is' if len(away) == 1 else 'are'} missing; the parity "
            f"of {count} regions may not match their data, and data rebuilt from it "
            f"could be silently wrong (the write hole): regions {shown}{more} (region r holds "
            f"the array's bytes from r * {op.region_size * self.geometry.data} on)"
        )
        if not self.start_dirty_degraded:
            raise MetadataError(
                f"{what}; bring the missing members back, or start with "
                "start_dirty_degraded = true to accept that risk"
            )
        log.error("%s; started anyway (start_dirty_degraded)", what)
        self.forced = True
        self.at_risk = crashed
        op.crashed = None

    def crashed(self, regions: Bitmap) -> None:
        """The parity of ``regions`` is recomputed by the resync before it is trusted."""
        self.regions.unsynced(regions)

    # -- which members serve a stripe ----------------------------------------------------

    def stripe_regions(self, stripes: range) -> range:
        off, n = self.geometry.member_range(stripes)
        return self.regions.regions(off, n)

    def available(self, stripes: range) -> list[bool]:
        """Per member: live and holding every region of ``stripes``."""
        regions = self.stripe_regions(stripes)
        return [self.holds(leg, regions) for leg in self.legs]

    def trusted(self, stripes: range) -> bool:
        """May data be rebuilt from the parity of ``stripes`` (not unsynced, or the
        operator accepted the risk)?"""
        return self.forced or self.regions.consistent(self.stripe_regions(stripes))

    def lost(self, stripes: range) -> int:
        """Members that do not hold ``stripes`` (live or not)."""
        return self.available(stripes).count(False)
