"""
One request's life: check it, wait for a place, send it upstream, relay the
response as it arrives, then release the place and account for it.

A client that leaves cancels its request wherever it is: waiting for a place
(removed from the queue), or in the coroutine that runs it once it has one,
at the upstream's headers (connection aborted) or the body (connection
stopped).  Timeouts and shutdown use the same path through
L{Exchange.interrupt}, with an error to report instead.  L{Proxy._settle}
releases the place and has the books kept in every case, once the answer has
been sent (see there for when).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from twisted_gw import sse
from twisted_gw.accounting import Accounting, RequestRecord
from twisted_gw.admission import Admission, QueueFull, QueueTimeout, ShuttingDown, Ticket
from twisted_gw.assemble import ASSEMBLED_PATHS, Assembler, as_stream_request, with_usage_requested
from twisted_gw.auth import UserSettings
from twisted_gw.checks import (
    GATEWAY_USER_HEADER,
    REQUEST_DROP,
    RESPONSE_DROP,
    BodyInfo,
    HeaderPairs,
    check_method,
    check_uri,
    forward_headers,
    inspect_body,
)
from twisted_gw.errors import GatewayError, bad_gateway, error_document, gateway_timeout, unavailable
from twisted_gw.keepalive import Keepalives
from twisted_gw.memory import AfterBurst
from twisted_gw.quota import Quotas
from twisted_gw.routing import DOWN, LOADING, Route, model_ids, union_of_model_lists
from twisted_gw.upstream import BadUpstreamResponse, Upstream, discard, stream_body

log = Logger(namespace="llmgw.access")

T = TypeVar("T")

# A JSON response is kept (besides being relayed) to read its usage, up to this size.
MAX_USAGE_BODY = 8 * 1024 * 1024

KEEPALIVE = sse.comment("keepalive")

SSE_HEADERS = (
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache"),
    (b"X-Accel-Buffering", b"no"),
)


@attrs.define(eq=False)
class Exchange:
    """The state of one proxied request, for relaying, interrupting and accounting."""

    request: Request
    user: str
    started: float
    info: BodyInfo = attrs.Factory(BodyInfo)
    event_stream: bool = False
    headers_sent: bool = False
    status: int = 0
    queue_wait: float = 0.0
    cancelled: bool = False
    tracker: sse.UsageTracker = attrs.Factory(sse.UsageTracker)
    current: Optional[Deferred[Any]] = None
    interrupted: Optional[GatewayError] = None
    first_token_at: Optional[float] = None
    error: Optional[str] = None
    running: bool = False  # past the queue
    ended: Optional[float] = None  # when it was settled (its books may be kept a little later)
    quota: bool = False  # its user has a token quota (its use is counted when it is settled)
    assembler: Optional[Assembler] = None  # what built its answer from a stream, until counted in its usage
    ticket: Optional[Ticket] = None
    upstream: Optional[Upstream] = None  # the one it went to (last)
    # What the upstream has left to answer by (Proxy._watch): a time, the error's code, and the one timer that
    # checks it, which only ever fires at or before that time.
    deadline: float = 0.0
    deadline_code: str = ""
    timer: Optional[IDelayedCall] = None

    @property
    def stream(self) -> bool:
        return self.info.stream

    def final_usage(self) -> sse.Usage:
        """Its usage: what it relayed, and what an assembler took in, counted as if seen event by event."""
        assembler, self.assembler = self.assembler, None
        if assembler is not None:
            self.tracker.content_chunks += assembler.tokens
            self.tracker.see_object({"usage": assembler.usage, "timings": assembler.timings})
        return self.tracker.usage

    @property
    def model(self) -> Optional[str]:
        return self.info.model

    def write(self, data: bytes) -> None:
        self.request.write(data)

    def write_keepalive(self) -> None:
        self.request.write(KEEPALIVE)

    def start_event_stream(self) -> None:
        """Send 200 and SSE response headers now, before the upstream answered."""
        self.request.setResponseCode(200)
        for name, value in SSE_HEADERS:
            self.request.setHeader(name, value)
        self.headers_sent = True
        self.event_stream = True
        self.status = 200

    def write_error_event(self, message: str, type: str, code: str) -> None:
        self.write(sse.data_event(error_document(message, type, code)))

    async def wait(self, d: Deferred[T]) -> T:
        """Await C{d}; L{interrupt} cancels it and raises its error here instead."""
        self.current = d
        try:
            return await d
        except Exception as e:
            if self.interrupted is not None:
                raise self.interrupted from None
            # Cancelling a connect surfaces as a DNS or connect error, a
            # cancelled request as ResponseNeverReceived: ask the client side.
            if self.client_gone or _is_cancellation(e):
                raise CancelledError() from None
            raise
        finally:
            self.current = None

    @property
    def client_gone(self) -> bool:
        return self.request.channel is None

    def interrupt(self, error: GatewayError) -> None:
        """Stop whatever the request waits for (a timeout, a shutdown) and report C{error}."""
        if self.interrupted is None:
            self.interrupted = error
            if self.current is not None:
                self.current.cancel()


@attrs.define
class Proxy:
    """Forwards C{/v1} requests to the upstreams through the admission queue."""

    upstreams: list[Upstream]
    admission: Admission
    accounting: Accounting
    clock: IReactorTime
    queue_events: str = "comment"
    keepalive_interval: float = 15.0
    upstream_timeout: float = 600.0
    idle_timeout: float = 300.0
    assemble_non_stream: str = "auto"
    health_checks: bool = False  # a failed upstream is taken out of routing until a check finds it up
    sinks: list[Callable[[RequestRecord], None]] = attrs.Factory(list)
    settings_for: Callable[[str], UserSettings] = lambda user: UserSettings()
    quotas: Optional[Quotas] = None
    active: set[Exchange] = attrs.Factory(set)
    # When a request's books are kept (see _settle): a request that arrives within back_to_back seconds of the last
    # one settled came back to back, and then the next books wait for the next request to be sent upstream, or for
    # books_delay; otherwise they are kept on the reactor's next turn.
    back_to_back: float = 0.0002
    books_delay: float = 0.005
    _books: list[Exchange] = attrs.Factory(list)
    _books_call: Optional[IDelayedCall] = None
    _books_soon: bool = False
    _last_settled: float = 0.0
    _busy: bool = False
    _draining: bool = False
    _idle: list[Deferred[None]] = attrs.Factory(list)
    _by_route: dict[Route, Upstream] = attrs.field(init=False)
    keepalives: Keepalives = attrs.field(init=False)
    memory: AfterBurst = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._by_route = {u.route: u for u in self.upstreams}
        self.keepalives = Keepalives(self.clock, self.keepalive_interval)
        self.memory = AfterBurst(self.clock)

    @property
    def upstream(self) -> Upstream:
        """The first upstream (the only one, usually)."""
        return self.upstreams[0]

    def handle(self, request: Request, user: str) -> Deferred[None]:
        """
        Proxy one C{/v1} request; fires when it is done, cancelling it is the
        client leaving.  The checks run now.  A request that has to wait for
        a place is only a Deferred in the queue until it gets one (thousands
        may wait); the coroutine that sends it on (L{_run}) starts then.
        """
        check_method(request.method)
        uri = check_uri(request.uri)
        body = request.content.read() if request.content is not None else b""
        ex = Exchange(request, user, self.clock.seconds(), info=inspect_body(body, request.getHeader(b"content-type")))
        self._busy = ex.started - self._last_settled < self.back_to_back
        settings = self.settings_for(user)
        self.active.add(ex)
        self.memory.seen(len(self.active))
        try:
            if self.quotas is not None and (
                settings.tokens_per_minute is not None or settings.tokens_per_day is not None
            ):  # (without a quota there are neither headers nor a refusal)
                ex.quota = True
                self._check_quota(ex, settings)
        except GatewayError:
            unreported = self._not_admitted(Failure(), ex)  # raises it when it is to be the answer
            return succeed(None) if unreported is None else fail(unreported)
        if request.method != b"POST":
            return Deferred.fromCoroutine(self._run(ex, uri, body, settings))
        waiting = self._acquire(ex, settings)
        if waiting.called and isinstance(waiting.result, Ticket):  # a place at once: nothing chained in between
            ex.ticket = waiting.result  # (what _admitted does; no keepalive was started for it)
            ex.queue_wait = self.clock.seconds() - ex.started
            return Deferred.fromCoroutine(self._run(ex, uri, body, settings))
        # (one callback pair on the queue's Deferred: each costs some 250 bytes while it waits)
        return waiting.addCallbacks(
            self._admitted, self._not_admitted, callbackArgs=(ex, uri, body, settings), errbackArgs=(ex,),
        )

    def _admitted(
        self, ticket: Ticket, ex: Exchange, uri: bytes, body: bytes, settings: UserSettings
    ) -> Deferred[None]:
        ex.ticket = self._got_place(ticket, ex)
        return Deferred.fromCoroutine(self._run(ex, uri, body, settings))

    def _not_admitted(self, failure: Failure, ex: Exchange) -> Optional[Failure]:
        """A request that never got a place (refused, timed out, its client gone): reported and settled."""
        try:
            failure = self._as_answer(failure)
            if failure.check(CancelledError):
                ex.cancelled = True
            elif isinstance(failure.value, GatewayError):
                ex.error = failure.value.code
                self._report(ex, failure.value)
                return None
            return failure
        finally:
            self._settle(ex)

    async def _run(self, ex: Exchange, uri: bytes, body: bytes, settings: UserSettings) -> None:
        """A request with its place (or one that needs none): sent on, answered, settled."""
        try:
            ex.running = True
            if ex.request.method == b"GET" and uri.partition(b"?")[0] == b"/v1/models" and len(self.upstreams) > 1:
                await self._models_union(ex)
            else:
                await self._forward(ex, uri, body, settings)
        except CancelledError:
            ex.cancelled = True
            raise
        except GatewayError as e:
            ex.error = e.code
            if self._report(ex, e):
                await self._close(ex)
        finally:
            self._settle(ex)

    def _settle(self, ex: Exchange) -> None:
        """Whatever way a request ended: its place given back, its books to be kept."""
        self._stop_keepalive(ex)
        self._unwatch(ex)
        if ex.ticket is not None:
            ex.ticket.release()
        ex.ended = self._last_settled = self.clock.seconds()
        if ex.quota and self.quotas is not None:  # (its user's next request is checked with these tokens)
            usage = ex.final_usage()
            self.quotas.used(ex.user, usage.prompt_tokens + usage.completion_tokens)
        # The other books (totals, ledger, metrics, the access line) need not hold up this answer: they are kept on
        # the reactor's next turn, once the answer is sent, while the gateway waits for the next request.  When
        # requests come back to back, that turn is when the next one comes in: then they are kept while the gateway
        # waits anyway, once the next request has been sent upstream (_send), or after books_delay if none is.
        # At once, whenever something reads them (keep_books).
        self._books.append(ex)
        if not self._busy or self._draining:
            if not self._books_soon:
                self._books_soon = True
                self.clock.callLater(0, self._books_now)
        elif self._books_call is None:
            self._books_call = self.clock.callLater(self.books_delay, self._books_due)

    def _books_now(self) -> None:
        self._books_soon = False
        self.keep_books()

    def _books_due(self) -> None:
        self._books_call = None
        self.keep_books()

    def keep_books(self) -> None:
        """Keep the books of every request settled so far: before the totals, metrics or quotas are read."""
        while self._books:
            books, self._books = self._books, []
            for ex in books:
                try:
                    self._finished(ex, ex.request)
                except Exception:
                    log.failure("Keeping the books of a request failed")
        if not self.active and self._books_call is not None:  # (idle: nothing is left for the timer)
            self._books_call.cancel()
            self._books_call = None

    def _finished(self, ex: Exchange, request: Request) -> None:
        self.active.discard(ex)
        self.memory.seen(len(self.active))
        self._account(ex, request)
        if not self.active:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def live(self) -> list[dict[str, Any]]:
        """The requests in flight, for the dashboard: who, what, for how long, how fast."""
        now = self.clock.seconds()
        streams = []
        for ex in self.active:
            if not ex.running:
                continue
            tokens = ex.tracker.content_chunks
            since = ex.first_token_at
            streams.append({
                "user": ex.user,
                "path": ex.request.uri.partition(b"?")[0].decode("ascii", "replace"),
                "stream": ex.stream,
                "elapsed_s": round(now - ex.started, 3),
                "tokens": tokens,
                "tokens_per_second": round(tokens / (now - since), 2) if since is not None and now > since else None,
                "upstream": ex.upstream.base_url if ex.upstream is not None else None,
            })
        return sorted(streams, key=lambda s: -s["elapsed_s"])

    def _report(self, ex: Exchange, e: GatewayError) -> bool:
        """
        An error after the checks: as the response if none was sent yet, else
        in the stream.  True when the response must end by closing the
        connection, without the end a complete response has: a body cut
        short (a JSON body cannot be mended; a stream gets its error event
        first) must not look whole to the client.
        """
        e.accounted = True
        if not ex.headers_sent:
            ex.status = e.status
            raise e
        log.warn("{user}: {error}", user=ex.user, error=e)
        if ex.event_stream:
            ex.write_error_event(e.message, e.type, e.code or "error")
            return e.code in CUT_SHORT
        return True

    @staticmethod
    async def _close(ex: Exchange) -> None:
        """
        Close the client's connection and wait until it is closed, so that
        the response is never finished (a finished chunked response ends with
        the terminating chunk, and would look complete).
        """
        request = ex.request
        if request.channel is None:
            return
        closed = request.notifyFinish()
        request.loseConnection()
        try:
            await closed
        except Exception:  # (the connection lost, or this wait cancelled for it: either way, closed)
            pass

    def _check_quota(self, ex: Exchange, settings: UserSettings) -> None:
        """Rate-limit headers on every response of a user with a quota; 429 when it is used up."""
        assert self.quotas is not None
        for name, value in self.quotas.headers(ex.user, settings).items():
            ex.request.setHeader(name, value)
        spent = self.quotas.exceeded(ex.user, settings)
        if spent is not None and ex.request.method == b"POST":
            raise GatewayError(
                429, f"Token quota used up: {spent.used} of {spent.limit} {spent.name.replace('_', ' ')}.",
                "rate_limit_error", "rate_limit_exceeded",
                {b"Retry-After": str(max(1, math.ceil(spent.retry_after))).encode()},
            )

    def _admit(self, ex: Exchange, settings: UserSettings, exclude: frozenset[Route] = frozenset()) -> Deferred[Ticket]:
        """
        A place on an upstream for C{ex}; C{exclude}: upstreams that failed it
        (it goes first in the queue).  Fails with the L{GatewayError} to answer.
        """
        return self._acquire(ex, settings, exclude).addCallbacks(
            self._got_place, self._no_place, callbackArgs=(ex,), errbackArgs=(ex,),
        )

    def _acquire(
        self, ex: Exchange, settings: UserSettings, exclude: frozenset[Route] = frozenset()
    ) -> Deferred[Ticket]:
        """The queue's own Deferred for a place (see L{_admit})."""
        waiting = self.admission.acquire(
            _Queued(self, ex) if ex.info.stream else None, user=ex.user, weight=settings.weight,
            max_concurrent=settings.max_concurrent, max_queued=settings.max_queued,
            model=ex.info.model, exclude=exclude, first=bool(exclude),
        )
        if not waiting.called:  # it waits: the body's parsed form is not kept meanwhile
            ex.info = ex.info.shed()
        return waiting

    def _got_place(self, ticket: Ticket, ex: Exchange) -> Ticket:
        self._stop_keepalive(ex)
        ex.queue_wait = self.clock.seconds() - ex.started
        return ticket

    def _no_place(self, failure: Failure, ex: Exchange) -> Failure:
        self._stop_keepalive(ex)
        return self._as_answer(failure)

    def _as_answer(self, failure: Failure) -> Failure:
        """The queue's refusals (full, timed out, shutting down) as the error to answer; others as they are."""
        e = failure.value
        if isinstance(e, QueueFull):
            retry = {b"Retry-After": str(self._retry_after()).encode()}
            if e.per_user:
                return Failure(GatewayError(
                    429, "You already have as many requests waiting as you may; retry later.",
                    "rate_limit_error", "user_queue_full", retry,
                ))
            return Failure(GatewayError(
                429, "The queue is full; retry later.", "rate_limit_error", "queue_full", retry,
            ))
        if isinstance(e, QueueTimeout):
            return Failure(unavailable("Timed out waiting in the queue.", "queue_timeout", self._retry_after()))
        if isinstance(e, ShuttingDown):
            return Failure(unavailable("The gateway is shutting down.", "shutting_down", 5))
        return failure

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead times the mean request time."""
        per_request = self.accounting.average_response_time() or 10.0
        ahead = self.admission.waiting + 1
        return max(1, min(600, math.ceil(per_request * ahead / max(1, self.admission.limit))))

    def _queued(self, ex: Exchange, position: int) -> None:
        first = not ex.headers_sent
        if first:
            ex.start_event_stream()
            ex.request.setHeader(b"X-Queue-Position", str(position).encode("ascii"))
            self.keepalives.add(ex, ex.write_keepalive)
        ex.write(sse.queue_position_comment(position))
        if first:
            # Sent with that first comment, the response headers are not read again: thousands of waiting
            # streams need not keep them (about 1 KB each).
            ex.request.responseHeaders = Headers()
        if self.queue_events == "data":
            ex.write(sse.queue_update_event(position))

    def _stop_keepalive(self, ex: Exchange) -> None:
        self.keepalives.discard(ex)

    @staticmethod
    def _upstream_headers(request: Request, user: str) -> list[tuple[bytes, Sequence[bytes]]]:
        """The client's headers to send on (X-Gateway-User is in REQUEST_DROP: only the gateway sets it)."""
        headers = request.requestHeaders
        kept = forward_headers(headers.getAllRawHeaders(), headers.getRawHeaders(b"connection", ()), REQUEST_DROP)
        kept.append((GATEWAY_USER_HEADER, [user.encode("utf-8")]))
        return kept

    async def _assembly_for(self, ex: Exchange, upstream: Upstream, uri: bytes, info: BodyInfo) -> Optional[Assembler]:
        """An assembler if this non-streaming generation is to be sent upstream as a stream."""
        path = uri.partition(b"?")[0]
        if (
            ex.request.method != b"POST"
            or info.stream
            or path not in ASSEMBLED_PATHS
            or not isinstance(info.document, dict)
            or self.assemble_non_stream == "never"
        ):
            return None
        if self.assemble_non_stream == "auto":
            llamacpp = upstream.llamacpp  # (asked once: no coroutine per request)
            if not (await self._ask_llamacpp(ex, upstream) if llamacpp is None else llamacpp):
                return None
        return Assembler(chat=ASSEMBLED_PATHS[path])

    async def _needs_usage_injection(self, ex: Exchange, upstream: Upstream, uri: bytes, info: BodyInfo) -> bool:
        """
        A stream from an upstream that sends neither C{usage} nor llama.cpp's
        C{timings} unless asked: ask it for usage, when the client did not.
        llama.cpp is never asked: it sends C{timings} anyway, and asking would
        move them off the finish chunk the client expects them on.
        """
        if not (ex.stream and uri.partition(b"?")[0] in ASSEMBLED_PATHS and isinstance(info.document, dict)):
            return False
        options = info.document.get("stream_options")
        if isinstance(options, dict) and "include_usage" in options:
            return False
        llamacpp = upstream.llamacpp  # (asked once: no coroutine per request)
        return not (await self._ask_llamacpp(ex, upstream) if llamacpp is None else llamacpp)

    @staticmethod
    async def _ask_llamacpp(ex: Exchange, upstream: Upstream) -> bool:
        """Whether C{upstream} is llama.cpp, not known yet: asked (see L{Upstream.is_llamacpp})."""
        return await ex.wait(Deferred.fromCoroutine(upstream.is_llamacpp()))

    async def _forward(self, ex: Exchange, uri: bytes, body: bytes, settings: UserSettings) -> None:
        """
        Send the request upstream and relay the answer.  An upstream that
        cannot be reached, or answers 503 (loading), before anything of it was
        relayed is left for another that may serve the request (failover).
        """
        info = ex.info = ex.info.reparsed(body)
        headers = self._upstream_headers(ex.request, ex.user)
        tried: list[Route] = []
        while True:
            route = ex.ticket.route if ex.ticket is not None else self.admission.router.any(ex.model, tried)
            assert route is not None, "a request is only sent on when an upstream is left"
            upstream = ex.upstream = self._by_route[route]
            tried.append(route)
            try:
                response, assembler, injected_usage = await self._send(ex, upstream, uri, body, info, headers)
            except _Unreachable as e:
                if not await self._fail_over(ex, upstream, tried, settings):
                    raise bad_gateway(f"The upstream could not be reached: {_reason(e.cause)}") from None
                continue
            if response.code == 503 and await self._fail_over(ex, upstream, tried, settings, response):
                continue
            break
        if assembler is not None and response.code == 200 and _is_event_stream(response):
            await self._assemble(ex, response, assembler)
        else:
            await self._relay(ex, response, injected_usage)

    async def _send(
        self, ex: Exchange, upstream: Upstream, uri: bytes, body: bytes, info: BodyInfo, headers: HeaderPairs
    ) -> tuple[IResponse, Optional[Assembler], bool]:
        """The upstream's response (headers); L{_Unreachable} when it could not be had."""
        assembler = await self._assembly_for(ex, upstream, uri, info)
        injected_usage = False
        if assembler is not None:
            body = as_stream_request(info.document)
        elif await self._needs_usage_injection(ex, upstream, uri, info):
            body = with_usage_requested(info.document)
            injected_usage = True
        try:
            sent = upstream.request(ex.request.method, uri, headers, body or None)
        except Exception as e:  # (it fails its Deferred instead; as if it had)
            raise _Unreachable(e) from None
        # (set once the request is on its way: not between the client and the upstream; the timer then watches
        # the body too, see _receive)
        self._watch(ex, self.upstream_timeout, "upstream_timeout")
        if self._books:
            self.keep_books()  # (while the upstream works: the gateway would only wait)
        try:
            return await ex.wait(sent), assembler, injected_usage
        except (CancelledError, GatewayError):
            raise
        except BadUpstreamResponse as e:
            raise bad_gateway(f"The upstream's response was refused: {e}.", "upstream_bad_response") from None
        except Exception as e:
            raise _Unreachable(e) from None  # (the timer is dropped by the failover, or when it settles)

    async def _fail_over(
        self, ex: Exchange, upstream: Upstream, tried: list[Route], settings: UserSettings,
        response: Optional[IResponse] = None,
    ) -> bool:
        """
        Take C{upstream} out of routing and get C{ex} a place on another one
        (at the head of the queue); False when no other could serve it.  An
        unwanted C{response} is dropped.
        """
        self._unwatch(ex)  # (no timeout while it waits for another place)
        if self.health_checks:
            upstream.failed(LOADING if response is not None else DOWN)
        candidates = self.admission.router.candidates(ex.model, tried)
        if ex.ticket is None:  # no place needed: any upstream not tried yet will do
            candidates = candidates or [r for r in self.admission.router.routes if r not in tried]
        if not candidates:
            return False
        upstream.route.failovers += 1
        if response is not None:
            discard(response)
        log.warn("{user}: {upstream} failed, trying another upstream", user=ex.user, upstream=upstream.base_url)
        if ex.ticket is not None:
            ex.ticket.release()
            ex.ticket = None
            ex.ticket = await self._admit(ex, settings, exclude=frozenset(tried))
        else:
            self.admission.changed()
        return True

    async def _models_union(self, ex: Exchange) -> None:
        """C{GET /v1/models} across upstreams: every model any of them serves, once."""
        upstreams = [u for u in self.upstreams if u.route.routable] or self.upstreams
        results = await ex.wait(
            DeferredList([u.get_json(b"/v1/models") for u in upstreams], consumeErrors=True)
        )
        documents = []
        for upstream, (ok, value) in zip(upstreams, results, strict=True):
            if ok and value[0] == 200:
                documents.append(value[1])
                upstream.route.models = model_ids(value[1])
        if not documents:
            raise bad_gateway("No upstream answered with its model list.")
        body = json.dumps(union_of_model_lists(documents)).encode("utf-8")
        ex.request.setResponseCode(200)
        ex.request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        ex.request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        ex.headers_sent = True
        ex.status = 200
        ex.request.write(body)

    @staticmethod
    def _passed_headers(response: IResponse, drop: frozenset[bytes] = RESPONSE_DROP) -> HeaderPairs:
        """The upstream's response headers that go on to the client."""
        return forward_headers(response.headers.getAllRawHeaders(), (), drop)

    def _copy_response_headers(self, ex: Exchange, status: int, headers: HeaderPairs) -> None:
        """
        The client's response gets C{status}, with Twisted's own reason phrase
        (never the upstream's text), and C{headers} (L{_passed_headers}).
        """
        request = ex.request
        request.setResponseCode(status)
        for name, values in headers:
            request.responseHeaders.setRawHeaders(name, list(values))
        ex.headers_sent = True
        ex.status = status

    async def _receive(
        self, ex: Exchange, response: IResponse, on_data: Any, producer: bool,
        on_end: Optional[Callable[[None], None]] = None,
    ) -> None:
        """
        Deliver the upstream body to C{on_data}, under the idle timeout;
        cancellable.  C{on_end} is called as soon as the body is complete,
        before this returns (it must not raise).
        """
        self._watch(ex, self.idle_timeout, "idle_timeout")
        clock = self.clock
        idle_timeout = self.idle_timeout

        def received(data: bytes) -> None:
            ex.deadline = clock.seconds() + idle_timeout  # (the timer finds it when it fires)
            on_data(data)

        relay = stream_body(response, received)
        if on_end is not None:
            relay.done.addCallback(on_end)
        if producer:
            ex.request.registerProducer(relay.producer, True)
        try:
            await ex.wait(relay.done)
        except (CancelledError, GatewayError):
            raise
        except Exception as e:
            raise GatewayError(
                502, f"The upstream connection broke mid-response: {_reason(e)}", "upstream_error",
                "upstream_disconnected",
            ) from None
        finally:
            self._unwatch(ex)
            if producer and ex.request.channel is not None:
                ex.request.unregisterProducer()

    async def _assemble(self, ex: Exchange, response: IResponse, assembler: Assembler) -> None:
        """Read the upstream's stream whole, then answer with the JSON it stands for."""
        parser = sse.SSEParser()

        def on_data(data: bytes) -> None:
            for event in parser.feed(data):
                if event != b"[DONE]" and not assembler.feed_event(event):  # (read once, for the answer and usage)
                    ex.tracker.see_event(event)  # not JSON (whatever it may count)
            if ex.first_token_at is None and (assembler.tokens or ex.tracker.content_chunks):
                ex.first_token_at = self.clock.seconds()

        # The answer goes out as soon as the body is complete, in the call that completes it: before the
        # coroutine is resumed and the body's timer and delivery are wound down.  The headers passed on are picked
        # now, while the upstream still generates.
        headers = self._passed_headers(response, ASSEMBLED_DROP)
        answered: list[Optional[Failure]] = []

        def answer(result: None) -> None:
            try:
                self._answer_assembled(ex, assembler, headers)
            except Exception:  # (raised below, as if the answer were written here)
                answered.append(Failure())
            else:
                answered.append(None)
            return result

        # What the assembler takes in is counted in the request's usage when that is read (Exchange.final_usage),
        # so that a stream that broke off counts too.
        ex.assembler = assembler
        await self._receive(ex, response, on_data, producer=False, on_end=answer)
        failed = answered[0] if answered else None
        if failed is not None:
            failed.raiseException()

    def _answer_assembled(self, ex: Exchange, assembler: Assembler, headers: HeaderPairs) -> None:
        """The JSON answer the assembled stream stands for, with its status and headers, written."""
        body = assembler.body()
        status = 200
        if assembler.error is not None:
            code = assembler.error.get("code")
            status = code if isinstance(code, int) and 400 <= code <= 599 else 500
        self._copy_response_headers(ex, status, headers)
        ex.request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        ex.request.setHeader(b"Content-Length", b"%d" % len(body))
        ex.request.write(body)

    def _stamp_first_token(self, ex: Exchange) -> None:
        if ex.first_token_at is None and ex.tracker.content_chunks:
            ex.first_token_at = self.clock.seconds()

    async def _relay(self, ex: Exchange, response: IResponse, injected_usage: bool = False) -> None:
        request = ex.request
        event_stream = _is_event_stream(response)
        if ex.headers_sent and response.code >= 400:
            # We promised a 200 event stream while queued; say it in the stream.
            await self._relay_error_as_event(ex, response)
            return
        if not ex.headers_sent:
            self._copy_response_headers(ex, response.code, self._passed_headers(response))
            if event_stream:
                for name, value in SSE_HEADERS[1:]:
                    request.setHeader(name, value)
            ex.event_stream = event_stream
            request.write(b"")  # the headers go out now, as the upstream's did, not with the first chunk to come

        kept: list[bytes] = []
        # only generations (POST) report usage: a model list is not kept to be parsed
        size = 0 if request.method == b"POST" else MAX_USAGE_BODY + 1
        parser = sse.SSEParser()
        # The client did not ask for usage but the gateway did: take out what it added.
        strip = sse.UsageStripper().feed if injected_usage and event_stream else None

        def on_data(data: bytes) -> None:
            nonlocal size
            request.write(strip(data) if strip is not None else data)
            if event_stream:
                for event in parser.feed(data):
                    ex.tracker.see_event(event)
                if ex.first_token_at is None:
                    self._stamp_first_token(ex)
                return
            if ex.first_token_at is None and ex.status < 400:
                ex.first_token_at = self.clock.seconds()
            if size <= MAX_USAGE_BODY:
                size += len(data)
                kept.append(data)

        await self._receive(ex, response, on_data, producer=True)
        if not event_stream and size <= MAX_USAGE_BODY:
            ex.tracker.see_body(b"".join(kept))

    def _watch(self, ex: Exchange, seconds: float, code: str) -> None:
        """
        Interrupt C{ex} with C{code} (L{_timed_out}) C{seconds} from now,
        unless it is watched again (a new deadline) or no more (L{_unwatch})
        before then.  One timer per request, set once: moving the deadline
        later (each piece of the body does) only changes C{ex.deadline}, which
        the timer reads when it fires.  It is first set no later than the idle
        timeout, so that the body's deadlines never come before it.
        """
        now = self.clock.seconds()
        ex.deadline = now + seconds
        ex.deadline_code = code
        if ex.timer is None:
            ex.timer = self.clock.callLater(min(seconds, self.idle_timeout), self._deadline_reached, ex)
        elif ex.timer.getTime() > ex.deadline:  # (sooner than it was set for: not the usual order)
            ex.timer.reset(seconds)

    def _unwatch(self, ex: Exchange) -> None:
        timer, ex.timer = ex.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _deadline_reached(self, ex: Exchange) -> None:
        """The timer fired: the request timed out, unless its deadline moved on since it was set."""
        ex.timer = None
        left = ex.deadline - self.clock.seconds()
        if left > 0:
            ex.timer = self.clock.callLater(left, self._deadline_reached, ex)
        else:
            self._timed_out(ex, ex.deadline_code)

    def _timed_out(self, ex: Exchange, code: str) -> None:
        """A timeout ran out (the error is only made then: most requests never need it)."""
        if code == "upstream_timeout":
            message = f"The upstream sent no response within {self.upstream_timeout:g} s."
        else:
            message = f"The upstream was silent for {self.idle_timeout:g} s."
        ex.interrupt(gateway_timeout(message, code))

    async def _relay_error_as_event(self, ex: Exchange, response: IResponse) -> None:
        chunks: list[bytes] = []
        try:
            await self._receive(ex, response, chunks.append, producer=False)
        except GatewayError as e:
            if e.code != "upstream_disconnected":
                raise
        text = b"".join(chunks)[:65536].decode("utf-8", "replace")
        message = f"The upstream answered {response.code}"
        try:
            upstream_message = json.loads(text)["error"]["message"]
            message = f"{message}: {upstream_message}"
        except (ValueError, KeyError, TypeError):
            if text.strip():
                message = f"{message}: {text.strip()[:500]}"
        ex.error = f"upstream_{response.code}"
        ex.write_error_event(message, "upstream_error", ex.error)

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Shut down gracefully: refuse the queue, let running requests finish for
        up to C{timeout} seconds, then interrupt those still running.
        """
        self.admission.close()
        self.memory.stop()
        self._draining = True
        self.keep_books()
        if self._books_call is not None:  # (set for books_delay: from now on books are kept on the next turn)
            self._books_call.cancel()
            self._books_call = None
        if not self.active:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._idle.append(done)

        def cut_off() -> None:
            for ex in list(self.active):
                ex.interrupt(unavailable("The gateway is shutting down.", "shutting_down", 5))

        timer = self.clock.callLater(timeout, cut_off)

        def finished(result: None) -> None:
            if timer.active():
                timer.cancel()

        return done.addCallback(finished)

    def _account(self, ex: Exchange, request: Request) -> None:
        """Record the finished request with every sink (totals, ledger, Prometheus) and log it."""
        now = self.clock.seconds() if ex.ended is None else ex.ended
        usage = ex.final_usage()
        if not ex.quota and self.quotas is not None:  # (counted when it was settled otherwise)
            self.quotas.used(ex.user, usage.prompt_tokens + usage.completion_tokens)
        ttft = None if ex.first_token_at is None else ex.first_token_at - ex.started
        generating = None if ex.first_token_at is None else now - ex.first_token_at
        speed = usage.completion_tokens / generating if generating and usage.completion_tokens else None
        record = RequestRecord(
            user=ex.user,
            method=request.method.decode("ascii", "replace"),
            path=request.uri.partition(b"?")[0].decode("ascii", "replace"),
            status=ex.status,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            duration=now - ex.started,
            queue_wait=ex.queue_wait,
            cancelled=ex.cancelled,
            usage_source=usage.source,
            model=ex.model,
            ttft=ttft,
            tokens_per_second=speed,
            error=ex.error,
        )
        self.accounting.record(record)
        for sink in self.sinks:
            sink(record)
        log.info(
            "{method} {path} {status} user={user} wait={queue_wait:.3f}s time={duration:.3f}s "
            "tokens={prompt_tokens}+{completion_tokens}{note}",
            method=record.method, path=record.path, status=record.status, user=record.user,
            model=record.model, queue_wait=record.queue_wait, ttft=record.ttft, duration=record.duration,
            prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
            tokens_per_second=record.tokens_per_second, usage_source=record.usage_source,
            cancelled=record.cancelled, error=record.error,
            note=(" (cancelled)" if record.cancelled else "") + (
                " (estimated)" if record.usage_source == "estimate" else ""),
        )


# Errors that cut an upstream body short: the client's response is closed, never finished.
CUT_SHORT = frozenset({"upstream_disconnected", "idle_timeout"})

# The assembled answer has a length and type of its own.
ASSEMBLED_DROP = RESPONSE_DROP | {b"content-type", b"content-length", b"cache-control", b"x-accel-buffering"}


class _Queued:
    """Tells a waiting stream its queue position (a partial would take five times the memory)."""

    __slots__ = ("ex", "proxy")

    def __init__(self, proxy: Proxy, ex: Exchange) -> None:
        self.proxy = proxy
        self.ex = ex

    def __call__(self, position: int) -> None:
        self.proxy._queued(self.ex, position)


class _Unreachable(Exception):
    """The upstream gave no response: connection refused, reset, DNS..."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _is_event_stream(response: IResponse) -> bool:
    content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
    return content_type.lower().startswith(b"text/event-stream")


def log_refused(request: Request, user: Optional[str], error: GatewayError) -> None:
    """The access-log event of a request refused before it was proxied (bad key, bad input)."""
    log.info(
        "{method} {path} {status} user={user} refused: {error}",
        method=request.method.decode("ascii", "replace"),
        path=request.uri.partition(b"?")[0].decode("ascii", "replace"),
        status=error.status, user=user, error=error.code, cancelled=False,
    )


def _is_cancellation(e: BaseException) -> bool:
    """A cancelled Deferred, possibly wrapped by the HTTP client (ResponseNeverReceived)."""
    if isinstance(e, CancelledError):
        return True
    reasons = getattr(e, "reasons", None) or ()
    return any(getattr(r, "check", lambda *_: False)(CancelledError) for r in reasons)


def _reason(e: BaseException) -> str:
    """A short human reason, unwrapping Twisted's wrapper exceptions."""
    inner = getattr(e, "reasons", None)
    if inner:
        first = inner[0]
        return _reason(getattr(first, "value", first))
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:300]
