"""
Server-sent events without I/O: an incremental parser, the gateway's own
comment and event encoders, and token usage read from what the upstream sent.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

import attrs

from twisted_gw import fastjson


class SSEParser:
    """
    Incremental SSE parser (the WHATWG event-stream rules for lines and
    C{data} fields).  L{feed} takes bytes as they arrive, split anywhere, and
    returns the data of each event completed by them.
    """

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[bytes] = []
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if not chunk:
            return []
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        text = self._partial + chunk if self._partial else chunk
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = text.split(b"\n")
        self._partial = lines.pop()
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = []
            elif line.startswith(b"data: "):  # (the usual form, taken in one step)
                data.append(line[6:])
            elif line.startswith(b"data"):
                name, _, value = line.partition(b":")
                if name == b"data":
                    data.append(value[1:] if value.startswith(b" ") else value)
        self._data = data
        return events


def comment(text: str) -> bytes:
    """An SSE comment: every SSE client ignores it, so it is always safe to send."""
    return b"".join(b": " + line.encode("utf-8") + b"\n" for line in text.split("\n")) + b"\n"


def data_event(obj: object) -> bytes:
    """One SSE event carrying C{obj} as JSON."""
    return b"data: " + json.dumps(obj, separators=(", ", ": ")).encode("utf-8") + b"\n\n"


def queue_position_comment(position: int) -> bytes:
    return comment(f"queue position={position}")


def queue_update_event(position: int) -> bytes:
    """The original gateway's data event, sent only with C{--queue-events=data}."""
    return data_event({
        "object": "queue.update",
        "queue_position": position,
        "message": f"Your query is #{position} in the queue",
    })


_NULL_USAGE = re.compile(rb'(,\s*"usage"\s*:\s*null(?=\s*[,}]))|("usage"\s*:\s*null\s*,\s*)')
_USAGE_ONLY = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class UsageStripper:
    """
    Takes out of an event stream what asking for C{include_usage} added: the
    usage-only chunk (C{"choices": []} with C{usage}) and the C{"usage": null}
    that OpenAI-style servers then put on every other chunk.  Every other byte
    passes as it came; events are passed whole, as soon as they are complete.
    """

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> bytes:
        text = self._partial + data
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(text):
            out.append(self._event(text[start:match.end()]))
            start = match.end()
        self._partial = text[start:]
        return b"".join(out)

    @staticmethod
    def _event(raw: bytes) -> bytes:
        if b'"usage"' not in raw:
            return raw
        if _USAGE_ONLY.search(raw) and b'"usage":null' not in raw.replace(b" ", b""):
            return b""
        return _NULL_USAGE.sub(b"", raw)


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@attrs.frozen
class Usage:
    """Tokens of one request, and where the numbers came from."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    source: str = "none"  # "usage", "timings", "estimate" or "none"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_object(obj: Any) -> Optional[Usage]:
    """
    Usage from one response object (a stream chunk or a whole JSON response):
    the OpenAI C{usage} if present, else llama.cpp's C{timings}, where prompt
    tokens are C{prompt_n + cache_n} (the cached prefix counts too).
    """
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if isinstance(usage, dict) and ("prompt_tokens" in usage or "completion_tokens" in usage):
        return Usage(_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), "usage")
    timings = obj.get("timings")
    if isinstance(timings, dict) and ("prompt_n" in timings or "predicted_n" in timings):
        return Usage(
            _int(timings.get("prompt_n")) + _int(timings.get("cache_n")),
            _int(timings.get("predicted_n")),
            "timings",
        )
    return None


# A chunk that carries generated text: a string "content" (chat) or "text" (completions).
_CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"[^"]')


class UsageTracker:
    """
    Watches a response (stream events or a JSON body) for its token usage:
    C{usage} first, then llama.cpp's C{timings}, and for a stream cut short
    before either, the number of content chunks relayed (llama.cpp sends one
    token a chunk), flagged as an estimate.
    """

    def __init__(self) -> None:
        self._from_usage: Optional[Usage] = None
        self._from_timings: Optional[Usage] = None
        self.content_chunks = 0

    def see_object(self, obj: Any) -> None:
        found = usage_from_object(obj)
        if found is None:
            return
        if found.source == "usage":
            self._from_usage = found
        else:
            self._from_timings = found
        # a usage chunk may carry timings too; keep both readings
        if found.source == "usage" and isinstance(obj, dict):
            timings = usage_from_object({"timings": obj.get("timings")})
            if timings is not None:
                self._from_timings = timings

    def see_event(self, data: bytes) -> None:
        """An event as relayed: counted, and parsed only if it can carry numbers."""
        if (b'"content"' in data or b'"text"' in data) and _CONTENT.search(data):
            self.content_chunks += 1
        # Parsing JSON costs more than relaying: only the chunks that can carry
        # numbers are parsed (llama.cpp puts them on the last one or two).
        if b'"usage"' not in data and b'"timings"' not in data:
            return
        obj = fastjson.loads(data)
        if obj is not fastjson.NOT_JSON:
            self.see_object(obj)

    def see_body(self, body: bytes) -> None:
        try:
            self.see_object(json.loads(body))
        except ValueError:
            pass

    @property
    def usage(self) -> Usage:
        if self._from_usage or self._from_timings:
            return self._from_usage or self._from_timings  # type: ignore[return-value]
        if self.content_chunks:
            return Usage(0, self.content_chunks, "estimate")
        return Usage()
