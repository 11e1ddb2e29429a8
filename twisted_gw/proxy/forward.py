"""
A request sent to an upstream: the one its place is on (or, for a request
that takes no place, the next in turn), asked for a stream to assemble or
for usage where that is due, and another upstream tried when the first
cannot be reached or is loading before anything of the answer was relayed
(failover).  C{GET /v1/models} across several upstreams is their union.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from twisted_gw.admission import DOWN, LOADING, Admission, Route, Ticket
from twisted_gw.apis.assemble import ASSEMBLED_PATHS, Assembler, as_stream_request, with_usage_requested
from twisted_gw.apis.checks import GATEWAY_USER_HEADER, REQUEST_DROP, HeaderPairs, forward_headers, parse_object
from twisted_gw.apis.errors import GatewayError, bad_gateway
from twisted_gw.apis.models import model_ids, union_of_model_lists
from twisted_gw.proxy.assembly import assemble
from twisted_gw.proxy.exchange import Exchange, reason
from twisted_gw.proxy.relay import Relay, is_event_stream
from twisted_gw.upstream import BadUpstreamResponse, Upstream, discard

log = Logger(namespace="llmgw.proxy")


class _Unreachable(Exception):
    """The upstream gave no response: connection refused, reset, DNS..."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def upstream_headers(ex: Exchange) -> list[tuple[bytes, list[bytes]]]:
    """The client's headers to send on; X-Gateway-User is the gateway's to say (REQUEST_DROP has it)."""
    headers = ex.request.headers
    connection = headers.getRawHeaders(b"connection", [])
    kept = [(name, list(values)) for name, values in forward_headers(headers.getAllRawHeaders(), connection,
                                                                       REQUEST_DROP)]
    kept.append((GATEWAY_USER_HEADER, [ex.user.encode("utf-8")]))
    return kept


