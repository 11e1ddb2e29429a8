"""
L{send_now} and L{write_now}: written bytes leave at once over real loopback
TCP, while a closing connection, a failed send and what the socket does not
take are still the reactor's to finish.  The peer is a plain socket, read
while the reactor is not turning.  And the gateway's HTTP channel, which holds
a response's headers for the bytes written with them.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any, cast

from support import reactor
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from twisted_gw.sendnow import send_now, write_now
from twisted_gw.web import GatewaySite


class Watched(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.callback(None)


def read(peer: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = peer.recv(size - len(data))
        if not piece:
            break
        data += piece
    return data


class Loopback(TestCase):
    async def connected(self) -> tuple[Watched, Any, socket.socket]:
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getsockname()[1])
        proto = cast(Watched, await endpoint.connect(Factory.forProtocol(Watched)))
        transport: Any = proto.transport

        def close() -> Deferred[None]:
            transport.abortConnection()
            return proto.lost

        self.addCleanup(close)
        peer, _ = listener.accept()  # the handshake is done: accept does not wait
        self.addCleanup(peer.close)
        peer.settimeout(0.05)
        return proto, transport, peer


class SendNowTests(Loopback):
    async def test_written_bytes_leave_before_the_reactor_turns(self) -> None:
        _, transport, peer = await self.connected()
        transport.write(b"without")
        with self.assertRaises(socket.timeout):
            peer.recv(100)  # Twisted alone sends on the reactor's next poll
        transport.write(b" and with")
        send_now(transport)
        self.assertEqual(read(peer, 16), b"without and with")
        send_now(transport)  # nothing left: no second send
        with self.assertRaises(socket.timeout):
            peer.recv(100)

    async def test_a_closing_connection_is_left_to_the_reactor(self) -> None:
        proto, transport, peer = await self.connected()
        transport.write(b"last words")
        transport.loseConnection()
        send_now(transport)
        with self.assertRaises(socket.timeout):
            peer.recv(100)
        await proto.lost  # the reactor sent them, then closed
        peer.settimeout(1)
        self.assertEqual(read(peer, 100), b"last words")

    async def test_a_failed_send_is_taken_up_by_the_reactor(self) -> None:
        proto, transport, peer = await self.connected()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset, which loopback delivers at once
        transport.write(b"x" * 1000)
        send_now(transport)  # the send fails: no exception here
        self.assertFalse(proto.lost.called)
        await proto.lost  # the reactor closes the connection on its next poll



class WriteNowTests(Loopback):
    async def test_written_and_sent_in_one_step(self) -> None:
        _, transport, peer = await self.connected()
        write_now(transport, b"at once")
        self.assertEqual(read(peer, 7), b"at once")
        self.assertNotIn(transport, reactor.getWriters())  # never registered for writing

    async def test_bytes_written_before_go_first(self) -> None:
        _, transport, peer = await self.connected()
        transport.write(b"head, ")  # held by Twisted for the reactor's next poll
        self.assertIn(transport, reactor.getWriters())
        write_now(transport, b"then body")
        self.assertEqual(read(peer, 15), b"head, then body")
        self.assertNotIn(transport, reactor.getWriters())

    async def test_what_the_socket_does_not_take_is_sent_by_the_reactor_in_order(self) -> None:
        _, transport, peer = await self.connected()
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 4096  # 1 MB: far more than the socket takes at once
        write_now(transport, big)
        self.assertIn(transport, reactor.getWriters())  # the rest is the reactor's
        write_now(transport, b"tail")  # something half-sent: queued behind it
        peer.setblocking(False)
        received = b""
        while len(received) < len(big) + 4:
            try:
                received += peer.recv(1 << 20)
            except BlockingIOError:
                await deferLater(reactor, 0.001)
        self.assertEqual(received, big + b"tail")

    async def test_a_closing_connection_is_left_to_the_reactor(self) -> None:
        proto, transport, peer = await self.connected()
        transport.loseConnection()
        write_now(transport, b"last words")
        with self.assertRaises(socket.timeout):
            peer.recv(100)
        await proto.lost
        peer.settimeout(1)
        self.assertEqual(read(peer, 100), b"last words")

    async def test_a_failed_send_is_taken_up_by_the_reactor(self) -> None:
        proto, transport, peer = await self.connected()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        write_now(transport, b"x" * 1000)  # no exception here
        self.assertFalse(proto.lost.called)
        await proto.lost

    async def test_anything_but_plain_tcp_is_written_as_usual(self) -> None:
        fake = StringTransport()
        write_now(fake, b"as usual")
        self.assertEqual(fake.value(), b"as usual")


class HeldHeadersTests(TestCase):
    """A gateway response's headers go out with its first bytes, or alone when none follow."""

    async def serve(self, render: Callable[[server.Request], object]) -> socket.socket:
        class Page(resource.Resource):
            isLeaf = True

            def render(self, request: server.Request) -> object:
                return render(request)

        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(GatewaySite(Page()))
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.setblocking(False)
        return client

    async def receive(self, client: socket.socket, until: bytes) -> bytes:
        data = b""
        for _ in range(2000):
            try:
                data += client.recv(65536)
            except BlockingIOError:
                pass
            if until in data:
                return data
            await deferLater(reactor, 0.001)
        raise AssertionError(f"never received {until!r}: {data!r}")

    async def test_headers_and_body(self) -> None:
        client = await self.serve(lambda request: b"hello")
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await self.receive(client, b"hello")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data)
        self.assertIn(b"Content-Length: 5\r\n", data)

    async def test_headers_without_a_body_are_sent_at_once(self) -> None:
        opened: list[server.Request] = []

        def start(request: server.Request) -> object:
            request.setHeader(b"Content-Type", b"text/event-stream")
            request.write(b"")  # a stream that has nothing to say yet
            opened.append(request)
            return server.NOT_DONE_YET

        client = await self.serve(start)
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await self.receive(client, b"\r\n\r\n")
        self.assertIn(b"Content-Type: text/event-stream\r\n", data)
        opened[0].write(b"later")
        self.assertIn(b"later", await self.receive(client, b"later"))
        opened[0].finish()
        self.assertTrue((await self.receive(client, b"0\r\n\r\n")).endswith(b"0\r\n\r\n"))

    async def test_head_and_no_content(self) -> None:
        def answer(request: server.Request) -> object:
            if request.method == b"GET":
                request.setResponseCode(204)
            return b"body"

        client = await self.serve(answer)
        client.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertNotIn(b"body", await self.receive(client, b"\r\n\r\n"))
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"204 No Content", await self.receive(client, b"204"))
