"""
Admission to the upstream: a L{DeferredSemaphore} of C{max_concurrent} places,
and in front of it a fair, bounded queue of the requests waiting for one.

Waiting requests are kept per user and handed the next free place by
start-time fair queuing (L{twisted_gw.fairness}), weighted per user; within one
user, first come first served.  Each waiter is told its position (1 = next to
run) when it starts waiting and whenever it changes.  Cancelling a waiter's
L{Deferred} (the client left) removes it at once.  A waiter that waits longer
than C{queue_timeout} fails with L{QueueTimeout}; an arrival that finds
C{max_queue} waiters, or its user's C{max_queued}, fails at once with
L{QueueFull}; after L{close}, every waiter and arrival fails with
L{ShuttingDown}.  A user at its C{max_concurrent} is skipped until one of its
requests ends.  Pure logic: time comes from the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_gw.fairness import Entry, FairScheduler

PositionCallback = Callable[[int], None]


class QueueFull(Exception):
    """The queue (or the user's share of it) is full."""

    def __init__(self, per_user: bool = False) -> None:
        super().__init__("per-user queue limit" if per_user else "queue limit")
        self.per_user = per_user


class QueueTimeout(Exception):
    """The request waited C{queue_timeout} seconds without getting a place."""


class ShuttingDown(Exception):
    """The gateway is shutting down and admits nothing more."""


@attrs.define(eq=False)
class Ticket:
    """A place held in the upstream's concurrency limit; release it exactly once."""

    _admission: Admission
    user: str
    waited: bool
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._released(self.user)


@attrs.define(eq=False)
class _Waiter:
    entry: Entry
    deferred: Deferred[Ticket]
    on_position: Optional[PositionCallback]
    timer: Optional[IDelayedCall] = None
    position: int = 0


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
        self._scheduler = FairScheduler()
        self._waiters: dict[Entry, _Waiter] = {}
        self._running: dict[str, int] = {}
        self._caps: dict[str, Optional[int]] = {}

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

    def running_of(self, user: str) -> int:
        return self._running.get(user, 0)

    def positions_of(self, user: str) -> list[int]:
        """Queue positions of C{user}'s waiting requests."""
        return [i for i, e in enumerate(self._scheduler.order(), start=1) if e.user == user]

    def waiting_users(self) -> list[str]:
        """Who waits, in queue order."""
        return self._scheduler.users_waiting()

    def _can_run(self, user: str) -> bool:
        cap = self._caps.get(user)
        return cap is None or self._running.get(user, 0) < cap

    def acquire(
        self,
        on_position: Optional[PositionCallback] = None,
        *,
        user: str = "",
        weight: float = 1.0,
        max_concurrent: Optional[int] = None,
        max_queued: Optional[int] = None,
    ) -> Deferred[Ticket]:
        """
        Wait for a place.  Fires with a L{Ticket}; C{on_position} is called with
        the waiter's position when it has to wait and whenever that changes.
        Cancel the result to give up the place in the queue.
        """
        if self.closed:
            return fail(ShuttingDown())
        self._caps[user] = max_concurrent
        if self._semaphore.tokens > 0 and self._can_run(user):
            self._scheduler.admit_now(user, weight)
            return succeed(self._grant(user, waited=False))
        if len(self._waiters) >= self.max_queue:
            return fail(QueueFull())
        if max_queued is not None and self._scheduler.waiting_of(user) >= max_queued:
            return fail(QueueFull(per_user=True))
        entry = self._scheduler.enqueue(user, weight)
        d: Deferred[Ticket] = Deferred(lambda _: self._leave(waiter))
        waiter = _Waiter(entry, d, on_position)
        self._waiters[entry] = waiter
        waiter.timer = self.clock.callLater(self.queue_timeout, self._expire, waiter, QueueTimeout)
        self._renumber()
        return d

    def _grant(self, user: str, waited: bool) -> Ticket:
        taken = self._semaphore.acquire()
        assert taken.called, "granted only while the semaphore has a free token"
        self._running[user] = self._running.get(user, 0) + 1
        return Ticket(self, user, waited)

    def _leave(self, waiter: _Waiter) -> None:
        """Take a waiter out of the queue (its Deferred is being cancelled or failed)."""
        if self._waiters.pop(waiter.entry, None) is None:
            return
        self._scheduler.remove(waiter.entry)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        self._dispatch()
        self._renumber()

    def _expire(self, waiter: _Waiter, error: type[Exception]) -> None:
        self._leave(waiter)
        waiter.deferred.errback(error())

    def close(self) -> None:
        """Admit nothing more; every waiter fails with L{ShuttingDown}."""
        self.closed = True
        for waiter in list(self._waiters.values()):
            self._expire(waiter, ShuttingDown)

    def _released(self, user: str) -> None:
        self._running[user] -= 1
        if not self._running[user]:
            del self._running[user]
        self._semaphore.release()
        self._dispatch()
        self._renumber()

    def _dispatch(self) -> None:
        while self._semaphore.tokens > 0:
            entry = self._scheduler.pop_next(self._can_run)
            if entry is None:
                return
            waiter = self._waiters.pop(entry)
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.callback(self._grant(entry.user, waited=True))

    def _renumber(self) -> None:
        for index, entry in enumerate(self._scheduler.order(), start=1):
            waiter = self._waiters[entry]
            if waiter.position != index:
                waiter.position = index
                if waiter.on_position is not None:
                    waiter.on_position(index)