@attrs.define
class Forwarder:
    """
    Sends requests to C{upstreams} (by their routes in C{admission}) and relays their answers.
    C{place_again}: a new place for a request whose upstream failed, on
    another one.  C{health_checks}: a failed upstream is taken out of
    routing until a check finds it up.
    """

    upstreams: dict[Route, Upstream]
    admission: Admission
    relay: Relay
    clock: IReactorTime
    place_again: Callable[[Exchange, frozenset[Route]], Awaitable[Ticket]]
    upstream_timeout: float = 600.0
    assemble_non_stream: str = "auto"
    health_checks: bool = False

    async def forward(self, ex: Exchange) -> None:
        """Send C{ex} upstream and relay the answer."""
        headers = upstream_headers(ex)
        tried: list[Route] = []
        while True:
            route = ex.ticket.route if ex.ticket is not None else self.admission.router.any(ex.model, tried)
            assert route is not None, "a request is only sent on when an upstream is left"
            upstream = ex.upstream = self.upstreams[route]
            tried.append(route)
            try:
                response, assembler, injected_usage = await self._send(ex, upstream, headers)
            except _Unreachable as e:
                if not await self._fail_over(ex, route, tried):
                    raise bad_gateway(f"The upstream could not be reached: {reason(e.cause)}") from None
                continue
            if response.code == 503 and await self._fail_over(ex, route, tried, response):
                continue
            break
        if assembler is not None and response.code == 200 and is_event_stream(response):
            await assemble(self.relay, self.clock, ex, response, assembler)
        else:
            await self.relay.relay(ex, response, injected_usage)

    async def _send(
        self, ex: Exchange, upstream: Upstream, headers: HeaderPairs
    ) -> tuple[IResponse, Optional[Assembler], bool]:
        """The upstream's response (its head); L{_Unreachable} when none could be had."""
        body = ex.request.body
        assembler = await self._assembly_for(ex, upstream)
        injected_usage = False
        if assembler is not None:
            body = as_stream_request(parse_object(body))
        elif await self._needs_usage_injection(ex, upstream):
            body = with_usage_requested(parse_object(body))
            injected_usage = True
        if ex.stream or assembler is not None:
            # llama.cpp closes its connection after a streamed answer, though it said keep-alive: a generation
            # sent on it next would find it closed and be a 502 (a POST is never sent twice).  Asking for the
            # close makes both sides agree, and the next stream gets a connection of its own.
            headers = [*headers, (b"Connection", [b"close"])]
        try:
            sent = upstream.request(ex.request.method, ex.request.uri, headers, body or None)
        except Exception as e:  # (it fails its Deferred instead; as if it had)
            raise _Unreachable(e) from None
        ex.sent_upstream = True
        ex.deadline.set(self.upstream_timeout, "upstream_timeout")
        try:
            return await ex.wait(sent), assembler, injected_usage
        except (CancelledError, GatewayError):
            raise
        except BadUpstreamResponse as e:
            raise bad_gateway(f"The upstream's response was refused: {e}.", "upstream_bad_response") from None
        except Exception as e:
            raise _Unreachable(e) from None
        finally:
            ex.deadline.stop()

    async def _assembly_for(self, ex: Exchange, upstream: Upstream) -> Optional[Assembler]:
        """An assembler if this non-stream generation is to be sent upstream as a stream."""
        path = ex.request.path
        if (
            ex.request.method != b"POST"
            or ex.stream
            or path not in ASSEMBLED_PATHS
            or not ex.info.is_object
            or self.assemble_non_stream == "never"
        ):
            return None
        if self.assemble_non_stream == "auto" and not await self._is_llamacpp(ex, upstream):
            return None
        return Assembler(chat=ASSEMBLED_PATHS[path])

    async def _needs_usage_injection(self, ex: Exchange, upstream: Upstream) -> bool:
        """
        A stream from an upstream that sends neither C{usage} nor llama.cpp's
        C{timings} unless asked: ask it for usage, when the client did not.
        llama.cpp is never asked: it sends C{timings} anyway, and asking would
        move them off the finish chunk the client expects them on.
        """
        if not (ex.stream and ex.request.path in ASSEMBLED_PATHS and ex.info.is_object):
            return False
        if await self._is_llamacpp(ex, upstream):
            return False
        options = parse_object(ex.request.body).get("stream_options")
        return not (isinstance(options, dict) and "include_usage" in options)

    @staticmethod
    async def _is_llamacpp(ex: Exchange, upstream: Upstream) -> bool:
        if upstream.llamacpp is not None:  # (asked once)
            return upstream.llamacpp
        return await ex.wait(Deferred.fromCoroutine(upstream.is_llamacpp()))

    async def _fail_over(
        self, ex: Exchange, route: Route, tried: list[Route], response: Optional[IResponse] = None,
    ) -> bool:
        """
        Take C{route}'s upstream out of routing and get C{ex} a place on
        another one (at the head of the queue); False when no other could
        serve it.  An unwanted C{response} is dropped.
        """
        if self.health_checks:
            route.state = LOADING if response is not None else DOWN
        router = self.admission.router
        candidates = router.candidates(ex.model, tried)
        if ex.ticket is None:  # no place needed: any upstream not tried yet will do
            candidates = candidates or [r for r in router.routes if r not in tried]
        if not candidates:
            return False
        route.failovers += 1
        if response is not None:
            discard(response)
        log.warn("{user}: {upstream} failed, trying another upstream", user=ex.user, upstream=route.name)
        if ex.ticket is not None:
            ex.ticket.release()
            ex.ticket = None
            ex.ticket = await self.place_again(ex, frozenset(tried))
        else:
            self.admission.changed()  # (its health changed what may run)
        return True

    async def models_union(self, ex: Exchange) -> None:
        """C{GET /v1/models} across upstreams: every model any of them serves, once."""
        all_routes = self.admission.router.routes
        routes = [r for r in all_routes if r.routable] or list(all_routes)
        results = await ex.wait(
            DeferredList([self.upstreams[r].get_json(b"/v1/models") for r in routes], consumeErrors=True)
        )
        documents = []
        for route, (ok, value) in zip(routes, results, strict=True):
            if ok and value[0] == 200:
                documents.append(value[1])
                route.models = model_ids(value[1])
        if not documents:
            raise bad_gateway("No upstream answered with its model list.")
        body = json.dumps(union_of_model_lists(documents)).encode("utf-8")
        ex.start(200, [(b"Content-Type", [b"application/json; charset=utf-8"]),
                       (b"Content-Length", [b"%d" % len(body)])])
        ex.write(body)
