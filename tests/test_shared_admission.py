"""
The shared queue's logic (L{twisted_gw.admission.shared}) on a L{task.Clock}, against L{FakeStore}: what each
local step tells the store, what the store's answers do, and the replica alone while the store is away.  The
store itself (its scripts on a real Redis) is tested in test_cluster.py.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.admission import QueueFull, Route, Router, Ticket
from twisted_gw.admission.shared import SharedAdmission
from twisted_gw.testing import FakeStore

A, B = "http://a:8080", "http://b:8080"


class SharedAdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.store = FakeStore()
        self.routes = [Route(A, slots=4), Route(B, slots=2)]
        self.admission = SharedAdmission(Router(self.routes), self.clock, self.store, max_queue=50)
        self.store.member = self.admission
        self.admission.sync_state()
        self.admission.store_back()  # (joined)

    def acquire(self, user: str = "alice", **kw: Any) -> Any:
        told: list[int] = []
        d = self.admission.acquire(told.append, user=user, **kw)
        return d, told

    def test_a_place_comes_from_the_store(self) -> None:
        d, told = self.acquire(max_concurrent=2, max_queued=3, weight=2.0)
        self.assertNoResult(d)  # (nothing is handed out here while the store is up)
        [(gap, max_queue, lease, user, weight, cap, max_queued, first, servers, prefer)] = \
            self.store.taken("ENQUEUE")
        self.assertEqual((gap, max_queue, user, weight, cap, max_queued, first, json.loads(servers), prefer),
                         (0.5, 50, "alice", 2.0, 2, 3, 0, [], ""))
        self.assertEqual((self.admission.waiting, self.admission.positions_of("alice")), (1, []))
        self.store.ranks[lease] = 3
        self.store.answer(0)  # (in the queue, third)
        self.assertEqual(told, [3])
        self.assertEqual(self.admission.positions_of("alice"), [3])
        self.admission.answered(_answer([(lease, B)]))
        ticket = self.successResultOf(d)
        self.assertIsInstance(ticket, Ticket)
        self.assertEqual((ticket.route.name, ticket.lease, self.routes[1].active), (B, lease, 1))
        self.assertEqual((self.admission.waiting, self.admission.active), (0, 1))
        ticket.release()
        self.assertEqual(self.store.taken("RELEASE")[-1][-1], lease)
        self.assertEqual(self.admission.active, 0)

    def test_refusals_in_the_clusters_words(self) -> None:
        full, _ = self.acquire()
        mine, _ = self.acquire(max_queued=1)
        self.store.answer(0, "full")
        self.store.answer(1, "user_full")
        self.assertFalse(self.failureResultOf(full, QueueFull).value.per_user)
        self.assertTrue(self.failureResultOf(mine, QueueFull).value.per_user)
        self.assertEqual(self.admission.waiting, 0)

    def test_a_waiter_that_leaves_is_taken_out_and_a_late_place_given_back(self) -> None:
        d, _ = self.acquire()
        lease = self.store.taken("ENQUEUE")[0][2]
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.store.taken("RELEASE"), [(0.5, lease)])
        self.admission.answered(_answer([(lease, A)]))  # (the store had handed it a place meanwhile)
        self.assertEqual(self.store.taken("RELEASE"), [(0.5, lease), (0.5, lease)])
        self.assertEqual(self.routes[0].active, 0)

    def test_candidates_are_the_upstreams_of_its_model_and_not_those_that_failed(self) -> None:
        self.routes[1].models = frozenset({"big"})
        self.acquire(model="big")
        self.acquire(model="small", exclude=frozenset({self.routes[0]}), first=True)
        (first, second) = self.store.taken("ENQUEUE")
        self.assertEqual(json.loads(first[8]), [B])
        self.assertEqual((json.loads(second[8]), second[7]), ([B], 1))

    def test_alone_a_replica_holds_at_most_its_share(self) -> None:
        held, _ = self.acquire()
        lease = self.store.taken("ENQUEUE")[0][2]
        self.admission.answered(_answer([(lease, A)]))
        self.successResultOf(held)
        self.store.replicas_seen = 2
        self.store.up = False
        self.admission.store_lost()
        self.assertEqual([r.share for r in self.routes], [2, 1])
        results = [self.acquire(max_concurrent=5)[0] for _ in range(4)]
        # A: the one held and 1 more (its share is 2); B: 1 (its share); the others wait in this replica's queue
        granted = [self.successResultOf(d) for d in results[:2]]
        self.assertEqual(sorted(t.route.name for t in granted), [A, B])
        self.assertNoResult(results[2])
        self.assertEqual(self.admission.positions_of("alice"), [1, 2])
        granted[0].release()  # (a place given back alone is handed on alone)
        self.successResultOf(results[2])
        self.assertEqual(self.store.steps[-1][0], "ENQUEUE")  # (nothing was sent while alone)
        # back: it tells the store all it holds and waits for, and the shares are gone
        held_now, waiting_now, places = self.admission.sync_state()
        self.assertEqual(len(held_now), 3)
        self.assertEqual([w[1] for w in waiting_now], ["alice"])
        self.assertEqual(waiting_now[0][3], 5)  # (its user's max_concurrent, though it was queued alone)
        self.assertEqual(places, {A: 4, B: 2})
        self.store.up = True
        self.admission.store_back()
        self.assertEqual([r.share for r in self.routes], [None, None])
        self.assertEqual(self.store.syncs, 0)  # (nothing changed since the sync's snapshot)

    def test_what_changed_while_the_sync_was_on_its_way_is_synced_again(self) -> None:
        self.store.up = False
        self.admission.store_lost()
        self.admission.sync_state()
        self.acquire()  # (arrived between the snapshot and the answer)
        self.store.up = True
        self.admission.store_back()
        self.assertEqual(self.store.syncs, 1)

    def test_until_the_store_first_answers_nothing_is_handed_out(self) -> None:
        store = FakeStore(up=False)
        admission = SharedAdmission(Router([Route(A, slots=4)]), self.clock, store)
        d = admission.acquire(user="alice")
        self.assertNoResult(d)
        self.clock.advance(600)
        self.failureResultOf(d)

    def test_an_upstreams_places_are_told_to_the_store_when_they_change(self) -> None:
        self.routes[1].state = "down"
        self.admission.changed()
        self.admission.changed()
        self.assertEqual(self.store.taken("ROUTE"), [(0.5, B, 0)])


def _answer(grants: list[tuple[str, str]]) -> Any:
    from twisted_gw.admission.store import Answer

    return Answer("ok", 0, 0, 1, grants)
