"""
The upstream HTTP/1.1 client: response framing fed in every split, keep-alive
reuse and its limits, failures, cancellation and flow control.  The parser
tests drive a real L{Connection} over an in-memory transport; the pool is also
exercised against a real server on 127.0.0.1.
"""

from __future__ import annotations

import socket
from typing import Any, Optional, cast

from support import reactor
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from twisted_gw.httpclient import Connection, ConnectionPool, Response, request_bytes, send


class Body(Protocol):
    """Collects a response body and how it ended."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reason: Optional[Failure] = None
        self.done: Optional[Deferred[None]] = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason
        if self.done is not None:
            self.done.callback(None)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Wire:
    """A connection of a pool (that never connects anything) over an in-memory transport."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.pool = ConnectionPool(self.clock, endpoint=None, max_idle=2, idle_timeout=4)  # type: ignore[arg-type]
        self.connection = Connection(self.pool)
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)

    def ask(self, method: bytes = b"GET") -> Deferred[Response]:
        return self.connection.request(b"%s / HTTP/1.1\r\nHost: x\r\n\r\n" % method, head_only=method == b"HEAD")

    def feed(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.connection.dataReceived(piece)

    def lose(self, reason: Optional[Exception] = None) -> None:
        self.connection.connectionLost(Failure(reason or ConnectionDone()))


def result(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d: Deferred[Any]) -> Failure:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box and isinstance(box[0], Failure), f"expected a failure, got {box}"
    return box[0]


EVENTS = (b'data: {"a":1}\n\n', b'data: {"bb":22}\n\n', b"data: [DONE]\n\n")
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n" % (len(EVENTS[0]), EVENTS[0])
    + b"%X;ext=1\r\n%s\r\n" % (len(EVENTS[1]), EVENTS[1])  # upper-case hex, an extension
    + b" %x \t; a=b\r\n%s\r\n" % (len(EVENTS[2]), EVENTS[2])  # blanks around the size
    + b"0\r\nX-Trailer: yes\r\n\r\n"
)
CHUNKED_BODY = b"".join(EVENTS)


