"""
A fast llama.cpp-like upstream for the benchmark suite (raw asyncio, no web framework).

    python bench/paced_upstream.py --port PORT

Answers on 127.0.0.1 like llama.cpp's server on the wire: C{GET /health},
C{GET /props} (so the gateway treats it as llama.cpp), C{GET /v1/models}, and
C{POST /v1/chat/completions} / C{/v1/completions}, streaming or not.  Streams
are chunked SSE, one C{data: {...}} event per HTTP chunk, C{timings} on the
finish chunk (or C{usage} and C{timings} on a usage chunk when
C{stream_options.include_usage} is set, as llama.cpp does), then
C{data: [DONE]}.  Knobs, as extra fields of the JSON body (llama.cpp ignores
unknown fields, and the gateway and nginx forward them untouched):

- C{max_tokens}: the number of content chunks (default 8);
- C{bench_interval_ms}: one chunk every that many ms, on an absolute schedule
  from the response's start (chunk k at start + k * interval), whatever the
  reader's pace: a slow proxy makes the data pile up, it does not slow the
  offer; 0 (default): as fast as the connection takes them (with
  backpressure);
- C{bench_hold}: send the headers and the first chunk, then nothing until the
  client leaves (a generation that holds its place).

The server has to be faster than what it measures: chunks are prebuilt bytes
and pacing is one timer per stream on the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any, Optional

MODEL = "fake-llama"
FINGERPRINT = "b0000-fake"

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _timings(prompt: int, completion: int) -> dict[str, float]:
    return {
        "cache_n": 0, "prompt_n": prompt, "prompt_ms": 1.5, "prompt_per_token_ms": 0.1,
        "prompt_per_second": 10000.0, "predicted_n": completion, "predicted_ms": 2.5,
        "predicted_per_token_ms": 0.3, "predicted_per_second": 3000.0,
    }


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": prompt + completion}


def _chunk(event: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(event), event)


def _event(doc: bytes) -> bytes:
    return _chunk(b"data: " + doc + b"\n\n")


DONE = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Generation:
    """One streaming response: chunk by chunk, paced, unpaced or held."""

    def __init__(self, proto: UpstreamProtocol, doc: dict[str, Any], chat: bool, number: int) -> None:
        self.proto = proto
        self.loop = proto.loop
        self.chat = chat
        max_tokens = doc.get("max_tokens")
        self.tokens = max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else 8
        interval = doc.get("bench_interval_ms") or 0
        self.interval = float(interval) / 1000.0 if isinstance(interval, (int, float)) else 0.0
        self.hold = doc.get("bench_hold") is True
        options = doc.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.prompt = _prompt_tokens(doc)
        self.created = int(time.time())
        self.id = ("chatcmpl-" if chat else "cmpl-") + str(number)
        self.object = "chat.completion.chunk" if chat else "text_completion"
        tail = self._tail() + b"}"
        if chat:
            self.head = b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"'
            self.first_head = b'{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":"'
            self.tail = b'"}}]' + tail
        else:
            self.head = self.first_head = b'{"choices":[{"text":"'
            self.tail = b'","index":0,"logprobs":null,"finish_reason":null}]' + tail
        self.index = 0
        self.start = 0.0
        self.handle: Optional[asyncio.Handle] = None

    def _tail(self) -> bytes:
        """The fields after C{choices}, llama.cpp's order, without the closing brace."""
        return (f',"created":{self.created},"id":"{self.id}","model":"{MODEL}",'
                f'"system_fingerprint":"{FINGERPRINT}","object":"{self.object}"').encode()

    def begin(self) -> None:
        self.proto.write(
            b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.start = self.loop.time()
        if self.hold:
            self._emit()
        elif self.interval > 0:
            self._paced()
        else:
            self._unpaced()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _emit(self) -> None:
        head = self.first_head if self.index == 0 else self.head
        self.proto.write(_event(b"%b t%d%b" % (head, self.index, self.tail)))
        self.index += 1

    def _paced(self) -> None:
        self.handle = None
        if self.proto.gone:
            return
        if self.index >= self.tokens:
            self._finish()
            return
        self._emit()
        self.handle = self.loop.call_at(self.start + self.index * self.interval, self._paced)

    def _unpaced(self) -> None:
        self.handle = None
        burst = 0
        while not self.proto.gone and not self.proto.paused and self.index < self.tokens and burst < 256:
            self._emit()
            burst += 1
        if self.proto.gone or self.proto.paused:
            return  # resume_writing calls us again
        if self.index >= self.tokens:
            self._finish()
        else:
            self.handle = self.loop.call_soon(self._unpaced)

    def resume(self) -> None:
        if self.interval <= 0 and not self.hold and self.handle is None and self.index < self.tokens:
            self._unpaced()

    def _finish(self) -> None:
        completion = self.index
        tail = self._tail()
        if self.chat:
            final = b'{"choices":[{"finish_reason":"stop","index":0,"delta":{}}]' + tail
        else:
            final = b'{"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}]' + tail
        usage = _dumps(_usage(self.prompt, completion))
        timings = _dumps(_timings(self.prompt, completion))
        if self.chat and self.include_usage:
            out = _event(final + b"}") + _event(
                b'{"choices":[]' + tail + b',"usage":' + usage + b',"timings":' + timings + b"}"
            )
        elif self.chat:
            out = _event(final + b',"timings":' + timings + b"}")
        else:
            out = _event(final + b',"usage":' + usage + b',"timings":' + timings + b"}")
        self.proto.write(out + DONE)
        self.proto.done()


def _prompt_tokens(doc: dict[str, Any]) -> int:
    messages = doc.get("messages")
    if isinstance(messages, list):
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    else:
        text = str(doc.get("prompt", ""))
    return len(text.split()) + 4


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, requests answered in order."""

    served = 0

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.buf = b""
        self.transport: Optional[asyncio.Transport] = None
        self.gone = False
        self.paused = False
        self.busy: Optional[Generation] = None
        self.body_left = -1
        self.head: Optional[tuple[bytes, bytes, dict[bytes, bytes]]] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.gone = True
        if self.busy is not None:
            self.busy.cancel()
            self.busy = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.busy is not None:
            self.busy.resume()

    def write(self, data: bytes) -> None:
        if not self.gone and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._parse()

    def done(self) -> None:
        self.busy = None
        if self.buf:
            self._parse()

    def _parse(self) -> None:
        while self.busy is None and not self.gone:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = self.buf[:end].split(b"\r\n")
                self.buf = self.buf[end + 4:]
                method, target, _ = lines[0].split(b" ", 2)
                headers: dict[bytes, bytes] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                self.head = (method, target, headers)
            method, target, headers = self.head
            if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                body = self._chunked_body()
                if body is None:
                    return
            else:
                length = int(headers.get(b"content-length", b"0"))
                if len(self.buf) < length:
                    return
                body, self.buf = self.buf[:length], self.buf[length:]
            self.head = None
            self._handle(method, target.partition(b"?")[0], body)

    def _chunked_body(self) -> Optional[bytes]:
        """The whole chunked body if it has arrived (consumed from the buffer), else None."""
        pos, parts = 0, list[bytes]()
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(self.buf[pos:eol].split(b";")[0], 16)
            if size == 0:
                end = self.buf.find(b"\r\n\r\n", eol)  # at eol itself when there are no trailers
                if end < 0:
                    return None
                self.buf = self.buf[end + 4:]
                return b"".join(parts)
            if len(self.buf) < eol + 2 + size + 2:
                return None
            parts.append(self.buf[eol + 2:eol + 2 + size])
            pos = eol + 2 + size + 2

    def _json(self, status: int, doc: Any) -> None:
        body = _dumps(doc)
        self.write(b"HTTP/1.1 %d %b\r\nServer: llama.cpp\r\nContent-Type: application/json; charset=utf-8\r\n"
                   b"Keep-Alive: timeout=5, max=100000\r\nContent-Length: %d\r\n\r\n%b"
                   % (status, _REASONS.get(status, b"Error"), len(body), body))

    def _handle(self, method: bytes, path: bytes, body: bytes) -> None:
        UpstreamProtocol.served += 1
        if path == b"/health":
            return self._json(200, {"status": "ok"})
        if path == b"/props":
            return self._json(200, {"default_generation_settings": {"n_ctx": 4096}, "total_slots": 1000,
                                    "model_path": "/models/fake.gguf", "build_info": FINGERPRINT})
        if path == b"/v1/models":
            return self._json(200, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 0, "owned_by": "llamacpp"}]})
        if path in (b"/v1/chat/completions", b"/v1/completions"):
            if method != b"POST":
                return self._json(405, {"error": {"code": 405, "message": "POST only",
                                                  "type": "invalid_request_error"}})
            try:
                doc = json.loads(body)
                assert isinstance(doc, dict)
            except (ValueError, AssertionError):
                return self._json(400, {"error": {"code": 400, "message": "Invalid JSON",
                                                  "type": "invalid_request_error"}})
            chat = path == b"/v1/chat/completions"
            if doc.get("stream") is True:
                self.busy = Generation(self, doc, chat, UpstreamProtocol.served)
                self.busy.begin()
                return None
            return self._json(200, _non_stream(doc, chat, UpstreamProtocol.served))
        return self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})


def _non_stream(doc: dict[str, Any], chat: bool, number: int) -> dict[str, Any]:
    max_tokens = doc.get("max_tokens")
    n = max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else 8
    text = "".join(f" t{i}" for i in range(n))
    prompt = _prompt_tokens(doc)
    choices: list[Any]
    if chat:
        choices = [{"finish_reason": "stop", "index": 0, "message": {"role": "assistant", "content": text}}]
    else:
        choices = [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}]
    return {"choices": choices, "created": int(time.time()), "model": MODEL, "system_fingerprint": FINGERPRINT,
            "object": "chat.completion" if chat else "text_completion", "usage": _usage(prompt, n),
            "id": ("chatcmpl-" if chat else "cmpl-") + str(number), "timings": _timings(prompt, n)}


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, "127.0.0.1", port, backlog=4096, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
