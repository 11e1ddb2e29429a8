"""
The upstream side: requests to one upstream over a pool of kept-alive
connections (L{twisted_gw.httpclient}), body delivery to a protocol that can
be stopped, and the checks that keep the upstream's L{Route} up to date.

Neither treq nor Agent carries the proxied requests.  treq wraps every request
in a shared cookie jar, a redirect follower and a gzip decoder, all of which a
transparent proxy must not do (a cookie set for one user would be sent on
another's request), and Agent's layers cost more than the rest of the gateway
per relayed chunk (see L{twisted_gw.httpclient}).  L{BodyRelay} stops the
upstream connection when a body is no longer wanted, which is how llama.cpp
learns to stop generating.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Optional, cast

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer, IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    BrowserLikePolicyForHTTPS,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from twisted_gw.httpclient import ConnectionPool, RawHeaders, send
from twisted_gw.routing import DOWN, LOADING, OK, Route, model_ids
from twisted_gw.tls import certificates_from_pem

# A health check (or a model list asked for the union) that takes longer fails.
CHECK_TIMEOUT = 5.0

# llama.cpp's HTTP library closes idle keep-alive connections after 5 s; a POST
# is never retried on a stale one (twisted #7843), so give them up first.
CACHED_CONNECTION_TIMEOUT = 4


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


def _stale_connection(e: Exception) -> bool:
    """
    The signature of twisted #7843: a kept-alive connection that the upstream
    closed as idle just as the request went out.  The request was not
    processed: nothing came back, the connection was closed cleanly or lost.
    """
    if isinstance(e, (RequestNotSent, RequestTransmissionFailed)):
        return True
    if isinstance(e, ResponseNeverReceived):
        return all(r.check(ConnectionDone, ConnectionLost) for r in e.reasons)
    return False


def _host_value(uri: URI) -> bytes:
    """The Host header for C{uri}, as Agent computes it."""
    host = uri.host
    if isIPv6Address(host.decode("ascii")):
        host = b"[" + host + b"]"
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, uri.port)


class Upstream:
    """
    Requests to one upstream base URL over a connection pool of its own, and
    the checks that keep its L{Route} (health, slots, models) up to date.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        base_url: str,
        max_connections: int = 8,
        api_key: str = "",
        ca_file: Optional[str] = None,
        slots: Optional[int] = None,
    ) -> None:
        self.reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.route = Route(self.base_url, slots=slots)
        self._authorization: Optional[tuple[bytes, list[bytes]]] = (
            (b"Authorization", [b"Bearer " + api_key.encode("utf-8")]) if api_key else None
        )
        uri = URI.fromBytes(self.base_url.encode("ascii"))
        self._prefix = uri.path
        self._host = _host_value(uri)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, uri.host.decode("ascii"), uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(tls_policy(ca_file).creatorForNetloc(uri.host, uri.port), endpoint)
        self.pool = ConnectionPool(
            cast(IReactorTime, reactor), endpoint, max_connections, CACHED_CONNECTION_TIMEOUT
        )
        self.retries = 0
        self.llamacpp: Optional[bool] = None  # whether it is llama.cpp, once known (see is_llamacpp)

    def url(self, uri: bytes) -> bytes:
        """The upstream URL for a gateway request URI (path and query, kept as sent)."""
        return self.base_url.encode("ascii") + uri

    def request(
        self, method: bytes, uri: bytes, headers: RawHeaders, body: Optional[bytes]
    ) -> Deferred[IResponse]:
        """
        Send a request (C{headers}: name and values pairs, left as they are);
        fires with the response once its headers arrived.  Cancellable.  A
        request that failed on a reused keep-alive connection without any
        answer is sent once more on a new one: POSTs included, which Twisted's
        pool never retries itself.
        """
        target = self._prefix + uri
        if self._authorization is not None:
            # the upstream's own key (llama.cpp --api-key); never the client's
            headers = [*(h for h in headers if h[0].lower() != b"authorization"), self._authorization]
        d = send(self.pool, method, target, self._host, headers, body)
        reused = self.pool.reused

        def retry(failure: Failure) -> Any:
            if not (reused and _stale_connection(failure.value)):  # type: ignore[arg-type]
                return failure
            self.retries += 1
            return send(self.pool, method, target, self._host, headers, body)

        # a plain errback, not a coroutine: cancelling d reaches the retry's Deferred too
        return d.addErrback(retry)

    def get_json(self, uri: bytes, timeout: float = CHECK_TIMEOUT) -> Deferred[tuple[int, Any]]:
        """C{GET uri}: its status and JSON body (None when not JSON), within C{timeout} seconds."""
        d = Deferred.fromCoroutine(self._get_json(uri))
        return d.addTimeout(timeout, cast(IReactorTime, self.reactor))

    async def _get_json(self, uri: bytes) -> tuple[int, Any]:
        response = await self.request(b"GET", uri, (), None)
        chunks: list[bytes] = []
        await stream_body(response, chunks.append).done
        try:
            return response.code, json.loads(b"".join(chunks))
        except ValueError:
            return response.code, None

    def check(self) -> Deferred[None]:
        """
        Update the route: healthy when C{GET /health} answers 200 (or, for a
        server without C{/health}, C{GET /v1/models} does), loading on 503,
        down on anything else; when healthy, its models, and llama.cpp's
        slot count when it has just come up.  Never fails.
        """
        return Deferred.fromCoroutine(self._check())

    async def _check(self) -> None:
        route = self.route
        was = route.state
        try:
            code, _ = await self.get_json(b"/health")
            if code in (404, 405):  # no /health here (an OpenAI-style server): the model list will do
                code, _ = await self.get_json(b"/v1/models")
            state = OK if code == 200 else LOADING if code == 503 else DOWN
            if state == OK:
                if was != OK or route.discovered is None:
                    # (re)started: it may have another build, other slots
                    route.discovered = await self._read_props()
                code, doc = await self.get_json(b"/v1/models")
                if code == 200:
                    route.models = model_ids(doc)
        except Exception:
            state = DOWN
        route.state = state

    async def _read_props(self) -> Optional[int]:
        """The slot count from C{GET /props} (within the check timeout); raises when unreachable."""
        return self._learn_props(*await self.get_json(b"/props"))

    def _learn_props(self, code: int, props: Any) -> Optional[int]:
        """
        From an answer to C{GET /props}: whether this is llama.cpp's server (it
        answers with C{total_slots}), remembered, and its slot count.
        """
        self.llamacpp = code == 200 and isinstance(props, dict) and "total_slots" in props
        slots = props["total_slots"] if self.llamacpp else None
        return slots if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0 else None

    def failed(self, state: str = DOWN) -> None:
        """A request found it down (or loading): out of routing until a check finds it up."""
        self.route.state = state

    async def is_llamacpp(self) -> bool:
        """
        Whether the upstream is llama.cpp's server: its C{GET /props} answers
        with C{total_slots}.  Remembered once known; an unreachable upstream
        counts as not llama.cpp for now and is asked again next time.
        """
        if self.llamacpp is not None:
            return self.llamacpp
        try:
            self._learn_props(*await self._get_json(b"/props"))
        except Exception:
            return False
        return bool(self.llamacpp)

    def close(self) -> Deferred[None]:
        return self.pool.close()


class BodyRelay(Protocol):
    """
    Receives a response body chunk by chunk and hands each to C{on_data}.

    L{done} fires when the body is complete and errbacks if it was cut short.
    Cancelling L{done} closes the upstream connection, which is how llama.cpp
    learns to stop generating.
    """

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self._on_data = on_data
        self.done: Deferred[None] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        self._on_data(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self.done.called:
            return
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):  # (Failure.check builds names)
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
    relay = BodyRelay(on_data)
    response.deliverBody(relay)
    return relay
