"""
The channel's one-step read of a whole request (twisted_gw/channel.py) against
Twisted's own line-by-line parse: for every input, the same requests reach the
resource and the same bytes go back.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http, resource, server
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyChannel

from twisted_gw.channel import GatewayChannel, parse_head, put_raw_headers
from twisted_gw.web import GatewayRequest, GatewaySite


class Echo(resource.Resource):
    """Answers with what it was given: method, URI, path, version, headers (in order) and body."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        assert request.content is not None
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "method": request.method.decode("latin-1"),
            "uri": request.uri.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "postpath": [p.decode("latin-1") for p in request.postpath or []],
            "version": request.clientproto.decode("latin-1"),
            "headers": [[n.decode("latin-1"), [v.decode("latin-1") for v in vs]]
                        for n, vs in request.requestHeaders.getAllRawHeaders()],
            "body": request.content.read().decode("latin-1"),
            "args": sorted([k.decode("latin-1"), [v.decode("latin-1") for v in vs]] for k, vs in request.args.items()),
            "cookies": sorted([k.decode("latin-1"), v.decode("latin-1")] for k, v in request.received_cookies.items()),
        }).encode()


class TwistedParse(GatewayChannel):
    """The same channel reading every request with Twisted's line-by-line parse."""

    def dataReceived(self, data: bytes) -> None:
        http.HTTPChannel.dataReceived(self, data)


class TwistedProcess(GatewayRequest):
    """The gateway's request, processed by Twisted's own L{server.Request.process}."""

    def process(self) -> None:
        server.Request.process(self)


class TwistedRequest(TwistedProcess):
    """
    The gateway's request (its body limit), received and processed by
    Twisted's own methods, and taken by the channel with Twisted's calls.
    """

    received_whole = None  # type: ignore[assignment]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            server.Request.requestReceived(self, command, path, version)


def exchange(channel_class: type, reads: list[bytes], max_body: int = 1 << 20,
             request_class: type[GatewayRequest] = GatewayRequest) -> bytes:
    """What a channel of C{channel_class} writes back for C{reads}, the Date header's value blanked."""
    site = GatewaySite(Echo(), max_body=max_body)
    site.requestFactory = request_class
    site.reactor = Clock()
    site.protocol = channel_class  # type: ignore[assignment]
    channel = site.buildProtocol(None)
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    for data in reads:
        if transport.disconnecting:  # (a closed connection reads no more)
            break
        channel.dataReceived(data)
    written: bytes = transport.value()
    return re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", written) + (b" [closed]" if transport.disconnecting else b"")


def both(test: SynchronousTestCase, reads: list[bytes], **kwargs: Any) -> bytes:
    """
    The gateway's channel and request give the answer Twisted gives, with
    its line-by-line parse and its request's own methods; so does the
    gateway's channel with that request (a whole request taken with
    Twisted's calls).  That answer.
    """
    ours = exchange(GatewayChannel, reads, **kwargs)
    test.assertEqual(ours, exchange(TwistedParse, reads, request_class=TwistedRequest, **kwargs))
    test.assertEqual(ours, exchange(GatewayChannel, reads, request_class=TwistedRequest, **kwargs))
    return ours


def whole(head: bytes, body: bytes = b"") -> bytes:
    return head + b"\r\n\r\n" + body


POST = whole(
    b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: gw\r\nauthorization: Bearer sk-1\r\n"
    b"Content-Type: application/json\r\nx-a: one\r\nX-A:  two \t\r\nContent-Length: 15",
    b'{"stream":true}',
)


class Held(resource.Resource):
    """Answers nothing until the test finishes the request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[server.Request] = []

    def render(self, request: server.Request) -> Any:
        self.requests.append(request)
        return server.NOT_DONE_YET


def closed_at(channel_class: type, request_class: type[GatewayRequest], script: list[tuple[float, str]]) -> float:
    """
    When an idle timeout of 10 s closes a connection that follows C{script}:
    at each time, C{"request"} (a whole one arrives, and is held) or
    C{"finish"} (the first held one is answered).
    """
    clock = Clock()
    held = Held()
    site = GatewaySite(held)
    site.requestFactory = request_class
    site.reactor = clock
    site.timeOut = 10
    site.protocol = channel_class  # type: ignore[assignment]
    channel = site.buildProtocol(None)
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    for when, what in script:
        while clock.seconds() < when and not transport.disconnecting:
            clock.advance(0.5)
        if transport.disconnecting:
            break
        if what == "request":
            channel.dataReceived(whole(b"GET /v1/models HTTP/1.1\r\nHost: gw"))
        else:
            request = held.requests.pop(0)
            request.write(b"done")
            request.finish()
    while not transport.disconnecting and clock.seconds() < 1000:
        clock.advance(0.5)
    return clock.seconds()


class IdleTimeoutTests(SynchronousTestCase):
    """The idle timeout closes a connection when Twisted's does: idle at first, between requests, never in one."""

    def both(self, script: list[tuple[float, str]]) -> float:
        ours = closed_at(GatewayChannel, GatewayRequest, script)
        self.assertEqual(ours, closed_at(TwistedParse, TwistedRequest, script))
        return ours

    def test_idle_from_the_start(self) -> None:
        self.assertEqual(self.both([]), 10)

    def test_not_while_a_request_is_handled(self) -> None:
        # handled for 22 s, longer than the timeout twice over; then idle for 10 s
        self.assertEqual(self.both([(3, "request"), (25, "finish")]), 35)

    def test_idle_between_requests(self) -> None:
        self.assertEqual(self.both([(1, "request"), (2, "finish"), (11.5, "request"), (40, "finish")]), 50)
        self.assertEqual(self.both([(1, "request"), (2, "finish"), (12.5, "request")]), 12)


