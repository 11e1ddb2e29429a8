"""Fair sharing: the scheduler as pure logic (with properties), and the gateway end to end."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from support import ALICE, BOB, GatewayTestCase, reactor
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.admission import Admission, QueueFull, QueueTimeout, Ticket
from twisted_gw.testing import FakeLlama


class SchedulerTests(SynchronousTestCase):
    def test_newcomer_goes_before_a_backlog(self) -> None:
        admission = Admission(1, task.Clock())
        running = self.successResultOf(admission.acquire(user="a"))
        backlog = [admission.acquire(user="a") for _ in range(20)]
        told: list[int] = []
        newcomer = admission.acquire(told.append, user="b")
        self.assertEqual(told, [1])
        self.assertEqual(admission.positions_of("a"), list(range(2, 22)))
        running.release()
        self.successResultOf(newcomer).release()
        self.assertTrue(backlog[0].called)
        self.assertFalse(any(d.called for d in backlog[1:]))

    def test_weights_split_places(self) -> None:
        admission = Admission(1, task.Clock())
        running = self.successResultOf(admission.acquire(user="a", weight=2))
        queued = [(user, admission.acquire(user=user, weight=w)) for _ in range(20) for user, w in (("a", 2), ("b", 1))]
        order = []
        ticket = running
        for _ in range(30):
            ticket.release()
            (user, d), = [(u, d) for u, d in queued if d.called and not getattr(d, "seen", False)]
            d.seen = True  # type: ignore[attr-defined]
            order.append(user)
            ticket = self.successResultOf(d)
        self.assertLessEqual(abs(order.count("a") - 20), 1, order)
        self.assertLessEqual(abs(order.count("b") - 10), 1, order)

    def test_fifo_within_a_user(self) -> None:
        admission = Admission(1, task.Clock())
        running = self.successResultOf(admission.acquire(user="a"))
        ds = [admission.acquire(user="a") for _ in range(5)]
        for i, d in enumerate(ds):
            running.release() if i == 0 else self.successResultOf(ds[i - 1]).release()
            self.assertTrue(d.called)
            self.assertFalse(any(x.called for x in ds[i + 1:]))

    def test_user_at_its_concurrency_is_skipped(self) -> None:
        admission = Admission(3, task.Clock())
        a1 = self.successResultOf(admission.acquire(user="a", max_concurrent=1))
        a2 = admission.acquire(user="a", max_concurrent=1)
        self.assertFalse(a2.called)  # a place is free, but alice holds her one
        b1 = admission.acquire(user="b")
        self.assertTrue(b1.called)
        a1.release()
        self.assertTrue(a2.called)
        self.assertEqual(admission.running_of("a"), 1)
        self.successResultOf(a2).release()
        self.successResultOf(b1).release()
        self.assertEqual(admission.free, 3)

    def test_per_user_queue_limit(self) -> None:
        admission = Admission(1, task.Clock())
        running = self.successResultOf(admission.acquire(user="a"))
        admission.acquire(user="a", max_queued=1)
        refused = self.failureResultOf(admission.acquire(user="a", max_queued=1), QueueFull)
        self.assertTrue(refused.value.per_user)
        other = admission.acquire(user="b", max_queued=1)
        self.assertFalse(other.called)
        running.release()

    def test_timeout(self) -> None:
        clock = task.Clock()
        admission = Admission(1, clock, queue_timeout=10)
        running = self.successResultOf(admission.acquire(user="a"))
        waiting = admission.acquire(user="b")
        clock.advance(10)
        self.failureResultOf(waiting, QueueTimeout)
        self.assertEqual(admission.waiting, 0)
        running.release()
        self.assertEqual(admission.free, 1)

    @settings(max_examples=200, deadline=None)
    @given(
        limit=st.integers(min_value=1, max_value=4),
        ops=st.lists(
            st.tuples(st.sampled_from(["arrive", "cancel", "release", "tick"]),
                      st.sampled_from(["a", "b", "c"]), st.integers(min_value=0, max_value=50)),
            max_size=60,
        ),
    )
    def test_properties(self, limit: int, ops: list[tuple[str, str, int]]) -> None:
        """Never more than the limit; nothing lost or served twice; everyone served or cancelled in the end."""
        clock = task.Clock()
        admission = Admission(limit, clock, max_queue=1000, queue_timeout=30)
        weights = {"a": 1.0, "b": 2.0, "c": 0.5}
        caps: dict[str, Any] = {"a": None, "b": 2, "c": 1}
        pending: list[Deferred[Ticket]] = []
        outcomes: dict[int, list[str]] = {}
        running: list[Ticket] = []

        def watch(d: Deferred[Ticket], n: int) -> None:
            def served(ticket: Ticket) -> None:
                outcomes.setdefault(n, []).append("served")
                running.append(ticket)

            def ended(f: Any) -> None:
                outcomes.setdefault(n, []).append(f.type.__name__)

            d.addCallbacks(served, ended)

        arrivals = 0
        for op, user, n in ops:
            if op == "arrive":
                d = admission.acquire(user=user, weight=weights[user], max_concurrent=caps[user])
                watch(d, arrivals)
                arrivals += 1
                pending.append(d)
            elif op == "cancel" and pending:
                pending[n % len(pending)].cancel()
            elif op == "release" and running:
                running.pop(n % len(running)).release()
            elif op == "tick":
                clock.advance(n)
            self.assertLessEqual(admission.active, limit)
            self.assertEqual(admission.active, len(running))
            for user_name, cap in caps.items():
                if cap is not None:
                    self.assertLessEqual(admission.running_of(user_name), cap)
        # drain: release everything; every waiter is then served, cancelled or timed out
        while running:
            running.pop().release()
            clock.advance(0)
        self.assertEqual(admission.waiting, 0)
        self.assertEqual(admission.free, limit)
        self.assertEqual(sorted(outcomes), list(range(arrivals)))
        for n, seen in outcomes.items():
            self.assertEqual(len(seen), 1, (n, seen))
            self.assertIn(seen[0], ("served", "CancelledError", "QueueTimeout"))


class FairGatewayTests(GatewayTestCase):
    timeout = 30

    async def test_one_user_with_twenty_queued_does_not_starve_another(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True, reply=("x",)), max_concurrent=1)
        running = await self.chat(stream=True, key=ALICE)
        backlog = [Deferred.fromCoroutine(self.chat(stream=False, key=ALICE)) for _ in range(20)]
        while self.gw.gateway.admission.waiting < 20:
            await task.deferLater(reactor, 0.01, lambda: None)
        bob = await self.chat(stream=True, key=BOB)
        await bob.body.wait_for(b": queue position=1\n\n")
        arrived = self.fake.next_request()
        self.fake.release(1)
        await running.text()
        upstream = await arrived
        self.assertEqual(upstream.headers.getRawHeaders(b"x-gateway-user"), [b"bob"])
        self.fake.release(21)
        self.assertTrue((await bob.text()).endswith(b"data: [DONE]\n\n"))
        for d in backlog:
            self.assertEqual((await d).code, 200)
            await (await d).text()
        users = [(r.headers.getRawHeaders(b"x-gateway-user") or [b""])[0] for r in self.fake.generations]
        self.assertEqual(users[:2], [b"alice", b"bob"])
        self.assertEqual(users.count(b"alice"), 21)

    async def test_weights_two_to_one_over_thirty(self) -> None:
        users = {"users": {"alice": {"keys": [ALICE], "weight": 2}, "bob": {"keys": [BOB], "weight": 1}}}
        await self.start(fake=FakeLlama(reactor, manual=True, reply=("x",)), max_concurrent=1, users=users)
        first = await self.chat(stream=True, key=ALICE)
        queued = [Deferred.fromCoroutine(self.chat(stream=False, key=k)) for _ in range(20) for k in (ALICE, BOB)]
        while self.gw.gateway.admission.waiting < 40:
            await task.deferLater(reactor, 0.01, lambda: None)
        served = await self.served_in_turn(first, 30)
        self.assertLessEqual(abs(served.count(b"alice") - 20), 1, served)
        self.assertLessEqual(abs(served.count(b"bob") - 10), 1, served)
        self.fake.release(100)
        for d in queued:
            await (await d).text()


class QuotaTests(GatewayTestCase):
    async def test_tokens_per_minute(self) -> None:
        users = {"users": {"alice": {"keys": [ALICE], "tokens_per_minute": 20}, "bob": {"keys": [BOB]}}}
        clock = task.Clock()
        clock.advance(1_000_000)
        # (the books wait for this clock too: a quota counts a request at once, not with its other books)
        await self.start(users=users, clock=clock)
        first = await self.chat(stream=False)  # 7 prompt + 8 completion tokens
        self.assertEqual(first.header("x-ratelimit-limit-tokens"), b"20")
        self.assertEqual(first.header("x-ratelimit-remaining-tokens"), b"20")
        await first.text()
        second = await self.chat(stream=True)
        self.assertEqual(second.header("x-ratelimit-remaining-tokens"), b"5")
        await second.text()
        clock.advance(10)
        refused = await self.chat(stream=True)
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.header("Retry-After"), b"50")
        self.assertEqual(refused.header("x-ratelimit-remaining-tokens"), b"0")
        self.assertEqual(refused.header("x-ratelimit-reset-tokens"), b"50s")
        error = (await refused.json())["error"]
        self.assertEqual(error["code"], "rate_limit_exceeded")
        self.assertEqual(error["type"], "rate_limit_error")
        # GETs are not refused, and carry the headers too
        models = await self.call("GET", "/v1/models")
        self.assertEqual(models.code, 200)
        self.assertEqual(models.header("x-ratelimit-remaining-tokens"), b"0")
        await models.text()
        # bob has no quota and no headers
        bobs = await self.chat(stream=False, key=BOB)
        self.assertEqual(bobs.code, 200)
        self.assertIsNone(bobs.header("x-ratelimit-limit-tokens"))
        await bobs.text()
        clock.advance(50)
        again = await self.chat(stream=False)
        self.assertEqual(again.code, 200)
        await again.text()

    async def test_day_quota_survives_a_restart_and_me_reports_it(self) -> None:
        users = {"users": {"alice": {"keys": [ALICE], "tokens_per_day": 40, "max_queued": 3, "weight": 1.5}}}
        await self.start(users=users)
        db = self.config.usage_db
        for _ in range(2):
            await (await self.chat(stream=False)).text()
        me = await (await self.call("GET", "/v1/gateway/me")).json()
        self.assertEqual(me["user"], "alice")
        self.assertEqual(me["usage"]["requests"], 2)
        self.assertEqual(me["quota"]["tokens_per_day"]["used"], 30)
        self.assertEqual(me["quota"]["tokens_per_day"]["remaining"], 10)
        self.assertEqual(me["limits"], {"weight": 1.5, "max_concurrent": None, "max_queued": 3})
        await self.gw.stop()
        await self.start(users=users, usage_db=db)
        await (await self.chat(stream=False)).text()  # 30 of 40 used: allowed, then 45
        refused = await self.chat(stream=False)
        self.assertEqual(refused.code, 429)
        self.assertGreater(int(refused.header("Retry-After") or b"0"), 0)
        await refused.text()
        me = await (await self.call("GET", "/v1/gateway/me")).json()
        self.assertEqual(me["quota"]["tokens_per_day"]["used"], 45)
        self.assertEqual(me["quota"]["tokens_per_day"]["remaining"], 0)

    async def test_me_shows_queue_positions(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        running = await self.chat(stream=True, key=BOB)
        mine = [await self.chat(stream=True) for _ in range(2)]
        await mine[1].body.wait_for(b": queue position=2")
        me = await (await self.call("GET", "/v1/gateway/me")).json()
        self.assertEqual(me["queue"], {"running": 0, "positions": [1, 2]})
        self.assertEqual(me["quota"], {})
        self.assertEqual((await self.call("POST", "/v1/gateway/me", b"{}")).code, 405)
        self.assertEqual((await self.call("GET", "/v1/gateway/me", key=None)).code, 401)
        self.fake.release(3 * len(self.fake.reply))
        for reply in (running, *mine):
            await reply.text()
        self.assertNotIn(b"/v1/gateway/me", [r.uri for r in self.fake.requests])
        json.dumps(me)


__all__ = ["CancelledError"]
