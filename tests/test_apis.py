"""
Every API llama.cpp serves, through the official SDKs (run in a thread): Anthropic Messages (and count_tokens),
OpenAI Responses and embeddings, with the same keys, queue, accounting and quotas as chat; errors in Anthropic's
dialect on /v1/messages; the prompt of a request whose client left billed all the same.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import anthropic
import openai
from support import ALICE, BOB, GatewayTestCase, content_needle, reactor, settle, until
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from twisted_gw.testing import FakeLlama

MESSAGES: Any = [{"role": "user", "content": "say hello to the gateway"}]
SYSTEM = "You are a terse assistant."


class APITestCase(GatewayTestCase):
    def anthropic(self, key: str = ALICE, **options: Any) -> anthropic.Anthropic:
        client = anthropic.Anthropic(api_key=key, base_url=self.gw.url, max_retries=0, timeout=15, **options)
        self.addCleanup(client.close)
        return client

    def openai(self, key: str = ALICE) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.gw.url + "/v1", api_key=key, max_retries=0, timeout=15)
        self.addCleanup(client.close)
        return client

    async def user(self, name: str = "alice") -> dict[str, Any]:
        users: dict[str, Any] = (await self.metrics())["users"]
        return users.get(name, {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0})

    async def ledger(self) -> list[tuple[Any, ...]]:
        await settle()
        ledger = self.gw.gateway.ledger
        await ledger.flush()
        db = sqlite3.connect(ledger.path)
        self.addCleanup(db.close)
        return db.execute("SELECT user, api, prompt_tokens, completion_tokens, usage_source, cancelled "
                          "FROM requests ORDER BY id").fetchall()


class MessagesTests(APITestCase):
    async def test_create_with_each_way_of_giving_the_key(self) -> None:
        await self.start(fake=FakeLlama(reactor, cache_n=3))
        for client in (self.anthropic(), self.anthropic(key=None, auth_token=ALICE)):  # type: ignore[arg-type]

            def create(c: anthropic.Anthropic = client) -> Any:
                return c.messages.create(model="fake-llama", max_tokens=64, system=SYSTEM, messages=MESSAGES)

            message = await deferToThread(create)
            self.assertEqual(message.content[0].text, "Hello, this is a fake llama.")
        usage = message.usage
        self.assertEqual(usage.cache_read_input_tokens, 3)
        billed = usage.input_tokens + (usage.cache_read_input_tokens or 0)
        # a client whose only key header is Anthropic's x-api-key
        reply = await self.call("POST", "/v1/messages", json.dumps(
            {"model": "fake-llama", "max_tokens": 64, "system": SYSTEM, "messages": MESSAGES}).encode(),
            key=None, headers={"x-api-key": [ALICE], "anthropic-version": ["2023-06-01"]})
        self.assertEqual(reply.code, 200)
        self.assertEqual((await reply.json())["type"], "message")
        alice = await self.user()
        self.assertEqual((alice["prompt_tokens"], alice["completion_tokens"]), (3 * billed, 3 * usage.output_tokens))
        for sent in self.fake.generations:  # no key of the client's reaches the upstream
            self.assertFalse(sent.headers.hasHeader(b"x-api-key"))
            self.assertFalse(sent.headers.hasHeader(b"authorization"))
            self.assertEqual(sent.headers.getRawHeaders(b"x-gateway-user"), [b"alice"])
        self.assertEqual({row[1] for row in await self.ledger()}, {"messages"})

    async def test_stream_text_and_usage(self) -> None:
        await self.start(fake=FakeLlama(reactor, cache_n=2))
        client = self.anthropic()

        def run() -> tuple[str, Any]:
            with client.messages.stream(model="fake-llama", max_tokens=64, messages=MESSAGES) as stream:
                text = "".join(stream.text_stream)
                return text, stream.get_final_message()

        text, final = await deferToThread(run)
        self.assertEqual(text, "Hello, this is a fake llama.")
        alice = await self.user()
        self.assertEqual(alice["prompt_tokens"], final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0))
        self.assertEqual(alice["completion_tokens"], final.usage.output_tokens)
        self.assertGreater(alice["prompt_tokens"], 2)

    async def test_count_tokens_neither_waits_nor_bills(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        busy = await self.chat(stream=True, key=BOB)  # holds the only place (its head came from the upstream)
        counted = await deferToThread(lambda: self.anthropic().messages.count_tokens(
            model="fake-llama", system=SYSTEM, messages=MESSAGES))
        self.assertGreater(counted.input_tokens, 0)
        alice = await self.user()
        self.assertEqual((alice["prompt_tokens"], alice["completion_tokens"]), (0, 0))
        self.fake.release(len(self.fake.reply))
        await busy.text()

    async def test_queued_stream_gets_comments_the_sdk_ignores(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1, keepalive_interval=0.05)
        first = await self.chat(stream=True, key=BOB)
        client = self.anthropic()

        def run() -> list[str]:
            with client.messages.stream(model="fake-llama", max_tokens=64, messages=MESSAGES) as stream:
                return [event.type for event in stream]

        queued = deferToThread(run)
        await until(lambda: self.gw.gateway.admission.waiting == 1)
        await settle(0.2)  # (a keepalive or two)
        self.fake.release(2 * len(self.fake.reply))
        await first.text()
        kinds = await queued
        self.assertEqual(kinds[0], "message_start")
        self.assertEqual(kinds[-1], "message_stop")
        self.assertIn("text", kinds)


class QueuedResponsesTests(APITestCase):
    async def test_a_queued_responses_stream_through_the_sdk(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1, keepalive_interval=0.05)
        first = await self.chat(stream=True, key=BOB)
        client = self.openai()

        def run() -> tuple[list[str], str]:
            kinds: list[str] = []
            text = ""
            for event in client.responses.create(model="fake-llama", input="say hello", stream=True):
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
            return kinds, text

        queued = deferToThread(run)
        await until(lambda: self.gw.gateway.admission.waiting == 1)
        await settle(0.2)  # (a keepalive or two)
        self.fake.release(2 * len(self.fake.reply))
        await first.text()
        kinds, text = await queued
        self.assertEqual((kinds[0], kinds[-1], text), ("response.created", "response.completed",
                                                       "Hello, this is a fake llama."))


class AnthropicErrorTests(APITestCase):
    """The gateway's own errors on /v1/messages, as the anthropic SDK reads them (e.body)."""

    def assert_error(self, e: anthropic.APIStatusError, status: int, kind: str) -> None:
        self.assertEqual(e.status_code, status)
        body: Any = e.body
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], kind)
        self.assertTrue(body["error"]["message"])

    async def test_bad_key_quota_and_queue_full(self) -> None:
        users = {"users": {"alice": {"keys": [ALICE], "tokens_per_day": 10}, "bob": {"keys": [BOB]}}}
        await self.start(fake=FakeLlama(reactor, manual=True), users=users, max_concurrent=1, max_queue=0)
        with self.assertRaises(anthropic.AuthenticationError) as bad_key:
            await deferToThread(lambda: self.anthropic(key="sk-wrong").messages.create(
                model="fake-llama", max_tokens=8, messages=MESSAGES))
        self.assert_error(bad_key.exception, 401, "authentication_error")
        # the place taken by bob: a queue of 0 is full
        busy = await self.chat(stream=True, key=BOB)
        with self.assertRaises(anthropic.RateLimitError) as full:
            await deferToThread(lambda: self.anthropic(key=BOB).messages.create(
                model="fake-llama", max_tokens=8, messages=MESSAGES))
        self.assert_error(full.exception, 429, "rate_limit_error")
        self.fake.release(len(self.fake.reply))
        await busy.text()
        # alice spends her 10 tokens a day through the Responses API; Messages then refuses her
        self.fake.manual = False
        await deferToThread(lambda: self.openai().responses.create(model="fake-llama", input="say hello"))
        with self.assertRaises(anthropic.RateLimitError) as quota:
            await deferToThread(lambda: self.anthropic().messages.create(
                model="fake-llama", max_tokens=8, messages=MESSAGES))
        self.assert_error(quota.exception, 429, "rate_limit_error")
        self.assertIsNotNone(quota.exception.response.headers.get("retry-after"))
        with self.assertRaises(openai.RateLimitError) as chat_quota:  # and so does every other API
            await deferToThread(lambda: self.openai().embeddings.create(model="fake-llama", input="hello"))
        self.assertEqual(chat_quota.exception.body["code"], "rate_limit_exceeded")
        # count_tokens is not a generation: still answered
        counted = await deferToThread(lambda: self.anthropic().messages.count_tokens(
            model="fake-llama", messages=MESSAGES))
        self.assertGreater(counted.input_tokens, 0)

    async def test_no_upstream_is_overloaded_and_a_stream_gets_an_error_event(self) -> None:
        await self.start(upstream="http://127.0.0.1:9", upstream_check_interval=0.05, upstream_down_grace=0.2)
        with self.assertRaises(anthropic.APIStatusError) as down:
            await deferToThread(lambda: self.anthropic().messages.create(
                model="fake-llama", max_tokens=8, messages=MESSAGES))
        self.assert_error(down.exception, 503, "overloaded_error")
        reply = await self.call("POST", "/v1/messages", json.dumps(
            {"model": "m", "max_tokens": 8, "messages": MESSAGES, "stream": True}).encode())
        body = await reply.text()
        self.assertTrue(body.startswith(b": queue position=1") or reply.code == 503, body)
        if reply.code == 200:  # (queued before the grace ended: told in the stream, Anthropic's way)
            event, data = body.rstrip(b"\n").split(b"\n")[-2:]
            self.assertEqual(event, b"event: error")
            self.assertEqual(json.loads(data.removeprefix(b"data: "))["error"]["type"], "overloaded_error")

    async def test_a_stream_that_began_ends_with_an_error_event(self) -> None:
        """A queued Messages stream whose wait times out: Anthropic's event: error, which its SDK raises."""
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1, queue_timeout=0.3)
        busy = await self.chat(stream=True, key=BOB)
        reply = await self.call("POST", "/v1/messages", json.dumps(
            {"model": "m", "max_tokens": 8, "messages": MESSAGES, "stream": True}).encode())
        self.assertEqual(reply.code, 200)
        body = await reply.text()
        self.assertTrue(body.startswith(b": queue position=1\n\n"), body)
        self.assertTrue(body.endswith(b"\n\n"))
        event, data = body.rstrip(b"\n").split(b"\n")[-2:]
        self.assertEqual(event, b"event: error")
        self.assertEqual(json.loads(data.removeprefix(b"data: ")), {"type": "error", "error": {
            "type": "overloaded_error", "message": "Timed out waiting in the queue."}})

        def run() -> None:
            with self.anthropic().messages.stream(model="m", max_tokens=8, messages=MESSAGES) as stream:
                for _ in stream:
                    pass

        with self.assertRaises(anthropic.APIStatusError) as raised:
            await deferToThread(run)
        self.assertEqual(raised.exception.body["error"]["type"], "overloaded_error")
        # on other paths the error event keeps OpenAI's shape
        reply = await self.call("POST", "/v1/responses", json.dumps({"model": "m", "input": "hi",
                                                                     "stream": True}).encode())
        last = (await reply.text()).rstrip(b"\n").split(b"\n")[-1]
        self.assertEqual(json.loads(last.removeprefix(b"data: "))["error"]["code"], "queue_timeout")
        self.fake.release(len(self.fake.reply))
        await busy.text()

    async def test_bad_json_and_a_large_body(self) -> None:
        await self.start(max_body=1000)
        reply = await self.call("POST", "/v1/messages", b"{not json")
        self.assertEqual(reply.code, 400)
        self.assertEqual((await reply.json())["error"]["type"], "invalid_request_error")
        reply = await self.call("POST", "/v1/messages", b'{"x": "' + b"a" * 2000 + b'"}')
        self.assertEqual(reply.code, 413)
        self.assertEqual(await reply.json(), {"type": "error", "error": {
            "type": "request_too_large", "message": (await reply.json())["error"]["message"]}})
        # other paths keep OpenAI's shape
        reply = await self.call("POST", "/v1/chat/completions", b"{not json")
        self.assertEqual((await reply.json())["error"]["code"], "invalid_json")


