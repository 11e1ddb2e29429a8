"""
Several gateways sharing places, the fair queue, per-user limits and quotas through a real Redis
(L{redis_support}): in this process, and as C{twistd -n llmgw} replicas.
"""

from __future__ import annotations

import json
from typing import Any

from redis_support import RedisServer, cluster_name, redis_server
from support import ALICE, BOB, GatewayTestCase, chat_body, reactor, until
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList

from twisted_gw.config import UpstreamSpec
from twisted_gw.testing import FakeLlama, RunningGateway, start_gateway


class ClusterTestCase(GatewayTestCase):
    timeout = 60
    redis: RedisServer

    def setUp(self) -> None:
        super().setUp()
        self.redis = redis_server()
        self.addCleanup(self.redis.stop)
        self.cluster = cluster_name()

    async def replicas(self, n: int, fake: FakeLlama, users: Any = None, **config: Any) -> list[RunningGateway]:
        """C{n} gateways in this process in front of C{fake}, sharing this test's store, each joined."""
        config.setdefault("max_concurrent", fake.slots)
        await self.start(fake, users, state=self.redis.url, cluster=self.cluster, **config)
        gateways = [self.gw]
        for _ in range(n - 1):
            gw = await start_gateway(reactor, self.config)
            self.addCleanup(gw.stop)
            gateways.append(gw)
        await until(lambda: all(g.gateway.store.up for g in gateways))
        return gateways

    async def generate(self, gw: RunningGateway, key: str = ALICE, stream: bool = False) -> tuple[int, bytes]:
        reply = await self.call("POST", "/v1/chat/completions", chat_body(stream), key=key, url=gw.url)
        return reply.code, await reply.text()


class SharedPlacesTests(ClusterTestCase):
    async def test_places_are_counted_once_across_replicas(self) -> None:
        fake = FakeLlama(reactor, chunk_delay=0.01, slots=2)
        gateways = await self.replicas(3, fake)
        results = await DeferredList([Deferred.fromCoroutine(self.generate(gateways[i % 3], stream=i % 2 == 0))
                                      for i in range(12)])
        self.assertEqual([r[1][0] for r in results], [200] * 12)
        self.assertEqual(fake.peak, 2)
        # the cluster's queue, as of this replica's last word with the store (it renews its leases every second)
        await until(lambda: self.gw.gateway.store.active == 0, 3)
        metrics = await self.metrics()
        self.assertEqual((metrics["queue"]["active"], metrics["replica"]["active"]), (0, 0))
        self.assertEqual(metrics["cluster"]["replicas"], 3)
