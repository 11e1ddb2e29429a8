"""The proxy's view of a client (L{twisted_gw.proxy.client}) on twisted.web's request."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.web.server import Request
from zope.interface import implementer

from twisted_gw.proxy import ClientRequest, IClientResponse


def client_request(request: Request) -> ClientRequest:
    """What the client sent, as the proxy reads it."""
    content = request.content
    return ClientRequest(request.method, request.uri, request.requestHeaders, content.read() if content else b"")


@implementer(IClientResponse)
class WebResponse:
    """The response to C{request}, written through its public methods."""

    __slots__ = ("request",)

    def __init__(self, request: Request) -> None:
        self.request = request

    @property
    def gone(self) -> bool:
        return self.request.channel is None  # (Twisted lets go of the channel when the connection is lost)

    def set_status(self, code: int) -> None:
        self.request.setResponseCode(code)

    def set_header(self, name: bytes, values: Sequence[bytes]) -> None:
        self.request.responseHeaders.setRawHeaders(name, list(values))

    def write(self, data: bytes) -> None:
        self.request.write(data)

    def finish(self) -> None:
        self.request.finish()

    def close(self) -> Deferred[None]:
        if self.gone:
            return succeed(None)
        closed: Deferred[None] = self.request.notifyFinish()
        self.request.loseConnection()
        return closed.addErrback(lambda _: None)  # (lost, as asked; or this wait cancelled for it)

    def register_producer(self, producer: IPushProducer) -> None:
        self.request.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        self.request.unregisterProducer()
