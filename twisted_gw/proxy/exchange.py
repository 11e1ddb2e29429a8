"""One proxied request's state (L{Exchange}), and the one timer that bounds its waits on the upstream (L{Deadline})."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_gw.admission import Ticket, UserSettings
from twisted_gw.apis import sse
from twisted_gw.apis.assemble import Assembler
from twisted_gw.apis.checks import BodyInfo, HeaderPairs
from twisted_gw.apis.errors import GatewayError, anthropic_document, error_document
from twisted_gw.apis.kinds import anthropic_dialect, api_of
from twisted_gw.apis.usage import Usage, UsageTracker
from twisted_gw.proxy.client import ClientRequest, IClientResponse
from twisted_gw.upstream import Upstream

T = TypeVar("T")

KEEPALIVE = sse.comment("keepalive")

SSE_HEADERS = (
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache"),
    (b"X-Accel-Buffering", b"no"),
)


class Deadline:
    """
    One timer for a request's waits on the upstream: for its response head,
    then for each piece of its body.  L{push} moves the time later without
    touching the timer (each piece of a body does), which reads the time when
    it fires and sets itself again for what is left; L{set} to an earlier time
    resets it.  C{expired} is called with the code given to L{set}.
    """

    __slots__ = ("at", "clock", "code", "expired", "timer")

    def __init__(self, clock: IReactorTime, expired: Callable[[str], None]) -> None:
        self.clock = clock
        self.expired = expired
        self.at = 0.0
        self.code = ""
        self.timer: Optional[IDelayedCall] = None

    def set(self, seconds: float, code: str) -> None:
        self.at = self.clock.seconds() + seconds
        self.code = code
        if self.timer is None:
            self.timer = self.clock.callLater(seconds, self._fire)
        elif self.timer.getTime() > self.at:
            self.timer.reset(seconds)

    def push(self, seconds: float) -> None:
        self.at = self.clock.seconds() + seconds

    def stop(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fire(self) -> None:
        self.timer = None
        left = self.at - self.clock.seconds()
        if left > 0:
            self.timer = self.clock.callLater(left, self._fire)
        else:
            self.expired(self.code)


@attrs.define(eq=False)
class Exchange:
    """The state of one proxied request, for relaying, interrupting and accounting."""

    request: ClientRequest
    response: IClientResponse
    user: str
    settings: UserSettings
    started: float
    info: BodyInfo
    deadline: Deadline = attrs.field(init=False)  # (made for the exchange: it reports to it)
    headers_sent: bool = False
    event_stream: bool = False
    status: int = 0
    queue_wait: float = 0.0
    running: bool = False  # past the queue
    cancelled: bool = False
    error: Optional[str] = None
    tracker: UsageTracker = attrs.Factory(lambda self: UsageTracker(api_of(self.request.path)), takes_self=True)
    assembler: Optional[Assembler] = None  # what built its answer from a stream, until counted in its usage
    first_token_at: Optional[float] = None
    ticket: Optional[Ticket] = None
    upstream: Optional[Upstream] = None  # the one it went to (last)
    current: Optional[Deferred[Any]] = None
    interrupted: Optional[GatewayError] = None
    sent_upstream: bool = False  # an upstream was sent it (and may have read its prompt)
    prompt_blocks: Optional[tuple[int, ...]] = None  # its prompt's block hashes, once cache-aware routing needed them
    counted_prompt: Optional[tuple[int, str]] = None  # its prompt's tokens and how known, when counted after it ended

    @property
    def stream(self) -> bool:
        return self.info.stream

    @property
    def api(self) -> str:
        return api_of(self.request.path)

    @property
    def model(self) -> Optional[str]:
        return self.info.model

    def final_usage(self) -> Usage:
        """Its usage: what it relayed, and what an assembler took in, counted as if seen event by event."""
        assembler, self.assembler = self.assembler, None
        if assembler is not None:
            self.tracker.content_chunks += assembler.tokens
            self.tracker.see_object({"usage": assembler.usage, "timings": assembler.timings})
        usage = self.tracker.usage
        if self.counted_prompt is not None and usage.prompt_tokens == 0:
            tokens, how = self.counted_prompt
            return Usage(tokens, usage.completion_tokens, "estimate" if usage.source == "estimate" else how)
        return usage

    def start(self, status: int, headers: HeaderPairs) -> None:
        """The response's status and headers (sent with its first write)."""
        self.response.set_status(status)
        for name, values in headers:
            self.response.set_header(name, values)
        self.headers_sent = True
        self.status = status

    def start_event_stream(self) -> None:
        """A 200 event stream, begun before the upstream answered (a stream waiting in the queue)."""
        self.start(200, [(name, [value]) for name, value in SSE_HEADERS])
        self.event_stream = True

    def write(self, data: bytes) -> None:
        self.response.write(data)

    def write_keepalive(self) -> None:
        self.response.write(KEEPALIVE)

    def write_error_event(self, message: str, type: str, code: str, status: int) -> None:
        """The error that ends a stream already begun: Anthropic's C{event: error} on Messages, else OpenAI's."""
        if anthropic_dialect(self.request.path):
            self.write(sse.named_event("error", anthropic_document(status, message)))
        else:
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
            if self.response.gone or is_cancellation(e):
                raise CancelledError() from None
            raise
        finally:
            self.current = None

    def interrupt(self, error: GatewayError) -> None:
        """Stop whatever the request waits for (a timeout, a shutdown) and report C{error}."""
        if self.interrupted is None:
            self.interrupted = error
            if self.current is not None:
                self.current.cancel()


def is_cancellation(e: BaseException) -> bool:
    """A cancelled Deferred, possibly wrapped by the HTTP client (ResponseNeverReceived)."""
    if isinstance(e, CancelledError):
        return True
    reasons = getattr(e, "reasons", None) or ()
    return any(getattr(r, "check", lambda *_: False)(CancelledError) for r in reasons)


def reason(e: BaseException) -> str:
    """A short human reason, unwrapping Twisted's wrapper exceptions."""
    inner = getattr(e, "reasons", None)
    if inner:
        first = inner[0]
        return reason(getattr(first, "value", first))
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:300]
