"""Helpers for the end-to-end tests: a fake upstream and a gateway on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

import attrs
from twisted.internet import error, task
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from twisted_gw.config import Config, UpstreamSpec
from twisted_gw.testing import BytesProducer, FakeLlama, RunningGateway, start_gateway

reactor: Any = _reactor

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
USAGE = os.path.join(os.path.dirname(sys.executable), "llmgw-usage")  # the console script setup.py installs


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send C{request} on a new connection to 127.0.0.1:C{port}, and read everything until the other side closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def missing_service(why: str) -> unittest.SkipTest:
    """
    A service a test needs (PostgreSQL, Redis) is not there: the skip that says
    why; under LLMGW_REQUIRE_SERVICES=1 (CI, whose machine has them) a failure.
    """
    if os.environ.get("LLMGW_REQUIRE_SERVICES") == "1":
        raise AssertionError(f"LLMGW_REQUIRE_SERVICES=1 but {why}")
    return unittest.SkipTest(why)


def free_port() -> int:
    """A port that was free a moment ago (for a subprocess that must be told its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


KEYS = {"sk-alice-key": "alice", "sk-bob-key": "bob"}
ALICE = "sk-alice-key"
BOB = "sk-bob-key"


async def settle(seconds: float = 0.05) -> None:
    """Let the reactor run for C{seconds} (books are kept on the turn after an answer)."""
    await task.deferLater(reactor, seconds, lambda: None)


async def until(condition: Callable[[], object], seconds: float = 10.0) -> None:
    """Poll C{condition} on the reactor until it holds; fail after C{seconds}."""
    deadline = reactor.seconds() + seconds
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting")
        await task.deferLater(reactor, 0.02, lambda: None)


def chat_body(stream: bool = False, **extra: Any) -> bytes:
    doc = {"model": "fake-llama", "messages": [{"role": "user", "content": "say hello please"}], "stream": stream}
    doc.update(extra)
    return json.dumps(doc).encode()


class Collector(Protocol):
    """Collects a response body; C{wait_for(b"...")} fires once those bytes arrived."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()
        self._waits: list[tuple[bytes, Deferred[bytes]]] = []

    @property
    def data(self) -> bytes:
        if len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0] if self.chunks else b""

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if not self._waits:
            return
        still = []
        for needle, d in self._waits:
            if needle in self.data:
                d.callback(self.data)
            else:
                still.append((needle, d))
        self._waits = still

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        for _, d in self._waits:
            d.errback(reason)
        self._waits = []
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.data)
        else:
            self.done.errback(reason)

    def wait_for(self, needle: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if needle in self.data:
            d.callback(self.data)
        else:
            self._waits.append((needle, d))
        return d

    def abort(self) -> None:
        """Go away like a client that closed its connection."""
        self.done.addErrback(lambda _: None)
        self.transport.stopProducing()  # type: ignore[union-attr]


@attrs.define
class Reply:
    response: IResponse
    body: Collector

    @property
    def code(self) -> int:
        return self.response.code

    def header(self, name: str) -> Optional[bytes]:
        values = self.response.headers.getRawHeaders(name.encode())
        return values[0] if values else None

    def headers(self, name: str) -> list[bytes]:
        return list(self.response.headers.getRawHeaders(name.encode()) or [])

    async def text(self) -> bytes:
        return await self.body.done

    async def json(self) -> Any:
        return json.loads(await self.body.done)

    async def cut_short(self) -> bytes:
        """
        The body of a response that did not end as a whole one does (its
        connection closed before the end of its framing); fails if it ended whole.
        """
        try:
            whole = await self.body.done
        except ResponseFailed:
            return self.body.data
        raise AssertionError(f"the response ended whole: {whole[-200:]!r}")


class GatewayTestCase(unittest.TestCase):
    """Starts a L{FakeLlama} and a gateway in front of it, over real loopback sockets."""

    fake: FakeLlama
    gw: RunningGateway
    timeout = 20

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.addCleanup(self.pool.closeCachedConnections)

    async def start(self, fake: Optional[FakeLlama] = None, users: Optional[dict[str, Any]] = None,
                    clock: Optional[task.Clock] = None, **config: Any) -> None:
        """Start the fake upstream (unless started) and a gateway; C{clock}: the gateway's time (else the reactor's)."""
        self.fake = fake or FakeLlama(reactor)
        if not self.fake.listening:
            await self.fake.start()
            self.addCleanup(self.fake.stop)
        self.users_path = self.mktemp()
        with open(self.users_path, "w") as f:
            json.dump(KEYS if users is None else users, f)
        config.setdefault("upstreams", (UpstreamSpec(config.pop("upstream", self.fake.url)),))
        config.setdefault("usage_db", os.path.abspath(self.mktemp()) + ".sqlite3")
        config.setdefault("upstream_check_interval", 0)  # no background requests unless a test wants them
        config.setdefault("queue_update_interval", 0)  # every position change told at once, as tests expect
        self.config = Config(users_file=self.users_path, **config)
        self.gw = await start_gateway(reactor, self.config, clock)
        self.addCleanup(self.gw.stop)

    async def call(self, method: str, path: str, body: Optional[bytes] = None, key: Optional[str] = ALICE,
                   headers: Optional[dict[str, list[str]]] = None, url: Optional[str] = None) -> Reply:
        h = Headers(headers or {})
        if key is not None:
            h.setRawHeaders("Authorization", [f"Bearer {key}"])
        if body is not None and not h.hasHeader("Content-Type"):
            h.setRawHeaders("Content-Type", ["application/json"])
        target = (url or self.gw.url) + path
        response = await self.agent.request(
            method.encode(), target.encode(), h, BytesProducer(body) if body is not None else None
        )
        collector = Collector()
        response.deliverBody(collector)
        return Reply(response, collector)

    async def prepare_subprocess(self, fake: FakeLlama, users: Optional[dict[str, Any]] = None) -> tuple[str, int]:
        """Start C{fake}; make a working directory (with a users file unless C{users} is C{{}}) and pick a port."""
        self.fake = fake
        await fake.start()
        self.addCleanup(fake.stop)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        if users != {}:
            with open(os.path.join(workdir, "users.json"), "w") as f:
                json.dump(KEYS if users is None else users, f)
        return workdir, free_port()

    async def wait_until_up(self, url: str, seconds: float = 45.0) -> None:
        """Poll C{url}/health until a (subprocess) gateway answers."""
        deadline = reactor.seconds() + seconds
        while True:
            try:
                reply = await self.call("GET", "/health", key=None, url=url)
                await reply.text()
                return
            except error.ConnectionRefusedError:
                if reactor.seconds() > deadline:
                    raise
                await task.deferLater(reactor, 0.05, lambda: None)

    async def kill_under_load(self, usage_db: str) -> tuple[list[float], float]:
        """
        C{twistd -n llmgw} with the ledger C{usage_db} under six clients (half streaming), SIGKILLed after 2 s:
        when each request that finished before the kill finished at its client, and when the kill was.
        """
        workdir, port = await self.prepare_subprocess(FakeLlama(reactor, chunk_delay=0.005))
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "llmgw", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--upstream", self.fake.url, "--max-concurrent", "4", "--usage-db", usage_db],
            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(proc.kill)
        url = f"http://127.0.0.1:{port}"
        await self.wait_until_up(url)
        finished: list[float] = []
        stop_at = time.time() + 3.0
        killed: list[float] = []

        async def worker(stream: bool) -> None:
            while time.time() < stop_at and not killed:
                try:
                    reply = await self.call("POST", "/v1/chat/completions", chat_body(stream), url=url)
                    await reply.text()
                except Exception:
                    return
                if not killed and reply.code == 200:
                    finished.append(time.time())

        workers = [Deferred.fromCoroutine(worker(i % 2 == 0)) for i in range(6)]
        await task.deferLater(reactor, 2.0, lambda: None)
        killed.append(time.time())
        os.kill(proc.pid, signal.SIGKILL)
        await DeferredList(workers)
        await deferToThread(proc.wait, 10)
        return finished, killed[0]

    async def served_in_turn(self, running: Reply, count: int) -> list[bytes]:
        """
        On a one-place manual fake: let C{running} end, then C{count} more
        generations start one at a time; whose they were, in the order they
        started (the X-Gateway-User the gateway sent upstream).
        """
        self.fake.release(1)
        await running.text()
        for _ in range(count):
            arrived = self.fake.next_request()
            self.fake.release(1)
            await arrived
        return [(r.headers.getRawHeaders(b"x-gateway-user") or [b""])[0] for r in self.fake.generations[1:count + 1]]

    async def chat(self, stream: bool = False, key: str = ALICE, **extra: Any) -> Reply:
        return await self.call("POST", "/v1/chat/completions", chat_body(stream, **extra), key=key)

    async def metrics(self) -> Any:
        reply = await self.call("GET", "/metrics", key=None)
        return await reply.json()


def content_needle(token: str) -> bytes:
    """Bytes found only in the chunk that carries C{token}."""
    return b'"content":' + json.dumps(token).encode()


def sse_data(body: bytes) -> list[bytes]:
    """The C{data:} payloads of an event stream, in order."""
    return [line[len(b"data: "):] for line in body.split(b"\n") if line.startswith(b"data: ")]
