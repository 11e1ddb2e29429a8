"""End-to-end behaviour of the gateway core over real loopback sockets."""

from __future__ import annotations

import json
from typing import Any

from support import ALICE, BOB, GatewayTestCase, chat_body, content_needle, reactor, settle, sse_data
from twisted.internet import task
from twisted.internet.defer import Deferred

from twisted_gw.testing import FakeLlama


class HealthAndMetricsTests(GatewayTestCase):
    async def test_health_needs_no_key_and_says_nothing_else(self) -> None:
        await self.start()
        reply = await self.call("GET", "/health", key=None)
        self.assertEqual(reply.code, 200)
        self.assertEqual(await reply.json(), {"status": "ok"})

    async def test_metrics_keeps_the_original_keys(self) -> None:
        await self.start(max_concurrent=3)
        doc = await self.metrics()
        self.assertEqual(doc["queue"], {"waiting": 0, "active": 0, "depth": 0, "max_concurrent": 3})
        self.assertEqual(set(doc["throughput"]), {"tokens_per_second_1m", "tokens_per_second_5m"})
        self.assertIn("avg_response_time_s", doc["latency"])
        self.assertEqual(doc["totals"], {"requests": 0, "tokens": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                         "cancelled": 0})
        self.assertEqual(doc["per_user_tokens"], {})
        self.assertEqual(doc["users"], {})

    async def test_unknown_path_is_an_openai_shaped_404(self) -> None:
        await self.start()
        reply = await self.call("GET", "/nothing-here", key=None)
        self.assertEqual(reply.code, 404)
        self.assertEqual((await reply.json())["error"]["code"], "not_found")


class AuthTests(GatewayTestCase):
    async def test_missing_key(self) -> None:
        await self.start()
        reply = await self.call("GET", "/v1/models", key=None)
        self.assertEqual(reply.code, 401)
        self.assertTrue((reply.header("WWW-Authenticate") or b"").startswith(b"Bearer"))
        error = (await reply.json())["error"]
        self.assertEqual(set(error), {"message", "type", "code"})
        self.assertEqual(error["code"], "invalid_api_key")
        self.assertEqual(self.fake.requests, [])

    async def test_unknown_key(self) -> None:
        await self.start()
        reply = await self.call("POST", "/v1/chat/completions", chat_body(), key="sk-wrong")
        self.assertEqual(reply.code, 401)
        self.assertEqual((await reply.json())["error"]["type"], "invalid_request_error")
        self.assertEqual(self.fake.requests, [])

    async def test_users_file_reload_and_broken_file(self) -> None:
        await self.start()
        with open(self.users_path, "w") as f:
            json.dump({"sk-carol-key": "carol"}, f)
        await self.gw.gateway.users.poll()
        self.assertEqual((await self.call("GET", "/v1/models", key="sk-carol-key")).code, 200)
        self.assertEqual((await self.call("GET", "/v1/models", key=ALICE)).code, 401)
        # A half-written file keeps the last good set.
        with open(self.users_path, "w") as f:
            f.write('{"sk-dave-key": ')
        await self.gw.gateway.users.poll()
        self.assertEqual((await self.call("GET", "/v1/models", key="sk-carol-key")).code, 200)
        self.assertEqual(len(self.flushLoggedErrors()), 0)


    async def test_user_settings_follow_the_users_file(self) -> None:
        await self.start(users={"users": {"alice": {"keys": [ALICE], "max_concurrent": 1, "weight": 2}}},
                         user_max_queued=7)
        gateway = self.gw.gateway
        first = gateway.settings_for("alice")
        self.assertEqual((first.max_concurrent, first.weight, first.max_queued), (1, 2, 7))
        self.assertIs(gateway.settings_for("alice"), first)  # made once per users file read
        with open(self.users_path, "w") as f:
            json.dump({"users": {"alice": {"keys": [ALICE], "max_concurrent": 3}}}, f)
        await gateway.users.poll()
        again = gateway.settings_for("alice")
        self.assertEqual((again.max_concurrent, again.weight, again.max_queued), (3, 1, 7))
        self.assertEqual((await self.call("GET", "/v1/models")).code, 200)

