"""Non-streaming requests sent upstream as streams, and the JSON answer built in the gateway."""

from __future__ import annotations

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from support import BOB, GatewayTestCase, chat_body, reactor, until
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.apis.assemble import Assembler, as_stream_request
from twisted_gw.testing import FakeLlama

TAIL = (b',"created":1700000000,"id":"chatcmpl-1","model":"m","system_fingerprint":"b1",'
        b'"object":"chat.completion.chunk"}')


def normalised(body: bytes) -> bytes:
    """The body with its per-request id and timestamp replaced."""
    body = re.sub(rb'"id":"[^"]*"', b'"id":"X"', body)
    return re.sub(rb'"created":\d+', b'"created":0', body)


class AssemblerTests(SynchronousTestCase):
    def test_stream_request(self) -> None:
        doc = {"model": "m", "messages": [], "stream": False, "stream_options": {"include_usage": False}}
        self.assertEqual(json.loads(as_stream_request(doc)),
                         {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}})

    def test_reasoning_and_tool_calls_are_merged(self) -> None:
        assembler = Assembler(chat=True)
        head = {"created": 5, "id": "c1", "model": "m", "system_fingerprint": "b1", "object": "chat.completion.chunk"}
        deltas = [
            {"role": "assistant", "content": None},
            {"reasoning_content": "think "},
            {"reasoning_content": "hard"},
            {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                             "function": {"name": "get_", "arguments": "{\"a\""}}]},
            {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": ": 1}"}}]},
        ]
        for delta in deltas:
            assembler.feed({"choices": [{"finish_reason": None, "index": 0, "delta": delta}], **head})
        assembler.feed({"choices": [{"finish_reason": "tool_calls", "index": 0, "delta": {}}], **head})
        assembler.feed({"choices": [], **head, "usage": {"completion_tokens": 9, "prompt_tokens": 3,
                                                         "total_tokens": 12}, "timings": {"predicted_n": 9}})
        doc = assembler.document()
        self.assertEqual(list(doc), ["choices", "created", "model", "system_fingerprint", "object", "usage", "id",
                                     "timings"])
        self.assertEqual(doc["choices"], [{"finish_reason": "tool_calls", "index": 0, "message": {
            "role": "assistant", "content": None, "reasoning_content": "think hard",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"a\": 1}"},
                            "id": "call_1"}],
        }}])
        self.assertEqual(doc["usage"]["total_tokens"], 12)

    def test_odd_chunks_are_skipped_not_raised(self) -> None:
        assembler = Assembler(chat=True)
        odd: list[object] = [
            [1], "x", {"choices": 5}, {"choices": {"delta": "x"}}, {"choices": [7, {"delta": "text"}]},
            {"choices": [{"index": "1", "delta": {"tool_calls": 3}}]},
            {"choices": [{"delta": {"tool_calls": [{"index": None, "function": "f"}, {"index": [0]}]}}]},
        ]
        self.assertEqual([assembler.feed(chunk) for chunk in odd], [False] * len(odd))
        self.assertTrue(assembler.feed({"choices": [{"delta": {"content": "ok"}}]}))
        self.assertFalse(assembler.feed({"choices": [{"delta": {"content": ""}}]}))
        message = json.loads(assembler.body())["choices"][0]["message"]
        self.assertEqual((message["content"], len(message["tool_calls"])), ("ok", 2))

    def test_completions_chunks(self) -> None:
        assembler = Assembler(chat=False)
        self.assertTrue(assembler.feed({"choices": [{"text": "a", "index": 0, "logprobs": None}]}))
        self.assertFalse(assembler.feed({"choices": [{"text": "", "index": 0, "finish_reason": "length"}]}))
        self.assertEqual(assembler.document()["choices"],
                         [{"text": "a", "index": 0, "logprobs": None, "finish_reason": "length"}])

    def test_error_event(self) -> None:
        assembler = Assembler(chat=True)
        assembler.feed({"error": {"code": 500, "message": "boom", "type": "server_error"}})
        self.assertEqual(json.loads(assembler.body()), {"error": {"code": 500, "message": "boom",
                                                                  "type": "server_error"}})


