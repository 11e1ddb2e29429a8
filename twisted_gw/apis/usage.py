"""
Token usage read from what an upstream sent, without I/O: OpenAI's C{usage},
llama.cpp's C{timings}, or an estimate for a stream cut short.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True, slots=True)
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

    __slots__ = ("_from_timings", "_from_usage", "content_chunks")

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
        try:
            obj = json.loads(data)
        except ValueError:
            return
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
