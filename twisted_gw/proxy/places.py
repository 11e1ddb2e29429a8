"""
A request's place on an upstream: its user's token quota checked, then a
place taken in the admission queue, telling a waiting stream its position
(SSE comments, which every client ignores) and keeping it alive meanwhile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import attrs

from twisted_gw.admission import Admission, NoUpstream, QueueFull, QueueTimeout, Route, ShuttingDown, Ticket
from twisted_gw.admission.keepalive import Keepalives
from twisted_gw.admission.prefix import block_hashes
from twisted_gw.admission.quota import Quotas
from twisted_gw.apis import sse
from twisted_gw.apis.checks import parse_object
from twisted_gw.apis.errors import GatewayError, unavailable
from twisted_gw.apis.kinds import api_of, takes_a_place
from twisted_gw.apis.prompts import routing_text
from twisted_gw.proxy.exchange import Exchange

# Seconds a client is asked to wait when no upstream is up (a restarting llama-server takes about that).
NO_UPSTREAM_RETRY = 10


def prompt_blocks(ex: Exchange) -> tuple[int, ...]:
    """The block hashes of a generation's prompt, for cache-aware routing (none for a body without one)."""
    if not ex.info.is_object:
        return ()
    text = routing_text(parse_object(ex.request.body), ex.api)
    return block_hashes(text) if text else ()


@attrs.define
class Places:
    """Takes places in C{admission} for requests; C{mean_duration}: seconds a request takes, lately."""

    admission: Admission
    quotas: Quotas
    keepalives: Keepalives
    mean_duration: Callable[[], float]
    queue_events: str = "comment"

    async def check_quota(self, ex: Exchange) -> None:
        """Rate-limit headers on every response of a user with a quota; 429 for a generation once it is used up."""
        settings = ex.settings
        if settings.tokens_per_minute is None and settings.tokens_per_day is None:
            return
        await self.quotas.refresh(ex.user)  # (a cluster's use, read from its store)
        for name, value in self.quotas.headers(ex.user, settings).items():
            ex.response.set_header(name, [value])
        spent = self.quotas.exceeded(ex.user, settings)
        if spent is not None and takes_a_place(ex.request.method, ex.request.path):
            raise GatewayError(
                429, f"Token quota used up: {spent.used} of {spent.limit} {spent.name.replace('_', ' ')}.",
                "rate_limit_error", "rate_limit_exceeded",
                {b"Retry-After": str(max(1, math.ceil(spent.retry_after))).encode()},
            )

    async def take(self, ex: Exchange, exclude: frozenset[Route] = frozenset()) -> Ticket:
        """
        A place for C{ex}; C{exclude}: upstreams that failed it (it then goes
        first in the queue).  Raises the L{GatewayError} to answer when the
        queue refuses it; cancelling the wait takes it out of the queue.
        """
        settings = ex.settings
        if self.admission.router.cache_aware and ex.prompt_blocks is None:
            ex.prompt_blocks = prompt_blocks(ex)
        waiting = self.admission.acquire(
            partial(self._queued, ex) if ex.stream else None, user=ex.user, weight=settings.weight,
            max_concurrent=settings.max_concurrent, max_queued=settings.max_queued,
            model=ex.model, exclude=exclude, first=bool(exclude), prompt=ex.prompt_blocks or (),
        )
        try:
            return await waiting
        except QueueFull as e:
            retry = {b"Retry-After": str(self.retry_after()).encode()}
            if e.per_user:
                raise GatewayError(429, "You already have as many requests waiting as you may; retry later.",
                                   "rate_limit_error", "user_queue_full", retry) from None
            raise GatewayError(429, "The queue is full; retry later.", "rate_limit_error", "queue_full",
                               retry) from None
        except QueueTimeout:
            raise unavailable("Timed out waiting in the queue.", "queue_timeout", self.retry_after()) from None
        except ShuttingDown:
            raise unavailable("The gateway is shutting down.", "shutting_down", 5) from None
        except NoUpstream:
            raise unavailable("No upstream is up: every upstream has been down for a while.",
                              "no_upstream_available", NO_UPSTREAM_RETRY) from None
        finally:
            self.keepalives.discard(ex)
            if not exclude:  # (its time in the queue, however it left it: a place, a refusal, its client gone)
                ex.queue_wait = self.admission.clock.seconds() - ex.started

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead times the mean request time."""
        per_request = self.mean_duration() or 10.0
        ahead = self.admission.cluster_waiting + 1  # (the whole queue, with a shared store)
        return max(1, min(600, math.ceil(per_request * ahead / max(1, self.admission.limit))))

    def _queued(self, ex: Exchange, position: int) -> None:
        """A waiting stream's position, told (the first time with the response's head and its keepalives)."""
        if not ex.headers_sent:
            ex.start_event_stream()
            ex.response.set_header(b"X-Queue-Position", [str(position).encode("ascii")])
            self.keepalives.add(ex, ex.write_keepalive)
        ex.write(sse.queue_position_comment(position))
        if self.queue_events == "data" and api_of(ex.request.path) in ("chat", "completions"):
            # (a data event is a chunk to an OpenAI chat client; the Anthropic and Responses SDKs would choke on it)
            ex.write(sse.queue_update_event(position))
