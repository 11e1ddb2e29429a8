"""
Admission to the upstream: a L{DeferredSemaphore} of C{max_concurrent} places
and a visible, bounded FIFO of the requests waiting for one.

Each waiter is told its position (1 = next to run) when it starts waiting and
again whenever it changes.  Cancelling a waiter's L{Deferred} (the client left)
removes it at once and moves everyone behind it up.  A waiter that waits longer
than C{queue_timeout} fails with L{QueueTimeout}; an arrival that finds
C{max_queue} waiters fails at once with L{QueueFull}; after L{close}, every
waiter and arrival fails with L{ShuttingDown}.  Pure logic: time comes from
the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

PositionCallback = Callable[[int], None]


class QueueFull(Exception):
    """The queue already holds C{max_queue} waiters."""


class QueueTimeout(Exception):
    """The request waited C{queue_timeout} seconds without getting a place."""


class ShuttingDown(Exception):
    """The gateway is shutting down and admits nothing more."""


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
    ended_by: Optional[Exception] = None
    timer: Optional[IDelayedCall] = None


class Admission:
    """The generation queue in front of the upstream."""

    def __init__(
        self, limit: int, clock: IReactorTime, max_queue: int = 100, queue_timeout: float = 600.0
    ) -> None:
        self._semaphore = DeferredSemaphore(limit)
        self.clock = clock
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.closed = False
        self._waiters: list[tuple[_Waiter, Deferred[DeferredSemaphore]]] = []

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
        if self.closed:
            return fail(ShuttingDown())
        if self._semaphore.tokens == 0 and len(self._waiters) >= self.max_queue:
            return fail(QueueFull())
        inner = self._semaphore.acquire()
        if inner.called:
            return inner.addCallback(lambda _: Ticket(self._semaphore, waited=False))
        waiter = _Waiter(on_position)
        self._waiters.append((waiter, inner))
        waiter.timer = self.clock.callLater(self.queue_timeout, self._end, waiter, inner, QueueTimeout())
        self._tell(waiter, len(self._waiters))

        def left_queue(result: object) -> object:
            self._waiters.remove((waiter, inner))
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            self._renumber()
            if isinstance(result, Failure):
                if waiter.ended_by is not None and result.check(CancelledError):
                    return Failure(waiter.ended_by)
                return result
            return Ticket(self._semaphore, waited=True)

        inner.addBoth(left_queue)
        return inner  # type: ignore[return-value]

    def close(self) -> None:
        """Admit nothing more; every waiter fails with L{ShuttingDown}."""
        self.closed = True
        for waiter, inner in list(self._waiters):
            self._end(waiter, inner, ShuttingDown())

    @staticmethod
    def _end(waiter: _Waiter, inner: Deferred[DeferredSemaphore], reason: Exception) -> None:
        waiter.ended_by = reason
        inner.cancel()

    def _renumber(self) -> None:
        for index, (waiter, _) in enumerate(self._waiters, start=1):
            self._tell(waiter, index)

    @staticmethod
    def _tell(waiter: _Waiter, position: int) -> None:
        if waiter.position != position:
            waiter.position = position
            if waiter.on_position is not None:
                waiter.on_position(position)
