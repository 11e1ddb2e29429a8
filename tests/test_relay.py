"""
What a misbehaving upstream cannot make the gateway say to its clients: framing, status lines, bodies cut
short, huge heads.  A raw-socket upstream (L{ScriptedUpstream}) answers; clients read the raw bytes.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

from support import ALICE, GatewayTestCase, chat_body, raw_exchange, reactor
from twisted.internet import task
from twisted.internet.threads import deferToThread

from twisted_gw.testing import Answer, ScriptedUpstream

AUTH = {"Authorization": f"Bearer {ALICE}"}


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def json_answer(body: bytes, status: bytes = b"200 OK") -> Answer:
    return Answer(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                  % (status, len(body), body))


def two_requests_on_one_connection(port: int) -> list[tuple[int, bytes]]:
    """Two GETs in turn on one kept-alive connection, read by http.client's strict framing."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        answers = []
        for _ in range(2):
            connection.request("GET", "/v1/models", headers=AUTH)
            response = connection.getresponse()
            answers.append((response.status, response.read()))
        return answers
    finally:
        connection.close()


def get(path: bytes = b"/v1/models") -> bytes:
    return (b"GET %s HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n"
            % (path, ALICE.encode()))


class RelayTestCase(GatewayTestCase):
    async def scripted(self, *answers: Answer, **config: Any) -> ScriptedUpstream:
        upstream = ScriptedUpstream(reactor, list(answers))
        url = await upstream.start()
        self.addCleanup(upstream.stop)
        config.setdefault("assemble_non_stream", "never")
        await self.start(upstream=url, **config)
        return upstream

    @property
    def gw_port(self) -> int:
        return int(self.gw.port.getHost().port)  # type: ignore[attr-defined]


class FramingTests(RelayTestCase):
    async def test_both_lengths_cannot_forge_the_next_response(self) -> None:
        """
        An answer with C{Content-Length: 0} and a chunked body: the framing is
        Twisted's own, so the body (here the bytes of a whole fake response) can
        never be read by a keep-alive client as the answer to its next request.
        """
        forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
        await self.scripted(
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(forged)),
            json_answer(b'{"second": true}'),
        )
        (first, second) = await deferToThread(two_requests_on_one_connection, self.gw_port)
        self.assertEqual(first, (200, forged))  # the chunked body, framed as what it is
        self.assertEqual(second, (200, b'{"second": true}'))

    async def test_the_upstreams_length_and_framing_are_never_copied(self) -> None:
        await self.scripted(json_answer(b'{"ok": 1}'))
        answer = await deferToThread(raw_exchange, self.gw_port, get())
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertNotIn(b"content-length", head.lower())
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertEqual(body, chunked(b'{"ok": 1}'))


class StatusLineTests(RelayTestCase):
    async def test_the_reason_phrase_is_twisteds_never_the_upstreams(self) -> None:
        await self.scripted(Answer(
            b"HTTP/1.1 200 Fine\rX-Injected: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", close=True
        ))
        answer = await deferToThread(raw_exchange, self.gw_port, get())
        status_line, _, rest = answer.partition(b"\r\n")
        self.assertEqual(status_line, b"HTTP/1.1 200 OK")
        self.assertNotIn(b"injected", rest.lower())

    async def test_a_status_code_outside_100_to_599_is_a_502(self) -> None:
        for code in (b"000", b"600", b"999"):
            upstream = await self.scripted(Answer(b"HTTP/1.1 %s Odd\r\nContent-Length: 2\r\n\r\n{}" % code))
            answer = await deferToThread(raw_exchange, self.gw_port, get())
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), head)
            self.assertIn(b'"upstream_bad_response"', body)
            await self.gw.stop()
            await upstream.stop()


class CutShortTests(RelayTestCase):
    async def test_a_chunked_body_cut_short_never_reaches_the_client_whole(self) -> None:
        await self.scripted(Answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"20\r\n{\"choices\": [", close=True,  # 32 bytes announced, 13 sent, then the close
        ))
        reply = await self.call("POST", "/v1/chat/completions", chat_body(False))
        self.assertEqual(reply.code, 200)
        self.assertEqual(await reply.cut_short(), b'{"choices": [')
        metrics = await self.metrics()
        self.assertEqual(metrics["recent_problems"][0]["error"], "upstream_disconnected")
        self.assertEqual(metrics["queue"]["active"], 0)

    async def test_a_sized_body_cut_short_never_reaches_the_client_whole(self) -> None:
        await self.scripted(Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial", close=True))
        connection_answer = await deferToThread(raw_exchange, self.gw_port, get())
        head, _, body = connection_answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(body, b'9\r\n{"partial\r\n')  # what arrived, and no terminating chunk

    async def test_a_silent_json_body_cut_by_the_idle_timeout_never_reaches_the_client_whole(self) -> None:
        clock = task.Clock()
        upstream = await self.scripted(Answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\n{\"a\":\r\n"  # and then nothing more, the connection kept open
        ), idle_timeout=30, clock=clock)
        reply = await self.call("POST", "/v1/chat/completions", chat_body(False))
        await reply.body.wait_for(b'{"a":')
        clock.advance(30)
        self.assertEqual(await reply.cut_short(), b'{"a":')
        self.assertEqual(len(upstream.requests), 1)

    async def test_a_stream_cut_short_gets_its_error_event_then_the_close(self) -> None:
        event = b'data: {"choices":[{"delta":{"content":"Hi"},"index":0}]}\n\n'
        await self.scripted(Answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(event), event) + b"40\r\ndata: {", close=True,
        ))
        reply = await self.call("POST", "/v1/chat/completions", chat_body(True))
        body = await reply.cut_short()
        self.assertTrue(body.startswith(event + b"data: {"), body)
        self.assertEqual(json.loads(body.rsplit(b"data: ", 1)[1])["error"]["code"], "upstream_disconnected")


class HugeHeadTests(RelayTestCase):
    async def test_a_head_over_64_kb_is_a_502_however_it_arrives(self) -> None:
        def head(size_kb: int) -> bytes:
            lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(size_kb))
            return b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\n{}"

        for answer in (Answer(head(70)), Answer(head(120)), Answer(head(70), pieces=20)):
            upstream = await self.scripted(answer)
            reply = await self.call("GET", "/v1/models")
            self.assertEqual(reply.code, 502)
            self.assertEqual((await reply.json())["error"]["code"], "upstream_bad_response")
            await self.gw.stop()
            await upstream.stop()

    async def test_a_head_under_64_kb_is_relayed(self) -> None:
        filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(50))
        await self.scripted(Answer(b"HTTP/1.1 200 OK\r\n" + filler + b"Content-Length: 2\r\n\r\n{}"))
        reply = await self.call("GET", "/v1/models")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header("X-Filler-49"), b"v" * 1000)
        self.assertEqual(await reply.text(), b"{}")
