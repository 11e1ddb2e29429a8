"""
Several gateways sharing places, the fair queue, per-user limits and quotas through a real Redis
(L{redis_support}): C{twistd -n llmgw} replicas as subprocesses, and gateways in this process where a test
looks inside them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from typing import Any, Optional

import attrs
from redis_support import RedisServer, cluster_name, redis_server
from support import ALICE, BOB, TWISTD, GatewayTestCase, Reply, chat_body, free_port, reactor, settle, until
from twisted.internet.defer import CancelledError, Deferred, DeferredList

from twisted_gw.testing import FakeLlama, RunningGateway, start_gateway

TOKENS = 15  # a chat_body() chat with the fake: 7 prompt + 8 completion tokens


@attrs.define
class Replica:
    """One C{twistd -n llmgw} of the cluster."""

    process: subprocess.Popen[bytes]
    port: int
    log: str
    args: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def logged(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()


class ClusterTestCase(GatewayTestCase):
    timeout = 120
    redis: RedisServer

    def setUp(self) -> None:
        super().setUp()
        self.redis = redis_server()
        self.addCleanup(self.redis.stop)
        self.cluster = cluster_name()
        self.workdir = ""
        self._names = 0

    # Subprocess replicas

    async def upstream(self, fake: FakeLlama, users: Any = None) -> None:
        self.workdir, _ = await self.prepare_subprocess(fake, users)

    def spawn(self, *extra: str, port: Optional[int] = None) -> Replica:
        """Start one more replica in front of the fake, in this test's cluster (C{port}: where one was)."""
        port = port or free_port()
        self._names += 1
        log = os.path.join(self.workdir, f"replica-{self._names}.log")
        args = [TWISTD, "-n", "--pidfile=", "llmgw", "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--upstream", self.fake.url, "--usage-db", "none", "--state", self.redis.url,
                "--cluster", self.cluster, "--upstream-check-interval", "0", "--queue-update-interval", "0",
                "--max-concurrent", str(self.fake.slots), *extra]
        with open(log, "wb") as out:
            process = subprocess.Popen(args, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT)
        replica = Replica(process, port, log, args)
        self.addCleanup(replica.kill)
        return replica

    async def document(self, replica: Replica) -> Any:
        reply = await self.call("GET", "/metrics", key=None, url=replica.url)
        return await reply.json()

    async def cluster_until(self, replica: Replica, check: Any, seconds: float = 15.0) -> Any:
        """Poll C{replica}'s C{/metrics} until C{check(doc)} holds; the document."""
        deadline = time.monotonic() + seconds
        while True:
            doc = await self.document(replica)
            if check(doc):
                return doc
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; last /metrics: {json.dumps(doc)[:2000]}")
            await settle(0.05)

    async def start_replicas(self, n: int, *extra: str) -> list[Replica]:
        replicas = [self.spawn(*extra) for _ in range(n)]
        for replica in replicas:
            await self.wait_until_up(replica.url)
            await self.cluster_until(replica, lambda d: d["cluster"]["store_up"])
        return replicas

    async def generate(self, url: str, key: str = ALICE, stream: bool = False, **extra: Any) -> tuple[int, bytes]:
        reply = await self.call("POST", "/v1/chat/completions", chat_body(stream, **extra), key=key, url=url)
        return reply.code, await reply.text()

    def users_of(self, fake: FakeLlama) -> list[str]:
        """Whose generations the upstream was sent, in the order they started (the gateway's X-Gateway-User)."""
        return [(r.headers.getRawHeaders(b"x-gateway-user") or [b"?"])[0].decode() for r in fake.requests
                if r.uri.endswith(b"/chat/completions")]

    # The store, read directly

    async def store(self, command: str, key: str, *args: Any) -> Any:
        import txredisapi

        connection = await txredisapi.Connection(self.redis.host, self.redis.port, dbid=self.redis.db or None,
                                                 password=self.redis.password, reconnect=False, convertNumbers=False)
        try:
            return await connection.execute_command(command, f"llmgw:{{{self.cluster}}}:{key}", *args)
        finally:
            await connection.disconnect()

    async def held(self) -> dict[str, Any]:
        """What the store says is held and waiting across the cluster."""
        active = await self.store("HGETALL", "active") or []
        return {"active": {active[i]: int(active[i + 1]) for i in range(0, len(active), 2)},
                "waiting": int(await self.store("ZCARD", "queue"))}


    async def store_waits(self, count: int, seconds: float = 5.0) -> None:
        """Poll the store until C{count} requests wait in the cluster's queue (the test then checks what it needs)."""
        deadline = time.monotonic() + seconds
        while (await self.held())["waiting"] != count and time.monotonic() < deadline:
            await settle(0.02)

    async def nothing_held(self, seconds: float = 3.0) -> None:
        """Nothing is held or waiting in the store (its last release may still be on its way from a replica)."""
        deadline = time.monotonic() + seconds
        while await self.held() != {"active": {}, "waiting": 0} and time.monotonic() < deadline:
            await settle(0.05)
        self.assertEqual(await self.held(), {"active": {}, "waiting": 0})


