"""The upstream client (treq): keep-alive connections, never a POST sent twice, the upstream's own key."""

from __future__ import annotations

import json

from support import ALICE, BOB, GatewayTestCase, chat_body, reactor

from twisted_gw.testing import Answer, FakeLlama, ScriptedUpstream
from twisted_gw.upstream import Upstream, stream_body

OK = b'{"ok": true}'
ANSWER = Answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(OK), OK))
# A server that times out an idle keep-alive connection just as a request arrives: it reads it, then closes.
DROPPED = Answer(b"", close=True)


def request_lines(upstream: ScriptedUpstream) -> list[bytes]:
    return [r.split(b"\r\n", 1)[0] for r in upstream.requests]


class StaleConnectionTests(GatewayTestCase):
    async def start_flaky(self) -> ScriptedUpstream:
        upstream = ScriptedUpstream(reactor, [ANSWER], reused=DROPPED)
        url = await upstream.start()
        self.addCleanup(upstream.stop)
        await self.start(upstream=url, assemble_non_stream="never")
        return upstream

    async def test_a_post_is_never_sent_twice(self) -> None:
        """
        RFC 9110 9.2.2: a generation whose kept-alive connection is closed
        before any answer may have been processed; it is a 502, not a second
        generation.  The next request gets a new connection.
        """
        upstream = await self.start_flaky()
        codes = []
        for _ in range(3):
            reply = await self.call("POST", "/v1/chat/completions", chat_body(False), key=ALICE)
            codes.append(reply.code)
            await reply.text()
        self.assertEqual(codes, [200, 502, 200])
        self.assertEqual(request_lines(upstream), [b"POST /v1/chat/completions HTTP/1.1"] * 3)
        metrics = await self.metrics()
        self.assertEqual(metrics["queue"]["active"], 0)
        self.assertEqual(metrics["users"]["alice"]["requests"], 3)

    async def test_an_idempotent_request_is_retried_on_a_new_connection(self) -> None:
        """Twisted's pool sends a GET again when its kept-alive connection turns out stale."""
        upstream = await self.start_flaky()
        for _ in range(2):
            reply = await self.call("GET", "/v1/models", key=ALICE)
            self.assertEqual(reply.code, 200)
            self.assertEqual(await reply.json(), {"ok": True})
        self.assertEqual(request_lines(upstream), [b"GET /v1/models HTTP/1.1"] * 3)

    async def test_an_unreachable_upstream_is_a_502(self) -> None:
        await self.start(upstream="http://127.0.0.1:1")
        reply = await self.chat(stream=False)
        self.assertEqual(reply.code, 502)
        self.assertEqual((await reply.json())["error"]["code"], "upstream_unreachable")


class StreamsCloseTests(GatewayTestCase):
    async def test_a_server_that_closes_after_each_stream_loses_no_generation(self) -> None:
        """
        llama.cpp closes its connection after a streamed answer without saying
        so: each stream asks for the close, so none is sent on such a connection.
        """
        event = b'data: {"choices":[{"delta":{"content":"Hi"},"index":0}]}\n\ndata: [DONE]\n\n'
        props = b'{"total_slots": 1}'  # (asked first: llama.cpp answers JSON on a connection it keeps)
        upstream = ScriptedUpstream(reactor, [Answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(props), props)
        ), Answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event), close=True,
        )])
        url = await upstream.start()
        self.addCleanup(upstream.stop)
        await self.start(upstream=url, max_concurrent=1)
        replies = [await self.chat(stream=True), await self.chat(stream=True), await self.chat(stream=False)]
        self.assertEqual([r.code for r in replies], [200, 200, 200])  # (the second waited for the first's place)
        bodies = [await r.text() for r in replies]
        self.assertTrue(all(b.endswith(b"data: [DONE]\n\n") for b in bodies[:2]), bodies)
        self.assertEqual(json.loads(bodies[2])["choices"][0]["message"]["content"], "Hi")
        generations = [(r, n) for r, n in zip(upstream.requests, upstream.on_connection, strict=True)
                       if r.startswith(b"POST")]
        self.assertEqual(len(generations), 3)
        self.assertEqual(len({n for _, n in generations}), 3)  # each on a connection of its own
        self.assertTrue(all(b"\r\nConnection: close\r\n" in r for r, _ in generations))


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
        self.assertEqual({tuple(r.headers.getRawHeaders(b"host") or ()) for r in fake.requests},
                         {(fake.url.removeprefix("http://").encode(),)})


class ClientLayersTests(GatewayTestCase):
    """What treq's layers (cookies, redirects, gzip) must and must not do for a proxy."""

    async def scripted(self, *answers: Answer) -> ScriptedUpstream:
        upstream = ScriptedUpstream(reactor, list(answers))
        url = await upstream.start()
        self.addCleanup(upstream.stop)
        await self.start(upstream=url, assemble_non_stream="never")
        return upstream

    async def test_no_cookie_travels_between_users(self) -> None:
        upstream = await self.scripted(Answer(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: session=alice-secret; Path=/\r\nContent-Length: 2\r\n\r\n{}"
        ))
        first = await self.call("GET", "/v1/models", key=ALICE)
        self.assertEqual(first.headers("Set-Cookie"), [b"session=alice-secret; Path=/"])  # relayed to its client
        await first.text()
        second = await self.call("GET", "/v1/models", key=BOB)
        await second.text()
        self.assertEqual(len(upstream.requests), 2)
        self.assertNotIn(b"alice-secret", upstream.requests[1])

    async def test_a_redirect_is_relayed_not_followed(self) -> None:
        upstream = await self.scripted(Answer(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\n\r\n"
        ))
        reply = await self.call("POST", "/v1/chat/completions", chat_body(), key=ALICE)
        self.assertEqual(reply.code, 307)
        self.assertEqual(reply.header("Location"), b"http://127.0.0.1:1/elsewhere")
        await reply.text()
        self.assertEqual(len(upstream.requests), 1)

    async def test_a_gzipped_answer_reaches_the_client_as_it_asked(self) -> None:
        import gzip

        body = json.dumps({"object": "list", "data": []}).encode()
        packed = gzip.compress(body)
        upstream = await self.scripted(Answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(packed), packed)
        ))
        reply = await self.call("GET", "/v1/models", key=ALICE, headers={"Accept-Encoding": ["identity"]})
        self.assertEqual(await reply.text(), body)
        self.assertIsNone(reply.header("Content-Encoding"))
        self.assertIn(b"accept-encoding: gzip", upstream.requests[0].lower())
