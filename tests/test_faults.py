"""Fault paths over real loopback sockets: cancellation, limits, timeouts, upstream failures."""

from __future__ import annotations

import json
import random
from typing import Any

import openai
from support import ALICE, BOB, GatewayTestCase, chat_body, content_needle, raw_exchange, reactor, settle, sse_data
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThread

from twisted_gw.testing import FakeLlama


class CancellationPhaseTests(GatewayTestCase):
    async def _leave_while_waiting_for_headers(self, stream: bool) -> None:
        await self.start(fake=FakeLlama(reactor, header_delay=30), max_concurrent=1)
        arrived = self.fake.next_request()
        reply = Deferred.fromCoroutine(self.chat(stream=stream))
        upstream = await arrived
        # the gateway is now waiting for the upstream's headers; the client leaves
        reply.addErrback(lambda _: None)
        reply.cancel()
        await upstream.ended
        self.assertTrue(upstream.disconnected)
        await settle()
        metrics = await self.metrics()
        self.assertEqual(metrics["queue"], {"waiting": 0, "active": 0, "depth": 0, "max_concurrent": 1})
        self.assertEqual(metrics["users"]["alice"]["cancelled"], 1)
        self.assertEqual(self.gw.gateway.admission.free, 1)

    async def test_stream_client_leaving_before_headers_closes_upstream(self) -> None:
        await self._leave_while_waiting_for_headers(stream=True)

    async def test_non_stream_client_leaving_before_headers_closes_upstream(self) -> None:
        await self._leave_while_waiting_for_headers(stream=False)

    async def test_queued_client_leaving_moves_the_others_up(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        first = await self.chat(stream=True)
        second = await self.chat(stream=True)
        third = await self.chat(stream=True)  # one user: first come, first served
        await third.body.wait_for(b": queue position=2")
        second.body.abort()
        await third.body.wait_for(b": queue position=1")
        self.fake.release(2 * len(self.fake.reply))
        await first.text()
        await third.text()
        await settle()
        self.assertEqual(len(self.fake.generations), 2)
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["cancelled"], 1)
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], 2 * len(self.fake.reply))

    async def test_200_requests_half_vanishing_leave_nothing_behind(self) -> None:
        fake = FakeLlama(reactor, chunk_delay=0.003)
        await self.start(fake=fake, max_concurrent=2, max_queue=300)
        rng = random.Random(7)
        finished = []

        async def one(i: int) -> None:
            stream = rng.random() < 0.7
            vanish = rng.random() < 0.5
            delay = rng.uniform(0, 1.5)
            d = Deferred.fromCoroutine(self.chat(stream=stream, key=ALICE if i % 2 else BOB))
            if not vanish:
                reply = await d
                body = await reply.text()
                finished.append(body.endswith(b"[DONE]\n\n") or b"\"chat.completion\"" in body or body)
                return
            await task.deferLater(reactor, delay, lambda: None)
            if d.called:
                reply = await d
                if not reply.body.done.called:
                    reply.body.abort()
                else:
                    await reply.body.done
            else:
                d.addErrback(lambda _: None)
                d.cancel()

        runs = [Deferred.fromCoroutine(one(i)) for i in range(200)]
        results = await DeferredList(runs, consumeErrors=True)
        self.assertTrue(all(ok for ok, _ in results), [r for ok, r in results if not ok][:3])
        for _ in range(100):
            if not self.gw.gateway.proxy.active:
                break
            await settle()
        metrics = await self.metrics()
        self.assertEqual([b for b in finished if b is not True], [])
        # clients that vanished before the gateway had their request are not in the totals
        self.assertGreaterEqual(metrics["totals"]["requests"] - metrics["totals"]["cancelled"], len(finished))
        self.assertLessEqual(metrics["totals"]["requests"], 200)
        self.assertEqual(metrics["queue"]["active"], 0)
        self.assertEqual(metrics["queue"]["waiting"], 0)
        self.assertEqual(self.gw.gateway.admission.free, 2)
        self.assertGreater(metrics["totals"]["cancelled"], 0, (metrics, len(self.fake.generations), len(finished)))
        self.assertEqual(self.gw.gateway.proxy.active, set())
        # every upstream request was either completed or seen to disconnect
        await settle(0.2)
        self.assertTrue(all(r.ended.called for r in self.fake.requests))