def spread(n: int, replicas: list[Replica]) -> list[str]:
    return [replicas[i % len(replicas)].url for i in range(n)]


class SharedPlacesTests(ClusterTestCase):
    async def test_two_slots_behind_three_replicas(self) -> None:
        """30 concurrent generations over 3 replicas: the 2-slot upstream never runs more than 2; all complete."""
        await self.upstream(FakeLlama(reactor, chunk_delay=0.01, slots=2))
        replicas = await self.start_replicas(3)
        results = await DeferredList([
            Deferred.fromCoroutine(self.generate(url, key=(ALICE, BOB)[i % 2], stream=i % 2 == 0))
            for i, url in enumerate(spread(30, replicas))
        ])
        self.assertEqual([r[1][0] for r in results], [200] * 30)
        self.assertEqual(self.fake.peak, 2)
        self.assertEqual(len(self.users_of(self.fake)), 30)
        await self.nothing_held()
        # each replica's Prometheus series are its own: their sum is the cluster's
        counts = []
        for replica in replicas:
            text = await (await self.call("GET", "/metrics/prometheus", key=None, url=replica.url)).text()
            self.assertIn(b"llmgw_state_store_up 1.0", text)
            counts.append(sum(float(line.split()[-1]) for line in text.decode().splitlines()
                              if line.startswith("llmgw_requests_total{")))
        self.assertEqual(sum(counts), 30)
        self.assertEqual(counts, [10.0, 10.0, 10.0])

    async def test_user_limits_hold_across_replicas(self) -> None:
        users = {"users": {"alice": {"keys": [ALICE], "max_concurrent": 1},
                           "bob": {"keys": [BOB], "tokens_per_minute": 2 * TOKENS + 5}}}
        await self.upstream(FakeLlama(reactor, chunk_delay=0.02, slots=4), users)
        replicas = await self.start_replicas(2)
        # max_concurrent: 1, whichever replica each request goes to
        results = await DeferredList([Deferred.fromCoroutine(self.generate(url))
                                      for url in spread(6, replicas)])
        self.assertEqual([r[1][0] for r in results], [200] * 6)
        self.assertEqual(self.fake.peak, 1)
        # tokens_per_minute: what one replica charged, the other counts and tells
        first = await self.call("POST", "/v1/chat/completions", chat_body(), key=BOB, url=replicas[0].url)
        self.assertEqual(first.header("x-ratelimit-remaining-tokens"), str(2 * TOKENS + 5).encode())
        await first.text()
        await settle(0.1)  # (the charge is made once the request's books are kept)
        second = await self.call("POST", "/v1/chat/completions", chat_body(), key=BOB, url=replicas[1].url)
        self.assertEqual(second.header("x-ratelimit-remaining-tokens"), str(TOKENS + 5).encode())
        await second.text()
        await settle(0.1)
        told = await self.call("GET", "/v1/models", key=BOB, url=replicas[0].url)
        self.assertEqual(told.header("x-ratelimit-remaining-tokens"), b"5")
        await told.text()
        await self.call("POST", "/v1/chat/completions", chat_body(), key=BOB, url=replicas[0].url)
        await settle(0.1)
        refused = await self.call("POST", "/v1/chat/completions", chat_body(), key=BOB, url=replicas[1].url)
        self.assertEqual(refused.code, 429)
        self.assertEqual((await refused.json())["error"]["code"], "rate_limit_exceeded")

    async def test_fair_turns_across_replicas(self) -> None:
        """alice has 10 waiting over two replicas; bob's one request, sent to a third, starts within the next 2."""
        await self.upstream(FakeLlama(reactor, manual=True, slots=1))
        replicas = await self.start_replicas(3)
        alice = [Deferred.fromCoroutine(self.generate(url)) for url in spread(11, replicas[:2])]
        await until(lambda: self.fake.generating == 1)
        await self.store_waits(10)
        self.assertEqual(await self.held(), {"active": {self.fake.url: 1}, "waiting": 10})
        bob = Deferred.fromCoroutine(self.generate(replicas[2].url, key=BOB))
        await self.store_waits(11)
        self.fake.release(1_000_000)
        self.assertEqual((await bob)[0], 200)
        starts = self.users_of(self.fake)
        self.assertEqual(starts[0], "alice")
        self.assertLessEqual(starts[1:].index("bob"), 1, starts)
        results = await DeferredList(alice)
        self.assertEqual([r[1][0] for r in results], [200] * 11)

    async def test_queue_positions_are_the_clusters(self) -> None:
        await self.upstream(FakeLlama(reactor, manual=True, slots=1))
        replicas = await self.start_replicas(2)
        first = Deferred.fromCoroutine(self.call("POST", "/v1/chat/completions", chat_body(True),
                                                 url=replicas[0].url))
        await until(lambda: self.fake.generating == 1)
        waiting = [await self.call("POST", "/v1/chat/completions", chat_body(True), key=BOB, url=replicas[0].url)
                   for _ in range(3)]
        self.assertEqual([w.header("X-Queue-Position") for w in waiting], [b"1", b"2", b"3"])
        last = await self.call("POST", "/v1/chat/completions", chat_body(True), key=BOB, url=replicas[1].url)
        self.assertEqual(last.header("X-Queue-Position"), b"4")
        await last.body.wait_for(b": queue position=4")
        waiting[0].body.abort()  # (one ahead of it leaves: the other replica's stream moves up)
        await last.body.wait_for(b": queue position=3")
        doc = await self.document(replicas[1])
        self.assertEqual((doc["replica"]["waiting"], doc["replica"]["active"]), (1, 0))
        self.fake.release(1000)
        await (await first).text()
        for reply in (*waiting[1:], last):
            self.assertIn(b"[DONE]", await reply.text())