class FramingTests(SynchronousTestCase):
    def check_every_split(self, raw: bytes, body: bytes, reusable: bool = True) -> None:
        for cut in range(1, len(raw)):
            for pieces in ((raw[:cut], raw[cut:]), tuple(raw[i:i + 1] for i in range(len(raw))) if cut == 1 else ()):
                if not pieces:
                    continue
                wire = Wire()
                d = wire.ask()
                wire.feed(*pieces)
                response = result(d)
                collected = Body()
                response.deliverBody(collected)
                self.assertEqual(collected.data, body, f"split at {cut}")
                self.assertIsNotNone(collected.reason, f"split at {cut}")
                assert collected.reason is not None
                self.assertTrue(collected.reason.check(ResponseDone), f"split at {cut}")
                self.assertEqual(wire.pool.idle, 1 if reusable else 0)
                self.assertEqual(wire.transport.disconnecting, not reusable)

    def test_chunked_in_every_split(self) -> None:
        self.check_every_split(CHUNKED, CHUNKED_BODY)

    def test_content_length_in_every_split(self) -> None:
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: application/json\r\n\r\n{\"ok\":true}"
        self.check_every_split(raw, b'{"ok":true}')

    def test_head_fields(self) -> None:
        wire = Wire()
        d = wire.ask()
        wire.feed(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
        response = result(d)
        self.assertEqual((response.code, response.phrase), (503, b"Service Unavailable"))
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"1", b"2"])
        self.assertEqual(response.length, 0)

    def test_bodyless_responses_end_at_once_and_free_the_connection(self) -> None:
        for method, head in (
            (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
            (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ):
            wire = Wire()
            d = wire.ask(method)
            wire.feed(head)
            collected = Body()
            result(d).deliverBody(collected)
            self.assertEqual(collected.data, b"")
            assert collected.reason is not None
            self.assertTrue(collected.reason.check(ResponseDone), repr(head))
            self.assertEqual(wire.pool.idle, 1, repr(head))

    def test_interim_responses_are_skipped(self) -> None:
        wire = Wire()
        d = wire.ask()
        wire.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        response = result(d)
        self.assertEqual(response.code, 200)
        collected = Body()
        response.deliverBody(collected)
        self.assertEqual(collected.data, b"ok")

    def test_a_body_until_close_may_have_lost_data_and_ends_the_connection(self) -> None:
        wire = Wire()
        d = wire.ask()
        wire.feed(b"HTTP/1.1 200 OK\r\n\r\nsome", b" bytes")
        collected = Body()
        result(d).deliverBody(collected)
        self.assertIsNone(collected.reason)
        wire.lose()
        self.assertEqual(collected.data, b"some bytes")
        assert collected.reason is not None
        self.assertTrue(collected.reason.check(PotentialDataLoss))
        self.assertEqual(wire.pool.idle, 0)

    def test_connections_the_server_closes_are_not_reused(self) -> None:
        for head in (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok+garbage",
        ):
            wire = Wire()
            d = wire.ask()
            wire.feed(head)
            collected = Body()
            result(d).deliverBody(collected)
            self.assertEqual(collected.data, b"ok")
            self.assertEqual(wire.pool.idle, 0, repr(head))
            self.assertTrue(wire.transport.disconnecting, repr(head))

    def test_bytes_beyond_a_bodyless_response_end_the_connection(self) -> None:
        wire = Wire()
        d = wire.ask()
        wire.feed(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n")
        collected = Body()
        result(d).deliverBody(collected)
        self.assertEqual(collected.data, b"")
        self.assertEqual(wire.pool.idle, 0)
        self.assertTrue(wire.transport.disconnecting)

    def test_several_chunks_read_at_once_are_handed_on_as_one_piece(self) -> None:
        wire = Wire()
        d = wire.ask()
        head, _, rest = CHUNKED.partition(b"\r\n\r\n")
        wire.feed(head + b"\r\n\r\n")
        collected = Body()
        result(d).deliverBody(collected)
        wire.feed(rest)
        self.assertEqual(collected.chunks, [CHUNKED_BODY])

    def test_body_that_arrives_before_delivery_is_kept(self) -> None:
        wire = Wire()
        d = wire.ask()
        response: list[Response] = []
        d.addCallback(response.append)
        wire.feed(CHUNKED)
        collected = Body()
        response[0].deliverBody(collected)
        self.assertEqual(collected.data, CHUNKED_BODY)
        assert collected.reason is not None
        self.assertTrue(collected.reason.check(ResponseDone))


class HeadersTests(SynchronousTestCase):
    def test_the_same_headers_as_twisted_would_hold(self) -> None:
        for head in (
            b"HTTP/1.1 200 OK\r\ncontent-type: a/b\r\nX-Two: 1\r\nx-two:  2 \r\nEtag: e\r\nContent-Length: 0",
            b"HTTP/1.1 200 OK\r\nX-Lone: a\nb\r\nX-Cr: c\rd\r\nContent-Length: 0",  # (Headers makes these spaces)
        ):
            wire = Wire()
            d = wire.ask()
            wire.feed(head + b"\r\n\r\n")
            got = list(result(d).headers.getAllRawHeaders())
            expected = Headers()
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                expected.addRawHeader(name, value.strip(b" \t"))
            self.assertEqual(got, list(expected.getAllRawHeaders()))
        self.assertIn((b"X-Lone", [b"a b"]), got)

    def test_framing_headers_in_any_case(self) -> None:
        for head, body, reusable in (
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked", b"2\r\nok\r\n0\r\n\r\n", True),
            (b"HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: gzip, Chunked", b"2\r\nok\r\n0\r\n\r\n", True),
            (b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 2", b"ok", True),
            (b"HTTP/1.1 200 OK\r\nconnection: Close\r\nCONTENT-LENGTH: 2", b"ok", False),
        ):
            wire = Wire()
            d = wire.ask()
            wire.feed(head + b"\r\n\r\n" + body)
            collected = Body()
            result(d).deliverBody(collected)
            self.assertEqual(collected.data, b"ok", head)
            self.assertIsNotNone(collected.reason, head)
            self.assertEqual(wire.connection._reusable, reusable, head)


class FailureTests(SynchronousTestCase):
    def test_malformed_heads_fail_and_abort(self) -> None:
        for head in (
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ):
            wire = Wire()
            d = wire.ask()
            wire.feed(head)
            failure = failure_of(d)
            self.assertIsInstance(failure.value, ResponseFailed, repr(head))
            self.assertTrue(wire.transport.disconnected, repr(head))

    def test_a_head_that_never_ends_is_refused(self) -> None:
        wire = Wire()
        d = wire.ask()
        wire.feed(b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70000)
        self.assertIsInstance(failure_of(d).value, ResponseFailed)

    def test_a_malformed_chunk_fails_the_body(self) -> None:
        for bad in (b"zz\r\n", b"5\r\nhelloXX", b"-1\r\n", b"1" * 5000, b"1" * 17 + b"\r\n", b"\r\n"):
            wire = Wire()
            d = wire.ask()
            wire.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            collected = Body()
            result(d).deliverBody(collected)
            wire.feed(bad)
            assert collected.reason is not None, bad
            self.assertIsInstance(collected.reason.value, ResponseFailed, repr(bad))
            self.assertTrue(wire.transport.disconnected, repr(bad))

    def test_lost_before_any_byte_is_never_received(self) -> None:
        wire = Wire()
        d = wire.ask()
        wire.lose(ConnectionDone())
        failure = failure_of(d)
        self.assertIsInstance(failure.value, ResponseNeverReceived)
        self.assertTrue(cast(ResponseNeverReceived, failure.value).reasons[0].check(ConnectionDone))

    def test_lost_within_the_head_failed(self) -> None:
        wire = Wire()
        d = wire.ask()
        wire.feed(b"HTTP/1.1 200 O")
        wire.lose(ConnectionLost())
        self.assertIsInstance(failure_of(d).value, ResponseFailed)

    def test_lost_within_the_body_fails_the_body(self) -> None:
        for head in (b"Content-Length: 10\r\n\r\nabc", b"Transfer-Encoding: chunked\r\n\r\n5\r\nab"):
            wire = Wire()
            d = wire.ask()
            wire.feed(b"HTTP/1.1 200 OK\r\n" + head)
            collected = Body()
            result(d).deliverBody(collected)
            wire.lose(ConnectionLost())
            assert collected.reason is not None
            self.assertIsInstance(collected.reason.value, ResponseFailed, repr(head))
            self.assertTrue(cast(ResponseFailed, collected.reason.value).reasons[0].check(ConnectionLost))
            self.assertEqual(wire.pool.idle, 0)

    def test_bytes_from_an_idle_connection_end_it(self) -> None:
        wire = Wire()
        wire.feed(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(wire.transport.disconnected)


class ControlTests(SynchronousTestCase):
    def test_cancelling_before_the_head_aborts_the_connection(self) -> None:
        wire = Wire()
        d = wire.ask()
        d.cancel()
        self.assertIsInstance(failure_of(d).value, CancelledError)
        self.assertTrue(wire.transport.disconnected)
        wire.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # too late: ignored
        wire.lose()
        self.assertEqual(wire.pool.idle, 0)

    def test_stop_producing_mid_body_aborts_the_connection(self) -> None:
        wire = Wire()
        d = wire.ask()
        wire.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
        collected = Body()
        result(d).deliverBody(collected)
        assert collected.transport is not None
        collected.transport.stopProducing()  # type: ignore[attr-defined]
        self.assertTrue(wire.transport.disconnected)
        wire.feed(b"2\r\ncd\r\n")  # read after the abort: not handed on
        wire.lose(ConnectionLost())
        self.assertEqual(collected.data, b"ab")
        assert collected.reason is not None
        self.assertIsInstance(collected.reason.value, ResponseFailed)

    def test_pausing_reaches_the_transport_until_the_body_is_complete(self) -> None:
        wire = Wire()
        d = wire.ask()
        wire.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        collected = Body()
        result(d).deliverBody(collected)
        producer: Any = collected.transport
        producer.pauseProducing()
        self.assertEqual(wire.transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(wire.transport.producerState, "producing")
        producer.pauseProducing()
        wire.feed(b"cd")
        # complete: the connection is resumed, pooled, and no longer this body's to pause or stop
        self.assertEqual(wire.transport.producerState, "producing")
        self.assertEqual(wire.pool.idle, 1)
        producer.pauseProducing()
        producer.stopProducing()
        self.assertEqual(wire.transport.producerState, "producing")
        self.assertFalse(wire.transport.disconnected)

    def test_a_second_request_while_one_runs_is_refused(self) -> None:
        wire = Wire()
        wire.ask()
        self.assertRaises(RuntimeError, wire.ask)


class PoolTests(SynchronousTestCase):
    def idle_connection(self, wire: Wire) -> None:
        d = wire.ask()
        wire.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        result(d)

    def test_idle_connections_close_after_the_timeout(self) -> None:
        wire = Wire()
        self.idle_connection(wire)
        self.assertEqual(wire.pool.idle, 1)
        wire.clock.advance(3.9)
        self.assertEqual(wire.pool.idle, 1)
        wire.clock.advance(0.2)
        self.assertEqual(wire.pool.idle, 0)
        self.assertTrue(wire.transport.disconnecting)
        self.assertEqual(wire.clock.getDelayedCalls(), [])

    def test_an_expired_connection_is_not_handed_out(self) -> None:
        wire = Wire()
        self.idle_connection(wire)
        connects: list[Any] = []

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                connects.append(factory)
                return Deferred()

        wire.pool._endpoint = Endpoint()  # type: ignore[assignment]
        wire.clock.rightNow += 5  # past the timeout, before the sweep ran
        self.assertIsNone(wire.pool.idle_connection())
        wire.pool.connect()
        self.assertTrue(wire.transport.disconnecting)
        self.assertEqual(len(connects), 1)
        self.assertFalse(wire.pool.reused)

    def test_at_most_max_idle_kept(self) -> None:
        clock = Clock()
        pool = ConnectionPool(clock, endpoint=None, max_idle=2)  # type: ignore[arg-type]
        transports = []
        for _ in range(3):
            connection = Connection(pool)
            transport = StringTransport()
            connection.makeConnection(transport)
            transports.append(transport)
            d = connection.request(b"GET / HTTP/1.1\r\n\r\n")
            connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            result(d)
        self.assertEqual(pool.idle, 2)
        self.assertEqual([t.disconnecting for t in transports], [False, False, True])
        # newest first
        handed = pool.idle_connection()
        assert handed is not None
        self.assertIs(handed.transport, transports[1])
        self.assertTrue(pool.reused)
        pool.close()
        self.assertTrue(transports[0].disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])


class RequestBytesTests(SynchronousTestCase):
    def test_the_client_sets_host_length_and_framing(self) -> None:
        headers = [
            (b"Host", [b"evil"]), (b"Content-Length", [b"999"]), (b"Transfer-Encoding", [b"chunked"]),
            (b"Connection", [b"close"]), (b"Content-Type", [b"application/json"]), (b"X-Gateway-User", [b"alice"]),
        ]
        data = request_bytes(b"POST", b"/p/v1/chat/completions?x=1", b"up:8080", headers, b"{}")
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /p/v1/chat/completions?x=1 HTTP/1.1")
        self.assertEqual(sorted(lines[1:]), sorted([
            b"Host: up:8080", b"Content-Length: 2", b"Content-Type: application/json", b"X-Gateway-User: alice",
        ]))
        self.assertEqual(body, b"{}")

    def test_a_post_without_body_says_so(self) -> None:
        self.assertIn(b"Content-Length: 0\r\n", request_bytes(b"POST", b"/", b"h", [], None))
        self.assertNotIn(b"Content-Length", request_bytes(b"GET", b"/", b"h", [], None))


class Counting(Protocol):
    """A server that answers every request on a connection with a small JSON body."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # type: ignore[union-attr]


class LoopbackTests(TestCase):
    async def test_requests_in_turn_share_one_connection(self) -> None:
        factory = Factory.forProtocol(Counting)
        factory.connections = 0  # type: ignore[attr-defined]
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        pool = ConnectionPool(reactor, endpoint)
        self.addCleanup(pool.close)
        reused = []
        for _ in range(5):
            response = await send(pool, b"GET", b"/", b"127.0.0.1", [], None)
            reused.append(pool.reused)
            body = Body()
            done: Deferred[None] = Deferred()
            body.done = done
            response.deliverBody(body)
            await done
            self.assertEqual(body.data, b"ok")
        self.assertEqual(factory.connections, 1)  # type: ignore[attr-defined]
        self.assertEqual(reused, [False, True, True, True, True])
        connection = pool.idle_connection()
        assert connection is not None
        handle = connection.transport.getHandle()  # type: ignore[union-attr]
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))  # a chunk is not held back
        await connection.close()
