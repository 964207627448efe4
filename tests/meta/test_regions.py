"""Region tracker: write intent, batching, lazy clear, out-of-sync legs, resync locks."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dst.meta import regions
from dst.meta.bitmap import Bitmap
from dst.meta.regions import MetaWrite, Out, RegionTracker

R = 65536  # region size


def tracker(nregions: int = 64, legs: int = 2, **kw: object) -> RegionTracker:
    return RegionTracker(nregions * R, R, legs, clear_delay=5.0, **kw)  # type: ignore[arg-type]


def meta(out: Out) -> MetaWrite:
    assert out.meta is not None
    return out.meta


def test_regions_of_a_request() -> None:
    t = tracker()
    assert t.regions(0, 1) == range(0, 1)
    assert t.regions(R - 1, 2) == range(0, 2)
    assert t.regions(3 * R, R) == range(3, 4)
    assert t.regions(R // 2, 3 * R) == range(0, 4)


def test_partial_last_region() -> None:
    t = RegionTracker(10 * R + 4096, R, 2)
    assert t.nregions == 11 and t.regions(10 * R, 4096) == range(10, 11)


def test_first_write_waits_for_its_mark() -> None:
    t = tracker()
    out = t.begin_write(1, 0, 4096)
    assert out.writes == [] and meta(out).batch == 1
    assert meta(out).pages[0][0] == 1  # bit 0 set in the snapshot
    assert not t.durable(0)
    assert t.persisted(1).writes == [1]
    assert t.durable(0)
    # a second write to the now dirty region needs no metadata write
    out = t.begin_write(2, 100, 10)
    assert out.writes == [2] and out.meta is None


def test_writes_during_a_batch_join_the_next_one() -> None:
    t = tracker()
    first = meta(t.begin_write(1, 0, 1))
    for wid in range(2, 12):
        out = t.begin_write(wid, wid * R, 1)
        assert out.meta is None and out.writes == []  # one batch at a time
    out = t.persisted(first.batch)
    assert out.writes == [1]
    second = meta(out)
    assert second.batch == 2
    assert t.persisted(2).writes == list(range(2, 12))  # ten writes, one metadata write


def test_a_write_arriving_checks_only_itself() -> None:
    """A greedy client's thousands of writes to fresh regions, all waiting for one
    batch: each arrival checks its own regions, not every waiting write's (the cost
    stays linear, was quadratic); the batch's end releases them all."""
    n = 2000
    t = tracker(nregions=n + 1)
    checked = 0
    durable = t.durable

    def counting(region: int) -> bool:
        nonlocal checked
        checked += 1
        return durable(region)

    t.durable = counting  # type: ignore[method-assign]
    first = meta(t.begin_write(1, 0, 1))
    for wid in range(2, n + 2):
        assert t.begin_write(wid, (wid - 1) * R, 1).writes == []
    assert checked <= n + 1  # one region each (the scan checked about n * n / 2)
    out = t.persisted(first.batch)
    assert out.writes == [1]
    assert t.persisted(meta(out).batch).writes == list(range(2, n + 2))


def test_lazy_clear() -> None:
    t = tracker()
    t.persisted(meta(t.begin_write(1, 0, 1)).batch)
    t.end_write(1, now=100.0)
    assert t.due_clears(104.0).meta is None  # not idle long enough
    clear = meta(t.due_clears(105.0))
    assert clear.pages[0][0] == 0
    # a write arriving while the clear is persisted is marked again in the next batch
    out = t.begin_write(2, 0, 1)
    assert out.writes == [] and out.meta is None
    out = t.persisted(clear.batch)
    assert out.writes == [] and meta(out).pages[0][0] == 1
    assert t.persisted(meta(out).batch).writes == [2]


def test_busy_region_is_not_cleared() -> None:
    t = tracker()
    t.persisted(meta(t.begin_write(1, 0, 1)).batch)
    t.begin_write(2, 0, 1)
    t.end_write(1, now=0.0)
    assert t.due_clears(1000.0).meta is None and t.bitmap.test(0)
    t.end_write(2, now=10.0)
    assert t.due_clears(14.0).meta is None  # idle since the last write ended
    assert t.due_clears(15.0).meta is not None