class FailureTests(ClusterTestCase):
    async def test_a_killed_replicas_places_come_back_within_the_lease_timeout(self) -> None:
        await self.upstream(FakeLlama(reactor, chunk_delay=0.02, slots=2))
        doomed = (await self.start_replicas(1, "--lease-timeout", "2"))[0]
        others = await self.start_replicas(2, "--lease-timeout", "2")
        self.fake.chunk_delay = 1.0  # (the doomed replica's two streams run for seconds)
        streams = [await self.call("POST", "/v1/chat/completions", chat_body(True), url=doomed.url)
                   for _ in range(2)]
        await until(lambda: self.fake.generating == 2)
        self.fake.chunk_delay = 0.01
        doomed_waiting = Deferred.fromCoroutine(self.generate(doomed.url))
        doomed_waiting.addErrback(lambda _: None)
        waiting = [Deferred.fromCoroutine(self.generate(url, key=BOB)) for url in spread(4, others)]
        await self.cluster_until(others[0], lambda d: d["queue"]["waiting"] == 5)
        started = len(self.fake.requests)
        doomed.kill()
        killed = time.monotonic()
        for stream in streams:
            stream.body.abort()
        await until(lambda: len(self.fake.requests) > started, 10)
        back = time.monotonic() - killed
        self.assertLess(back, 2 + 0.5, back)  # (the lease timeout, and this test's time to see the request start)
        results = await DeferredList(waiting)
        self.assertEqual([r[1][0] for r in results], [200] * 4)
        self.assertEqual(self.fake.peak, 2)
        # the dead replica's waiter left the queue with it, its places went back once, none is held twice
        await self.nothing_held()
        await self.cluster_until(others[1], lambda d: d["cluster"]["replicas"] == 2 and d["queue"]["active"] == 0)
        self.assertEqual(len(self.users_of(self.fake)), 6)

    async def test_redis_stopped_and_started_again(self) -> None:
        if not self.redis.restartable:
            self.skipTest("needs a redis-server of its own (LLMGW_TEST_REDIS_SERVER), not LLMGW_TEST_REDIS_URL")
        await self.upstream(FakeLlama(reactor, chunk_delay=0.01, slots=2))
        replicas = await self.start_replicas(2)
        done: list[tuple[float, int]] = []
        stop_at = time.monotonic() + 6

        async def worker(url: str) -> None:
            while time.monotonic() < stop_at:
                code, _ = await self.generate(url, stream=True)
                done.append((time.monotonic(), code))

        workers = DeferredList([Deferred.fromCoroutine(worker(url)) for url in spread(6, replicas)])
        await settle(1.0)
        self.redis.stop()
        lost = time.monotonic()
        for replica in replicas:
            await self.cluster_until(replica, lambda d: not d["cluster"]["store_up"], 10)
            text = await (await self.call("GET", "/metrics/prometheus", key=None, url=replica.url)).text()
            self.assertIn(b"llmgw_state_store_up 0.0", text)
        await settle(1.5)
        self.redis.start()  # (empty: it keeps nothing)
        back = time.monotonic()
        for replica in replicas:
            await self.cluster_until(replica, lambda d: d["cluster"]["store_up"] and d["cluster"]["replicas"] == 2)
        await workers
        self.assertEqual({code for _, code in done}, {200})
        self.assertTrue([t for t, _ in done if lost + 1 < t < back], "served while the store was away")
        self.assertTrue([t for t, _ in done if t > back + 0.5], "served after it came back")
        self.assertEqual(self.fake.peak, 2)
        await self.nothing_held()
        for replica in replicas:
            log = replica.logged()
            self.assertIn("state store 127.0.0.1", log)
            self.assertIn("lost", log)
            self.assertIn("back", log)