class LimitTests(GatewayTestCase):
    async def test_full_queue_is_a_429_with_retry_after(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1, max_queue=2)
        first = await self.chat(stream=True)
        waiting = [await self.chat(stream=True) for _ in range(2)]
        refused = await self.chat(stream=True)
        self.assertEqual(refused.code, 429)
        self.assertGreaterEqual(int(refused.header("Retry-After") or b"0"), 1)
        self.assertEqual((await refused.json())["error"]["code"], "queue_full")
        self.fake.release(3 * len(self.fake.reply))
        for reply in (first, *waiting):
            self.assertTrue((await reply.text()).endswith(b"[DONE]\n\n"))

    async def test_queue_timeout_streaming_is_an_error_event_the_sdk_raises(self) -> None:
        clock = task.Clock()
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1, queue_timeout=600,
                         idle_timeout=3600, clock=clock)  # (the running stream is not cut meanwhile)
        first = await self.chat(stream=True)
        client = openai.OpenAI(base_url=self.gw.url + "/v1", api_key=BOB, max_retries=0, timeout=15)
        self.addCleanup(client.close)

        def run() -> list[Any]:
            stream = client.chat.completions.create(
                model="fake-llama", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            return list(stream)

        queued = deferToThread(run)
        while self.gw.gateway.admission.waiting < 1:
            await settle(0.01)
        await settle()
        clock.advance(600)
        with self.assertRaises(openai.APIError) as caught:
            await queued
        self.assertIn("Timed out waiting in the queue", str(caught.exception))
        self.fake.release(len(self.fake.reply))
        await first.text()
        self.assertEqual(len(self.fake.generations), 1)

    async def test_queue_timeout_non_streaming_is_a_503(self) -> None:
        clock = task.Clock()
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1, queue_timeout=30, clock=clock)
        first = await self.chat(stream=True)
        second = Deferred.fromCoroutine(self.chat(stream=False))
        while self.gw.gateway.admission.waiting < 1:
            await settle(0.01)
        clock.advance(30)
        reply = await second
        self.assertEqual(reply.code, 503)
        self.assertEqual((await reply.json())["error"]["code"], "queue_timeout")
        self.fake.release(len(self.fake.reply))
        await first.text()

    async def test_upstream_header_timeout_is_a_504_and_closes_upstream(self) -> None:
        clock = task.Clock()
        await self.start(fake=FakeLlama(reactor, header_delay=30), upstream_timeout=20, clock=clock)
        arrived = self.fake.next_request()
        reply_d = Deferred.fromCoroutine(self.chat(stream=False))
        upstream = await arrived
        clock.advance(20)
        reply = await reply_d
        self.assertEqual(reply.code, 504)
        self.assertEqual((await reply.json())["error"]["code"], "upstream_timeout")
        await upstream.ended
        self.assertTrue(upstream.disconnected)
        self.assertEqual((await self.metrics())["queue"]["active"], 0)

    async def test_upstream_timeout_longer_than_the_idle_one_is_kept(self) -> None:
        # The wait for the head is the upstream timeout's, however short the idle timeout is.
        clock = task.Clock()
        await self.start(fake=FakeLlama(reactor, header_delay=30), upstream_timeout=20, idle_timeout=5, clock=clock)
        arrived = self.fake.next_request()
        reply_d = Deferred.fromCoroutine(self.chat(stream=False))
        upstream = await arrived
        (ex,) = self.gw.gateway.proxy.active
        clock.advance(5)
        clock.advance(14.9)
        self.assertIsNone(ex.interrupted)
        clock.advance(0.1)
        reply = await reply_d
        self.assertEqual(reply.code, 504)
        self.assertEqual((await reply.json())["error"]["code"], "upstream_timeout")
        await upstream.ended
        self.assertTrue(upstream.disconnected)

    async def test_idle_timeout_counts_from_the_last_data(self) -> None:
        clock = task.Clock()
        await self.start(fake=FakeLlama(reactor, manual=True), idle_timeout=60, upstream_timeout=600, clock=clock)
        reply = await self.chat(stream=True)
        upstream = self.fake.generations[-1]
        self.fake.release(1)
        await reply.body.wait_for(content_needle(self.fake.reply[0]))
        clock.advance(59)
        self.fake.release(1)
        await reply.body.wait_for(content_needle(self.fake.reply[1]))
        clock.advance(59)  # 118 s after the headers, 59 after the last data
        (ex,) = self.gw.gateway.proxy.active
        self.assertIsNone(ex.interrupted)
        clock.advance(1)
        body = await reply.cut_short()
        self.assertEqual(json.loads(sse_data(body)[-1])["error"]["code"], "idle_timeout")
        await upstream.ended
        self.assertTrue(upstream.disconnected)

    async def test_idle_timeout_mid_stream_is_an_error_event(self) -> None:
        clock = task.Clock()
        await self.start(fake=FakeLlama(reactor, manual=True), idle_timeout=60, clock=clock)
        reply = await self.chat(stream=True)
        upstream = self.fake.generations[-1]
        self.fake.release(2)
        await reply.body.wait_for(content_needle(","))
        clock.advance(60)
        body = await reply.cut_short()
        error = json.loads(sse_data(body)[-1])["error"]
        self.assertEqual(error["code"], "idle_timeout")
        self.assertNotIn(b"[DONE]", body)
        await upstream.ended
        self.assertTrue(upstream.disconnected)

    async def test_a_generation_that_keeps_producing_is_never_cut(self) -> None:
        clock = task.Clock()
        await self.start(fake=FakeLlama(reactor, manual=True), idle_timeout=60, upstream_timeout=60, clock=clock)
        reply = await self.chat(stream=True)
        for token in self.fake.reply:
            self.fake.release()
            await reply.body.wait_for(content_needle(token))
            clock.advance(50)  # 8 tokens x 50 s: far past both timeouts in total
        body = await reply.text()
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))

    async def test_body_over_the_limit_is_refused_before_it_is_read(self) -> None:
        await self.start(max_body=1000)
        port = self.gw.port.getHost().port  # type: ignore[attr-defined]

        def send(head: bytes, body: bytes = b"") -> bytes:
            return raw_exchange(port, head + body)

        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode()
                + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n")
        answer = await deferToThread(send, head)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])
        self.assertEqual(json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"], "request_too_large")
        chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode()
                   + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = await deferToThread(send, chunked, b"400\r\n" + b"x" * 1024 + b"\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])
        # a body within the limit still works
        ok = await self.chat(stream=False)
        self.assertEqual(ok.code, 200)
        await ok.text()
        self.assertEqual(len(self.fake.generations), 1)


class UpstreamFailureTests(GatewayTestCase):
    async def test_upstream_error_status_passes_through(self) -> None:
        await self.start()
        for status in (400, 429, 500, 503):
            reply = await self.call("POST", "/v1/chat/completions", chat_body(True, error_status=status))
            self.assertEqual(reply.code, status)
            self.assertEqual(reply.header("Content-Type"), b"application/json; charset=utf-8")
            self.assertEqual((await reply.json())["error"]["message"], "fake failure")
        self.assertEqual((await self.metrics())["queue"]["active"], 0)

    async def test_upstream_error_after_queue_comments_is_an_error_event(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        first = await self.chat(stream=True)
        second = await self.call("POST", "/v1/chat/completions", chat_body(True, error_status=500), key=BOB)
        await second.body.wait_for(b": queue position=1")
        self.fake.release(len(self.fake.reply))
        await first.text()
        body = await second.text()
        error = json.loads(sse_data(body)[-1])["error"]
        self.assertEqual(error["code"], "upstream_500")
        self.assertIn("fake failure", error["message"])

    async def test_upstream_dying_mid_stream_ends_the_stream_with_an_error_event(self) -> None:
        await self.start(fake=FakeLlama(reactor, die_after=3))
        reply = await self.chat(stream=True)
        body = await reply.cut_short()  # the error event, then the connection closed: never a whole stream
        self.assertEqual(reply.code, 200)
        events = sse_data(body)
        self.assertEqual(len(events), 4)
        self.assertEqual(json.loads(events[-1])["error"]["code"], "upstream_disconnected")
        self.assertNotIn(b"<html", body.lower())
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], 3)
        self.assertEqual(metrics["queue"]["active"], 0)

    async def test_upstream_dying_mid_stream_the_sdk_raises(self) -> None:
        await self.start(fake=FakeLlama(reactor, die_after=3))
        client = openai.OpenAI(base_url=self.gw.url + "/v1", api_key=ALICE, max_retries=0, timeout=15)
        self.addCleanup(client.close)

        def run() -> list[Any]:
            return list(client.chat.completions.create(
                model="fake-llama", messages=[{"role": "user", "content": "hi"}], stream=True
            ))

        with self.assertRaises(openai.APIError):
            await deferToThread(run)


class BadInputTests(GatewayTestCase):
    async def test_unknown_method_is_405(self) -> None:
        await self.start()
        reply = await self.call("BREW", "/v1/models")
        self.assertEqual(reply.code, 405)
        self.assertEqual((await reply.json())["error"]["code"], "method_not_allowed")
        self.assertEqual(self.fake.requests, [])

    async def test_non_utf8_json_body_is_400(self) -> None:
        await self.start()
        reply = await self.call("POST", "/v1/chat/completions", b'{"model": "\xff\xfe"}')
        self.assertEqual(reply.code, 400)
        self.assertEqual((await reply.json())["error"]["code"], "invalid_encoding")
        self.assertEqual(self.fake.requests, [])

    async def test_oversized_headers_are_refused(self) -> None:
        await self.start()
        reply = await self.call("GET", "/v1/models", headers={"X-Big": ["a" * 20000]})
        self.assertEqual(reply.code, 431)
        self.assertEqual((await reply.json())["error"]["code"], "headers_too_large")
        many = {f"X-H{i}": ["v" * 100] for i in range(200)}  # each line short, 21 kB in all
        reply = await self.call("GET", "/v1/models", headers=many)
        self.assertEqual(reply.code, 431)
        self.assertEqual((await reply.json())["error"]["code"], "headers_too_large")
        numerous = {f"X-H{i}": ["v"] for i in range(501)}  # 4 kB, one header over the count
        reply = await self.call("GET", "/v1/models", headers=numerous)
        self.assertEqual(reply.code, 431)
        self.assertEqual((await reply.json())["error"]["code"], "too_many_headers")
        self.assertEqual(self.fake.requests, [])

    async def test_unreadable_requests_get_a_json_400(self) -> None:
        await self.start()
        port = self.gw.port.getHost().port  # type: ignore[attr-defined]

        def send(data: bytes) -> bytes:
            return raw_exchange(port, data)

        auth = b"Authorization: Bearer " + ALICE.encode() + b"\r\n"
        for raw in (
            b"GET /v1/models HTTP/1.1 extra\r\nHost: x\r\n\r\n",  # a malformed request line
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",  # a malformed header
            b"GET /v1/models HTTP/1.1\r\nBad Name: x\r\n\r\n",  # a header name that is not a token
        ):
            answer = await deferToThread(send, raw)
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200])
            self.assertIn(b"Connection: close", head)
            self.assertEqual(json.loads(body)["error"]["code"], "invalid_http", raw)
        # A malformed chunked body is seen by Twisted's parse alone (no public hook): its own bare 400.
        answer = await deferToThread(send, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
                                     + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
        self.assertEqual(answer, b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertEqual(self.fake.requests, [])
        ok = await self.chat(stream=False)  # the gateway serves on
        self.assertEqual(ok.code, 200)
        await ok.text()