class ParseHeadTests(SynchronousTestCase):
    LIMITS = (16384, 16384, 500)

    def test_a_whole_request_is_read_in_one_step(self) -> None:
        head = parse_head(POST, *self.LIMITS)
        assert head is not None
        self.assertEqual((head.method, head.uri, head.version, head.body),
                         (b"POST", b"/v1/chat/completions?x=1", b"HTTP/1.1", b'{"stream":true}'))
        self.assertEqual(head.headers, [
            (b"Host", b"gw"), (b"Authorization", b"Bearer sk-1"), (b"Content-Type", b"application/json"),
            (b"X-A", b"one"), (b"X-A", b"two"), (b"Content-Length", b"15"),
        ])

    def test_what_it_leaves_to_twisted(self) -> None:
        get = b"GET /v1/models HTTP/1.1\r\nHost: gw"
        for data in [
            POST[:-3],  # the body not all here yet
            POST + b"GET",  # more behind it (pipelined)
            get + b"\r\n",  # the head not all here yet
            whole(get + b"\r\nTransfer-Encoding: chunked", b"0\r\n\r\n"),
            whole(get + b"\r\nX-Folded: a\r\n b"),
            whole(get + b"\r\nNo colon"),
            whole(get + b"\r\nX-Nul: a\x00b"),
            whole(get + b"\r\nX-Cr: a\rb"),
            whole(get + b"\r\nBad Name: a"),
            whole(get + b"\r\nContent-Length: 1x", b"1x"),
            whole(get + b"\r\nContent-Length: 1\r\nContent-Length: 1", b"a"),
            whole(b"GET /v1/models HTTP/2.0\r\nHost: gw"),
            whole(b"GET  /v1/models HTTP/1.1"),
            b"\r\n" + whole(get),  # the empty line some clients send after a POST
            whole(get + b"\r\nX-Long: " + b"a" * 20000),
            whole(get + b"\r\n" + b"\r\n".join(b"X-%d: a" % i for i in range(501))),
        ]:
            self.assertIsNone(parse_head(data, *self.LIMITS), data[:80])


class GetHeaderTests(SynchronousTestCase):
    """GatewayRequest.getHeader answers as Twisted's does, for any headers and any name asked."""

    @settings(max_examples=300, deadline=None)
    @given(
        headers=st.lists(st.tuples(
            st.sampled_from([b"authorization", b"Authorization", b"AUTHORIZATION", b"content-type", b"x-a", b"X-A",
                             b"x-b-c", b"X-New-" + b"N"]),
            st.binary(max_size=6).filter(lambda v: b"\r" not in v and b"\n" not in v),
        ), max_size=6),
        asked=st.lists(st.one_of(
            st.sampled_from([b"authorization", b"Authorization", b"content-type", b"Content-Type", b"x-a", b"X-A",
                             b"x-b-c", b"x-missing", "authorization", "Content-Type", "x-a", "x-missing"]),
            st.binary(min_size=1, max_size=6).filter(lambda n: all(33 <= c < 127 and c != 58 for c in n)),
        ), max_size=6),
    )
    def test_as_twisted(self, headers: list[tuple[bytes, bytes]], asked: list[Any]) -> None:
        request = GatewayRequest(DummyChannel())
        for name, value in headers:
            request.requestHeaders.addRawHeader(name, value)
        for key in asked:
            self.assertEqual(outcome(request.getHeader, key), outcome(http.Request.getHeader, request, key), key)


def outcome(f: Any, *args: Any) -> tuple[str, Any]:
    """What C{f(*args)} returns, or the type of what it raises."""
    try:
        return "returned", f(*args)
    except Exception as e:
        return "raised", type(e)