class ChaosTests(ClusterTestCase):
    async def test_300_requests_with_disconnects_and_a_replica_killed(self) -> None:
        """Clients leave at random moments, one replica is SIGKILLed and started again: no place leaks."""
        await self.upstream(FakeLlama(reactor, chunk_delay=0.005, slots=3))
        replicas = await self.start_replicas(3, "--lease-timeout", "2")
        rng = random.Random(26)
        outcomes: dict[str, int] = {}
        plan = list(range(300))

        async def one(i: int) -> None:
            replica = replicas[i % 3]
            stream = rng.random() < 0.5
            cut = rng.choice([None, None, 0.0, 0.01, 0.03, 0.06])
            request = Deferred.fromCoroutine(self.call("POST", "/v1/chat/completions", chat_body(stream),
                                                       key=(ALICE, BOB)[i % 2], url=replica.url))
            timer = reactor.callLater(cut, request.cancel) if cut is not None else None
            try:
                reply: Reply = await request
                if timer is not None and timer.active():
                    timer.cancel()
                    reactor.callLater(rng.random() * 0.03, reply.body.abort)
                await reply.text()
                kind = f"{reply.code}"
            except CancelledError:
                kind = "left before the head"
            except Exception:
                kind = "cut"
            outcomes[kind] = outcomes.get(kind, 0) + 1

        async def client(start: int) -> None:
            for i in plan[start::30]:
                await one(i)

        clients = DeferredList([Deferred.fromCoroutine(client(k)) for k in range(30)])
        await settle(1.0)
        victim = replicas[1]
        victim.kill()
        await settle(0.5)
        replicas[1] = self.spawn(*victim.args[victim.args.index("--lease-timeout"):], port=victim.port)
        await clients
        self.assertEqual(sum(outcomes.values()), 300)
        self.assertGreater(outcomes.get("200", 0), 60, outcomes)
        # once the dead replica's lease ran out: nothing held, nothing waiting, in the store and on each replica
        await self.cluster_until(replicas[0], lambda d: d["cluster"]["replicas"] == 3)
        await self.nothing_held(6)
        await until(lambda: self.fake.generating == 0)
        self.assertLessEqual(self.fake.peak, 3)
        for replica in replicas:
            doc = await self.document(replica)
            self.assertEqual((doc["replica"]["waiting"], doc["replica"]["active"]), (0, 0))
            code, _ = await self.generate(replica.url)
            self.assertEqual(code, 200)


