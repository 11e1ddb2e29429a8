"""
Memory during and after a burst of requests.

During a burst, each full pass of CPython's cyclic collector walks every
object in flight, stopping the reactor for as long as that takes, and a
queue that grows sets off a pass each time it grows by a quarter.  So what
is in flight is frozen out of those passes each time the burst grows by
another C{BURST} requests.  Once the burst is over, it is let back in and
collected, and, on glibc, C{malloc_trim} gives the arenas back.  That runs
when a tenth of the burst or less has been in flight for a second; those
few requests see one pause of that length.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from typing import Any, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

# A burst is this many requests in flight (running or waiting) at once.
BURST = 1000
# Seconds with nothing in flight before the memory is given back.
CALM = 1.0


def _malloc_trim() -> Callable[[], Any]:
    """glibc's malloc_trim(0), or nothing where there is no such function."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


_TRIM = _malloc_trim()


def hold() -> None:
    """Leave what is alive now out of the collector's passes (C{gc.freeze}), until L{give_back}."""
    gc.freeze()


def give_back() -> None:
    """Everything back in the collector's passes, a full collection, then the C heap trimmed where the C library can."""
    gc.unfreeze()
    gc.collect()
    _TRIM()


class AfterBurst:
    """
    Calls C{hold} when the requests in flight reach C{burst}, and each time
    they grow by another C{burst} after that; calls C{release} once after they went up to
    C{burst} and then stayed at a tenth of that or fewer for C{calm} seconds.
    """

    def __init__(self, clock: IReactorTime, release: Callable[[], None] = give_back,
                 burst: int = BURST, calm: float = CALM, hold: Callable[[], None] = hold) -> None:
        self._clock = clock
        self._release = release
        self._hold = hold
        self.burst = burst
        self.calm = calm
        self._big = False
        self._held = 0  # the requests in flight when they were last held (0: not in this burst)
        self._timer: Optional[IDelayedCall] = None
        self.released = 0

    def seen(self, in_flight: int) -> None:
        """The number of requests in flight has changed to C{in_flight}."""
        if in_flight >= self.burst:
            self._big = True
            if in_flight >= self._held + self.burst:
                self._held = in_flight
                self._hold()
        low = in_flight <= self.burst // 10
        if self._timer is not None and not low:
            self._timer.cancel()
            self._timer = None
        elif self._big and low and self._timer is None:
            self._timer = self._clock.callLater(self.calm, self._calm)

    def _calm(self) -> None:
        self._timer = None
        self._big = False
        self._held = 0
        self.released += 1
        self._release()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
