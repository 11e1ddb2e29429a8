"""
One request's life: check it, take a place (waiting in the queue if need
be), send it upstream and relay the answer as it arrives, then give the
place back and hand its books off.

A request is one coroutine (L{Proxy._run}).  A client that leaves cancels it
wherever it is: waiting for a place (it leaves the queue), for the
upstream's head (the connection is closed) or in the body (the connection is
stopped, which is how llama.cpp learns to stop generating).  Timeouts and a
shutdown take the same path through L{Exchange.interrupt}, with an error to
report instead.  L{Proxy._settle} gives the place back and hands the books
off in every case.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_gw.admission import Admission, Route, UserSettings
from twisted_gw.admission.keepalive import Keepalives
from twisted_gw.admission.quota import Quotas
from twisted_gw.apis.checks import check_method, check_uri, inspect_body
from twisted_gw.apis.errors import GatewayError, gateway_timeout, unavailable
from twisted_gw.apis.kinds import takes_a_place
from twisted_gw.proxy.books import Books, Sink, log_refused
from twisted_gw.proxy.client import ClientRequest, IClientResponse
from twisted_gw.proxy.exchange import Deadline, Exchange
from twisted_gw.proxy.forward import Forwarder
from twisted_gw.proxy.memory import AfterBurst
from twisted_gw.proxy.places import Places
from twisted_gw.proxy.prompts import PromptCounter, needs_prompt_count
from twisted_gw.proxy.relay import Relay
from twisted_gw.upstream import Upstream

log = Logger(namespace="llmgw.proxy")

# Errors that cut an upstream body short: the client's response is closed, never finished.
CUT_SHORT = frozenset({"upstream_disconnected", "idle_timeout"})


@attrs.define
class Proxy:
    """
    Forwards C{/v1} requests to the upstreams (one per route of
    C{admission}'s router, in C{upstreams}) through the admission queue.
    """

    upstreams: dict[Route, Upstream]
    admission: Admission
    clock: IReactorTime
    quotas: Quotas
    settings_for: Callable[[str], UserSettings] = lambda user: UserSettings()
    mean_duration: Callable[[], float] = lambda: 0.0
    queue_events: str = "comment"
    keepalive_interval: float = 15.0
    upstream_timeout: float = 600.0
    idle_timeout: float = 300.0
    assemble_non_stream: str = "auto"
    health_checks: bool = False  # a failed upstream is taken out of routing until a check finds it up
    active: set[Exchange] = attrs.Factory(set)
    counting: set[Exchange] = attrs.Factory(set)  # ended, their books waiting for their prompt to be counted
    prompt_counter: PromptCounter = attrs.Factory(PromptCounter)
    books: Books = attrs.field(init=False)
    places: Places = attrs.field(init=False)
    forwarder: Forwarder = attrs.field(init=False)
    memory: AfterBurst = attrs.field(init=False)
    _idle: list[Deferred[None]] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        self.books = Books(self.clock)
        self.places = Places(self.admission, self.quotas, Keepalives(self.clock, self.keepalive_interval),
                             self.mean_duration, self.queue_events)
        self.forwarder = Forwarder(
            self.upstreams, self.admission, Relay(self.clock, self.idle_timeout), self.clock, self.places.take,
            upstream_timeout=self.upstream_timeout, assemble_non_stream=self.assemble_non_stream,
            health_checks=self.health_checks,
        )
        self.memory = AfterBurst(self.clock)

    @property
    def sinks(self) -> list[Sink]:
        """Where finished requests' records go (totals, ledger, Prometheus)."""
        return self.books.sinks

    def handle(self, request: ClientRequest, response: IClientResponse, user: str) -> Deferred[None]:
        """
        Proxy one C{/v1} request for C{user}: its checks now (they raise the
        L{GatewayError} to answer), the rest in a coroutine, whose Deferred
        fires when the request is done; cancelling it is the client leaving.
        """
        check_method(request.method)
        check_uri(request.uri)
        info = inspect_body(request.body, request.header(b"content-type"))
        now = self.clock.seconds()
        ex = Exchange(request, response, user, self.settings_for(user), now, info)
        ex.deadline = Deadline(self.clock, partial(self._timed_out, ex))
        self.active.add(ex)
        self.memory.seen(len(self.active))
        return Deferred.fromCoroutine(self._run(ex))

    async def _run(self, ex: Exchange) -> None:
        try:
            await self.places.check_quota(ex)
            if takes_a_place(ex.request.method, ex.request.path):  # (a model list, count_tokens: no place)
                ex.ticket = await self.places.take(ex)
            ex.running = True
            if ex.request.method == b"GET" and ex.request.path == b"/v1/models" and len(self.upstreams) > 1:
                await self.forwarder.models_union(ex)
            else:
                await self.forwarder.forward(ex)
        except CancelledError:
            ex.cancelled = True
            raise
        except GatewayError as e:
            ex.error = e.code
            if self._report(ex, e):
                await ex.response.close()
        finally:
            self._settle(ex)

    def _report(self, ex: Exchange, e: GatewayError) -> bool:
        """
        An error after the checks: raised, to be the answer, if none was sent
        yet; else said in the stream.  True when the response must end by
        closing the connection, without the end a complete response has: a
        body cut short (a JSON body cannot be mended; a stream gets its error
        event first) must not look whole to the client.
        """
        e.accounted = True
        if not ex.headers_sent:
            ex.status = e.status
            raise e
        log.warn("{user}: {error}", user=ex.user, error=e)
        if ex.event_stream:
            ex.write_error_event(e.message, e.type, e.code or "error", e.status)
            return e.code in CUT_SHORT
        return True

    def _settle(self, ex: Exchange) -> None:
        """
        However a request ended: its place given back, its tokens counted in
        its quota, its books handed off; for one that ended before its upstream
        told the prompt it read, once the prompt is counted.
        """
        self.places.keepalives.discard(ex)
        ex.deadline.stop()
        if ex.ticket is not None:
            ex.ticket.release()
        ended = self.clock.seconds()
        if needs_prompt_count(ex, ex.final_usage()):
            self.counting.add(ex)
            counted = self.prompt_counter.count(ex)
            counted.addCallback(lambda found: setattr(ex, "counted_prompt", found))
            counted.addErrback(lambda f: log.failure("counting the prompt of {user}'s request", f, user=ex.user))
            counted.addBoth(lambda _: self._charge(ex, ended))
        else:
            self._charge(ex, ended)
        self.active.discard(ex)
        self.memory.seen(len(self.active))
        self._maybe_idle()

    def _charge(self, ex: Exchange, ended: float) -> None:
        usage = ex.final_usage()
        self.quotas.used(ex.user, usage.prompt_tokens + usage.completion_tokens)
        cached = ex.tracker.cached
        if ex.ticket is not None and cached is not None and usage.prompt_tokens and usage.source != "estimate":
            ex.ticket.route.prompt_tokens += usage.prompt_tokens  # (its cache hit rate, on the dashboard)
            ex.ticket.route.cached_tokens += min(cached, usage.prompt_tokens)
        self.books.hand_off(ex, ended)
        if ex in self.counting:
            self.counting.discard(ex)
            if not self.active and not self.counting and self._idle:
                self._now_idle()  # (its answer was finished long ago)

    def _maybe_idle(self) -> None:
        if not self.active and not self.counting and self._idle:
            self.clock.callLater(0, self._now_idle)  # (once this answer is finished: its web layer finishes it next)

    def _now_idle(self) -> None:
        if self.active or self.counting:
            return
        self.books.keep()
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)

    def _timed_out(self, ex: Exchange, code: str) -> None:
        """A deadline passed (the error is only made then: most requests never need it)."""
        if code == "upstream_timeout":
            message = f"The upstream sent no response within {self.upstream_timeout:g} s."
        else:
            message = f"The upstream was silent for {self.idle_timeout:g} s."
        ex.interrupt(gateway_timeout(message, code))

    def refused(self, request: ClientRequest, user: str | None, error: GatewayError) -> None:
        """A request refused before it was proxied (a bad key, bad input): its access line, after earlier ones."""
        self.books.keep()
        log_refused(request, user, error)

    def keep_books(self) -> None:
        """Keep the books of every request settled so far: before the totals, metrics or quotas are read."""
        self.books.keep()

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
                "path": ex.request.path.decode("ascii", "replace"),
                "stream": ex.stream,
                "elapsed_s": round(now - ex.started, 3),
                "tokens": tokens,
                "tokens_per_second": round(tokens / (now - since), 2) if since is not None and now > since else None,
                "upstream": ex.upstream.base_url if ex.upstream is not None else None,
            })
        return sorted(streams, key=lambda s: -s["elapsed_s"])

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Shut down gracefully: refuse the queue, let running requests finish for
        up to C{timeout} seconds, then interrupt those still running.
        """
        self.admission.close()
        self.memory.stop()
        self.books.keep()
        if not self.active and not self.counting:
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
