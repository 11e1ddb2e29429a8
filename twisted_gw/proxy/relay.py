"""
The upstream's answer relayed to the client as it arrives: its status (with
the web server's own reason phrase) and headers less the hop-by-hop ones and
its framing, then each piece of the body written at once while the usage
parser watches; a slow client pauses the upstream read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Optional

import attrs
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IResponse

from twisted_gw.apis import sse
from twisted_gw.apis.checks import RESPONSE_DROP, HeaderPairs, forward_headers
from twisted_gw.apis.errors import GatewayError
from twisted_gw.proxy.exchange import SSE_HEADERS, Exchange, reason
from twisted_gw.upstream import stream_body

# A JSON response is kept (besides being relayed) to read its usage, up to this size.
MAX_USAGE_BODY = 8 * 1024 * 1024


def passed_headers(response: IResponse, drop: frozenset[bytes] = RESPONSE_DROP) -> HeaderPairs:
    """The upstream's response headers that go on to the client."""
    return forward_headers(response.headers.getAllRawHeaders(), (), drop)


def is_event_stream(response: IResponse) -> bool:
    content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
    return content_type.lower().startswith(b"text/event-stream")


@attrs.define
class Relay:
    """Delivers upstream bodies to clients under the idle timeout."""

    clock: IReactorTime
    idle_timeout: float

    async def relay(self, ex: Exchange, response: IResponse, injected_usage: bool = False) -> None:
        """
        Relay C{response} to C{ex}'s client.  C{injected_usage}: the gateway
        asked for a usage chunk that the client did not: it is taken out.
        """
        event_stream = is_event_stream(response)
        if ex.headers_sent and response.code >= 400:
            # A 200 event stream was promised while queued: say it in the stream.
            await self.relay_error_as_event(ex, response)
            return
        if not ex.headers_sent:
            # An event stream's head is the gateway's own, whether it waited (its head went out before any
            # upstream answered) or not; any other answer's headers are the upstream's.
            if event_stream:
                ex.start(response.code, [(name, [value]) for name, value in SSE_HEADERS])
            else:
                ex.start(response.code, passed_headers(response))
            ex.event_stream = event_stream
            ex.write(b"")  # the headers go out now, as the upstream's did, not with the first piece to come
        kept: list[bytes] = []
        # only generations (POST) report usage: a model list is not kept to be parsed
        size = 0 if ex.request.method == b"POST" else MAX_USAGE_BODY + 1
        parser = sse.SSEParser()
        strip = sse.UsageStripper().feed if injected_usage and event_stream else None
        clock = self.clock

        def on_data(data: bytes) -> None:
            nonlocal size
            ex.write(strip(data) if strip is not None else data)
            if event_stream:
                for event in parser.feed(data):
                    ex.tracker.see_event(event)
                if ex.first_token_at is None and ex.tracker.content_chunks:
                    ex.first_token_at = clock.seconds()
                return
            if ex.first_token_at is None and ex.status < 400:
                ex.first_token_at = clock.seconds()
            if size <= MAX_USAGE_BODY:
                size += len(data)
                kept.append(data)

        await self.receive(ex, response, on_data, producer=True)
        if not event_stream and size <= MAX_USAGE_BODY:
            ex.tracker.see_body(b"".join(kept))

    async def receive(
        self, ex: Exchange, response: IResponse, on_data: Callable[[bytes], None], producer: bool,
        on_end: Optional[Callable[[None], None]] = None,
    ) -> None:
        """
        Deliver the upstream body to C{on_data}, under the idle timeout;
        cancellable.  C{producer}: the client's slowness pauses the upstream.
        C{on_end} is called as soon as the body is complete, before this
        returns (it must not raise).
        """
        deadline = ex.deadline
        deadline.set(self.idle_timeout, "idle_timeout")
        idle_timeout = self.idle_timeout

        def received(data: bytes) -> None:
            deadline.push(idle_timeout)
            on_data(data)

        body = stream_body(response, received)
        if on_end is not None:
            body.done.addCallback(on_end)
        if producer:
            ex.response.register_producer(body.producer)
        try:
            await ex.wait(body.done)
        except (CancelledError, GatewayError):
            raise
        except Exception as e:
            raise GatewayError(
                502, f"The upstream connection broke mid-response: {reason(e)}", "upstream_error",
                "upstream_disconnected",
            ) from None
        finally:
            deadline.stop()
            if producer and not ex.response.gone:
                ex.response.unregister_producer()

    async def relay_error_as_event(self, ex: Exchange, response: IResponse) -> None:
        """An upstream error for a stream already begun: read whole, then said as the stream's error event."""
        chunks: list[bytes] = []
        try:
            await self.receive(ex, response, chunks.append, producer=False)
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
        ex.write_error_event(message, "upstream_error", ex.error, response.code)
