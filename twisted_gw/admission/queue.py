"""
Admission to the upstreams: their places (L{twisted_gw.admission.routing}), and in front
of them one fair, bounded queue of the requests waiting for one.

Waiting requests are kept per user and handed the next free place by
start-time fair queuing (L{twisted_gw.admission.fairness}), weighted per user; within one
user, first come first served.  Each waiter is told its position (1 = next to
run) when it starts waiting and whenever it changes; with a
C{position_interval}, changes are told in passes at most that often (a burst
of arrivals or departures in a long queue costs one pass, not one per change).  Cancelling a waiter's
L{Deferred} (the client left) removes it at once.  A waiter that waits longer
than C{queue_timeout} fails with L{QueueTimeout}; an arrival that finds
C{max_queue} waiters, or its user's C{max_queued}, fails at once with
L{QueueFull}; after L{close}, every waiter and arrival fails with
L{ShuttingDown}.  A user at its C{max_concurrent} is skipped until one of its
requests ends, and so is a request whose model only busy or unhealthy
upstreams serve.  A granted place is on one upstream, the one with the most
free places (L{Router.choose}).  Whatever changes what could run (a release,
an upstream's health or places) goes through L{Admission.changed}.  Pure
logic: time comes from the injected clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Optional, Union

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_gw.admission.fairness import Entry, FairScheduler
from twisted_gw.admission.routing import Decision, Route, Router

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


class NoUpstream(Exception):
    """Every upstream has been down for a while: nothing is admitted until one is back."""


@attrs.define(eq=False)
class Ticket:
    """A place held on one upstream (L{route}); release it exactly once."""

    _admission: Admission
    user: str
    waited: bool
    route: Route
    released: bool = False
    lease: str = ""  # its name in a shared store (L{twisted_gw.admission.shared})

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._released(self)


@attrs.define(eq=False)
class _Waiter:
    """One request in the queue; also its Deferred's canceller (no closure per waiter: thousands may wait)."""

    admission: Admission
    entry: Entry
    on_position: Optional[PositionCallback]
    model: Optional[str] = None
    exclude: frozenset[Route] = frozenset()
    deadline: float = 0.0
    prompt: tuple[int, ...] = ()  # its prompt's block hashes, for cache-aware routing
    position: int = 0
    weight: float = 1.0
    first: bool = False
    cap: Optional[int] = None  # its user's max_concurrent
    lease: str = ""  # its name in a shared store...
    prefer: str = ""  # ...and the upstream holding its prompt's prefix there, if any
    share: float = 0.0  # (how much of the prompt that upstream holds)
    deferred: Deferred[Ticket] = attrs.field(init=False)

    def __call__(self, deferred: Deferred[Ticket]) -> None:
        self.admission._leave(self)


