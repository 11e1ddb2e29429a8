"""Upstream connection handling: the stale keep-alive retry (twisted #7843)."""

from __future__ import annotations

from typing import Any

from support import ALICE, GatewayTestCase, chat_body, reactor
from twisted.internet import endpoints
from twisted.internet.protocol import Factory, Protocol

from twisted_gw.testing import FakeLlama
from twisted_gw.upstream import Upstream, stream_body


class KeepAliveThenDrop(Protocol):
    """
    Answers the first request on a connection and keeps it alive; closes the
    connection without answering any later request on it, as a server does
    that times out an idle keep-alive connection just as a request arrives.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.answered = 0

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.factory.requests.append(head.split(b"\r\n")[0])
            if self.answered and self.factory.drop_reused:
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.answered += 1
            body = b'{"ok": true}'
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )


class StaleConnectionTests(GatewayTestCase):
    async def start_flaky(self, drop_reused: bool = True) -> Any:
        factory = Factory.forProtocol(KeepAliveThenDrop)
        factory.requests = []  # type: ignore[attr-defined]
        factory.drop_reused = drop_reused  # type: ignore[attr-defined]
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        await self.start(upstream=f"http://127.0.0.1:{port.getHost().port}", assemble_non_stream="never")
        return factory

    async def test_post_on_a_dropped_keepalive_connection_is_retried_once(self) -> None:
        factory = await self.start_flaky()
        for _ in range(3):
            reply = await self.call("POST", "/v1/chat/completions", chat_body(False), key=ALICE)
            self.assertEqual(reply.code, 200)
            self.assertEqual(await reply.json(), {"ok": True})
        upstream = self.gw.gateway.upstream
        self.assertEqual(upstream.retries, 2)
        # 3 answered, 2 dropped on reused connections
        self.assertEqual(len(factory.requests), 5)
        metrics = await self.metrics()
        self.assertEqual(metrics["queue"]["active"], 0)
        self.assertEqual(metrics["users"]["alice"]["requests"], 3)

    async def test_a_fresh_connection_that_fails_is_not_retried(self) -> None:
        await self.start(upstream="http://127.0.0.1:1")
        reply = await self.chat(stream=False)
        self.assertEqual(reply.code, 502)
        await reply.text()
        self.assertEqual(self.gw.gateway.upstream.retries, 0)


class UpstreamKeyTests(GatewayTestCase):
    async def test_the_upstream_key_replaces_any_authorization_and_the_callers_headers_are_left_alone(self) -> None:
        fake = FakeLlama(reactor)
        await fake.start()
        self.addCleanup(fake.stop)
        upstream = Upstream(reactor, fake.url, api_key="up-secret")
        self.addCleanup(upstream.close)
        headers = [(b"Authorization", [b"Bearer client"]), (b"X-A", [b"1"])]
        for _ in range(2):  # (the second on the kept-alive connection)
            response = await upstream.request(b"GET", b"/v1/models", headers, None)
            await stream_body(response, lambda data: None).done
            seen = fake.requests[-1].headers
            self.assertEqual(seen.getRawHeaders(b"authorization"), [b"Bearer up-secret"])
            self.assertEqual(seen.getRawHeaders(b"x-a"), [b"1"])
        self.assertEqual(headers, [(b"Authorization", [b"Bearer client"]), (b"X-A", [b"1"])])
