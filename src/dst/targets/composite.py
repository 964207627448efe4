"""Helpers shared by the composite targets (linear, stripe, mirror).

* :func:`intersect_caps` — what a composite can promise given its children.
* :func:`status_over` — block status of a request split into pieces, mapped back to
  array order and merged; stops at the first piece a child answered only partly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dst.aio import gather_all
from dst.device import BlockDevice, Capabilities, Extent, Health
from dst.targets.layout import Piece

STATUS_PIECES = 64  # block_status queries at most this many pieces per request


def intersect_caps(devs: Sequence[BlockDevice]) -> Capabilities:
    """Capabilities a composite over ``devs`` can declare.

    Read-only if any child is; flush/FUA/trim/fast zero/multi-conn only if every
    child has them; cache and block status if any child has them (both are advisory
    or default to a correct answer); block sizes are the strictest.
    """
    caps = [d.caps for d in devs]
    return Capabilities(
        read_only=any(c.read_only for c in caps),
        flush=all(c.flush for c in caps),
        fua=all(c.fua for c in caps),
        trim=all(c.trim for c in caps),
        zeroes=all(c.zeroes for c in caps),
        fast_zero=all(c.fast_zero for c in caps),
        cache=any(c.cache for c in caps),
        multi_conn=all(c.multi_conn for c in caps),
        block_status=any(c.block_status for c in caps),
        min_block=max(c.min_block for c in caps),
        pref_block=max(c.pref_block for c in caps),
        max_block=min(c.max_block for c in caps),
    )


def merge_extents(extents: Sequence[Extent]) -> list[Extent]:
    """Adjacent extents with the same flags joined."""
    out: list[Extent] = []
    for e in extents:
        if out and (out[-1].hole, out[-1].zero) == (e.hole, e.zero):
            out[-1] = Extent(out[-1].length + e.length, e.hole, e.zero)
        elif e.length > 0:
            out.append(e)
    return out


async def status_over(pieces: Sequence[Piece], devs: Sequence[BlockDevice]) -> list[Extent]:
    """Block status of consecutive ``pieces`` (``devs[p.member]`` answers for ``p``)."""
    pieces = pieces[:STATUS_PIECES]
    answers = await gather_all(
        [devs[p.member].block_status(p.member_offset, p.length) for p in pieces]
    )
    out: list[Extent] = []
    for p, extents in zip(pieces, answers, strict=True):
        left = p.length
        for e in extents:
            if left <= 0:
                break
            out.append(Extent(min(e.length, left), e.hole, e.zero))
            left -= e.length
        if left > 0:  # the child covered only part of the piece: stop here
            break
    return merge_extents(out)


def unique(devs: Sequence[BlockDevice]) -> list[BlockDevice]:
    """``devs`` without repeats (a device may back several segments), in order."""
    seen: set[int] = set()
    out: list[BlockDevice] = []
    for d in devs:
        if id(d) not in seen:
            seen.add(id(d))
            out.append(d)
    return out


HEALTHY = frozenset({"ok", "connected"})  # a child in these states serves normally


def combined_health(devs: Sequence[BlockDevice]) -> Health:
    """Health of a non-redundant composite: ``failed`` if a child failed, ``degraded``
    if a child is anything else but healthy (``ok``, or a node ``connected``); the
    children's health in ``detail``."""
    kids: list[dict[str, Any]] = []
    for d in devs:
        h = d.health()
        kids.append({"name": d.name, "state": h.state, **h.detail})
    states = {k["state"] for k in kids}
    state = "failed" if "failed" in states else "ok" if states <= HEALTHY else "degraded"
    return Health(state, {"children": kids})
