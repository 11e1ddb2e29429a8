"""The official OpenAI Python SDK against the gateway (the SDK runs in a thread)."""

from __future__ import annotations

import json
from typing import Any

import openai
from support import ALICE, BOB, GatewayTestCase, reactor
from twisted.internet import task
from twisted.internet.threads import deferToThread

from twisted_gw.testing import FakeLlama

MESSAGES: Any = [{"role": "user", "content": "say hello"}]


class SDKTests(GatewayTestCase):
    def client(self, key: str = ALICE) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.gw.url + "/v1", api_key=key, max_retries=0, timeout=15)
        self.addCleanup(client.close)
        return client

    async def test_non_streaming_chat(self) -> None:
        await self.start()
        client = self.client()
        result = await deferToThread(
            lambda: client.chat.completions.create(model="fake-llama", messages=MESSAGES)
        )
        self.assertEqual(result.choices[0].message.content, "Hello, this is a fake llama.")
        self.assertEqual(self.fake.generations[-1].headers.getRawHeaders(b"x-gateway-user"), [b"alice"])
        metrics = await self.metrics()
        assert result.usage is not None
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], result.usage.completion_tokens)

    async def test_streaming_chat(self) -> None:
        await self.start()
        client = self.client()

        def run() -> list[Any]:
            stream = client.chat.completions.create(model="fake-llama", messages=MESSAGES, stream=True)
            return [chunk.to_dict() for chunk in stream]

        chunks = await deferToThread(run)
        expected = [json.loads(e) for e in self.fake.generations[-1].events]
        self.assertEqual(chunks, expected)

    async def test_queued_stream_yields_exactly_the_upstream_chunks(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        first = await self.chat(stream=True)
        client = self.client(BOB)

        def run() -> list[Any]:
            stream = client.chat.completions.create(model="fake-llama", messages=MESSAGES, stream=True)
            return [chunk.to_dict() for chunk in stream]

        queued = deferToThread(run)
        while (await self.metrics())["queue"]["waiting"] < 1:
            await task.deferLater(reactor, 0.01, lambda: None)
        self.fake.release(2 * len(self.fake.reply))
        chunks = await queued
        await first.text()
        expected = [json.loads(e) for e in self.fake.generations[-1].events]
        self.assertEqual(len(self.fake.generations), 2)
        self.assertEqual(chunks, expected)
        self.assertEqual(len(chunks), len(self.fake.reply) + 1)

    async def test_bad_key_raises_authentication_error(self) -> None:
        await self.start()
        client = self.client("sk-not-a-key")

        def run() -> None:
            client.chat.completions.create(model="fake-llama", messages=MESSAGES)

        with self.assertRaises(openai.AuthenticationError) as caught:
            await deferToThread(run)
        self.assertEqual(caught.exception.status_code, 401)
        self.assertEqual(self.fake.requests, [])

    async def test_models(self) -> None:
        await self.start()
        client = self.client()
        models = await deferToThread(lambda: client.models.list())
        self.assertEqual([m.id for m in models.data], ["fake-llama"])
