"""
A lean HTTP/1.1 client for talking to one upstream: one request at a time per
connection, connections kept alive and reused, each response body handed on
as it arrives.

Why not L{twisted.web.client.Agent}, which the gateway used before: profiled
under the benchmark suite (C{bench/}, the performance issue), Agent's layers
(pool, request and response state machines dispatched by name, its chunked
decoder, a Deferred per stage, a producer proxy per response) were about a
fifth of the gateway's CPU per request and two thirds of its CPU per relayed
SSE chunk.  An upstream needs much less of HTTP: no redirects, cookies,
content codings, pipelining or request body streaming.  This module keeps
Agent's contract where the gateway relies on it:

  - a L{Response} with C{code}, C{phrase}, C{headers} (a L{Headers}) and
    C{deliverBody()}, whose protocol is finished with C{ResponseDone},
    C{PotentialDataLoss} (a body delimited by the connection's close) or
    C{ResponseFailed};
  - failures before any response byte are C{ResponseNeverReceived}, after
    some C{ResponseFailed}, so the stale keep-alive retry and cancellation
    checks work as they did;
  - cancelling the request's Deferred aborts the connection (or the
    connection attempt), and the body protocol's producer's
    C{stopProducing} aborts it mid-body: that is how llama.cpp learns that
    the client left.

The bytes of several chunks read at once are handed on as one piece: fewer
writes to the client, and chunk boundaries carry no meaning in HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional, cast

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers, _nameEncoder
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from twisted_gw.sendnow import write_now

# A response head longer than this is refused (nginx's default large buffer is 8 KB x 4).
MAX_HEAD = 64 * 1024
# A chunk-size line (with extensions) or a trailer line longer than this is refused.
MAX_LINE = 4096

_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _DEAD = range(9)

_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
# A whole chunk-size line of the usual form (the size, maybe extensions); any other is read line by line.
_SIZE_LINE = re.compile(rb"[ \t]*([0-9a-fA-F]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# How every complete body ends (one instance, as twisted.internet.main.connectionDone is).
_DONE = Failure(ResponseDone())

_SET_BY_CLIENT = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
_WITH_BODY = frozenset({b"POST", b"PUT", b"PATCH"})


class ProtocolError(Exception):
    """The upstream's response is not HTTP/1.1 this client can read."""


@implementer(IResponse)
class Response:
    """
    An upstream response, its head read; the body follows through
    L{deliverBody}.  Body bytes that arrive before that are kept.
    """

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, code: int, phrase: bytes, headers: Headers, length: Any, connection: Connection) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._producer: Optional[_Producer] = _Producer(connection)
        self._protocol: Optional[Protocol] = None
        self._early: list[bytes] = []
        self._finished: Optional[Failure] = None

    def deliverBody(self, protocol: Protocol) -> None:
        if self._protocol is not None:
            raise RuntimeError("the body was already delivered")
        self._protocol = protocol
        protocol.makeConnection(self._producer or _Producer(None))
        early, self._early = self._early, []
        for data in early:
            protocol.dataReceived(data)
        if self._finished is not None:
            protocol.connectionLost(self._finished)

    @property
    def body_waiting(self) -> bool:
        """Body bytes arrived before L{deliverBody}: it hands them over at once."""
        return bool(self._early)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def _data(self, data: bytes) -> None:
        if self._protocol is None:
            self._early.append(data)
        else:
            self._protocol.dataReceived(data)

    def _finish(self, reason: Failure) -> None:
        """The body ended (C{reason}); from here on its producer controls nothing."""
        if self._producer is not None:
            self._producer.connection = None
            self._producer = None
        if self._protocol is None:
            self._finished = reason
        else:
            self._protocol.connectionLost(reason)


class _Producer:
    """The body's producer, as its protocol sees it: the connection, until the body is complete."""

    __slots__ = ("connection",)

    def __init__(self, connection: Optional[Connection]) -> None:
        self.connection = connection

    def pauseProducing(self) -> None:
        if self.connection is not None:
            self.connection.pause()

    def resumeProducing(self) -> None:
        if self.connection is not None:
            self.connection.resume()

    def stopProducing(self) -> None:
        """Abort the connection: the upstream stops generating."""
        if self.connection is not None:
            self.connection.abort()


