"""
One request's life: check it, wait for a place, send it upstream, relay the
response as it arrives, then release the place and account for it.

A client that leaves cancels the coroutine at whatever it awaits: the queue
place (removed from the queue), the upstream's headers (connection aborted)
or the body (connection stopped).  C{finally} releases and accounts either way.
"""

from __future__ import annotations

import json
from typing import Optional

import attrs
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from twisted_gw import sse
from twisted_gw.accounting import Accounting, RequestRecord
from twisted_gw.admission import Admission, Ticket
from twisted_gw.checks import (
    GATEWAY_USER_HEADER,
    HOP_BY_HOP,
    REQUEST_DROP,
    check_uri,
    forward_headers,
    inspect_body,
)
from twisted_gw.errors import GatewayError, bad_gateway, error_document
from twisted_gw.upstream import Upstream, stream_body

log = Logger(namespace="llmgw.access")

# A JSON response is kept (besides being relayed) to read its usage, up to this size.
MAX_USAGE_BODY = 8 * 1024 * 1024

SSE_HEADERS = (
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache"),
    (b"X-Accel-Buffering", b"no"),
)


@attrs.define(eq=False)
class Exchange:
    """The state of one proxied request, for relaying and accounting."""

    request: Request
    user: str
    started: float
    stream: bool = False
    headers_sent: bool = False
    status: int = 0
    queue_wait: float = 0.0
    cancelled: bool = False
    tracker: sse.UsageTracker = attrs.Factory(sse.UsageTracker)
    keepalive: Optional[LoopingCall] = None

    def write(self, data: bytes) -> None:
        self.request.write(data)

    def start_event_stream(self, status: int = 200) -> None:
        """Send SSE response headers now (before the upstream answered)."""
        self.request.setResponseCode(status)
        for name, value in SSE_HEADERS:
            self.request.setHeader(name, value)
        self.headers_sent = True
        self.status = status

    def write_error_event(self, message: str, type: str, code: str) -> None:
        self.write(sse.data_event(error_document(message, type, code)))


