"""
A non-stream answer assembled from the upstream's stream: the gateway asked
llama.cpp for a stream (which stops as soon as the client leaves) and answers
with the JSON document the upstream would have sent.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from twisted_gw.apis import sse
from twisted_gw.apis.assemble import Assembler
from twisted_gw.apis.checks import RESPONSE_DROP, HeaderPairs
from twisted_gw.proxy.exchange import Exchange
from twisted_gw.proxy.relay import Relay, passed_headers

# The assembled answer has a length and type of its own.
ASSEMBLED_DROP = RESPONSE_DROP | {b"content-type", b"content-length", b"cache-control", b"x-accel-buffering"}


async def assemble(relay: Relay, clock: IReactorTime, ex: Exchange, response: IResponse, assembler: Assembler) -> None:
    """Read the upstream's stream whole, then answer with the JSON it stands for."""
    parser = sse.SSEParser()

    def on_data(data: bytes) -> None:
        for event in parser.feed(data):
            if event != b"[DONE]" and not assembler.feed_event(event):  # (read once, for the answer and usage)
                ex.tracker.see_event(event)  # not JSON (whatever it may count)
        if ex.first_token_at is None and (assembler.tokens or ex.tracker.content_chunks):
            ex.first_token_at = clock.seconds()

    # The answer goes out in the call that completes the body, before the body's delivery is wound down.
    headers = passed_headers(response, ASSEMBLED_DROP)
    failed: list[Optional[Failure]] = []

    def answer(result: None) -> None:
        try:
            write_answer(ex, assembler, headers)
        except Exception:  # (raised below, as if the answer were written there)
            failed.append(Failure())
        return result

    # What the assembler takes in is counted in the request's usage when that is read (Exchange.final_usage),
    # so that a stream that broke off counts too.
    ex.assembler = assembler
    await relay.receive(ex, response, on_data, producer=False, on_end=answer)
    if failed and failed[0] is not None:
        failed[0].raiseException()


def write_answer(ex: Exchange, assembler: Assembler, headers: HeaderPairs) -> None:
    """The JSON answer the assembled stream stands for, with its status and headers, written whole."""
    body = assembler.body()
    status = 200
    if assembler.error is not None:
        code = assembler.error.get("code")
        status = code if isinstance(code, int) and 400 <= code <= 599 else 500
    ex.start(status, [*headers, (b"Content-Type", [b"application/json; charset=utf-8"]),
                      (b"Content-Length", [b"%d" % len(body)])])
    ex.write(body)