def llama_chunk(content: object, tail: bytes = TAIL) -> bytes:
    """A chat token chunk's bytes as llama.cpp writes them (compact, UTF-8 as is)."""
    doc = {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": content}}]}
    try:
        head = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escaped, as UTF-8 has none
        head = json.dumps(doc, separators=(",", ":")).encode("ascii")
    return head[:-1] + tail


class FeedEventTests(SynchronousTestCase):
    """Assembler.feed_event reads each event's JSON; the answer is the stream's text, in llama.cpp's order."""

    def test_usual_stream(self) -> None:
        role = b'{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}]'
        texts = ["Hel", "lo", "", ' "quoted"}}],', "\\", "\u00e9 \U0001f600", "\n"]
        events = [role + TAIL, *(llama_chunk(text) for text in texts)]
        events.append(b'{"choices":[{"finish_reason":"stop","index":0,"delta":{}}]' + TAIL)
        events.append(b'{"choices":[]' + TAIL[:-1] + b',"usage":{"completion_tokens":7,"prompt_tokens":3}}')
        assembler = Assembler(chat=True)
        self.assertTrue(all(assembler.feed_event(event) for event in events))
        answer = json.loads(assembler.body())
        self.assertEqual(list(answer), ["choices", "created", "model", "system_fingerprint", "object", "usage", "id"])
        self.assertEqual(answer["choices"], [{"finish_reason": "stop", "index": 0,
                                              "message": {"role": "assistant", "content": "".join(texts)}}])
        self.assertEqual(answer["usage"], {"completion_tokens": 7, "prompt_tokens": 3})
        self.assertEqual(assembler.tokens, 6)  # the empty text is no token

    def test_what_is_not_json_is_refused(self) -> None:
        assembler = Assembler(chat=True)
        for event in (b"[DONE]", b"{", b'{"a": NaN', b"\xff"):
            self.assertFalse(assembler.feed_event(event), event)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.one_of(st.text(), st.sampled_from(['"', "\\", "}}],", '"}}],"x":"', "\ud800"])),
                    min_size=1, max_size=8))
    def test_any_texts(self, texts: list[str]) -> None:
        assembler = Assembler(chat=True)
        for text in texts:
            self.assertTrue(assembler.feed_event(llama_chunk(text)))
        answer = json.loads(assembler.body())
        self.assertEqual(answer["choices"][0]["message"]["content"], "".join(texts))
        self.assertEqual(assembler.tokens, sum(1 for text in texts if text))


