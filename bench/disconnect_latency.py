"""
How long after a client leaves does the upstream see its connection close?

Starts, on loopback, the fake llama.cpp server and the gateway in one process,
then for each phase (mid-stream, waiting for headers, a non-stream request
assembled from a stream) opens a request, lets it reach that phase, closes the
client connection, and times how long until the fake upstream sees its
connection close.  Prints the median, p95 and max of N runs per phase.

    python bench/disconnect_latency.py [N]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from twisted_gw.config import Config
from twisted_gw.testing import BytesProducer, FakeLlama, start_gateway

KEY = "sk-bench"


class Sink(Protocol):
    def __init__(self, first: Deferred[None]) -> None:
        self.first = first

    def dataReceived(self, data: bytes) -> None:
        if b'"content"' in data and not self.first.called:
            self.first.callback(None)


async def one(reactor: Any, agent: Agent, fake: FakeLlama, url: str, phase: str) -> float:
    stream = phase == "mid-stream"
    fake.header_delay = 30.0 if phase == "waiting-for-headers" else 0.0
    fake.manual = phase != "waiting-for-headers"
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()
    arrived = fake.next_request()
    headers = Headers({"Authorization": [f"Bearer {KEY}"], "Content-Type": ["application/json"]})
    d = agent.request(b"POST", (url + "/v1/chat/completions").encode(), headers, BytesProducer(body))
    upstream = await arrived
    if phase == "mid-stream":
        response = await d
        first: Deferred[None] = Deferred()
        sink = Sink(first)
        response.deliverBody(sink)
        fake.release(2)
        await first
        start = time.perf_counter()
        sink.transport.stopProducing()  # type: ignore[union-attr]
    else:
        if fake.manual:
            fake.release(2)
            while upstream.chunks_sent < 2:
                await task.deferLater(reactor, 0.001, lambda: None)
        d.addErrback(lambda _: None)
        start = time.perf_counter()
        d.cancel()
    await upstream.ended
    elapsed = time.perf_counter() - start
    assert upstream.disconnected
    return elapsed


async def main(reactor: Any, runs: str = "20") -> None:
    n = int(runs)
    fake = FakeLlama(reactor)
    await fake.start()
    users = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump({KEY: "bench"}, users)
    users.close()
    gw = await start_gateway(reactor, Config(upstream=fake.url, users_file=users.name, max_concurrent=4))
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    print(f"{'phase':<22} {'runs':>4} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for phase in ("mid-stream", "waiting-for-headers", "non-stream-assembled"):
        times = [await one(reactor, agent, fake, gw.url, phase) for _ in range(n)]
        times.sort()
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
        print(f"{phase:<22} {n:>4} {statistics.median(times) * 1e3:>10.2f} {p95 * 1e3:>8.2f} {times[-1] * 1e3:>8.2f}")
    await gw.stop()
    await fake.stop()


if __name__ == "__main__":
    task.react(lambda reactor, *args: Deferred.fromCoroutine(main(reactor, *args)), sys.argv[1:])