class ForwardingTests(GatewayTestCase):
    async def test_headers_and_query_string(self) -> None:
        await self.start()
        reply = await self.call(
            "GET", "/v1/models?limit=5&q=a%20b&flag",
            headers={
                "X-Gateway-User": ["mallory"],
                "X-Custom": ["kept"],
                "Connection": ["X-Secret, keep-alive"],
                "X-Secret": ["hop"],
                "Keep-Alive": ["timeout=5"],
                "Proxy-Authorization": ["Basic eA=="],
            },
        )
        self.assertEqual(reply.code, 200)
        await reply.text()
        seen = self.fake.requests[-1]
        self.assertEqual(seen.uri, b"/v1/models?limit=5&q=a%20b&flag")
        self.assertEqual(seen.headers.getRawHeaders(b"x-gateway-user"), [b"alice"])
        self.assertEqual(seen.headers.getRawHeaders(b"x-custom"), [b"kept"])
        for dropped in (b"authorization", b"x-secret", b"keep-alive", b"proxy-authorization"):
            self.assertFalse(seen.headers.hasHeader(dropped), dropped)
        self.assertEqual(seen.headers.getRawHeaders(b"host"), [self.fake.url.removeprefix("http://").encode()])

    async def test_response_status_and_headers_relayed_without_duplicates(self) -> None:
        await self.start()
        reply = await self.call("GET", "/v1/unknown-endpoint")
        self.assertEqual(reply.code, 404)
        self.assertEqual((await reply.json())["error"]["message"], "File Not Found")
        self.assertEqual(len(reply.headers("Date")), 1)
        self.assertEqual(len(reply.headers("Server")), 1)
        self.assertEqual(reply.header("Content-Type"), b"application/json; charset=utf-8")

    async def test_any_method_is_forwarded(self) -> None:
        await self.start()
        for method in ("DELETE", "PUT", "PATCH"):
            reply = await self.call(method, "/v1/files/x", body=b"{}")
            await reply.text()
            self.assertEqual(self.fake.requests[-1].method, method.encode())

    async def test_non_stream_body_relayed_and_counted(self) -> None:
        await self.start(fake=FakeLlama(reactor, cache_n=3))
        reply = await self.chat(stream=False)
        self.assertEqual(reply.code, 200)
        doc = await reply.json()
        self.assertEqual(doc["choices"][0]["message"]["content"], "Hello, this is a fake llama.")
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"], {
            "requests": 1, "prompt_tokens": doc["usage"]["prompt_tokens"],
            "completion_tokens": doc["usage"]["completion_tokens"], "cancelled": 0,
        })
        self.assertEqual(metrics["per_user_tokens"], {"alice": doc["usage"]["completion_tokens"]})
        self.assertEqual(metrics["totals"]["tokens"], doc["usage"]["completion_tokens"])

    async def test_upstream_down_is_a_502(self) -> None:
        await self.start(upstream="http://127.0.0.1:1")
        reply = await self.chat(stream=False)
        self.assertEqual(reply.code, 502)
        error = (await reply.json())["error"]
        self.assertEqual(error["code"], "upstream_unreachable")
        self.assertIn("could not be reached", error["message"])
        self.assertEqual((await self.metrics())["queue"]["active"], 0)

    async def test_bad_json_and_bad_stream_flag(self) -> None:
        await self.start()
        reply = await self.call("POST", "/v1/chat/completions", b'{"model": ')
        self.assertEqual(reply.code, 400)
        self.assertEqual((await reply.json())["error"]["code"], "invalid_json")
        reply = await self.call("POST", "/v1/chat/completions", b'{"stream": "yes"}')
        self.assertEqual(reply.code, 400)
        self.assertEqual(self.fake.requests, [])

    async def test_dot_segments_and_encoded_slashes_are_refused(self) -> None:
        await self.start()
        for path in ("/v1/../health", "/v1/models/..", "/v1/a%2Fb", "/v1/%2e%2e/health"):
            reply = await self.call("GET", path)
            self.assertEqual(reply.code, 400, path)
            await reply.text()
        self.assertEqual(self.fake.requests, [])

    async def test_every_path_under_v1_is_forwarded_and_a_path_that_is_not_utf8_is_a_json_400(self) -> None:
        await self.start()
        for path in ("/v1", "/v1/", "/v1/models%3Fx"):
            reply = await self.call("GET", path)
            await reply.text()
            self.assertEqual(self.fake.requests[-1].uri, path.encode())
        forwarded = len(self.fake.requests)
        reply = await self.call("GET", "/v1/%ff")
        self.assertEqual(reply.code, 400)
        self.assertEqual((await reply.json())["error"]["code"], "invalid_path")
        reply = await self.call("GET", "/v1x")
        self.assertEqual(reply.code, 404)
        self.assertEqual((await reply.json())["error"]["code"], "not_found")
        self.assertEqual(len(self.fake.requests), forwarded)