class Connection(Protocol):
    """One connection to the upstream: a request written, its response read, then idle again."""

    def __init__(self, pool: Optional[ConnectionPool] = None) -> None:
        self._pool = pool
        self._state = _IDLE
        self._buf = b""
        self._left = 0
        self._waiting: Optional[Deferred[Response]] = None
        self._response: Optional[Response] = None
        self._head_only = False
        self._received = False
        self._reusable = False
        self._paused = False
        self._lost: list[Deferred[None]] = []
        self._aborted = False
        self.idle_since = 0.0

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)  # as Agent does

    def request(self, data: bytes, head_only: bool = False) -> Deferred[Response]:
        """Write a whole request (C{data}); fires with the response once its head arrived."""
        if self._state != _IDLE:
            raise RuntimeError("a request is already in progress on this connection")
        self._state = _HEAD
        self._head_only = head_only
        self._received = False
        d: Deferred[Response] = Deferred(self._cancel)
        self._waiting = d
        assert self.transport is not None
        write_now(self.transport, data)
        return d

    def _cancel(self, d: Deferred[Response]) -> None:
        """The caller gave up waiting for the head: nothing more is read from this connection."""
        self._waiting = None
        self._state = _DEAD
        self.abort()

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self._aborted:
            return
        state = self._state
        if state == _CHUNK_DATA or state == _CHUNK_SIZE or state == _CHUNK_END or state == _TRAILER:
            self._chunked(data)
        elif state == _LENGTH:
            self._length(data)
        elif state == _UNTIL_CLOSE:
            assert self._response is not None
            self._response._data(data)
        elif state == _HEAD:
            self._received = True
            self._head(data)
        elif state == _IDLE:
            # nothing was asked: a server that talks out of turn is not to be trusted with the next request
            self._state = _DEAD
            self.abort()

    def _head(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._fail(ProtocolError("the response head is too long"))
                else:
                    self._buf = buf
                return
            try:
                response = self._parse_head(buf[:end])
            except ProtocolError as e:
                self._fail(e)
                return
            buf = buf[end + 4:]
            if response is not None:
                break
            # an interim 1xx response: the real one follows
        self._buf = b""
        self._response = response
        waiting, self._waiting = self._waiting, None
        # The rest of what was read is settled before anyone sees the response (and may
        # send the next request on this connection when it is free again).
        if self._state == _IDLE:  # no body at all
            if buf:
                self._reusable = False  # bytes beyond the response: this connection is out of step
            self._complete(response)
        elif buf:
            self.dataReceived(buf)  # the body's first bytes: the response keeps them until delivered
        if waiting is not None:
            waiting.callback(response)

    def _parse_head(self, head: bytes) -> Optional[Response]:
        """The response for a head, or None for an interim (1xx) one; sets how the body is framed."""
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code_text, _, phrase = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code_text) != 3 or not code_text.isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
        code = int(code_text)
        # (keyed by the names Headers would give them: a name seen before is a token, in Twisted's cache)
        raw: dict[bytes, list[bytes]] = {}
        canonical = _nameEncoder._canonicalHeaderCache
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            known = canonical.get(name) if colon else None
            if known is None:
                if not colon or not _TOKEN.fullmatch(name):
                    raise ProtocolError(f"a malformed header line: {line[:100]!r}")
                known = _nameEncoder.encode(name)
            raw.setdefault(known, []).append(value.strip(b" \t"))
        if 100 <= code < 200:
            if code == 101:
                raise ProtocolError("the upstream switched protocols")
            return None
        connection = b",".join(raw.get(b"Connection", ())).lower()
        self._reusable = version == b"HTTP/1.1" and b"close" not in connection
        length: Any = UNKNOWN_LENGTH
        if self._head_only or code in (204, 304):
            self._state = _IDLE
            length = 0
        elif b"Transfer-Encoding" in raw:
            codings = b",".join(raw[b"Transfer-Encoding"]).lower()
            if codings.rsplit(b",", 1)[-1].strip() != b"chunked":
                raise ProtocolError(f"an unsupported transfer coding: {codings[:100]!r}")
            self._state = _CHUNK_SIZE
        elif b"Content-Length" in raw:
            values = {v.strip() for v in b",".join(raw[b"Content-Length"]).split(b",")}
            value = values.pop() if len(values) == 1 else b""
            if not value.isdigit():
                raise ProtocolError("a malformed Content-Length")
            length = self._left = int(value)
            self._state = _LENGTH if length else _IDLE
        else:
            self._state = _UNTIL_CLOSE
            self._reusable = False
        if head.count(b"\r") == head.count(b"\n") == len(lines) - 1:
            # no lone CR or LF for Headers to turn into spaces: its canonical names, without the per-value pass
            headers = Headers()
            headers._rawHeaders = raw
        else:
            headers = Headers(raw)
        return Response(code, phrase, headers, length, self)

    def _length(self, data: bytes) -> None:
        response = self._response
        assert response is not None
        left = self._left
        if len(data) < left:
            self._left = left - len(data)
            response._data(data)
            return
        self._left = 0
        if len(data) > left:
            self._reusable = False
            data = data[:left]
        response._data(data)
        self._complete(response)

    def _chunked(self, data: bytes) -> None:
        response = self._response
        assert response is not None
        buf = self._buf + data if self._buf else data
        self._buf = b""
        state = self._state
        left = self._left
        pieces: list[bytes] = []
        pos = 0
        size = len(buf)
        done = False
        while pos < size:
            if state == _CHUNK_DATA:
                take = min(left, size - pos)
                pieces.append(buf[pos:pos + take] if take < size or pos else buf)
                pos += take
                left -= take
                if not left:
                    state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                line = _SIZE_LINE.match(buf, pos)  # (the usual line, in one step)
                if line is not None:
                    pos = line.end()
                    left = int(line[1], 16)
                else:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        if size - pos > MAX_LINE:
                            self._fail(ProtocolError("a chunk-size line is too long"))
                            return
                        break
                    digits = buf[pos:eol].split(b";", 1)[0].strip(b" \t")
                    if not _HEX.fullmatch(digits):
                        self._fail(ProtocolError(f"a malformed chunk size: {buf[pos:eol][:40]!r}"))
                        return
                    pos = eol + 2
                    left = int(digits, 16)
                end = pos + left
                if left and end + 2 <= size and buf[end:end + 2] == b"\r\n":
                    # the usual case, a whole chunk in what was read: taken in one step
                    pieces.append(buf[pos:end])
                    pos = end + 2
                    left = 0
                    continue
                state = _CHUNK_DATA if left else _TRAILER
            elif state == _CHUNK_END:
                if size - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    self._fail(ProtocolError("a chunk does not end with CRLF"))
                    return
                pos += 2
                state = _CHUNK_SIZE
            else:  # _TRAILER: lines up to an empty one
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > MAX_LINE:
                        self._fail(ProtocolError("a trailer line is too long"))
                        return
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:
                    done = True
                    break
        self._state = state
        self._left = left
        if pos < size:
            if done:
                self._reusable = False  # bytes beyond the response
            else:
                self._buf = buf[pos:]
        if pieces:
            response._data(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if done and self._response is response:
            self._complete(response)

    def _complete(self, response: Response) -> None:
        """The response was read whole: the connection is free again (or closed), then the body ends."""
        self._state = _IDLE
        self._response = None
        if self._paused:
            self.resume()
        if self._reusable and self._pool is not None:
            self._pool.release(self)
        else:
            self._state = _DEAD
            if self.transport is not None:
                self.transport.loseConnection()
        response._finish(_DONE)

    def _fail(self, error: Exception) -> None:
        """The response cannot be read: give up on it and on the connection."""
        state = self._state
        self._state = _DEAD
        self.abort()
        self._end(state, Failure(error), None)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.connected = 0
        if self._pool is not None:
            self._pool.lost(self)
        state = self._state
        self._state = _DEAD
        self._end(state, reason, Failure(PotentialDataLoss()) if state == _UNTIL_CLOSE else None)
        lost, self._lost = self._lost, []
        for d in lost:
            d.callback(None)

    def _end(self, state: int, reason: Failure, body_end: Optional[Failure]) -> None:
        """Tell whoever waits on the response (its head or its body) that it ended with C{reason}."""
        if state == _HEAD:
            waiting, self._waiting = self._waiting, None
            if waiting is not None:
                waiting.errback(ResponseFailed([reason]) if self._received else ResponseNeverReceived([reason]))
        elif state not in (_IDLE, _DEAD):
            response, self._response = self._response, None
            if response is not None:
                response._finish(body_end or Failure(ResponseFailed([reason])))

    # -- flow control

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def abort(self) -> None:
        """Close at once (a reset): the upstream sees the client leave now."""
        if self.transport is not None and self.connected and not self._aborted:
            self._aborted = True
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def close(self) -> Deferred[None]:
        """Close cleanly; fires once closed."""
        if not self.connected:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost.append(d)
        assert self.transport is not None
        self.transport.loseConnection()
        return d


class _Factory(Factory):
    noisy = False  # no log line for every connection opened and closed

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: Any) -> Connection:
        return Connection(self.pool)


