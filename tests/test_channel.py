"""
The gateway's server channel and request (twisted_gw/channel.py), in memory: what reaches a resource is what
Twisted's own parse gives it, and what the gateway refuses before any resource sees it gets a JSON error.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http, resource, server

from twisted_gw.web.site import GatewayChannel, GatewayRequest, GatewaySite


class Echo(resource.Resource):
    """Answers with what it was given: method, URI, version, headers (in order) and body."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        assert request.content is not None
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "method": request.method.decode("latin-1"),
            "uri": request.uri.decode("latin-1"),
            "version": request.clientproto.decode("latin-1"),
            "headers": [[n.decode("latin-1"), [v.decode("latin-1") for v in vs]]
                        for n, vs in request.requestHeaders.getAllRawHeaders()],
            "body": request.content.read().decode("latin-1"),
            "in_memory": type(request.content).__name__,
        }).encode()


def exchange(reads: list[bytes], max_body: int = 1 << 20, plain_twisted: bool = False) -> tuple[bytes, bool]:
    """What a channel writes back for C{reads}, and whether it closed the connection."""
    site = GatewaySite(Echo(), max_body=max_body)
    if plain_twisted:
        site.protocol = http.HTTPChannel  # type: ignore[assignment]
        site.requestFactory = server.Request
    site.reactor = Clock()
    channel = site.buildProtocol(None)
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    for data in reads:
        if transport.disconnecting:  # (a closed connection reads no more)
            break
        channel.dataReceived(data)
    return transport.value(), bool(transport.disconnecting)


def body_of(answer: bytes) -> Any:
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"Transfer-Encoding: chunked" in head:
        size, _, rest = body.partition(b"\r\n")
        body = rest[:int(size, 16)]
    return json.loads(body)


POST = (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"x-a: one\r\nX-A:  two \t\r\nContent-Length: 15\r\n\r\n{\"stream\":true}")


class ReadTests(SynchronousTestCase):
    def test_a_request_reaches_the_resource_as_twisted_reads_it(self) -> None:
        for reads in ([POST], [POST[:20], POST[20:50], POST[50:]], [bytes([b]) for b in POST]):
            ours, closed = exchange(reads)
            self.assertFalse(closed)
            seen = body_of(ours)
            self.assertEqual(seen["body"], '{"stream":true}')
            self.assertEqual(seen["in_memory"], "BytesIO")
            self.assertEqual(seen["headers"], body_of(exchange(reads, plain_twisted=True)[0])["headers"])

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z"),
                              st.from_regex(rb"\A[ -~]{0,40}\Z")), max_size=8))
    def test_any_valid_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        head = b"GET /v1/models HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        ours, closed = exchange([head + b"\r\n"])
        theirs, _ = exchange([head + b"\r\n"], plain_twisted=True)
        self.assertFalse(closed)
        self.assertEqual(body_of(ours)["headers"], body_of(theirs)["headers"])

    def test_a_chunked_body(self) -> None:
        answer, closed = exchange([b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"])
        self.assertFalse(closed)
        self.assertEqual(body_of(answer)["body"], "abcde")


class RefusalTests(SynchronousTestCase):
    def refused(self, reads: list[bytes], status: bytes, code: str, **kwargs: Any) -> None:
        answer, closed = exchange(reads, **kwargs)
        self.assertTrue(answer.startswith(b"HTTP/1.1 " + status + b"\r\n"), answer[:200])
        self.assertIn(b"\r\nConnection: close\r\n", answer)
        self.assertEqual(body_of(answer)["error"]["code"], code)
        self.assertTrue(closed)

    def test_headers_over_the_limits_are_431(self) -> None:
        self.refused([b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"],
                     b"431 Request Header Fields Too Large", "headers_too_large")
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200))  # each line short, 21 kB in all
        self.refused([b"GET /v1/models HTTP/1.1\r\n" + many + b"\r\n"],
                     b"431 Request Header Fields Too Large", "headers_too_large")
        numerous = b"".join(b"X-H%d: v\r\n" % i for i in range(501))
        self.refused([b"GET /v1/models HTTP/1.1\r\n" + numerous + b"\r\n"],
                     b"431 Request Header Fields Too Large", "too_many_headers")

    def test_malformed_request_lines_and_headers_are_400(self) -> None:
        for raw in (
            b"GET /v1/models HTTP/1.1 extra\r\nHost: x\r\n\r\n",
            b"GET /v1/models\r\n\r\n",
            b"G(T /v1/models HTTP/1.1\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nX-Nul: a\x00b\r\n\r\n",
        ):
            self.refused([raw], b"400 Bad Request", "invalid_http")

    def test_a_body_over_the_limit_is_413_before_it_is_read(self) -> None:
        head = b"POST /v1/x HTTP/1.1\r\nContent-Length: 11\r\n\r\n"
        self.refused([head], b"413 Content Too Large", "request_too_large", max_body=10)
        self.refused([head + b"hello world"], b"413 Content Too Large", "request_too_large", max_body=10)
        answer, closed = exchange([head + b"hello world"], max_body=11)
        self.assertEqual(body_of(answer)["body"], "hello world")
        self.assertFalse(closed)

    def test_a_chunked_body_growing_over_the_limit_is_413(self) -> None:
        self.refused([b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"6\r\nabcdef\r\n",
                      b"6\r\nghijkl\r\n0\r\n\r\n"], b"413 Content Too Large", "request_too_large", max_body=10)

    def test_a_malformed_chunked_body_gets_twisteds_own_400(self) -> None:
        answer, closed = exchange([b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"])
        self.assertEqual(answer, b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertTrue(closed)

    def test_pipelined_requests_are_each_read_after_a_refused_one_nothing_is(self) -> None:
        two = b"GET /v1/a HTTP/1.1\r\n\r\nGET /v1/b HTTP/1.1\r\n\r\n"
        answer, closed = exchange([two])
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK"), 2)
        self.assertFalse(closed)
        answer, closed = exchange([b"GET /v1/a HTTP/1.1 x\r\n\r\nGET /v1/b HTTP/1.1\r\n\r\n"])
        self.assertEqual(answer.count(b"HTTP/1.1 "), 1)
        self.assertTrue(closed)


class IdleTimeoutTests(SynchronousTestCase):
    def test_twisteds_idle_timeout_closes_a_silent_connection(self) -> None:
        clock = Clock()
        site = GatewaySite(Echo())
        site.reactor = clock
        site.timeOut = 10
        channel = site.buildProtocol(None)
        assert isinstance(channel, GatewayChannel)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /v1/a HTTP/1.1\r\n")
        clock.advance(9)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_a_request_subclass_is_the_sites_request(self) -> None:
        site = GatewaySite(Echo())
        self.assertIs(site.requestFactory, GatewayRequest)
