"""
Requests to one upstream through a C{treq.HTTPClient} over a persistent
connection pool, and bodies delivered to a protocol that can be stopped.

treq wraps every request in a cookie agent, a gzip decoder and (unless told
not to) a redirect follower.  For a proxy: the cookie jar stores nothing, so
no cookie travels between users; redirects are relayed, never followed; a
gzipped answer reaches the client decoded, which every client accepts.
L{BodyRelay} stops the upstream connection when a body is no longer wanted,
which is how llama.cpp learns to stop generating.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from twisted_gw.tls import certificates_from_pem

# A health check (or a model list asked for the union) that takes longer fails.
CHECK_TIMEOUT = 5.0

# llama.cpp's HTTP library closes idle keep-alive connections after 5 s; a POST is never
# retried on a stale one (twisted #7843, and RFC 9110 9.2.2), so give them up first.
CACHED_CONNECTION_TIMEOUT = 4

# An upstream response head larger than this is refused (nginx's default large buffers are 4 x 8 KB).
MAX_HEAD = 64 * 1024

# Connections kept alive beyond one per place, for the requests that take no place (model lists, checks).
SPARE_CONNECTIONS = 8

# A health check's or model list's body larger than this is not read.
MAX_CHECK_BODY = 4 * 1024 * 1024

# Header lines sent to the upstream: name and values.
HeaderPairs = Sequence[tuple[bytes, Sequence[bytes]]]


class BadUpstreamResponse(Exception):
    """The upstream answered with something no client should be given (a status out of range, a huge head)."""


def tls_policy(ca_file: Optional[str]) -> BrowserLikePolicyForHTTPS:
    """
    How https:// upstreams are verified: the chain against the system's trust
    store, or against C{ca_file} (PEM, one or more certificates) for a private
    CA; the host name always, by service_identity.
    """
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    with open(ca_file, "rb") as f:
        pem = f.read()
    certificates = certificates_from_pem(pem)
    if not certificates:
        raise ValueError(f"no certificate in {ca_file}")
    return BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(certificates))


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written as soon as the request is:
    treq's default producer for bytes goes through a Cooperator, one reactor
    turn later.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _OneEndpoint:
    """Every request of an upstream's agent goes to that upstream, whatever host its URL names."""

    endpoint: IStreamClientEndpoint

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self.endpoint


def tcp_endpoint(reactor: Any, host: str, port: int) -> IStreamClientEndpoint:
    """
    A connection to C{host}: an IP address is connected to directly (a host
    name is resolved in a thread for every connection, and a stream's
    connection is new each time: see L{twisted_gw.proxy.forward}).
    """
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port)
    return HostnameEndpoint(reactor, host, port)


def _host_value(uri: URI) -> bytes:
    """The Host header for C{uri}, as Agent computes it."""
    host = uri.host
    if isIPv6Address(host.decode("ascii")):
        host = b"[" + host + b"]"
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, uri.port)


def head_size(response: IResponse) -> int:
    """The size of a response's head as its headers would be written (status line aside)."""
    return sum(len(name) + len(value) + 4 for name, values in response.headers.getAllRawHeaders() for value in values)


def check_response(response: IResponse) -> IResponse:
    """
    C{response}, unless it is one to refuse: a status outside 100-599 (Twisted
    would pass on C{000}), or a head over L{MAX_HEAD} however it arrived.  A
    refused response's connection is closed.
    """
    if 100 <= response.code <= 599 and head_size(response) <= MAX_HEAD:
        return response
    discard(response)
    if not 100 <= response.code <= 599:
        raise BadUpstreamResponse(f"the upstream answered with the status code {response.code}")
    raise BadUpstreamResponse(f"the upstream's response head is larger than {MAX_HEAD // 1024} KB")


def discard(response: IResponse) -> None:
    """Close an unwanted response's connection without reading its body."""
    relay = stream_body(response, lambda data: None)
    relay.done.addErrback(lambda _: None)
    relay.done.cancel()


def _cookie_jar() -> Any:
    """
    A jar that accepts no cookie: treq's cookie agent then never sends one
    user's cookie for another.  (Any: treq's own annotation names a subclass
    that its older releases do not have.)
    """
    return CookieJar(DefaultCookiePolicy(allowed_domains=[]))


def without_credentials(url: str) -> tuple[str, Optional[bytes]]:
    """
    C{url} without the user and password it may carry, and those as a Basic
    C{Authorization} value (None when it has none): they are sent, never shown.
    """
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, b"Basic " + base64.b64encode(secret)


