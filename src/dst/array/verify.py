"""Online verify of a mirror or parity array, span by span on the shared copier.

:func:`verify` plans the whole array by the target's ``verify_status`` (a span that
every member holding it reads as zeroes is equal without reading it), asks the target
to check each span (a mirror compares its legs, a parity array recomputes its parity)
and optionally to repair what differs, paced like a resync, and reports the regions
that differed (:class:`VerifyReport`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dst.errors import ConfigError
from dst.targets.copier import Copier, RateLimit
from dst.targets.copyplan import Moved, Span, plan
from dst.targets.mirror import LegState
from dst.targets.redundant import Redundant


@dataclass(slots=True)
class VerifyReport:
    """Result of :func:`verify`."""

    regions: int = 0
    checked: int = 0
    bytes: int = 0  # compared
    skipped: int = 0  # holes on every leg: equal without reading
    mismatched: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "regions": self.regions,
            "checked": self.checked,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "mismatched": list(self.mismatched),
            "repaired": list(self.repaired),
        }


async def verify(
    mirror: Redundant,
    *,
    repair: bool = False,
    source: int | None = None,
    max_rate: float | None = None,
    min_rate: float | None = None,
    progress: Callable[[VerifyReport], None] | None = None,
) -> VerifyReport:
    """Compare the legs online, span by span; report the regions that differ.

    With ``repair`` the other legs are rewritten from ``source`` (default: the first
    leg in sync).  Raises ConfigError if ``source`` is not in sync, BlockError if a leg
    cannot be read.
    """
    if repair:
        if source is None:
            source = next(x.index for x in mirror.legs if x.state is LegState.IN_SYNC)
        if mirror.legs[source].state is not LegState.IN_SYNC:
            raise ConfigError(f"leg {source} is not in sync", where="source")
    limit = RateLimit(max_rate=max_rate, min_rate=min_rate)
    rh = mirror.regions
    report = VerifyReport(regions=rh.nregions)
    last_ops = mirror.io_ops

    async def pace(region: int, nbytes: int) -> None:
        nonlocal last_ops
        busy, last_ops = mirror.io_ops != last_ops, mirror.io_ops
        await limit.pace(nbytes, busy)

    async def check(span: Span) -> Moved:
        moved, differ = await mirror.verify_span(span, repair_from=source if repair else None)
        report.checked += span.count
        report.bytes += moved.copied
        report.skipped += moved.skipped
        report.mismatched = sorted(report.mismatched + differ)
        if repair:
            report.repaired = sorted(report.repaired + differ)
        if progress is not None:
            progress(report)
        return moved

    copier = Copier(name=f"{mirror.name}: verify", depth=4, pace=pace, stop_on_error=True,
                    region_size=rh.region_size)  # fmt: skip
    copier.kind, copier.total = "verify", report.regions
    spans = plan([(0, rh.nregions)], mirror.verify_status, region_size=rh.region_size,
                 size=rh.tracker.data_size)  # fmt: skip
    await copier.run(spans, check)
    return report