class Admission:
    """The generation queue in front of the upstream."""

    def __init__(
        self, places: Union[int, Router], clock: IReactorTime, max_queue: int = 100, queue_timeout: float = 600.0,
        position_interval: float = 0.0,
    ) -> None:
        self.router = Router.single(places) if isinstance(places, int) else places
        self.position_interval = position_interval
        self._last_pass = float("-inf")
        self._next_pass: Optional[IDelayedCall] = None
        self.clock = clock
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.closed = False
        self.no_upstream = False
        self._scheduler = FairScheduler()
        self._waiters: dict[Entry, _Waiter] = {}
        self._running: dict[str, int] = {}
        self._caps: dict[str, Optional[int]] = {}
        # Waiters in arrival order, so by deadline (the timeout is the same for all):
        # one timer for the earliest instead of one per waiter (thousands may wait).
        self._deadlines: deque[_Waiter] = deque()
        self._sweep: Optional[IDelayedCall] = None

    @property
    def limit(self) -> int:
        """The concurrency total: the places of the healthy upstreams."""
        return self.router.places

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def active(self) -> int:
        return self.router.active

    @property
    def free(self) -> int:
        return self.router.free

    # The queue of all the gateways sharing it (L{twisted_gw.admission.shared}); alone: this one's.
    @property
    def cluster_waiting(self) -> int:
        return self.waiting

    @property
    def cluster_active(self) -> int:
        return self.active

    def cluster_document(self) -> Optional[dict[str, object]]:
        """The C{cluster} section of C{/metrics} (none alone)."""
        return None

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

    def _route_for(self, entry: Entry) -> Optional[Decision]:
        """Where C{entry} would run now, if it may: a free place for its model, its user under its cap."""
        if not self._can_run(entry.user):
            return None
        waiter = self._waiters[entry]
        return self.router.decide(waiter.model, waiter.exclude, waiter.prompt)

    def acquire(
        self,
        on_position: Optional[PositionCallback] = None,
        *,
        user: str = "",
        weight: float = 1.0,
        max_concurrent: Optional[int] = None,
        max_queued: Optional[int] = None,
        model: Optional[str] = None,
        exclude: frozenset[Route] = frozenset(),
        first: bool = False,
        prompt: tuple[int, ...] = (),
    ) -> Deferred[Ticket]:
        """
        Wait for a place on an upstream that serves C{model}, other than
        C{exclude}.  Fires with a L{Ticket}; C{on_position} is called with the
        waiter's position when it has to wait and whenever that changes.
        Cancel the result to give up the place in the queue.  C{first}: a
        request that was admitted already and lost its upstream (failover)
        goes to the head of the queue, past the queue limits.
        """
        if self.closed:
            return fail(ShuttingDown())
        if self.no_upstream:
            return fail(NoUpstream())
        self._caps[user] = max_concurrent
        route = self.router.choose(model, exclude, prompt) if self._can_run(user) else None
        if route is not None:
            if not first:
                self._scheduler.admit_now(user, weight)
            return succeed(self._grant(user, route, waited=first))
        if not first:
            if len(self._waiters) >= self.max_queue:
                return fail(QueueFull())
            if max_queued is not None and self._scheduler.waiting_of(user) >= max_queued:
                return fail(QueueFull(per_user=True))
        waiter = self._queue(user, weight, first, on_position, model, exclude, prompt, max_concurrent)
        self._tell_positions()
        return waiter.deferred

    def _queue(self, user: str, weight: float, first: bool, on_position: Optional[PositionCallback],
               model: Optional[str], exclude: frozenset[Route], prompt: tuple[int, ...],
               cap: Optional[int]) -> _Waiter:
        """A new waiter, in the queue (its Deferred is its C{deferred})."""
        entry = self._scheduler.enqueue_first(user) if first else self._scheduler.enqueue(user, weight)
        waiter = _Waiter(self, entry, on_position, model, exclude, self.clock.seconds() + self.queue_timeout,
                         prompt=prompt, weight=weight, first=first, cap=cap)
        d: Deferred[Ticket] = Deferred(waiter)
        waiter.deferred = d
        self._waiters[entry] = waiter
        self._deadlines.append(waiter)
        if self._sweep is None:
            self._sweep = self.clock.callLater(self.queue_timeout, self._expire_due)
        return waiter

    def _grant(self, user: str, route: Route, waited: bool, lease: str = "") -> Ticket:
        assert route.free > 0, "granted only where a place is free"
        route.active += 1
        self._running[user] = self._running.get(user, 0) + 1
        return Ticket(self, user, waited, route, lease=lease)

    def _leave(self, waiter: _Waiter) -> None:
        """Take a waiter out of the queue (its Deferred is being cancelled or failed)."""
        if self._waiters.pop(waiter.entry, None) is None:
            return
        self._scheduler.remove(waiter.entry)
        self._gone(waiter)
        self.changed()

    def _gone(self, waiter: _Waiter) -> None:
        """A waiter is out of the queue: its deadline no longer holds what it referred to."""
        waiter.on_position = None
        if len(self._deadlines) > 2 * len(self._waiters) + 64:
            self._deadlines = deque(w for w in self._deadlines if self._waiters.get(w.entry) is w)

    def _expire(self, waiter: _Waiter, error: type[Exception]) -> None:
        self._leave(waiter)
        waiter.deferred.errback(error())

    def _expire_due(self) -> None:
        """Fail the waiters whose time in the queue is up; set the timer for the next."""
        self._sweep = None
        now = self.clock.seconds()
        deadlines = self._deadlines
        while deadlines:
            waiter = deadlines[0]
            if self._waiters.get(waiter.entry) is not waiter:
                deadlines.popleft()  # served or gone
            elif waiter.deadline <= now:
                deadlines.popleft()
                self._expire(waiter, QueueTimeout)
            else:
                self._sweep = self.clock.callLater(waiter.deadline - now, self._expire_due)
                return

    def upstreams_available(self, available: bool) -> None:
        """
        Whether any upstream may take a request (see L{Availability}): while
        none may, every waiter and arrival fails with L{NoUpstream}.
        """
        self.no_upstream = not available
        if self.no_upstream:
            for waiter in list(self._waiters.values()):
                self._expire(waiter, NoUpstream)

    def close(self) -> None:
        """Admit nothing more; every waiter fails with L{ShuttingDown}."""
        self.closed = True
        for waiter in list(self._waiters.values()):
            self._expire(waiter, ShuttingDown)
        if self._next_pass is not None and self._next_pass.active():
            self._next_pass.cancel()
        self._next_pass = None
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        self._deadlines.clear()

    def _released(self, ticket: Ticket) -> None:
        user = ticket.user
        self._running[user] -= 1
        if not self._running[user]:
            del self._running[user]
        ticket.route.active -= 1
        self.changed()

    def changed(self) -> None:
        """Places may have come free (a release, an upstream healthy again or with more slots): hand them out."""
        if not self._waiters:  # (nobody to hand them to, no position to tell)
            return
        self._dispatch()
        self._tell_positions()

    def _dispatch(self) -> None:
        chosen: list[Decision] = []  # where the entry that pop_next finds runs

        def can_run(entry: Entry) -> bool:
            decision = self._route_for(entry)
            if decision is not None:
                chosen.append(decision)
            return decision is not None

        while self.router.free > 0:
            entry = self._scheduler.pop_next(can_run)
            if entry is None:
                return
            decision = chosen.pop()
            waiter = self._waiters.pop(entry)
            self.router.record(decision, waiter.prompt)
            self._gone(waiter)
            waiter.deferred.callback(self._grant(entry.user, decision.route, waited=True, lease=waiter.lease))

    def _tell_positions(self) -> None:
        """A pass over the positions now, or, within C{position_interval} of the last one, when that has passed."""
        if self._next_pass is not None:
            return  # one is due; it will see this change too
        wait = self._last_pass + self.position_interval - self.clock.seconds()
        if wait <= 0:
            self._renumber()
        else:
            self._next_pass = self.clock.callLater(wait, self._renumber)

    def _renumber(self) -> None:
        """Tell the waiters whose position changed: only those from the first that moved on."""
        self._next_pass = None
        self._last_pass = self.clock.seconds()
        start = self._scheduler.take_changed()
        for index, entry in enumerate(self._scheduler.order(start), start=start + 1):
            waiter = self._waiters[entry]
            if waiter.position != index:
                waiter.position = index
                if waiter.on_position is not None:
                    waiter.on_position(index)