class Upstream:
    """
    Requests to one upstream base URL through a treq client and connection
    pool of its own.  A user and password in the URL are sent as Basic
    authorization (unless C{api_key} is given) and kept out of C{base_url}.
    """

    def __init__(
        self,
        reactor: Any,
        base_url: str,
        places: int = 1,
        api_key: str = "",
        ca_file: Optional[str] = None,
    ) -> None:
        self.reactor = reactor
        self.base_url, basic = without_credentials(base_url.rstrip("/"))
        self.authorization = b"Bearer " + api_key.encode("utf-8") if api_key else basic
        uri = URI.fromBytes(self.base_url.encode("ascii"))
        self._host = _host_value(uri)
        # The agent connects to this upstream whatever the URL says; the URL's host is a name that
        # never resolves, because treq's URL parser cannot take an IPv6 literal (hyperlink #68).
        self._origin = uri.scheme + b"://upstream.invalid" + uri.path
        endpoint = tcp_endpoint(reactor, uri.host.decode("ascii"), uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(tls_policy(ca_file).creatorForNetloc(uri.host, uri.port), endpoint)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.keep_connections(places)
        self.pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
        self.client = HTTPClient(
            Agent.usingEndpointFactory(reactor, _OneEndpoint(endpoint), pool=self.pool),
            cookiejar=_cookie_jar(),
            data_to_body_producer=BytesProducer,
        )
        self.llamacpp: Optional[bool] = None  # whether it is llama.cpp, once known (see is_llamacpp)

    def keep_connections(self, places: int) -> None:
        """Keep a connection alive for each of the upstream's C{places}, and some for requests that take none."""
        self.pool.maxPersistentPerHost = places + SPARE_CONNECTIONS

    def url(self, uri: bytes) -> bytes:
        """The URL treq is given for a gateway request URI (path and query, kept as sent)."""
        return self._origin + uri

    def request(
        self, method: bytes, uri: bytes, headers: HeaderPairs, body: Optional[bytes]
    ) -> Deferred[IResponse]:
        """
        Send a request (C{headers}: name and values pairs) and fire with the
        response once its head arrived; cancelling the Deferred before then
        closes the connection.  Never sent twice: Twisted's pool retries an
        idempotent request without a body on a connection found stale, and
        nothing else.  Fails with L{BadUpstreamResponse} for a response no
        client should be given.
        """
        sent = Headers()
        for name, values in headers:
            sent.setRawHeaders(name, list(values))
        sent.setRawHeaders(b"Host", [self._host])
        if self.authorization is not None:  # the upstream's own key (llama.cpp --api-key); never the client's
            sent.setRawHeaders(b"Authorization", [self.authorization])
        return self.client.request(
            method.decode("ascii"), self.url(uri), headers=sent, data=body or None,
            allow_redirects=False, unbuffered=True,
        ).addCallback(check_response)

    def get_json(self, uri: bytes, timeout: float = CHECK_TIMEOUT) -> Deferred[tuple[int, Any]]:
        """C{GET uri}: its status and JSON body (None when not JSON), within C{timeout} seconds."""
        d = Deferred.fromCoroutine(self._get_json(uri))
        return d.addTimeout(timeout, self.reactor)

    def post_json(self, uri: bytes, doc: Any, timeout: float = CHECK_TIMEOUT) -> Deferred[tuple[int, Any]]:
        """C{POST uri} with C{doc} as JSON: the status and JSON body (None when not JSON), within C{timeout} seconds."""
        body = json.dumps(doc).encode("utf-8")
        d = Deferred.fromCoroutine(self._get_json(uri, b"POST", body))
        return d.addTimeout(timeout, self.reactor)

    async def _get_json(self, uri: bytes, method: bytes = b"GET", body: Optional[bytes] = None) -> tuple[int, Any]:
        headers = [(b"Content-Type", [b"application/json"])] if body is not None else []
        response = await self.request(method, uri, headers, body)
        body = await read_body(response, MAX_CHECK_BODY)
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, None

    def learn_props(self, code: int, props: Any) -> Optional[int]:
        """
        From an answer to C{GET /props}: whether this is llama.cpp's server (it
        answers with C{total_slots}), remembered, and its slot count.
        """
        self.llamacpp = code == 200 and isinstance(props, dict) and "total_slots" in props
        slots = props["total_slots"] if self.llamacpp else None
        return slots if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0 else None

    async def is_llamacpp(self) -> bool:
        """
        Whether the upstream is llama.cpp's server: its C{GET /props} answers
        with C{total_slots}.  Remembered once known; an unreachable upstream
        counts as not llama.cpp for now and is asked again next time.
        """
        if self.llamacpp is not None:
            return self.llamacpp
        try:
            self.learn_props(*await self._get_json(b"/props"))
        except Exception:
            return False
        return bool(self.llamacpp)

    def close(self) -> Deferred[None]:
        """Close the idle connections."""
        return self.pool.closeCachedConnections()


class BodyRelay(Protocol):
    """
    Receives a response body piece by piece and hands each to C{on_data}.

    L{done} fires when the body is complete and fails if it was cut short (a
    chunked or sized body that ends early).  Cancelling L{done} closes the
    upstream connection, which is how llama.cpp learns to stop generating.
    """

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self.on_data = on_data
        self.done: Deferred[None] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        self.on_data(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self.done.called:
            return
        # (a body delimited by the connection's close ends with PotentialDataLoss: whole, as far as anyone knows)
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _cancel(self, _: Deferred[None]) -> None:
        if self.transport is not None:
            self.producer.stopProducing()

    @property
    def producer(self) -> IPushProducer:
        """The upstream side as a push producer, to pause reading when the client is slow."""
        return self.transport  # type: ignore[return-value]


def stream_body(response: IResponse, on_data: Callable[[bytes], None]) -> BodyRelay:
    """Deliver C{response}'s body to C{on_data} as it arrives."""
    relay = BodyRelay(on_data)
    response.deliverBody(relay)
    return relay


async def read_body(response: IResponse, limit: int) -> bytes:
    """A (small) body read whole; one longer than C{limit} closes the connection and fails."""
    chunks: list[bytes] = []
    size = 0
    if response.length is not UNKNOWN_LENGTH and response.length > limit:
        discard(response)
        raise BadUpstreamResponse(f"a body of {response.length} bytes, over {limit}")

    def take(data: bytes) -> None:
        nonlocal size
        size += len(data)
        chunks.append(data)
        if size > limit:
            relay.done.cancel()

    relay = stream_body(response, take)
    try:
        await relay.done
    except CancelledError:
        if size > limit:
            raise BadUpstreamResponse(f"a body of more than {limit} bytes") from None
        raise
    return b"".join(chunks)