@attrs.define
class Proxy:
    """Forwards C{/v1} requests to the upstream through the admission queue."""

    upstream: Upstream
    admission: Admission
    accounting: Accounting
    clock: IReactorTime
    queue_events: str = "comment"
    keepalive_interval: float = 15.0

    async def handle(self, request: Request, user: str) -> None:
        ex = Exchange(request, user, self.clock.seconds())
        uri = check_uri(request.uri)
        body = request.content.read() if request.content is not None else b""
        info = inspect_body(body, request.getHeader(b"content-type"))
        ex.stream = info.stream
        ticket: Optional[Ticket] = None
        try:
            if request.method == b"POST":
                on_position = (lambda n: self._queued(ex, n)) if ex.stream else None
                ticket = await self.admission.acquire(on_position)
                self._stop_keepalive(ex)
                ex.queue_wait = self.clock.seconds() - ex.started
            headers = self._upstream_headers(request, user)
            try:
                response = await self.upstream.request(request.method, uri, headers, body or None)
            except CancelledError:
                raise
            except Exception as e:
                raise bad_gateway(f"The upstream could not be reached: {_reason(e)}") from None
            await self._relay(ex, response)
        except CancelledError:
            ex.cancelled = True
            raise
        except GatewayError as e:
            if not ex.headers_sent:
                ex.status = e.status
                raise
            ex.write_error_event(e.message, e.type, e.code or "error")
        finally:
            self._stop_keepalive(ex)
            if ticket is not None:
                ticket.release()
            self._account(ex, request)

    def _queued(self, ex: Exchange, position: int) -> None:
        if not ex.headers_sent:
            ex.start_event_stream()
            ex.request.setHeader(b"X-Queue-Position", str(position).encode("ascii"))
            loop = LoopingCall(ex.write, sse.comment("keepalive"))
            loop.clock = self.clock
            loop.start(self.keepalive_interval, now=False)
            ex.keepalive = loop
        ex.write(sse.queue_position_comment(position))
        if self.queue_events == "data":
            ex.write(sse.queue_update_event(position))

    @staticmethod
    def _stop_keepalive(ex: Exchange) -> None:
        if ex.keepalive is not None and ex.keepalive.running:
            ex.keepalive.stop()
        ex.keepalive = None

    @staticmethod
    def _upstream_headers(request: Request, user: str) -> Headers:
        incoming = request.requestHeaders
        kept = forward_headers(
            incoming.getAllRawHeaders(),
            incoming.getRawHeaders(b"connection", []),
            REQUEST_DROP,
        )
        headers = Headers(dict(kept))
        headers.setRawHeaders(GATEWAY_USER_HEADER, [user.encode("utf-8")])
        return headers

    async def _relay(self, ex: Exchange, response: IResponse) -> None:
        request = ex.request
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        event_stream = content_type.lower().startswith(b"text/event-stream")
        if ex.headers_sent and response.code >= 400:
            # We promised a 200 event stream while queued; say it in the stream.
            await self._relay_error_as_event(ex, response)
            return
        if not ex.headers_sent:
            request.setResponseCode(response.code, response.phrase)
            for name, values in forward_headers(
                response.headers.getAllRawHeaders(),
                response.headers.getRawHeaders(b"connection", []),
                HOP_BY_HOP,
            ):
                request.responseHeaders.setRawHeaders(name, values)
            if event_stream:
                for name, value in SSE_HEADERS[1:]:
                    request.setHeader(name, value)
            ex.headers_sent = True
            ex.status = response.code
            # the headers go out now, as the upstream's did, not with the first chunk
            request.write(b"")

        if event_stream:
            parser = sse.SSEParser()

            def on_data(data: bytes) -> None:
                request.write(data)
                for event in parser.feed(data):
                    ex.tracker.see_event(event)
        else:
            kept: list[bytes] = []
            size = [0]

            def on_data(data: bytes) -> None:
                request.write(data)
                if size[0] <= MAX_USAGE_BODY:
                    size[0] += len(data)
                    kept.append(data)

        relay = stream_body(response, on_data)
        request.registerProducer(relay.producer, True)
        try:
            await relay.done
        except CancelledError:
            raise
        except Exception as e:
            if event_stream:
                ex.write_error_event(
                    f"The upstream connection broke mid-stream: {_reason(e)}", "upstream_error", "upstream_disconnected"
                )
            else:
                # A JSON body cut short cannot be mended: close, so the client
                # sees a broken response rather than waiting for the rest.
                request.loseConnection()
            log.warn("upstream body broke for {user}: {why}", user=ex.user, why=_reason(e))
        finally:
            if request.channel is not None:
                request.unregisterProducer()
        if not event_stream and size[0] <= MAX_USAGE_BODY:
            ex.tracker.see_body(b"".join(kept))

    async def _relay_error_as_event(self, ex: Exchange, response: IResponse) -> None:
        chunks: list[bytes] = []
        relay = stream_body(response, chunks.append)
        try:
            await relay.done
        except CancelledError:
            raise
        except Exception:
            pass
        text = b"".join(chunks)[:65536].decode("utf-8", "replace")
        message = f"The upstream answered {response.code}"
        try:
            doc = json.loads(text)
            upstream_message = doc["error"]["message"]
            message = f"{message}: {upstream_message}"
        except (ValueError, KeyError, TypeError):
            if text.strip():
                message = f"{message}: {text.strip()[:500]}"
        ex.write_error_event(message, "upstream_error", f"upstream_{response.code}")

    def _account(self, ex: Exchange, request: Request) -> None:
        usage = ex.tracker.usage
        duration = self.clock.seconds() - ex.started
        path = request.uri.partition(b"?")[0].decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        status = ex.status
        self.accounting.record(RequestRecord(
            user=ex.user, method=method, path=path, status=status,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            duration=duration, queue_wait=ex.queue_wait, cancelled=ex.cancelled,
            usage_source=usage.source,
        ))
        log.info(
            "{method} {path} {status} user={user} wait={queue_wait:.3f}s time={duration:.3f}s "
            "tokens={prompt_tokens}+{completion_tokens}{cancelled_note}",
            method=method, path=path, status=status, user=ex.user, queue_wait=ex.queue_wait,
            duration=duration, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, cancelled=ex.cancelled,
            cancelled_note=" (cancelled)" if ex.cancelled else "",
        )


def _reason(e: BaseException) -> str:
    """A short human reason, unwrapping Twisted's wrapper exceptions."""
    inner = getattr(e, "reasons", None)
    if inner:
        first = inner[0]
        return _reason(getattr(first, "value", first))
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:300]
