"""
Several upstreams end to end, over loopback: one slow, one down, one that
restarts; health, places from /props, failover before the first byte, model
routing and the union of model lists.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from support import ALICE, GatewayTestCase, free_port, reactor, sse_data
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults

from twisted_gw.config import UpstreamSpec
from twisted_gw.testing import FakeLlama

REPLY = ("one", " two", " three")
TEXT = "".join(REPLY)


class ManyUpstreamsTests(GatewayTestCase):
    timeout = 40

    async def started(self, *fakes: FakeLlama) -> list[str]:
        urls = []
        for fake in fakes:
            urls.append(await fake.start())
            self.addCleanup(fake.stop)
        return urls

    async def metrics_until(self, what: str, ok: Callable[[Any], bool], seconds: float = 10.0) -> Any:
        """Poll /metrics until C{ok(doc)}: health is checked in the background."""
        deadline = reactor.seconds() + seconds
        while True:
            doc = await self.metrics()
            if ok(doc):
                return doc
            if reactor.seconds() > deadline:
                self.fail(f"never {what}: {json.dumps(doc['upstreams'])}")
            await task.deferLater(reactor, 0.02, lambda: None)

    async def answered(self, stream: bool, **extra: Any) -> str:
        """One request through the gateway, which must succeed; the text it got."""
        reply = await self.chat(stream=stream, **extra)
        body = await reply.text()
        self.assertEqual(reply.code, 200, body)
        if not stream:
            return str(json.loads(body)["choices"][0]["message"]["content"])
        text = ""
        for data in sse_data(body):
            if data != b"[DONE]":
                self.assertNotIn(b'"error"', data)
                for choice in json.loads(data)["choices"]:
                    text += choice["delta"].get("content", "")
        return text

    async def burst(self, count: int) -> None:
        texts = await gatherResults([
            Deferred.fromCoroutine(self.answered(stream=i % 2 == 0)) for i in range(count)
        ])
        self.assertEqual(texts, [TEXT] * count)

    async def test_slow_down_and_restarting_upstreams_lose_no_request(self) -> None:
        slow = FakeLlama(reactor, reply=REPLY, chunk_delay=0.03, header_delay=0.02, slots=2)
        restarting = FakeLlama(reactor, reply=REPLY, chunk_delay=0.005, slots=2)
        slow_url, restarting_url = await self.started(slow, restarting)
        down_url = f"http://127.0.0.1:{free_port()}"
        await self.start(
            fake=slow, upstream_check_interval=0.1,
            upstreams=(UpstreamSpec(slow_url), UpstreamSpec(down_url, slots=4), UpstreamSpec(restarting_url)),
        )
        doc = await self.metrics_until("all checked", lambda d: [u["state"] for u in d["upstreams"]]
                                       == ["ok", "down", "ok"])
        # places from each llama.cpp's /props; the down one counts for nothing
        self.assertEqual([(u["places"], u["places_from"]) for u in doc["upstreams"]],
                         [(2, "props"), (4, "configured"), (2, "props")])
        self.assertEqual(doc["queue"]["max_concurrent"], 4)

        await self.burst(16)
        self.assertEqual((slow.peak, restarting.peak), (2, 2))  # busy, never over its places
        self.assertGreater(len(restarting.generations), len(slow.generations))  # the fast one did more

        # It crashes: requests sent its way before a check notices fail over, none is lost.
        port = await restarting.crash()
        before = len(slow.generations)
        await self.burst(8)
        self.assertEqual(len(slow.generations), before + 8)
        doc = await self.metrics_until("down", lambda d: d["upstreams"][2]["state"] == "down")
        self.assertEqual(doc["queue"]["max_concurrent"], 2)

        # It comes back loading (503), with one slot now: still nothing for it.
        restarting.loading = True
        restarting.slots = 1
        restarting.peak = 0
        await restarting.start(port=port)
        await self.metrics_until("loading", lambda d: d["upstreams"][2]["state"] == "loading")
        await self.burst(4)
        self.assertEqual(restarting.peak, 0)

        # Loaded: it takes work again, within its new slot count, read from /props anew.
        restarting.loading = False
        doc = await self.metrics_until("up again", lambda d: d["upstreams"][2]["state"] == "ok")
        self.assertEqual(doc["upstreams"][2]["places"], 1)
        self.assertEqual(doc["queue"]["max_concurrent"], 3)
        await self.burst(12)
        self.assertEqual((slow.peak, restarting.peak), (2, 1))
        doc = await self.metrics()
        self.assertEqual(doc["totals"]["requests"], 16 + 8 + 4 + 12)
        self.assertEqual([u["active"] for u in doc["upstreams"]], [0, 0, 0])

    async def test_connection_error_before_the_first_byte_fails_over(self) -> None:
        good = FakeLlama(reactor, reply=REPLY)
        (good_url,) = await self.started(good)
        down_url = f"http://127.0.0.1:{free_port()}"
        # no health checks: the down upstream looks routable, and with the most places it is tried first
        await self.start(fake=good, upstreams=(UpstreamSpec(down_url, slots=4), UpstreamSpec(good_url)))
        for stream in (True, False, True, False):
            self.assertEqual(await self.answered(stream), TEXT)
        doc = await self.metrics()
        self.assertEqual([u["failovers"] for u in doc["upstreams"]], [4, 0])
        self.assertEqual(len(good.generations), 4)
        # a GET goes on to the next upstream too: this is the good one's own 404
        reply = await self.call("GET", "/v1/nothing-here", key=ALICE)
        self.assertEqual(reply.code, 404)
        self.assertEqual((await reply.json())["error"]["message"], "File Not Found")
        doc = await self.metrics()
        self.assertEqual([u["failovers"] for u in doc["upstreams"]], [5, 0])

    async def test_a_loading_upstream_503_fails_over(self) -> None:
        loading = FakeLlama(reactor, loading=True)
        good = FakeLlama(reactor, reply=REPLY)
        loading_url, good_url = await self.started(loading, good)
        await self.start(fake=good, upstreams=(UpstreamSpec(loading_url, slots=4), UpstreamSpec(good_url)))
        self.assertEqual(await self.answered(stream=False), TEXT)
        self.assertEqual(await self.answered(stream=True), TEXT)
        doc = await self.metrics()
        self.assertEqual([u["failovers"] for u in doc["upstreams"]], [2, 0])
        await good.crash()
        reply = await self.chat()  # the 503, then a refused connection: nothing left to try
        self.assertEqual(reply.code, 502)
        self.assertEqual((await reply.json())["error"]["code"], "upstream_unreachable")

    async def test_no_timeout_while_waiting_for_another_upstream(self) -> None:
        # A 503 from a loading upstream sends the request back to the queue; while it waits there for a place on
        # the other one (held by a stream), the upstream timeout of its first try is not running.
        loading = FakeLlama(reactor, loading=True)
        good = FakeLlama(reactor, manual=True, reply=REPLY)
        loading_url, good_url = await self.started(loading, good)
        clock = task.Clock()
        await self.start(fake=good, upstreams=(UpstreamSpec(loading_url, slots=4), UpstreamSpec(good_url)),
                         upstream_timeout=20, idle_timeout=1000, clock=clock)
        holder = await self.chat(stream=True)  # tried on the loading one first, then the good one's only place
        while not good.generations:
            await task.deferLater(reactor, 0.01, lambda: None)
        waiting = Deferred.fromCoroutine(self.chat(stream=False))
        while self.gw.gateway.admission.waiting < 1:
            await task.deferLater(reactor, 0.01, lambda: None)
        (ex,) = [e for e in self.gw.gateway.proxy.active if e.ticket is None]
        clock.advance(100)
        self.assertIsNone(ex.interrupted)
        self.assertIsNone(ex.deadline.timer)  # no upstream deadline while it waits for another upstream
        good.release(2 * len(REPLY))
        await holder.text()
        reply = await waiting
        self.assertEqual(reply.code, 200, await reply.text())
        self.assertEqual([u["failovers"] for u in (await self.metrics())["upstreams"]], [2, 0])

    async def test_a_single_loading_upstream_503_is_passed_through(self) -> None:
        await self.start(fake=FakeLlama(reactor, loading=True))
        reply = await self.chat()
        self.assertEqual(reply.code, 503)
        self.assertEqual((await reply.json())["error"]["message"], "Loading model")

    async def test_most_free_places_first_then_round_robin(self) -> None:
        a = FakeLlama(reactor, reply=REPLY, manual=True)
        b = FakeLlama(reactor, reply=REPLY, manual=True)
        a_url, b_url = await self.started(a, b)
        await self.start(fake=a, upstreams=(UpstreamSpec(a_url, slots=3), UpstreamSpec(b_url, slots=1)))
        order, replies = [], []
        for _ in range(4):
            before = len(a.generations)
            replies.append(await self.chat(stream=True))  # its headers come once the upstream has it
            order.append("a" if len(a.generations) > before else "b")
        # a (3 free) over b (1); then 2:1, a again; then 1:1, a tie: b, the one after a; then a
        self.assertEqual(order, ["a", "a", "b", "a"])
        doc = await self.metrics()
        self.assertEqual([(u["active"], u["places"]) for u in doc["upstreams"]], [(3, 3), (1, 1)])
        a.release(100)
        b.release(100)
        for reply in replies:
            self.assertTrue((await reply.text()).endswith(b"data: [DONE]\n\n"))

    async def test_no_failover_once_the_stream_began(self) -> None:
        dying = FakeLlama(reactor, reply=REPLY, die_after=2)
        other = FakeLlama(reactor, reply=REPLY)
        dying_url, other_url = await self.started(dying, other)
        await self.start(fake=dying, upstreams=(UpstreamSpec(dying_url, slots=4), UpstreamSpec(other_url)))
        reply = await self.chat(stream=True)
        body = await reply.cut_short()
        self.assertEqual(reply.code, 200)
        self.assertIn(b'"code":"upstream_disconnected"', body.replace(b" ", b""))
        self.assertIn(b'"content":"one"', body)
        self.assertEqual(other.generations, [])  # not sent twice
        doc = await self.metrics()
        self.assertEqual([u["failovers"] for u in doc["upstreams"]], [0, 0])

    async def test_all_down_is_a_502_for_a_request_that_takes_no_place(self) -> None:
        urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
        await self.start(upstreams=tuple(UpstreamSpec(u) for u in urls))
        reply = await self.call("GET", "/v1/something", key=ALICE)
        self.assertEqual(reply.code, 502)
        self.assertEqual((await reply.json())["error"]["code"], "upstream_unreachable")
        doc = await self.metrics()
        self.assertEqual([u["failovers"] for u in doc["upstreams"]], [1, 0])  # the last had none to go to

    async def test_models_go_where_they_are_served_and_the_list_is_the_union(self) -> None:
        alpha = FakeLlama(reactor, reply=REPLY, model="alpha", slots=2)
        beta = FakeLlama(reactor, reply=REPLY, model="beta", slots=2)
        alpha_url, beta_url = await self.started(alpha, beta)
        await self.start(fake=alpha, upstream_check_interval=0.1,
                         upstreams=(UpstreamSpec(alpha_url), UpstreamSpec(beta_url)))
        await self.metrics_until("models known", lambda d: [u["models"] for u in d["upstreams"]]
                                 == [["alpha"], ["beta"]])
        reply = await self.call("GET", "/v1/models")
        models = await reply.json()
        self.assertEqual(reply.code, 200)
        self.assertEqual([m["id"] for m in models["data"]], ["alpha", "beta"])
        self.assertEqual(models["object"], "list")

        async def ask(model: str) -> None:
            self.assertEqual(await self.answered(stream=True, model=model), TEXT)

        await gatherResults([Deferred.fromCoroutine(ask(m)) for m in ["alpha"] * 5 + ["beta"] * 5])
        self.assertEqual({r.json()["model"] for r in alpha.generations}, {"alpha"})
        self.assertEqual({r.json()["model"] for r in beta.generations}, {"beta"})
        self.assertEqual((len(alpha.generations), len(beta.generations)), (5, 5))
        # a name nobody lists (llama.cpp answers any): whichever is free
        await gatherResults([Deferred.fromCoroutine(ask("gpt-4o")) for _ in range(4)])
        self.assertEqual(len(alpha.generations) + len(beta.generations), 14)

    async def test_health_in_metrics_and_prometheus(self) -> None:
        ok = FakeLlama(reactor, slots=3)
        loading = FakeLlama(reactor, loading=True)
        ok_url, loading_url = await self.started(ok, loading)
        down_url = f"http://127.0.0.1:{free_port()}"
        await self.start(fake=ok, upstream_check_interval=0.1, upstreams=(
            UpstreamSpec(ok_url), UpstreamSpec(down_url, slots=2), UpstreamSpec(loading_url, slots=5)))
        doc = await self.metrics_until("checked", lambda d: [u["state"] for u in d["upstreams"]]
                                       == ["ok", "down", "loading"])
        self.assertEqual(doc["upstream"], {"reachable": True, "slots": 3})
        self.assertEqual([(u["url"], u["healthy"], u["places"]) for u in doc["upstreams"]],
                         [(ok_url, True, 3), (down_url, False, 2), (loading_url, False, 5)])
        reply = await self.call("GET", "/metrics/prometheus", key=None)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families((await reply.text()).decode())
            for s in family.samples
        }
        self.assertEqual(samples[("llmgw_upstream_healthy", (("state", "ok"), ("upstream", ok_url)))], 1)
        self.assertEqual(samples[("llmgw_upstream_healthy", (("state", "down"), ("upstream", down_url)))], 0)
        self.assertEqual(samples[("llmgw_upstream_healthy", (("state", "loading"), ("upstream", loading_url)))], 0)
        self.assertEqual(samples[("llmgw_upstream_places", (("upstream", loading_url),))], 5)
        self.assertEqual(samples[("llmgw_queue_limit", ())], 3)

    async def test_the_pool_keeps_a_connection_for_each_place_read_from_props(self) -> None:
        big = FakeLlama(reactor, slots=40)
        await self.started(big)
        await self.start(fake=big, upstream_check_interval=0.1)
        await self.metrics_until("checked", lambda d: d["upstreams"][0]["places"] == 40)
        (upstream,) = self.gw.gateway.upstreams.values()
        self.assertGreaterEqual(upstream.pool.maxPersistentPerHost, 40)

