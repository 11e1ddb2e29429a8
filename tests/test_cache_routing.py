"""
Cache-aware routing end to end: fake llama.cpp servers that report as cached (timings.cache_n) the longest prefix of
a prompt they were sent before, several users' multi-turn conversations, and a saturated upstream.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from support import ALICE, BOB, GatewayTestCase, reactor, until

from twisted_gw.config import UpstreamSpec
from twisted_gw.testing import FakeLlama

USERS = {"users": {name: {"keys": [f"sk-{name}"]} for name in ("ann", "ben", "cat", "dan")}}


def system_prompt(name: str) -> str:
    return f"You are {name}'s assistant. " + " ".join(f"{name} rule number {i} is to be helpful." for i in range(60))


class CacheRoutingTests(GatewayTestCase):
    timeout = 60

    async def servers(self, count: int = 2, **options: Any) -> list[FakeLlama]:
        fakes = [FakeLlama(reactor, prefix_cache=True, **options) for _ in range(count)]
        for fake in fakes:
            await fake.start()
            self.addCleanup(fake.stop)
        return fakes

    async def turn(self, user: str, history: list[dict[str, str]], path: str = "/v1/chat/completions") -> int:
        """One turn of C{user}'s conversation (its history grows); the prompt tokens the upstream found cached."""
        history.append({"role": "user", "content": f"question {len(history)} from {user}"})
        if path == "/v1/messages":
            body: Any = {"model": "m", "max_tokens": 16, "system": system_prompt(user), "messages": history}
        else:
            body = {"model": "m", "messages": [{"role": "system", "content": system_prompt(user)}, *history]}
        reply = await self.call("POST", path, json.dumps(body).encode(), key=f"sk-{user}")
        answer = await reply.json()
        self.assertEqual(reply.code, 200, answer)
        if path == "/v1/messages":
            history.append({"role": "assistant", "content": answer["content"][0]["text"]})
            return int(answer["usage"]["cache_read_input_tokens"])
        history.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        return int(answer["timings"]["cache_n"])

    async def test_conversations_stick_to_their_upstream_and_spread(self) -> None:
        fakes = await self.servers()
        await self.start(fake=fakes[0], users=USERS, upstreams=tuple(UpstreamSpec(f.url) for f in fakes))
        histories: dict[str, list[dict[str, str]]] = {user: [] for user in USERS["users"]}
        cached: dict[str, list[int]] = {user: [] for user in USERS["users"]}
        for _ in range(4):  # the users' turns interleaved, one request at a time
            for user, history in histories.items():
                path = "/v1/messages" if user == "dan" else "/v1/chat/completions"
                cached[user].append(await self.turn(user, history, path))
        for user in USERS["users"]:
            where = [i for i, fake in enumerate(fakes) for r in fake.generations
                     if f"You are {user}'s assistant" in r.body.decode()]
            self.assertEqual(len(set(where)), 1, f"{user}'s turns went to {where}")
            self.assertLess(cached[user][0], 10)  # (a first turn shares only the template's start with others)
            self.assertTrue(all(n > 100 for n in cached[user][1:]), cached[user])  # every later turn hit the cache
        # the load stays balanced: the four conversations are two on each
        self.assertEqual(sorted(len(f.generations) for f in fakes), [8, 8])
        routing = (await self.metrics())["routing"]
        self.assertEqual(routing["decisions"], {"cache": 12, "balance": 0, "least_busy": 4})
        self.assertEqual(routing["mode"], "cache-aware")
        rates = [u["cache_hit_rate"] for u in (await self.metrics())["upstreams"]]
        self.assertTrue(all(rate > 0.6 for rate in rates), rates)
        exposition = (await (await self.call("GET", "/metrics/prometheus", key=None)).text()).decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(exposition) for s in family.samples}
        self.assertEqual(sum(v for (name, labels), v in samples.items()
                             if name == "llmgw_routing_decisions_total" and ("reason", "cache") in labels), 12)
        self.assertEqual(samples[("llmgw_routing_prefix_share_count", ())], 16)

    async def test_a_saturated_upstream_sheds_the_next_turn(self) -> None:
        fakes = await self.servers(manual=True)
        await self.start(fake=fakes[0], upstreams=tuple(UpstreamSpec(f.url) for f in fakes))
        for fake in fakes:
            fake.manual = False
        history: list[dict[str, str]] = []
        body = {"model": "m", "messages": [{"role": "system", "content": system_prompt("alice")}]}
        reply = await self.call("POST", "/v1/chat/completions", json.dumps(body).encode(), key=ALICE)
        await reply.text()
        [holder] = [f for f in fakes if f.generations]
        other = next(f for f in fakes if f is not holder)
        # bob's long stream holds the holder's only slot (a new conversation goes to the idle upstream first,
        # so bob is sent there by routing the other upstream busy first)
        holder.manual = True
        other.manual = True
        busy_other = await self.chat(stream=True, key=BOB)  # goes to the idle other upstream
        history.append({"role": "user", "content": "next"})
        self.assertEqual(len(other.generations), 1)
        other.release(len(other.reply))
        await busy_other.text()
        busy_holder = await self.call("POST", "/v1/chat/completions", json.dumps(
            {"model": "m", "stream": True, "messages": [{"role": "system", "content": system_prompt("alice")},
                                                       {"role": "user", "content": "a side question"}]}).encode(),
            key=BOB)  # alice's prefix: the cache sends it to the holder, which is idle
        self.assertEqual(len(holder.generations), 2)
        # now the holder is full and the other idle: alice's next turn is shed to the other
        other.manual = False
        body["messages"] = [*body["messages"], *history]
        reply = await self.call("POST", "/v1/chat/completions", json.dumps(body).encode(), key=ALICE)
        await reply.text()
        self.assertEqual(len(other.generations), 2)
        routing = (await self.metrics())["routing"]["decisions"]
        self.assertEqual(routing["balance"], 1)
        holder.release(len(holder.reply))
        await busy_holder.text()

    async def test_least_busy_mode_ignores_the_cache(self) -> None:
        fakes = await self.servers()
        await self.start(fake=fakes[0], users=USERS, routing="least-busy",
                         upstreams=tuple(UpstreamSpec(f.url) for f in fakes))
        history: list[dict[str, str]] = []
        for _ in range(4):
            await self.turn("ann", history)
        self.assertEqual([len(f.generations) for f in fakes], [2, 2])  # round-robin on ties
        self.assertEqual((await self.metrics())["routing"], {
            "mode": "least-busy", "decisions": {"cache": 0, "balance": 0, "least_busy": 4},
            "by_upstream": {f.url: {"least_busy": 2} for f in fakes}})

    async def test_an_upstream_that_restarted_is_forgotten(self) -> None:
        fakes = await self.servers()
        await self.start(fake=fakes[0], users=USERS, upstream_check_interval=0.05, upstream_down_grace=30,
                         upstreams=tuple(UpstreamSpec(f.url) for f in fakes))
        history: list[dict[str, str]] = []
        await self.turn("ann", history)
        await self.turn("ann", history)
        [holder] = [f for f in fakes if f.generations]
        self.assertEqual((await self.metrics())["routing"]["decisions"]["cache"], 1)
        port = await holder.crash()
        await until(lambda: any(r.state == "down" for r in self.gw.gateway.router.routes))
        restarted = FakeLlama(reactor, prefix_cache=True)  # (a new process: an empty cache)
        await restarted.start(port=port)
        self.addCleanup(restarted.stop)
        await until(lambda: all(r.state == "ok" for r in self.gw.gateway.router.routes))
        await self.turn("ann", history)
        # not sent there for a cache it no longer has: least-busy decided
        self.assertEqual((await self.metrics())["routing"]["decisions"], {"cache": 1, "balance": 0, "least_busy": 2})
