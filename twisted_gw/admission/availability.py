"""
Whether the upstreams can take generations at all: not when every one of
them has been down (not loading: a server loading its model answers soon)
for C{grace} seconds, long enough for a restart to pass through.  Pure logic:
time comes from the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_gw.admission.routing import DOWN, Router


class Availability:
    """Calls C{changed(False)} once every upstream has been down for C{grace} seconds, C{changed(True)} after."""

    def __init__(self, clock: IReactorTime, router: Router, grace: float, changed: Callable[[bool], None]) -> None:
        self.clock = clock
        self.router = router
        self.grace = grace
        self.changed = changed
        self.available = True
        self._timer: Optional[IDelayedCall] = None

    def update(self) -> None:
        """The upstreams' states may have changed."""
        if all(route.state == DOWN for route in self.router.routes):
            if self.available and self._timer is None:
                self._timer = self.clock.callLater(self.grace, self._grace_over)
            return
        self.stop()
        if not self.available:
            self.available = True
            self.changed(True)

    def _grace_over(self) -> None:
        self._timer = None
        if all(route.state == DOWN for route in self.router.routes):
            self.available = False
            self.changed(False)

    def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
