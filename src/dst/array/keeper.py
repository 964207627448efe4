"""Keeps the redundant targets of a running array healthy: resync, automatic re-add,
verify.

Theory of operation
-------------------
The array attaches one :class:`MirrorKeeper` to every redundant target
(:class:`~dst.targets.redundant.Redundant`: a mirror) of its running tree.  The keeper

* runs the mirror's :class:`~dst.array.resync.Resyncer` (rate limited, resumable;
  a leg being filled by ``dst replace --rate`` has a limit of its own);
* **re-adds failed legs automatically** when their node is back.  The nodes below a leg
  report their connection state (:meth:`~dst.device.BlockDevice.subscribe`); when a
  failed leg is healthy again, or on a periodic retry for a leg whose node was down
  when the array started (it was never opened), the keeper calls the target's
  ``readd``, which checks the member's superblock: a member that
  is merely behind is resynced from the bitmap (delta), an unknown or diverged one
  is *refused* and stays failed with the reason in status until the operator
  decides (``dst readd NODE --full`` discards its data).  Legs that failed because
  their node went away are re-added automatically, and so are legs that did not
  answer in time: the mirror drops a timed-out leg's connection
  (:meth:`~dst.device.BlockDevice.reset`), so a silent partition heals by reconnect
  and delta resync like any outage.  Not re-added automatically: legs failed by the
  operator (``dst fail``), and legs whose node answered with errors on a live
  connection (a failing disk is not trusted again without the operator: ``dst
  readd``).  When every leg failed, the one that failed last is taken back first
  (the mirror's ``readd`` re-admits it as it is: it holds every acknowledged write)
  and the others are re-added from it; their attempts are retried meanwhile.  A
  re-add that fails is retried with exponential backoff (capped);
* runs **verify** jobs (compare, or repair from one leg) in the background, with
  progress for status.

Everything runs in the mirror's task set, so closing the mirror stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from dst import changes
from dst.array.resync import Resyncer
from dst.array.verify import VerifyReport, verify
from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError
from dst.meta.superblock import MetadataError
from dst.targets.composite import HEALTHY
from dst.targets.mirror import LegState
from dst.targets.redundant import Redundant

log = logging.getLogger(__name__)

RETRY_MIN = 1.0  # seconds between automatic re-add attempts of one leg, doubling ...
RETRY_MAX = 30.0  # ... up to this


class VerifyJob:
    """One background verify of a mirror, with its report so far."""

    def __init__(self, repair: bool, source: int | None) -> None:
        self.repair = repair
        self.source = source
        self.report = VerifyReport()
        self.state = "running"  # running | done | failed
        self.error = ""
        self.started = time.monotonic()
        self.finished: float | None = None

    def status(self) -> dict[str, Any]:
        r = self.report
        elapsed = (self.finished or time.monotonic()) - self.started
        return {
            "state": self.state,
            "repair": self.repair,
            "error": self.error,
            "regions_done": r.checked,
            "regions_total": r.regions,
            "bytes": r.bytes,
            "skipped": r.skipped,
            "rate": r.bytes / elapsed if elapsed > 0 else 0.0,
            "mismatched": list(r.mismatched[:100]),
            "mismatched_count": len(r.mismatched),
            "repaired_count": len(r.repaired),
        }


class MirrorKeeper:
    """Resync, automatic re-add and verify for one tracked mirror."""

    def __init__(
        self,
        mirror: Redundant,
        *,
        retry_min: float = RETRY_MIN,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self.mirror = mirror
        rates = mirror.resync_rate or None, mirror.resync_min_rate or None
        self.resyncer = Resyncer(mirror, max_rate=rates[0], min_rate=rates[1])
        self.manual: set[int] = set()  # failed by the operator: no automatic re-add
        self.suspended: set[int] = set()  # detached by ``dst suspend`` (also in manual)
        self.refused: dict[int, str] = {}  # re-add refused (split brain, foreign)
        self.verify_job: VerifyJob | None = None
        self.readds = 0  # automatic re-adds so far
        self._retry_min, self._retry_max = retry_min, retry_max
        self._next_try: dict[int, float] = {}
        self._delay: dict[int, float] = {}
        self._kick = asyncio.Event()
        self._unsubscribe: list[Callable[[], None]] = []
        self._lost: set[BlockDevice] = set()  # legs whose node connection was lost
        self._devs: list[BlockDevice] = []  # the legs' devices when last (re)subscribed

    def keeps(self, dev: object) -> bool:
        """Whether this keeper looks after ``dev``."""
        return self.mirror is dev

    def start(self) -> None:
        self.resyncer.start()
        self._subscribe()
        self.mirror.tasks.spawn(self._readd_loop(), name="readd")

    def stop(self) -> None:
        """Detach from the remote leaves (the mirror's close stops the tasks)."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()

    def refresh(self) -> None:
        """The mirror's legs changed (added, removed, renumbered): follow them."""
        self.stop()
        self._subscribe()
        now = {leg.dev: leg.index for leg in self.mirror.legs}
        old = self._devs

        def remap(indices: set[int]) -> set[int]:
            return {now[old[i]] for i in indices if i < len(old) and old[i] in now}

        self.manual = remap(self.manual)
        self.suspended = remap(self.suspended)
        self.refused = {now[old[i]]: why for i, why in self.refused.items()
                        if i < len(old) and old[i] in now}  # fmt: skip
        self._next_try.clear()
        self._delay.clear()

    def _subscribe(self) -> None:
        self._devs = [leg.dev for leg in self.mirror.legs]
        for leg in self.mirror.legs:
            self._unsubscribe.append(leg.dev.subscribe(self._watch(leg.dev)))

    # -- operator actions ------------------------------------------------------------

    async def fail(self, index: int) -> None:
        """Take leg ``index`` out for maintenance.  Raises ConfigError (last leg)."""
        await self.mirror.fail_leg(index)
        self.manual.add(index)

    async def suspend(self, index: int) -> None:
        """Detach leg ``index`` for a while (its misses are recorded); :meth:`resume`
        resyncs them.  Raises ConfigError (last leg in sync, or already suspended)."""
        if index in self.suspended:
            raise ConfigError(f"leg {index} is already suspended", where="node")
        await self.fail(index)
        self.suspended.add(index)
        self.mirror.legs[index].reason = "suspended by the operator"

    async def resume(self, index: int) -> dict[str, Any]:
        """Re-attach a suspended leg: the regions it missed are resynced."""
        if index not in self.suspended:
            raise ConfigError(f"leg {index} is not suspended", where="node")
        result = await self.readd(index)
        self.suspended.discard(index)
        return result

    async def readd(self, index: int, *, full: bool = False) -> dict[str, Any]:
        """Bring leg ``index`` back now; ``full`` discards its data (split brain).

        Raises ConfigError (not failed), BlockError (unreachable), MetadataError.
        """
        plan = await self.mirror.readd(index, full=full)
        self._lost.discard(self.mirror.legs[index].dev)
        self.manual.discard(index)
        self.suspended.discard(index)
        self.refused.pop(index, None)
        self._forget(index)
        return {"leg": index, "relation": plan.relation, "full": plan.full,
                "regions": plan.regions}  # fmt: skip

    def set_rate(self, *, max_rate: float | None, min_rate: float | None) -> None:
        """Change the resync rate now (and in the mirror's spec)."""
        self.resyncer.set_rate(max_rate=max_rate, min_rate=min_rate)
        self.mirror.resync_rate = int(max_rate or 0)
        self.mirror.resync_min_rate = int(min_rate or 0)

    def start_verify(self, *, repair: bool, source: int | None) -> VerifyJob:
        """Start a background verify.  Raises ConfigError if one is running."""
        if self.verify_job is not None and self.verify_job.state == "running":
            raise ConfigError("a verify is already running on this mirror", where="array")
        job = VerifyJob(repair, source)
        self.verify_job = job
        self.mirror.tasks.spawn(self._verify(job), name="verify")
        return job

    async def _verify(self, job: VerifyJob) -> None:
        def progress(report: VerifyReport) -> None:
            job.report = report

        try:
            job.report = await verify(
                self.mirror, repair=job.repair, source=job.source, progress=progress
            )
            job.state = "done"
        except (BlockError, ConfigError) as exc:
            job.state, job.error = "failed", str(exc)
        finally:
            job.finished = time.monotonic()
            changes.changed()
        log.info("%s: verify %s: %d regions differ", self.mirror.name, job.state,
                 len(job.report.mismatched))  # fmt: skip

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "resync_limit": {
                "max_rate": self.resyncer.limit.max_rate,
                "min_rate": self.resyncer.limit.min_rate,
            },
            "leg_limits": {  # a leg's own resync limit (the new leg of a replace)
                dev.name: {"max_rate": limit.max_rate, "min_rate": limit.min_rate}
                for dev, limit in self.resyncer.leg_limits.items()
            },
            "auto_readds": self.readds,
            "manual": sorted(self.manual),
            "suspended": sorted(self.suspended),
            "refused": {str(k): v for k, v in self.refused.items()},
        }
        if self.verify_job is not None:
            out["verify"] = self.verify_job.status()
        return out

    # -- automatic re-add ------------------------------------------------------------

    def _watch(self, dev: BlockDevice) -> Callable[[bool], None]:
        """The connection callback for a remote leaf of the leg ``dev``."""

        def changed(up: bool) -> None:
            if up:
                self._kick.set()
            else:
                self._lost.add(dev)  # a leg failed now failed for its connection

        return changed

    def _forget(self, index: int) -> None:
        self._next_try.pop(index, None)
        self._delay.pop(index, None)

    def _candidates(self) -> list[int]:
        now = time.monotonic()
        out = []
        for leg in self.mirror.legs:
            i = leg.index
            if leg.state is not LegState.FAILED or i in self.manual or i in self.refused:
                continue
            if leg.opened and leg.dev not in self._lost:
                continue  # failed by I/O errors on a live connection: the operator decides
            # (a leg that timed out had its connection dropped: it is in _lost)
            if leg.opened and leg.dev.health().state not in HEALTHY:
                continue  # its node is still away; the reconnect will kick us
            if now < self._next_try.get(i, 0.0):
                continue
            out.append(i)
        return out

    async def _readd_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self._retry_min)
            self._kick.clear()
            for i in self._candidates():
                await self._try_readd(i)

    async def _try_readd(self, index: int) -> None:
        leg = self.mirror.legs[index]
        try:
            plan = await self.mirror.readd(index)
        except MetadataError as exc:
            self.refused[index] = str(exc)
            leg.reason = f"refused: {exc}"
            log.error("%s: leg %d (%s) not re-added: %s", self.mirror.name, index,
                      leg.dev.name, exc)  # fmt: skip
            return
        except (BlockError, ConfigError, OSError) as exc:
            delay = min(self._delay.get(index, self._retry_min / 2) * 2, self._retry_max)
            self._delay[index] = delay
            self._next_try[index] = time.monotonic() + delay
            log.debug("%s: leg %d not back yet: %s", self.mirror.name, index, exc)
            return
        self.readds += 1
        self._forget(index)
        self._lost.discard(leg.dev)
        log.warning("%s: leg %d (%s) is back: re-added (%s, %d regions to copy)",
                    self.mirror.name, index, leg.dev.name, plan.relation,
                    plan.regions)  # fmt: skip


def keepers(root: BlockDevice) -> list[MirrorKeeper]:
    """A keeper for every redundant target under ``root``."""
    out = []
    stack = [root]
    while stack:
        dev = stack.pop()
        if isinstance(dev, Redundant):
            out.append(MirrorKeeper(dev))
        stack.extend(dev.children())
    return out
