"""
The gateway's HTTP/1.1 server side: twisted.web's L{HTTPChannel} and
L{Request} through their public hooks.

A request the gateway refuses before any resource sees it gets an
OpenAI-shaped JSON error and a closed connection: 431 for headers over the
limits (too long a line, too many bytes or lines in all); 400 for a
malformed request line or header, an ambiguous one (a second C{Host},
C{Authorization} or C{x-api-key}, both C{Content-Length} and
C{Transfer-Encoding}), a length that is not a plain number, or a transfer
coding other than chunked; 408 for a head that takes longer than
C{--header-timeout} to arrive; 413 for a body over C{--max-body}, and
C{401} for a bad key on a request that asks for C{100 Continue}, before
any of its body is asked for.  The channel's hooks see each line before
Twisted parses it; what they pass and Twisted still refuses (a malformed
chunked body) gets Twisted's own bare C{400 Bad Request}.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from io import BytesIO
from typing import Optional
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server

from twisted_gw.apis.errors import dialect_json, error_json
from twisted_gw.apis.kinds import anthropic_dialect

DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_HEADER_TIMEOUT = 60.0

# Headers a request may carry once: a second one makes it ambiguous (RFC 9112 3.2, and a credential is not guessed).
_ONCE = frozenset({b"host", b"authorization", b"x-api-key", b"content-length", b"transfer-encoding"})
# A length of more digits than this is no body anyone sends (and past 4,300 digits Python refuses to read it).
_MAX_LENGTH_DIGITS = 18

# What refuses a request from its head alone (status, message, code, extra headers), or None: see GatewaySite.
EarlyRefusal = tuple[int, str, str, dict[bytes, bytes]]

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [!-~]+ HTTP/[0-9]\.[0-9]")

_REASONS = {400: b"Bad Request", 401: b"Unauthorized", 408: b"Request Timeout", 413: b"Content Too Large",
            431: b"Request Header Fields Too Large"}


def refusal(status: int, message: str, code: str, headers: Optional[dict[bytes, bytes]] = None,
            anthropic: bool = False) -> bytes:
    """
    A whole response refusing a request before any request object could
    answer it (unreadable, or too large): an OpenAI-shaped body (Anthropic's
    when C{anthropic}), and C{Connection: close}, as the connection is closed after it.
    """
    body = dialect_json(status, message, "invalid_request_error", code, anthropic)
    extra = b"".join(name + b": " + value + b"\r\n" for name, value in (headers or {}).items())
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n%s"
            % (status, _REASONS[status], len(body), extra, body))


class GatewayChannel(http.HTTPChannel):
    """HTTP/1.1 only (no HTTP/2 upgrade); JSON errors for requests it cannot read; known to its site while open."""

    site: Optional[GatewaySite] = None  # (set by the site that builds it)

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.site is not None:
            self.site.channels.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._head_done()
        super().connectionLost(reason)
        if self.site is not None:
            self.site.channel_closed(self)

    # Where the request being read is: in its head (after the request line), the head's size and lines so far,
    # the headers it may carry once, and the timer that bounds the time its head takes to arrive.
    _in_head = False
    _head_size = 0
    _head_lines = 0
    _once: frozenset[bytes] = frozenset()
    _head_timer: Optional[IDelayedCall] = None
    target = b""  # the request target of the request line read last

    def dataReceived(self, data: bytes) -> None:
        if self._head_timer is None and not self._in_head and not self.requests:
            self._head_started()  # (the first byte of a request's head)
        super().dataReceived(data)

    def _head_started(self) -> None:
        timeout = self.site.header_timeout if self.site is not None else None
        if timeout:
            self._head_timer = self.callLater(timeout, self._head_timed_out)

    def _head_done(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        assert self.site is not None
        self.refuse(408, f"The request's headers did not all arrive within {self.site.header_timeout:g} s.",
                    "header_timeout")

    def lineReceived(self, line: bytes) -> None:
        if not self._in_head:
            if line:  # (a request line; an empty line before one is Twisted's to skip)
                self._in_head = True
                self._head_size = len(line)
                self._head_lines = 0
                self._once = frozenset()
                self.target = line.split(b" ")[1] if line.count(b" ") == 2 else b""
                if self._head_timer is None:  # (a request read after the one before it was answered)
                    self._head_started()
                if not _REQUEST_LINE.fullmatch(line):
                    self.refuse(400, "The request line is not valid HTTP/1.1.", "invalid_http")
                    return
        elif line:
            self._head_size += len(line)
            if line[:1] not in (b" ", b"\t"):  # (a folded line continues the header before it)
                self._head_lines += 1
            if self._head_size > self.totalHeadersSize:
                self.refuse(431, f"The request headers are longer than {self.totalHeadersSize} bytes in all.",
                            "headers_too_large")
                return
            if self._head_lines > self.maxHeaders:
                self.refuse(431, f"The request has more than {self.maxHeaders} headers.", "too_many_headers")
                return
        else:
            self._in_head = False  # the head is complete
            self._head_done()
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or len(value.translate(None, b"\x00\r\n")) != len(value):
            self.refuse(400, "A request header is not valid HTTP/1.1.", "invalid_http")
            return False
        lower, value = name.lower(), value.strip(b" \t")
        if lower in _ONCE:
            if lower in self._once:
                self.refuse(400, f"The request has more than one {name.decode('ascii')} header.", "duplicate_header")
                return False
            self._once |= {lower}
            if {b"content-length", b"transfer-encoding"} <= self._once:
                self.refuse(400, "The request has both Content-Length and Transfer-Encoding.", "invalid_http")
                return False
        if lower == b"content-length" and not (value.isdigit() and len(value) <= _MAX_LENGTH_DIGITS):
            self.refuse(400, "The request's Content-Length is not a plain number of bytes.", "invalid_http")
            return False
        if lower == b"transfer-encoding" and value.lower() != b"chunked":
            self.refuse(400, "The only transfer coding accepted on a request is chunked.", "invalid_http")
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        early = request.early_refusal(self.length, self.target) if isinstance(request, GatewayRequest) else None
        if early is not None:  # (answered before Twisted sends 100 Continue, or reads any of the body)
            assert isinstance(request, GatewayRequest)
            request.refused = True
            self.refuse(*early)
            return
        super().allHeadersReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(431, f"A request header line is longer than {self.MAX_LENGTH} bytes.", "headers_too_large")

    def refuse(self, status: int, message: str, code: str, headers: Optional[dict[bytes, bytes]] = None) -> None:
        """Answer a request that cannot be read with an error, then close the connection."""
        self._head_done()
        assert self.transport is not None
        anthropic = anthropic_dialect(self.target.partition(b"?")[0])
        self.transport.write(refusal(status, message, code, headers, anthropic))
        self.loseConnection()


class GatewayRequest(server.Request):
    """
    Keeps request bodies in memory (never a temporary file on the reactor
    thread), and refuses one larger than the site's C{max_body} with 413 as
    soon as that is known: from C{Content-Length} before any of the body is
    read, or when a chunked body grows past it.
    """

    refused = False
    received = 0

    @property
    def max_body(self) -> int:
        return int(getattr(getattr(self.channel, "site", None), "max_body", DEFAULT_MAX_BODY))

    def early_refusal(self, length: Optional[int], target: bytes) -> Optional[EarlyRefusal]:
        """
        The answer to this request from its head alone, if it is refused: a
        body over the limit by its C{Content-Length}; or, for a request that
        asks for C{100 Continue}, whatever the site refuses from its head (a
        bad key), so that no 100 is ever sent for it.
        """
        if length is not None and length > self.max_body:
            return (413, f"The request body is larger than the gateway's limit of {self.max_body} bytes.",
                    "request_too_large", {})
        site = getattr(self.channel, "site", None)
        expect = self.requestHeaders.getRawHeaders(b"expect", [b""])[-1].lower()
        if expect == b"100-continue" and isinstance(site, GatewaySite) and site.early_refusal is not None:
            return site.early_refusal(target, self)
        return None

    def gotLength(self, length: Optional[int]) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self.received += len(data)
        if self.received > self.max_body:
            self.content = BytesIO()
            self.refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self.refused:
            super().requestReceived(command, path, version)

    def process(self) -> None:
        """
        Twisted's, for a request whose path and host Klein can read: they are
        UTF-8 once percent-decoded (else Klein answers in plain text).
        """
        try:
            self.getRequestHostname().decode("utf-8")
            for segment in self.path.split(b"/"):
                unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError:
            self.setResponseCode(400)
            self.setHeader(b"Content-Type", b"application/json")
            self.write(error_json("The request path or host is not UTF-8.", "invalid_request_error", "invalid_path"))
            self.finish()
            return
        super().process()

    def refuse(self) -> None:
        self.refused = True
        channel = self.channel
        assert isinstance(channel, GatewayChannel)
        channel.refuse(413, f"The request body is larger than the gateway's limit of {self.max_body} bytes.",
                       "request_too_large")


class GatewaySite(server.Site):
    """A site without Twisted's combined access log: the proxy logs each request itself."""

    noisy = False
    protocol = GatewayChannel  # type: ignore[assignment]  # HTTP/1.1 only, no HTTP/2 wrapper

    def __init__(
        self, resource: object, max_body: int = DEFAULT_MAX_BODY, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        early_refusal: Optional[Callable[[bytes, GatewayRequest], Optional[EarlyRefusal]]] = None,
    ) -> None:
        # A proxy forwards bodies as they are: never parse a form upload into request.args.
        super().__init__(resource, requestFactory=GatewayRequest, parsePOSTFormSubmission=False)
        self.max_body = max_body
        self.header_timeout = header_timeout
        self.early_refusal = early_refusal
        self.channels: set[GatewayChannel] = set()
        self._closed: list[Deferred[None]] = []

    def channel_closed(self, channel: GatewayChannel) -> None:
        self.channels.discard(channel)
        if not self.channels:
            closed, self._closed = self._closed, []
            for d in closed:
                d.callback(None)

    def close_connections(self, clock: IReactorTime, timeout: float) -> Deferred[None]:
        """
        Close every client connection once what was written to it is sent
        (the last answers of a shutdown), aborting those still open after
        C{timeout} seconds; fires when none is left.
        """
        if not self.channels:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._closed.append(done)
        for channel in list(self.channels):
            channel.loseConnection()

        def abort() -> None:
            for channel in list(self.channels):
                if channel.transport is not None:
                    channel.transport.abortConnection()  # type: ignore[attr-defined]

        timer = clock.callLater(timeout, abort)
        return done.addCallback(lambda _: timer.cancel() if timer.active() else None)

    def log(self, request: http.Request) -> None:
        pass
