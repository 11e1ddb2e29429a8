"""
The proxy's view of a client: the request it sent, and the response the
proxy writes through.  The web layer implements L{IClientResponse} on
twisted.web's request; the proxy never sees twisted.web.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.http_headers import Headers
from zope.interface import Attribute, Interface


@attrs.frozen
class ClientRequest:
    """A request as the client sent it: method, URI (path and query, as sent), headers, body."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes = b""

    @property
    def path(self) -> bytes:
        return self.uri.partition(b"?")[0]

    def header(self, name: bytes) -> Optional[bytes]:
        """The last value of the header C{name}, or None."""
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None


class IClientResponse(Interface):
    """
    The response to one client request.  Nothing is sent before the first
    L{write}, which sends the status and headers set so far.
    """

    gone = Attribute("True once the client has left (its connection is lost).")

    def set_status(code: int) -> None:
        """The status code (the reason phrase is the web server's own)."""

    def set_header(name: bytes, values: Sequence[bytes]) -> None:
        """Set (replace) a response header."""

    def write(data: bytes) -> None:
        """Send C{data} (the status and headers first, on the first call; C{b""} sends just those)."""

    def finish() -> None:
        """End the response as a complete one."""

    def close() -> Deferred[None]:
        """
        End the response by closing the connection, never as a complete one
        (a body cut short must not look whole); fires once closed.
        """

    def register_producer(producer: IPushProducer) -> None:
        """Pause C{producer} while the client reads slower than it produces."""

    def unregister_producer() -> None:
        """Undo L{register_producer}."""
