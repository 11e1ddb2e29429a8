"""
The gateway's HTTP/1.1 server channel: twisted.web's L{HTTPChannel}, with a
request that arrives whole taken in one step, responses sent at once, and
OpenAI-shaped errors for requests it cannot read (431 for headers over the
limits, 400 for the rest).

Twisted reads a request line by line (L{LineReceiver}): a callback, a split of
the rest of the buffer and a round of checks for every line, then a decoder
object for the body.  Nearly every request to the gateway arrives in one read,
its head and its whole body together; L{parse_head} reads such a request in one
pass, with Twisted's own checks and limits, and the channel then makes the
same calls on the request that Twisted's line-by-line parse would make.
Anything else (a request in pieces, a chunked body, a header folded over two
lines, a pipelined request behind it, anything Twisted would refuse) goes to
Twisted's parse unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Optional

from twisted.web import http
from twisted.web.http import _parseRequestLine  # (a name of its own: the module is behind a deprecation proxy)
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder

from twisted_gw.errors import error_json


def put_raw_headers(headers: Headers, pairs: Iterable[tuple[bytes, Sequence[bytes]]]) -> None:
    """
    C{headers.setRawHeaders(name, values)} for each pair, for pairs read
    from another L{Headers} (or written so): their names are canonical and
    their values free of line breaks already, so the per-value pass that
    C{setRawHeaders} makes is skipped.
    """
    raw = headers._rawHeaders
    for name, values in pairs:
        raw[name] = list(values)


class Head(NamedTuple):
    """A request read whole: its request line, headers (canonical names, in order) and body."""

    method: bytes
    uri: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


def parse_head(data: bytes, max_line: int, max_size: int, max_headers: int) -> Optional[Head]:
    """
    C{data} as one complete request (head and body, nothing after it), when
    Twisted's parse would accept it as such; else None (Twisted's parse takes
    it: a request in pieces, a chunked body, a folded header, more data behind
    it, or one it answers with 400 or 431).  The limits are the channel's.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > max_size:
        return None
    head = data[:end]
    lines = head.split(b"\r\n")
    if (
        len(lines) > max_headers + 1
        or not lines[0]
        # a NUL, or a CR or LF not in a line end (Twisted refuses them all)
        or len(head.translate(None, b"\x00\r\n")) != len(head) - 2 * (len(lines) - 1)
        or (end > max_line and max(map(len, lines)) > max_line)
    ):
        return None
    try:
        method, uri, version = _parseRequestLine(lines[0])
    except ValueError:
        return None
    canonical = _nameEncoder._canonicalHeaderCache
    headers = []
    length = 0
    sized = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        known = canonical.get(name)
        if known is None:
            try:
                known = _nameEncoder.encode(name)  # (a folded line's name starts with a space: no token)
            except InvalidHeaderName:
                return None
        value = value.strip(b" \t")
        if known == b"Content-Length":
            if sized or not value.isdigit():
                return None
            sized = True
            length = int(value)
        elif known == b"Transfer-Encoding":
            return None
        headers.append((known, value))
    body = data[end + 4:]
    if len(body) != length:
        return None
    return Head(method, uri, version, headers, body)


