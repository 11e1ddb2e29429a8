"""
Server-sent events without I/O: an incremental parser, the gateway's own
comment and event encoders, and what takes out of a stream the usage the
gateway asked for and the client did not.
"""

from __future__ import annotations

import json
import re


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


def named_event(name: str, obj: object) -> bytes:
    """One SSE event of type C{name} (Anthropic's streams name every event) carrying C{obj} as JSON."""
    return b"event: " + name.encode("ascii") + b"\n" + data_event(obj)


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