class ConnectionPool:
    """
    Connections to one endpoint: idle ones reused newest first, at most
    C{max_idle} kept, each closed after C{idle_timeout} seconds unused (one
    timer sweeps them all).
    """

    def __init__(self, clock: IReactorTime, endpoint: IStreamClientEndpoint, max_idle: int = 8,
                 idle_timeout: float = 4.0) -> None:
        self._clock = clock
        self._endpoint = endpoint
        self._factory = _Factory(self)
        self._idle: list[Connection] = []
        self._sweep: Any = None
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.reused = False  # whether the last connection handed out had served a request before

    def connect(self) -> Deferred[Connection]:
        """A new connection."""
        self.reused = False
        return cast("Deferred[Connection]", self._endpoint.connect(self._factory))

    def idle_connection(self) -> Optional[Connection]:
        """An idle connection ready for a request (the newest), or None."""
        idle = self._idle
        if idle:
            now = self._clock.seconds()
            while idle:
                connection = idle.pop()
                if now - connection.idle_since < self.idle_timeout:
                    self.reused = True
                    return connection
                connection.close()
        return None

    def release(self, connection: Connection) -> None:
        """A connection whose response was read whole: idle now."""
        if len(self._idle) >= self.max_idle:
            connection.close()
            return
        connection.idle_since = self._clock.seconds()
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = self._clock.callLater(self.idle_timeout, self._expire)

    def lost(self, connection: Connection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    def _expire(self) -> None:
        self._sweep = None
        now = self._clock.seconds()
        for connection in [c for c in self._idle if now - c.idle_since >= self.idle_timeout]:
            self._idle.remove(connection)
            connection.close()
        if self._idle:
            oldest = min(c.idle_since for c in self._idle)
            self._sweep = self._clock.callLater(max(0.0, oldest + self.idle_timeout - now), self._expire)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> Deferred[None]:
        """Close the idle connections (those in use finish first); fires when they are closed."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        idle, self._idle = self._idle, []
        return gatherResults([c.close() for c in idle]).addCallback(lambda _: None)


# A request's header fields, in order: (name, values) pairs.
RawHeaders = Sequence[tuple[bytes, Sequence[bytes]]]


def request_bytes(method: bytes, target: bytes, host: bytes, headers: RawHeaders, body: Optional[bytes]) -> bytes:
    """A request as sent: the client's own Host, length and connection headers replace any given."""
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, values in headers:
        if name.lower() in _SET_BY_CLIENT:
            continue
        for value in values:
            parts += (name, b": ", value, b"\r\n")
    if body is not None or method in _WITH_BODY:
        parts += (b"Content-Length: ", b"%d" % len(body or b""), b"\r\n")
    parts.append(b"\r\n")
    if body:
        parts.append(body)
    return b"".join(parts)


def send(pool: ConnectionPool, method: bytes, target: bytes, host: bytes, headers: RawHeaders,
         body: Optional[bytes]) -> Deferred[Response]:
    """Send a request on a connection from C{pool}; cancellable while connecting and until its head arrives."""
    data = request_bytes(method, target, host, headers, body)
    head_only = method == b"HEAD"
    idle = pool.idle_connection()
    if idle is not None:  # (the usual case: no Deferred to wait on)
        return idle.request(data, head_only)
    return pool.connect().addCallback(lambda connection: connection.request(data, head_only))