class ResponsesAndEmbeddingsTests(APITestCase):
    async def test_responses_create_and_stream(self) -> None:
        await self.start(fake=FakeLlama(reactor, cache_n=2))
        client = self.openai()
        response = await deferToThread(lambda: client.responses.create(
            model="fake-llama", instructions=SYSTEM, input="say hello"))
        self.assertEqual(response.output_text, "Hello, this is a fake llama.")
        assert response.usage is not None

        def run() -> tuple[str, Any]:
            text, usage = "", None
            for event in client.responses.create(model="fake-llama", input="say hello", stream=True):
                if event.type == "response.output_text.delta":
                    text += event.delta
                elif event.type == "response.completed":
                    usage = event.response.usage
            return text, usage

        text, streamed = await deferToThread(run)
        self.assertEqual(text, "Hello, this is a fake llama.")
        alice = await self.user()
        self.assertEqual(alice["prompt_tokens"], response.usage.input_tokens + streamed.input_tokens)
        self.assertEqual(alice["completion_tokens"], response.usage.output_tokens + streamed.output_tokens)
        self.assertEqual([row[1] for row in await self.ledger()], ["responses", "responses"])

    async def test_embeddings(self) -> None:
        await self.start()
        result = await deferToThread(lambda: self.openai().embeddings.create(
            model="fake-llama", input=["one text", "and another text"]))
        self.assertEqual(len(result.data), 2)
        alice = await self.user()
        self.assertEqual((alice["prompt_tokens"], alice["completion_tokens"]), (result.usage.prompt_tokens, 0))
        self.assertGreater(result.usage.prompt_tokens, 0)
        self.assertEqual(await self.ledger(), [("alice", "embeddings", result.usage.prompt_tokens, 0, "usage", 0)])


