"""A process-wide "the state of something changed" signal, for the event stream.

Theory of operation
-------------------
The event stream (``dst events``, :mod:`dst.array.events`) reports state changes --
a leg failed, re-added or in sync, a resync started or finished, a connection lost or
back, a replace done -- by comparing snapshots of the daemon's state.  The places that
change such state call :func:`changed` (one function call, never on the I/O path's
common case); whoever listens (:func:`listen`) takes a new snapshot soon after.  With
no listener, :func:`changed` does nothing but loop over an empty list.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

_listeners: list[Callable[[], None]] = []


def changed() -> None:
    """Something's state changed: tell the listeners (their errors are logged)."""
    for fn in list(_listeners):
        try:
            fn()
        except Exception:
            log.exception("state change listener failed")


def listen(fn: Callable[[], None]) -> Callable[[], None]:
    """Call ``fn()`` on every :func:`changed`; returns the function that stops it."""
    _listeners.append(fn)

    def stop() -> None:
        with contextlib.suppress(ValueError):
            _listeners.remove(fn)

    return stop