class InProcessTests(ClusterTestCase):
    """Gateways in this process: their state, looked at from inside."""

    async def replicas(self, n: int, fake: FakeLlama, users: Any = None, **config: Any) -> list[RunningGateway]:
        config.setdefault("max_concurrent", fake.slots)
        await self.start(fake, users, state=self.redis.url, cluster=self.cluster, **config)
        gateways = [self.gw]
        for _ in range(n - 1):
            gw = await start_gateway(reactor, self.config)
            self.addCleanup(gw.stop)
            gateways.append(gw)
        await until(lambda: all(g.gateway.store.up for g in gateways))
        return gateways

    async def test_alone_a_replica_takes_its_share(self) -> None:
        """While the store is away each of 2 replicas takes at most half the places; back, it rejoins."""
        if not self.redis.restartable:
            self.skipTest("needs a redis-server of its own (LLMGW_TEST_REDIS_SERVER), not LLMGW_TEST_REDIS_URL")
        users = {"users": {"alice": {"keys": [ALICE], "tokens_per_day": 10 * TOKENS}, "bob": {"keys": [BOB]}}}
        gateways = await self.replicas(2, FakeLlama(reactor, manual=True, slots=4), users)
        first, second = gateways
        running = Deferred.fromCoroutine(self.call("POST", "/v1/chat/completions", chat_body(True), url=first.url))
        await until(lambda: self.fake.generating == 1)
        self.redis.stop()
        await until(lambda: not first.gateway.store.up and not second.gateway.store.up)
        self.assertEqual([r.share for r in first.gateway.router.routes], [2])
        replies = [Deferred.fromCoroutine(self.call("POST", "/v1/chat/completions", chat_body(), key=BOB, url=url))
                   for url in (first.url,) * 3 + (second.url,) * 3]
        await until(lambda: self.fake.generating == 4)
        await settle(0.2)
        self.assertEqual(self.fake.generating, 4)  # (2 + 2: the one it held counts in the first one's share)
        self.assertEqual((first.gateway.admission.waiting, second.gateway.admission.waiting), (2, 1))
        self.redis.start()
        await until(lambda: first.gateway.store.up and second.gateway.store.up, 10)
        self.assertEqual([r.share for r in first.gateway.router.routes], [None])
        self.assertEqual(await self.held(), {"active": {self.fake.url: 4}, "waiting": 3})
        self.fake.release(10_000)
        for d in (running, *replies):
            await (await d).text()
        self.assertEqual(self.fake.peak, 4)
        await until(lambda: first.gateway.store.active == 0, 3)

    async def test_quota_charges_made_alone_are_handed_over(self) -> None:
        if not self.redis.restartable:
            self.skipTest("needs a redis-server of its own (LLMGW_TEST_REDIS_SERVER), not LLMGW_TEST_REDIS_URL")
        users = {"users": {"alice": {"keys": [ALICE], "tokens_per_day": 10 * TOKENS}, "bob": {"keys": [BOB]}}}
        first, second = await self.replicas(2, FakeLlama(reactor), users)
        await (await self.call("POST", "/v1/chat/completions", chat_body(), url=second.url)).text()
        await settle(0.1)
        told = await self.call("GET", "/v1/models", url=first.url)
        self.assertEqual(told.header("x-ratelimit-remaining-tokens"), str(9 * TOKENS).encode())
        self.redis.stop()
        await until(lambda: not first.gateway.store.up)
        for _ in range(2):  # (served alone: from the last counts it read, plus its own)
            await (await self.call("POST", "/v1/chat/completions", chat_body(), url=first.url)).text()
        await settle(0.1)
        alone = await self.call("GET", "/v1/models", url=first.url)
        self.assertEqual(alone.header("x-ratelimit-remaining-tokens"), str(7 * TOKENS).encode())
        self.redis.start()  # (empty)
        await until(lambda: first.gateway.store.up and second.gateway.store.up, 10)
        await settle(0.2)
        told = await self.call("GET", "/v1/models", url=second.url)
        self.assertEqual(told.header("x-ratelimit-remaining-tokens"), str(7 * TOKENS).encode())

    async def test_weights_hold_across_replicas(self) -> None:
        """alice (weight 2) waits on one replica, bob (weight 1) on the other: 2 to 1 over 30 starts."""
        users = {"users": {"alice": {"keys": [ALICE], "weight": 2}, "bob": {"keys": [BOB], "weight": 1}}}
        first, second = await self.replicas(2, FakeLlama(reactor, manual=True, reply=("x",), slots=1), users)
        running = await self.call("POST", "/v1/chat/completions", chat_body(True), url=first.url)
        await until(lambda: self.fake.generating == 1)
        queued = [Deferred.fromCoroutine(self.generate(gw.url, key=key))
                  for _ in range(20) for gw, key in ((first, ALICE), (second, BOB))]
        await self.store_waits(40)
        served = await self.served_in_turn(running, 30)
        self.assertLessEqual(abs(served.count(b"alice") - 20), 1, served)
        self.assertLessEqual(abs(served.count(b"bob") - 10), 1, served)
        self.fake.release(100)
        self.assertEqual({r[1][0] for r in await DeferredList(queued)}, {200})

    async def test_max_queued_counts_every_replicas_waiters(self) -> None:
        users = {"users": {"alice": {"keys": [ALICE], "max_queued": 1}, "bob": {"keys": [BOB]}}}
        first, second = await self.replicas(2, FakeLlama(reactor, manual=True, slots=1), users)
        running = await self.call("POST", "/v1/chat/completions", chat_body(True), key=BOB, url=first.url)
        await until(lambda: self.fake.generating == 1)
        waiting = await self.call("POST", "/v1/chat/completions", chat_body(True), url=second.url)
        self.assertEqual(waiting.header("X-Queue-Position"), b"1")
        refused = await self.call("POST", "/v1/chat/completions", chat_body(True), url=first.url)
        self.assertEqual(refused.code, 429)
        self.assertEqual((await refused.json())["error"]["code"], "user_queue_full")
        self.fake.release(10_000)
        for reply in (running, waiting):
            self.assertIn(b"[DONE]", await reply.text())

    async def test_a_stopping_replica_gives_back_at_once(self) -> None:
        first, second = await self.replicas(2, FakeLlama(reactor, manual=True, slots=1), drain_timeout=0.1)
        running = Deferred.fromCoroutine(self.call("POST", "/v1/chat/completions", chat_body(True),
                                                   url=second.url))
        running.addErrback(lambda _: None)
        await until(lambda: self.fake.generating == 1)
        waiting = Deferred.fromCoroutine(self.generate(first.url))
        await until(lambda: first.gateway.admission.waiting == 1)
        await second.stop()  # (no lease timeout to wait for)
        self.fake.release(10_000)
        self.assertEqual((await waiting)[0], 200)
        await self.nothing_held()
        self.assertEqual(await self.store("ZCARD", "replicas"), 1)