class GatewayChannel(http.HTTPChannel):
    """HTTP/1.1 channel: a whole request in one step, answers sent at once, JSON errors for unreadable requests."""

    _host: Any = None  # (the local and the client's address, once per connection: see getHost, getPeer)
    _peer: Any = None

    def dataReceived(self, data: bytes) -> None:
        if (
            self.line_mode
            and not self._buffer
            and not self._busyReceiving
            and not self.paused
            and self._HTTPChannel__first_line == 1  # (Twisted's own state: a request's first line is next)
            and not self._receivedHeaderSize
        ):
            head = parse_head(data, self.MAX_LENGTH, self.totalHeadersSize, self.maxHeaders)
            if head is not None:
                # (no resetTimeout, as Twisted's dataReceived makes: the request is whole, and the idle timeout is
                # turned off for its handling at once; one refused closes the connection)
                self._take(head)
                return
        super().dataReceived(data)

    def _take(self, head: Head) -> None:
        """
        What Twisted's line-by-line parse does for C{head}, in its order: the
        request made and given its headers, L{allHeadersReceived}, the body,
        L{allContentReceived} (which has the request processed).  For the
        gateway's own request class, and a request that does not ask for
        C{100 Continue}, the steps are taken here directly, each as Twisted
        takes it (L{_take_directly}).  Data that arrives meanwhile (a response
        finished at once replays what was buffered) waits in the line buffer,
        as in L{LineReceiver}.
        """
        self._busyReceiving = True
        try:
            request = self.requestFactory(self, len(self.requests))
            self.requests.append(request)
            raw = request.requestHeaders._rawHeaders
            for name, value in head.headers:
                raw.setdefault(name, []).append(value)
            if getattr(request, "received_whole", None) is not None and b"Expect" not in raw:
                taken = self._take_directly(request, head, raw)
            else:
                taken = self._take_as_twisted(request, head)
        finally:
            self._busyReceiving = False
        if taken and self._buffer:
            super().dataReceived(b"")

    def _take_as_twisted(self, request: http.Request, head: Head) -> bool:
        """Twisted's calls for a whole request (its headers set); False if it was refused (413)."""
        self._HTTPChannel__first_line = 0
        self._command, self._path, self._version = head.method, head.uri, head.version
        self._receivedHeaderCount = len(head.headers)
        self.length = len(head.body)
        self.allHeadersReceived()
        if getattr(self.transport, "disconnecting", False):  # (refused: 413)
            return False
        if head.body:
            request.handleContentChunk(head.body)
            self._finishRequestBody(b"")
        else:
            self.allContentReceived()
        return True

    def _take_directly(self, request: Any, head: Head, raw: dict[bytes, list[bytes]]) -> bool:
        """
        L{allHeadersReceived}, the body and L{allContentReceived} for a
        request that needs no C{100 Continue}, without the calls between:
        cookies parsed and persistence checked only when a header asks for
        it, the body handed over whole, the channel's state left as
        L{allContentReceived} leaves it (its parse state was never changed),
        then the request's L{received_whole<twisted_gw.web.GatewayRequest.received_whole>}.
        """
        if b"Cookie" in raw:
            request.parseCookies()
        if head.version == b"HTTP/1.1" and b"Connection" not in raw:
            self.persistent = True
        else:
            self.persistent = self.checkPersistence(request, head.version)
        body = head.body
        request.gotLength(len(body))
        if getattr(self.transport, "disconnecting", False):  # (refused: 413)
            return False
        if body:
            request.handleContentChunk(body)
        # allContentReceived: the idle timeout off while the request is handled, raw mode until it is done
        if self.timeOut:
            self._savedTimeOut = self.setTimeout(None)
        self._handlingRequest = True
        self.line_mode = 0
        request.received_whole(head.method, head.uri, head.version)
        return True

    def getHost(self) -> Any:
        """The local address, asked of the socket once per connection (Twisted asks it for every request)."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> Any:
        """The client's address (immutable), made once per connection (Twisted makes it for every request)."""
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    # A response's writes go to the socket at once (twisted_gw/sendnow.py).  Its headers are held for the
    # bytes that follow them in the same Request.write, and sent with them in one send (GatewayRequest.write
    # sends them alone when no bytes follow); nothing is held from one call to the next.
    _held = b""

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):  # (a form Twisted itself never passes)
            self.flush_headers()
            super().writeHeaders(version, code, reason, headers)
            return
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self._held = b"".join(parts)

    def flush_headers(self) -> None:
        """Send the headers held, if any."""
        if self._held:
            self.write(b"")

    def write(self, data: bytes) -> None:
        if self._held:
            data = self._held + data
            del self._held
        assert self.transport is not None
        self.transport.write(data)

    def writeSequence(self, iovec: Sequence[bytes]) -> None:
        data = b"".join(iovec)
        if self._held:
            self.write(data)  # (the headers go first)
        else:
            assert self.transport is not None
            self.transport.write(data)

    def requestDone(self, request: http.Request) -> None:
        self.flush_headers()  # (a HEAD or 204 answer, which writes no body)
        super().requestDone(request)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(431, f"A request header line is longer than {self.MAX_LENGTH} bytes.", "headers_too_large")
        assert self.transport is not None
        self.transport.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        Twisted's answer to a request it cannot read, with an OpenAI-shaped
        body where Twisted sends a bare C{400 Bad Request}: 431 for headers
        over the limits in total or in number (as for an over-long line), 400
        for the rest (a malformed request line, header or chunked body).
        """
        if self._receivedHeaderSize > self.totalHeadersSize:
            self._refuse(431, f"The request headers are longer than {self.totalHeadersSize} bytes in all.",
                         "headers_too_large")
        elif self._receivedHeaderCount > self.maxHeaders:
            self._refuse(431, f"The request has more than {self.maxHeaders} headers.", "too_many_headers")
        else:
            self._refuse(400, "The request is not valid HTTP/1.1: a malformed request line, header or chunked body.",
                         "invalid_http")
        self.loseConnection()

    def _refuse(self, status: int, message: str, code: str) -> None:
        """An error answer to a request that could not be read, the connection to be closed after it."""
        assert self.transport is not None
        self.transport.write(refusal(status, message, code))


_REASONS = {400: b"Bad Request", 413: b"Content Too Large", 431: b"Request Header Fields Too Large"}


def refusal(status: int, message: str, code: str) -> bytes:
    """
    A whole response refusing a request before any request object could
    answer it (unreadable, or too large): an OpenAI-shaped body, and
    C{Connection: close}, as the connection is closed after it.
    """
    body = error_json(message, "invalid_request_error", code)
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        status, _REASONS[status], len(body), body)