def test_failed_leg_keeps_regions_dirty_until_resynced() -> None:
    t = tracker(legs=3)
    t.persisted(meta(t.begin_write(1, 0, 1)).batch)
    t.leg_failed(2)  # write 1 is in flight: leg 2 misses region 0
    out = t.begin_write(2, 5 * R, 1)
    t.persisted(meta(out).batch)
    t.end_write(1, now=0.0)
    t.end_write(2, now=0.0)
    assert list(t.out_of_sync(2)) == [0, 5]
    assert not t.in_sync(2, 0) and not t.in_sync(2, 1)  # a down leg serves nothing
    assert t.in_sync(0, 0) and t.in_sync(1, 5)
    assert t.due_clears(1000.0).meta is None
    t.leg_attached(2)
    assert t.in_sync(2, 1) and not t.in_sync(2, 5)
    assert t.begin_resync(5).resyncs == [5]
    t.end_resync(5, now=1000.0, synced=[2])
    assert t.in_sync(2, 5)
    clear = meta(t.due_clears(2000.0))
    assert clear.pages[0][0] == 1  # region 0 still missed by leg 2, region 5 cleared


def test_write_missed_by_one_leg() -> None:
    t = tracker()
    t.persisted(meta(t.begin_write(1, 2 * R, 1)).batch)
    t.end_write(1, now=0.0, missed=[1])
    assert not t.in_sync(1, 2) and t.in_sync(0, 2)
    assert t.due_clears(100.0).meta is None


def test_leg_missed_marks_regions() -> None:
    t = tracker()
    out = t.leg_missed(1, [3, 4])
    assert meta(out).pages[0][0] == 0b11000
    assert list(t.out_of_sync(1)) == [3, 4]


def test_resync_excludes_writes() -> None:
    t = tracker()
    t.persisted(meta(t.leg_missed(1, [0, 1])).batch)
    t.begin_write(1, 0, 1)  # region 0 is durable: proceeds ...
    out = t.begin_resync(0)
    assert out.resyncs == []  # ... so the resync waits for it
    assert t.begin_write(2, 0, 1).writes == []  # new writes wait behind the resync
    assert t.begin_write(3, R, 1).writes == [3]  # other regions are not affected
    ended = t.end_write(1, now=0.0)
    assert ended is not None and ended.resyncs == [0] and ended.writes == []
    out = t.end_resync(0, now=1.0, synced=[1])
    assert out.writes == [2]


def test_write_spanning_a_resyncing_region_waits() -> None:
    t = tracker()
    t.persisted(meta(t.leg_missed(1, [0, 1])).batch)
    assert t.begin_resync(1).resyncs == [1]
    assert t.begin_write(1, R - 10, 20).writes == []
    assert t.end_resync(1, now=0.0).writes == [1]


def test_loaded_bitmap_is_durable() -> None:
    bm = Bitmap.from_bytes(64, bytes([0x80]) + bytes(4095))
    t = tracker(bitmap=bm)
    assert t.durable(7)
    assert t.begin_write(1, 7 * R, 1).writes == [1]


def test_unwritten_changes_of_a_given_bitmap_are_not_durable() -> None:
    bm = Bitmap(64)
    bm.set(7)  # set in memory, never written
    t = tracker(bitmap=bm)
    assert not t.durable(7)
    out = t.begin_write(1, 7 * R, 1)
    assert out.writes == [] and meta(out).pages[0][0] == 0x80
    assert t.persisted(meta(out).batch).writes == [1]


def test_settled_loaded_bits_are_cleared() -> None:
    bm = Bitmap.from_bytes(64, bytes([0b111000]) + bytes(4095))
    t = tracker(bitmap=bm)
    assert t.due_clears(100.0).meta is None  # loaded bits are kept until told
    t.persisted(meta(t.begin_write(1, 20 * R, 1)).batch)
    t.settled([3, 4, 20], now=100.0)  # 20 is busy: ignored
    out = t.due_clears(105.0)
    assert meta(out).pages[0][0] == 0b100000
    assert list(t.bitmap) == [5, 20]


def test_unallocatable_page_waits_for_its_all_ones_write() -> None:
    t = tracker(nregions=256, page_bits=64, max_pages=1)
    t.persisted(meta(t.begin_write(1, 0, 1)).batch)
    out = t.begin_write(2, 64 * R, 1)  # page 1 cannot be allocated: goes full
    assert out.writes == [] and meta(out).pages[1] == b"\xff" * 8
    assert t.begin_write(3, 70 * R, 1).writes == []  # reads set, but not yet on disk
    assert t.persisted(meta(out).batch).writes == [2, 3]
    assert t.begin_write(4, 100 * R, 1).writes == [4]


