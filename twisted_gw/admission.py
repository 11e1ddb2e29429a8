"""
Admission to the upstream: a L{DeferredSemaphore} of C{max_concurrent} places
and a visible FIFO of the requests waiting for one.

Each waiter is told its position (1 = next to run) when it starts waiting and
again whenever it changes.  Cancelling a waiter's L{Deferred} (the client left)
removes it at once and moves everyone behind it up.  Pure logic: no reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.python.failure import Failure

PositionCallback = Callable[[int], None]


@attrs.define(eq=False)
class Ticket:
    """A place held in the upstream's concurrency limit; release it exactly once."""

    _semaphore: DeferredSemaphore
    waited: bool
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._semaphore.release()


@attrs.define(eq=False)
class _Waiter:
    on_position: Optional[PositionCallback]
    position: int = 0


class Admission:
    """The generation queue in front of the upstream."""

    def __init__(self, limit: int) -> None:
        self._semaphore = DeferredSemaphore(limit)
        self._waiters: list[_Waiter] = []

    @property
    def limit(self) -> int:
        return self._semaphore.limit

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def active(self) -> int:
        return self._semaphore.limit - self._semaphore.tokens

    @property
    def free(self) -> int:
        return self._semaphore.tokens

    def acquire(self, on_position: Optional[PositionCallback] = None) -> Deferred[Ticket]:
        """
        Wait for a place.  Fires with a L{Ticket}; C{on_position} is called with
        the waiter's position when it has to wait and whenever that changes.
        Cancel the result to give up the place in the queue.
        """
        inner = self._semaphore.acquire()
        if inner.called:
            return inner.addCallback(lambda _: Ticket(self._semaphore, waited=False))
        waiter = _Waiter(on_position)
        self._waiters.append(waiter)
        self._tell(waiter, len(self._waiters))

        def left_queue(result: object) -> object:
            self._waiters.remove(waiter)
            self._renumber()
            if isinstance(result, Failure):
                return result
            return Ticket(self._semaphore, waited=True)

        inner.addBoth(left_queue)
        return inner  # type: ignore[return-value]

    def _renumber(self) -> None:
        for index, waiter in enumerate(self._waiters, start=1):
            self._tell(waiter, index)

    @staticmethod
    def _tell(waiter: _Waiter, position: int) -> None:
        if waiter.position != position:
            waiter.position = position
            if waiter.on_position is not None:
                waiter.on_position(position)


__all__ = ["Admission", "CancelledError", "Ticket"]
