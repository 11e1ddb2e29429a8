"""A slow reader must not make the gateway buffer the generation in memory."""

from __future__ import annotations

from typing import Any

from support import BOB, GatewayTestCase, reactor
from twisted.internet import task

from twisted_gw.testing import FakeLlama

TOKENS = 6000
TOKEN = "x" * 2000  # 12 MB of content in all


def buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds in user space, waiting for the socket."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class BackpressureTests(GatewayTestCase):
    timeout = 60

    async def test_slow_reader_pauses_the_upstream_read(self) -> None:
        fake = FakeLlama(reactor, reply=(TOKEN,) * TOKENS)
        await self.start(fake=fake, max_concurrent=2)
        slow = await self.chat(stream=True)
        slow.body.transport.pauseProducing()  # type: ignore[union-attr]  # stop reading
        slow_upstream = self.fake.generations[-1]
        (ex,) = self.gw.gateway.proxy.active
        client_side = ex.request.channel.transport
        worst = 0
        # the fake writes regardless of its socket; wait until it has made it all
        while slow_upstream.chunks_sent < TOKENS:
            worst = max(worst, buffered(client_side))
            await task.deferLater(reactor, 0.01, lambda: None)
        await task.deferLater(reactor, 0.2, lambda: None)
        worst = max(worst, buffered(client_side))
        self.assertGreater(slow_upstream.bytes_sent, 12_000_000)
        # the gateway holds at most a few of the 2 kB chunks past Twisted's 64 kB mark
        self.assertLess(worst, 256 * 1024, worst)
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