class StreamingTests(GatewayTestCase):
    async def test_each_chunk_reaches_the_client_before_the_next_is_made(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True))
        reply = await self.chat(stream=True)
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header("Content-Type"), b"text/event-stream")
        self.assertEqual(reply.header("Cache-Control"), b"no-cache")
        self.assertEqual(reply.header("X-Accel-Buffering"), b"no")
        upstream = self.fake.generations[-1]
        for n, token in enumerate(self.fake.reply, start=1):
            self.fake.release()
            await reply.body.wait_for(content_needle(token))
            # the client has chunk n while the upstream has made only n chunks (after the
            # last token the upstream makes its finish chunk at once: it may come along)
            tokens = [e for e in sse_data(reply.body.data) if b'"content":' in e]
            self.assertEqual(len(tokens), n)
            self.assertEqual(upstream.chunks_sent, n)
        body = await reply.text()
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))

    async def test_stream_that_did_not_wait_is_byte_identical_to_upstream(self) -> None:
        await self.start()
        via_gateway = await (await self.chat(stream=True)).text()
        direct = await (await self.call("POST", "/v1/chat/completions", chat_body(True), url=self.fake.url)).text()
        # ids differ per request; everything else must be the same bytes
        self.assertEqual(len(sse_data(via_gateway)), len(sse_data(direct)))
        self.assertNotIn(b": ", via_gateway.replace(b"data: ", b""))
        for a, b in zip(sse_data(via_gateway), sse_data(direct), strict=True):
            if a == b"[DONE]":
                self.assertEqual(a, b)
                continue
            da, db = json.loads(a), json.loads(b)
            da.pop("id"), db.pop("id"), da.pop("created"), db.pop("created")
            self.assertEqual(da, db)

    async def test_usage_from_timings_counts_the_cached_prefix(self) -> None:
        await self.start(fake=FakeLlama(reactor, cache_n=5))
        body = await (await self.chat(stream=True)).text()
        last = json.loads(sse_data(body)[-2])
        timings = last["timings"]
        self.assertNotIn("usage", last)
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["prompt_tokens"], timings["prompt_n"] + timings["cache_n"])
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], timings["predicted_n"])
        self.assertGreater(metrics["throughput"]["tokens_per_second_1m"], 0)

    async def test_usage_chunk_when_the_client_asks(self) -> None:
        await self.start()
        body = await (await self.chat(stream=True, stream_options={"include_usage": True})).text()
        usage_chunks = [json.loads(d) for d in sse_data(body) if d != b"[DONE]" and b'"usage"' in d]
        self.assertEqual(len(usage_chunks), 1)
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], usage_chunks[0]["usage"]["completion_tokens"])
        self.assertEqual(metrics["users"]["alice"]["prompt_tokens"], usage_chunks[0]["usage"]["prompt_tokens"])


