"""Routing between upstreams as pure logic: the router, and the admission queue over several upstreams."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.admission import Admission, Ticket
from twisted_gw.admission.routing import DOWN, LOADING, OK, Route, Router
from twisted_gw.apis.models import union_of_model_lists


def routes(*places: int) -> list[Route]:
    return [Route(f"http://u{i}", slots=n, state=OK) for i, n in enumerate(places)]


class RouterTests(SynchronousTestCase):
    def test_most_free_places_first(self) -> None:
        a, b = routes(2, 4)
        router = Router([a, b])
        chosen = []
        for _ in range(6):
            route = router.choose()
            assert route is not None
            route.active += 1
            chosen.append(route.name)
        # b has 4 free, a 2: b until they are level, then turns
        self.assertEqual(chosen[:2], ["http://u1", "http://u1"])
        self.assertEqual(sorted(chosen[2:]), ["http://u0", "http://u0", "http://u1", "http://u1"])
        self.assertIsNone(router.choose())

    def test_ties_go_round_robin(self) -> None:
        router = Router(routes(8, 8, 8))
        chosen = []
        for _ in range(6):
            route = router.choose()
            assert route is not None
            chosen.append(route.name[-1])
            route.active += 1
            route.active -= 1  # released at once: always a tie
        self.assertEqual("".join(chosen), "012012")

    def test_unhealthy_get_nothing_and_places_are_the_healthy_ones(self) -> None:
        a, b, c = routes(2, 3, 4)
        router = Router([a, b, c])
        self.assertEqual(router.places, 9)
        b.state, c.state = DOWN, LOADING
        self.assertEqual(router.places, 2)
        self.assertEqual({router.choose().name for _ in range(1)}, {"http://u0"})  # type: ignore[union-attr]
        self.assertEqual(router.candidates(None), [a])

    def test_models_route_to_the_upstreams_that_serve_them(self) -> None:
        a, b, c = routes(1, 1, 1)
        a.models, b.models, c.models = frozenset({"alpha"}), frozenset({"beta"}), frozenset({"alpha", "gamma"})
        router = Router([a, b, c])
        self.assertEqual(router.candidates("alpha"), [a, c])
        self.assertEqual(router.candidates("beta"), [b])
        self.assertEqual(router.candidates("unknown"), [a, b, c])  # llama.cpp answers any name
        self.assertEqual(router.candidates(None), [a, b, c])
        b.state = DOWN
        self.assertEqual(router.candidates("beta"), [])  # never to a server of another model
        self.assertEqual(router.candidates("alpha", exclude=[a]), [c])

    def test_any_tries_an_unhealthy_upstream_when_none_is_healthy(self) -> None:
        a, b = routes(1, 1)
        router = Router([a, b])
        a.state = b.state = DOWN
        self.assertIsNone(router.choose())
        self.assertIs(router.any(), a)
        self.assertIs(router.any(exclude=[a]), b)
        self.assertIsNone(router.any(exclude=[a, b]))

    def test_places_from_configuration_then_props_then_one(self) -> None:
        route = Route("http://u")
        self.assertEqual((route.places, route.describe()["places_from"]), (1, "default"))
        route.discovered = 4
        self.assertEqual((route.places, route.describe()["places_from"]), (4, "props"))
        route.slots = 2
        self.assertEqual((route.places, route.describe()["places_from"]), (2, "configured"))

    def test_union_of_model_lists(self) -> None:
        docs = [
            {"object": "list", "data": [{"id": "alpha", "owned_by": "one"}, {"id": "beta"}]},
            {"object": "list", "data": [{"id": "alpha", "owned_by": "two"}, {"id": "gamma"}, {"no": "id"}]},
            {"error": "not a list"},
        ]
        self.assertEqual(union_of_model_lists(docs), {"object": "list", "data": [
            {"id": "alpha", "owned_by": "one"}, {"id": "beta"}, {"id": "gamma"}]})


class AdmissionOverUpstreamsTests(SynchronousTestCase):
    def test_a_waiter_for_a_busy_model_lets_others_pass(self) -> None:
        a, b = routes(1, 1)
        a.models, b.models = frozenset({"alpha"}), frozenset({"beta"})
        admission = Admission(Router([a, b]), Clock())
        on_a = self.successResultOf(admission.acquire(user="u", model="alpha"))
        self.assertIs(on_a.route, a)
        alpha: Deferred[Ticket] = admission.acquire(user="u", model="alpha")
        self.assertNoResult(alpha)
        beta = self.successResultOf(admission.acquire(user="v", model="beta"))
        self.assertIs(beta.route, b)
        beta.release()
        self.assertNoResult(alpha)  # b's free place is no use to it
        on_a.release()
        self.assertIs(self.successResultOf(alpha).route, a)

    def test_an_upstream_coming_back_takes_the_queue(self) -> None:
        a, b = routes(1, 2)
        b.state = DOWN
        admission = Admission(Router([a, b]), Clock())
        first = self.successResultOf(admission.acquire(user="u"))
        waiting = [admission.acquire(user="u") for _ in range(3)]
        self.assertEqual((admission.limit, admission.waiting), (1, 3))
        b.state = OK
        admission.changed()
        self.assertEqual((admission.limit, admission.waiting, admission.active), (3, 1, 3))
        self.assertEqual([self.successResultOf(d).route for d in waiting[:2]], [b, b])
        first.release()
        self.assertIs(self.successResultOf(waiting[2]).route, a)

    def test_failover_goes_to_the_head_of_the_queue_and_not_back(self) -> None:
        a, b = routes(1, 1)
        admission = Admission(Router([a, b]), Clock(), max_queue=1)
        one = self.successResultOf(admission.acquire(user="u"))
        two = self.successResultOf(admission.acquire(user="u"))
        queued = admission.acquire(user="v")
        failed_route = one.route
        failed_route.state = DOWN
        one.release()
        again = admission.acquire(user="u", exclude=frozenset({failed_route}), first=True)  # past max_queue
        self.assertEqual(admission.positions_of("u"), [1])
        two.release()
        self.assertIs(self.successResultOf(again).route, two.route)
        self.assertNoResult(queued)

    @settings(max_examples=60, deadline=None)
    @given(
        places=st.lists(st.integers(1, 3), min_size=1, max_size=4),
        steps=st.lists(st.tuples(st.sampled_from(["arrive", "finish", "flip"]), st.integers(0, 50)), max_size=80),
    )
    def test_no_upstream_is_ever_over_its_places(self, places: list[int], steps: list[tuple[str, int]]) -> None:
        """Whatever arrives, finishes or changes health, no route runs more than its places and nothing is lost."""
        rs = routes(*places)
        admission = Admission(Router(rs), Clock(), max_queue=1000)
        pending: list[Deferred[Ticket]] = []
        running: list[Ticket] = []
        for action, n in steps:
            if action == "arrive":
                pending.append(admission.acquire(user=f"u{n % 3}"))
            elif action == "finish" and running:
                running.pop(n % len(running)).release()
            elif action == "flip":
                route = rs[n % len(rs)]
                route.state = OK if route.state == DOWN else DOWN
                admission.changed()
            for d in [d for d in pending if d.called]:
                pending.remove(d)
                running.append(self.successResultOf(d))
            for route in rs:
                self.assertLessEqual(route.active, route.places)
                self.assertEqual(route.active, sum(1 for t in running if t.route is route))
            # a waiter waits only while no upstream has a free place
            if pending:
                self.assertEqual(admission.free, 0)
        for route in rs:
            route.state = OK
        admission.changed()
        while running or pending:
            for d in [d for d in pending if d.called]:
                pending.remove(d)
                running.append(self.successResultOf(d))
            running.pop().release()
        self.assertEqual((admission.active, admission.waiting), (0, 0))
