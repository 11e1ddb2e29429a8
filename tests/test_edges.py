"""
HTTP edges on the client side, over raw sockets: lengths, 100 Continue, transfer codings, a head that takes
too long, headers a request may carry only once.  Nothing of a refused request reaches the upstream.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from support import ALICE, GatewayTestCase, raw_exchange
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource

from twisted_gw.web.site import GatewaySite

AUTH = b"Authorization: Bearer " + ALICE.encode() + b"\r\n"
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


def answer_of(raw: bytes) -> tuple[bytes, Any]:
    """The status line and JSON body of a whole answer (chunked or not)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[:int(size, 16)]
    return head.split(b"\r\n", 1)[0], json.loads(body) if body else None


def expect_continue(port: int, head: bytes, body: bytes, wait: float = 1.0) -> bytes:
    """Send a head asking for 100 Continue; send the body only when 100 comes; everything read until the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        s.settimeout(wait)
        answer = b""
        try:
            answer = s.recv(65536)
        except TimeoutError:
            pass
        s.settimeout(10)
        if answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
            s.sendall(body)
        while chunk := s.recv(65536):
            answer += chunk
        return answer


class EdgeTestCase(GatewayTestCase):
    @property
    def port(self) -> int:
        return int(self.gw.port.getHost().port)  # type: ignore[attr-defined]

    async def exchange(self, raw: bytes) -> bytes:
        return await deferToThread(raw_exchange, self.port, raw)


class LengthTests(EdgeTestCase):
    async def test_a_length_too_long_to_read_is_a_400(self) -> None:
        """Item 13: 4,990 digits raised ValueError out of Twisted's parser (no answer, a traceback in the log)."""
        await self.start()
        for length in (b"9" * 4990, b"12ab", b"-1", b"1 2"):
            raw = await self.exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
                                      + b"Content-Length: " + length + b"\r\n\r\n" + CHAT)
            status, doc = answer_of(raw)
            self.assertEqual(status, b"HTTP/1.1 400 Bad Request", length[:20])
            self.assertEqual(doc["error"]["code"], "invalid_http")
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(self.flushLoggedErrors(), [])


class ContinueTests(EdgeTestCase):
    """Item 14: a refused request gets its refusal and no 100 Continue, before it sends its body."""

    async def test_a_body_over_the_limit_gets_no_100(self) -> None:
        await self.start(max_body=100)
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Expect: 100-continue\r\n"
                b"Content-Length: 1000\r\n\r\n")
        raw = await deferToThread(expect_continue, self.port, head, b"x" * 1000)
        self.assertNotIn(b"100 Continue", raw)
        status, doc = answer_of(raw)
        self.assertEqual((status, doc["error"]["code"]), (b"HTTP/1.1 413 Content Too Large", "request_too_large"))

    async def test_a_wrong_key_gets_its_401_and_no_100(self) -> None:
        await self.start()
        for auth in (b"Authorization: Bearer sk-wrong\r\n", b""):
            head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Expect: 100-continue\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(CHAT))
            started = time.monotonic()
            raw = await deferToThread(expect_continue, self.port, head, CHAT, 5.0)
            self.assertLess(time.monotonic() - started, 4.0)  # answered at once, not after the client gave up waiting
            self.assertNotIn(b"100 Continue", raw)
            status, doc = answer_of(raw)
            self.assertEqual((status, doc["error"]["code"]), (b"HTTP/1.1 401 Unauthorized", "invalid_api_key"))
            self.assertIn(b"WWW-Authenticate: Bearer", raw)
        self.assertEqual(self.fake.requests, [])

    async def test_a_good_request_gets_its_100_then_its_answer(self) -> None:
        await self.start(assemble_non_stream="never")
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Expect: 100-continue\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(CHAT))
        raw = await deferToThread(expect_continue, self.port, head, CHAT)
        self.assertTrue(raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), raw[:200])
        self.assertEqual(len(self.fake.generations), 1)


