"""
The admission queue of one replica in a cluster: places, the fair queue and
per-user limits shared through a store (L{twisted_gw.admission.store}).

Every request still has its local waiter (its Deferred, its deadline, its
stream told its position), but while the store is up the local queue hands
out nothing: a waiter joins the cluster's queue, and a place comes from the
store when it is that waiter's turn across the cluster, whichever replica
freed it.  Positions told are the cluster's.  While the store is away, the
replica keeps the places it holds and hands out new ones from its own queue,
up to C{floor(places / replicas)} of each upstream (L{Route.share}); when the
store is back, it tells the store what it holds and waits for, and the
cluster goes on from there.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime

from twisted_gw.admission import lua
from twisted_gw.admission.queue import (
    Admission,
    NoUpstream,
    PositionCallback,
    QueueFull,
    ShuttingDown,
    Ticket,
    _Waiter,
)
from twisted_gw.admission.routing import CACHE, LEAST_BUSY, Decision, Route, Router
from twisted_gw.admission.store import Answer, Store, store_down


class SharedAdmission(Admission):
    """An L{Admission} whose places and queue are the cluster's while its C{store} is up."""

    def __init__(self, router: Router, clock: IReactorTime, store: Store, max_queue: int = 100,
                 queue_timeout: float = 600.0, position_interval: float = 0.0) -> None:
        super().__init__(router, clock, max_queue, queue_timeout, position_interval)
        self.store = store
        self._routes = {route.name: route for route in router.routes}
        self._ids: dict[str, _Waiter] = {}  # waiting, by lease
        self._held: dict[str, Ticket] = {}  # places held, by lease
        self._sent_routes: dict[str, int] = {}
        self._synced: tuple[set[str], set[str]] = (set(), set())  # (held, waiting) as the last sync told them
        self._numbers = itertools.count()
        for route in router.routes:  # (until the store first answers, nothing is known of the others)
            route.share = 0

    @property
    def shared(self) -> bool:
        return self.store.up

    @property
    def cluster_waiting(self) -> int:
        return self.store.waiting if self.shared else self.waiting

    @property
    def cluster_active(self) -> int:
        return self.store.active if self.shared else self.active

    def cluster_document(self) -> dict[str, object]:
        store = self.store
        return {"name": store.cluster, "store": store.where, "store_up": store.up, "replica": store.replica,
                "replicas": store.replicas_seen, "lease_timeout_s": store.lease_timeout}

    def _new_lease(self) -> str:
        # (the clock first: waiters with the same start tag go in about the order they came)
        return f"{int(self.clock.seconds() * 1000):014d}.{self.store.replica}.{next(self._numbers)}"

    def acquire(
        self, on_position: Optional[PositionCallback] = None, *, user: str = "", weight: float = 1.0,
        max_concurrent: Optional[int] = None, max_queued: Optional[int] = None, model: Optional[str] = None,
        exclude: frozenset[Route] = frozenset(), first: bool = False, prompt: tuple[int, ...] = (),
    ) -> Deferred[Ticket]:
        if not self.shared:
            return super().acquire(on_position, user=user, weight=weight, max_concurrent=max_concurrent,
                                   max_queued=max_queued, model=model, exclude=exclude, first=first, prompt=prompt)
        if self.closed:
            return fail(ShuttingDown())
        if self.no_upstream:
            return fail(NoUpstream())
        self._caps[user] = max_concurrent
        waiter = self._queue(user, weight, first, on_position, model, exclude, prompt, max_concurrent)
        d = self.store.step(
            lua.ENQUEUE, self.store.balance_gap, self.max_queue, waiter.lease, user,
            weight, _limit(max_concurrent), _limit(max_queued), int(first),
            json.dumps(self.router.servers(model, exclude)), waiter.prefer,
        )
        d.addCallbacks(self._enqueued, store_down, callbackArgs=(waiter,))
        return waiter.deferred

    def _queue(self, user: str, weight: float, first: bool, on_position: Optional[PositionCallback],
               model: Optional[str], exclude: frozenset[Route], prompt: tuple[int, ...],
               cap: Optional[int]) -> _Waiter:
        """Every waiter has what the store needs of it, even one queued while the store is away (a sync tells it)."""
        waiter = super()._queue(user, weight, first, on_position, model, exclude, prompt, cap)
        waiter.lease = self._new_lease()
        waiter.prefer, waiter.share = self.router.holder(model, exclude, prompt)
        self._ids[waiter.lease] = waiter
        return waiter

    def _enqueued(self, answer: Answer, waiter: _Waiter) -> None:
        """The store's answer to a waiter joining: refused (the queue is full), or in it (perhaps served)."""
        if answer.status in ("full", "user_full") and self._ids.get(waiter.lease) is waiter:
            del self._ids[waiter.lease]
            super()._leave(waiter)
            waiter.deferred.errback(QueueFull(per_user=answer.status == "user_full"))

    # What the store says (L{Member})

    def answered(self, answer: Answer) -> None:
        """Places handed to this replica's waiters; any other answer may have moved the queue."""
        for lease, upstream in answer.grants:
            self._granted(lease, upstream)
        if self._waiters:
            self._tell_positions()

    def _granted(self, lease: str, upstream: str) -> None:
        if lease in self._held:  # (served from this replica's own queue while the store was away)
            return
        waiter = self._ids.get(lease)
        route = self._routes.get(upstream)
        if waiter is None or route is None or self._waiters.get(waiter.entry) is not waiter:
            self._give_back(lease)  # (its client left meanwhile)
            return
        self._scheduler.remove(waiter.entry)
        del self._waiters[waiter.entry]
        self._gone(waiter)
        reason = CACHE if waiter.prefer == upstream else LEAST_BUSY
        self.router.record(Decision(route, reason, waiter.share), waiter.prompt)
        waiter.deferred.callback(self._grant(waiter.entry.user, route, True, lease))

    def store_lost(self) -> None:
        """Alone now: at most this replica's share of each upstream, from its own queue."""
        for route in self.router.routes:
            route.share = route.places // self.store.replicas_seen
        self._sent_routes = {}
        super().changed()

    def store_back(self) -> None:
        for route in self.router.routes:
            route.share = None
        now = ({lease for lease, t in self._held.items() if not t.released}, set(self._ids))
        if now != self._synced:  # (it changed while the sync was on its way: the store must know)
            self.store.sync()

    def sync_state(self) -> tuple[list[list[Any]], list[list[Any]], dict[str, int]]:
        """What this replica holds, what waits here (in queue order) and its upstreams' places, for the store."""
        held = [[lease, t.route.name, t.user] for lease, t in self._held.items() if not t.released]
        waiting = []
        for entry in self._scheduler.order():
            w = self._waiters[entry]
            waiting.append([w.lease, entry.user, w.weight, _limit(w.cap), int(w.first),
                            self.router.servers(w.model, w.exclude), w.prefer])
        self._sent_routes = self._route_places()
        self._synced = ({str(h[0]) for h in held}, {str(w[0]) for w in waiting})
        return held, waiting, self._sent_routes

    def _route_places(self) -> dict[str, int]:
        return {r.name: r.places if r.routable else 0 for r in self.router.routes}

    # Local steps, told to the store

    def _grant(self, user: str, route: Route, waited: bool, lease: str = "") -> Ticket:
        lease = lease or self._new_lease()
        self._ids.pop(lease, None)
        route.active += 1
        self._running[user] = self._running.get(user, 0) + 1
        ticket = Ticket(self, user, waited, route, lease=lease)
        self._held[lease] = ticket
        return ticket

    def _released(self, ticket: Ticket) -> None:
        self._held.pop(ticket.lease, None)
        super()._released(ticket)
        self._give_back(ticket.lease)

    def _leave(self, waiter: _Waiter) -> None:
        if self._waiters.get(waiter.entry) is not waiter:
            return
        self._ids.pop(waiter.lease, None)
        super()._leave(waiter)
        self._give_back(waiter.lease)

    def _give_back(self, lease: str) -> None:
        """A place (or a place in the queue) no longer needed; while the store is away, the next sync says so."""
        if self.shared:
            self.store.step(lua.RELEASE, self.store.balance_gap, lease).addErrback(store_down)

    def changed(self) -> None:
        if not self.shared:
            super().changed()
            return
        for name, places in self._route_places().items():
            if self._sent_routes.get(name) != places:
                self._sent_routes[name] = places
                self.store.step(lua.ROUTE, self.store.balance_gap, name, places).addErrback(store_down)

    def _dispatch(self) -> None:
        if not self.shared:  # (while it is up, places come from the store)
            super()._dispatch()

    def _renumber(self) -> None:
        if not self.shared:
            super()._renumber()
            return
        self._next_pass = None
        self._last_pass = self.clock.seconds()
        self._scheduler.take_changed()
        told = [w for w in self._waiters.values() if w.on_position is not None]
        if not told:
            return

        def tell(ranks: list[Any]) -> None:
            for waiter, rank in zip(told, ranks, strict=True):
                position = int(rank)
                if position and waiter.position != position and waiter.on_position is not None:
                    waiter.position = position
                    waiter.on_position(position)

        self.store.run(lua.RANKS, *[w.lease for w in told]).addCallbacks(tell, store_down)

    def positions_of(self, user: str) -> list[int]:
        if not self.shared:
            return super().positions_of(user)
        return sorted(w.position for w in self._waiters.values() if w.entry.user == user and w.position)


def _limit(limit: Optional[int]) -> int:
    """A limit as the store's scripts read it (-1: none)."""
    return -1 if limit is None else limit