class QueueTests(GatewayTestCase):
    async def test_queued_stream_is_told_its_position_and_then_runs(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        first = await self.chat(stream=True)
        second = await self.chat(stream=True, key=BOB)
        third = await self.chat(stream=True)
        self.assertEqual(second.code, 200)
        self.assertEqual(second.header("X-Queue-Position"), b"1")
        self.assertEqual(third.header("X-Queue-Position"), b"2")
        await second.body.wait_for(b": queue position=1\n\n")
        await third.body.wait_for(b": queue position=2\n\n")
        metrics = await self.metrics()
        self.assertEqual(metrics["queue"], {"waiting": 2, "active": 1, "depth": 3, "max_concurrent": 1})
        self.assertEqual(len(self.fake.generations), 1)
        # GET requests never wait behind generations
        models = await self.call("GET", "/v1/models")
        self.assertEqual(models.code, 200)
        await models.text()
        # the first finishes: the second runs, the third moves up
        self.fake.release(len(self.fake.reply))
        await first.text()
        await third.body.wait_for(b": queue position=1\n\n")
        self.fake.release(2 * len(self.fake.reply))
        body2, body3 = await second.text(), await third.text()
        for body in (body2, body3):
            self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
            self.assertNotIn(b"queue.update", body)
        self.assertEqual(body3.count(b": queue position="), 2)
        metrics = await self.metrics()
        self.assertEqual(metrics["queue"]["waiting"], 0)
        self.assertEqual(metrics["queue"]["active"], 0)
        self.assertEqual(metrics["users"]["bob"]["requests"], 1)

    async def test_data_queue_events_on_request(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1, queue_events="data")
        first = await self.chat(stream=True)
        second = await self.chat(stream=True)
        data = await second.body.wait_for(b"\n\n")
        await second.body.wait_for(b"queue.update")
        self.assertTrue(data.startswith(b": queue position=1\n\n"))
        event = json.loads(sse_data(second.body.data)[0])
        self.assertEqual(event, {"object": "queue.update", "queue_position": 1,
                                 "message": "Your query is #1 in the queue"})
        self.fake.release(2 * len(self.fake.reply))
        await first.text()
        await second.text()

    async def test_keepalive_comments_while_waiting(self) -> None:
        clock = task.Clock()
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1, clock=clock)
        first = await self.chat(stream=True)
        second = await self.chat(stream=True)
        await second.body.wait_for(b": queue position=1\n\n")
        self.assertNotIn(b"keepalive", second.body.data)
        clock.advance(14.9)
        await settle()
        self.assertNotIn(b"keepalive", second.body.data)
        clock.advance(0.2)
        await second.body.wait_for(b": keepalive\n\n")
        clock.advance(15)
        await settle()
        self.assertEqual(second.body.data.count(b": keepalive\n\n"), 2)
        self.fake.release(2 * len(self.fake.reply))
        await first.text()
        body = await second.text()
        # no keepalive after it started running
        clock.advance(60)
        self.assertEqual(body.count(b": keepalive\n\n"), 2)

    async def test_a_stream_has_the_same_head_whether_it_waited_or_not(self) -> None:
        """Item 6 of the operations issue: a queued stream said Server: TwistedWeb, one that did not wait llama.cpp."""
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        first = await self.chat(stream=True)
        second = await self.chat(stream=True, key=BOB)
        await second.body.wait_for(b": queue position=1")
        self.fake.release(2 * len(self.fake.reply))
        await first.text()
        await second.text()

        def head(reply: Any) -> dict[bytes, list[bytes]]:
            skip = {b"date", b"x-queue-position"}
            return {name.lower(): values for name, values in reply.response.headers.getAllRawHeaders()
                    if name.lower() not in skip}

        self.assertEqual(head(first), head(second))
        self.assertTrue(head(first)[b"server"][0].startswith(b"TwistedWeb/"))
        self.assertNotIn(b"access-control-allow-origin", head(first))
        self.assertEqual(head(first)[b"content-type"], [b"text/event-stream"])
        self.assertEqual(second.header("X-Queue-Position"), b"1")

    async def test_non_streaming_requests_wait_silently(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        arrived = self.fake.next_request()
        first = Deferred.fromCoroutine(self.chat(stream=False))
        await arrived
        second = Deferred.fromCoroutine(self.chat(stream=False))
        await settle()
        self.assertEqual((await self.metrics())["queue"]["waiting"], 1)
        self.fake.release(2 * len(self.fake.reply))
        r1, r2 = await first, await second
        self.assertEqual(r2.code, 200)
        self.assertIsNone(r2.header("X-Queue-Position"))
        self.assertEqual((await r2.json())["object"], "chat.completion")
        await r1.text()


class CancellationTests(GatewayTestCase):
    async def test_client_leaving_mid_stream_closes_the_upstream(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        reply = await self.chat(stream=True)
        upstream = self.fake.generations[-1]
        self.fake.release(3)
        await reply.body.wait_for(content_needle(" this"))
        reply.body.abort()
        await upstream.ended
        self.assertTrue(upstream.disconnected)
        await settle()
        metrics = await self.metrics()
        self.assertEqual(metrics["queue"]["active"], 0)
        self.assertEqual(metrics["users"]["alice"]["requests"], 1)
        # the three tokens relayed before the client left are billed (an estimate: no usage came)
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], 3)
        self.assertEqual(metrics["users"]["alice"]["cancelled"], 1)

    async def test_client_leaving_the_queue_is_never_run(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        first = await self.chat(stream=True)
        second = await self.chat(stream=True)
        await second.body.wait_for(b": queue position=1")
        second.body.abort()
        await settle()
        self.assertEqual((await self.metrics())["queue"]["waiting"], 0)
        self.fake.release(len(self.fake.reply))
        await first.text()
        await settle()
        self.assertEqual(len(self.fake.generations), 1)
        self.assertEqual((await self.metrics())["queue"], {"waiting": 0, "active": 0, "depth": 0, "max_concurrent": 1})