class TransferCodingTests(EdgeTestCase):
    async def test_any_coding_but_chunked_is_a_400_and_nothing_behind_it_is_read(self) -> None:
        """Item 15: Transfer-Encoding: identity was ignored, and the bytes after the head read as a second request."""
        await self.start()
        smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"
        for coding in (b"identity", b"gzip, chunked", b"chunked, gzip", b"x"):
            raw = await self.exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
                                      + b"Transfer-Encoding: " + coding + b"\r\n\r\n" + smuggled)
            status, doc = answer_of(raw)
            self.assertEqual((status, doc["error"]["code"]), (b"HTTP/1.1 400 Bad Request", "invalid_http"), coding)
            self.assertEqual(raw.count(b"HTTP/1.1 "), 1)
        both = await self.exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
                                   + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertEqual(answer_of(both)[0], b"HTTP/1.1 400 Bad Request")
        self.assertEqual(self.fake.requests, [])


class HeaderTimeoutTests(EdgeTestCase):
    async def test_a_head_sent_byte_by_byte_is_cut_at_the_header_timeout(self) -> None:
        """Item 16: one byte every 20 s kept a request open 160 s, the idle timer restarting on every byte."""
        await self.start(header_timeout=0.5)
        head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"

        def trickle() -> tuple[bytes, float]:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                for byte in head:
                    try:
                        s.sendall(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(0.1)
                    s.setblocking(False)
                    try:
                        if s.recv(1, socket.MSG_PEEK):
                            break  # the answer came: stop sending
                    except BlockingIOError:
                        pass
                    finally:
                        s.setblocking(True)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            return answer, time.monotonic() - started

        raw, took = await deferToThread(trickle)
        status, doc = answer_of(raw)
        self.assertEqual((status, doc["error"]["code"]), (b"HTTP/1.1 408 Request Timeout", "header_timeout"))
        self.assertLess(took, 3.0)
        self.assertEqual(self.fake.requests, [])


class Quiet(resource.Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


class HeaderTimerTests(SynchronousTestCase):
    """The head's timer, with task.Clock: from the head's first byte to its end, not the time between requests."""

    def connect(self) -> tuple[Any, StringTransport, Clock]:
        clock = Clock()
        site = GatewaySite(Quiet(), header_timeout=10)
        site.reactor = clock
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport, clock

    def test_the_time_between_requests_does_not_count(self) -> None:
        channel, transport, clock = self.connect()
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        clock.advance(30)  # idle on a kept-alive connection
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"GET /b HTT")
        clock.advance(9)
        channel.dataReceived(b"P/1.1\r\nHost: x\r\n\r\n")
        clock.advance(5)
        self.assertEqual(transport.value().count(b"200 OK"), 2)
        self.assertFalse(transport.disconnecting)

    def test_a_head_that_takes_too_long_is_a_408(self) -> None:
        channel, transport, clock = self.connect()
        channel.dataReceived(b"GET /a HTTP/1.1\r\n")
        for _ in range(9):
            clock.advance(1)
            channel.dataReceived(b"X-A: 1\r\n")
        clock.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [call for call in clock.getDelayedCalls() if call.active()])


class AmbiguousHeadersTests(EdgeTestCase):
    async def test_headers_that_may_come_once_are_refused_twice(self) -> None:
        """Item 17: two Host or two Authorization headers were accepted, the last one winning."""
        await self.start()
        for extra in (
            b"Host: x\r\nHost: y\r\n" + AUTH,
            b"Host: x\r\n" + AUTH + b"Authorization: Bearer sk-bob-key\r\n",
            b"Host: x\r\n" + AUTH + AUTH,
            b"Host: x\r\nx-api-key: a\r\nx-api-key: a\r\n",
        ):
            raw = await self.exchange(b"GET /v1/models HTTP/1.1\r\n" + extra + b"\r\n")
            status, doc = answer_of(raw)
            self.assertEqual((status, doc["error"]["code"]), (b"HTTP/1.1 400 Bad Request", "duplicate_header"), extra)
        self.assertEqual(self.fake.requests, [])

    async def test_a_bearer_key_with_a_different_x_api_key_is_refused(self) -> None:
        await self.start()
        raw = await self.exchange(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH
                                  + b"x-api-key: sk-bob-key\r\nConnection: close\r\n\r\n")
        status, doc = answer_of(raw)
        self.assertEqual((status, doc["error"]["code"]), (b"HTTP/1.1 400 Bad Request", "ambiguous_credentials"))
        same = await self.exchange(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH
                                   + b"x-api-key: " + ALICE.encode() + b"\r\nConnection: close\r\n\r\n")
        self.assertEqual(answer_of(same)[0], b"HTTP/1.1 200 OK")
        self.assertEqual(len(self.fake.requests), 1)