def test_loaded_full_page_is_rewritten_before_use() -> None:
    raw = bytes([1]) + bytes(7) + bytes([2]) + bytes(7)
    bm = Bitmap.from_bytes(128, raw, page_bits=64, max_pages=1)
    t = RegionTracker(128 * R, R, 2, bitmap=bm, max_pages=1)
    out = t.begin_write(1, 80 * R, 1)
    assert out.writes == [] and meta(out).pages == {1: b"\xff" * 8}
    assert t.persisted(meta(out).batch).writes == [1]


def test_fast_path_only_on_durable_marks() -> None:
    t = tracker()
    assert not t.try_begin_write(1, 0, 4096)  # not marked: nothing registered
    out = t.begin_write(1, 0, 4096)
    assert out.writes == [] and not t.try_begin_write(2, 0, 4096)  # mark not yet on disk
    assert t.persisted(meta(out).batch).writes == [1]
    assert t.try_begin_write(3, 0, 4096)  # marked and durable: proceeds, no batch
    assert not t.try_begin_write(4, R - 1, 2)  # region 1 is not marked
    assert t.end_write(3, 1.0) is None and t.end_write(1, 1.0) is None  # nothing released
    out = t.begin_resync(0)
    assert out.resyncs == [0] and not t.try_begin_write(5, 0, 4096)  # resync lock
    t.end_resync(0, 2.0)
    assert t.try_begin_write(6, 0, 4096)
    assert t.begin_resync(0).resyncs == []  # waits for write 6...
    ended = t.end_write(6, 3.0)
    assert ended is not None and ended.resyncs == [0]  # ...which releases it on end


def test_fast_path_write_is_missed_by_a_failing_leg() -> None:
    t = tracker()
    t.persisted(meta(t.begin_write(1, 0, 4096)).batch)
    t.end_write(1, 1.0)
    assert t.try_begin_write(2, 0, 4096)
    t.leg_failed(1)  # fails while write 2 is in flight: it misses region 0
    assert not t.in_sync(1, 0) and t.bitmap.test(0)
    t.end_write(2, 2.0)
    assert t.due_clears(100.0).meta is None and t.bitmap.test(0)  # never cleared


def test_fast_path_after_a_clear_and_a_bulk_mark() -> None:
    """What the fast path found ready does not outlive a cleared bit or a bulk mark."""
    t = tracker()
    t.persisted(meta(t.begin_write(1, 0, 4096)).batch)
    t.end_write(1, 1.0)
    assert t.try_begin_write(2, 0, 4096)  # found ready
    t.end_write(2, 2.0)
    t.persisted(meta(t.due_clears(100.0)).batch)  # region 0 cleared
    assert not t.bitmap.test(0) and not t.try_begin_write(3, 0, 4096)
    t.persisted(meta(t.begin_write(4, 0, 4096)).batch)
    t.end_write(4, 101.0)
    assert t.try_begin_write(5, 0, 4096)
    t.end_write(5, 102.0)
    out = t.leg_missed(1, range(0, 3))  # region 0's page persisted again: writes wait
    assert out.meta is not None and not t.try_begin_write(6, 0, 4096)
    t.persisted(out.meta.batch)
    assert t.try_begin_write(7, 0, 4096)


def test_regions_remembered_as_ready_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(regions, "READY_MAX", 4)
    t = tracker()
    out = t.leg_missed(1, range(0, 10))  # ten regions marked (leg 1 misses them)
    t.persisted(meta(out).batch)
    for wid in range(1, 11):
        assert t.try_begin_write(wid, (wid - 1) * R, 4096)
        assert len(t._ready) <= 4
    for wid in range(11, 21):  # forgotten or not, every region is still admitted
        assert t.try_begin_write(wid, (wid - 11) * R, 4096)


def _write(t: RegionTracker, wid: int, region: int, now: float) -> None:
    out = t.begin_write(wid, region * R, 4096)
    if out.meta is not None:
        out = t.persisted(out.meta.batch)
    assert wid in out.writes
    t.end_write(wid, now)


