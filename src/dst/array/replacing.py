"""``dst replace``: one node of a running array replaced by another, its data copied live.

Theory of operation
-------------------
A :class:`ReplaceJob` moves the data of node OLD to node NEW while the array serves
I/O, the way pvmove does:

* **Under a linear or stripe target** (a non-redundant parent): a
  :class:`~dst.targets.replace.ReplaceDevice` (a temporary write-blocking mirror of
  OLD onto NEW) is put in OLD's place under a suspend of the array root; it copies OLD
  to NEW region by region in the background (rate limited) while new writes go to both;
  when the copy is done, another brief suspend puts NEW in its place and OLD is closed.
  OLD must be readable: its data exists nowhere else.
* **A parity member** (``replaces_in_place``): NEW takes OLD's role at once and is
  rebuilt from the other members (so OLD may be dead); OLD is out from the start (the
  array is degraded until NEW is in sync).  Cancel puts OLD back in its role, rebuilt
  in turn (a dead OLD stays failed there).
* **A mirror leg**: NEW joins the mirror as an extra leg and is resynced fully from the
  legs in sync (so OLD may be dead); once NEW is in sync, OLD leaves the mirror and is
  closed.  The mirror's superblocks record every step, so after a crash assembly sees
  the mirror as it was at that moment (with NEW resyncing, or already without OLD).
  The copy is the mirror's resync (:class:`~dst.array.resync.Resyncer`).  Given the
  mirror's resyncer, the job's limit paces the copies to NEW alone
  (:meth:`~dst.array.resync.Resyncer.limit_leg`) until the job ends: the mirror's own
  resync rate is never changed, so nothing needs restoring and a ``dst resync-rate``
  meanwhile stays in force; without it NEW resyncs at the mirror's rate.

Cancel (or a failure of NEW) leaves the array as before: the ReplaceDevice is swapped
back for OLD, or the extra leg is removed again; NEW is closed and not used.  The array
spec is only changed when the replace finished: it then names NEW where OLD was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from dst import changes
from dst.array.resync import Resyncer
from dst.device import BlockDevice
from dst.errors import BlockError, ConfigError
from dst.meta.superblock import MetadataError
from dst.targets.copier import RateLimit
from dst.targets.gate import GateDevice
from dst.targets.mirror import Leg, LegState
from dst.targets.redundant import Redundant
from dst.targets.replace import ReplaceDevice

log = logging.getLogger(__name__)

COPY_REGION = 1 << 20  # bytes per step of a linear/stripe copy


class ReplaceJob:
    """One live replace of ``old`` (a node of ``parent``) by ``new`` (open).

    ``max_rate``/``min_rate`` limit the copy (see :class:`RateLimit`); for a mirror leg
    only if ``resyncer``, the mirror's, is given (NEW's resync is then paced by them).
    """

    def __init__(
        self,
        root: GateDevice,
        parent: BlockDevice,
        old: BlockDevice,
        new: BlockDevice,
        *,
        on_finished: Callable[[ReplaceJob], None],
        max_rate: float | None = None,
        min_rate: float | None = None,
        resyncer: Resyncer | None = None,
    ) -> None:
        if new.size < old.size:
            raise ConfigError(
                f"{new.name!r} ({new.size} bytes) is smaller than {old.name!r} ({old.size} bytes)",
                where="spec",
            )
        self.root, self.parent, self.old, self.new = root, parent, old, new
        self.limit = RateLimit(max_rate=max_rate, min_rate=min_rate)
        self.state = "starting"  # copying, finished, cancelled, failed
        self.error = ""
        self._on_finished = on_finished
        self._rep: ReplaceDevice | None = None
        self._mirror = parent if isinstance(parent, Redundant) else None
        self._resyncer = resyncer if self._mirror is not None else None
        self._leg_added = False  # mirror: NEW is a leg
        self._task: asyncio.Task[None] | None = None
        self._cancelled = False

    @property
    def running(self) -> bool:
        return self.state in ("starting", "copying")

    # -- control ---------------------------------------------------------------------

    async def start(self) -> None:
        """Put NEW in place to be filled and start the copy in the background."""
        mirror = self._mirror
        if mirror is not None:

            async def add() -> None:
                if mirror.replaces_in_place:  # a parity member: rebuilt in its role
                    await mirror.replace_leg(_leg_of(mirror, self.old).index, self.new)
                else:
                    await mirror.add_leg(self.new)
                self._leg_added = True

            if self._resyncer is not None:  # before NEW joins: its first region counts
                self._resyncer.limit_leg(self.new, self.limit)
            try:
                await self.root.reconfigure(add)
            except BaseException:
                self._release_limit()
                raise
        else:
            rep = ReplaceDevice(
                self.old, self.new, region_size=COPY_REGION, limit=self.limit,
                name=f"{self.old.name}->{self.new.name}",
            )  # fmt: skip
            await self._swap(self.old, rep)
            self._rep = rep
        self.state = "copying"
        self._task = asyncio.create_task(self._run(), name=f"replace {self.old.name}")

    def cancel(self) -> None:
        """Stop the copy; the array goes back to OLD (in the background)."""
        if not self.running:
            raise ConfigError(f"the replace of {self.old.name!r} is {self.state}")
        self._cancelled = True
        if self._rep is not None:
            self._rep.cancel()
        elif self._task is not None:
            self._task.cancel()

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def abort(self) -> None:
        """The array stops: stop the copy and wait (no swap back; the tree closes)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BlockError, ConfigError):
                await self._task

    def set_rate(self, *, max_rate: float | None, min_rate: float | None) -> None:
        self.limit.set(max_rate=max_rate, min_rate=min_rate)

    def progress(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "old": self.old.name, "new": self.new.name}
        if self.error:
            out["error"] = self.error
        if self._rep is not None:
            p = self._rep.progress()
            out |= {k: p[k] for k in ("regions_done", "regions_total", "rate", "eta")}
            out["bytes"] = p["bytes_copied"] + p["bytes_zeroed"]
            per_region = self._rep.region_size
        elif self._mirror is not None and self._mirror.resync_status is not None:
            r = self._mirror.resync_status()
            out |= {k: r.get(k) for k in ("regions_done", "regions_total", "rate", "eta")}
            out["bytes"] = r.get("bytes", 0)
            per_region = r.get("bytes_per_region", 0)
        else:
            return out
        size = self.old.size
        out["bytes_done"] = min((out["regions_done"] or 0) * per_region, size)
        out["bytes_total"] = min((out["regions_total"] or 0) * per_region, size)
        return out

    # -- the work --------------------------------------------------------------------

    async def _run(self) -> None:
        """Copy, then finish; or undo, and only then say how it ended (a replace that
        is still being undone is still running: no other one may start)."""
        outcome = "finished"
        try:
            if self._rep is not None:
                outcome = await self._run_copy(self._rep)
            else:
                await self._run_leg()
        except asyncio.CancelledError:
            if not self._cancelled:
                self.state = "failed"  # the array is stopping
                raise
            outcome = "cancelled"
        except (BlockError, ConfigError, MetadataError) as exc:
            outcome, self.error = "failed", str(exc)
            log.error("replace of %s by %s failed: %s", self.old.name, self.new.name, exc)
        finally:
            if outcome != "finished" or self.state == "failed":
                await self._undo()
        self.state = outcome
        self._on_finished(self)
        changes.changed()

    async def _run_copy(self, rep: ReplaceDevice) -> str:
        await rep.run()
        if rep.state != "done":
            return rep.state
        await self._swap(rep, rep.take_new())
        await self.old.close()
        log.info("replace of %s by %s finished", self.old.name, self.new.name)
        return "finished"

    async def _run_leg(self) -> None:
        mirror = self._mirror
        assert mirror is not None
        # The keeper's resyncer fills NEW; poll its state (the mirror has no event for
        # "leg in sync", and a tenth of a second is nothing next to a full copy).
        while _leg_of(mirror, self.new).state is not LegState.IN_SYNC:  # noqa: ASYNC110
            await asyncio.sleep(0.1)

        async def remove() -> None:
            await mirror.remove_leg(_leg_of(mirror, self.old).index)

        if not mirror.replaces_in_place:  # in place, OLD left when NEW took its role
            await self.root.reconfigure(remove)
        self._release_limit()
        with contextlib.suppress(BlockError, OSError):
            await self.old.close()
        log.info("replace of leg %s by %s finished", self.old.name, self.new.name)

    async def _undo(self) -> None:
        """Back to OLD after a cancel or failure; NEW is closed (unless a parity
        member's OLD cannot take its role back: NEW stays there)."""
        keep_new = False
        try:
            if self._rep is not None and self._rep.state != "finished":
                await self._swap(self._rep, self.old)
            elif self._leg_added and self._mirror is not None:
                mirror = self._mirror

                async def remove() -> None:
                    index = _leg_of(mirror, self.new).index
                    if mirror.replaces_in_place:  # OLD back in its role, rebuilt
                        await mirror.replace_leg(index, self.old)
                    else:
                        await mirror.remove_leg(index)

                try:
                    await self.root.reconfigure(remove)
                except (BlockError, ConfigError, MetadataError) as exc:
                    if not mirror.replaces_in_place:
                        raise
                    log.error("%s stays in the role of %s (%s cannot come back: %s)",
                              self.new.name, self.old.name, self.old.name, exc)  # fmt: skip
                    keep_new = True  # a member now: not closed
                    return
                self._leg_added = False
        finally:
            self._release_limit()
            if not keep_new:
                with contextlib.suppress(BlockError, OSError):
                    await self.new.close()

    def _release_limit(self) -> None:
        """NEW's resync goes back to the mirror's limit.  A copy still waiting for
        this job's limit is let go (the limit is lifted: the job is over)."""
        if self._resyncer is not None and self.new in self._resyncer.leg_limits:
            self._resyncer.limit_leg(self.new, None)
            self.limit.set(max_rate=None, min_rate=None)

    async def _swap(self, old: BlockDevice, new: BlockDevice) -> None:
        parent = self.parent

        def change() -> None:
            parent.replace_child(old, new)

        await self.root.reconfigure(change)


def _leg_of(mirror: Redundant, dev: BlockDevice) -> Leg:
    leg = next((x for x in mirror.legs if x.dev is dev), None)
    if leg is None:
        raise ConfigError(f"{dev.name!r} is no longer a leg of {mirror.name!r}")
    return leg