class AssembledResponseTests(GatewayTestCase):
    async def _compare(self, path: str, body: bytes) -> None:
        via = await self.call("POST", path, body)
        direct = await self.call("POST", path, body, url=self.fake.url)
        via_body, direct_body = await via.text(), await direct.text()
        self.assertEqual(via.code, 200)
        self.assertEqual(via.header("Content-Type"), direct.header("Content-Type"))
        self.assertEqual(via.response.length, len(via_body))
        self.assertEqual(normalised(via_body), normalised(direct_body))
        # upstream was asked for a stream; the direct call was not
        gateway_call, direct_call = self.fake.generations[-2:]
        self.assertEqual(gateway_call.json()["stream"], True)
        self.assertEqual(direct_call.json().get("stream", False), False)

    async def test_chat_answer_is_byte_compatible(self) -> None:
        await self.start(fake=FakeLlama(reactor, cache_n=4, reply=("Grüße", ", ", "\"quoted\"", " \\ ok")))
        await self._compare("/v1/chat/completions", chat_body(False))
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], 4)

    async def test_completions_answer_is_byte_compatible(self) -> None:
        await self.start()
        await self._compare("/v1/completions", json.dumps({"model": "m", "prompt": "Once upon"}).encode())

    async def test_non_stream_client_leaving_mid_generation_stops_the_upstream(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True))
        arrived = self.fake.next_request()
        reply = Deferred.fromCoroutine(self.chat(stream=False))
        upstream = await arrived
        self.assertTrue(upstream.json()["stream"])
        self.fake.release(3)
        while upstream.chunks_sent < 3:
            await Deferred.fromCoroutine(self.metrics())
        reply.addErrback(lambda _: None)
        reply.cancel()
        await upstream.ended
        self.assertTrue(upstream.disconnected)
        await until(lambda: not self.gw.gateway.proxy.counting)  # (its prompt, counted by the upstream)
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["cancelled"], 1)
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], 3)
        self.assertEqual(metrics["queue"]["active"], 0)
        # billed the prompt the upstream read: what it reports for the same request run to its end
        self.fake.manual = False
        await (await self.chat(stream=False, key=BOB)).text()
        users = (await self.metrics())["users"]
        self.assertEqual(users["alice"]["prompt_tokens"], users["bob"]["prompt_tokens"])
        self.assertGreater(users["alice"]["prompt_tokens"], 0)

    async def test_a_request_that_waited_in_the_queue_is_assembled_too(self) -> None:
        # while it waits its parsed body is let go; it is parsed again to be sent as a stream
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        first = Deferred.fromCoroutine(self.chat(stream=False))
        await self.fake.next_request()
        second = Deferred.fromCoroutine(self.chat(stream=False))
        while (await self.metrics())["queue"]["waiting"] < 1:
            pass
        self.fake.release(2 * len(self.fake.reply))
        for reply in (await first, await second):
            self.assertEqual(reply.code, 200)
            self.assertEqual((await reply.json())["object"], "chat.completion")
        self.assertEqual([g.json()["stream"] for g in self.fake.generations], [True, True])
        self.assertEqual(self.fake.generations[0].json()["messages"], self.fake.generations[1].json()["messages"])

    async def test_upstream_without_props_is_not_assembled(self) -> None:
        await self.start(fake=FakeLlama(reactor, has_props=False))
        reply = await self.chat(stream=False)
        self.assertEqual((await reply.json())["object"], "chat.completion")
        self.assertEqual(self.fake.generations[-1].json()["stream"], False)

    async def test_never(self) -> None:
        await self.start(assemble_non_stream="never")
        await (await self.chat(stream=False)).text()
        self.assertEqual(self.fake.generations[-1].json()["stream"], False)
        self.assertEqual([r.uri for r in self.fake.requests], [b"/v1/chat/completions"])

    async def test_upstream_error_status_is_passed_through(self) -> None:
        await self.start()
        reply = await self.call("POST", "/v1/chat/completions", chat_body(False, error_status=503))
        self.assertEqual(reply.code, 503)
        self.assertEqual((await reply.json())["error"]["message"], "fake failure")

    async def test_a_failure_writing_the_answer_is_the_gateways_not_the_upstreams(self) -> None:
        """
        The answer is written as the body completes, in that call; what goes
        wrong there is an internal error (500), not the upstream breaking off
        (502), and the gateway goes on.
        """
        await self.start()

        def boom(assembler: Assembler) -> bytes:
            raise RuntimeError("assembly went wrong")

        original = Assembler.body
        Assembler.body = boom  # type: ignore[method-assign,assignment]
        try:
            reply = await self.chat(stream=False)
        finally:
            Assembler.body = original  # type: ignore[method-assign]
        self.assertEqual(reply.code, 500)
        self.assertEqual((await reply.json())["error"]["code"], "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        again = await self.chat(stream=False)
        self.assertEqual(again.code, 200)
        self.assertEqual((await again.json())["object"], "chat.completion")
        self.assertEqual((await self.metrics())["queue"]["active"], 0)

    async def test_upstream_dying_is_a_502(self) -> None:
        await self.start(fake=FakeLlama(reactor, die_after=2))
        reply = await self.chat(stream=False)
        self.assertEqual(reply.code, 502)
        self.assertEqual((await reply.json())["error"]["code"], "upstream_disconnected")

