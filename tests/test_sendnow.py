"""
L{send_now}: written bytes leave at once over real loopback TCP, while a
closing connection and a failed send are still the reactor's to finish.  The
peer is a plain blocking socket, read while the reactor is not turning.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, cast

from support import reactor
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from twisted_gw.sendnow import send_now


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


class SendNowTests(TestCase):
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

