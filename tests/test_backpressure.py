"""A slow reader must not make the gateway buffer the generation in memory."""

from __future__ import annotations

from support import BOB, GatewayTestCase, reactor
from twisted.internet import task

from twisted_gw.testing import FakeLlama

TOKENS = 6000
TOKEN = "x" * 2000  # 12 MB of content in all


class BackpressureTests(GatewayTestCase):
    timeout = 60

    async def test_slow_reader_pauses_the_upstream_read(self) -> None:
        fake = FakeLlama(reactor, reply=(TOKEN,) * TOKENS)
        await self.start(fake=fake, max_concurrent=2)
        slow = await self.chat(stream=True)
        slow.body.transport.pauseProducing()  # type: ignore[union-attr]  # stop reading
        slow_upstream = self.fake.generations[-1]
        (ex,) = self.gw.gateway.proxy.active
        # the fake writes regardless of its socket; wait until it has made it all
        while slow_upstream.chunks_sent < TOKENS:
            await task.deferLater(reactor, 0.01, lambda: None)
        await task.deferLater(reactor, 0.2, lambda: None)
        self.assertGreater(slow_upstream.bytes_sent, 12_000_000)
        # The gateway stopped reading from the upstream: it relayed (and so read) what the sockets between it
        # and the client hold, a few hundred kB, not the 12 MB made.
        self.assertLess(ex.tracker.content_chunks * len(TOKEN), 4_000_000, ex.tracker.content_chunks)
        self.assertLess(len(slow.body.data), slow_upstream.bytes_sent // 2)

        # meanwhile another user's stream flows through
        other = await self.chat(stream=True, key=BOB, max_tokens=50)
        other_body = await other.text()
        self.assertTrue(other_body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(other_body.count(b"data: "), 52)

        # the slow reader resumes and gets every byte
        slow.body.transport.resumeProducing()  # type: ignore[union-attr]
        body = await slow.text()
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(body.count(TOKEN.encode()), TOKENS)