class LeavingEarlyTests(APITestCase):
    """A client that leaves after its request reached the upstream still pays for the prompt the upstream read."""

    BODIES: Any = {
        "/v1/chat/completions": {"model": "fake-llama", "messages": [{"role": "system", "content": SYSTEM},
                                                                     *MESSAGES]},
        "/v1/completions": {"model": "fake-llama", "prompt": "Once upon a time there was"},
        "/v1/messages": {"model": "fake-llama", "max_tokens": 64, "system": SYSTEM, "messages": MESSAGES},
        "/v1/responses": {"model": "fake-llama", "instructions": SYSTEM, "input": "say hello to the gateway"},
    }

    async def whole_prompt(self, path: str) -> int:
        """What the upstream reports as the prompt when the request runs to its end (by bob)."""
        self.fake.manual = False
        reply = await self.call("POST", path, json.dumps(self.BODIES[path]).encode(), key=BOB)
        await reply.text()
        self.fake.manual = True
        return int((await self.user("bob"))["prompt_tokens"])

    async def test_mid_stream_on_every_api(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True))
        for path in self.BODIES:
            before = await self.user("bob")
            expected = await self.whole_prompt(path) - before["prompt_tokens"]
            spent = await self.user()
            reply = await self.call("POST", path, json.dumps({**self.BODIES[path], "stream": True}).encode())
            self.fake.release(2)
            await reply.body.wait_for(b':","')  # the second token, as "content", "text" or "delta"
            reply.body.abort()
            await self.fake.generations[-1].ended
            await until(lambda: not self.gw.gateway.proxy.counting)
            alice = await self.user()
            self.assertEqual(alice["prompt_tokens"] - spent["prompt_tokens"], expected, path)
            self.assertEqual(alice["completion_tokens"] - spent["completion_tokens"], 2, path)
        rows = [row for row in await self.ledger() if row[0] == "alice"]
        self.assertEqual([(r[1], r[4], r[5]) for r in rows],
                         [(api, "estimate", 1) for api in ("chat", "completions", "messages", "responses")])

    async def test_waiting_for_the_head_and_while_queued(self) -> None:
        users = {"users": {"alice": {"keys": [ALICE], "tokens_per_day": 100000}, "bob": {"keys": [BOB]}}}
        await self.start(fake=FakeLlama(reactor, manual=True, header_delay=30), users=users, max_concurrent=1)
        path = "/v1/messages"
        sent = Deferred.fromCoroutine(self.call("POST", path, json.dumps(self.BODIES[path]).encode()))
        await self.fake.next_request(b"/v1/messages")
        queued = Deferred.fromCoroutine(self.call("POST", path, json.dumps(self.BODIES[path]).encode()))
        await until(lambda: self.gw.gateway.admission.waiting == 1)
        for client_leaves in (queued, sent):
            client_leaves.cancel()
            client_leaves.addErrback(lambda _: None)  # (the client's own request fails: it left)
        await until(lambda: not self.gw.gateway.proxy.active and not self.gw.gateway.proxy.counting)
        rows = await self.ledger()
        self.assertEqual(len(rows), 2)
        by_prompt = sorted(rows, key=lambda r: r[2])
        self.assertEqual(by_prompt[0][2:], (0, 0, "none", 1))  # left while queued: nothing read, nothing billed
        counted = await deferToThread(lambda: self.anthropic().messages.count_tokens(
            model="fake-llama", system=SYSTEM, messages=MESSAGES))
        self.assertEqual(by_prompt[1][2:], (counted.input_tokens, 0, "tokenize", 1))
        # and the quota is charged with it
        [day] = self.gw.gateway.quotas.windows("alice", self.gw.gateway.settings_for("alice"))
        self.assertEqual(day.used, counted.input_tokens)

    async def test_an_upstream_that_cannot_count_is_estimated(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True, flavour="openai"))
        path = "/v1/chat/completions"
        reply = await self.call("POST", path, json.dumps({**self.BODIES[path], "stream": True}).encode())
        self.fake.release(2)
        await reply.body.wait_for(content_needle(","))
        reply.body.abort()
        await until(lambda: not self.gw.gateway.proxy.active and not self.gw.gateway.proxy.counting)
        [row] = await self.ledger()
        chars = len(SYSTEM) + len("system") + len(MESSAGES[0]["content"]) + len("user")
        self.assertEqual(row[2:], (-(-chars // 4), 2, "estimate", 1))