class PutRawHeadersTests(SynchronousTestCase):
    def test_as_set_raw_headers_would_for_pairs_read_from_headers(self) -> None:
        source = Headers()
        for name, value in ((b"x-a", b"1"), (b"X-A", b"2"), (b"content-md5", b"m"), (b"Etag", b"e"),
                            (b"x-lines", b"a\r\nb"), ("x-text", "\u00e9")):
            source.addRawHeader(name, value)
        ours, twisted = Headers({b"x-kept": [b"k"], b"x-a": [b"old"]}), Headers({b"x-kept": [b"k"], b"x-a": [b"old"]})
        put_raw_headers(ours, source.getAllRawHeaders())
        for name, values in source.getAllRawHeaders():
            twisted.setRawHeaders(name, values)
        self.assertEqual(list(ours.getAllRawHeaders()), list(twisted.getAllRawHeaders()))
        ours.addRawHeader(b"x-a", b"3")  # (its own lists: the source is untouched)
        self.assertEqual(source.getRawHeaders(b"x-a"), [b"1", b"2"])


class SameAsTwistedTests(SynchronousTestCase):
    def test_whole_requests(self) -> None:
        answer = both(self, [POST])
        self.assertIn(b"HTTP/1.1 200 OK", answer)
        self.assertIn(b'"headers": [["Host", ["gw"]], ["Authorization", ["Bearer sk-1"]]', answer)
        self.assertIn(b'["X-A", ["one", "two"]]', answer)
        self.assertIn(b'"body": "{\\"stream\\":true}"', answer)
        get = whole(b"GET /v1/a%2Fb/c HTTP/1.1\r\nHost: gw")
        self.assertIn(b'"postpath": ["v1", "a/b", "c"]', both(self, [get]))
        self.assertIn(b'"postpath": ["v1", "models"]', both(self, [whole(b"GET /v1/models HTTP/1.1")]))
        both(self, [POST, POST, get])  # one after another on the connection
        both(self, [whole(b"GET /v1/models HTTP/1.0")])  # closed after the answer
        both(self, [whole(b"GET /v1/models HTTP/1.1\r\nConnection: close"), POST])
        both(self, [whole(b"POST /v1/x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2", b"{}")])
        both(self, [whole(b"GET /v1/models HTTP/1.1\r\nConnection: keep-alive, close"), POST])
        both(self, [whole(b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive"), POST])
        cookies = both(self, [whole(b"GET /v1/models?a=1&b=&a=2&c HTTP/1.1\r\nCookie: k=v; x=y\r\nCookie: z=1")])
        self.assertIn(b'"args": [["a", ["1", "2"]], ["b", [""]]]', cookies)
        self.assertIn(b'"cookies": [["k", "v"], ["x", "y"], ["z", "1"]]', cookies)

    def test_processed_as_twisted_does(self) -> None:
        for reads in ([POST], [whole(b"GET /v1/a%2Fb/c?q=1 HTTP/1.1")], [whole(b"GET / HTTP/1.1")],
                      [whole(b"GET /v1//models/ HTTP/1.1")]):
            ours = exchange(GatewayChannel, reads)
            self.assertEqual(ours, exchange(GatewayChannel, reads, request_class=TwistedProcess))
            self.assertIn(b"\r\nServer: TwistedWeb/", ours)
            self.assertIn(b"\r\nDate: -\r\n", ours)

    def test_requests_left_to_twisted(self) -> None:
        for reads in [
            [POST[:40], POST[40:]],
            [POST + POST],
            [POST[:-3], POST[-3:] + POST],
            [whole(b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked", b"2\r\n{}\r\n0\r\n\r\n")],
            [whole(b"GET /v1/x HTTP/1.1\r\nX-Folded: a\r\n b")],
            [whole(b"GET /v1/x HTTP/1.1\r\nX-Nul: a\x00b"), POST],
            [whole(b"GET /v1/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1", b"a")],
            [whole(b"BAD REQUEST LINE HTTP/1.1")],
            [whole(b"GET /v1/x HTTP/1.1\r\nX-Long: " + b"a" * 20000)],
            [b"\r\n" + POST],
        ]:
            both(self, reads)

    def test_a_body_over_the_limit(self) -> None:
        answer = both(self, [POST], max_body=10)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertTrue(answer.endswith(b"[closed]"))

    @settings(max_examples=300, deadline=None)
    @given(
        method=st.sampled_from([b"GET", b"POST", b"PUT", b"G\x00T"]),
        target=st.binary(max_size=12).map(lambda b: b"/v1/" + b),
        version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2"]),
        headers=st.lists(st.tuples(
            st.sampled_from([b"X-A", b"x-a", b"Content-Type", b"content-length", b"Transfer-Encoding", b"Bad Name",
                             b" X-Folded", b"Connection", b"Cookie", b"Expect", b""]),
            st.sampled_from([b":", b": ", b":\t", b""]),
            st.binary(max_size=8),
        ), max_size=5),
        body=st.binary(max_size=8),
        split=st.integers(min_value=0, max_value=200),
    )
    def test_any_input(self, method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes, bytes]],
                       body: bytes, split: int) -> None:
        lines = [b" ".join([method, target, version])] + [name + sep + value for name, sep, value in headers]
        data = whole(b"\r\n".join(lines), body)
        both(self, [data])
        both(self, [data[:split], data[split:]])
