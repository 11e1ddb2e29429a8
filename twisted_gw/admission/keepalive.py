"""
Keepalive comments for the streams waiting in the queue, from one timer.

A timer per waiting stream costs memory, and timers started together fire
together: ten thousand streams that arrived in the same second would all be
written to in one reactor turn every interval.  Here one L{LoopingCall} ticks
every C{tick} seconds while anyone waits, and writes to the streams that are
due, oldest first, at most C{per_tick} of them a tick (the rest are a tick
late; the defaults write 1000 a second, enough for 15,000 streams at 15 s).
Pure logic: time comes from the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


class Keepalives:
    """Calls each registered C{write} every C{interval} seconds until it is discarded."""

    def __init__(self, clock: IReactorTime, interval: float, tick: float = 0.01, per_tick: int = 10) -> None:
        self.clock = clock
        self.interval = interval
        self.tick = min(tick, interval)
        self.per_tick = per_tick
        # insertion order is due order: each entry is re-inserted at the end when written
        self._due: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._loop: Optional[LoopingCall] = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: Hashable, write: Callable[[], None]) -> None:
        """Write to C{key} every C{interval} seconds from now."""
        self._due[key] = (self.clock.seconds() + self.interval, write)
        if self._loop is None:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self.clock
            self._loop.start(self.tick, now=False)

    def discard(self, key: Hashable) -> None:
        self._due.pop(key, None)
        if not self._due and self._loop is not None:
            self._loop.stop()
            self._loop = None

    def _tick(self) -> None:
        now = self.clock.seconds()
        ready: list[tuple[Hashable, Callable[[], None]]] = []
        for key, (due, write) in self._due.items():
            if due > now + 1e-6 or len(ready) >= self.per_tick:  # (the clock's sums of ticks are inexact)
                break
            ready.append((key, write))
        for key, write in ready:
            if key in self._due:  # a write may have ended another stream
                del self._due[key]
                self._due[key] = (now + self.interval, write)
                write()