class TLSStoreTests(GatewayTestCase):
    timeout = 60

    async def test_rediss_with_a_private_ca_and_a_user(self) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        folder = os.path.abspath(self.mktemp())  # (redis-server reads its files after changing to its --dir)
        os.makedirs(folder)
        paths = {name: os.path.join(folder, f"{name}.pem") for name in ("ca", "cert", "key", "other")}
        ca.cert_pem.write_to_path(paths["ca"])
        cert.cert_chain_pems[0].write_to_path(paths["cert"])
        cert.private_key_pem.write_to_path(paths["key"])
        trustme.CA().cert_pem.write_to_path(paths["other"])
        port = free_port()
        redis = redis_server(binary_only=True, extra=(
            "--tls-port", str(port), "--tls-cert-file", paths["cert"], "--tls-key-file", paths["key"],
            "--tls-ca-cert-file", paths["ca"], "--tls-auth-clients", "no",
            "--user", "llmgw", "on", ">s3cret", "~*", "&*", "+@all", "--user", "default", "off"))
        self.addCleanup(redis.stop)
        url = f"rediss://llmgw:s3cret@localhost:{port}/3"
        await self.start(FakeLlama(reactor, chunk_delay=0.01, slots=1), max_concurrent=1, state=url,
                         state_ca=paths["ca"], cluster=cluster_name())
        other = await start_gateway(reactor, self.config)
        self.addCleanup(other.stop)
        await until(lambda: self.gw.gateway.store.up and other.gateway.store.up)
        results = await DeferredList([Deferred.fromCoroutine(self.call("POST", "/v1/chat/completions",
                                                                       chat_body(), url=gw.url))
                                      for gw in (self.gw, other, self.gw, other)])
        self.assertEqual([r[1].code for r in results], [200] * 4)
        self.assertEqual(self.fake.peak, 1)
        self.assertEqual((await self.metrics())["cluster"]["store"], f"rediss://localhost:{port}/3")
        # a store whose certificate this CA did not sign is never joined: nothing is handed out
        from attrs import evolve

        stranger = await start_gateway(reactor, evolve(self.config, state_ca=paths["other"]))
        self.addCleanup(stranger.stop)
        await settle(2.5)
        self.assertFalse(stranger.gateway.store.up)
