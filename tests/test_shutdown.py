"""Graceful shutdown: the queue is answered, running streams may finish, then are closed."""

from __future__ import annotations

import json
import signal
import subprocess

from support import BOB, TWISTD, GatewayTestCase, chat_body, content_needle, reactor, settle, sse_data
from twisted.internet import error, task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from twisted_gw.testing import FakeLlama


class DrainTests(GatewayTestCase):
    async def test_queue_answered_and_running_stream_finishes(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        running = await self.chat(stream=True)
        queued_stream = await self.chat(stream=True, key=BOB)
        await queued_stream.body.wait_for(b": queue position=1")
        queued_plain = Deferred.fromCoroutine(self.chat(stream=False))
        while self.gw.gateway.admission.waiting < 2:
            await settle(0.01)
        stopped = self.gw.gateway.stopService()
        body = await queued_stream.text()
        self.assertEqual(json.loads(sse_data(body)[-1])["error"]["code"], "shutting_down")
        plain = await queued_plain
        self.assertEqual(plain.code, 503)
        self.assertEqual((await plain.json())["error"]["code"], "shutting_down")
        self.assertFalse(stopped.called)
        self.fake.release(len(self.fake.reply))
        self.assertTrue((await running.text()).endswith(b"data: [DONE]\n\n"))
        await stopped
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], len(self.fake.reply))
        self.assertEqual(len(self.fake.generations), 1)
        # nothing more is admitted
        late = await self.chat(stream=False)
        self.assertEqual(late.code, 503)
        await late.text()

    async def test_streams_still_running_after_the_drain_timeout_are_closed(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), drain_timeout=30)
        clock = task.Clock()
        self.gw.gateway.proxy.clock = clock
        running = await self.chat(stream=True)
        upstream = self.fake.generations[-1]
        self.fake.release(2)
        await running.body.wait_for(content_needle(","))
        stopped = self.gw.gateway.stopService()
        clock.advance(29)
        await settle()
        self.assertFalse(stopped.called)
        clock.advance(1)
        body = await running.text()
        self.assertEqual(json.loads(sse_data(body)[-1])["error"]["code"], "shutting_down")
        await stopped
        await upstream.ended
        self.assertTrue(upstream.disconnected)
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], 2)


class SigtermTests(GatewayTestCase):
    timeout = 60

    async def test_sigterm_mid_stream(self) -> None:
        fake = FakeLlama(reactor, chunk_delay=0.15, reply=tuple(f" t{i}" for i in range(16)))
        workdir, port = await self.prepare_subprocess(fake)
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "llmgw", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--upstream", self.fake.url, "--drain-timeout", "20"],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(proc.kill)
        url = f"http://127.0.0.1:{port}"
        await self.wait_until_up(url)
        running = await self.call("POST", "/v1/chat/completions", chat_body(True), url=url)
        queued = await self.call("POST", "/v1/chat/completions", chat_body(True), key=BOB, url=url)
        await queued.body.wait_for(b": queue position=1")
        await running.body.wait_for(content_needle(" t1"))
        proc.send_signal(signal.SIGTERM)
        queued_body = await queued.text()
        self.assertEqual(json.loads(sse_data(queued_body)[-1])["error"]["code"], "shutting_down")
        # new connections are refused while the running stream drains
        with self.assertRaises(error.ConnectionRefusedError):
            await self.call("GET", "/health", key=None, url=url)
        body = await running.text()
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(body.count(b'"content":'), 16)
        output, _ = await deferToThread(proc.communicate, timeout=30)
        self.assertIn(proc.returncode, (0, -15), output)
        access = [line for line in output.splitlines() if "POST /v1/chat/completions 200 user=alice" in line]
        self.assertEqual(len(access), 1, output)
        self.assertIn("+16", access[0])
        self.assertLess(output.index(access[0]), output.index("Server Shut Down"))