def test_clear_delay_backs_off_for_regions_marked_again_soon() -> None:
    t = tracker()  # clear_delay 5
    _write(t, 1, 0, 0.0)
    t.persisted(meta(t.due_clears(5.0)).batch)  # idle 5 s: cleared
    assert not t.bitmap.test(0)
    _write(t, 2, 0, 6.0)  # marked again right after: next delay 10 s
    assert t.due_clears(12.0).meta is None and t.bitmap.test(0)
    t.persisted(meta(t.due_clears(16.0)).batch)
    assert not t.bitmap.test(0)
    _write(t, 3, 0, 17.0)  # again: 20 s
    assert t.due_clears(36.0).meta is None and t.bitmap.test(0)
    t.persisted(meta(t.due_clears(37.0)).batch)
    t.due_clears(37.0 + 5 * 8)  # stayed clean for the longest delay: forgotten
    _write(t, 4, 0, 100.0)
    assert t.due_clears(105.0).meta is not None  # back to the base delay


# --- model-based property test -----------------------------------------------------

NREG, LEGS, PAGE = 200, 3, 64


class TrackerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t: RegionTracker | None = None
        self.now = 0.0
        self.disk = Bitmap(NREG, page_bits=PAGE)  # what the members hold
        self.pending: MetaWrite | None = None
        self.waiting: dict[int, range] = {}
        self.active: dict[int, range] = {}
        self.rs_wait: set[int] = set()
        self.rs_held: set[int] = set()
        self.rs_set: set[int] = set()  # resync regions whose bit was set at begin
        self.missed: list[set[int]] = [set() for _ in range(LEGS)]
        self.down: set[int] = set()
        self.next_id = 0
        # per leg, the out-of-sync pages that ever read as full (no memory for them):
        # clearing a bit there leaves the rest of the page set, so they may over-report
        self.ever_full: list[set[int]] = [set() for _ in range(LEGS)]

    @property
    def tr(self) -> RegionTracker:
        assert self.t is not None
        return self.t

    @precondition(lambda self: self.t is None)
    @rule(max_pages=st.sampled_from([None, 1, 2]))
    def start(self, max_pages: int | None) -> None:
        self.t = RegionTracker(NREG * R, R, LEGS, clear_delay=3.0, page_bits=PAGE,
                               max_pages=max_pages)  # fmt: skip

    def apply(self, out: Out | None) -> None:
        if out is None:
            return
        for wid in out.writes:
            self.active[wid] = self.waiting.pop(wid)
        for r in out.resyncs:
            self.rs_wait.remove(r)
            self.rs_held.add(r)
        if out.meta is not None:
            assert self.pending is None, "two metadata batches in flight"
            self.pending = out.meta

    @precondition(lambda self: self.t is not None)
    @rule(first=st.integers(0, NREG - 1), n=st.integers(1, 3), fast=st.booleans())
    def begin_write(self, first: int, n: int, fast: bool) -> None:
        wid, self.next_id = self.next_id, self.next_id + 1
        length = min(n * R, (NREG - first) * R) - 7
        self.waiting[wid] = self.tr.regions(first * R + 3, length)
        for leg in self.down:
            self.missed[leg].update(self.waiting[wid])
        if fast and self.tr.try_begin_write(wid, first * R + 3, length):
            self.active[wid] = self.waiting.pop(wid)  # the hot path: granted at once
            return
        self.apply(self.tr.begin_write(wid, first * R + 3, length))

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def end_write(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(sorted(self.active)))
        missed = data.draw(st.sets(st.integers(0, LEGS - 1), max_size=1))
        for leg in missed:
            self.missed[leg].update(self.active[wid])
        del self.active[wid]
        self.apply(self.tr.end_write(wid, self.now, missed=missed))

    @precondition(lambda self: self.pending is not None)
    @rule()
    def persist(self) -> None:
        assert self.pending is not None
        for p, data in self.pending.pages.items():
            self.disk.load_page(p, data)
        batch, self.pending = self.pending.batch, None
        self.apply(self.tr.persisted(batch))

    @precondition(lambda self: self.t is not None)
    @rule(leg=st.integers(0, LEGS - 1))
    def fail_leg(self, leg: int) -> None:
        self.down.add(leg)
        for rs in (*self.waiting.values(), *self.active.values()):
            self.missed[leg].update(rs)
        self.apply(self.tr.leg_failed(leg))

    @precondition(lambda self: self.down)
    @rule(data=st.data())
    def attach_leg(self, data: st.DataObject) -> None:
        leg = data.draw(st.sampled_from(sorted(self.down)))
        self.down.discard(leg)
        self.tr.leg_attached(leg)

    @precondition(lambda self: self.t is not None)
    @rule(leg=st.integers(0, LEGS - 1), first=st.integers(0, NREG - 1), n=st.integers(1, 70))
    def leg_missed(self, leg: int, first: int, n: int) -> None:
        missed = range(first, min(first + n, NREG))
        self.missed[leg].update(missed)
        self.apply(self.tr.leg_missed(leg, missed))

    @precondition(lambda self: self.t is not None)
    @rule(first=st.integers(0, NREG - 1), n=st.integers(1, 3))
    def mark_unsynced(self, first: int, n: int) -> None:
        self.apply(self.tr.mark_unsynced(range(first, min(first + n, NREG))))

    @precondition(lambda self: self.t is not None)
    @rule(r=st.integers(0, NREG - 1))
    def begin_resync(self, r: int) -> None:
        if r in self.rs_wait or r in self.rs_held:
            return
        self.rs_wait.add(r)
        if self.tr.bitmap.test(r):
            self.rs_set.add(r)
        self.apply(self.tr.begin_resync(r))

    @precondition(lambda self: self.rs_held)
    @rule(data=st.data())
    def end_resync(self, data: st.DataObject) -> None:
        r = data.draw(st.sampled_from(sorted(self.rs_held)))
        synced = [leg for leg in range(LEGS) if leg not in self.down]
        for leg in synced:
            self.missed[leg].discard(r)
        self.rs_held.remove(r)
        self.rs_set.discard(r)
        self.apply(self.tr.end_resync(r, self.now, synced=synced))

    @precondition(lambda self: self.t is not None)
    @rule(dt=st.sampled_from([0.0, 1.0, 5.0]))
    def clear(self, dt: float) -> None:
        self.now += dt
        self.apply(self.tr.due_clears(self.now))

    # --- invariants ----------------------------------------------------------------

    @invariant()
    def writes_only_on_persisted_marks(self) -> None:
        for rs in self.active.values():
            for r in rs:
                assert self.disk.test(r), f"write proceeds on region {r} not marked on disk"

    @invariant()
    def ready_means_writable(self) -> None:
        """What the fast path remembers as ready is: marked on disk, no resync."""
        if self.t is not None:
            for r in self.tr._ready:
                assert self.disk.test(r) and self.tr.durable(r)
                assert r not in self.rs_wait and r not in self.rs_held

    @invariant()
    def durable_means_on_disk(self) -> None:
        if self.t is not None:
            assert all(self.disk.test(r) for r in range(NREG) if self.tr.durable(r))

    @invariant()
    def held_regions_stay_set(self) -> None:
        if self.t is None:
            return
        for rs in (*self.waiting.values(), *self.active.values()):
            assert all(self.tr.bitmap.test(r) for r in rs)
        assert all(self.tr.bitmap.test(r) for r in self.rs_set)

    @invariant()
    def resync_excludes_writes(self) -> None:
        for rs in self.active.values():
            assert not (set(rs) & self.rs_held)

    @invariant()
    def missed_regions_are_never_clean(self) -> None:
        if self.t is None:
            return
        for leg in range(LEGS):
            for r in self.missed[leg]:
                assert not self.tr.in_sync(leg, r)
                assert self.tr.bitmap.test(r)
                assert not self.tr.durable(r) or self.disk.test(r)
            oos = self.tr.oos[leg]
            self.ever_full[leg].update(p for p in range(oos.npages) if oos.is_full(p))
            for r in range(NREG):
                if leg not in self.down and r not in self.missed[leg]:
                    # only a page that could not be allocated (now or before: a bit
                    # cleared in a full page leaves the others set) may over-report
                    assert self.tr.in_sync(leg, r) or r // PAGE in self.ever_full[leg]

    @invariant()
    def no_stall(self) -> None:
        """With no batch in flight, a write waits only behind a resync."""
        if self.t is None or self.tr.busy():
            return
        assert self.pending is None
        blocked = self.rs_wait | self.rs_held
        for rs in self.waiting.values():
            assert set(rs) & blocked
        for r in self.rs_wait:
            assert any(r in rs for rs in self.active.values())


TrackerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60)
test_tracker_machine = TrackerMachine.TestCase


def test_construct_requires_matching_bitmap() -> None:
    with pytest.raises(AssertionError):
        RegionTracker(10 * R, R, 2, bitmap=Bitmap(11))
